"""GGUF export loaded in the real engine (llama.cpp through llama-cpp-python) and compared with transformers.

Every case is sliced from a model with fixed seeds, written at f32, f16 and Q8_0,
loaded with `Llama(logits_all=True)`, and measured on the same tokens as ours:
next-token logits, 32-token greedy continuation (f32), perplexity on the same windows.

Tolerances, as max |Δlogit| over all positions ÷ std of our logits (measured worst case in brackets), with
llama.cpp's KV cache at f32 (its default f16 cache rounds keys and values: 4.2e-3 at f32 with it).
f32 differs from transformers only by summation order and llama.cpp's kernels: 1e-4 (6.6e-6).
f16 rounds every weight to 11 significant bits (relative 2^-11 ≈ 5e-4): 3e-2 (8.3e-3).
Q8_0 rounds every weight to 8 bits per block of 32 (up to 1/254 of the block's largest
weight), which adds up over layers; the random tiny models (weights drawn with std 0.1,
so logits spread widely) show it most: 0.6 (0.26; the trained reference model 0.05).
The same bounds hold for max |Δlogit| itself (every case's logits have a std above 1; measured worst
7.4e-6 at f32, 9.3e-3 at f16, 0.29 at Q8_0).
Perplexity on the same windows: within 1% at f32 and f16 (measured worst 0.02%); Q8_0 changes the
model itself, so 2% there (measured worst 1.0% on a random tiny model, 0.6% on the reference).
`test_the_documented_figures_still_hold` pins the figures docs/studies.md quotes from these measurements.

Every test that loads llama.cpp is marked slow (one module fixture writes and loads 27 files, about 90 s
on one CPU thread); the refusals before writing stay in the quick loop.
Without llama-cpp-python these tests skip; CI sets PRUNESEARCH_REQUIRE_ENGINE=1 so they fail instead.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from finetune.gguf import (
    LLAMA3_REGEX,
    QWEN2_REGEX,
    GGUFExportError,
    check_export,
    export_gguf,
    padded_ffn,
    padding_bytes,
)
from pruning import adapter, reference
from pruning.architecture import Architecture, LayerShape
from pruning.data import token_windows
from pruning.importance import compute_importance
from pruning.metrics import perplexity
from pruning.slicing import slice_model
from tests.conftest import tiny_model

try:
    import llama_cpp
except ImportError:
    llama_cpp = None
REQUIRED = os.environ.get("PRUNESEARCH_REQUIRE_ENGINE") == "1"
needs_engine = pytest.mark.skipif(
    llama_cpp is None and not REQUIRED,
    reason="llama-cpp-python is not installed (pip install 'prunesearch[serve]'); CI requires it",
)


def in_engine(test):
    """A test that loads llama.cpp: slow, and skipped without it unless CI requires it."""
    return pytest.mark.slow(needs_engine(test))

TYPES = ("f32", "f16", "q8_0")
LOGIT_TOLERANCE = {"f32": 1e-4, "f16": 3e-2, "q8_0": 0.6}  # max |Δlogit| / std(logits), and max |Δlogit|
PPL_TOLERANCE = {"f32": 0.01, "f16": 0.01, "q8_0": 0.02}  # |ppl(llama.cpp) / ppl(ours) - 1|
GREEDY_TOKENS = 32
TINY = dict(vocab_size=4096, hidden_size=128, intermediate_size=192, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=2, head_dim=32, max_position_embeddings=256, initializer_range=0.1)
MIXED = (LayerShape(2, 3, 160), LayerShape(0, 0, 96), LayerShape(1, 4, 0), LayerShape(2, 2, 192))
OFF_BLOCK = (LayerShape(2, 3, 100), LayerShape(1, 4, 0), LayerShape(2, 4, 40), LayerShape(2, 2, 192))  # Q8_0 pads
# name -> (family, tied, shapes (None: all kept), config overrides); "reference": the shipped trained model
CASES = {
    "reference-dense": ("reference", False, None),
    "reference-searched": ("reference", False, (
        LayerShape(0, 0, 512), LayerShape(2, 3, 0), LayerShape(1, 4, 768), LayerShape(2, 2, 320),
        LayerShape(2, 4, 256), LayerShape(0, 0, 0), LayerShape(1, 2, 640), LayerShape(2, 4, 768))),
    "layer0-attention-dropped": ("llama", False, (
        LayerShape(0, 0, 192), LayerShape(2, 4, 192), LayerShape(1, 4, 96), LayerShape(2, 4, 192))),
    "mlp-dropped": ("llama", False, (
        LayerShape(2, 4, 192), LayerShape(2, 4, 0), LayerShape(1, 3, 64), LayerShape(2, 4, 0))),
    "query-heads-in-groups": ("llama", False, (
        LayerShape(2, 1, 192), LayerShape(2, 3, 160), LayerShape(1, 2, 192), LayerShape(2, 4, 128))),
    "llama-uniform": ("llama", False, (LayerShape(2, 3, 128),) * 4),
    "qwen2-bias-tied": ("qwen2", True, MIXED),
    "mistral": ("mistral", False, MIXED),
    "ffn-off-q8_0-blocks": ("llama", False, OFF_BLOCK),
    "llama-attention-and-mlp-bias": ("llama", False, MIXED, {"attention_bias": True, "mlp_bias": True}),
}


def _case_model(family: str, tie: bool, shapes, calibration: torch.Tensor, overrides=None):
    """(sliced model, architecture) of one case."""
    if family == "reference":
        model = adapter.load_model(reference.MODEL_DIR, torch.device("cpu"))
    else:
        model = tiny_model(family, tie, seed=0, **{**TINY, **(overrides or {})})
        generator = torch.Generator().manual_seed(1)
        for layer in adapter.decoder_layers(model):  # HF zero-initialises biases: give them values to export
            for lin in vars(adapter.layer_parts(layer)).values():
                if isinstance(lin, torch.nn.Linear) and lin.bias is not None:
                    lin.bias.data = 0.5 * torch.randn(lin.bias.shape, generator=generator)
    spec = adapter.model_spec(model)
    arch = Architecture.full(spec) if shapes is None else Architecture(spec, shapes)
    return slice_model(model, arch, compute_importance(model, calibration)), arch


def _engine(path):
    if llama_cpp is None:
        pytest.fail("PRUNESEARCH_REQUIRE_ENGINE=1 but llama-cpp-python does not import: pip install '.[serve]'")
    # KV cache at f32: llama.cpp's default f16 cache rounds keys and values, which is the engine's choice,
    # not the export's, and would hide an export error under its own
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=256, logits_all=True, n_threads=1,
                           type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, verbose=False)


def _engine_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float64)  # (T, V)


def _engine_perplexity(llm, windows: torch.Tensor) -> float:
    total, count = 0.0, 0
    for window in windows.tolist():
        logits = _engine_logits(llm, window)[:-1]
        logits = logits - logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        total -= logp[np.arange(len(window) - 1), window[1:]].sum()
        count += len(window) - 1
    return math.exp(total / count)


def _engine_greedy(llm, prompt: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(out[-1:])
    return out


@torch.no_grad()
def _greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    for _ in range(n):
        ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def tokenizer():
    return adapter.load_tokenizer(reference.MODEL_DIR)


def measure(tokenizer, root) -> dict:
    """case -> {"arch", "path": {type: gguf}, "logits": {type: max|Δ|/std}, "ppl": {type: (ours, engine)},
    "greedy": (ours, engine), "tokens"}; each model is written and loaded once per type."""
    text = reference.EVALUATION_TEXT.read_text()
    windows = token_windows(tokenizer, text, 64, 2)
    calibration = token_windows(tokenizer, reference.CALIBRATION_TEXT.read_text(), 64, 4)
    ids = windows[0, :48].tolist()
    results = {}
    for name, (family, tie, shapes, *overrides) in CASES.items():
        model, arch = _case_model(family, tie, shapes, calibration, *overrides)
        with torch.no_grad():
            ours = model(input_ids=torch.tensor([ids])).logits[0].double().numpy()
        ours_ppl = perplexity(model, windows)
        case = {"arch": arch, "path": {}, "logits": {}, "abs": {}, "ppl": {}}
        for gguf_type in TYPES:
            path = export_gguf(model, arch, tokenizer, root / f"{name}-{gguf_type}.gguf", gguf_type)
            llm = _engine(path)
            case["path"][gguf_type] = path
            case["abs"][gguf_type] = float(np.abs(_engine_logits(llm, ids) - ours).max())
            case["logits"][gguf_type] = case["abs"][gguf_type] / float(ours.std())
            case["ppl"][gguf_type] = (ours_ppl, _engine_perplexity(llm, windows))
            if gguf_type == "f32":
                case["greedy"] = (_greedy(model, ids[:16], GREEDY_TOKENS), _engine_greedy(llm, ids[:16], GREEDY_TOKENS))
                case["tokens"] = llm.tokenize(text[:2000].encode(), add_bos=True)
            llm.close()
        results[name] = case
    return results


@pytest.fixture(scope="module")
def measured(tokenizer, tmp_path_factory):
    return measure(tokenizer, tmp_path_factory.mktemp("gguf"))


@in_engine
@pytest.mark.parametrize("gguf_type", TYPES)
@pytest.mark.parametrize("name", CASES)
def test_logits_match_transformers(name, gguf_type, measured):
    assert measured[name]["logits"][gguf_type] <= LOGIT_TOLERANCE[gguf_type]
    assert measured[name]["abs"][gguf_type] <= LOGIT_TOLERANCE[gguf_type]


@in_engine
@pytest.mark.parametrize("gguf_type", TYPES)
@pytest.mark.parametrize("name", CASES)
def test_perplexity_matches_ours(name, gguf_type, measured):
    ours, engine = measured[name]["ppl"][gguf_type]
    assert abs(engine / ours - 1) <= PPL_TOLERANCE[gguf_type]


def _worst_ppl(measured, types) -> float:
    return max(abs(engine / ours - 1) for case in measured.values() for ours, engine in map(case["ppl"].get, types))


# The figures docs/studies.md ("GGUF exports in llama.cpp") quotes from this module's measurements, each given to
# its last digit: the measurement must round to at most the figure (below figure + half a unit of its last digit),
# and stay above half of it (lower than that, the figure overstates the error and should be re-measured).
# name -> (figure, half a unit of its last digit, the measurement)
DOCUMENTED = {
    "f32: max |Δlogit| below 1e-5 in every case": (1e-5, 0.0, lambda m: max(case["abs"]["f32"] for case in m.values())),
    "f32 and f16: perplexity within 0.02%": (2e-4, 0.5e-4, lambda m: _worst_ppl(m, ("f32", "f16"))),
    "Q8_0: perplexity within 1.2%": (1.2e-2, 0.05e-2, lambda m: _worst_ppl(m, ("q8_0",))),
}


@in_engine
@pytest.mark.parametrize("figure", DOCUMENTED)
def test_the_documented_figures_still_hold(figure, measured):
    value, half_unit, measure = DOCUMENTED[figure]
    assert value / 2 <= measure(measured) < value + half_unit


@in_engine
@pytest.mark.parametrize("name", CASES)
def test_greedy_generation_is_identical_at_f32(name, measured):
    ours, engine = measured[name]["greedy"]
    assert len(engine) == GREEDY_TOKENS
    assert engine == ours


@in_engine
def test_tokenization_matches_transformers(measured, tokenizer):
    text = reference.EVALUATION_TEXT.read_text()[:2000]
    assert measured["reference-searched"]["tokens"] == tokenizer(text)["input_ids"]


@in_engine
def test_per_layer_shapes_use_deci_and_uniform_uses_llama(measured):
    import gguf

    reader = gguf.GGUFReader(measured["reference-searched"]["path"]["f32"])
    assert reader.fields["general.architecture"].contents() == "deci"
    # layer 0's dropped attention is a stand-in head (zero output), dropped MLPs zero FFNs of 32 channels
    assert reader.fields["deci.attention.head_count"].contents() == [1, 6, 4, 4, 8, 0, 2, 8]
    assert reader.fields["deci.attention.head_count_kv"].contents() == [1, 2, 1, 2, 2, 0, 1, 2]
    assert reader.fields["deci.feed_forward_length"].contents() == [512, 32, 768, 320, 256, 32, 640, 768]
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"


@in_engine
def test_q8_0_pads_ffn_widths_and_keeps_f32_as_sliced(measured):
    import gguf

    widths = {t: gguf.GGUFReader(measured["ffn-off-q8_0-blocks"]["path"][t]).fields["deci.feed_forward_length"]
              .contents() for t in ("f32", "q8_0")}
    assert widths == {"f32": [100, 32, 40, 192], "q8_0": [128, 32, 64, 192]}  # the logits tests cover exactness
    uniform = gguf.GGUFReader(measured["llama-uniform"]["path"]["q8_0"])
    assert uniform.fields["general.architecture"].contents() == "llama"
    assert uniform.fields["llama.attention.head_count"].contents() == 6
    tied = {t.name for t in gguf.GGUFReader(measured["qwen2-bias-tied"]["path"]["f32"]).tensors}
    assert "output.weight" not in tied and "blk.0.attn_q.bias" in tied and "blk.3.attn_k.bias" in tied
    biases = {t.name for t in gguf.GGUFReader(measured["llama-attention-and-mlp-bias"]["path"]["f32"]).tensors}
    assert {"blk.0.attn_output.bias", "blk.0.ffn_down.bias", "blk.1.ffn_up.bias"} <= biases


def test_attention_rows_q8_0_cannot_hold_are_refused_before_writing(tokenizer, tmp_path):
    calibration = token_windows(tokenizer, reference.CALIBRATION_TEXT.read_text(), 64, 2)
    model = tiny_model("llama", **{**TINY, "head_dim": 16})
    arch = Architecture(adapter.model_spec(model), (LayerShape(1, 3, 96),) * 4)  # 3 heads x 16: 48 values a row
    slice_model(model, arch, compute_importance(model, calibration))
    with pytest.raises(GGUFExportError, match=r"blocks of 32.*'layer 0 query heads \* head_dim': 48.*f16 or f32"):
        export_gguf(model, arch, tokenizer, tmp_path / "m.gguf", "q8_0")
    assert list(tmp_path.iterdir()) == []
    export_gguf(model, arch, tokenizer, tmp_path / "m.gguf", "f16")
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_ffn_widths_off_the_block_are_padded_with_zero_channels():
    spec = adapter.model_spec(tiny_model("llama", **TINY))
    arch = Architecture(spec, OFF_BLOCK)
    assert [padded_ffn(x.ffn_channels, "q8_0") for x in arch.layers] == [128, 32, 64, 192]
    assert [padded_ffn(x.ffn_channels, "f16") for x in arch.layers] == [100, 32, 40, 192]
    # 28 + 24 zero channels, each a gate row, an up row and a down column of 128 values, 34 bytes per 32 in Q8_0
    assert padding_bytes(arch, "q8_0") == 52 * 3 * 128 * 34 / 32
    assert padding_bytes(arch, "f16") == 0


def test_unconvertible_tokenizer_is_refused(tokenizer):
    from tests.finetune.conftest import char_tokenizer

    spec = adapter.model_spec(tiny_model("llama", **TINY))
    with pytest.raises(GGUFExportError, match="only byte-level BPE tokenizers"):
        check_export(Architecture.full(spec), tiny_model("llama", **TINY).config, char_tokenizer(), "f16")


def test_missing_gguf_package_is_named(tokenizer, tmp_path, monkeypatch):
    import sys

    model, arch = _case_model("llama", False, None, torch.zeros(1, 8, dtype=torch.long))
    monkeypatch.setitem(sys.modules, "gguf", None)  # as on a machine without it: import gguf raises ImportError
    with pytest.raises(GGUFExportError, match=r"needs the gguf package: pip install 'prunesearch\[serve\]'"):
        export_gguf(model, arch, tokenizer, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def _split_bpe_tokenizer(regex: str):
    """A byte-level BPE tokenizer with a Llama 3 / Qwen2 style Split pre-tokenizer, trained on the shipped text."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|begin|>", "<|end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([reference.CALIBRATION_TEXT.read_text()[:200_000]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin|>", eos_token="<|end|>")


@in_engine
@pytest.mark.parametrize(("regex", "pre"), [(LLAMA3_REGEX, "llama-bpe"), (QWEN2_REGEX, "qwen2")])
def test_split_bpe_tokenizers_tokenize_as_in_transformers(regex, pre, tmp_path):
    import gguf

    tokenizer = _split_bpe_tokenizer(regex)
    model = tiny_model("llama", **{**TINY, "vocab_size": len(tokenizer)})
    path = export_gguf(model, Architecture.full(adapter.model_spec(model)), tokenizer, tmp_path / "m.gguf")
    assert gguf.GGUFReader(path).fields["tokenizer.ggml.pre"].contents() == pre
    text = "I've said 12345 times:\n\n  def f(x):\treturn x ** 3.14  # don't, WE'LL see\u00e9\u4f60\u597d!!"
    llm = _engine(path)
    assert llm.tokenize(text.encode(), add_bos=False) == tokenizer(text, add_special_tokens=False)["input_ids"]
    llm.close()


@in_engine
def test_added_tokens_past_the_embedding_are_left_out_and_the_rest_tokenizes_as_before(tmp_path):
    import gguf

    tokenizer = adapter.load_tokenizer(reference.MODEL_DIR)
    model = tiny_model("llama", **{**TINY, "vocab_size": len(tokenizer)})
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})  # id 2048: no embedding row
    path = export_gguf(model, Architecture.full(adapter.model_spec(model)), tokenizer, tmp_path / "m.gguf")
    tokens = gguf.GGUFReader(path).fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == model.config.vocab_size and "<|im_start|>" not in tokens
    text = reference.EVALUATION_TEXT.read_text()[:500]
    llm = _engine(path)
    assert llm.tokenize(text.encode(), add_bos=False) == tokenizer(text, add_special_tokens=False)["input_ids"]
    llm.close()


def test_scaled_rotary_embeddings_are_refused(tokenizer):
    model = tiny_model("llama", **TINY, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4})
    with pytest.raises(adapter.UnsupportedModelError, match="rope_type 'linear' is not supported"):
        check_export(Architecture.full(adapter.model_spec(model)), model.config, tokenizer, "f16")
