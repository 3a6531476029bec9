"""The ``fa4`` peer of ``modelopt-sparse bench`` (FlashAttention-4, ``flash_attn.cute``), on CPU.

FA4 is not installed in CI and needs a GPU, so these tests fake it: a missing module, a
broken one, and a stand-in ``flash_attn_func`` (SDPA under FA4's conventions) that records
how it was called. What they pin: the peer is accepted and on by default on CUDA only, every
way it cannot run becomes an n/a row with a precise reason (printed once), and the call has
FA4's layout, causal flag, window translation, GQA head counts and backward.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from modelopt_sparse.bench import DEFAULT_PEERS, PEERS, BenchConfig, resolve_config, run_benchmarks
from modelopt_sparse.bench import prepare as prep_mod


def _quick(**kw):
    base = dict(quick=True, device="cpu", variants=(), peers=("fa4",), modes=("fwd",), causal=(True,),
                cpu_warmup=0, cpu_reps=1)
    base.update(kw)
    return run_benchmarks(**base)


@pytest.fixture
def any_device(monkeypatch):
    """Let fa4 past its device check on CPU (the check itself is tested on its own)."""
    monkeypatch.setattr(prep_mod, "fa4_device_reason", lambda device, mode: None)


def _install(monkeypatch, cute: types.ModuleType | None) -> None:
    """Make ``flash_attn.cute`` this module (None: neither flash_attn nor flash_attn.cute exists)."""
    if cute is None:
        monkeypatch.setitem(sys.modules, "flash_attn", None)
        monkeypatch.setitem(sys.modules, "flash_attn.cute", None)
        return
    pkg = types.ModuleType("flash_attn")
    pkg.__path__ = []
    pkg.cute = cute
    monkeypatch.setitem(sys.modules, "flash_attn", pkg)
    monkeypatch.setitem(sys.modules, "flash_attn.cute", cute)


def _fa4_keep(s: int, left, right) -> torch.Tensor:
    """FA4's window rule for equal lengths (flash_attn/cute/mask.py): query i sees key j when
    i - left <= j <= i + right; None is unbounded."""
    i = torch.arange(s)[:, None]
    j = torch.arange(s)[None, :]
    keep = torch.ones(s, s, dtype=torch.bool)
    if left is not None:
        keep &= j >= i - left
    if right is not None:
        keep &= j <= i + right
    return keep


class FakeFA4:
    """A stand-in for ``flash_attn.cute.flash_attn_func`` with 4.0.0b36's signature: attention
    by SDPA on (batch, seqlen, heads, head_dim) inputs, FA4's causal/window semantics, and a
    record of every call and of every backward through its output."""

    def __init__(self, return_tuple: bool = True):
        self.calls: list[dict] = []
        self.backwards = 0
        self.return_tuple = return_tuple

    def __call__(self, q, k, v, qv=None, gather_kv_indices=None, softmax_scale=None, causal=False,
                 window_size=(None, None), return_lse=False, **rest):
        self.calls.append(dict(q=tuple(q.shape), k=tuple(k.shape), v=tuple(v.shape), qv=qv,
                               gather=gather_kv_indices, scale=softmax_scale, causal=causal,
                               window_size=tuple(window_size), rest=rest, grad=torch.is_grad_enabled(),
                               requires_grad=q.requires_grad))
        left, right = window_size
        if causal:
            right = 0
        s = q.shape[1]
        mask = _fa4_keep(s, left, right)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask, scale=softmax_scale,
                                             enable_gqa=k.shape[2] != q.shape[2]).transpose(1, 2)
        if out.requires_grad:
            out.register_hook(self._seen_backward)
        return (out, None) if self.return_tuple else out

    def _seen_backward(self, grad):
        self.backwards += 1


def _fake_module(fn) -> types.ModuleType:
    cute = types.ModuleType("flash_attn.cute")
    cute.flash_attn_func = fn
    return cute


# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------
def test_fa4_is_a_peer_on_by_default_on_cuda_only(monkeypatch):
    assert "fa4" in PEERS
    assert "fa4" in DEFAULT_PEERS["cuda"]
    assert DEFAULT_PEERS["cpu"] == ("sdpa-math", "flex")  # FA4 is CUDA-only
    assert resolve_config(BenchConfig(device="cpu", quick=True, peers=("fa4",))).peers == ("fa4",)
    assert "fa4" not in resolve_config(BenchConfig(device="cpu", quick=True)).peers
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert "fa4" in resolve_config(BenchConfig(device="cuda")).peers
    with pytest.raises(ValueError, match="unknown peers"):
        resolve_config(BenchConfig(device="cpu", peers=("fa5",)))


def test_cli_accepts_fa4_and_says_so_in_help(monkeypatch):
    from modelopt_sparse.bench import build_parser, config_from_args

    monkeypatch.setenv("COLUMNS", "1000")  # no line breaks inside the names

    parser = build_parser()
    assert config_from_args(parser.parse_args(["--peers", "fa4,flex"]), parser).peers == ("fa4", "flex")
    assert config_from_args(parser.parse_args(["--backend", "hopper"]), parser).backend == "hopper"
    text = " ".join(parser.format_help().split())
    assert "sdpa-cudnn,flex,fa4 on CUDA" in text and "flash-attn-4 is not installed" in text
    assert "FlashAttention-4" in text


# --------------------------------------------------------------------------------------
# Availability: each way it cannot run is an n/a row with a precise reason
# --------------------------------------------------------------------------------------
def test_not_installed_is_a_skipped_row_with_the_reason(monkeypatch, any_device):
    _install(monkeypatch, None)
    (row,) = _quick()
    assert row["impl"] == "fa4" and row["kind"] == "peer"
    assert row["status"] == "n/a" and row["tflops"] is None
    assert row["reason"] == "Unsupported: FlashAttention-4 is not installed (pip install flash-attn-4)"


def test_flash_attention_2_alone_is_not_fa4(monkeypatch, any_device):
    pkg = types.ModuleType("flash_attn")  # FlashAttention-2: a flash_attn without .cute
    pkg.__path__ = []
    monkeypatch.setitem(sys.modules, "flash_attn", pkg)
    monkeypatch.delitem(sys.modules, "flash_attn.cute", raising=False)
    (row,) = _quick()
    assert "FlashAttention-4 is not installed" in row["reason"]


def test_broken_install_reports_the_short_error(monkeypatch, any_device):
    _install(monkeypatch, types.ModuleType("flash_attn.cute"))  # no flash_attn_func in it
    (row,) = _quick()
    assert row["status"] == "n/a"
    assert "FlashAttention-4 cannot be imported: ImportError: cannot import name 'flash_attn_func'" in row["reason"]

    cute = types.ModuleType("flash_attn.cute")

    def missing_dependency(name):  # what a missing nvidia-cutlass-dsl looks like from here
        raise ModuleNotFoundError("No module named 'cutlass'", name="cutlass")

    cute.__getattr__ = missing_dependency
    _install(monkeypatch, cute)
    (row,) = _quick()
    assert "not installed" not in row["reason"]
    assert "cannot be imported: ModuleNotFoundError: No module named 'cutlass'" in row["reason"]


def test_cpu_device_needs_cuda(monkeypatch):
    fake = FakeFA4()
    _install(monkeypatch, _fake_module(fake))
    (row,) = _quick()
    assert row["status"] == "n/a" and "FlashAttention-4 needs CUDA (device is cpu)" in row["reason"]
    assert fake.calls == []


@pytest.mark.parametrize("capability, fwd_ok, bwd_ok", [
    ((7, 5), False, False), ((8, 0), True, False), ((9, 0), True, True), ((10, 0), True, True),
    ((12, 0), True, True), ((13, 0), False, False),
])
def test_compute_capability_check(monkeypatch, capability, fwd_ok, bwd_ok):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    cuda = torch.device("cuda")
    fwd, bwd = prep_mod.fa4_device_reason(cuda, "fwd"), prep_mod.fa4_device_reason(cuda, "fwdbwd")
    name = f"{capability[0]}.{capability[1]}"
    assert (fwd is None) == fwd_ok and (bwd is None) == bwd_ok
    for reason in (fwd, bwd):
        if reason is not None:
            assert name in reason and f"sm_{capability[0]}{capability[1]}" in reason
    if fwd_ok and not bwd_ok:
        assert "backward" in bwd


def test_a_failing_kernel_is_unsupported_with_its_reason(monkeypatch, any_device):
    """FA4 refusing a shape or this GPU's backward (an assert in interface.py) is the row's reason."""
    def refuses(q, k, v, **kw):
        out = FakeFA4()(q, k, v, **kw)[0]
        if q.requires_grad:
            class NoBackward(torch.autograd.Function):
                @staticmethod
                def forward(ctx, x):
                    return x.view_as(x)

                @staticmethod
                def backward(ctx, g):
                    raise AssertionError("Unsupported compute capability. Supported: 9.x, 10.x, 11.x, 12.x")

            out = NoBackward.apply(out)
        return out, None

    _install(monkeypatch, _fake_module(refuses))
    fwd, fwdbwd = _quick(modes=("fwd", "fwdbwd"))
    assert fwd["status"] == "ok"
    assert fwdbwd["status"] == "n/a"
    assert fwdbwd["reason"].startswith("Unsupported: FlashAttention-4 forward+backward failed here: AssertionError")
    assert "Supported: 9.x" in fwdbwd["reason"]


# --------------------------------------------------------------------------------------
# The call
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("return_tuple", [True, False])
def test_call_layout_causal_gqa_and_backward(monkeypatch, any_device, return_tuple):
    fake = FakeFA4(return_tuple=return_tuple)
    _install(monkeypatch, _fake_module(fake))
    rows = _quick(modes=("fwd", "fwdbwd"), causal=(True, False), gqa=2)
    assert [(r["mode"], r["causal"], r["status"]) for r in rows] == [
        ("fwd", True, "ok"), ("fwd", False, "ok"), ("fwdbwd", True, "ok"), ("fwdbwd", False, "ok")]
    assert all(r["heads"] == 2 and r["kv_heads"] == 1 for r in rows)
    # One call before timing (compiles FA4's kernels), then the timed ones.
    assert len(fake.calls) >= 8
    for call in fake.calls:
        assert call["q"] == (1, 256, 2, 64)  # (batch, seqlen, heads, head_dim)
        assert call["k"] == call["v"] == (1, 256, 1, 64)  # GQA: fewer K/V heads, not expanded
        # Keywords only: the 4th and 5th positional parameters are qv and gather_kv_indices.
        assert call["qv"] is None and call["gather"] is None and call["scale"] is None
        assert call["window_size"] == (None, None) and call["rest"] == {}
    assert {(c["causal"], c["grad"] and c["requires_grad"]) for c in fake.calls} == {
        (True, False), (False, False), (True, True), (False, True)}
    n_bwd_calls = sum(c["requires_grad"] for c in fake.calls)
    assert n_bwd_calls >= 4 and fake.backwards == n_bwd_calls  # every fwdbwd call ran its backward


def test_sliding_window_is_window_minus_one_to_the_left(monkeypatch, any_device):
    fake = FakeFA4()
    _install(monkeypatch, _fake_module(fake))
    rows = _quick(modes=("fwd", "fwdbwd"), sliding_window=64)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert {(c["causal"], c["window_size"]) for c in fake.calls} == {(True, (63, 0))}
    # FA4's (63, 0) keeps exactly our rule's keys: 0 <= q_idx - kv_idx < 64.
    i, j = torch.arange(256)[:, None], torch.arange(256)[None, :]
    assert torch.equal(_fa4_keep(256, 63, 0), (i - j >= 0) & (i - j < 64))


def test_fa4_output_matches_our_dense_sliding_window(monkeypatch):
    """End to end on the numbers: the call prepare_fa4 makes, under FA4's window semantics,
    is our dense attention with the same sliding window (the PyTorch reference)."""
    from modelopt_sparse.bench.cases import Case
    from modelopt_sparse.kernels import attention

    fake, seen = FakeFA4(), {}

    def fa4(q, k, v, **kw):
        seen.update(q=q, k=k, v=v)
        return fake(q, k, v, **kw)

    _install(monkeypatch, _fake_module(fa4))
    monkeypatch.setattr(prep_mod, "fa4_device_reason", lambda device, mode: None)
    cfg = resolve_config(BenchConfig(device="cpu", quick=True, causal=(True,), sliding_window=40))
    case = Case("fwd", True, 96, 32, 4, 2)  # S=96, D=32, H=4, Hkv=2
    prepared = prep_mod.prepare_fa4(case, cfg, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        out = prepared.fn()
    q, k, v = (seen[n][0] for n in "qkv")  # (S, H, D): our packed layout
    s = torch.tensor([0], dtype=torch.int32)
    n = torch.tensor([96], dtype=torch.int32)
    ref = attention(q, k, v, s, n, 96, is_causal=True, sparsity_n=0, sliding_window=40, backend="torch")
    torch.testing.assert_close(out[0], ref, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------
def test_cli_prints_the_skip_reason_once(monkeypatch, capsys, any_device):
    from modelopt_sparse.cli import main

    _install(monkeypatch, None)
    argv = ["bench", "--quick", "--device", "cpu", "--variants", "dense", "--peers", "sdpa-math,fa4",
            "--modes", "fwd", "--cpu-reps", "1"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    out = captured.out
    lines = [ln for ln in out.splitlines() if "FlashAttention-4 is not installed" in ln]
    assert lines == ["  fa4: n/a in 2 config(s): Unsupported: FlashAttention-4 is not installed "
                     "(pip install flash-attn-4)"]
    header = next(ln for ln in out.splitlines() if ln.startswith("config"))
    assert header.split()[-2:] == ["sdpa-math", "fa4"]
    body = [ln for ln in out.splitlines() if ln.startswith("fwd ")]
    assert len(body) == 2 and all(ln.split()[-1] == "n/a" for ln in body)
    # The ratio lines against FA4 (dense at the main and at D=64, issue 15's 2:4 line) exist and
    # say n/a (nothing to compare), not a verdict.
    fa4_lines = [ln for ln in out.splitlines() if "vs FlashAttention-4" in ln]
    assert len(fa4_lines) == 3 and all(" n/a " in ln for ln in fa4_lines)
    assert sum("2:4 vs FlashAttention-4" in ln for ln in fa4_lines) == 1
    assert "flash-attn-4" in captured.err  # the banner names FA4's version (or its absence)
