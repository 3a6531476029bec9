"""``modelopt-sparse eval``: perplexity of a model under N:M sparse attention.

The pieces are usable on their own: :func:`~.sweep.parse_patterns` and
:func:`~.sweep.build_settings` describe a sweep, :func:`~.perplexity.evaluate` runs it on
token windows of a loaded model, :mod:`.report` formats and writes the results.
"""

from .errors import EvalError
from .perplexity import SettingResult, apply_setting, evaluate, window_nll
from .sweep import DEFAULT_PATTERNS, Setting, build_settings, parse_pattern, parse_patterns

__all__ = [
    "EvalError",
    "Setting",
    "SettingResult",
    "DEFAULT_PATTERNS",
    "parse_pattern",
    "parse_patterns",
    "build_settings",
    "apply_setting",
    "evaluate",
    "window_nll",
]
