"""Tiny models of every supported family, built locally with fixed seeds."""

from __future__ import annotations

import importlib
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

# Tiny models run many times faster on one thread than on threads competing for shared CI cores.
torch.set_num_threads(1)

FAMILIES = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}
# CI sets this: a test whose service (PostgreSQL), real model or optional package is missing fails instead of skipping.
REQUIRE_SERVICES = os.environ.get("PRUNESEARCH_REQUIRE_SERVICES") == "1"


def service_unavailable(message: str):
    """Skip a test whose service is absent (a newcomer's machine), or fail it where CI requires every tier."""
    if REQUIRE_SERVICES:
        pytest.fail(f"{message} (PRUNESEARCH_REQUIRE_SERVICES=1 requires it)")
    pytest.skip(message)


def optional_package(name: str, install: str):
    """The module `name` of an optional extra; without it the test skips, saying `install`, or fails where CI
    requires every tier (unlike pytest.importorskip, which always skips)."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        service_unavailable(f"needs {name}: {install} ({err})")


def tiny_config(family: str = "llama", tie: bool = False, **overrides):
    """Shaped as the hub ships configs: no `head_dim` (Qwen2Config then has none; heads are 48 / 6 = 8 wide)."""
    kwargs = dict(
        vocab_size=97, hidden_size=48, intermediate_size=40, num_hidden_layers=3,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    kwargs.update(overrides)
    return FAMILIES[family](**kwargs)


def tiny_model(family: str = "llama", tie: bool = False, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, tie, **overrides), dtype=torch.float32)
    model.name_or_path = f"tiny-{family}"
    return model.eval()


@pytest.fixture
def windows() -> torch.Tensor:
    return torch.randint(0, 97, (6, 16), generator=torch.Generator().manual_seed(1))


def _train_tokenizer(text: str, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def save_tiny_model_dir(root, **overrides):
    """`root` with a tiny Llama (4 layers, `tiny_config` with `overrides`) and its own BPE tokenizer in model/, and
    calibration.txt / evaluation.txt (the two halves of the json package's source), saved like a real checkpoint."""
    import json
    import pathlib

    source = pathlib.Path(json.__file__).parent
    text = "\n\n".join(p.read_text() for p in sorted(source.glob("*.py")))
    tokenizer = _train_tokenizer(text, vocab_size=400)
    model = tiny_model("llama", **{"vocab_size": len(tokenizer), "num_hidden_layers": 4, **overrides})
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "calibration.txt").write_text(text[: len(text) // 2])
    (root / "evaluation.txt").write_text(text[len(text) // 2 :])
    return root


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama with its own BPE tokenizer and calibration/evaluation text (`save_tiny_model_dir`)."""
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))
