"""Command-line options generated from `RunConfig`'s field metadata (`search.config.option`), so that each
default and its help text are written once. `search.run` offers every group; `search.export` only what can
change after the search (`AFTER_SEARCH`), and there an option left out keeps the run's own setting."""

from __future__ import annotations

import argparse
from dataclasses import MISSING, Field, fields

from search.config import RunConfig

GROUP_TITLES = {
    "search": None,  # the parser's own options
    "format": "export format",
    "reconstruction": "reconstruction (after slicing, before recovery)",
    "recovery": "recovery (LoRA after slicing)",
}
AFTER_SEARCH = ("format", "reconstruction", "recovery")
VALUE_TYPES = {"int": int, "float": float}  # annotations are strings (postponed evaluation)


def parser(prog: str, description: str, groups=tuple(GROUP_TITLES), keep_run_settings: bool = False
           ) -> argparse.ArgumentParser:
    """An argparse parser with the options of `groups`; `keep_run_settings`: options default to absent (the
    export CLI applies only what is given over the saved run's settings)."""
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for group in groups:
        title = GROUP_TITLES[group]
        target = p if title is None else p.add_argument_group(title)
        for f in fields(RunConfig):
            if f.metadata.get("group") == group:
                flags, kwargs = _argument(f, keep_run_settings)
                target.add_argument(*flags, **kwargs)
    return p


def _argument(f: Field, keep_run_settings: bool) -> tuple[tuple[str, ...], dict]:
    meta = dict(f.metadata)
    flags = meta.pop("flags", ("--" + f.name.replace("_", "-"),))
    default_help = meta.pop("default_help", "%(default)s")
    kwargs = {k: v for k, v in meta.items() if k not in ("help", "group")}
    default = f.default if f.default is not MISSING else f.default_factory()
    kind = str(f.type).removesuffix(" | None")
    if kind == "bool":
        kwargs.setdefault("action", argparse.BooleanOptionalAction)
    elif kind.startswith("tuple"):
        kwargs.update(action="append")
        default = list(default)
    elif kind in VALUE_TYPES:
        kwargs["type"] = VALUE_TYPES[kind]
    if keep_run_settings:
        default, default_help = argparse.SUPPRESS, "the run's own"
    return flags, {"dest": f.name, "default": default, "help": f"{meta['help']} (default: {default_help})",
                   **kwargs}


def config_values(namespace: argparse.Namespace, groups=tuple(GROUP_TITLES)) -> dict:
    """The RunConfig fields of `groups` a parsed namespace holds (all, or with `keep_run_settings` those given)."""
    return {f.name: getattr(namespace, f.name) for f in fields(RunConfig)
            if f.metadata.get("group") in groups and hasattr(namespace, f.name)}


def parse_config(argv: list[str]) -> RunConfig:
    """The RunConfig that `python -m search.run argv` would search with (for experiments that take its options)."""
    return RunConfig(**config_values(parser("search options", "").parse_args(argv)))
