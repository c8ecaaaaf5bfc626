"""Hand this machine's pip configuration to an image build, as mounts, never as layers.

    python scripts/pip_build_mounts.py OUT_DIR     prints one `podman build -v` value per line

Inside a build, pip needs what pip on the host uses: its index or mirror, find-links, constraints and CA
bundle (a host behind a TLS-intercepting proxy trusts a CA the base image does not know). This reads the
effective configuration (`pip config list`: the config files and the PIP_* environment, merged), writes
it as one pip.conf into OUT_DIR, and prints the mounts that show a build container the same thing: that
file at /etc/pip.conf, which pip reads in every environment, and each local path the configuration
names, at the same path. Read-only, and only for the build's RUN steps: nothing lands in the image.
A host with no pip configuration gets an empty pip.conf and plain PyPI.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

# Where settings come from, weakest first: pip's own precedence (environment over files, a command's
# section over [global]).
_SECTION_RANK = {"global": 0, "install": 1, ":env:": 2}
_PATH_OPTIONS = {"cert", "client-cert", "constraint", "find-links"}  # a file, or a directory of wheels
_INDEX_OPTIONS = {"index-url", "extra-index-url"}  # a PEP 503 tree: <root>/simple, files under <root>
_PIP_CONF_IN_BUILD = "/etc/pip.conf"


def effective_config() -> dict[str, str]:
    """option -> value, as pip applies them to `pip install` here."""
    listing = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], check=True, capture_output=True, text=True
    ).stdout
    ranked: dict[str, tuple[int, str]] = {}
    for line in listing.splitlines():
        name, _, raw = line.partition("=")
        section, _, option = name.rpartition(".")
        rank = _SECTION_RANK.get(section)
        if rank is None or not raw:
            continue  # another command's section (download, wheel...): not what the build runs
        value = ast.literal_eval(raw)  # pip prints values as Python string literals
        if option not in ranked or rank >= ranked[option][0]:
            ranked[option] = (rank, value)
    return {option: value for option, (_, value) in ranked.items()}


def local_path(location: str) -> Path | None:
    """The path behind an absolute path or a file:// URL; None for a remote URL or a relative path."""
    if location.startswith("file:"):
        return Path(unquote(urlsplit(location).path))
    path = Path(location)
    return path if path.is_absolute() else None


def mounts(config: dict[str, str]) -> list[Path]:
    """The local paths the build must see: files and find-links directories themselves, and for a
    local index the directory above its /simple, where its index pages point for the files."""
    paths: list[Path] = []
    for option, value in config.items():
        if option not in _PATH_OPTIONS | _INDEX_OPTIONS:
            continue
        for location in value.split():
            path = local_path(location)
            if path is None:
                continue
            if option in _INDEX_OPTIONS:
                path = path.parent if path.name == "simple" else path
            if path.exists() and path not in paths:
                paths.append(path)
    return paths


def main() -> None:
    out_dir = Path(sys.argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    config = effective_config()
    conf = out_dir / "pip.conf"
    conf.write_text("[global]\n" + "".join(f"{option} = {value}\n" for option, value in config.items()))
    print(f"{conf}:{_PIP_CONF_IN_BUILD}:ro")
    for path in mounts(config):
        print(f"{path}:{path}:ro")


if __name__ == "__main__":
    main()
