"""pruning.topk: the buckets hold the whole distribution; slicing and joining round-trip; shapes are checked."""

import pytest
import torch
import torch.nn.functional as F

from pruning.topk import TopKDistribution, top_k_kl


def test_buckets_sum_to_one_and_the_kl_with_every_token_is_the_full_kl():
    g = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(2, 3, 20, generator=g) * 2, torch.randn(2, 3, 20, generator=g)
    dense = TopKDistribution.of_logits(teacher, 4, temperature=2.0)
    assert dense.top_ids.dtype == torch.int32 and dense.top_ids.shape == (2, 3, 4)
    total = torch.cat([dense.top_logp, dense.rest_logp[..., None]], -1).logsumexp(-1)
    torch.testing.assert_close(total, torch.zeros(2, 3), atol=1e-6, rtol=0)
    full = F.kl_div(student.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    everything = TopKDistribution.of_logits(teacher, 99)  # k capped at the vocabulary: the rest is empty
    assert torch.isinf(everything.rest_logp).all()
    torch.testing.assert_close(top_k_kl(student, everything), full, atol=1e-5, rtol=0)
    assert (top_k_kl(student, TopKDistribution.of_logits(teacher, 4)) <= full + 1e-6).all()


def test_rows_and_positions_join_back_to_the_whole():
    dense = TopKDistribution.of_logits(torch.randn(4, 6, 10, generator=torch.Generator().manual_seed(1)), 3)
    by_rows = TopKDistribution.cat([dense.rows(slice(0, 1)), dense.rows(slice(1, 4))], dim=0)
    by_positions = TopKDistribution.cat([dense.positions(slice(0, 2)), dense.positions(slice(2, 6))], dim=1)
    for joined in (by_rows, by_positions):
        assert all(torch.equal(a, b) for a, b in zip(vars(joined).values(), vars(dense).values(), strict=True))


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="rest_logp"):
        TopKDistribution(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4, dtype=torch.int32), torch.zeros(2, 4))
