"""The model benchmark's verdicts and output: ratios to SDPA, target lines, tables, chart.

Every ratio is ours over SDPA on the same case, setting and mode. Times (ms, µs) give
ratios where lower is faster; tokens/s gives ratios where higher is faster. The chart
turns all of them into one direction: speed relative to SDPA (SDPA = 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..report import format_table
from .cases import CASES, MODELS

GPU_TARGET = "n/a (GPU target)"


def _key(row: dict) -> tuple:
    return row["case"], row["setting"], row["mode"]


def sdpa_rows(rows: list[dict]) -> dict[tuple, dict]:
    return {_key(r): r for r in rows if r["impl"] == "sdpa" and r["status"] == "ok"}


def metric(row: dict) -> tuple[str, float | None]:
    """The number a row is judged by, and its unit."""
    if row["kind"] == "generate":
        return "tok/s", row.get("tokens_per_s")
    if row["kind"] == "host":
        return "µs", row.get("us_per_call")
    return "ms", row.get("ms")


def ratio(row: dict, sdpa: dict | None) -> float | None:
    """ours / SDPA in the row's own unit (time or tokens/s). Rows timed in paired rounds
    (generate, eager and static-compiled; the compiled and CUDA-graph forwards; the host
    case) give the
    median of their per-round ratios instead (drift cancels in each pair);
    :func:`ratio_of_medians` is the plain quotient."""
    plain = ratio_of_medians(row, sdpa)
    if plain is None:
        return None
    paired = row.get("paired_ratio_vs_sdpa")
    return plain if paired is None else paired


def ratio_of_medians(row: dict, sdpa: dict | None) -> float | None:
    if sdpa is None or row["status"] != "ok" or row["impl"] == "sdpa":
        return None
    _, mine = metric(row)
    _, theirs = metric(sdpa)
    if not mine or not theirs:
        return None
    return mine / theirs


def speedup(row: dict, sdpa: dict | None) -> float | None:
    """Speed relative to SDPA, > 1 when ours is faster."""
    r = ratio(row, sdpa)
    if r is None:
        return None
    return r if row["kind"] == "generate" else 1.0 / r


def annotate(rows: list[dict]) -> None:
    """Add to each of our rows its ratio to SDPA and how close its output is to SDPA's:
    the last position's logits (forward cases) or the generated tokens (generate)."""
    ref = sdpa_rows(rows)
    for row in rows:
        sdpa = ref.get(_key(row))
        row["ratio_vs_sdpa"] = ratio(row, sdpa)
        if row.get("paired_ratio_vs_sdpa") is not None:
            row["ratio_of_medians_vs_sdpa"] = ratio_of_medians(row, sdpa)
        if sdpa is None or row["impl"] == "sdpa" or row["status"] != "ok":
            continue
        mine, theirs = row.get("_last_logits"), sdpa.get("_last_logits")
        if mine is not None and theirs is not None:
            row["logits_vs_sdpa_max_abs"] = float((mine - theirs).abs().max())
        mine, theirs = row.get("_tokens"), sdpa.get("_tokens")
        if mine is not None and theirs is not None:
            pairs = [(a, b) for seq_a, seq_b in zip(mine, theirs) for a, b in zip(seq_a, seq_b)]
            row["tokens_equal"] = mine == theirs
            row["token_match_fraction"] = sum(a == b for a, b in pairs) / max(1, len(pairs))
            firsts = [next((i for i, (a, b) in enumerate(zip(sa, sb)) if a != b), None)
                      for sa, sb in zip(mine, theirs)]
            row["first_token_mismatch"] = min((i for i in firsts if i is not None), default=None)


def public(row: dict) -> dict:
    """The row as saved: without the tensors and token lists kept for comparisons."""
    return {k: v for k, v in row.items() if not k.startswith("_")}


@dataclass(frozen=True)
class TargetLine:
    case: str
    setting: int  # index into the case's settings
    mode: str | None  # None: the case's mode
    impl: str
    op: str  # "<=" (a time ratio) or ">=" (a tokens/s ratio)
    target: float
    what: str  # label after the model and setting

    def label(self, tiny: bool) -> str:
        spec = CASES[self.case]
        setting = spec.settings(tiny)[self.setting]
        if spec.kind == "host":
            return f"host µs/call mts.attention {self.impl}/SDPA, {self.what}"
        name = {"smollm2": "SmolLM2", "llama8b": "Llama-8B"}[spec.model] + (" (tiny)" if tiny else "")
        if spec.kind == "generate":
            return f"{name} generate b{setting.batch} {self.what} tok/s {self.impl}/SDPA"
        return f"{name} {setting.label} {self.what} {self.impl}/SDPA"


TARGET_LINES: tuple[TargetLine, ...] = (
    TargetLine("smollm2-eager", 0, None, "dense", "<=", 1.10, "eager"),
    TargetLine("smollm2-compiled", 0, None, "dense", "<=", 1.10, "compiled"),
    TargetLine("smollm2-cudagraphs", 0, None, "dense", "<=", 1.05, "CUDA graphs"),
    TargetLine("smollm2-eager", 0, None, "2:4", "<=", 1.15, "eager"),
    TargetLine("smollm2-compiled", 0, None, "2:4", "<=", 1.15, "compiled"),
    TargetLine("llama8b", 1, None, "dense", "<=", 0.95, "eager"),
    TargetLine("generate-eager", 0, None, "dense", ">=", 0.95, "eager"),
    TargetLine("generate-eager", 1, None, "dense", ">=", 0.95, "eager"),
    TargetLine("generate-static", 0, None, "dense", ">=", 0.95, "static"),
    TargetLine("generate-static", 1, None, "dense", ">=", 0.95, "static"),
    TargetLine("host", 0, "no_grad", "dense", "<=", 1.5, "no_grad"),
    TargetLine("host", 0, "autograd", "dense", "<=", 1.5, "autograd"),
)


def summary(rows: list[dict], cases: list[str], tiny: bool, gpu: bool) -> list[dict]:
    """Each target line with its value and verdict. On a CPU there is no verdict (the
    targets are H200 targets); a line of a case not in ``cases`` is "not run"."""
    by_key = {(r["case"], r["setting"], r["mode"], r["impl"]): r for r in rows}
    out = []
    for t in TARGET_LINES:
        spec = CASES[t.case]
        setting = spec.settings(tiny)[t.setting].label
        mode = t.mode or spec.mode
        mine = by_key.get((t.case, setting, mode, t.impl))
        theirs = by_key.get((t.case, setting, mode, "sdpa"))
        value = ratio(mine, theirs if theirs and theirs["status"] == "ok" else None) if mine else None
        if t.case not in cases:
            status, why = "not run", f"--cases {t.case}"
        elif value is None:
            failed = [r for r in (mine, theirs) if r is not None and r["status"] != "ok"]
            status, why = "n/a", (failed[0]["reason"] if failed else "not measured")
        elif not gpu:
            status, why = GPU_TARGET, None
        else:
            ok = value <= t.target if t.op == "<=" else value >= t.target
            status, why = ("PASS" if ok else "MISS"), None
        out.append({"label": t.label(tiny), "case": t.case, "setting": setting, "mode": mode, "impl": t.impl,
                     "value": value, "op": t.op, "target": t.target, "status": status, "why": why})
    return out


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    if unit == "tok/s":
        return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"
    return f"{value:.3f}" if value < 100 else f"{value:.1f}"


def _grid(rows: list[dict], impls: tuple[str, ...]):
    """(case, setting, mode) -> {impl: row}, in run order."""
    grid: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        grid.setdefault(_key(r), {})[r["impl"]] = r
    return grid


def results_table(rows: list[dict], impls: tuple[str, ...], markdown: bool = False) -> str:
    """One line per (case, setting, mode): each implementation's number and ours/SDPA."""
    ours = [i for i in impls if i != "sdpa"]
    header = ["case", "setting", "mode", "unit", *impls] + [f"{i}/SDPA" for i in ours]
    body = []
    for (case, setting, mode), cells in _grid(rows, impls).items():
        unit, _ = metric(next(iter(cells.values())))
        line = [case, setting, mode, unit]
        for impl in impls:
            r = cells.get(impl)
            if r is None:
                line.append("-")
            elif r["status"] == "ok":
                line.append(_fmt(metric(r)[1], unit))
            else:
                line.append(r["status"] if r["status"] == "skipped" else "n/a")
        line += [f"{cells[i]['ratio_vs_sdpa']:.2f}" if cells.get(i, {}).get("ratio_vs_sdpa") is not None else "-"
                 for i in ours]
        body.append(line)
    if not markdown:
        return format_table(header, body, left=(0, 1, 2, 3))
    return _markdown(header, body)


def _markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in body]
    return "\n".join(lines)


def summary_table(lines: list[dict], markdown: bool = False) -> str:
    header = ["target line", "value", "target", "status"]
    body = []
    for s in lines:
        status = s["status"] + (f" ({s['why']})" if s["why"] and s["status"] in ("n/a", "not run") else "")
        if len(status) > 90:
            status = status[:87] + "..."
        body.append([s["label"], f"{s['value']:.2f}" if s["value"] is not None else "-",
                     f"{s['op']}{s['target']:.2f}", status])
    if markdown:
        return _markdown(header, body)
    return format_table(header, body, left=(0, 3))


def markdown_report(doc: dict) -> str:
    """The table for docs/performance.md: where and what ran, every result, the target lines."""
    env, settings = doc["env"], doc["settings"]
    where = env.get("gpu") or f"CPU ({env.get('cpu')})"
    head = (f"{where}, torch {env.get('torch')}, triton {env.get('triton')}, transformers "
            f"{env.get('transformers')}, commit {(env.get('git_commit') or 'unknown')[:12]}; "
            f"{settings['dtype']}, random weights, warm-up {settings['warmup']}, median of {settings['reps']} "
            f"(generate: {settings['gen_reps']} calls), MODELOPT_SPARSE_AUTOTUNE={settings.get('autotune')}.")
    models = "; ".join(f"{key}: {m['label']}" for key, m in MODELS.items())
    parts = [head, "", f"Models: {models}. ours/SDPA: lower is faster for ms and µs, higher for tok/s; generate (eager and static), the compiled and CUDA-graph forwards and the host case: the median of the per-round ratios (implementations side by side, rounds in rotating order), not the ratio of the medians shown.", "",
             results_table(doc["rows"], tuple(settings["impls"]), markdown=True), "",
             summary_table(doc["summary"], markdown=True)]
    return "\n".join(parts) + "\n"


def save_plot(rows: list[dict], impls: tuple[str, ...], path: Path, title: str) -> str | None:
    """Horizontal bars: each of our rows' speed relative to SDPA. Returns why it was skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed; skipping the plot"
    ref = sdpa_rows(rows)
    grid = _grid(rows, impls)
    labels, bars = [], []
    ours = [i for i in impls if i != "sdpa"]
    for key, cells in grid.items():
        values = [(name, speedup(cells[name], ref.get(key)) if name in cells else None) for name in ours]
        if all(v is None for _, v in values):
            continue
        labels.append(f"{key[0]} {key[1]} ({key[2]})")
        bars.append(values)
    if not bars:
        return "no ratio to plot (nothing of ours and SDPA both ran); skipping the plot"
    names = ours
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(labels) * max(1, len(names)) + 1.5))
    height = 0.8 / len(names)
    for j, name in enumerate(names):
        ys = [i + (j - (len(names) - 1) / 2) * height for i in range(len(labels))]
        xs = [dict(values).get(name) for values in bars]
        ax.barh(ys, [x or 0.0 for x in xs], height, color=f"C{j}", label=f"ours {name}")
        for y, x in zip(ys, xs):
            ax.text((x or 0.0) + 0.01, y, "n/a" if x is None else f"{x:.2f}", va="center", fontsize=7)
    largest = max((x for values in bars for _, x in values if x is not None), default=1.0)
    ax.set_xlim(0, max(1.15, largest * 1.15))  # room for the value labels right of the bars
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("speed relative to SDPA (SDPA = 1, higher is faster)")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
