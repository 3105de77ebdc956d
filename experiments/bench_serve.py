"""Serving speed where a pruned model is served: llama.cpp, dense vs pruned GGUF exports, ratios measured in one run.

    python -m experiments.bench_serve [--threads 2] [--prompt 128] [--decode 32] [--repeats 3] [--no-tinyllama]
                                      [--model DIR|FILE.gguf] [--architecture best_architecture.json ...]
                                      [--out experiments/results/bench-serve.md]

Models:
  - the shipped reference model, or the one `--model` names (a real one:
    `--model "$(python -m experiments.models smollm2-135m)"`), and its exports with 35% and 50% of the
    parameters removed, at the search space's importance-threshold allocation (one of the search's own
    non-uniform starting candidates; FFN widths multiples of 32), and at each `--architecture` given (a
    run's `best_architecture.json`: the searched shapes);
  - without `--model`, a TinyLlama-1.1B-shaped model with random weights (22 layers, hidden 2048, 32 heads
    over 4 KV groups, FFN 5632, vocab 32000; speed depends on shapes, not weights), pruned to the
    reference's shapes scaled up: each of its 22 layers takes the attention and FFN shares of the reference
    layer at the same relative depth, projected onto the same removed fraction.

Each is written as GGUF f16 and Q8_0 and loaded in llama.cpp (llama-cpp-python). Prefill: one batch of
--prompt tokens; decode: --decode single tokens after it (the KV cache in use). Best of --repeats, with
the dense and pruned models of one type taking turns, so load from other jobs on a shared machine hits
them alike. transformers (f32, the same modules the exported remote code builds, KV cache on) is timed
on the same threads, side by side. Ratios are pruned ÷ dense of the same engine and type.

Agreement, per variant of the first model: the f32 GGUF in llama.cpp, with an f32 KV cache, against
transformers on the prompt (max |Δlogit| over every position) and whether the --decode greedy tokens after it
are identical. llama.cpp's default KV cache is f16: on SmolLM2's threshold allocation at 35% removed it moved
the logits by up to 1.23 (f32 cache: 4.7e-3) and changed the greedy tokens; the speeds use the default.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from experiments import provenance
from finetune.gguf import export_gguf
from pruning import adapter, reference
from pruning.architecture import Architecture
from pruning.data import token_windows
from pruning.importance import Importance, compute_importance
from pruning.slicing import slice_model
from search.space import SearchSpace

REMOVED = (0.35, 0.50)
TYPES = ("f16", "q8_0")
FFN_STEP = 32
TINYLLAMA = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)


def transformers_speed(model, ids: list[int], n_prompt: int, repeats: int) -> tuple[float, float]:
    """(prefill, decode) tokens/s of `model` on CPU, best of `repeats` after one warm-up run."""
    best = (0.0, 0.0)
    prompt, rest = torch.tensor([ids[:n_prompt]]), ids[n_prompt:]
    with torch.inference_mode():
        for run in range(repeats + 1):
            start = time.perf_counter()
            past = model(input_ids=prompt, use_cache=True).past_key_values
            mid = time.perf_counter()
            for tok in rest:
                past = model(input_ids=torch.tensor([[tok]]), past_key_values=past, use_cache=True).past_key_values
            end = time.perf_counter()
            if run:
                best = max(best[0], n_prompt / (mid - start)), max(best[1], len(rest) / (end - mid))
    return best


def engine_speeds(paths: dict[str, Path], ids: list[int], n_prompt: int, threads: int,
                  repeats: int) -> dict[str, tuple[float, float]]:
    """name -> (prefill, decode) tokens/s in llama.cpp, best of `repeats` after one warm-up run, the models
    taking turns."""
    import llama_cpp

    llms = {name: llama_cpp.Llama(model_path=str(p), n_ctx=len(ids) + 8, n_batch=n_prompt, n_threads=threads,
                                  n_threads_batch=threads, verbose=False) for name, p in paths.items()}
    best = dict.fromkeys(llms, (0.0, 0.0))
    for run in range(repeats + 1):
        for name, llm in llms.items():
            llm.reset()
            start = time.perf_counter()
            llm.eval(ids[:n_prompt])
            mid = time.perf_counter()
            for tok in ids[n_prompt:]:
                llm.eval([tok])
            end = time.perf_counter()
            prefill, decode = n_prompt / (mid - start), (len(ids) - n_prompt) / (end - mid)
            if run:
                best[name] = max(best[name][0], prefill), max(best[name][1], decode)
    for llm in llms.values():
        llm.close()
    return best


def model_variants(model_path: str | Path, tokenizer, architectures: list[Path]) -> tuple[list, dict]:
    """[(name, arch, build)] for the model: dense, the threshold allocation at each of REMOVED and each given
    architecture (named by its file and what it removes: "best_architecture -30%"); and the fractions of the
    threshold shapes."""
    cpu = torch.device("cpu")
    dense = adapter.load_model(model_path, cpu)
    calibration = token_windows(tokenizer, reference.CALIBRATION_TEXT.read_text(), 128, 32)
    importance = compute_importance(dense, calibration)
    spec = adapter.model_spec(dense)
    full = Architecture.full(spec)
    variants, fractions, pruned = [("dense", full, lambda: dense)], {}, []
    for removed in REMOVED:
        space = SearchSpace(spec, int(full.params() * (1 - removed)), ffn_step=FFN_STEP)
        arch = space.threshold(importance)
        fractions[removed] = space.fractions(arch)
        pruned.append((f"-{removed:.0%}", arch))
    for path in architectures:
        arch = Architecture.from_json(path.read_text())
        if arch.spec != spec:
            raise ValueError(f"{path} is an architecture of {arch.spec.base_model}, not of {model_path}")
        pruned.append((f"{path.stem} -{1 - arch.params() / full.params():.0%}", arch))
    for name, arch in pruned:
        build = (lambda a: lambda: slice_model(adapter.load_model(model_path, cpu), a, importance))(arch)
        variants.append((name, arch, build))
    return variants, fractions


def tinyllama_variants(fractions: dict) -> list:
    """[(name, arch, build)] for the TinyLlama-shaped model, pruned to the reference's shapes scaled to 22 layers."""
    def build_dense():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(TINYLLAMA, dtype=torch.float32).eval()
        model.name_or_path = "tinyllama-1.1b-shape"
        return model

    spec = adapter.spec_from_config(TINYLLAMA, "tinyllama-1.1b-shape")
    full = Architecture.full(spec)
    rng = np.random.default_rng(0)  # random weights: which units stay does not matter for speed
    importance = Importance(spec, "random", tuple(rng.random((spec.num_kv_heads, spec.group_size))
                                                  for _ in range(spec.num_layers)),
                            tuple(rng.random(spec.intermediate_size) for _ in range(spec.num_layers)))
    variants = [("dense", full, build_dense)]
    for removed, (attn, ffn) in fractions.items():
        depth = np.floor(np.arange(spec.num_layers) * len(attn) / spec.num_layers).astype(int)
        space = SearchSpace(spec, int(full.params() * (1 - removed)), ffn_step=FFN_STEP)
        arch = space.project(attn[depth], ffn[depth])
        variants.append((f"-{removed:.0%}", arch, (lambda a: lambda: slice_model(build_dense(), a, importance))(arch)))
    return variants


def agreement(model, path: Path, ids: list[int], n_prompt: int, threads: int) -> dict:
    """The f32 GGUF at `path` against `model` (transformers): max |Δlogit| over the prompt's positions, and
    whether the greedy continuation of len(ids) - n_prompt tokens after the prompt is the same token for token."""
    import llama_cpp

    prompt, n_new = ids[:n_prompt], len(ids) - n_prompt
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(ids) + 8, n_batch=n_prompt, n_threads=threads,
                          n_threads_batch=threads, logits_all=True, verbose=False,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)  # f32 KV cache too
    try:
        llm.eval(prompt)
        engine_logits = np.array(llm.scores[:n_prompt], dtype=np.float64)  # (T, V)
        engine_tokens = []
        for _ in range(n_new):
            engine_tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval(engine_tokens[-1:])
    finally:
        llm.close()
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompt])).logits[0].double().numpy()
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
    ours = out[0, n_prompt:].tolist()
    return dict(max_abs_logit_diff=float(np.abs(engine_logits - logits).max()), logit_std=float(logits.std()),
                greedy_same=ours == engine_tokens, greedy_tokens=n_new)


def bench(label: str, variants: list, tokenizer, ids: list[int], args, workdir: Path,
          agree: list[dict] | None = None) -> list[dict]:
    """Rows of the table for one base model: transformers, then llama.cpp at every type; with `agree`, the f32
    GGUF's agreement with transformers is appended there, one row per variant."""
    rows, paths, params = [], {t: {} for t in TYPES}, {}
    torch.set_num_threads(args.threads)
    for name, arch, build in variants:
        model = build()
        params[name] = arch.params()
        prefill, decode = transformers_speed(model, ids, args.prompt, args.repeats)
        rows.append(dict(model=label, variant=name, engine="transformers f32", prefill=prefill, decode=decode))
        if agree is not None:
            f32 = export_gguf(model, arch, tokenizer, workdir / f"{label}{name}-f32.gguf", "f32", force=True)
            agree.append(dict(model=label, variant=name, **agreement(model, f32, ids, args.prompt, args.threads)))
            f32.unlink()
        for t in TYPES:
            paths[t][name] = export_gguf(model, arch, tokenizer, workdir / f"{label}{name}-{t}.gguf", t, force=True)
        del model
        gc.collect()
    for t in TYPES:
        speeds = engine_speeds(paths[t], ids, args.prompt, args.threads, args.repeats)
        rows += [dict(model=label, variant=name, engine=f"llama.cpp {t}", prefill=p, decode=d,
                      size_mb=paths[t][name].stat().st_size / 2**20) for name, (p, d) in speeds.items()]
    for row in rows:
        row["params"] = params[row["variant"]]
        dense = next(r for r in rows if r["engine"] == row["engine"] and r["variant"] == "dense")
        row["params_ratio"] = row["params"] / params["dense"]
        row["prefill_ratio"], row["decode_ratio"] = row["prefill"] / dense["prefill"], row["decode"] / dense["decode"]
    return rows


def shapes(label: str, variants: list) -> str:
    """One line per pruned variant: query heads/KV heads/FFN channels of every layer (- = dropped)."""
    def layer(x):
        return f"{x.query_heads or '-'}/{x.kv_heads or '-'}/{x.ffn_channels or '-'}"
    return "".join(f"- {label} {name}: {' '.join(layer(x) for x in arch.layers)}\n"
                   for name, arch, _ in variants if name != "dense")


def table(rows: list[dict]) -> str:
    df = pd.DataFrame(rows)
    df.insert(df.columns.get_loc("params_ratio") + 1, "1/params_ratio", 1 / df["params_ratio"])
    df["params"] = df["params"].map(lambda n: f"{n / 1e6:.2f}M")
    df["size_mb"] = df["size_mb"].map(lambda x: "" if pd.isna(x) else f"{x:.1f}")
    for col in ("prefill", "decode"):
        df[col] = df[col].map(lambda x: f"{x:.1f}")
    for col in ("params_ratio", "1/params_ratio", "prefill_ratio", "decode_ratio"):
        df[col] = df[col].map(lambda x: f"{x:.2f}")
    df = df[["model", "variant", "engine", "params", "params_ratio", "1/params_ratio", "size_mb", "prefill",
             "prefill_ratio", "decode", "decode_ratio"]]
    return df.to_markdown(index=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="CPU threads for both engines (default: %(default)s)")
    p.add_argument("--prompt", type=int, default=128, help="prefill tokens (default: %(default)s)")
    p.add_argument("--decode", type=int, default=32, help="decoded tokens (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="best of this many runs (default: %(default)s)")
    p.add_argument("--no-tinyllama", dest="tinyllama", action="store_false", help="only the reference model")
    p.add_argument("--model", help="a model directory or .gguf file to bench instead of the shipped reference "
                                   "(the TinyLlama shape is then left out)")
    p.add_argument("--architecture", type=Path, action="append", default=[],
                   help="an architecture JSON of that model (a run's best_architecture.json) to bench as well; "
                        "repeat for more")
    p.add_argument("--out", type=Path, help="also write the table (markdown) here")
    args = p.parse_args(argv)
    if args.prompt < 1 or args.decode < 1 or args.repeats < 1 or args.threads < 1:
        print("error: --prompt, --decode, --repeats and --threads must be at least 1", file=sys.stderr)
        return 2
    missing = [str(a) for a in args.architecture if not a.is_file()]
    if missing:
        print(f"error: no architecture file {', '.join(missing)}; give a run's best_architecture.json", file=sys.stderr)
        return 2
    model_path = args.model or reference.MODEL_DIR
    label = Path(args.model).stem if args.model else "reference"
    tokenizer = adapter.load_tokenizer(model_path)
    text = reference.EVALUATION_TEXT.read_text()
    ids = tokenizer(text[:20000], add_special_tokens=False)["input_ids"][: args.prompt + args.decode]
    started = time.time()
    agree: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        try:
            variants, fractions = model_variants(model_path, tokenizer, args.architecture)
        except ValueError as err:
            print(f"error: {err}; give an architecture of the model benched", file=sys.stderr)
            return 2
        rows, layers = bench(label, variants, tokenizer, ids, args, Path(tmp), agree), shapes(label, variants)
        if args.tinyllama and not args.model:
            variants = tinyllama_variants(fractions)
            rows += bench("tinyllama-1.1b-shape", variants, tokenizer, ids, args, Path(tmp))
            layers += shapes("tinyllama-1.1b-shape", variants)
    text = (f"{args.threads} threads, prompt {args.prompt} tokens, decode {args.decode} tokens, best of "
            f"{args.repeats}; tokens/s; ratios pruned ÷ dense of the same engine ({time.time() - started:.0f} s)\n\n"
            + table(rows) + f"\n\nf32 GGUF in llama.cpp (f32 KV cache) against transformers ({label}; logits over the "
            f"{args.prompt}-token prompt, greedy over the {args.decode} tokens after it):\n\n"
            + pd.DataFrame(agree).to_markdown(index=False, floatfmt=".2e")
            + "\n\nPruned shapes, query heads/KV heads/FFN channels per layer (- = dropped):\n\n" + layers)
    print(text)
    if args.out:
        args.out.write_text(provenance.header("experiments.bench_serve", argv) + text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
