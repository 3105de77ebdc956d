"""The shipped reference model: loads offline, is the advertised shape, ships inside the wheel."""

import os
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pruning import adapter, reference
from pruning.architecture import Architecture
from pruning.data import read_text, token_windows
from pruning.metrics import perplexity


def test_reference_model_is_a_small_gqa_llama_that_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = AutoModelForCausalLM.from_pretrained(reference.MODEL_DIR)
    tokenizer = AutoTokenizer.from_pretrained(reference.MODEL_DIR)
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert config.num_key_value_heads < config.num_attention_heads and config.num_hidden_layers >= 8
    params = sum(p.numel() for p in model.parameters())
    assert 3_000_000 <= params <= 15_000_000
    assert params == Architecture.full(adapter.model_spec(model)).params()
    assert next(model.parameters()).dtype == torch.float32
    assert (reference.MODEL_DIR / "model.safetensors").stat().st_size <= 40 * 2**20
    assert len(tokenizer) == config.vocab_size


def test_reference_model_is_trained():
    """Held-out perplexity far below the vocabulary size (an untrained model sits near 4096)."""
    model = adapter.load_model(reference.MODEL_DIR, torch.device("cpu"))
    tokenizer = adapter.load_tokenizer(reference.MODEL_DIR)
    windows = token_windows(tokenizer, read_text(reference.EVALUATION_TEXT), 256, max_windows=8)
    assert perplexity(model, windows) < 200


@pytest.mark.slow
def test_wheel_ships_the_model_and_texts(tmp_path):
    root = reference.MODEL_DIR.parents[1]
    source = tmp_path / "source"  # a copy, so the build leaves nothing in the work tree
    shutil.copytree(root, source, ignore=shutil.ignore_patterns(".git", "runs", "build", "*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(source)], check=True, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    (wheel,) = tmp_path.glob("prunesearch-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in ("pruning/reference_model/model.safetensors", "pruning/reference_model/tokenizer.json",
                 "pruning/reference_model/config.json", "pruning/reference_data/calibration.txt",
                 "pruning/reference_data/evaluation.txt", "pruning/modeling_pruned.py"):
        assert path in names, path
