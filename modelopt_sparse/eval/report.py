"""What a run leaves behind: the printed table, results.json, results.csv, results.png."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from .perplexity import SettingResult

CSV_FIELDS = (
    "pattern", "sparsity_n", "sparsity_m", "sink", "window", "ppl", "delta_ppl_pct",
    "kept_fraction", "dropped_mass", "tokens_per_s", "windows", "predicted_tokens", "nll", "seconds",
)


def _dense_ppl(results: list[SettingResult]) -> float | None:
    return next((r.ppl for r in results if r.setting.dense), None)


def result_record(result: SettingResult, dense_ppl: float | None, per_head: bool = True) -> dict:
    s = result.setting
    delta = 100.0 * (result.ppl / dense_ppl - 1.0) if dense_ppl else None
    record = {
        "label": s.label,
        "pattern": s.pattern,
        "sparsity_n": s.n,
        "sparsity_m": s.m if not s.dense else None,
        "sink": s.sink if not s.dense else None,
        "window": s.window if not s.dense else None,
        "ppl": result.ppl,
        "delta_ppl_pct": 0.0 if s.dense else delta,
        "kept_fraction": result.kept_fraction,
        "dropped_mass": result.dropped_mass,
        "tokens_per_s": result.tokens_per_s,
        "tokens_per_s_with_stats": result.timed_with_stats,
        "windows": result.windows,
        "stats_windows": result.stats_windows,
        "predicted_tokens": result.predicted_tokens,
        "nll": result.nll,
        "seconds": result.seconds,
        # Summed NLL of each window (seq_len - 1 predictions): Δppl per window, for error bars.
        "window_nll": result.window_nll,
        "per_layer": [
            {k: row[k] for k in ("module", "layer", "kept_fraction", "dropped_mass")} for row in result.per_layer
        ],
    }
    if per_head:
        record["per_head"] = [
            {k: row[k] for k in ("module", "layer", "head", "kept_fraction", "dropped_mass")}
            for row in result.per_head
        ]
    return record


def _fmt(value, spec: str, empty: str = "-") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return empty
    return format(value, spec)


def format_table(results: list[SettingResult]) -> str:
    """The summary table printed at the end of a run."""
    dense = _dense_ppl(results)
    header = ("pattern", "sink", "window", "ppl", "Δppl", "kept", "dropped mass", "tokens/s")
    rows = []
    for r in results:
        rec = result_record(r, dense, per_head=False)
        rows.append((
            rec["pattern"],
            _fmt(rec["sink"], "d"),
            _fmt(rec["window"], "d"),
            _fmt(rec["ppl"], ".3f"),
            "-" if r.setting.dense else _fmt(rec["delta_ppl_pct"], "+.2f") + ("%" if dense else ""),
            _fmt(rec["kept_fraction"], ".3f"),
            _fmt(rec["dropped_mass"], ".4f"),
            _fmt(rec["tokens_per_s"], ",.0f") + ("*" if r.timed_with_stats else " "),
        ))
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]

    def align(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([align(header), align(["-" * w for w in widths]), *(align(row) for row in rows)])


def table_notes(results: list[SettingResult]) -> str:
    """The legend printed under the table."""
    n = results[0].windows if results else 0
    n_stats = results[0].stats_windows if results else 0
    stats_from = "all windows" if n_stats == n else f"the first {n_stats} of {n} windows (--stats-windows)"
    notes = (
        "ppl: perplexity over the same windows for every row; Δppl: change vs dense. "
        "kept: share of the causally allowed attention scores that enter the softmax (sinks and "
        "window included); dropped mass: mean softmax probability that dense attention would put on "
        f"the dropped keys, over all query rows, heads and layers; both from {stats_from}. "
        "tokens/s: whole-model forward passes, first window left out (warm-up)"
    )
    if any(r.timed_with_stats for r in results):
        notes += "; * = measured with statistics on (slower): no window ran without them"
    return notes + "."


def results_document(meta: dict, results: list[SettingResult]) -> dict:
    """The content of results.json: the run's settings and one record per configuration."""
    dense = _dense_ppl(results)
    return {"meta": meta, "results": [result_record(r, dense) for r in results]}


def write_json(path: Path, doc: dict) -> None:
    path.write_text(json.dumps(doc, indent=2) + "\n")


def write_csv(path: Path, results: list[SettingResult]) -> None:
    dense = _dense_ppl(results)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in results:
            writer.writerow(result_record(r, dense, per_head=False))


def write_plot(path: Path, results: list[SettingResult], title: str) -> str | None:
    """Write the PNG; returns why it was skipped, or None when written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'modelopt-sparse[eval]')"

    dense = _dense_ppl(results)
    sparse = [r for r in results if not r.setting.dense]
    fig, (ax_ppl, ax_layer) = plt.subplots(1, 2, figsize=(13, 5.2))
    labels = [r.setting.label.replace(" sink=", "\ns=").replace(" window=", " w=") for r in results]
    colors = ["0.55" if r.setting.dense else f"C{i % 10}" for i, r in enumerate(results)]
    bars = ax_ppl.bar(range(len(results)), [r.ppl for r in results], color=colors)
    if dense is not None:
        for bar, r in zip(bars, results):
            if not r.setting.dense:
                top = (bar.get_x() + bar.get_width() / 2, bar.get_height())
                ax_ppl.annotate(f"{100 * (r.ppl / dense - 1):+.2f}%", top, ha="center", va="bottom", fontsize=7,
                                xytext=(0, 2), textcoords="offset points")
    if dense is not None:
        ax_ppl.axhline(dense, color="0.3", linestyle="--", linewidth=1, label=f"dense {dense:.3f}")
        ax_ppl.legend(loc="best")
        # Differences are often small: zoom the axis around the values instead of from 0.
        values = [r.ppl for r in results]
        low, high = min(values), max(values)
        pad = max(0.05 * (high - low), 0.002 * high)
        ax_ppl.set_ylim(low - 4 * pad, high + 4 * pad)  # headroom for the Δ labels
    ax_ppl.set_xticks(range(len(results)), labels, rotation=45, ha="right", fontsize=8)
    ax_ppl.set_ylabel("perplexity")
    ax_ppl.set_title("perplexity per configuration")

    for i, r in enumerate(sparse):
        layers = [row["layer"] for row in r.per_layer]
        ax_layer.plot(layers, [row["dropped_mass"] for row in r.per_layer], marker=".",
                      color=colors[results.index(r)], label=r.setting.label)
    ax_layer.set_xlabel("layer")
    ax_layer.set_ylabel("mean dropped softmax mass")
    ax_layer.set_title("dropped softmax mass per layer")
    if sparse:
        ax_layer.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# ---------------------------------------------------------------------------------------
# Several --seq-len values: the change against dense as a function of context length
# ---------------------------------------------------------------------------------------
_LENGTH_KEYS = ("label", "pattern", "sink", "window", "ppl", "delta_ppl_pct", "kept_fraction", "dropped_mass")


def length_sweep_document(docs: list[dict]) -> dict:
    """lengths.json: one entry per length with the summary fields of each configuration.

    ``docs`` are the results.json documents of the lengths, in run order. The meta of the
    first is kept, less what differs per length (those fields are in each entry).
    """
    per_length = ("seq_len", "windows", "windows_available", "tokens_per_setting",
                  "predicted_tokens_per_setting", "stats_windows", "elapsed_s")
    meta = {k: v for k, v in docs[0]["meta"].items() if k not in per_length}
    meta["seq_lens"] = [d["meta"]["seq_len"] for d in docs]
    meta["elapsed_s"] = docs[-1]["meta"]["elapsed_s"]
    return {
        "meta": meta,
        "lengths": [
            {
                "seq_len": d["meta"]["seq_len"],
                "windows": d["meta"]["windows"],
                "predicted_tokens_per_setting": d["meta"]["predicted_tokens_per_setting"],
                "results": [{k: r[k] for k in _LENGTH_KEYS} for r in d["results"]],
            }
            for d in docs
        ],
    }


def write_length_plot(path: Path, summary: dict, title: str) -> str | None:
    """Δppl against context length, one line per sparse configuration; returns why it was
    skipped, or None when written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'modelopt-sparse[eval]')"

    lengths = [entry["seq_len"] for entry in summary["lengths"]]
    rows = [r for r in summary["lengths"][0]["results"] if r["pattern"] != "dense"]
    # A sweep can have 19 configurations: colour by pattern, line and marker by (sink, window).
    patterns = list(dict.fromkeys(r["pattern"] for r in rows))
    dense_parts = list(dict.fromkeys((r["sink"], r["window"]) for r in rows))
    styles, markers = ["-", "--", ":", "-."], ["o", "s", "^", "v", "D", "x", "P", "*"]
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for row in rows:
        deltas = []
        for entry in summary["lengths"]:
            match = next((r for r in entry["results"] if r["label"] == row["label"]), None)
            deltas.append(float("nan") if match is None else match["delta_ppl_pct"])
        part = dense_parts.index((row["sink"], row["window"]))
        ax.plot(lengths, deltas, color=f"C{patterns.index(row['pattern']) % 10}", linestyle=styles[part % 4],
                marker=markers[part % len(markers)], label=row["label"])
    ax.axhline(0.0, color="0.3", linestyle="--", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.set_xlabel("context length (tokens per window)")
    ax.set_ylabel("Δppl vs dense (%)")
    ax.set_title("perplexity cost of sparse attention against context length")
    if rows:
        ax.legend(fontsize=7, ncol=2 if len(rows) > 8 else 1)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
