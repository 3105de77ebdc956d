"""`--model FILE.gguf` through the CLIs: the plan, a run (the file's sha256 recorded), its export, and what is
refused before anything is written."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from finetune.gguf import export_gguf
from pruning import adapter
from pruning.architecture import Architecture
from search import export, run
from search.config import RunConfig
from search.plan import make_plan
from tests.pruning.test_gguf_input import refused_files
from tests.search.test_run import args

ROOT = Path(__file__).resolve().parents[2]


def write_model(model_dir: Path, path: Path, scale: float = 1.0) -> Path:
    """The model in `model_dir` (its weights times `scale`) and its tokenizer as one f32 GGUF file."""
    model = adapter.load_model(model_dir, torch.device("cpu"))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    tokenizer = adapter.load_tokenizer(model_dir)
    return export_gguf(model, Architecture.full(adapter.model_spec(model)), tokenizer, path, "f32")


@pytest.fixture(scope="module")
def gguf_model(tiny_model_dir, tmp_path_factory):
    return write_model(tiny_model_dir / "model", tmp_path_factory.mktemp("gguf-model") / "tiny.gguf")


def test_the_plan_reads_the_file_as_it_reads_the_directory(gguf_model, tiny_model_dir):
    config = RunConfig(model=str(tiny_model_dir / "model"), seq_len=32, ffn_step=1)
    plans = [make_plan(c, torch.device("cpu"), capacity=2**34, rate=1e9, host_capacity=2**34)
             for c in (config, replace(config, model=str(gguf_model)))]
    assert plans[1].model == str(gguf_model)
    assert replace(plans[1], model=plans[0].model) == plans[0]


@pytest.mark.slow
def test_dry_run_on_a_gguf_file_exits_0(gguf_model):
    result = subprocess.run([sys.executable, "-m", "search.run", "--model", str(gguf_model), "--budget", "70%",
                             "--seq-len", "32", "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"memory plan: {gguf_model} on ")


@pytest.mark.parametrize("dry_run", (False, True))
@pytest.mark.parametrize("case", ("architecture", "quantization", "truncated"))
def test_an_unreadable_gguf_exits_2_and_writes_nothing(case, dry_run, gguf_model, tiny_model_dir, tmp_path, capsys):
    path, message = refused_files(gguf_model, tmp_path)[case]
    out = tmp_path / "run"
    assert run.main([*args(tiny_model_dir, out), "--model", str(path), *(["--dry-run"] * dry_run)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.fixture(scope="module")
def gguf_run(gguf_model, tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny-gguf"
    assert run.main([*args(tiny_model_dir, out, "--budget", "75%", "--trials", "2"), "--model", str(gguf_model)]) == 0
    return out


@pytest.mark.slow
def test_a_run_records_the_file_s_sha256(gguf_run, gguf_model):
    assert json.loads((gguf_run / "model_source.json").read_text()) == {
        "path": str(gguf_model), "sha256": hashlib.sha256(gguf_model.read_bytes()).hexdigest(),
        "size": gguf_model.stat().st_size}
    assert json.loads((gguf_run / "run.json").read_text())["model"] == str(gguf_model)


@pytest.mark.slow
def test_export_reads_the_run_s_gguf(gguf_run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "exported"
    assert export.main(["--run", str(gguf_run), "--out", str(out), "--recover-steps", "0",
                        "--recover-windows", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["export"] == str(out)
    exported = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    best = Architecture.from_json((gguf_run / "best_architecture.json").read_text())
    assert sum(p.numel() for p in exported.parameters()) == best.params()


@pytest.mark.slow
def test_another_file_is_refused_on_resume_and_export(gguf_run, gguf_model, tiny_model_dir, tmp_path, capsys):
    command = [*args(tiny_model_dir, gguf_run, "--budget", "75%", "--trials", "2"), "--model", str(gguf_model)]
    assert run.main(command) == 0  # the same file resumes
    capsys.readouterr()
    other = write_model(tiny_model_dir / "model", tmp_path / "other.gguf", scale=0.5)
    recorded = hashlib.sha256(gguf_model.read_bytes()).hexdigest()
    message = f"is not the file {gguf_run} was made from ({gguf_model}, sha256 {recorded})"
    assert run.main([*command, "--model", str(other)]) == 2
    assert message in capsys.readouterr().err
    copied = tmp_path / "run"  # the run, as if the file at its recorded path had changed
    shutil.copytree(gguf_run, copied)
    saved = json.loads((copied / "run.json").read_text())
    (copied / "run.json").write_text(json.dumps({**saved, "model": str(other), "out": str(copied)}))
    assert export.main(["--run", str(copied), "--out", str(tmp_path / "x"), "--recover-steps", "0"]) == 2
    assert f"is not the file {copied} was made from ({gguf_model}, sha256 {recorded})" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
