"""`python -m finetune.next_line`: the shipped multiple-choice task, "which line truly comes next?".

Built from the shipped *evaluation* text only (`pruning/reference_data/evaluation.txt`, Python standard
library modules the reference model was never trained on; never the calibration or training text), so
the task measures what the model learned of code, not what it memorised:

    1. candidate answers and distractors are the lines with at least MIN_CHARS non-blank characters that
       occur once in the text (so no distractor repeats the answer's text);
    2. N of them, evenly spaced over the text, become examples: the context is the CONTEXT_LINES lines
       before (at most MAX_CONTEXT_CHARS characters, earliest lines dropped first);
    3. three distractors per example are drawn, with a generator seeded by (SEED, example number), from the
       other candidate lines at least FAR lines away from the answer, distinct from each other;
    4. the four options are put in a seeded order; the row stores the index of the true line.

Rows: {"context": str, "options": [4 lines], "answer": index}. The continuation is "\\n" + the option, so
read it with --task-template "{context}" --task-answer-prefix $'\\n' (TEMPLATE and ANSWER_PREFIX below).
With the reference tokenizer an example takes at most 307 tokens (task examples may be as long as the
model's positions, 512 there, whatever --seq-len the windows have).
Deterministic: `python -m finetune.next_line` rewrites `pruning/reference_data/next_line.jsonl` bit for bit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from pruning import reference

N_EXAMPLES = 800  # answers at least 11 lines apart: no answer lies in another example's context
CONTEXT_LINES = 10
MAX_CONTEXT_CHARS = 450
MIN_CHARS = 20
FAR = 300  # distractors come from at least this many lines away: in practice another module
N_OPTIONS = 4
SEED = 0
TASK_PATH = reference.EVALUATION_TEXT.with_name("next_line.jsonl")
TEMPLATE = "{context}"
ANSWER_PREFIX = "\n"


def candidate_lines(lines: list[str]) -> list[int]:
    """Indices of lines that can be an answer or a distractor: long enough, occurring once, after some context."""
    counts: dict[str, int] = {}
    for line in lines:
        counts[line] = counts.get(line, 0) + 1
    return [i for i, line in enumerate(lines)
            if i >= CONTEXT_LINES and len(line.strip()) >= MIN_CHARS and counts[line] == 1]


def context_before(lines: list[str], i: int) -> str:
    chosen = lines[max(0, i - CONTEXT_LINES) : i]
    while len(chosen) > 1 and len("\n".join(chosen)) > MAX_CONTEXT_CHARS:
        chosen = chosen[1:]
    return "\n".join(chosen)[-MAX_CONTEXT_CHARS:]


def build(text: str, n: int = N_EXAMPLES, seed: int = SEED) -> list[dict]:
    """The task's rows (module docstring)."""
    lines = [line.rstrip() for line in text.splitlines()]
    pool = np.array(candidate_lines(lines))
    if len(pool) < n + N_OPTIONS:
        raise ValueError(f"the text has {len(pool)} candidate lines, too few for {n} examples")
    rows = []
    for k, at in enumerate(np.linspace(0, len(pool) - 1, n).round().astype(int)):
        i = int(pool[at])
        rng = np.random.default_rng([seed, k])
        far = pool[np.abs(pool - i) >= FAR]
        distractors = [lines[j] for j in rng.choice(far, size=N_OPTIONS - 1, replace=False)]
        options = [lines[i], *distractors]
        order = rng.permutation(N_OPTIONS)
        rows.append({"context": context_before(lines, i), "options": [options[o] for o in order],
                     "answer": int(np.flatnonzero(order == 0)[0])})
    return rows


def write(rows: list[dict], path: Path) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    out = Path(argv[0]) if argv else TASK_PATH
    rows = build(reference.EVALUATION_TEXT.read_text(encoding="utf-8"))
    write(rows, out)
    print(f"wrote {len(rows)} examples to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
