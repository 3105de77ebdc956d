"""Parse a parameter budget: absolute (`5B`, `350M`, `2.5e9`) or relative to the base model (`70%`, `0.7`).

Parameters count everything the model holds, embeddings and LM head included, as
model cards report them (a tied embedding counts once).
"""

from __future__ import annotations

import re

_SUFFIX = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}
_PATTERN = re.compile(r"^\s*(?P<num>[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*(?P<unit>[KMBGT%]?)\s*$", re.IGNORECASE)


class BudgetError(ValueError):
    pass


def parse_budget(text: str, model_params: int) -> int:
    """Budget in parameters; relative budgets are fractions of `model_params`."""
    match = _PATTERN.match(str(text))
    if not match:
        raise BudgetError(
            f"cannot read budget {text!r}: use parameters like 5B, 350M, 2.5e9, or a share of the model like 70% or 0.7"
        )
    value, unit = float(match["num"]), match["unit"].upper()
    if unit == "%":
        budget = value / 100 * model_params
    elif unit == "" and value <= 1:
        budget = value * model_params
    else:
        budget = value * _SUFFIX[unit]
    budget = int(budget)
    if budget >= model_params:
        raise BudgetError(
            f"budget {text} = {budget:,} parameters is not below the model's {model_params:,}; "
            "give a smaller budget (e.g. 70%)"
        )
    if budget <= 0:
        raise BudgetError(f"budget {text} is not positive; give e.g. 70% or 5B")
    return budget
