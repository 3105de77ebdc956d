"""A 1B rehearsal: the whole `python -m search.run` pipeline on a TinyLlama-1.1B-shaped Llama, memory against the plan.

    python -m experiments.bench_scale [--trials 3] [--threads 1] [--keep DIR]

Builds a Llama with random weights and TinyLlama-1.1B's shape (22 layers, hidden
2048, 32 heads over 4 KV groups, FFN 5632, vocabulary 32000) locally, saves it
with the reference model's tokenizer, and runs the search CLI on the CPU with
small settings (64-token windows, batch 2, a few trials, 2 LoRA steps). A thread
samples the process's resident memory every 5 ms; every stage (the functions the
run calls, wrapped here) gets its peak RSS above the RSS just before the weights
were loaded, and its wall time. Both are printed against `search.plan`'s
prediction for the same settings.

RSS is split as the kernel counts it: anonymous memory (what the process
allocated) and file pages (transformers maps the safetensors file and reads
weights from it lazily, so the load itself costs nothing and the weights show up
as file pages in the first stage that reads them; after slicing, the dense
file's pages stay mapped although nothing uses them, reclaimable but counted).
RSS also holds allocator caches. A benchmark, not a CI test: it needs about
8 GiB RAM and about ten minutes on one thread.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from experiments import provenance
from pruning import adapter, importance, reference
from search import formats, plan, recovery, run, trial_objective
from search.cli_args import parse_config
from search.runner import SearchRun

TINYLLAMA = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)
SETTINGS = ["--budget", "60%", "--seq-len", "64", "--batch-size", "2", "--calibration-windows", "4",
            "--search-windows", "4", "--sampler", "random", "--ffn-step", "64", "--recover-steps", "2",
            "--recover-windows", "8", "--device", "cpu"]
# stage -> (module, attribute the run calls, the plan's stage it is compared with)
STAGES = {
    "load": (adapter, "load_model", "load"),
    "importance": (importance, "compute_importance", "importance (wanda, fluctuation)"),
    "baselines": (SearchRun, "baselines", "candidate evaluation"),
    "trials": (trial_objective.TrialObjective, "measure", "candidate evaluation"),
    "summary": (SearchRun, "summarise", "candidate evaluation"),
    "teacher targets": (recovery, "dense_teacher", "teacher targets"),
    "slicing": (recovery, "slice_model", "slicing"),
    "LoRA + distillation": (recovery, "recover", "LoRA + distillation"),
    "export": (formats, "write", None),
}


def rss() -> tuple[int, int]:
    """(anonymous, file-backed) resident bytes of this process."""
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f)
    return int(status["RssAnon"].split()[0]) * 1024, int(status["RssFile"].split()[0]) * 1024


class StageMemory:
    """Peak RSS and wall time per stage, from a sampling thread; stages nest (the innermost is charged)."""

    def __init__(self, interval: float = 0.005):
        self.stack: list[str] = []
        self.peak: dict[str, tuple[int, int]] = {}  # stage -> (anonymous, anonymous + file) peaks
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.interval, self.running = interval, True
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while self.running:
            if self.stack:
                self._record(self.stack[-1])
            time.sleep(self.interval)

    def _record(self, name: str) -> None:
        anon, file = rss()
        old = self.peak.get(name, (0, 0))
        self.peak[name] = (max(old[0], anon), max(old[1], anon + file))

    @contextlib.contextmanager
    def stage(self, name: str):
        self.stack.append(name)
        start = time.perf_counter()
        try:
            yield
        finally:
            self._record(name)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            self.calls[name] = self.calls.get(name, 0) + 1
            self.stack.pop()

    def wrap(self, owner, attr: str, name: str) -> None:
        original = getattr(owner, attr)

        @functools.wraps(original)
        def wrapped(*args, **kwargs):
            with self.stage(name):
                return original(*args, **kwargs)

        setattr(owner, attr, wrapped)


def build_model(out: Path) -> Path:
    """TinyLlama-1.1B's shape, random weights (seed 0), the reference tokenizer; saved like a checkpoint."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINYLLAMA))
    model.save_pretrained(out)
    adapter.load_tokenizer(reference.MODEL_DIR).save_pretrained(out)
    del model
    gc.collect()
    return out


def texts(work: Path) -> tuple[Path, Path]:
    """Calibration text as shipped; a short evaluation text (a few 64-token windows), so baselines stay cheap."""
    evaluation = work / "evaluation.txt"
    evaluation.write_text(reference.EVALUATION_TEXT.read_text()[:1500])
    return reference.CALIBRATION_TEXT, evaluation


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--keep", type=Path, help="write the run directory and the report here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        model_dir = build_model(work / "tinyllama-shaped")
        build_s = time.perf_counter() - started
        calibration, evaluation = texts(work)
        command = ["--model", str(model_dir), "--calibration", str(calibration), "--evaluation", str(evaluation),
                   "--trials", str(args.trials), "--out", str(work / "run"), *SETTINGS]
        config = parse_config(command)
        predicted = plan.make_plan(config, torch.device("cpu"))
        memory = StageMemory()
        for name, (owner, attr, _) in STAGES.items():
            memory.wrap(owner, attr, name)
        gc.collect()
        base = sum(rss())
        memory.thread.start()
        code = run.main(command)
        memory.running = False
        report = table(memory, predicted, base, build_s, args)
        print(report)
        if args.keep:
            (work / "bench_scale.md").write_text(provenance.header("experiments.bench_scale", argv) + report)
            (work / "bench_scale.json").write_text(json.dumps(
                {"base_rss": base, "peak_rss": memory.peak, "seconds": memory.seconds, "calls": memory.calls,
                 "plan": {s.name: s.device_bytes for s in predicted.stages}}, indent=2))
    return code


def table(memory: StageMemory, predicted: plan.Plan, base: int, build_s: float, args) -> str:
    gib = 2**30
    planned = {s.name: s.device_bytes for s in predicted.stages}
    rows = []
    for name, (_, _, plan_stage) in STAGES.items():
        if name not in memory.peak:
            continue
        anon, total = memory.peak[name]
        measured = total - base
        expect = planned.get(plan_stage)
        ratio = f"{measured / expect:.2f}" if expect else "n/a"
        rows.append(f"| {name} | {memory.calls[name]} | {memory.seconds[name]:.1f} | {measured / gib:.2f} | "
                    f"{anon / gib:.2f} | {'' if expect is None else f'{expect / gib:.2f}'} ({plan_stage or '-'}) | "
                    f"{ratio} |")
    trials = memory.calls.get("trials", 0)
    per_trial = memory.seconds.get("trials", 0.0) / max(trials, 1)
    return (
        f"TinyLlama-1.1B-shaped Llama, random weights, CPU float32, {args.threads} thread(s); "
        f"built and saved in {build_s:.0f} s; RSS before loading {base / gib:.2f} GiB\n\n"
        f"| stage | calls | seconds | peak RSS above base (GiB) | anonymous RSS, absolute (GiB) | plan (GiB) | "
        f"measured / plan |\n|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
        f"seconds per trial: {per_trial:.1f} measured; plan's lower bound {predicted.trial_seconds:.1f} "
        f"({predicted.trial_flops:.3g} FLOPs at the measured matmul rate)\n"
    )


if __name__ == "__main__":
    sys.exit(main())
