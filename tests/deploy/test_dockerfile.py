"""The Dockerfile and .dockerignore, checked statically (scripts/container_check.sh builds and runs them).

Each check is something that would otherwise surface only on a build server or in production: a base
image or torch build other than the documented one, a dependency layer invalidated by every source edit,
the checkpoint copied where the app does not look, a build-time mount left in the runtime image, a root
process, a health probe on a missing route, or a build context that leaks `.env` or drops a file the
build copies.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest

from app.config import SHIPPED_MODEL_DIR

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions in order, continuation lines joined and comments dropped (no heredocs used here)."""
    instructions: list[Instruction] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip()))
        pending = ""
    return instructions


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    return parse_dockerfile((REPO / "Dockerfile").read_text())


def of(instructions: list[Instruction], keyword: str) -> list[tuple[int, str]]:
    return [(i, ins.args) for i, ins in enumerate(instructions) if ins.keyword == keyword]


def copies(instructions: list[Instruction]) -> list[tuple[int, list[str], str]]:
    """(position, sources, destination) of every COPY from the build context (not --from a stage)."""
    result = []
    for i, args in of(instructions, "COPY"):
        words = shlex.split(args)
        if any(word.startswith("--from=") for word in words):
            continue
        *sources, destination = [word for word in words if not word.startswith("--")]
        result.append((i, sources, destination))
    return result


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    """The instructions of the last stage: what the image is made of."""
    return instructions[of(instructions, "FROM")[-1][0] :]


def workdir(instructions: list[Instruction]) -> PurePosixPath:
    return PurePosixPath(of(instructions, "WORKDIR")[-1][1])


def test_both_stages_are_slim_python_311(dockerfile: list[Instruction]) -> None:
    """The same base twice: the runtime stage runs the environment the build stage made, so their
    Pythons (and the user the build stage created) must be the same."""
    assert dockerfile[0].keyword == "FROM"
    bases = [args.split()[0] for _, args in of(dockerfile, "FROM")]
    assert len(bases) == 2 and bases[0] == bases[1]
    assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?(@sha256:[0-9a-f]+)?", bases[0])


def test_the_runtime_stage_runs_nothing_and_copies_the_environment(dockerfile: list[Instruction]) -> None:
    """`podman build -v` mounts the host's pip configuration into every RUN, and each leaves its mount
    points in its layer: the runtime stage has no RUN, only COPYs of what the build stage made."""
    final = final_stage(dockerfile)
    assert not of(final, "RUN")
    from_build = [shlex.split(args) for _, args in of(final, "COPY") if "--from=build" in args]
    copied = {path for words in from_build for path in words if path.startswith("/")}
    assert {"/opt/venv", "/etc/passwd", "/data"} <= copied
    stage_name = of(dockerfile, "FROM")[0][1].split()[-1]
    assert stage_name == "build"


def test_torch_is_the_pinned_cpu_build_unless_a_cuda_variant_is_asked_for(
    dockerfile: list[Instruction],
) -> None:
    args = dict(arg.split("=", 1) for _, arg in of(dockerfile, "ARG") if "=" in arg)
    assert args["TORCH_VARIANT"] == "cpu"
    # The same torch as scripts/setup.sh installs for the tests, so the image runs what CI tested.
    setup_pin = re.search(r"torch==([\d.]+)", (REPO / "scripts" / "setup.sh").read_text()).group(1)
    assert args["TORCH_VERSION"] == setup_pin
    # PyTorch's index for the variant, unless the build host's pip configuration is to decide (an
    # empty TORCH_INDEX_URL: a mirror or find-links, where download.pytorch.org is out of reach).
    assert args["TORCH_INDEX_URL"] == '"https://download.pytorch.org/whl/${TORCH_VARIANT}"'
    torch_runs = [arg for _, arg in of(dockerfile, "RUN") if "torch==" in arg]
    assert len(torch_runs) == 1
    assert (
        'pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==${TORCH_VERSION}"'
        in (torch_runs[0])
    )


def test_dependencies_are_installed_before_the_source_is_copied(dockerfile: list[Instruction]) -> None:
    """A source edit must not re-run the multi-minute dependency installs: they sit in earlier layers."""
    runs = of(dockerfile, "RUN")
    torch_at = next(i for i, arg in runs if "torch==" in arg)
    deps_at = next(i for i, arg in runs if "pip install -r" in arg)
    pyproject_at = next(i for i, sources, _ in copies(dockerfile) if sources == ["pyproject.toml"])
    # Only pyproject.toml and the checkpoint (which changes far less often than code) may come earlier.
    early = {"pyproject.toml", str(SHIPPED_MODEL_DIR.relative_to(REPO))}
    source_at = min(i for i, sources, _ in copies(dockerfile) if not set(sources) <= early)
    assert torch_at < pyproject_at < deps_at < source_at


def test_the_checkpoint_lands_where_the_app_looks_for_it(dockerfile: list[Instruction]) -> None:
    """The app finds the shipped checkpoint relative to its package (app/config.py), so in the image
    checkpoints/ must sit beside the copied app/ exactly as in the repository."""
    root = workdir(dockerfile)
    shipped = str(SHIPPED_MODEL_DIR.relative_to(REPO))
    final = final_stage(dockerfile)
    destination = {tuple(sources): root / dest for _, sources, dest in copies(final)}
    assert destination[(shipped,)] == root / shipped
    assert destination[("app",)] == root / "app"
    assert destination[("model",)] == root / "model"
    # Installed editable in the build stage, from the same directory: its import hook points there, so
    # the imported app package is the one the runtime stage puts beside checkpoints/.
    editable = next(i for i, arg in of(dockerfile, "RUN") if "pip install --no-deps --editable ." in arg)
    assert workdir(dockerfile[:editable]) == root


def test_the_server_runs_as_an_unprivileged_user(dockerfile: list[Instruction]) -> None:
    users = of(dockerfile, "USER")
    assert users, "no USER: the server would run as root"
    user_at, user = users[-1]
    assert user.split(":")[0] not in ("root", "0")
    created = re.compile(rf"useradd\b[^&;]*\s{re.escape(user)}(\s|$)")
    assert any(created.search(arg) for _, arg in of(dockerfile, "RUN")), f"no RUN creates user {user}"
    assert user_at < of(dockerfile, "CMD")[-1][0]


def test_the_command_is_python_m_app_with_a_readiness_healthcheck(
    dockerfile: list[Instruction], get_routes: set[str]
) -> None:
    assert json.loads(of(dockerfile, "CMD")[-1][1]) == ["python", "-m", "app"]
    env = " ".join(arg for _, arg in of(dockerfile, "ENV"))
    port = re.search(r"\bPORT=(\d+)", env).group(1)
    assert re.search(r"\bHOST=0\.0\.0\.0\b", env), "listen beyond the container's loopback"
    assert of(dockerfile, "EXPOSE")[-1][1] == port
    probe = of(dockerfile, "HEALTHCHECK")[-1][1]
    path = re.search(r"http://127\.0\.0\.1:\$\{PORT\}(/[^'\"]+)", probe).group(1)
    assert path == "/admin/ready" and path in get_routes


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent directories wins."""
    parts = PurePosixPath(path).parts
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        glob = pattern.lstrip("!").strip("/")
        globs = {glob, glob.removeprefix("**/")}
        if any(fnmatch.fnmatchcase(c, g) for c in candidates for g in globs):
            ignored = not negated
    return ignored


def test_the_build_context_keeps_what_is_copied_and_leaves_out_secrets_and_state(
    dockerfile: list[Instruction],
) -> None:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    for _, sources, _ in copies(dockerfile):
        for source in sources:
            assert not dockerignored(source, patterns), f"the build copies {source}, but it is ignored"
    assert not dockerignored(f"{SHIPPED_MODEL_DIR.relative_to(REPO)}/model.safetensors", patterns)
    for private in (".env", ".venv/bin/python", ".git/config", "data/redis/appendonly.aof", "runs/x/ckpt"):
        assert dockerignored(private, patterns), f"{private} would be sent to the build (and could leak)"
    assert dockerignored("checkpoints/my-experiment/model.safetensors", patterns)


def test_everything_the_build_copies_exists_in_the_repository(dockerfile: list[Instruction]) -> None:
    missing = [s for _, sources, _ in copies(dockerfile) for s in sources if not (REPO / s).exists()]
    assert not missing, f"`docker build` would fail: {missing} missing from the repository"
