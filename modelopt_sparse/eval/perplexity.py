"""Perplexity of one model under several sparse-attention settings, on the same windows."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from ..stats import collect_stats
from .errors import EvalError
from .sweep import Setting


@dataclass
class SettingResult:
    setting: Setting
    nll: float  # summed over all predicted tokens, natural log
    predicted_tokens: int
    windows: int
    seconds: float  # forward time of all windows
    timed_tokens: int  # tokens behind tokens_per_s (see evaluate)
    timed_seconds: float
    timed_with_stats: bool  # no window ran without statistics, so the speed includes them
    stats_windows: int  # windows behind kept_fraction and dropped_mass
    kept_fraction: float
    dropped_mass: float
    window_nll: list[float] = field(default_factory=list)  # per window, for paired comparisons
    per_layer: list[dict] = field(default_factory=list)
    per_head: list[dict] = field(default_factory=list)

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.predicted_tokens)

    @property
    def tokens_per_s(self) -> float:
        return self.timed_tokens / self.timed_seconds if self.timed_seconds > 0 else float("nan")


def apply_setting(model: torch.nn.Module, setting: Setting, backend: str) -> None:
    """(Re)convert every attention module of ``model`` to ``setting``."""
    import modelopt_sparse as mts

    try:
        mts.sparsify(model, setting.sparse_cfg(backend))
    except (ValueError, NotImplementedError) as err:
        raise EvalError(f"{type(model).__name__}: cannot apply the configuration {setting.label!r}: {err}") from None


def window_nll(model: torch.nn.Module, ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token negative log-likelihood of a ``[batch, seq]`` block, and its count.

    The loss is taken in float32 whatever the model's dtype, like transformers' own loss.
    """
    logits = model(input_ids=ids, use_cache=False).logits
    pred = logits[:, :-1].float().flatten(0, 1)
    target = ids[:, 1:].flatten()
    nll = torch.nn.functional.cross_entropy(pred, target, reduction="sum")
    return float(nll), target.numel()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# no_grad rather than inference_mode: the kernel API caches its metadata checks by tensor
# version, which inference tensors lack, so under inference_mode every layer re-checks.
@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    windows: torch.Tensor,
    settings: list[Setting],
    backend: str,
    stats_windows: int | None = None,
    progress=None,
    on_result=None,
) -> list[SettingResult]:
    """Evaluate every setting on every row of ``windows`` (``[n, seq_len]``).

    Each window is one forward pass (batch 1) through the converted model. Statistics
    (kept fraction, dropped mass) come from the first ``stats_windows`` windows (all when
    None): the kernel's statistics mode does extra work, so the remaining windows run
    without it and give the speed. ``tokens_per_s`` leaves out the first window, which
    pays one-time costs (allocator growth, Triton compilation and autotuning), and prefers
    windows without statistics; ``timed_with_stats`` says when there were none.

    Args:
        progress: a tqdm-like object (``update``, ``set_description``) or None.
        on_result: called with each :class:`SettingResult` as soon as it is done.
    """
    device = next(model.parameters()).device
    windows = windows.to(device)
    n = windows.shape[0]
    n_stats = n if stats_windows is None else max(1, min(n, stats_windows))
    results = []
    for setting in settings:
        apply_setting(model, setting, backend)
        if progress is not None:
            progress.set_description(setting.label)
        nll, count, times, per_window = 0.0, 0, [], []

        def run(i: int) -> None:
            nonlocal nll, count
            ids = windows[i : i + 1]
            _sync(device)
            start = time.perf_counter()
            w_nll, w_count = window_nll(model, ids)
            _sync(device)
            times.append(time.perf_counter() - start)
            if not math.isfinite(w_nll):
                raise EvalError(f"{setting.label}: the loss of window {i} is {w_nll}; the model "
                                "overflows in this dtype (try --dtype float32)")
            nll, count = nll + w_nll, count + w_count
            per_window.append(w_nll)
            if progress is not None:
                progress.update(1)

        with collect_stats(model) as stats:
            for i in range(n_stats):
                run(i)
        for i in range(n_stats, n):
            run(i)
        if n_stats < n:
            timed = list(range(max(1, n_stats), n))
        else:
            timed = list(range(1, n)) or [0]
        total = stats.total()
        result = SettingResult(
            setting=setting,
            nll=nll,
            predicted_tokens=count,
            windows=n,
            seconds=sum(times),
            timed_tokens=len(timed) * windows.shape[1],
            timed_seconds=sum(times[i] for i in timed),
            timed_with_stats=n_stats == n,
            stats_windows=n_stats,
            kept_fraction=total["kept_fraction"],
            dropped_mass=total["dropped_mass"],
            window_nll=per_window,
            per_layer=stats.per_layer(),
            per_head=stats.per_head(),
        )
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, progress=None) -> float:
    """Perplexity of ``model`` as it is converted now, over every row of ``windows``."""
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for i in range(windows.shape[0]):
        w_nll, w_count = window_nll(model, windows[i : i + 1].to(device))
        if not math.isfinite(w_nll):
            raise EvalError(f"the loss of window {i} is {w_nll}; the model overflows in this dtype "
                            "(try --dtype float32)")
        nll, count = nll + w_nll, count + w_count
        if progress is not None:
            progress.update(1)
    return math.exp(nll / count)
