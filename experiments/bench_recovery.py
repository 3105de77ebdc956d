"""Recovery cost of a sliced model against the dense one: LoRA speed and memory, forward time.

    python -m experiments.bench_recovery [--model DIR] [--threads 1]

Measured on the shipped reference model (a small model trained for a few steps
stands in while it is absent), with a fixed non-uniform architecture at about
half the decoder parameters (one attention sublayer dropped):

- LoRA steps per second (`finetune.recover.recover`, rank 8, all linear projections),
  pruned ÷ dense;
- peak memory ÷ model size during those steps, for each: (weights + peak of the
  tensors created while training) ÷ weights, counted exactly by `PeakTensorMemory`
  on CPU (process RSS mixes in allocator caching and library buffers) and by
  `max_memory_allocated` on CUDA; without and with gradient checkpointing (the
  default on CUDA);
- inference forward time of the sliced model ÷ the dense model (median of
  interleaved runs).

CPU timings on a shared machine are noisy; medians of interleaved runs and one
thread (`--threads`) keep the ratios comparable, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import LlamaConfig, LlamaForCausalLM

from finetune.card import ModelCard
from finetune.data import lm_domain
from finetune.hf_writer import export_model
from finetune.recover import RecoveryConfig, recover
from pruning import adapter, reference
from pruning.architecture import Architecture, LayerShape
from pruning.data import read_text, token_windows
from pruning.importance import compute_importance
from pruning.slicing import slice_model

SEQ_LEN, BATCH, LORA_STEPS, FORWARD_REPEATS = 256, 8, 12, 7


def bench_architecture(spec) -> Architecture:
    """Edges keep ~65% of heads and channels, the middle ~35%; the middle layer loses its attention."""
    layers, n = [], spec.num_layers
    for i in range(n):
        frac = 0.35 + 0.3 * abs(i - (n - 1) / 2) / max((n - 1) / 2, 1)
        kv = max(1, round(spec.num_kv_heads * frac))
        h = max(1, round(spec.group_size * frac))
        layers.append(LayerShape(kv, h, max(1, round(spec.intermediate_size * frac))))
    mid = n // 2
    layers[mid] = LayerShape(0, 0, layers[mid].ffn_channels)
    return Architecture(spec, tuple(layers))


def stand_in_model(tokenizer, out: Path, steps: int = 60) -> Path:
    """A small Llama (4 layers, hidden 128, GQA 8/2) trained `steps` steps on the calibration text."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=SEQ_LEN)
    model = LlamaForCausalLM(config)
    windows = token_windows(tokenizer, read_text(reference.CALIBRATION_TEXT), SEQ_LEN)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        batch = windows[torch.randint(0, len(windows), (BATCH,))]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the block and alive at once.

    The CPU analogue of `torch.cuda.max_memory_allocated` less what existed before:
    every op's outputs are recorded by storage (views and in-place results are not
    counted twice), and a storage stops counting once nothing refers to it (checked
    at every op, so the peak is exact at op granularity).
    """

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                if storage._cdata not in self.live:
                    self.live[storage._cdata] = (StorageWeakRef(storage), storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def lora_cost(model, windows: torch.Tensor, steps: int, track_memory: bool,
              checkpointing: bool | None = None) -> tuple[float, int]:
    """(LoRA steps per second, peak bytes of the tensors training creates) on `model` (merged afterwards)."""
    config = RecoveryConfig(steps=steps, batch_size=BATCH, warmup_ratio=0.0, gradient_checkpointing=checkpointing)
    domain = [lm_domain("calibration", windows)]
    if not track_memory:
        _, result = recover(model, domain, config, progress=False)
        return steps / result.seconds, 0
    if next(model.parameters()).device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        recover(model, domain, config, progress=False)
        return 0.0, torch.cuda.max_memory_allocated() - base
    with PeakTensorMemory() as tracker:
        recover(model, domain, config, progress=False)
    return 0.0, tracker.peak


@torch.inference_mode()
def forward_times(dense, pruned, windows: torch.Tensor) -> tuple[float, float]:
    """Median seconds of one (BATCH, SEQ_LEN) forward pass for each model, runs interleaved."""
    device = next(dense.parameters()).device
    batch = windows[:BATCH].to(device)
    times = {id(dense): [], id(pruned): []}
    for _ in range(FORWARD_REPEATS + 1):
        for m in (dense, pruned):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            m(input_ids=batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[id(m)].append(time.perf_counter() - start)
    return statistics.median(times[id(dense)][1:]), statistics.median(times[id(pruned)][1:])


def compare(model_dir: Path, device: str, threads: int, work: Path, rounds: int = 3) -> dict:
    dev = torch.device(device)
    dense = adapter.load_model(model_dir, dev)
    tokenizer = adapter.load_tokenizer(model_dir)
    windows = token_windows(tokenizer, read_text(reference.CALIBRATION_TEXT), SEQ_LEN, max_windows=64)
    arch = bench_architecture(adapter.model_spec(dense))
    pruned = adapter.load_model(model_dir, dev)
    slice_model(pruned, arch, compute_importance(pruned, windows[:16]))
    export_model(pruned, arch, tokenizer, work / "pruned", ModelCard("bench", "python -m experiments.bench_recovery"))
    models = {"dense": dense, "pruned": pruned}
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    weights = {k: sum(p.numel() * p.element_size() for p in m.parameters()) for k, m in models.items()}
    t_dense, t_pruned = forward_times(dense, pruned, windows)
    speed = {k: [] for k in models}
    for _ in range(rounds):  # interleaved, so load from other processes hits both alike
        for k, m in models.items():
            speed[k].append(lora_cost(m, windows, LORA_STEPS, track_memory=False)[0])
    peak = {k: lora_cost(m, windows, 2, track_memory=True, checkpointing=False)[1] for k, m in models.items()}
    peak_ckpt = {k: lora_cost(m, windows, 2, track_memory=True, checkpointing=True)[1] for k, m in models.items()}
    sps = {k: statistics.median(v) for k, v in speed.items()}
    return {
        "model": str(model_dir), "device": device, "threads": threads, "batch": [BATCH, SEQ_LEN],
        "architecture": [[x.kv_heads, x.heads_per_group, x.ffn_channels] for x in arch.layers],
        "params": {**params, "ratio": params["pruned"] / params["dense"]},
        "lora_steps_per_s": {**sps, "ratio": sps["pruned"] / sps["dense"]},
        "peak_memory_over_weights": {k: (weights[k] + peak[k]) / weights[k] for k in models},
        "peak_memory_over_weights_checkpointed": {k: (weights[k] + peak_ckpt[k]) / weights[k] for k in models},
        "weights_mib": {k: weights[k] / 2**20 for k in models},
        "training_peak_mib": {k: peak[k] / 2**20 for k in models},
        "training_peak_checkpointed_mib": {k: peak_ckpt[k] / 2**20 for k in models},
        "one_fp32_logits_mib": BATCH * SEQ_LEN * dense.config.vocab_size * 4 / 2**20,  # the same for both models
        "forward_s": {"dense": t_dense, "pruned": t_pruned, "ratio": t_pruned / t_dense},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None,
                        help="model directory or .gguf file (default: the reference model)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = args.model or reference.MODEL_DIR
        if not adapter.is_gguf(model_dir) and not (Path(model_dir) / "config.json").exists():
            print(f"{model_dir} has no model yet; training a small stand-in", file=sys.stderr)
            model_dir = stand_in_model(adapter.load_tokenizer(reference.MODEL_DIR), work / "stand_in")
        print(json.dumps(compare(Path(model_dir), args.device, args.threads, work), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
