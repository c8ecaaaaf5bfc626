#!/usr/bin/env bash
# Build the service image and run the compose stack for real, then use it as a user would:
#   bash scripts/container_check.sh
#
# From a clean clone on a Debian machine, as root (rootful Podman). It installs what is missing: podman,
# runc and debootstrap (apt-get), podman-compose (into .venv). When no registry can be reached it builds
# local stand-ins for python:3.11-slim and redis:7.4 from Debian packages, and says so. It builds the
# image with this machine's pip configuration mounted, never baked in, and brings up the compose stack
# with the CPU override: Redis with its append-only file on a volume, and the app in production mode
# with API keys and an admin token from a generated .env. Then it checks readiness and the healthcheck,
# a REST turn, a websocket turn streamed, an OpenAI SDK completion and the metrics behind the admin
# token; SIGKILLs the app container and starts it again, then the Redis container: after each, every
# turn acknowledged before is still stored and the conversation goes on. Last, the stack goes down with
# its volume. Each step prints its time; any failure prints both containers' logs and exits non-zero.
#
# Cached between runs: the stand-ins' root filesystems and Debian packages under $REFORMER_CHAT_CACHE
# (default /var/cache/reformer-chat); images and build layers in Podman's storage.
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."

CACHE=${REFORMER_CHAT_CACHE:-/var/cache/reformer-chat}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
IMAGE=reformer-chat:latest
# Not the file's `reformer-chat`, and one per run: a deployment or another check here stays untouched.
PROJECT=reformer-chat-check-$$
STANDIN_LABEL=org.reformer-chat.stand-in
PODMAN_COMPOSE='podman-compose>=1.6,<2'  # 1.6 parses `!reset`; Debian's 1.0 does not
WORK=$(mktemp -d /tmp/container-check.XXXXXX)
PY=.venv/bin/python

# --- steps, timing and clean-up ---------------------------------------------------------------------
T0=$(date +%s.%N)
STEP=""
STEP_START=""
SUMMARY=()
STACK_UP=""
ENV_BACKUP=""

since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

end_step() {
    if [[ -n $STEP ]]; then
        SUMMARY+=("$(printf '%7s s  %s' "$(since "$STEP_START")" "$STEP")")
        STEP=""
    fi
}

step() {
    end_step
    STEP=$1
    STEP_START=$(date +%s.%N)
    printf '\n==> [%6s s] %s\n' "$(since "$T0")" "$STEP"
}

# Show a command exactly as it runs (README, "Operations", quotes these), then run it.
exec 3>&1  # the terminal, for commands whose output goes to a log
run() {
    printf '  $ %s\n' "$*" >&3
    "$@"
}

say() { printf '  %s\n' "$*"; }

# Podman without systemd cannot put a container's healthcheck on a timer, and says so on every start
# (`podman healthcheck run` below runs the checks instead); the rest of its stderr is shown.
quiet_start() {
    printf '  $ podman start %s\n' "$1"
    podman start "$1" 2> >(grep -v 'systemd connection' >&2) >/dev/null
}

fail() {
    say "FAILED: $*"
    exit 1
}

compose() {
    .venv/bin/podman-compose -p "$PROJECT" \
        -f docker-compose.yml -f docker-compose.cpu.yml "$@"
}

container() {  # the container of a compose service
    podman ps -a --filter "label=io.podman.compose.project=$PROJECT" \
        --filter "label=com.docker.compose.service=$1" --format '{{.Names}}' | head -n 1
}

cleanup() {
    local status=$?
    set +e
    if [[ $status -ne 0 && -n $STACK_UP ]]; then
        for service in redis app; do
            printf '\n--- last lines of the %s container log ---\n' "$service"
            podman logs --tail 40 "$(container "$service")" 2>&1
        done
    fi
    if [[ -n ${LATE:-} ]]; then
        podman rm -f "$LATE" >/dev/null 2>&1
    fi
    if [[ -n $STACK_UP ]]; then
        compose down -v >/dev/null 2>&1
    fi
    if [[ -n $ENV_BACKUP ]]; then
        mv -f "$ENV_BACKUP" .env
    elif [[ -f .env ]] && head -n 1 .env | grep -q 'scripts/container_check.sh'; then
        rm -f .env
    fi
    rm -rf "$WORK"
    if [[ $status -ne 0 ]]; then
        printf '\ncontainer check FAILED in step "%s" (exit %s)\n' "$STEP" "$status"
    fi
    exit "$status"
}
trap cleanup EXIT

# --- the engine ---------------------------------------------------------------------------------------
step "prerequisites: podman, runc, debootstrap, podman-compose"
[[ $(id -u) -eq 0 ]] || fail "run as root: this check uses rootful Podman (and apt-get to install it)"
missing=()
for tool in podman runc debootstrap; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
if [[ ${#missing[@]} -gt 0 ]]; then
    command -v apt-get >/dev/null || fail "no apt-get to install ${missing[*]}: install them yourself"
    run apt-get update -qq
    run env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if ! { [[ -x $PY ]] && $PY -c "import httpx, openai, websockets" 2>/dev/null; }; then
    run bash scripts/setup.sh dev > "$WORK/setup.log" 2>&1 || { tail -n 30 "$WORK/setup.log"; fail "setup.sh"; }
fi
if ! .venv/bin/podman-compose --version 2>/dev/null | grep -Eq 'podman-compose version 1\.([6-9]|[1-9][0-9])'; then
    run $PY -m pip install --quiet --disable-pip-version-check "$PODMAN_COMPOSE"
fi
say "$(podman --version); $(runc --version | head -n 1); $(.venv/bin/podman-compose --version | head -n 1)"

# crun (Podman's default) refuses this kind of machine's hybrid cgroups, and root here cannot raise hard
# rlimits, so Podman's default ulimits fail ("error setting rlimit"): runc, and limits within the
# machine's own hard limits. No systemd: cgroupfs and a file for events.
hard_limit() {  # $1: ulimit flag; $2: the cap
    local hard
    hard=$(ulimit -H "$1")
    if [[ $hard == unlimited || $hard -gt $2 ]]; then hard=$2; fi
    echo "$hard"
}
mkdir -p "$CACHE"
nofile=$(hard_limit -n 16384)
nproc=$(hard_limit -u 32768)
cat > "$CACHE/containers.conf" <<EOF
# Written by scripts/container_check.sh; used through CONTAINERS_CONF.
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
export CONTAINERS_CONF=$CACHE/containers.conf
say "CONTAINERS_CONF=$CONTAINERS_CONF: runtime runc, ulimits nofile=$nofile nproc=$nproc"

# --- base images --------------------------------------------------------------------------------------
# One minimal Debian root filesystem serves both stand-ins (one debootstrap, one layer on disk): Python
# 3.11 with pip and venv, and redis-server. Kept as a tarball in the cache.
STANDIN_PACKAGES=python3,python3-pip,python3-venv,python-is-python3,redis-server
debian_rootfs() {  # prints the tarball's path
    local tarball=$CACHE/standin-bookworm.tar.gz root=$WORK/rootfs
    if [[ ! -f $tarball ]]; then
        mkdir -p "$CACHE/debs"
        say "debootstrap bookworm ($STANDIN_PACKAGES) from $DEBIAN_MIRROR" >&2
        debootstrap --variant=minbase --cache-dir="$CACHE/debs" --include="$STANDIN_PACKAGES" bookworm \
            "$root" "$DEBIAN_MIRROR" > "$WORK/debootstrap.log" 2>&1 \
            || { tail -n 20 "$WORK/debootstrap.log" >&2; return 1; }
        # What a slim image leaves out too: package lists and archives, documentation, translations.
        rm -rf "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* \
            "$root"/usr/share/man/* "$root"/usr/share/locale/*
        # The official Python image's pip installs into the system Python; Debian's refuses (PEP 668).
        rm -f "$root"/usr/lib/python3.*/EXTERNALLY-MANAGED
        # The official Redis image's entrypoint: the data directory becomes redis's, the server drops to
        # that user, and protected mode is off (that image builds Redis so: the compose network is the
        # boundary, no port is published); Debian's redis-server would refuse the app's connections.
        cat > "$root/usr/local/bin/docker-entrypoint.sh" <<'ENTRYPOINT'
#!/bin/sh
set -e
if [ "$1" = redis-server ]; then
    shift
    if [ "$(id -u)" = 0 ]; then
        find . \! -user redis -exec chown redis '{}' +
        exec setpriv --reuid=redis --regid=redis --init-groups redis-server --protected-mode no "$@"
    fi
    exec redis-server --protected-mode no "$@"
fi
exec "$@"
ENTRYPOINT
        chmod 755 "$root/usr/local/bin/docker-entrypoint.sh"
        tar -C "$root" --numeric-owner -czf "$tarball.$$" . && mv "$tarball.$$" "$tarball"
        rm -rf "$root"
    fi
    echo "$tarball"
}

# What each stand-in is; also its version: an image whose label differs was made by an older script.
standin_label() {
    case $1 in
        *python*) echo "Debian bookworm's Python 3.11 with pip and venv (debootstrap, v2)" ;;
        *redis*) echo "Debian bookworm's redis-server, protected mode off (debootstrap, v2)" ;;
    esac
}

standin() {  # $1: image reference; builds its stand-in
    local tarball label
    tarball=$(debian_rootfs)
    label="LABEL $STANDIN_LABEL=\"$(standin_label "$1")\""
    case $1 in
        *python*)
            podman import --quiet --change 'CMD ["python3"]' --change 'ENV LANG=C.UTF-8' --change "$label" \
                "$tarball" "$1" >/dev/null
            ;;
        *redis*)
            podman import --quiet --change 'ENTRYPOINT ["docker-entrypoint.sh"]' --change 'CMD ["redis-server"]' \
                --change 'WORKDIR /data' --change 'VOLUME /data' --change 'EXPOSE 6379' --change "$label" \
                "$tarball" "$1" >/dev/null
            ;;
    esac
}

labelled() {  # the stand-in label of a local image, empty for a registry's image
    local origin
    origin=$(podman image inspect --format "{{index .Labels \"$STANDIN_LABEL\"}}" "$1")
    [[ $origin == "<no value>" ]] || echo "$origin"
}

base_image() {  # $1: fully qualified reference
    local origin
    if podman image exists "$1" && [[ -n $(labelled "$1") && $(labelled "$1") != "$(standin_label "$1")" ]]; then
        say "$1: a stand-in from an older version of this script; replacing it"
        podman rmi --force "$1" >/dev/null
    fi
    if ! podman image exists "$1"; then
        if timeout 120 podman pull --quiet "$1" >/dev/null 2>"$WORK/pull.log"; then
            say "$1: pulled from its registry"
            return
        fi
        say "$1 cannot be pulled ($(tail -n 1 "$WORK/pull.log" | cut -c1-120))"
        say "building a local STAND-IN for $1 from Debian packages instead"
        standin "$1"
    fi
    origin=$(labelled "$1")
    if [[ -n $origin ]]; then
        say "$1: local STAND-IN, not the registry's image: $origin"
    else
        say "$1: the registry's image"
    fi
}

step "base images: python:3.11-slim and redis:7.4"
base_image docker.io/library/python:3.11-slim
base_image docker.io/library/redis:7.4
say "redis in the redis image: $(podman run --rm --entrypoint redis-server docker.io/library/redis:7.4 --version | cut -d' ' -f1-3)"

# --- the image ----------------------------------------------------------------------------------------
step "build the image"
mapfile -t pip_mounts < <($PY scripts/pip_build_mounts.py "$WORK/pip")
volumes=()
for mount in "${pip_mounts[@]}"; do
    volumes+=(-v "$mount")
done
build_args=(--build-arg TORCH_VARIANT=cpu)
if ! getent hosts download.pytorch.org >/dev/null; then
    say "download.pytorch.org does not resolve here: torch comes from pip's configuration (TORCH_INDEX_URL=)"
    build_args+=(--build-arg TORCH_INDEX_URL=)
fi
say "pip configuration mounted for the build only: ${pip_mounts[*]}"
run podman build --format docker -t "$IMAGE" "${build_args[@]}" "${volumes[@]}" . > "$WORK/build.log" 2>&1 \
    || { tail -n 40 "$WORK/build.log"; fail "podman build"; }
grep -E 'STEP [0-9]+/|^COMMIT' "$WORK/build.log" | cut -c1-150 | sed 's/^/    /'

step "inspect the image"
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
say "image size: $((size / 1000000)) MB ($size bytes)"
podman run --rm -i --no-healthcheck "$IMAGE" python - <<'EOF' || fail "the image's contents"
import os, pathlib, sys
import torch, app.factory  # everything the server imports, after the build stage's pruning
root = pathlib.Path("/opt/reformer-chat")
checks = {
    "runs as a non-root user": os.getuid() != 0,
    "the checkpoint is inside": (root / "checkpoints/reformer-chat-small/model.safetensors").is_file(),
    "no tests, bench, docs or scripts": not any((root / d).exists() for d in ("tests", "bench", "docs", "scripts")),
    "no torch headers or C++ tests": not (pathlib.Path(torch.__file__).parent / "include").exists(),
}
for what, ok in checks.items():
    print(f"  {'ok ' if ok else 'FAILED'} {what}")
sys.exit(0 if all(checks.values()) else 1)
EOF
# What the build mounted must be in the image only as far as the base image has it (the CA bundle).
targets=()
for mount in "${pip_mounts[@]}"; do
    target=${mount#*:}
    targets+=("${target%%:*}")
done
probe='for p in "$@"; do [ -e "$p" ] && echo "$p $(cksum < "$p" 2>/dev/null || echo directory)"; done; true'
[[ $(podman run --rm --no-healthcheck --entrypoint sh "$IMAGE" -c "$probe" sh "${targets[@]}") == \
    $(podman run --rm --entrypoint sh docker.io/library/python:3.11-slim -c "$probe" sh "${targets[@]}") ]] \
    || fail "the image holds something the build mounted: ${targets[*]}"
say "ok  none of the build's mounts is in the image (beyond what the base image has)"

# --- the stack ----------------------------------------------------------------------------------------
step "compose up (production mode, generated .env)"
PORT=$($PY -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
API_KEY="check-$($PY -c 'import secrets; print(secrets.token_urlsafe(24))')"
ADMIN_TOKEN=$($PY -c 'import secrets; print(secrets.token_urlsafe(24))')
if [[ -f .env ]]; then
    ENV_BACKUP=$WORK/env.backup
    cp .env "$ENV_BACKUP"
    say "your .env is set aside for the check and restored after it"
fi
cat > .env <<EOF
# Generated by scripts/container_check.sh for one run; removed after it.
API_KEYS=$API_KEY
ADMIN_TOKEN=$ADMIN_TOKEN
TORCH_THREADS=1
EOF
export CHECK_API_KEY=$API_KEY CHECK_ADMIN_TOKEN=$ADMIN_TOKEN
URL=http://127.0.0.1:$PORT
STACK_UP=1
# The host side of the app's published port (docker-compose.yml: a free loopback port, not 8000).
export APP_PUBLISH=127.0.0.1:$PORT
say "APP_PUBLISH=$APP_PUBLISH"
run .venv/bin/podman-compose -p "$PROJECT" -f docker-compose.yml -f docker-compose.cpu.yml up -d --no-build \
    > "$WORK/up.log" 2>&1 || { tail -n 30 "$WORK/up.log"; fail "compose up"; }
APP=$(container app)
REDIS=$(container redis)
say "containers: $APP, $REDIS"
say "(podman-compose starts them in order but does not wait for redis's healthcheck: the app waits itself)"

step "readiness and the healthcheck"
run $PY scripts/container_probe.py wait-ready "$URL"
podman logs "$APP" 2>&1 | grep -E 'Redis at .* (is not answering yet|answers now)' | cut -c1-160 | sed 's/^/  app log: /' \
    || say "app log: Redis answered the app's first PING"
run podman healthcheck run "$APP" || fail "the app's healthcheck"
say "ok  the app's healthcheck passes"
run podman healthcheck run "$REDIS" || fail "redis's healthcheck"
say "ok  redis's healthcheck passes"
uid=$(podman exec "$APP" id -u)
[[ $uid != 0 ]] || fail "the server runs as root"
say "ok  the server runs as uid $uid"

step "use it: REST, websocket, OpenAI SDK, metrics"
run $PY scripts/container_probe.py converse "$URL" "$WORK/state.json"

started_at() { podman inspect --format '{{.State.StartedAt}}' "$1"; }

step "kill -9 the app container, start it again"
before=$(started_at "$APP")
run podman kill --signal KILL "$APP" >/dev/null
podman wait "$APP" >/dev/null 2>&1 || true
quiet_start "$APP"
[[ $(started_at "$APP") != "$before" ]] || fail "the app container did not restart"
run $PY scripts/container_probe.py wait-ready "$URL"
run $PY scripts/container_probe.py resume "$URL" "$WORK/state.json"

step "kill -9 the redis container, start it again (the app keeps running)"
app_started=$(started_at "$APP")
run podman kill --signal KILL "$REDIS" >/dev/null
podman wait "$REDIS" >/dev/null 2>&1 || true
run $PY scripts/container_probe.py wait-redis-down "$URL" --timeout 30
quiet_start "$REDIS"
run $PY scripts/container_probe.py wait-ready "$URL"
[[ $(started_at "$APP") == "$app_started" ]] || fail "the app container was restarted"
say "ok  the same app process recovered by itself"
run $PY scripts/container_probe.py resume "$URL" "$WORK/state.json"

step "start-up order: an app container started while Redis is down waits for it"
# podman-compose makes the app container require the redis one, so this one is started by hand, on the
# stack's network with the same settings: as a replica, or a pod, that comes up before Redis does.
since=$(date -u +%Y-%m-%dT%H:%M:%SZ)
run podman stop "$REDIS" >/dev/null 2> >(grep -v 'systemd connection' >&2)
LATE=$PROJECT-late
LATE_PORT=$($PY -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
run podman run -d --name "$LATE" --network "${PROJECT}_default" --env-file .env -e ENVIRONMENT=production \
    -e REDIS_URL=redis://redis:6379/0 -e DEVICE=cpu -p "127.0.0.1:$LATE_PORT:8000" "$IMAGE" \
    > /dev/null 2> >(grep -v 'systemd connection' >&2)
run $PY scripts/container_probe.py wait-redis-down "http://127.0.0.1:$LATE_PORT"
quiet_start "$REDIS"
run $PY scripts/container_probe.py wait-ready "http://127.0.0.1:$LATE_PORT"
# Readiness pings for itself; the app's own retry, once a second, logs the moment it finds Redis.
for _ in $(seq 20); do
    waited=$(podman logs --since "$since" "$LATE" 2>&1 | grep -E 'Redis at .* (is not answering yet|answers now)' || true)
    [[ $waited == *"answers now"* ]] && break
    sleep 0.5
done
printf '%s\n' "$waited" | cut -c1-160 | sed 's/^/  app log: /'
[[ $waited == *"answers now"* ]] || fail "the app did not log that it found Redis"
run $PY scripts/container_probe.py resume "http://127.0.0.1:$LATE_PORT" "$WORK/state.json"
run podman rm -f "$LATE" >/dev/null 2> >(grep -v 'systemd connection' >&2)
LATE=""

step "compose down, volumes removed"
run .venv/bin/podman-compose -p "$PROJECT" -f docker-compose.yml -f docker-compose.cpu.yml down -v \
    > "$WORK/down.log" 2>&1 || { tail -n 30 "$WORK/down.log"; fail "compose down"; }
STACK_UP=""
if podman volume exists "${PROJECT}_redis-data"; then fail "the redis volume is still there"; fi
[[ -z $(container app) && -z $(container redis) ]] || fail "containers are left"
say "ok  no containers or volume left"
end_step

printf '\ncontainer check passed in %s s (image %s MB)\n' "$(since "$T0")" "$((size / 1000000))"
printf '%s\n' "${SUMMARY[@]}"
