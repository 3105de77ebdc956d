"""The field's standard metric beside ours: perplexity on the whole test split, as papers report it.

    python -m experiments.wikitext_perplexity --model DIR|FILE.gguf [--runs RUN_DIR ...] [--text wikitext2|FILE]
                                              [--seq-len 256 2048] [--out runs/wikitext]

The text is one string, cut into non-overlapping windows of --seq-len tokens (the last partial window left out),
each scored on its T-1 next tokens: exp(mean NLL over every scored token). The project's own held-out metric
reads 128 windows spread evenly over the evaluation text, less the search's; this reads all of them.

For each run directory: its best architecture sliced from the base model as it is (before reconstruction and
LoRA), and its export (`<run>/model`) where there is one. Results are kept in --out/results.json (an
interrupted run resumes) and printed as a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from experiments import provenance
from pruning import adapter
from pruning.architecture import Architecture
from pruning.data import read_text, token_windows
from pruning.files import write_atomic
from pruning.importance import load_or_compute
from pruning.metrics import perplexity
from pruning.slicing import slice_model
from search.config import RunConfig
from search.setup import USER_ERRORS, prepare


def models(base: str, runs: list[Path]):
    """(name, a function returning the model) for the base model and each run's slice and export."""
    yield "dense", lambda: adapter.load_model(base, torch.device("cpu"))
    for run in runs:
        def sliced(run=run):
            config = RunConfig(**json.loads((run / "run.json").read_text()))
            setup = prepare(config)
            importance = load_or_compute(setup.model, setup.calibration, config.importance, run, config.batch_size)
            arch = Architecture.from_json((run / "best_architecture.json").read_text())
            return slice_model(copy.deepcopy(setup.model), arch, importance)

        yield f"{run.name} (sliced)", sliced
        if (run / "model" / "config.json").exists():
            yield f"{run.name} (export)", lambda run=run: AutoModelForCausalLM.from_pretrained(
                run / "model", trust_remote_code=True).eval()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.wikitext_perplexity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the base model (directory, hub id or .gguf)")
    p.add_argument("--runs", nargs="*", type=Path, default=[], help="run directories of `python -m search.run`")
    p.add_argument("--text", default="wikitext2", help="test text: a file, or wikitext2 online (default)")
    p.add_argument("--seq-len", nargs="+", type=int, default=[256, 2048])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--out", type=Path, default=Path("runs/wikitext"))
    args = p.parse_args(argv)
    try:
        tokenizer = adapter.load_tokenizer(args.model)
        text = read_text(args.text, "test")
        windows = {t: token_windows(tokenizer, text, t) for t in args.seq_len}
        for run in args.runs:
            if not (run / "best_architecture.json").exists():
                raise FileNotFoundError(f"{run} holds no best_architecture.json: give a finished run directory")
    except (*USER_ERRORS, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    done = json.loads(path.read_text()) if path.exists() else {}
    for name, load in models(args.model, args.runs):
        wanted = [t for t in args.seq_len if f"{name}@{t}" not in done]
        if not wanted:
            continue
        model = load()
        params = sum(p.numel() for p in model.parameters())
        with torch.inference_mode():
            for t in wanted:
                ppl = perplexity(model, windows[t], args.batch_size, progress=f"{name}, {t} tokens")
                done[f"{name}@{t}"] = {"perplexity": ppl, "params": params}
                write_atomic(path, json.dumps(done, indent=2))
        del model
    print(provenance.header("experiments.wikitext_perplexity", argv), end="")
    counts = ", ".join(f"{len(w):,} windows of {t}" for t, w in windows.items())
    print(f"Text: {args.text}, {counts} tokens (every window of the split).\n")
    print("| model | parameters | " + " | ".join(f"perplexity @ {t}" for t in args.seq_len) + " |")
    print("|---|--:|" + "--:|" * len(args.seq_len))
    for name, _ in models(args.model, args.runs):
        got = [done.get(f"{name}@{t}") for t in args.seq_len]
        if any(got):
            params = next(g for g in got if g)["params"]
            cells = " | ".join(f"{g['perplexity']:.2f}" if g else "" for g in got)
            print(f"| {name} | {params:,} | {cells} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
