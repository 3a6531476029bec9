"""What a finetune run leaves behind: the printed report, finetune.json, finetune.png."""

from __future__ import annotations

import json
from pathlib import Path


def format_report(doc: dict) -> str:
    sparse, dense, summary = doc["runs"]["sparse"], doc["runs"]["dense"], doc["summary"]
    rows = [
        ("run", "held-out ppl before", "after"),
        (dense["label"], f"{dense['heldout_ppl_before']:.4f}", f"{dense['heldout_ppl_after']:.4f}"),
        (sparse["label"], f"{sparse['heldout_ppl_before']:.4f}", f"{sparse['heldout_ppl_after']:.4f}"),
        ("gap (sparse / dense - 1)", f"{summary['gap_before_pct']:+.3f}%", f"{summary['gap_after_pct']:+.3f}%"),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    closed = summary["gap_closed_fraction"]
    lines.append("")
    lines.append("gap closed by fine-tuning: " + ("n/a (no gap before training)" if closed is None
                                                   else f"{100 * closed:.1f}% of the gap before training"))
    corpus = doc["meta"].get("train_corpus")
    if corpus is not None:
        lines.append(f"training data ({corpus['name']}): {corpus['tokens']:,} tokens, {corpus['trained_tokens']:,} "
                     f"trained per run = {corpus['passes']:.2f} passes; result at the last step")
    lines.append(f"fine-tuned sparse weights evaluated with dense attention: "
                 f"{sparse['heldout_ppl_after_evaluated_dense']:.4f}")
    verdict = "matches" if sparse["restored_matches"] else "DOES NOT match"
    lines.append(f"checkpoint restored with mts.restore: held-out ppl {sparse['restored_heldout_ppl']:.4f} "
                 f"({verdict} the fine-tuned model)")
    return "\n".join(lines)


def write_json(path: Path, doc: dict) -> None:
    path.write_text(json.dumps(doc, indent=2) + "\n")


def _smooth(values: list[float], width: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= width:
            total -= values[i - width]
        out.append(total / min(i + 1, width))
    return out


def write_plot(path: Path, doc: dict, title: str) -> str | None:
    """Training loss of both runs, their held-out perplexity and the gap between them against
    steps; returns why it was skipped, or None when written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'modelopt-sparse[eval]')"

    runs = [doc["runs"]["dense"], doc["runs"]["sparse"]]
    colors = ["0.45", "C3"]
    fig, (ax_loss, ax_ppl, ax_gap) = plt.subplots(1, 3, figsize=(16, 4.8))
    width = max(1, len(runs[0]["train_loss"]) // 20)
    for run, color in zip(runs, colors):
        steps = range(1, len(run["train_loss"]) + 1)
        ax_loss.plot(steps, run["train_loss"], color=color, alpha=0.25, linewidth=0.8)
        ax_loss.plot(steps, _smooth(run["train_loss"], width), color=color, label=run["label"])
        curve = run["heldout_curve"]
        ax_ppl.plot([c["step"] for c in curve], [c["heldout_ppl"] for c in curve], marker="o", color=color,
                    label=f"{run['label']}: {curve[0]['heldout_ppl']:.3f} -> {curve[-1]['heldout_ppl']:.3f}")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss" + (f" (moving mean of {width})" if width > 1 else ""))
    ax_loss.set_title("training loss")
    ax_loss.legend(fontsize=8)
    ax_ppl.set_xlabel("step")
    ax_ppl.set_ylabel("held-out perplexity")
    ax_ppl.set_title("held-out perplexity")
    ax_ppl.legend(fontsize=8)

    s = doc["summary"]
    gap = s["gap_curve"]
    ax_gap.plot([g["step"] for g in gap], [g["gap_pct"] for g in gap], marker="o", color="C3",
                label="sparse / dense - 1")
    ax_gap.axhline(0.0, color="0.3", linestyle="--", linewidth=1)
    if s["gap_before_pct"] > 0:
        ax_gap.axhline(s["gap_before_pct"] / 2, color="C2", linestyle=":", linewidth=1, label="half the gap before")
    ax_gap.set_xlabel("step")
    ax_gap.set_ylabel("held-out gap to the dense control (%)")
    closed = "" if s["gap_closed_fraction"] is None else f", {100 * s['gap_closed_fraction']:.0f}% closed"
    ax_gap.set_title(f"gap {s['gap_before_pct']:+.2f}% -> {s['gap_after_pct']:+.2f}%{closed}")
    ax_gap.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
