"""experiments.provenance: the command, commit and versions every results file starts with."""

from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path

import pytest

from experiments import provenance


def git(cwd: Path, *args: str) -> str:
    done = subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args], cwd=cwd,
                          capture_output=True, text=True, check=True)
    return done.stdout.strip()


@pytest.fixture
def repo(tmp_path: Path, monkeypatch) -> Path:
    for name in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE"):
        monkeypatch.delenv(name, raising=False)
    git(tmp_path, "init", "-q")
    (tmp_path / "a.txt").write_text("one\n")
    git(tmp_path, "add", "a.txt")
    git(tmp_path, "commit", "-q", "-m", "first")
    return tmp_path


def test_command_is_what_a_user_types_quoted_where_needed():
    argv = ["--removed", "35%", "50%", "--methods", "sensitivity knapsack"]
    assert provenance.command("experiments.compare", argv) == (
        "python -m experiments.compare --removed 35% 50% --methods 'sensitivity knapsack'")
    assert provenance.command("experiments.bench_serve", []) == "python -m experiments.bench_serve"


def test_commit_is_head_and_marks_a_changed_tracked_file_dirty(repo: Path):
    head = git(repo, "rev-parse", "HEAD")
    assert provenance.commit(repo) == head
    (repo / "untracked.txt").write_text("new\n")
    assert provenance.commit(repo) == head
    (repo / "a.txt").write_text("two\n")
    assert provenance.commit(repo) == head + "+dirty"


def test_commit_outside_a_repository_says_so(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert provenance.commit(tmp_path) == "not recorded (not a git checkout)"


def test_versions_name_installed_and_missing_packages():
    assert provenance.versions(("torch", "no-such-distribution-xyz")) == (
        f"torch {metadata.version('torch')}, no-such-distribution-xyz not installed")


def test_header_is_three_markdown_lines_then_a_blank_line(repo: Path):
    text = provenance.header("experiments.task_study", ["--trials", "16"], cwd=repo)
    assert text == (f"- Command: `python -m experiments.task_study --trials 16`\n"
                    f"- Commit: `{git(repo, 'rev-parse', 'HEAD')}`\n"
                    f"- Versions: {provenance.versions()}\n\n")
