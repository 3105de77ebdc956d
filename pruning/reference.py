"""The small trained LLaMA model and the text that ship with the package (the offline default).

Trained by `python -m experiments.train_reference_model` on the Python standard
library's source and docs, split by module so the evaluation text is never trained on.
"""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).parent
MODEL_DIR = _HERE / "reference_model"
CALIBRATION_TEXT = _HERE / "reference_data" / "calibration.txt"
EVALUATION_TEXT = _HERE / "reference_data" / "evaluation.txt"
