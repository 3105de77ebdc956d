"""Where a results file came from: the header every experiments/results/*.md starts with.

    - Command: `python -m experiments.compare --removed 35% 50%`
    - Commit: `f0cb9a8…` (`+dirty` when tracked files had uncommitted changes)
    - Versions: torch 2.13.0, transformers 5.24.0, optuna 5.1.0

Every experiment that writes a markdown table starts it with `header(module, argv)`, so a figure can
be traced to the code and libraries that made it.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "transformers", "optuna")
REPO = Path(__file__).resolve().parent.parent


def command(module: str, argv: Sequence[str] | None = None) -> str:
    """The command line as a user types it: `python -m MODULE ARGS`, ARGS from sys.argv when not given."""
    args = sys.argv[1:] if argv is None else list(argv)
    return shlex.join(["python", "-m", module, *args])


def commit(cwd: Path = REPO) -> str:
    """`git rev-parse HEAD` of `cwd`, `+dirty` when tracked files differ from it; says so outside a repository."""
    try:
        head = _git(cwd, "rev-parse", "HEAD")
        changed = _git(cwd, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "not recorded (not a git checkout)"
    return head + ("+dirty" if changed else "")


def versions(packages: Sequence[str] = PACKAGES) -> str:
    """`name version` for each installed distribution, comma-separated; `name not installed` otherwise."""
    found = []
    for name in packages:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} not installed")
    return ", ".join(found)


def header(module: str, argv: Sequence[str] | None = None, cwd: Path = REPO) -> str:
    """Markdown lines naming the command, the commit and the versions, then a blank line."""
    return (f"- Command: `{command(module, argv)}`\n"
            f"- Commit: `{commit(cwd)}`\n"
            f"- Versions: {versions()}\n\n")


def _git(cwd: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=30)
    return done.stdout.strip()
