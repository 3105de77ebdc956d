"""GGUF files as the model: tiny models written by the project's own writer (finetune.gguf), read back through
the adapter (transformers dequantizes them).

Tolerances. f32 holds every weight exactly, so the logits equal the source's to float tolerance (1e-5; measured
max |Δ| 0.0). Q8_0 rounds each weight to 8 bits per block of 32 (the step is the block's max |w| / 127); the
loaded weights are exactly gguf's own Q8_0 round trip of the source's, so the model with those weights gives
the loaded logits to float tolerance, and the unquantized source's within Q8_0_TOLERANCE of std(logits)
(these random models, weights drawn with std 0.1 so logits spread widely: measured 0.104 llama and 0.097
qwen2 at seed 0, 0.078-0.128 over seeds 0-4 of both).
"""

from __future__ import annotations

import copy
import re

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from finetune.gguf import export_gguf
from pruning import adapter
from pruning.architecture import Architecture
from tests.conftest import tiny_model

SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.1)  # rows: Q8_0 blocks of 32
Q8_0_TOLERANCE = 0.2  # max |Δlogit| / std(logits) against the unquantized source
FAMILIES = ("llama", "qwen2")


def source_model(family: str, vocab_size: int, seed: int = 0):
    """A tiny random model; Qwen2 with tied embeddings and q/k/v biases of its own (HF starts them at zero)."""
    model = tiny_model(family, tie=family == "qwen2", seed=seed, vocab_size=vocab_size, **SHAPE)
    generator = torch.Generator().manual_seed(seed + 1)
    for layer in adapter.decoder_layers(model):
        for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            if lin.bias is not None:
                lin.bias.data = 0.1 * torch.randn(lin.bias.shape, generator=generator)
    return model


def write(model, tokenizer, path, gguf_type: str):
    return export_gguf(model, Architecture.full(adapter.model_spec(model)), tokenizer, path, gguf_type)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir / "model")


@pytest.fixture(scope="module")
def written(tokenizer, tmp_path_factory):
    """(family, type) -> (source model, GGUF path)."""
    root = tmp_path_factory.mktemp("gguf-input")
    out = {}
    for family in FAMILIES:
        model = source_model(family, len(tokenizer))
        for gguf_type in ("f32", "q8_0"):
            out[family, gguf_type] = model, write(model, tokenizer, root / f"{family}-{gguf_type}.gguf", gguf_type)
    return out


@pytest.fixture(scope="module")
def ids(tokenizer, tiny_model_dir):
    return torch.tensor([tokenizer((tiny_model_dir / "evaluation.txt").read_text()[:2000])["input_ids"][:96]])


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits[0]


def q8_0_round_trip(model):
    """`model` with every weight the writer quantizes (2-D: projections, embedding) replaced by gguf's own
    Q8_0 quantize-then-dequantize of it. Rows are quantized on their own, so the writer's q/k row permutation
    commutes with it."""
    out = copy.deepcopy(model)
    q8 = gguf.GGMLQuantizationType.Q8_0
    for param in out.parameters():
        if param.ndim == 2:
            w = param.detach().numpy()
            param.data = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w, q8), q8).reshape(w.shape))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_f32_file_gives_the_source_s_logits(family, written, ids):
    source, path = written[family, "f32"]
    loaded = adapter.load_model(path, torch.device("cpu"))
    torch.testing.assert_close(logits(loaded, ids), logits(source, ids), atol=1e-5, rtol=0)
    assert loaded.name_or_path == str(path)
    assert adapter.model_spec(loaded).tie_embeddings == (family == "qwen2")


def test_a_qwen2_written_as_llama_keeps_its_biases(written):
    """The writer writes a Qwen2 as llama.cpp's `llama`; read back it is a Llama whose o_proj bias is zero."""
    loaded = adapter.load_model(written["qwen2", "f32"][1], torch.device("cpu"))
    source = written["qwen2", "f32"][0]
    assert type(loaded).__name__ == "LlamaForCausalLM" and loaded.config.attention_bias
    for ours, theirs in zip(adapter.decoder_layers(loaded), adapter.decoder_layers(source), strict=True):
        torch.testing.assert_close(ours.self_attn.q_proj.bias, theirs.self_attn.q_proj.bias, atol=0, rtol=0)
        assert ours.self_attn.o_proj.bias.abs().max() == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_q8_0_file_is_gguf_s_own_round_trip_of_the_weights(family, written, ids):
    source, path = written[family, "q8_0"]
    loaded = logits(adapter.load_model(path, torch.device("cpu")), ids)
    torch.testing.assert_close(loaded, logits(q8_0_round_trip(source), ids), atol=1e-5, rtol=0)
    dense = logits(source, ids)
    assert (loaded - dense).abs().max() / dense.std() <= Q8_0_TOLERANCE


def test_dequantized_to_the_dtype_asked_for(written):
    model = adapter.load_model(written["llama", "q8_0"][1], torch.device("cpu"), torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_config_is_read_from_the_file_s_metadata(written):
    source, path = written["llama", "q8_0"]
    config = adapter.load_config(str(path))
    assert adapter.spec_from_config(config, "m") == adapter.spec_from_config(source.config, "m")


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_comes_from_the_file(family, written, tokenizer, tiny_model_dir):
    text = (tiny_model_dir / "evaluation.txt").read_text()[:3000]
    assert adapter.load_tokenizer(written[family, "q8_0"][1])(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_a_qwen2_written_as_llama_is_costed_with_its_zero_output_bias(written):
    spec = adapter.spec_from_config(adapter.load_config(str(written["qwen2", "f32"][1])), "m")
    source = adapter.spec_from_config(written["qwen2", "f32"][0].config, "m")
    assert (spec.family, spec.qkv_bias, spec.o_bias) == ("llama", True, True)
    assert Architecture.full(spec).params() == Architecture.full(source).params() + SHAPE["hidden_size"] * 2


def _write_raw(path, arch: str, qtype=gguf.GGMLQuantizationType.F32):
    """A minimal GGUF: one tensor of `qtype` (raw zero bytes for 4 rows of 32 values)."""
    writer = gguf.GGUFWriter(path, arch)
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if qtype == gguf.GGMLQuantizationType.F32:
        writer.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    else:
        writer.add_tensor("token_embd.weight", np.zeros((4, type_size), np.uint8), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def refused_files(valid, root) -> dict:
    """name -> (GGUF file, what the error says)."""
    cut = root / "cut.gguf"
    cut.write_bytes(valid.read_bytes()[: valid.stat().st_size // 2])
    return {
        "architecture": (_write_raw(root / "gpt2.gguf", "gpt2"),
                         "gpt2.gguf holds a 'gpt2' model (GGUF general.architecture); supported are llama, mistral, "
                         "qwen2"),
        "quantization": (_write_raw(root / "q8_1.gguf", "llama", gguf.GGMLQuantizationType.Q8_1),
                         "q8_1.gguf stores tensors as Q8_1, which transformers cannot dequantize"),
        "truncated": (cut, f"{cut} is not a complete GGUF file ({cut.stat().st_size:,} bytes); it may be truncated"),
    }


@pytest.mark.parametrize("case", ("architecture", "quantization", "truncated"))
def test_what_transformers_cannot_read_is_refused_with_the_reason(case, written, tmp_path):
    path, message = refused_files(written["llama", "f32"][1], tmp_path)[case]
    for load in (lambda: adapter.load_config(str(path)), lambda: adapter.load_tokenizer(path),
                 lambda: adapter.load_model(path, torch.device("cpu"))):
        with pytest.raises(adapter.UnsupportedModelError, match=re.escape(message)):
            load()


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(adapter.UnsupportedModelError, match=re.escape(f"no GGUF file at {tmp_path / 'm.gguf'}")):
        adapter.load_config(str(tmp_path / "m.gguf"))
