"""Named hub corpora map the split asked for to one the corpus has (no network: `datasets` is a stand-in)."""

from __future__ import annotations

import sys
import types

import pytest

from pruning.data import HUB_CORPORA, read_text


@pytest.fixture
def hub(monkeypatch):
    """A `datasets` module that records what was asked for (the real one needs the network)."""
    calls = []

    def load_dataset(path, config, split, streaming):
        calls.append((path, config, split, streaming))
        return iter([{"text": f"{path} {split}"}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


@pytest.mark.parametrize(("name", "split", "asked"), [
    ("c4", "train", ("allenai/c4", "en", "train", True)),
    ("c4", "test", ("allenai/c4", "en", "validation", True)),  # C4 ships train and validation only
    ("wikitext2", "test", ("wikitext", "wikitext-2-raw-v1", "test", False)),
])
def test_evaluation_split_is_one_the_corpus_has(hub, name, split, asked):
    assert read_text(name, split) == f"{asked[0]} {asked[2]}"
    assert hub == [asked]


def test_every_corpus_maps_both_splits_the_tool_asks_for():
    assert all(set(splits) == {"train", "test"} for *_, splits in HUB_CORPORA.values())
