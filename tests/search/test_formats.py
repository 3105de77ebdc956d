"""search.formats: the export-format registry, and a toy format added with one registration line."""

import pytest

from search import formats
from search.config import ConfigError, RunConfig, RunLayout


def test_the_shipped_formats_and_what_they_hold(tmp_path):
    assert list(formats.REGISTRY)[:2] == ["hf", "gguf"]
    assert formats.REGISTRY["gguf"].ffn_block(RunConfig(gguf_type="q8_0")) == 32
    assert RunConfig(export_format="gguf").ffn_step == 32 and RunConfig().ffn_step == 8
    assert RunLayout(tmp_path).export_path(RunConfig(export_format="gguf")) == tmp_path / "model.gguf"
    with pytest.raises(ConfigError, match="unknown --format 'onnx'; choose one of hf, gguf"):
        RunConfig(export_format="onnx")
    with pytest.raises(ConfigError, match="--ffn-step 8 lets the search pick FFN widths GGUF q8_0 cannot hold"):
        RunConfig(export_format="gguf", ffn_step=8).check_search_target()


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
