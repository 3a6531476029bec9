"""Sparsity statistics of a sparsified model: :func:`collect_stats`.

The contract with the plugin layer: every converted attention module carries an attribute
``_mts_stats``. While it holds a list, the attention function runs the kernel with
``return_stats=True`` and appends the kernel's per-head statistics dict (tensors of shape
``[Hq]``: ``allowed``, ``kept``, ``rows``, ``dropped_mass``; see
:func:`modelopt_sparse.kernels.attention`) to that list; while it is ``None``, the kernel
runs without statistics. Nothing else of the plugin layer is used here.

Example::

    with mts.collect_stats(model) as stats:
        model(input_ids)
    print(stats.table())            # one row per layer
    stats.per_head()                # one dict per (layer, head)
    stats.total()["dropped_mass"]   # mean dropped softmax mass of all rows, heads, layers
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterator

import torch

__all__ = ["SparseStats", "collect_stats", "stats_modules"]

STATS_ATTR = "_mts_stats"
_COUNTS = ("allowed", "kept", "rows", "dropped_mass")
_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def stats_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """``(name, module)`` of every module that takes part in the statistics contract."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return [(name, m) for name, m in model.named_modules() if hasattr(m, STATS_ATTR)]


def _layer_index(name: str, position: int) -> int:
    # "model.layers.12.self_attn" -> 12; a name without a number keeps its module order.
    found = _LAYER_INDEX.findall(name)
    return int(found[-1]) if found else position


class SparseStats:
    """Statistics gathered by :func:`collect_stats`, readable during and after the block.

    All ratios are computed from summed counts, so every forward pass (and every token)
    weighs by its size:

    * ``kept_fraction = kept / allowed``: the share of causally allowed scores that entered
      the softmax (dense sinks and window included);
    * ``dropped_mass = sum over rows of (1 - Z_kept / Z_allowed) / rows``: the mean softmax
      probability mass that dense attention would have put on the dropped keys.
    """

    def __init__(self, names: list[str]):
        self.names = list(names)
        # The plugin appends to these very lists, so they must stay the same objects.
        self._records: dict[str, list[dict]] = {name: [] for name in self.names}
        self._folded: dict[str, int] = {name: 0 for name in self.names}
        self._sums: dict[str, dict[str, torch.Tensor] | None] = {name: None for name in self.names}

    def _fold(self) -> None:
        """Add the records appended since the last read to the per-module CPU sums.

        Records are kept (they are a few ``[Hq]`` tensors per call) so that an enclosing
        :func:`collect_stats` block can receive them on exit.
        """
        for name, records in self._records.items():
            start = self._folded[name]
            if start == len(records):
                continue
            total = self._sums[name]
            for rec in records[start:]:
                missing = [k for k in _COUNTS if k not in rec]
                if missing:
                    raise ValueError(f"{name}: statistics record lacks {missing}; got keys {sorted(rec)}")
                if total is None:
                    total = {k: torch.zeros(rec[k].shape, dtype=_sum_dtype(k)) for k in _COUNTS}
                for k in _COUNTS:
                    total[k] += rec[k].detach().to("cpu", _sum_dtype(k))
            self._sums[name], self._folded[name] = total, len(records)

    def reset(self) -> None:
        """Forget everything collected so far (collection goes on inside the block)."""
        for name in self.names:
            self._records[name].clear()
            self._folded[name] = 0
            self._sums[name] = None

    @property
    def has_data(self) -> bool:
        """True once at least one attention call has reported statistics."""
        self._fold()
        return any(s is not None for s in self._sums.values())

    def sums(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per module: the raw ``[Hq]`` sums of ``allowed``, ``kept``, ``rows``, ``dropped_mass``.

        Modules that have not been called are left out.
        """
        self._fold()
        return {n: {k: v.clone() for k, v in s.items()} for n, s in self._sums.items() if s is not None}

    def per_head(self) -> list[dict]:
        """One row per (module, head): counts, ``kept_fraction`` and ``dropped_mass``."""
        rows = []
        for position, (name, s) in enumerate(self.sums().items()):
            for head in range(s["allowed"].shape[0]):
                rows.append(_row(
                    {"module": name, "layer": _layer_index(name, position), "head": head},
                    *(s[k][head] for k in _COUNTS),
                ))
        return rows

    def per_layer(self) -> list[dict]:
        """One row per module, heads summed."""
        return [
            _row({"module": name, "layer": _layer_index(name, position)}, *(s[k].sum() for k in _COUNTS))
            for position, (name, s) in enumerate(self.sums().items())
        ]

    def total(self) -> dict:
        """One row for the whole model (all modules and heads)."""
        sums = self.sums().values()
        totals = [sum((s[k].sum() for s in sums), torch.zeros((), dtype=_sum_dtype(k))) for k in _COUNTS]
        return _row({"module": "(all)"}, *totals)

    def table(self, by: str = "layer") -> str:
        """A plain-text table ``by="layer"`` or ``by="head"``, with a total line."""
        if by == "layer":
            rows, keys = self.per_layer(), ("module",)
        elif by == "head":
            rows, keys = self.per_head(), ("module", "head")
        else:
            raise ValueError(f"by must be 'layer' or 'head', got {by!r}")
        if not rows:
            return "no attention call has reported statistics yet"
        total = self.total()
        cells = [[str(r[k]) for k in keys] + [f"{r['kept_fraction']:.4f}", f"{r['dropped_mass']:.5f}"] for r in rows]
        ratios = [f"{total['kept_fraction']:.4f}", f"{total['dropped_mass']:.5f}"]
        cells.append(["(all)"] + [""] * (len(keys) - 1) + ratios)
        header = list(keys) + ["kept_fraction", "dropped_mass"]
        widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]

        def fmt(cs):
            return "  ".join(c.rjust(w) if i >= len(keys) else c.ljust(w) for i, (c, w) in enumerate(zip(cs, widths)))

        lines = [fmt(header), fmt(["-" * w for w in widths])] + [fmt(c) for c in cells[:-1]]
        lines += [fmt(["-" * w for w in widths]), fmt(cells[-1])]
        return "\n".join(lines)

    def __repr__(self) -> str:
        t = self.total()
        return (f"SparseStats({len(self.names)} modules, kept_fraction={t['kept_fraction']:.4f}, "
                f"dropped_mass={t['dropped_mass']:.5f})")


def _sum_dtype(key: str) -> torch.dtype:
    return torch.float64 if key == "dropped_mass" else torch.int64


def _row(label: dict, allowed, kept, rows, dropped) -> dict:
    allowed, kept, rows, dropped = int(allowed), int(kept), int(rows), float(dropped)
    return {
        **label,
        "allowed": allowed,
        "kept": kept,
        "rows": rows,
        # nan, not 0 or 1, when nothing was measured: "no data" must not read as "dense".
        "kept_fraction": kept / allowed if allowed else float("nan"),
        "dropped_mass": dropped / rows if rows else float("nan"),
    }


@contextmanager
def collect_stats(model: torch.nn.Module) -> Iterator[SparseStats]:
    """Collect N:M sparsity statistics of every converted attention module of ``model``.

    Inside the block, each attention call of a module converted by
    :func:`modelopt_sparse.sparsify` also computes per-head statistics (at some cost: the
    kernel runs its statistics mode). On exit the modules go back to what they had before,
    so blocks may nest; the yielded :class:`SparseStats` stays readable.

    Raises:
        ValueError: ``model`` has no converted attention module.
    """
    modules = stats_modules(model)
    if not modules:
        raise ValueError(
            f"{type(model).__name__} has no sparse attention module to collect statistics from: "
            "call modelopt_sparse.sparsify(model, config) first"
        )
    stats = SparseStats([name for name, _ in modules])
    previous = [getattr(m, STATS_ATTR) for _, m in modules]
    try:
        for name, module in modules:
            setattr(module, STATS_ATTR, stats._records[name])
        yield stats
    finally:
        for (name, module), old in zip(modules, previous):
            if isinstance(old, list):
                # An outer block is collecting too: hand it what this block saw.
                old.extend(stats._records[name])
            setattr(module, STATS_ATTR, old)
