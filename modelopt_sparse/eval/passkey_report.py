"""What a passkey run leaves behind: the printed table, passkey.json, passkey.csv, passkey.png."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from .passkey import PasskeyResult, accuracy, accuracy_grid
from .sweep import Setting


def setting_record(setting: Setting, results: list[PasskeyResult], lengths: list[int], depths: list[int]) -> dict:
    return {
        "label": setting.label,
        "pattern": setting.pattern,
        "sparsity_n": setting.n,
        "sparsity_m": None if setting.dense else setting.m,
        "sink": None if setting.dense else setting.sink,
        "window": None if setting.dense else setting.window,
        "accuracy": accuracy(results),
        "accuracy_by_length": {str(n): accuracy(results, length=n) for n in lengths},
        "accuracy_by_depth": {str(d): accuracy(results, depth=d) for d in depths},
        # grid[i][j]: depth depths[i], length lengths[j]
        "grid": accuracy_grid(results, lengths, depths),
        "trials": [
            {
                "length": r.prompt.length,
                "depth": r.prompt.depth,
                "trial": r.prompt.trial,
                "key": r.prompt.key,
                "prompt_tokens": len(r.prompt.ids),
                "needle_start": r.prompt.needle_start,
                "filler_offset": r.prompt.filler_offset,
                "generated": r.generated,
                "answer": r.answer,
                "correct": r.correct,
            }
            for r in results
        ],
    }


def _pct(value: float) -> str:
    return "-" if math.isnan(value) else f"{100 * value:.0f}%"


def format_table(records: list[dict], lengths: list[int]) -> str:
    """One row per configuration: accuracy per context length (all depths) and overall."""
    header = ["pattern", "sink", "window", *(str(n) for n in lengths), "all"]
    rows = [[
        r["pattern"],
        "-" if r["sink"] is None else str(r["sink"]),
        "-" if r["window"] is None else str(r["window"]),
        *(_pct(r["accuracy_by_length"][str(n)]) for n in lengths),
        _pct(r["accuracy"]),
    ] for r in records]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]

    def align(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([align(header), align(["-" * w for w in widths]), *(align(row) for row in rows)])


def write_json(path: Path, doc: dict) -> None:
    path.write_text(json.dumps(doc, indent=2) + "\n")


def write_csv(path: Path, records: list[dict]) -> None:
    """One row per (configuration, length, depth) cell."""
    fields = ("pattern", "sink", "window", "length", "depth", "trials", "correct", "accuracy")
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in records:
            cells: dict[tuple[int, int], list[bool]] = {}
            for t in r["trials"]:
                cells.setdefault((t["length"], t["depth"]), []).append(t["correct"])
            for (length, depth), hits in cells.items():
                writer.writerow({"pattern": r["pattern"], "sink": r["sink"], "window": r["window"],
                                 "length": length, "depth": depth, "trials": len(hits), "correct": sum(hits),
                                 "accuracy": sum(hits) / len(hits)})


def write_heatmaps(path: Path, records: list[dict], lengths: list[int], depths: list[int], title: str) -> str | None:
    """One heat map (depth x length, accuracy) per configuration; returns why it was skipped,
    or None when written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'modelopt-sparse[eval]')"

    columns = min(4, len(records))
    rows = math.ceil(len(records) / columns)
    panel_width = 1.4 + 0.75 * len(lengths)
    panel_height = 0.9 + 0.35 * len(depths)
    fig, axes = plt.subplots(rows, columns, figsize=(panel_width * columns + 1.0, 1.0 + panel_height * rows),
                             squeeze=False, layout="constrained")
    image = None
    for index, (ax, record) in enumerate(zip(axes.flat, records)):
        image = ax.imshow(record["grid"], vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
        for i, row in enumerate(record["grid"]):
            for j, value in enumerate(row):
                ax.text(j, i, _pct(value), ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d}%" for d in depths], fontsize=7)
        ax.set_xlabel("context length (tokens)", fontsize=8)
        if index % columns == 0:
            ax.set_ylabel("key depth", fontsize=8)
        ax.set_title(f"{record['label']}: {_pct(record['accuracy'])}", fontsize=8)
    for ax in list(axes.flat)[len(records):]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="exact-match accuracy")
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
