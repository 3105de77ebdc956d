"""The results kept in the repository and the README that cites them: provenance, links and CI's test command."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RESULTS = sorted((ROOT / "experiments" / "results").glob("*.md"))
README = (ROOT / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("path", RESULTS, ids=lambda p: p.name)
def test_every_results_file_starts_with_its_provenance(path: Path):
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("- Command: `python -m "), lines[0]
    assert lines[1].startswith("- Commit: `"), lines[1]
    assert lines[2].startswith("- Versions: "), lines[2]


@pytest.mark.parametrize("path", RESULTS, ids=lambda p: p.name)
def test_no_results_file_names_a_machine_path(path: Path):
    assert not re.search(r"(?<![\w.])/(work|home|root|tmp|Users)/", path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("document", ["README.md", *(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))])
def test_every_relative_link_in_the_documents_exists(document: str):
    path = ROOT / document
    targets = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", path.read_text(encoding="utf-8"))
    assert targets
    assert [t for t in targets if not (path.parent / t).exists()] == []


def test_the_readme_shows_the_test_command_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    (command,) = [line for line in ci.splitlines() if "python -m pytest" in line]
    assert command in README


def test_a_missing_optional_package_fails_where_ci_requires_every_tier(monkeypatch):
    import sys

    from tests import conftest

    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    (command,) = [line for line in ci.splitlines() if "python -m pytest" in line]
    assert "PRUNESEARCH_REQUIRE_SERVICES=1 " in command
    monkeypatch.setitem(sys.modules, "torch_pruning", None)  # as on a machine without it: the import raises
    monkeypatch.setattr(conftest, "REQUIRE_SERVICES", True)
    with pytest.raises(pytest.fail.Exception, match=r"needs torch_pruning: pip install .*REQUIRE_SERVICES=1"):
        conftest.optional_package("torch_pruning", 'pip install ".[bench]"')
    monkeypatch.setattr(conftest, "REQUIRE_SERVICES", False)
    with pytest.raises(pytest.skip.Exception, match="needs torch_pruning"):
        conftest.optional_package("torch_pruning", 'pip install ".[bench]"')
    monkeypatch.undo()
    assert conftest.optional_package("json", "(the standard library)") is __import__("json")
