"""Export round trip in a fresh process that cannot import this project; atomic, refusing writes."""

from __future__ import annotations

import json
import site
import subprocess
import sys
import textwrap

import pytest
import torch

from finetune import hf_writer
from finetune.card import ModelCard
from finetune.hf_writer import export_model, is_uniform
from pruning import adapter
from pruning.architecture import Architecture, LayerShape
from pruning.importance import compute_importance
from pruning.slicing import slice_model
from tests.finetune.conftest import char_model, char_tokenizer

MIXED = (LayerShape(1, 2, 13), LayerShape(0, 0, 40), LayerShape(2, 1, 0))
FIRST_DROPPED = (LayerShape(0, 0, 20), LayerShape(1, 3, 0), LayerShape(2, 2, 40))
UNIFORM = (LayerShape(2, 2, 24),) * 3  # 4 heads of head_dim 8 in hidden 48: the stock configs accept it
# 5 heads of an MHA base (6 KV heads): LlamaConfig rejects 48 % 5 != 0 although the model runs fine,
# so the export falls back to the per-layer layout.
UNIFORM_REJECTED = (LayerShape(5, 1, 24),) * 3
MHA = {"num_key_value_heads": 6}
CARD = ModelCard("50%", "prunesearch export --budget 50%", {"perplexity": 80.25}, {"perplexity": 61.5})
# name -> (family, tied embeddings, layer shapes, plain family class expected, config overrides)
CASES = {
    "llama-mixed": ("llama", False, MIXED, False, {}),
    "llama-tied-first-dropped": ("llama", True, FIRST_DROPPED, False, {}),
    "mistral-mixed": ("mistral", False, MIXED, False, {}),
    "qwen2-tied-mixed": ("qwen2", True, MIXED, False, {}),
    "llama-uniform": ("llama", False, UNIFORM, True, {}),
    "llama-uniform-rejected-by-config": ("llama", False, UNIFORM_REJECTED, False, MHA),
    "qwen2-uniform": ("qwen2", True, UNIFORM, True, {}),
}
# No spaces: for model_type qwen2 AutoTokenizer swaps in Qwen2Tokenizer (byte-level), which maps " " outside
# this char vocabulary; a real Qwen2 checkpoint ships a Qwen2 tokenizer, so only the test tokenizer is affected.
PROMPT = "f(x)=x*2;"

CHECK = textwrap.dedent('''
    import importlib.abc, json, sys
    sys.path.extend(json.loads(sys.argv[1]))

    class NotInstalled(importlib.abc.MetaPathFinder):
        """Stands for a machine with only torch and transformers: this project's packages do not import
        (site-packages may hold an installed copy, as on CI)."""
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in {"pruning", "predictor", "search", "finetune", "experiments"}:
                raise ImportError(f"{name} is not installed on this machine")
            return None

    sys.meta_path.insert(0, NotInstalled())
    try:
        import pruning  # noqa: F401
        importable = True
    except ImportError:
        importable = False
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    results = {"pruning_importable": importable}
    with open(sys.argv[2]) as f:
        cases = json.load(f)
    for name, case in cases.items():
        model, info = AutoModelForCausalLM.from_pretrained(
            case["dir"], trust_remote_code=case["remote"], output_loading_info=True)
        tokenizer = AutoTokenizer.from_pretrained(case["dir"], trust_remote_code=case["remote"])
        ids = torch.tensor(case["ids"])
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        prompt = tokenizer(case["prompt"], return_tensors="pt")["input_ids"]
        cached = model.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=True)
        uncached = model.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=False)
        results[name] = {
            "class": type(model).__name__,
            "max_abs_diff": (logits - torch.tensor(case["logits"])).abs().max().item(),
            "numel": sum(p.numel() for p in model.parameters()),
            "missing": list(info["missing_keys"]), "unexpected": list(info["unexpected_keys"]),
            "prompt_ids": prompt.tolist(),
            "generated": cached.shape[1] - prompt.shape[1],
            "cache_agrees": torch.equal(cached, uncached),
        }
    print(json.dumps(results))
''')


def sliced(family: str, tie: bool, shapes, overrides=None):
    overrides = {"attention_bias": True, **(overrides or {})} if family == "llama" else overrides or {}
    model = char_model(family, tie, **overrides)
    calibration = torch.randint(0, 86, (4, 16), generator=torch.Generator().manual_seed(3))
    arch = Architecture(adapter.model_spec(model), shapes)
    return slice_model(model, arch, compute_importance(model, calibration)), arch


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory):
    """Export every case, then load them all in one fresh interpreter; (cases, results)."""
    root = tmp_path_factory.mktemp("exports")
    tokenizer = char_tokenizer()
    ids = torch.randint(0, 86, (2, 12), generator=torch.Generator().manual_seed(5))
    cases, expected = {}, {}
    for name, (family, tie, shapes, _, overrides) in CASES.items():
        model, arch = sliced(family, tie, shapes, overrides)
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        out = export_model(model, arch, tokenizer, root / name, CARD)
        remote = (out / "modeling_pruned.py").exists()
        cases[name] = {"dir": str(out), "remote": remote, "ids": ids.tolist(), "logits": logits.tolist(),
                       "prompt": PROMPT}
        expected[name] = {"arch": arch, "dir": out}
    script, spec = root / "check.py", root / "cases.json"
    script.write_text(CHECK)
    spec.write_text(json.dumps(cases))
    site_dirs = site.getsitepackages()  # -S: no .pth files, so no editable install of this project
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(root / "hf"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-I", "-S", str(script), json.dumps(site_dirs), str(spec)],
                         cwd=root, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    return expected, {**results, "stderr": run.stderr}, tokenizer


@pytest.mark.slow  # the round trip: a fresh interpreter loads every export
def test_loading_an_export_prints_no_warning_about_its_model_type(round_trip):
    stderr = round_trip[1]["stderr"]
    assert "You are using a model of type" not in stderr, stderr[-2000:]


@pytest.mark.slow  # the round trip: a fresh interpreter loads every export
def test_fresh_process_cannot_import_the_project(round_trip):
    _, results, _ = round_trip
    assert results["pruning_importable"] is False


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_round_trip_reproduces_logits_and_generates(name, round_trip):
    expected, results, tokenizer = round_trip
    got, arch = results[name], expected[name]["arch"]
    plain = CASES[name][3]
    family_class = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
    prefix = "" if plain else "Pruned"
    assert got["class"] == prefix + family_class[CASES[name][0]]
    assert got["max_abs_diff"] <= 1e-4
    assert got["numel"] == arch.params()
    assert got["missing"] == [] and got["unexpected"] == []
    assert got["prompt_ids"] == [tokenizer(PROMPT)["input_ids"]]
    assert got["generated"] == 6
    assert got["cache_agrees"] is True


@pytest.mark.parametrize("name", CASES)
@pytest.mark.slow  # the round trip: a fresh interpreter loads every export
def test_layout_matches_uniformity(name, round_trip):
    expected, _, _ = round_trip
    out, arch = expected[name]["dir"], expected[name]["arch"]
    config = json.loads((out / "config.json").read_text())
    plain = CASES[name][3]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["README.md", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
         "tokenizer_config.json", *([] if plain else ["modeling_pruned.py"])]
    )
    if plain:
        assert "auto_map" not in config and "layer_shapes" not in config
        assert config["model_type"] == arch.spec.family
        assert (config["num_key_value_heads"], config["num_attention_heads"], config["intermediate_size"]) == (
            arch.layers[0].kv_heads, arch.layers[0].query_heads, arch.layers[0].ffn_channels)
    else:
        assert config["model_type"] == f"pruned_{arch.spec.family}"
        assert config["head_dim"] == arch.spec.head_dim  # written out even where the hub config has none
        assert config["layer_shapes"] == [
            {"kv_heads": x.kv_heads, "heads_per_group": x.heads_per_group, "ffn_channels": x.ffn_channels}
            for x in arch.layers
        ]


def test_uniformity_rule():
    model = char_model("llama")
    spec = adapter.model_spec(model)
    assert is_uniform(Architecture(spec, UNIFORM)) is True
    assert is_uniform(Architecture(adapter.model_spec(char_model("llama", **MHA)), UNIFORM_REJECTED)) is True
    assert is_uniform(Architecture(spec, MIXED)) is False
    assert is_uniform(Architecture(spec, (LayerShape(0, 0, 24),) * 3)) is False


@pytest.mark.slow  # the round trip: a fresh interpreter loads every export
def test_model_card_lists_budget_params_shapes_metrics_and_command(round_trip):
    expected, _, _ = round_trip
    text = (expected["llama-mixed"]["dir"] / "README.md").read_text()
    arch = expected["llama-mixed"]["arch"]
    assert "base_model: tiny-llama" in text
    assert "- Budget: 50%" in text
    assert f"- Parameters: {arch.params():,} (" in text
    assert "`prunesearch export --budget 50%`" in text
    assert "| model | perplexity |" in text
    assert "| this model, sliced (before recovery) | 80.25 |" in text
    assert "| this model, after recovery | 61.5 |" in text
    assert "| 1 | 0/2 | 0/6 | 0 | 40/40 | dropped | kept |" in text
    assert "trust_remote_code=True" in text
    assert 'llama-cli -m model.gguf -p "def main():" -n 64' in text
    assert 'llm = Llama(model_path="model.gguf")' in text


def test_existing_directory_is_refused_without_force(tmp_path):
    model, arch = sliced("llama", False, MIXED)
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="pass force=True"):
        export_model(model, arch, char_tokenizer(), out, CARD)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    export_model(model, arch, char_tokenizer(), out, CARD, force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_failure_midway_leaves_nothing_behind(tmp_path, monkeypatch):
    model, arch = sliced("qwen2", True, MIXED)

    def broken_card(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hf_writer.model_card, "render", broken_card)
    with pytest.raises(OSError, match="disk full"):
        export_model(model, arch, char_tokenizer(), tmp_path / "model", CARD)
    assert list(tmp_path.iterdir()) == []


def test_model_not_sliced_to_its_architecture_is_refused(tmp_path):
    model = char_model("llama")
    arch = Architecture(adapter.model_spec(model), MIXED)
    with pytest.raises(hf_writer.ExportError, match="was it sliced"):
        export_model(model, arch, char_tokenizer(), tmp_path / "model", CARD)
    assert list(tmp_path.iterdir()) == []


def test_model_card_lists_every_model_measured_on_every_metric():
    from finetune.card import CardError, render
    from pruning.adapter import model_spec

    card = ModelCard("50%", "python -m search.run", metrics_before={"perplexity": 80.25, "task": 0.25},
                     metrics_after={"perplexity": 61.5, "task": 0.5}, metrics_dense={"perplexity": 20.0, "task": 0.75},
                     comparisons={"uniform": {"perplexity": 90.0, "task": 0.125}, "searched": {"perplexity": 70.0}})
    assert [name for name, _ in card.rows()] == ["base model (dense)", "uniform", "searched",
                                                 "this model, sliced (before recovery)", "this model, after recovery"]
    text = render(Architecture.full(model_spec(char_model())), card, remote_code=False)
    table = text[text.index("| model |"):text.index("## Per-layer shapes")].strip().splitlines()
    assert table == ["| model | perplexity | task |", "|---|---:|---:|", "| base model (dense) | 20 | 0.75 |",
                     "| uniform | 90 | 0.125 |", "| searched | 70 | – |",
                     "| this model, sliced (before recovery) | 80.25 | 0.25 |",
                     "| this model, after recovery | 61.5 | 0.5 |"]
    with pytest.raises(CardError, match="comparison 'uniform' must map metric names to numbers"):
        ModelCard("50%", "x", comparisons={"uniform": {"task": "high"}})
