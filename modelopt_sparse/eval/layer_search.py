"""Greedy per-layer choice of N:M patterns under a perplexity budget.

The search knows nothing about models: it takes the attention module names, the
candidate settings, a sensitivity score per (module, setting) and a function that
measures the perplexity of an assignment ``{module: setting}`` (modules left out run
dense). :func:`assignment_config` turns an assignment into the ``SparseAttentionConfig``
that ``modelopt_sparse.sparsify`` applies, addressing each module by its full name.

The greedy rule:

1. order the modules by their cheapest sensitivity, least sensitive first;
2. for each module in that order, try its candidates from the sparsest (lowest N/M) to
   the densest, and among equally sparse ones the least sensitive first; keep the first
   whose whole assignment (everything accepted so far plus this module) measures within
   the limit; if none does, the module stays dense and the search goes on with the next.

Every trial measures the real combined perplexity, so interactions between layers are
seen, at most ``modules x candidates`` measurements in all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

from .sweep import Setting

Assignment = dict[str, Setting]


@dataclass(frozen=True)
class Trial:
    module: str
    setting: Setting
    ppl: float
    accepted: bool


@dataclass
class SearchOutcome:
    assignment: Assignment
    trials: list[Trial]
    order: list[str]
    limit: float

    def sparse_count(self) -> int:
        return len(self.assignment)


def density(setting: Setting) -> float:
    return 1.0 if setting.dense else setting.n / setting.m


def candidate_order(settings: list[Setting], scores: Mapping[Setting, float]) -> list[Setting]:
    """Sparsest first; equal sparsity: lower score first; then the given order."""
    return sorted(settings, key=lambda s: (density(s), scores[s], settings.index(s)))


def module_order(modules: list[str], sensitivity: Mapping[str, Mapping[Setting, float]]) -> list[str]:
    """Least sensitive module first (by its cheapest candidate); ties keep model order."""
    return sorted(modules, key=lambda name: (min(sensitivity[name].values()), modules.index(name)))


def greedy_search(
    modules: list[str],
    settings: list[Setting],
    sensitivity: Mapping[str, Mapping[Setting, float]],
    measure: Callable[[Assignment], float],
    limit: float,
    on_trial: Callable[[Trial], None] | None = None,
) -> SearchOutcome:
    """Run the greedy rule of the module docstring; ``measure`` is called once per trial."""
    if not settings:
        raise ValueError("no candidate settings")
    if any(s.dense for s in settings):
        raise ValueError("dense is every module's fallback, not a candidate")
    missing = [m for m in modules if set(sensitivity.get(m, {})) != set(settings)]
    if missing:
        raise ValueError(f"no sensitivity for every candidate of {missing[:3]}")
    order = module_order(modules, sensitivity)
    assignment: Assignment = {}
    trials: list[Trial] = []
    for module in order:
        for setting in candidate_order(settings, sensitivity[module]):
            proposal = {**assignment, module: setting}
            ppl = measure(proposal)
            trial = Trial(module, setting, ppl, ppl <= limit)
            trials.append(trial)
            if on_trial is not None:
                on_trial(trial)
            if trial.accepted:
                assignment = proposal
                break
    # Model order, not acceptance order: the config reads top to bottom like the model.
    ordered = {m: assignment[m] for m in modules if m in assignment}
    return SearchOutcome(ordered, trials, order, limit)


def assignment_config(assignment: Mapping[str, Setting], backend: str = "auto") -> dict:
    """The ``{"sparse_cfg": ...}`` config of an assignment: every module dense by default,
    the assigned ones sparse. Keys are full module names, which fnmatch matches exactly
    (they contain no wildcard characters)."""
    cfg: dict[str, dict] = {"default": {"enable": False, "backend": backend}}
    for module, s in assignment.items():
        if any(c in module for c in "*?["):
            raise ValueError(f"module name {module!r} contains an fnmatch wildcard character")
        if s.dense:
            continue
        cfg[module] = {"enable": True, "sparsity_n": s.n, "sparsity_m": s.m,
                       "num_sink_tokens": s.sink, "dense_window_size": s.window}
    return {"sparse_cfg": cfg}
