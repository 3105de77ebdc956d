import numpy as np
import pytest

from pruning.data import DataError, token_windows
from pruning.importance import METHODS, compute_importance, load_or_compute
from tests.conftest import tiny_model


@pytest.mark.parametrize("method", METHODS)
def test_scores_are_deterministic_and_shaped(method, windows):
    a = compute_importance(tiny_model("qwen2"), windows, method, batch_size=4)
    # Taylor sums |x·g| per batch by definition; the running statistics do not depend on batching, up to
    # float32 rounding: passes of a different batch shape may take other kernels and summation orders.
    b = compute_importance(tiny_model("qwen2"), windows, method, batch_size=4 if method == "taylor" else 3)
    assert a.heads[0].shape == (2, 3) and a.channels[2].shape == (40,)
    for x, y in zip(a.heads + a.channels, b.heads + b.channels, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5)
        assert (x >= 0).all() and x.sum() > 0


def test_taylor_leaves_no_gradients_behind(windows):
    model = tiny_model("llama")
    compute_importance(model, windows, "taylor")
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_cache_is_reused_and_keyed_by_data(tmp_path, windows):
    model = tiny_model("llama")
    first = load_or_compute(model, windows, "wanda", tmp_path)
    assert len(list(tmp_path.glob("importance-wanda-*.safetensors"))) == 1
    again = load_or_compute(model, windows, "wanda", tmp_path)
    for x, y in zip(first.channels, again.channels, strict=True):
        assert np.array_equal(x, y)
    load_or_compute(model, windows[:3], "wanda", tmp_path)
    assert len(list(tmp_path.glob("importance-wanda-*.safetensors"))) == 2


def test_cache_is_keyed_by_batch_size_where_scores_depend_on_it(tmp_path, windows):
    model = tiny_model("llama")
    for batch_size in (4, 2):
        load_or_compute(model, windows, "taylor", tmp_path, batch_size)
        load_or_compute(model, windows, "wanda", tmp_path, batch_size)
    assert len(list(tmp_path.glob("importance-taylor-*.safetensors"))) == 2
    assert len(list(tmp_path.glob("importance-wanda-*.safetensors"))) == 1


def test_unknown_method_is_named(windows):
    with pytest.raises(ValueError, match="choose one of wanda, fluctuation, taylor"):
        compute_importance(tiny_model(), windows, "magic")


class CharTokenizer:
    def __call__(self, text, add_special_tokens=False, verbose=True):
        return {"input_ids": [ord(c) % 97 for c in text]}


def test_windows_are_fixed_length_and_spread():
    w = token_windows(CharTokenizer(), "abcdefghij" * 10, seq_len=10, max_windows=4)
    assert w.shape == (4, 10)
    assert w[0, 0].item() == ord("a") % 97


def test_too_short_text_says_what_to_do():
    with pytest.raises(DataError, match="fewer than one window of 64; give more text or a shorter --seq-len"):
        token_windows(CharTokenizer(), "short", seq_len=64, what="calibration text")
