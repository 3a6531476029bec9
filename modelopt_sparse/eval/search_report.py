"""What a search run leaves behind: the per-layer table, search.json, sparse_config.json, search.png."""

from __future__ import annotations

import json
import math
from pathlib import Path


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def format_layer_table(layers: list[dict], labels: list[str], rank_by: str) -> str:
    """One row per attention module: its sensitivity to each candidate and the choice."""
    score_name = "Δppl%" if rank_by == "ppl" else "mass"
    header = ["layer", "module"]
    for label in labels:
        header += [f"{label} {score_name}", f"{label} dropped"]
    header.append("chosen")
    rows = []
    for layer in layers:
        row = [str(layer["layer"]), layer["module"]]
        for label in labels:
            cand = layer["candidates"][label]
            score = cand["single_layer_delta_ppl_pct"] if rank_by == "ppl" else cand["dropped_mass"]
            row += [_fmt(score, "+.3f" if rank_by == "ppl" else ".4f"), _fmt(cand["dropped_mass"], ".4f")]
        row.append(layer["chosen"])
        rows.append(row)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def align(cells):
        return "  ".join(c.ljust(w) if i in (1, len(cells) - 1) else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([align(header), align(["-" * w for w in widths]), *(align(r) for r in rows)])


def write_json(path: Path, doc: dict) -> None:
    path.write_text(json.dumps(doc, indent=2) + "\n")


def write_plot(path: Path, doc: dict, title: str) -> str | None:
    """Sensitivity per layer and candidate (top) and the chosen pattern per layer (bottom);
    returns why it was skipped, or None when written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'modelopt-sparse[eval]')"

    layers = doc["layers"]
    labels = [c["pattern"] for c in doc["candidates"]]
    x = [layer["layer"] for layer in layers]
    rank_by = doc["meta"]["rank_by"]
    fig, (ax_score, ax_choice) = plt.subplots(2, 1, figsize=(max(7.0, 0.28 * len(layers) + 3), 7.5), sharex=True)
    for i, label in enumerate(labels):
        key = "single_layer_delta_ppl_pct" if rank_by == "ppl" else "dropped_mass"
        ax_score.plot(x, [layer["candidates"][label][key] for layer in layers], marker=".", color=f"C{i % 10}",
                      label=label)
    ax_score.set_ylabel("Δppl (%) with only this layer sparse" if rank_by == "ppl" else "dropped softmax mass")
    ax_score.set_title("sensitivity per layer (calibration split)")
    ax_score.legend(fontsize=7)

    categories = ["dense"] + labels
    colors = {"dense": "0.75", **{label: f"C{i % 10}" for i, label in enumerate(labels)}}
    heights = [categories.index(layer["chosen"]) for layer in layers]
    ax_choice.bar(x, [h + 0.5 for h in heights], bottom=-0.5, color=[colors[layer["chosen"]] for layer in layers],
                  width=0.8)
    ax_choice.set_yticks(range(len(categories)), categories)
    ax_choice.set_ylim(-0.6, len(categories) - 0.4)
    ax_choice.set_xlabel("layer")
    ax_choice.set_xticks(x if len(x) <= 40 else x[::2])
    result = doc["result"]
    ax_choice.set_title(
        f"chosen pattern per layer: {result['sparse_layers']} of {len(layers)} sparse\nheld-out Δppl "
        f"{result['delta_ppl_pct']:+.3f}% (budget +{doc['meta']['budget_pct']:g}%)", fontsize=10)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
