"""``modelopt-sparse bench model`` on the CPU: the tiny smoke run end to end, the verdict
logic, and the refusals of bad options.

The smoke run proves the harness (every case gives numbers or a recorded reason, files are
written, the summary comes last); it says nothing about speed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math

import pytest
import torch

from modelopt_sparse import cli
from modelopt_sparse.bench.model import CASES, GROUPS, TARGET_LINES
from modelopt_sparse.bench.model.cases import Setting
from modelopt_sparse.bench.model.report import annotate, summary

CPU_SKIPPED = {"smollm2-cudagraphs", "smollm2-compiled", "generate-static"}


def _run(capsys, *argv):
    code = cli.main(["bench", "model", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny CPU run of every case (the compiled and CUDA-graph ones are skipped there)."""
    out_dir = tmp_path_factory.mktemp("bench_model")
    stdout, stderr = io.StringIO(), io.StringIO()
    # capsys is per test; this run serves several.
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = cli.main(["bench", "model", "--device", "cpu", "--cases", "all", "--reps", "1", "--warmup", "0",
                         "--host-calls", "20", "--out", str(out_dir)])
    return {"code": code, "out": stdout.getvalue(), "err": stderr.getvalue(), "dir": out_dir,
            "doc": json.loads((out_dir / "model_results.json").read_text())}


def test_tiny_cpu_run_has_every_case(tiny_run):
    assert tiny_run["code"] == 0, tiny_run["err"][-3000:]
    doc = tiny_run["doc"]
    assert doc["complete"] is True and doc["running"] is None
    assert list(doc["cases"]) == list(CASES)
    rows = doc["rows"]
    for name, spec in CASES.items():
        mine = [r for r in rows if r["case"] == name]
        # Every implementation on every setting (the host case: in both grad modes).
        assert len(mine) == 3 * len(spec.tiny) * (2 if name == "host" else 1), name
        assert {r["impl"] for r in mine} == {"sdpa", "dense", "2:4"}
        if name in CPU_SKIPPED:
            assert doc["cases"][name]["status"] == "skipped" and doc["cases"][name]["reason"]
            assert all(r["status"] == "skipped" and r["reason"] and r["ms"] is None for r in mine)
            continue
        assert doc["cases"][name]["status"] == "ok", doc["cases"][name]
        for r in mine:
            assert r["status"] == "ok", r
            assert math.isfinite(r["ms"]) and r["ms"] > 0
            assert r["elapsed_s"] >= 0
            if spec.kind == "generate":
                assert r["tokens_per_s"] == pytest.approx(r["batch"] * r["new_tokens"] / (r["ms"] / 1e3))
            if spec.kind == "host":
                assert r["us_per_call"] == pytest.approx(r["ms"] * 1e3) and r["calls"] == 20
            if r["impl"] != "sdpa":
                assert r["ratio_vs_sdpa"] > 0
    # Our dense path computes what SDPA computes (bf16 rounding apart), and generates the same
    # tokens; the comparison fields are there for every one of our rows.
    for r in rows:
        if r["status"] == "ok" and r["impl"] == "dense" and r["kind"] == "forward":
            assert r["logits_vs_sdpa_max_abs"] < 0.05, r
        if r["status"] == "ok" and r["impl"] != "sdpa" and r["kind"] == "generate":
            assert isinstance(r["tokens_equal"], bool) and 0 <= r["token_match_fraction"] <= 1
    # Tensors and token lists used for the comparisons stay out of the file.
    assert not any(key.startswith("_") for r in rows for key in r)
    env = doc["env"]
    for key in ("torch", "triton", "transformers", "gpu", "git_commit", "date"):
        assert key in env
    assert env["torch"] == torch.__version__ and env["gpu"] is None
    assert doc["settings"]["tiny"] is True and doc["settings"]["autotune"] is not None


def test_tiny_cpu_run_output(tiny_run):
    out, err = tiny_run["out"], tiny_run["err"]
    # One progress line per row, and a header per case.
    assert err.count("\n[") + err.startswith("[") == len(tiny_run["doc"]["rows"])
    assert all(f"-- {name}:" in err for name in CASES)
    # No verdicts on a CPU: the targets are H200 targets.
    assert "MISS" not in out and "PASS" not in out
    statuses = {s["status"] for s in tiny_run["doc"]["summary"]}
    assert statuses <= {"n/a (GPU target)", "n/a"} and "n/a (GPU target)" in statuses
    assert len(tiny_run["doc"]["summary"]) == len(TARGET_LINES)
    # The summary table comes last, its lines in TARGET_LINES order.
    lines = out.rstrip().splitlines()
    assert lines[-1].startswith("host µs/call mts.attention dense/SDPA, autograd")
    assert out.rindex("case ") < out.rindex("Summary") < out.rindex("target line")
    md = (tiny_run["dir"] / "model_table.md").read_text()
    assert "| case | setting | mode | unit | sdpa | dense | 2:4 | dense/SDPA | 2:4/SDPA |" in md
    assert "| target line | value | target | status |" in md
    if importlib.util.find_spec("matplotlib") is None:
        assert "skipping the plot" in out
    else:
        assert (tiny_run["dir"] / "model_speed.png").read_bytes()[:4] == b"\x89PNG"


def _row(case, setting, impl, status="ok", **fields):
    spec = CASES[case]
    return {"case": case, "setting": setting, "mode": fields.pop("mode", spec.mode), "impl": impl,
            "kind": spec.kind, "status": status, "reason": fields.pop("reason", None), **fields}


def test_verdicts_follow_the_direction_of_each_line():
    rows = [
        _row("smollm2-eager", "1x1024", "sdpa", ms=10.0), _row("smollm2-eager", "1x1024", "dense", ms=10.5),
        _row("smollm2-eager", "1x1024", "2:4", ms=12.0),
        _row("generate-eager", "1x512+128", "sdpa", tokens_per_s=100.0),
        _row("generate-eager", "1x512+128", "dense", tokens_per_s=90.0),
        _row("llama8b", "1x16384", "sdpa", status="error", reason="OOM"),
        _row("llama8b", "1x16384", "dense", ms=5.0),
    ]
    cases = ["smollm2-eager", "generate-eager", "llama8b"]
    lines = {s["label"]: s for s in summary(rows, cases, tiny=False, gpu=True)}
    assert lines["SmolLM2 1x1024 eager dense/SDPA"]["status"] == "PASS"  # 1.05 <= 1.10
    assert lines["SmolLM2 1x1024 eager 2:4/SDPA"]["status"] == "MISS"  # 1.20 > 1.15
    assert lines["SmolLM2 generate b1 eager tok/s dense/SDPA"]["status"] == "MISS"  # 0.90 < 0.95
    assert lines["SmolLM2 generate b1 eager tok/s dense/SDPA"]["value"] == pytest.approx(0.9)
    assert lines["Llama-8B 1x16384 eager dense/SDPA"]["status"] == "n/a"
    assert lines["Llama-8B 1x16384 eager dense/SDPA"]["why"] == "OOM"
    assert lines["SmolLM2 1x1024 compiled dense/SDPA"]["status"] == "not run"
    cpu = {s["label"]: s for s in summary(rows, cases, tiny=False, gpu=False)}
    assert cpu["SmolLM2 1x1024 eager 2:4/SDPA"]["status"] == "n/a (GPU target)"
    assert cpu["SmolLM2 1x1024 eager 2:4/SDPA"]["value"] == pytest.approx(1.2)


def test_report_of_a_gpu_like_run(tmp_path):
    """Rows a CPU run never produces (CUDA-graph and compiled numbers, errors, verdicts) go
    through every output: the summary, both tables, the markdown and the chart."""
    from modelopt_sparse.bench.model.report import (
        markdown_report, public, results_table, save_plot, summary_table)
    from modelopt_sparse.bench.model.runner import new_row

    rows = []
    for name, spec in CASES.items():
        for i, setting in enumerate(spec.full):
            for impl in ("sdpa", "dense", "2:4"):
                for mode in (("no_grad", "autograd") if spec.kind == "host" else (spec.mode,)):
                    row = new_row(spec, impl, setting, mode)
                    if name == "llama8b" and impl == "dense" and i == 1:
                        row.update(status="error", reason="OutOfMemoryError: CUDA out of memory", elapsed_s=1.0)
                    elif name == "generate-static" and impl == "dense" and i == 1:
                        row.update(reason="not run: --time-budget 540 s")
                    else:
                        ms = {"sdpa": 10.0, "dense": 10.4, "2:4": 12.0}[impl]
                        row.update(status="ok", ms=ms, elapsed_s=2.0, _last_logits=torch.zeros(setting.batch, 8))
                        if spec.kind == "generate":
                            row.update(tokens_per_s=1000.0 / ms, _tokens=[[1, 2]] * setting.batch)
                        if spec.kind == "host":
                            row.update(us_per_call=ms * 1e3)
                        if spec.compiles:
                            row.update(compile_s=40.0, fullgraph=impl == "sdpa", graph_breaks=0 if impl == "sdpa" else 30)
                    rows.append(row)
    annotate(rows)
    lines = summary(rows, list(CASES), tiny=False, gpu=True)
    assert {s["status"] for s in lines} >= {"PASS", "MISS", "n/a"}
    by_label = {s["label"]: s for s in lines}
    assert by_label["SmolLM2 1x1024 CUDA graphs dense/SDPA"]["status"] == "PASS"  # 1.04 <= 1.05
    assert by_label["SmolLM2 1x1024 eager 2:4/SDPA"]["status"] == "MISS"  # 1.2 > 1.15
    assert by_label["SmolLM2 generate b1 static tok/s dense/SDPA"]["status"] == "PASS"  # 0.96 >= 0.95
    assert by_label["Llama-8B 1x16384 eager dense/SDPA"]["why"].startswith("OutOfMemoryError")
    assert by_label["SmolLM2 generate b8 static tok/s dense/SDPA"]["why"] == "not run: --time-budget 540 s"
    doc = {"env": {"gpu": "NVIDIA H200", "torch": "2.11.0", "triton": "3.6.0", "transformers": "5.17.0",
                   "git_commit": "0" * 40},
           "settings": {"dtype": "bf16", "warmup": 5, "reps": 30, "gen_reps": 3, "autotune": "0",
                        "impls": ["sdpa", "dense", "2:4"]},
           "rows": [public(r) for r in rows], "summary": lines}
    md = markdown_report(doc)
    assert "NVIDIA H200, torch 2.11.0" in md and "| smollm2-cudagraphs | 1x1024 | cudagraphs | ms |" in md
    table = results_table(rows, ("sdpa", "dense", "2:4"))
    assert "n/a" in table and "skipped" in table
    assert "MISS" in summary_table(lines)
    json.dumps([public(r) for r in rows])  # what the JSON holds is serialisable
    assert save_plot(rows, ("sdpa", "dense", "2:4"), tmp_path / "p.png", "title") in (
        None, "matplotlib is not installed; skipping the plot")


def test_generated_tokens_are_compared_with_sdpa():
    rows = [_row("generate-eager", "2x512+128", "sdpa", tokens_per_s=1.0, _tokens=[[1, 2, 3], [4, 5, 6]]),
            _row("generate-eager", "2x512+128", "dense", tokens_per_s=1.0, _tokens=[[1, 2, 3], [4, 5, 6]]),
            _row("generate-eager", "2x512+128", "2:4", tokens_per_s=2.0, _tokens=[[1, 2, 3], [4, 9, 9]])]
    annotate(rows)
    assert rows[1]["tokens_equal"] is True and rows[1]["token_match_fraction"] == 1.0
    assert rows[1]["first_token_mismatch"] is None
    assert rows[2]["tokens_equal"] is False and rows[2]["token_match_fraction"] == pytest.approx(4 / 6)
    assert rows[2]["first_token_mismatch"] == 1 and rows[2]["ratio_vs_sdpa"] == 2.0
    assert "tokens_equal" not in rows[0]


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--device", "cpu", "--cases", "smollm2-eager,nope"], "argument --cases: unknown case(s) ['nope']"),
        (["--device", "cpu", "--impls", "flash"], "argument --impls: unknown ['flash']"),
        ([], "no CUDA device: this benchmark measures GPU speed. --device cpu runs every case"),
        (["--device", "cuda"], "argument --device: 'cuda' asked for, but CUDA is not available"),
        (["--device", "tpu"], "argument --device: 'tpu' is not a device"),
        (["--device", "meta"], "this benchmark runs on cuda or, as a smoke test, cpu"),
        (["--device", "cpu", "--reps", "0"], "argument --reps: must be >= 1, got 0"),
        (["--device", "cpu", "--warmup", "-1"], "argument --warmup: must be >= 0, got -1"),
        (["--device", "cpu", "--time-budget", "0"], "argument --time-budget: must be > 0"),
        (["--device", "cpu", "--compile-backend", "nope"], "argument --compile-backend: unknown backend 'nope'"),
        (["--device", "cpu", "extra"], "unrecognized arguments: extra"),
    ],
)
def test_bad_options_are_argument_errors(argv, message, no_cuda, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "model", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_tiny_is_refused_on_cuda(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for argv in (["--tiny"], ["--tiny", "--device", "cuda"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(["bench", "model", *argv])
        assert exc.value.code == 2
        assert "argument --tiny: the tiny shapes are the CPU smoke test" in capsys.readouterr().err


def test_out_must_be_a_directory(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "model", "--device", "cpu", "--out", str(target)])
    assert exc.value.code == 2
    assert f"argument --out: {target} exists and is not a directory" in capsys.readouterr().err


def test_dry_run_prints_the_cuda_plan_anywhere(no_cuda, tmp_path, capsys):
    code, out, err = _run(capsys, "--dry-run", "--cases", "default,generate-static", "--out", tmp_path / "o")
    assert code == 0 and not (tmp_path / "o").exists()
    for name in GROUPS["default"] + ("generate-static",):
        assert f"  {name} " in err
    assert "1x1024, 8x1024" in err and "1x512+128, 8x512+128" in err
    assert "estimate: ~" in err and "min on an H200" in err
    assert "not selected: smollm2-compiled" in err and "use_cache=False" in err
    code, _, err = _run(capsys, "--dry-run", "--use-cache")
    assert code == 0 and "model(ids, use_cache=True)" in err
    # Tiny CPU plan of the same.
    code, _, err = _run(capsys, "--dry-run", "--device", "cpu")
    assert code == 0 and "tiny CPU shapes" in err and "1x64, 2x64" in err


def test_help_lists_cases_groups_and_the_split(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "model", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for name in list(CASES) + list(GROUPS):
        assert f"\n  {name} " in text
    for needle in ("--cases smollm2-compiled --time-budget", "--device cpu", "MODELOPT_SPARSE_AUTOTUNE"):
        assert needle in text
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    assert "modelopt-sparse bench model --help" in capsys.readouterr().out


def test_kernel_bench_entry_point_dispatches_model(no_cuda, capsys):
    """benchmarks/bench_attention.py's main() takes the sub-subcommand too."""
    from modelopt_sparse.bench import main

    assert main(["model", "--dry-run", "--device", "cpu"]) == 0
    assert "tiny CPU shapes" in capsys.readouterr().err


@pytest.mark.slow
def test_compile_paths_on_cpu_with_dynamo_only(tmp_path, capsys):
    """The compiled forward (fullgraph=True, then the fallback) and transformers' compiled
    static-cache generate, through Dynamo's eager backend: the code paths the H200 run takes
    with inductor."""
    code, out, err = _run(capsys, "--device", "cpu", "--cases", "compiled", "--impls", "sdpa,dense",
                          "--compile-backend", "eager", "--reps", "1", "--warmup", "1", "--out", tmp_path)
    assert code == 0, err[-3000:]
    doc = json.loads((tmp_path / "model_results.json").read_text())
    rows = doc["rows"]
    assert len(rows) == 2 * 2 * 2
    for r in rows:
        assert r["status"] == "ok", r
        assert r["compile_s"] > 0 and r["fullgraph"] in (True, False) and r["graphs"] >= 1
        if r["fullgraph"] is False:
            # The fallback keeps why the whole-graph capture failed.
            assert r["note"].startswith("fullgraph=True failed") and r["fullgraph_error"]
    sdpa = [r for r in rows if r["impl"] == "sdpa"]
    assert all(r["fullgraph"] is True and r["graph_breaks"] == 0 for r in sdpa)
    # The compiled forward too: both compiled, then one round (--reps 1) of both, the ratio paired.
    forward = [r for r in rows if r["case"] == "smollm2-compiled"]
    assert [(r["setting"], r["impl"]) for r in forward] == [("1x64", "sdpa"), ("1x64", "dense"),
                                                            ("2x64", "sdpa"), ("2x64", "dense")]
    for r in forward:
        assert len(r["round_ms"]) == 1 and "in rounds with the other implementations" in r["note"]
        if r["impl"] == "dense":
            assert r["ratio_vs_sdpa"] == r["paired_ratio_vs_sdpa"] > 0 and r["logits_vs_sdpa_max_abs"] < 0.05
    generate = [r for r in rows if r["case"] == "generate-static"]
    # Compiled side by side, then timed in rounds: every row has its one round (--reps 1 gives
    # one generate call), and dense its ratio paired with SDPA's call of the same round.
    assert [(r["setting"], r["impl"]) for r in generate] == [("1x16+8", "sdpa"), ("1x16+8", "dense"),
                                                             ("2x16+8", "sdpa"), ("2x16+8", "dense")]
    for r in generate:
        assert len(r["round_ms"]) == 1 and "in rounds with the other implementations" in r["note"]
        if r["impl"] == "dense":
            assert isinstance(r["tokens_equal"], bool)
            assert r["ratio_vs_sdpa"] == r["paired_ratio_vs_sdpa"] > 0
    assert "transformers did not compile" not in json.dumps(rows)


def test_interleaved_timing_alternates_implementations():
    """Eager forwards are timed in rounds: each implementation once per round, warm-up
    included, so a drifting host affects all of them alike."""
    from modelopt_sparse.bench.timing import interleaved_median_ms

    order = []
    fns = {name: (lambda n=name: order.append(n)) for name in ("sdpa", "dense", "2:4")}
    ms = interleaved_median_ms(fns, torch.device("cpu"), warmup=2, reps=3)
    assert order == ["sdpa", "dense", "2:4"] * 5
    assert set(ms) == set(fns) and all(v >= 0 for v in ms.values())


class _FakeHost:
    """A fake clock for measure's timers and the log of the generate calls, in order. Call k
    (counted from 1) of a model of cost c takes c * (1 + k): every call is slower than the
    one before, as on a host that drifts."""

    def __init__(self, monkeypatch):
        import types

        from modelopt_sparse.bench.model import measure

        self.now, self.log, self.calls = 0.0, [], 0
        monkeypatch.setattr(measure, "time", types.SimpleNamespace(perf_counter=lambda: self.now))

    def run(self, name: str, cost: float) -> None:
        self.calls += 1
        self.log.append(name)
        self.now += cost * (1 + self.calls)


class _FakeModel:
    """What the generate measurements call of a model. A static-cache config with a compile
    config marks the model compiled, as transformers' get_compiled_call does;
    ``fails_to_compile`` raises on the fullgraph attempt ("fullgraph") or on both ("always")."""

    def __init__(self, host: _FakeHost, name: str, cost: float, fails_to_compile: str | None = None):
        self.host, self.name, self.cost, self.fails_to_compile = host, name, cost, fails_to_compile

    def generate(self, ids, attention_mask=None, generation_config=None):
        compile_config = generation_config.compile_config
        if compile_config is not None and (self.fails_to_compile == "always" or (
                self.fails_to_compile == "fullgraph" and compile_config.fullgraph)):
            self.host.log.append(f"{self.name} fails")
            raise RuntimeError(f"{self.name} cannot be compiled")
        self.host.run(self.name, self.cost)
        if compile_config is not None:
            self._compiled_call = object()
        return torch.zeros(ids.shape[0], ids.shape[1] + _FAKE_SETTING.new_tokens, dtype=torch.long)


_FAKE_SETTING = Setting(batch=2, length=3, new_tokens=4)


def test_generate_rounds_rotate_their_order_and_pair_the_ratio(monkeypatch):
    """Eager generate is host-bound and drifts: each round starts with another implementation,
    and the reported ratio is the median of the per-round ratios (SDPA's time / ours in the
    same round), which a drift that slows every later round cancels; the ratio of medians
    stays in the row beside it."""
    from modelopt_sparse.bench.model import measure, report

    host = _FakeHost(monkeypatch)
    models = {"sdpa": _FakeModel(host, "sdpa", 1.0), "dense": _FakeModel(host, "dense", 1.0),
              "2:4": _FakeModel(host, "2:4", 2.0)}
    out = measure.generate_eager_interleaved(models, torch.zeros(2, 3, dtype=torch.long), _FAKE_SETTING,
                                             torch.device("cpu"), warmup=0, reps=3)
    assert host.log == ["sdpa", "dense", "2:4", "dense", "2:4", "sdpa", "2:4", "sdpa", "dense"]
    # Call k costs cost * (1 + k): SDPA 2, 7, 9; dense (same cost) 3, 5, 10; 2:4 (twice) 8, 12,
    # 16. Paired: dense 2/3, 7/5, 9/10 -> 0.9 (the ratio of medians says 7/5 = 1.4); 2:4 2/8,
    # 7/12, 9/16 -> 0.5625.
    assert out["dense"]["paired_ratio_vs_sdpa"] == pytest.approx(0.9)
    assert out["2:4"]["paired_ratio_vs_sdpa"] == pytest.approx(9 / 16)
    assert len(out["sdpa"]["round_ms"]) == 3 and "paired_ratio_vs_sdpa" not in out["sdpa"]
    rows = [dict(case="generate-eager", setting="2x3+4", mode="eager", kind="generate", impl=name,
                 status="ok", **fields) for name, fields in out.items()]
    report.annotate(rows)
    dense = next(r for r in rows if r["impl"] == "dense")
    assert dense["ratio_vs_sdpa"] == pytest.approx(0.9)
    assert dense["ratio_of_medians_vs_sdpa"] == pytest.approx(1.4)


def _static_interleaved(monkeypatch, host, models, reps=3):
    """measure.generate_static_interleaved of fake models: Dynamo's resets go to the call log,
    and every call made while compiling adds one graph to the counts."""
    from modelopt_sparse.bench.model import measure

    monkeypatch.setattr(measure, "_reset_dynamo", lambda: host.log.append("reset"))
    monkeypatch.setattr(measure, "_graph_counts", lambda: {"graph_breaks": 0, "graphs": host.calls})
    return measure.generate_static_interleaved(models, torch.zeros(2, 3, dtype=torch.long), _FAKE_SETTING,
                                               torch.device("cpu"), warmup=0, reps=reps, backend="eager")


def test_static_compiled_rounds_rotate_their_order_and_pair_the_ratio(monkeypatch):
    """Compiled generate is timed as eager generate is: every implementation compiled side by
    side (no Dynamo reset between them, or the earlier compiled calls would be thrown away
    before their rounds), then rounds in rotating order, and the ratio paired per round."""
    from modelopt_sparse.bench.model import report

    host = _FakeHost(monkeypatch)
    models = {"sdpa": _FakeModel(host, "sdpa", 1.0), "dense": _FakeModel(host, "dense", 1.0),
              "2:4": _FakeModel(host, "2:4", 2.0)}
    out = _static_interleaved(monkeypatch, host, models)
    assert host.log == ["reset", "sdpa", "dense", "2:4",  # the compiles
                        "sdpa", "dense", "2:4", "dense", "2:4", "sdpa", "2:4", "sdpa", "dense", "reset"]
    # Calls 1-3 compile (SDPA 2, dense 3, 2:4 8); then SDPA 5, 10, 12; dense 6, 8, 13; 2:4
    # (twice the cost) 14, 18, 22. Paired: dense 5/6, 10/8, 12/13 -> 12/13 (the ratio of
    # medians says 10/8); 2:4 5/14, 10/18, 12/22 -> 12/22.
    assert [out[name]["compile_s"] for name in models] == [2.0, 3.0, 8.0]
    assert all(out[name]["fullgraph"] is True and out[name]["graphs"] == 1 for name in models)
    assert out["sdpa"]["round_ms"] == [5e3, 10e3, 12e3] and "paired_ratio_vs_sdpa" not in out["sdpa"]
    assert out["dense"]["paired_ratio_vs_sdpa"] == pytest.approx(12 / 13)
    assert out["2:4"]["paired_ratio_vs_sdpa"] == pytest.approx(12 / 22)
    assert out["dense"]["note"] == "median of 3 calls, in rounds with the other implementations (rotating order)"
    rows = [dict(case="generate-static", setting="2x3+4", mode="static-compiled", kind="generate", impl=name,
                 status="ok", **fields) for name, fields in out.items()]
    report.annotate(rows)
    dense = next(r for r in rows if r["impl"] == "dense")
    assert dense["ratio_vs_sdpa"] == pytest.approx(12 / 13)
    assert dense["ratio_of_medians_vs_sdpa"] == pytest.approx(10 / 8)
    assert dense["tokens_equal"] is True


def test_a_failed_static_compile_is_one_error_row(monkeypatch):
    """An implementation that cannot be compiled is an error row; one that compiles only
    without fullgraph says so; both others are timed in rounds without the failed one."""
    host = _FakeHost(monkeypatch)
    models = {"sdpa": _FakeModel(host, "sdpa", 1.0), "dense": _FakeModel(host, "dense", 1.0, "fullgraph"),
              "2:4": _FakeModel(host, "2:4", 1.0, "always")}
    out = _static_interleaved(monkeypatch, host, models, reps=2)
    assert host.log == ["reset", "sdpa", "dense fails", "dense", "2:4 fails", "2:4 fails",
                        "sdpa", "dense", "dense", "sdpa", "reset"]
    assert list(out) == ["sdpa", "dense", "2:4"]
    assert out["2:4"] == {"status": "error", "reason": "RuntimeError: 2:4 cannot be compiled",
                          "detail": out["2:4"]["detail"]}
    dense = out["dense"]
    assert dense["fullgraph"] is False and "dense cannot be compiled" in dense["fullgraph_error"]
    assert dense["note"] == ("fullgraph=True failed; compiled again with fullgraph=False; "
                             "median of 2 calls, in rounds with the other implementations (rotating order)")
    assert len(dense["round_ms"]) == 2 and dense["paired_ratio_vs_sdpa"] > 0


def test_runner_keeps_a_static_compile_error_beside_the_timed_rows(monkeypatch):
    """The runner takes each implementation's status from the static measurement: an error
    row of one does not turn the others into errors."""
    from modelopt_sparse.bench.model import ModelBenchConfig, measure, run_model_bench

    def measured(models, ids, setting, device, warmup, reps, backend):
        assert list(models) == ["sdpa", "dense", "2:4"] and backend == "eager"
        return {"sdpa": {"ms": 2.0, "tokens_per_s": 1.0, "compile_s": 1.0},
                "dense": {"ms": 2.0, "tokens_per_s": 1.0, "compile_s": 1.0, "paired_ratio_vs_sdpa": 1.0},
                "2:4": {"status": "error", "reason": "RuntimeError: no", "detail": "trace"}}

    monkeypatch.setattr(measure, "generate_static_interleaved", measured)
    cfg = ModelBenchConfig(cases=("generate-static",), device="cpu", tiny=True, compile_backend="eager")
    rows = run_model_bench(cfg)
    assert [(r["setting"], r["impl"], r["status"]) for r in rows] == [
        ("1x16+8", "sdpa", "ok"), ("1x16+8", "dense", "ok"), ("1x16+8", "2:4", "error"),
        ("2x16+8", "sdpa", "ok"), ("2x16+8", "dense", "ok"), ("2x16+8", "2:4", "error")]
    assert all(r["reason"] == "RuntimeError: no" for r in rows if r["impl"] == "2:4")


def test_round_order_balances_first_place_and_neighbours():
    """Over 2 x (number of implementations) rounds each one starts as often as any other and
    runs right after each other one as often: a rotation alone keeps dense after SDPA."""
    from collections import Counter

    from modelopt_sparse.bench.model.measure import round_order

    names = ["sdpa", "dense", "2:4"]
    orders = [round_order(names, i) for i in range(6)]
    assert orders[:3] == [["sdpa", "dense", "2:4"], ["dense", "2:4", "sdpa"], ["2:4", "sdpa", "dense"]]
    assert Counter(o[0] for o in orders) == {name: 2 for name in names}
    after = Counter((a, b) for o in orders for a, b in zip(o, o[1:]))
    assert after == {(a, b): 2 for a in names for b in names if a != b}
    assert [round_order(["sdpa", "dense"], i) for i in range(4)] == [
        ["sdpa", "dense"], ["dense", "sdpa"], ["dense", "sdpa"], ["sdpa", "dense"]]


class _FakeForward:
    """A model's forward on the fake host: logs its name, costs ``cost`` by the host's clock."""

    def __init__(self, host: _FakeHost, name: str, cost: float):
        self.host, self.name, self.cost = host, name, cost

    def __call__(self, ids, **call_kw):
        import types

        self.host.run(self.name, self.cost)
        return types.SimpleNamespace(logits=torch.zeros(ids.shape[0], 1, 4))


def test_compiled_forward_compiles_side_by_side_then_pairs_rotating_rounds(monkeypatch):
    """smollm2-compiled through the runner: every implementation of a setting compiled (no
    Dynamo reset between them), then timed in rounds of a few calls each whose order
    rotates, the ratio the median of the per-round ratios; the setting that does not fit
    --time-budget is recorded as skipped. Timed one implementation after another (the old
    way), the call log would be compile sdpa, sdpa x reps, compile dense, ..."""
    import types

    from modelopt_sparse.bench.model import ModelBenchConfig, measure, report, run_model_bench, runner

    host = _FakeHost(monkeypatch)
    costs = {"sdpa": 1.0, "dense": 1.0, "2:4": 2.0}

    def fake_compile(model, fullgraph, backend):
        assert fullgraph is True and backend == "eager"
        host.log.append(f"compile {model.name}")
        return model

    monkeypatch.setattr(runner, "time", types.SimpleNamespace(perf_counter=lambda: host.now))
    monkeypatch.setattr(measure, "build_model", lambda *args: "base")
    monkeypatch.setattr(measure, "implementation", lambda base, impl: _FakeForward(host, impl, costs[impl]))
    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(measure, "_reset_dynamo", lambda: host.log.append("reset"))
    monkeypatch.setattr(measure, "_graph_counts", lambda: {"graph_breaks": 0, "graphs": host.calls})
    monkeypatch.setattr(measure, "FORWARD_CALLS_PER_ROUND", 2)
    # One setting takes ~180 s by the estimate (120 s per implementation, two settings): the
    # first fits 300 s, the second not after the first's 337 s on the fake clock.
    cfg = ModelBenchConfig(cases=("smollm2-compiled",), device="cpu", compile_backend="eager", warmup=0, reps=3,
                           time_budget_s=300)
    rows = run_model_bench(cfg)
    assert host.log == ["reset", "compile sdpa", "sdpa", "compile dense", "dense", "compile 2:4", "2:4",
                        *["sdpa"] * 2, *["dense"] * 2, *["2:4"] * 2,
                        *["dense"] * 2, *["2:4"] * 2, *["sdpa"] * 2,
                        *["2:4"] * 2, *["sdpa"] * 2, *["dense"] * 2, "reset"]
    assert [(r["setting"], r["impl"], r["status"]) for r in rows] == [
        ("1x1024", "sdpa", "ok"), ("1x1024", "dense", "ok"), ("1x1024", "2:4", "ok"),
        ("8x1024", "sdpa", "skipped"), ("8x1024", "dense", "skipped"), ("8x1024", "2:4", "skipped")]
    assert all(r["reason"].startswith("not run: --time-budget 300 s") for r in rows[3:])
    sdpa, dense, sparse = rows[:3]
    # Call k costs cost * (1 + k). Compiles: calls 1-3 (SDPA 2 s, dense 3 s, 2:4 8 s). Rounds
    # of two calls, ms per call: SDPA 5.5, 15.5, 19.5 s; dense 7.5, 11.5, 21.5; 2:4 19, 27,
    # 35. Paired: dense 7.5/5.5, 11.5/15.5, 21.5/19.5 -> 43/39 (the ratio of medians says
    # 11.5/15.5); 2:4 -> 35/19.5 (27/15.5).
    assert [r["compile_s"] for r in rows[:3]] == [2.0, 3.0, 8.0]
    assert all(r["fullgraph"] is True and r["graphs"] == 1 and r["graph_breaks"] == 0 for r in rows[:3])
    assert sdpa["round_ms"] == [5.5e3, 15.5e3, 19.5e3] and sdpa["ms"] == 15.5e3
    assert dense["round_ms"] == [7.5e3, 11.5e3, 21.5e3] and dense["ms"] == 11.5e3
    assert "paired_ratio_vs_sdpa" not in sdpa
    assert dense["paired_ratio_vs_sdpa"] == pytest.approx(43 / 39)
    assert sparse["paired_ratio_vs_sdpa"] == pytest.approx(35 / 19.5)
    assert dense["note"] == "median of 3 rounds of 2 calls, in rounds with the other implementations (rotating order)"
    report.annotate(rows)
    assert dense["ratio_vs_sdpa"] == pytest.approx(43 / 39)
    assert dense["ratio_of_medians_vs_sdpa"] == pytest.approx(11.5 / 15.5)
    assert dense["logits_vs_sdpa_max_abs"] == 0.0


def test_cudagraph_forward_captures_side_by_side_then_pairs_rotating_rounds(monkeypatch):
    """smollm2-cudagraphs: every implementation captured first, its replays timed in rotating
    rounds with the others, each replay checked against an eager forward after the rounds;
    a capture that fails is that implementation's error row alone."""
    from modelopt_sparse.bench.model import measure

    host = _FakeHost(monkeypatch)
    models = {name: _FakeForward(host, name, 1.0) for name in ("sdpa", "dense", "2:4")}

    def fake_capture(model, ids, call_kw, device, warmup):
        host.log.append(f"capture {model.name}")
        if model.name == "2:4":
            raise RuntimeError("CUDA graph capture failed: no")
        return (lambda: model(ids)), ids.clone(), None

    monkeypatch.setattr(measure, "capture_forward", fake_capture)
    out = measure.forward_cudagraphs_interleaved(models, torch.zeros(1, 3, dtype=torch.long), {},
                                                 torch.device("cpu"), warmup=1, reps=2)
    per = measure.FORWARD_CALLS_PER_ROUND
    assert host.log == ["capture sdpa", "capture dense", "capture 2:4", "sdpa", "dense",
                        *["sdpa"] * per, *["dense"] * per, *["dense"] * per, *["sdpa"] * per,
                        "sdpa", "dense"]  # the eager forwards the replays are checked against
    assert out["2:4"]["status"] == "error" and out["2:4"]["reason"] == "RuntimeError: CUDA graph capture failed: no"
    for name in ("sdpa", "dense"):
        assert len(out[name]["round_ms"]) == 2 and out[name]["replay_vs_eager_max_abs"] == 0.0
    assert out["dense"]["paired_ratio_vs_sdpa"] > 0 and "paired_ratio_vs_sdpa" not in out["sdpa"]


def test_host_case_rounds_rotate_their_order_and_pair_the_ratio(monkeypatch):
    """The host case times blocks of back-to-back calls in the same rotating rounds as the
    other side-by-side measurements, and its ratio is the per-round paired one: a host that
    slows down over the run must not favour whichever implementation came first."""
    from modelopt_sparse.bench.model import measure

    host = _FakeHost(monkeypatch)
    costs = {"sdpa": 1.0, "dense": 1.0, "2:4": 2.0}
    monkeypatch.setattr(measure, "host_call_fn", lambda impl, grad, device: lambda: host.run(impl, costs[impl]))
    out = measure.host_calls_interleaved(list(costs), False, torch.device("cpu"), calls=6, warmup=0, rounds=3)
    # Three rounds of two calls each, in rotating order (as generate's rounds).
    assert host.log == [n for n in ("sdpa", "dense", "2:4", "dense", "2:4", "sdpa", "2:4", "sdpa", "dense")
                        for _ in range(2)]
    # Call k costs cost * (1 + k); per call of a block: SDPA (2+3)/2, (12+13)/2, (16+17)/2 = 2.5,
    # 12.5, 16.5; dense 4.5, 8.5, 18.5; paired dense/SDPA 1.8, 0.68, 1.12 -> 1.12 (the ratio of
    # medians says 8.5 / 12.5 = 0.68). The fake clock counts seconds: 1e6 µs each.
    assert out["dense"]["paired_ratio_vs_sdpa"] == pytest.approx(18.5 / 16.5)
    assert out["sdpa"]["us_per_call"] == pytest.approx(12.5e6) and out["sdpa"]["calls"] == 6
    assert out["dense"]["round_us"] == [4.5e6, 8.5e6, 18.5e6] and "round_ms" not in out["dense"]
