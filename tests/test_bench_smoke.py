"""Smoke tests of benchmarks/bench_attention.py: the CLI end to end on CPU, and the library API.

They prove the harness works (rows, JSON, ratios, plot), not that any number is meaningful.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_attention.py"
if str(REPO) not in sys.path:  # so that `benchmarks` imports under plain `pytest` too
    sys.path.insert(0, str(REPO))

from benchmarks.bench_attention import (  # noqa: E402
    OUR_VARIANTS,
    TARGETS,
    Case,
    compute_ratios,
    run_benchmarks,
)

VARIANTS = list(OUR_VARIANTS)


def test_quick_cpu_cli(tmp_path):
    env = dict(os.environ, MPLBACKEND="Agg")
    env.pop("TRITON_INTERPRET", None)  # would route nothing here, but keep the run on the reference
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--cpu-reps", "3", "--out", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["complete"] is True
    rows = doc["rows"]
    expected = {
        (mode, causal, impl)
        for mode in ("fwd", "fwdbwd")
        for causal in (True, False)
        for impl in VARIANTS + ["sdpa-math", "flex"]
    }
    assert len(rows) == len(expected)
    assert {(r["mode"], r["causal"], r["impl"]) for r in rows} == expected
    for r in rows:
        assert (r["seq_len"], r["head_dim"], r["heads"], r["kv_heads"]) == (256, 64, 2, 2)
        assert r["dtype"] == "bf16" and r["device"] == "cpu"
        if r["impl"] == "flex":
            assert r["status"] == "n/a" and r["reason"] and r["tflops"] is None
            continue
        assert r["status"] == "ok", r
        assert math.isfinite(r["ms"]) and r["ms"] > 0
        assert math.isfinite(r["tflops"]) and r["tflops"] > 0
        assert r["tflops"] == pytest.approx(r["flops"] / (r["ms"] * 1e-3) / 1e12)
        dense_flops = 4 * 256**2 * 2 * 64
        want = dense_flops / (2 if r["causal"] else 1) * (3.5 if r["mode"] == "fwdbwd" else 1)
        assert r["flops"] == pytest.approx(want)
        if r["kind"] == "ours":
            assert r["backend"] == "torch"

    ratios = doc["ratios"]
    assert len(ratios) == len(TARGETS)
    by_label = {r["label"]: r for r in ratios}
    sparse_line = by_label["causal fwd D=64: 2:4 / dense"]
    # The targets are H200 targets: a CPU run reports the value without a verdict.
    assert sparse_line["status"] == "n/a (GPU target)" and sparse_line["target"] == 0.70
    assert math.isfinite(sparse_line["value"]) and sparse_line["value"] > 0
    # FlexAttention does not run on CPU, so its lines have nothing to compare.
    assert by_label["causal fwd D=64: dense vs FlexAttention"]["status"] == "n/a"

    env_doc = doc["env"]
    for key in ("date", "torch", "triton", "gpu", "git_commit", "python"):
        assert key in env_doc
    assert env_doc["torch"] == __import__("torch").__version__

    out = proc.stdout
    assert "CPU run" in out
    assert "MISS" not in out and "PASS" not in out
    assert "n/a (GPU target)" in out and "targets are for the H200" in out
    # The two tables come last, TFLOPS first, ratios second.
    assert out.rindex("config") < out.rindex("Ratios") < out.rindex("target line")
    assert out.rstrip().splitlines()[-1].startswith("causal fwd D=64: 2:4 / dense")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "skipping the plot" in out
    else:
        assert (tmp_path / "tflops.png").stat().st_size > 0


def test_run_benchmarks_importable():
    rows = run_benchmarks(
        quick=True, device="cpu", modes=("fwdbwd",), causal=(True,), variants=("dense", "2:4"),
        peers=("sdpa-math", "sdpa-flash"), gqa=2, cpu_warmup=0, cpu_reps=1,
    )
    assert [r["impl"] for r in rows] == ["dense", "2:4", "sdpa-math", "sdpa-flash"]
    assert all(r["kv_heads"] == 1 and r["heads"] == 2 for r in rows)
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "n/a"]
    assert "CUDA" in rows[-1]["reason"]


def test_sliding_window_reaches_ours_and_is_refused_by_sdpa(monkeypatch):
    import modelopt_sparse.kernels as kernels

    seen = []
    real = kernels.attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get("sliding_window"))
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "attention", spy)
    rows = run_benchmarks(
        quick=True, device="cpu", modes=("fwd",), causal=(True,), variants=("2:4",),
        peers=("sdpa-math",), sliding_window=64, cpu_warmup=0, cpu_reps=1,
    )
    assert [r["status"] for r in rows] == ["ok", "n/a"]
    assert "sliding window" in rows[1]["reason"]
    assert seen and set(seen) == {64}
    with pytest.raises(ValueError, match="needs causal"):
        run_benchmarks(quick=True, device="cpu", causal=(True, False), sliding_window=64)
    with pytest.raises(ValueError, match=">= 0"):
        run_benchmarks(quick=True, device="cpu", sliding_window=-1)


def test_flops_and_verdicts():
    s, h, d = 4096, 32, 128
    assert Case("fwd", False, s, d, h, h).flops == 4 * s * s * h * d
    assert Case("fwdbwd", True, s, d, h, h).flops == 4 * s * s * h * d / 2 * 3.5

    def row(s_, impl, tflops):
        return {"mode": "fwd", "causal": True, "seq_len": s_, "head_dim": 128, "impl": impl,
                "status": "ok", "tflops": tflops}

    # 2:4/dense is 1.2 at one length and 0.9 at the other: the worst one decides (MISS at issue
    # 15's 1.10).
    rows = [row(4096, "dense", 100.0), row(4096, "2:4", 120.0),
            row(16384, "dense", 100.0), row(16384, "2:4", 90.0)]
    line = {r["label"]: r for r in compute_ratios(rows)}["causal fwd D=128: 2:4 / dense"]
    assert line["value"] == pytest.approx(0.9) and line["status"] == "MISS" and line["target"] == 1.10
    assert [p["seq_len"] for p in line["per_seq_len"]] == [4096, 16384]
    rows[-1]["tflops"] = 111.0
    line = {r["label"]: r for r in compute_ratios(rows)}["causal fwd D=128: 2:4 / dense"]
    assert line["status"] == "PASS"


def test_main_head_dim_targets_are_not_verdicts_at_other_head_dims():
    """A run without D=128 reports the D=128 lines at its own head dim for information;
    only the lines that name that head dim carry a target there."""
    rows = [{"mode": "fwd", "causal": True, "seq_len": 4096, "head_dim": 64, "impl": impl,
             "status": "ok", "tflops": t} for impl, t in (("dense", 100.0), ("flex", 93.0))]
    lines = [r for r in compute_ratios(rows) if r["label"] == "causal fwd D=64: dense vs FlexAttention"]
    assert sorted((r["status"], r["target"]) for r in lines) == [("PASS", 1.05), ("info", None)]


def test_console_script_runs_the_benchmark(tmp_path, capsys):
    from modelopt_sparse.cli import main

    argv = ["bench", "--quick", "--device", "cpu", "--variants", "dense,2:4", "--peers", "none",
            "--modes", "fwd", "--causal", "causal", "--out", str(tmp_path)]
    assert main(argv) == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["complete"] and {r["impl"] for r in doc["rows"]} == {"dense", "2:4"}
    assert all(r["status"] == "ok" and r["tflops"] > 0 for r in doc["rows"])


def test_host_bound_rows_are_marked():
    """A CUDA row whose host side takes >= 90 % of its time carries a '*' and a footnote:
    the number then measures launches, not the kernel (found at S=4096 on the H200)."""
    from modelopt_sparse.bench import BenchConfig, format_report, resolve_config

    cfg = resolve_config(BenchConfig(device="cpu", quick=True, modes=("fwdbwd",), causal=(True,),
                                      variants=("dense", "2:4"), peers=("sdpa-math",)))

    def row(impl, ms, host_ms):
        return {"mode": "fwdbwd", "causal": True, "seq_len": 256, "head_dim": 64, "heads": 2, "kv_heads": 2,
                "impl": impl, "status": "ok", "ms": ms, "host_ms": host_ms, "tflops": 1e3 / ms}

    rows = [row("dense", 1.0, 0.95), row("2:4", 1.0, 0.5), row("sdpa-math", 2.0, None)]
    text = format_report(rows, compute_ratios(rows), cfg, {"cpu": "x86"})
    line = next(ln for ln in text.splitlines() if ln.startswith("fwdbwd"))
    assert line.split()[-3:] == ["1000.0*", "1000.0", "500.0"]
    assert "* host-bound" in text
    rows[0]["host_ms"] = 0.5
    assert "*" not in format_report(rows, compute_ratios(rows), cfg, {"cpu": "x86"})


def test_host_enqueue_timer_resets_grads_and_counts_calls(monkeypatch):
    import torch

    from modelopt_sparse import bench

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    leaf = torch.ones(3, requires_grad=True)
    seen = []

    def step():
        seen.append(leaf.grad)
        (leaf * 2).sum().backward()

    ms = bench._host_enqueue_ms(bench.Prepared(fn=step, grads=[leaf]), reps=4)
    assert ms > 0 and len(seen) == 4 and all(g is None for g in seen)


def test_cpu_ratios_carry_no_verdict():
    rows = [{"mode": "fwd", "causal": True, "seq_len": 4096, "head_dim": 128, "impl": impl,
             "status": "ok", "tflops": t} for impl, t in (("dense", 100.0), ("2:4", 10.0), ("sdpa-flash", 50.0))]
    gpu = {r["label"]: r for r in compute_ratios(rows)}
    cpu = {r["label"]: r for r in compute_ratios(rows, gpu=False)}
    assert gpu["causal fwd D=128: 2:4 / dense"]["status"] == "MISS"
    assert cpu["causal fwd D=128: 2:4 / dense"]["status"] == "n/a (GPU target)"
    assert cpu["causal fwd D=128: 2:4 / dense"]["value"] == pytest.approx(0.1)
    # Lines without a target stay "info"; lines with nothing measured stay "n/a".
    assert cpu["causal fwd D=128: dense vs SDPA-flash"]["status"] == "info"
    assert cpu["causal fwd D=128: dense vs FlexAttention"]["status"] == "n/a"


def _captured_configs(monkeypatch):
    """Run the bench CLI without measuring: record the resolved config of each run."""
    from modelopt_sparse.bench import command

    seen = []

    def fake_run(cfg, on_row=None):
        seen.append(cfg)
        return []

    monkeypatch.setattr(command, "run_benchmarks", fake_run)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    return seen


def test_cpu_defaults_to_quick(monkeypatch, capsys, tmp_path):
    """Without CUDA, a bare `modelopt-sparse bench` is the quick smoke test (the full sweep
    on the PyTorch reference takes hours), and says so in one line naming --quick and --full."""
    from modelopt_sparse.cli import main

    seen = _captured_configs(monkeypatch)
    assert main(["bench"]) == 0
    cfg = seen[-1]
    assert cfg.quick and cfg.device == "cpu" and cfg.seq_lens == (256,) and cfg.heads == 2
    err = capsys.readouterr().err
    note = [line for line in err.splitlines() if line.startswith("note:")]
    assert len(note) == 1 and "--quick" in note[0] and "--full" in note[0]

    assert main(["bench", "--full", "--device", "cpu"]) == 0
    cfg = seen[-1]
    assert not cfg.quick and cfg.seq_lens == (4096, 16384) and cfg.heads == 32
    assert "can take hours" in capsys.readouterr().err

    assert main(["bench", "--quick"]) == 0  # asked for: no note
    assert seen[-1].quick and "note:" not in capsys.readouterr().err


def test_quick_and_full_exclude_each_other(monkeypatch, capsys):
    from modelopt_sparse.cli import main

    _captured_configs(monkeypatch)
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--quick", "--full"])
    assert exc.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--device", "cuda"])
    assert exc.value.code == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_code_fingerprint_matches_the_shell_tool():
    """bench/env.py labels results with .commit only when its fingerprint is this tree's;
    the Python fingerprint must equal tools/code_fingerprint.sh's, which wrote it."""
    import subprocess

    from modelopt_sparse.bench import env

    shell = subprocess.run(["bash", "-c", "source tools/code_fingerprint.sh && code_fingerprint"],
                           cwd=env.REPO_ROOT, capture_output=True, text=True, check=True).stdout.strip()
    assert env.code_fingerprint() == shell


def test_code_fingerprint_covers_the_cuda_sources(tmp_path):
    """A change to the Hopper engine's .cu or .cuh alone changes the fingerprint (a stale .commit
    once went unnoticed when only the CUDA source had changed), in Python and in the shell tool."""
    import shutil
    import subprocess

    from modelopt_sparse.bench import env

    (tmp_path / "tools").mkdir()
    shutil.copy(env.REPO_ROOT / "tools" / "code_fingerprint.sh", tmp_path / "tools")
    kernels = tmp_path / "modelopt_sparse" / "kernels"
    kernels.mkdir(parents=True)
    (kernels / "a.py").write_text("x = 1\n")
    (kernels / "k.cu").write_text("// v1\n")
    (kernels / "k.cuh").write_text("// v1\n")
    for folder in ("tests", "benchmarks"):
        (tmp_path / folder).mkdir()

    def both():
        shell = subprocess.run(["bash", "-c", "source tools/code_fingerprint.sh && code_fingerprint"], cwd=tmp_path,
                               capture_output=True, text=True, check=True).stdout.strip()
        assert env.code_fingerprint(tmp_path) == shell
        return shell

    before = both()
    (kernels / "k.cu").write_text("// v2\n")
    after_cu = both()
    (kernels / "k.cuh").write_text("// v2\n")
    assert len({before, after_cu, both()}) == 3
