"""What the closed-form gradient of recovery's head loss saves, measured in one run, at a model's shapes.

    python -m experiments.bench_head_loss [--batch 8] [--seq-len 256] [--hidden 576] [--vocab 49152] [--top-k 32]
                                          [--distill 0.5] [--repeats 3]

One training step's LM head + loss, forward and backward, from random (B, T, H) hidden states (SmolLM2-135M's
shapes by default): `finetune.losses.recovery_loss` against autograd through the same chunks of logits, each
chunk checkpointed (how recovery computed it before: three head matmuls per chunk, two log-softmaxes and the
rest bucket's log-sum-exp differentiated). Prints the median seconds of each, their ratio, and the largest
difference between the two gradients.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from experiments import provenance
from finetune import losses
from pruning.topk import TopKDistribution, top_k_kl


def autograd_loss(hidden, head, labels, teacher, tau: float, distill_weight: float) -> torch.Tensor:
    """The same loss differentiated by autograd, chunk by chunk under activation checkpointing."""
    h, targets = hidden[:, :-1], labels[:, 1:]
    step = losses.chunk_positions(h.shape[0], head.out_features)

    def chunk(hc, yc, tc):
        logits = head(hc).float()
        nll = F.cross_entropy(logits.transpose(1, 2), yc, reduction="sum")
        return nll, top_k_kl(logits, tc, tau).sum()

    nll = kl = 0.0
    for c in range(0, h.shape[1], step):
        part = slice(c, c + step)
        n, k = checkpoint(chunk, h[:, part], targets[:, part], teacher.positions(part), use_reentrant=False)
        nll, kl = nll + n, kl + k
    count = targets.numel()
    return (1 - distill_weight) * nll / count + distill_weight * tau**2 * kl / count


def timed(fn, repeats: int) -> tuple[float, torch.Tensor]:
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        grad = fn()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), grad


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.bench_head_loss", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--top-k", type=int, default=32)
    p.add_argument("--distill", type=float, default=0.5, help="λ, the KL's share of the loss")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(args.hidden, args.vocab, bias=False).requires_grad_(False)
    hidden = torch.randn(args.batch, args.seq_len, args.hidden, generator=g).requires_grad_(True)
    labels = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=g)
    teacher_logits = head(torch.randn(args.batch, args.seq_len - 1, args.hidden, generator=g))
    teacher = TopKDistribution.of_logits(teacher_logits, args.top_k, args.temperature)
    del teacher_logits

    def fused():
        out = losses.recovery_loss(hidden, head, labels, teacher, args.temperature, args.distill)
        return torch.autograd.grad(out.loss, hidden)[0]

    def plain():
        return torch.autograd.grad(autograd_loss(hidden, head, labels, teacher, args.temperature, args.distill),
                                   hidden)[0]

    fused_s, fused_grad = timed(fused, args.repeats)
    plain_s, plain_grad = timed(plain, args.repeats)
    print(provenance.header("experiments.bench_head_loss", argv), end="")
    print(f"B={args.batch} T={args.seq_len} H={args.hidden} V={args.vocab}, top-{args.top_k}, "
          f"λ={args.distill}, τ={args.temperature}, {torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"head + loss, forward and backward: closed form {fused_s:.2f} s; autograd, checkpointed {plain_s:.2f} s")
    print(f"ratio {fused_s / plain_s:.2f}; largest gradient difference "
          f"{(fused_grad - plain_grad).abs().max().item():.3g} (largest entry {plain_grad.abs().max().item():.3g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
