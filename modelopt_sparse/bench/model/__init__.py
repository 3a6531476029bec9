"""``modelopt-sparse bench model``: whole HuggingFace models, SDPA against ``mts.sparsify``.

``cases`` says what runs (models, shapes, groups, the H200 estimate), ``measure`` how one
implementation is timed on one setting, ``runner`` loops over everything, ``report``
turns rows into ratios, target verdicts, tables and a chart, and ``command`` is the CLI.
"""

from .cases import CASES, DEFAULT_CASES, GROUPS, IMPLS
from .command import add_arguments
from .report import TARGET_LINES
from .runner import ModelBenchConfig, run_model_bench

__all__ = ["CASES", "DEFAULT_CASES", "GROUPS", "IMPLS", "TARGET_LINES", "ModelBenchConfig", "add_arguments",
           "run_model_bench"]
