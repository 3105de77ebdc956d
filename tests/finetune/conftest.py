"""A character-level tokenizer built locally, and tiny models whose vocabulary matches it."""

from __future__ import annotations

import string

import pytest
import torch
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from tests.conftest import tiny_model

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
CHARS = string.ascii_letters + string.digits + " .,:;?!'\"()+-*/=<>_\n"


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character (no merges), a BOS prepended by nobody: ids are predictable by hand."""
    vocab = {tok: i for i, tok in enumerate((*SPECIALS, *CHARS))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def char_model(family: str = "llama", tie: bool = False, seed: int = 0, **overrides):
    """A tiny model of `family` whose vocabulary is the char tokenizer's."""
    return tiny_model(family, tie, seed, vocab_size=len(SPECIALS) + len(CHARS), **overrides)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and far faster than on two on a shared, loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
