"""Train the small reference LLaMA model that ships with the pruning package.

Structured pruning is only meaningful on a *trained* network (an untrained one
has no sensitivity structure), so this script really trains a small
``LlamaForCausalLM`` with grouped-query attention on CPU.

Data
----
The only text guaranteed to exist on every machine with Python is the standard
library itself, so the corpus is:

* every ``.py`` file under ``sysconfig.get_paths()["stdlib"]`` (excluding
  ``site-packages``, ``test``/``tests``/``idle_test`` directories and
  ``__pycache__``), one document per file;
* every entry of ``pydoc_data.topics.topics``, one document per topic.

Documents are split into train / calibration / evaluation **by module** (the
top-level package or module name, e.g. ``email`` or ``json``; all pydoc topics
form the module ``pydoc_topics``).  Splitting by file would leak near-duplicate
code (sibling files of one package share idioms, names and docstrings) from the
training set into the held-out sets; splitting by module keeps evaluation text
genuinely unseen.  The bucket of a module is chosen by the SHA-1 of its name
(not Python's salted ``hash``), roughly 90/5/5, so the split is deterministic
across runs and machines.  If a held-out bucket ends up smaller than
``MIN_HELDOUT_BYTES``, further train modules are moved into it in order of
their SHA-1 until it is large enough.

Calibration and evaluation text are written to ``pruning/reference_data`` (each
capped at ``MAX_HELDOUT_BYTES``) so that downstream runs are deterministic even
on a different Python version whose standard library differs.

The BPE tokenizer is trained on the train split only.  Training uses a fixed
seed, a fixed step count and a deterministic window-sampling order.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "pruning" / "reference_model"
DATA_DIR = REPO_ROOT / "pruning" / "reference_data"

EXCLUDED_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
PYDOC_MODULE = "pydoc_topics"
MIN_HELDOUT_BYTES = 300_000
MAX_HELDOUT_BYTES = 600_000
SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<pad>"]
VOCAB_SIZE = 4096
SEQ_LEN = 256
PERIODIC_EVAL_WINDOWS = 64


@dataclass
class Document:
    module: str
    name: str
    text: str


@dataclass
class Split:
    train: list[Document] = field(default_factory=list)
    calibration: list[Document] = field(default_factory=list)
    evaluation: list[Document] = field(default_factory=list)


# --------------------------------------------------------------------------- data


def sha1_int(text: str) -> int:
    return int(hashlib.sha1(text.encode("utf-8")).hexdigest(), 16)


def stdlib_documents() -> list[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if EXCLUDED_DIRS.intersection(rel.parts[:-1]):
            continue
        text = path.read_text(encoding="utf-8", errors="replace").strip()
        if text:
            docs.append(Document(rel.parts[0].removesuffix(".py"), rel.as_posix(), text))
    return docs


def pydoc_documents() -> list[Document]:
    from pydoc_data.topics import topics

    return [
        Document(PYDOC_MODULE, f"pydoc:{key}", topics[key].strip())
        for key in sorted(topics)
        if topics[key].strip()
    ]


def module_sizes(docs: list[Document]) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for doc in docs:
        sizes[doc.module] = sizes.get(doc.module, 0) + len(doc.text.encode("utf-8"))
    return sizes


def assign_modules(sizes: dict[str, int]) -> dict[str, str]:
    """Hash-bucket modules 90/5/5, then top up small held-out buckets."""
    buckets = {}
    for module in sizes:
        slot = sha1_int(module) % 100
        buckets[module] = "train" if slot < 90 else "calibration" if slot < 95 else "evaluation"
    by_hash = sorted(sizes, key=sha1_int)
    for target in ("calibration", "evaluation"):
        have = sum(s for m, s in sizes.items() if buckets[m] == target)
        for module in by_hash:
            if have >= MIN_HELDOUT_BYTES:
                break
            if buckets[module] == "train":
                buckets[module] = target
                have += sizes[module]
    return buckets


def split_corpus() -> Split:
    docs = stdlib_documents() + pydoc_documents()
    buckets = assign_modules(module_sizes(docs))
    split = Split()
    for doc in docs:
        getattr(split, buckets[doc.module]).append(doc)
    return split


def heldout_text(docs: list[Document]) -> str:
    """Deterministic, capped held-out text; hash order samples across modules."""
    parts, size = [], 0
    for doc in sorted(docs, key=lambda d: sha1_int(d.name)):
        n = len(doc.text.encode("utf-8")) + 2
        if size + n > MAX_HELDOUT_BYTES:
            continue
        parts.append(doc.text)
        size += n
    return "\n\n".join(parts) + "\n"


def write_heldout(split: Split, data_dir: Path) -> dict:
    data_dir.mkdir(parents=True, exist_ok=True)
    info = {}
    for name in ("calibration", "evaluation"):
        docs = getattr(split, name)
        text = heldout_text(docs)
        (data_dir / f"{name}.txt").write_text(text, encoding="utf-8")
        size = len(text.encode("utf-8"))
        if size < MIN_HELDOUT_BYTES:
            raise RuntimeError(f"{name} text too small: {size} bytes")
        info[name] = {"bytes": size, "modules": sorted({d.module for d in docs})}
        print(f"{name}: {size} bytes from {len(info[name]['modules'])} modules")
    return info


# ---------------------------------------------------------------------- tokenizer


def train_tokenizer(docs: list[Document], out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((d.text for d in docs), trainer=trainer, length=len(docs))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=512,
    )
    fast.save_pretrained(out)
    return fast


def encode_documents(tokenizer, texts: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for enc in tokenizer.backend_tokenizer.encode_batch(texts):
        ids.append(tokenizer.bos_token_id)
        ids.extend(enc.ids)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def eval_windows(tokenizer, text: str) -> torch.Tensor:
    """Non-overlapping SEQ_LEN windows of the evaluation text (tail dropped)."""
    ids = torch.tensor(tokenizer.backend_tokenizer.encode(text).ids, dtype=torch.long)
    n = len(ids) // SEQ_LEN
    return ids[: n * SEQ_LEN].view(n, SEQ_LEN)


# -------------------------------------------------------------------------- model


# The shipped model is "gqa"; "deep-mha" is a second, differently shaped model
# (more, narrower layers and plain multi-head attention) that the comparison
# experiments use so that a result is not a property of one model.
SHAPES = {
    "gqa": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=2),
    "deep-mha": dict(hidden_size=192, intermediate_size=512, num_hidden_layers=12,
                     num_attention_heads=6, num_key_value_heads=6),
}


def build_model(tokenizer, shape: str = "gqa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        **SHAPES[shape],
        head_dim=32,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).float()


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def held_out_loss(model, windows: torch.Tensor, batch: int = 16) -> float:
    """Mean next-token NLL over all predicted tokens of the given windows."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(windows), batch):
        chunk = windows[start : start + batch]
        logits = model(input_ids=chunk).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), chunk[:, 1:].reshape(-1), reduction="sum"
        )
        total += nll.item()
        count += chunk[:, 1:].numel()
    model.train()
    return total / count


def sample_batch(tokens: torch.Tensor, batch: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(tokens) - SEQ_LEN, (batch,), generator=gen)
    return torch.stack([tokens[s : s + SEQ_LEN] for s in starts.tolist()])


# ----------------------------------------------------------------------- training


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def train(model, tokens, eval_win, args, log: dict, log_path: Path) -> float:
    opt = torch.optim.AdamW(
        model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1
    )
    gen = torch.Generator().manual_seed(args.seed)
    warmup = max(1, int(0.05 * args.steps))
    model.train()
    start = time.time()
    bar = tqdm(range(args.steps), desc="train", mininterval=5)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, warmup)
        batch = sample_batch(tokens, args.batch, gen)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        done = step + 1
        if done % args.eval_every == 0 or done == args.steps:
            record_eval(model, eval_win, done, loss.item(), time.time() - start, log)
            write_json(log_path, log)
    return time.time() - start


def record_eval(model, eval_win, step, train_loss, elapsed, log) -> None:
    loss = held_out_loss(model, eval_win[:PERIODIC_EVAL_WINDOWS])
    point = {"step": step, "train_loss": round(train_loss, 4),
             "eval_loss": round(loss, 4), "elapsed_s": round(elapsed, 1)}
    log["eval_curve"].append(point)
    tqdm.write(f"[eval] {json.dumps(point)}")


# --------------------------------------------------------------------------- main


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=700, help="optimizer steps")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=16, help="windows per step")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="gqa",
                        help="model shape: gqa is the shipped reference model")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    split = split_corpus()
    data_info = write_heldout(split, args.data_dir)
    print(f"train: {len(split.train)} documents")
    tokenizer = train_tokenizer(split.train, args.out)
    tokens = encode_documents(tokenizer, [d.text for d in split.train])
    eval_text = (args.data_dir / "evaluation.txt").read_text(encoding="utf-8")
    eval_win = eval_windows(tokenizer, eval_text)
    print(f"train tokens: {len(tokens)}, eval windows: {len(eval_win)}, "
          f"prep {time.time() - t0:.0f}s")

    model = build_model(tokenizer, args.shape)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params}")
    log = {"shape": args.shape, "seed": args.seed, "steps": args.steps, "batch": args.batch,
           "seq_len": SEQ_LEN, "peak_lr": args.lr, "eval_curve": []}
    log_path = args.out / "training.json"
    wall = train(model, tokens, eval_win, args, log, log_path)

    final = held_out_loss(model, eval_win)
    model.save_pretrained(args.out)
    log.update({
        "tokens_seen": args.steps * args.batch * SEQ_LEN,
        "train_tokens": len(tokens),
        "wall_time_s": round(wall, 1),
        "total_time_s": round(time.time() - t0, 1),
        "python_version": platform.python_version(),
        "torch_version": torch.__version__,
        "parameters": n_params,
        "eval_windows": len(eval_win),
        "final_eval_loss": round(final, 4),
        "final_eval_perplexity": round(math.exp(final), 3),
        "periodic_eval_note": f"eval_curve uses the first {PERIODIC_EVAL_WINDOWS} windows",
        "data": {k: {"bytes": v["bytes"], "n_modules": len(v["modules"]),
                     "modules": v["modules"]} for k, v in data_info.items()},
    })
    write_json(log_path, log)
    print(f"final held-out loss {final:.4f}, ppl {math.exp(final):.2f}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    sys.exit(main())
