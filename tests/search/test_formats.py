"""search.formats: the export-format registry, and a toy format added with one registration line."""

from dataclasses import replace

import pytest

from pruning import adapter, reference
from pruning.architecture import Architecture
from search import formats
from search.config import ConfigError, RunConfig, RunLayout
from tests.conftest import tiny_model


def test_the_shipped_formats_and_what_they_hold(tmp_path):
    assert list(formats.REGISTRY)[:2] == ["hf", "gguf"]
    assert formats.REGISTRY["gguf"].ffn_block(RunConfig(gguf_type="q8_0")) == 32
    assert RunConfig(export_format="gguf").ffn_step == 32 and RunConfig().ffn_step == 8
    assert RunLayout(tmp_path).export_path(RunConfig(export_format="gguf")) == tmp_path / "model.gguf"
    with pytest.raises(ConfigError, match="unknown --format 'onnx'; choose one of hf, gguf"):
        RunConfig(export_format="onnx")


def test_a_gguf_export_says_what_padding_ffn_widths_to_its_blocks_costs():
    tokenizer = adapter.load_tokenizer(reference.MODEL_DIR)
    spec = adapter.model_spec(tiny_model(vocab_size=len(tokenizer)))  # hidden 48
    arch = Architecture(spec, tuple(replace(x, ffn_channels=24) for x in Architecture.full(spec).layers))
    q8 = RunConfig(export_format="gguf", gguf_type="q8_0")
    (note,) = formats.notes(arch, tokenizer, q8)
    mib = len(arch.layers) * 8 * 3 * 48 * 34 / 32 / 2**20  # 8 zero channels a layer: rows of 48 values
    assert f"{mib:.2f} MiB more" in note and "--ffn-step 32" in note
    assert formats.notes(arch, tokenizer, RunConfig(export_format="gguf", gguf_type="f16")) == ()
    assert formats.notes(arch, tokenizer, RunConfig()) == ()


def test_a_format_is_one_registration_and_the_run_writes_and_checks_through_it(tmp_path):
    written, checked = [], []

    def write(model, arch, tokenizer, out, card, config, force):
        written.append((arch, out, force))
        return out

    formats.register_export_format(name="toy-bin", write=write, file_name="model.bin",
                                   check=lambda arch, *_: checked.append(arch), ffn_block=lambda config: 16)
    try:
        config = RunConfig(export_format="toy-bin")
        assert config.ffn_step == 16 and RunLayout(tmp_path).export_path(config) == tmp_path / "model.bin"
        formats.check("arch", None, None, config)
        assert formats.write(None, "arch", None, tmp_path / "model.bin", None, config, True) == tmp_path / "model.bin"
        assert checked == ["arch"] and written == [("arch", tmp_path / "model.bin", True)]
        with pytest.raises(ValueError, match="'toy-bin' is already registered"):
            formats.register_export_format(name="toy-bin", write=write, file_name="x")
    finally:
        del formats.REGISTRY["toy-bin"]


def test_a_gguf_export_says_which_added_tokens_past_the_embedding_it_leaves_out():
    tokenizer = adapter.load_tokenizer(reference.MODEL_DIR)
    spec = adapter.model_spec(tiny_model(vocab_size=len(tokenizer)))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})  # ids past it
    (note,) = formats.notes(Architecture.full(spec), tokenizer, RunConfig(export_format="gguf", gguf_type="f16"))
    assert note.startswith(f"2 added tokens past the model's {spec.vocab_size:,} embeddings are left out")
    assert note.endswith("<|im_start|>, <|im_end|>")
