"""``modelopt-sparse search``: the greedy rule on known costs, the config it writes, and the
command end to end on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch

import modelopt_sparse as mts
from modelopt_sparse.eval.data import load_text, split_tokens, split_windows, tokenize
from modelopt_sparse.eval.layer_search import assignment_config, greedy_search
from modelopt_sparse.eval.perplexity import perplexity
from modelopt_sparse.eval.search_command import budget_pct
from modelopt_sparse.eval.sweep import Setting

from .eval_tiny import argument_error, build_tiny_llama, load_tiny, run_cli

S24, S48, S14 = Setting(2, 4, 0, 64), Setting(4, 8, 0, 64), Setting(1, 4, 0, 64)
MODULES = [f"model.layers.{i}.self_attn" for i in range(4)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("search_tiny"), max_positions=128, layers=3)


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)


def _additive(costs):
    """measure(assignment) = 100 + the summed cost of every (module, setting) chosen."""
    calls = []

    def measure(assignment):
        calls.append(dict(assignment))
        return 100.0 + sum(costs[m][s] for m, s in assignment.items())

    return measure, calls


def test_greedy_takes_least_sensitive_layers_first_and_respects_the_limit():
    costs = {
        MODULES[0]: {S24: 0.30, S48: 0.20},
        MODULES[1]: {S24: 0.05, S48: 0.10},
        MODULES[2]: {S24: 2.00, S48: 1.50},
        MODULES[3]: {S24: 0.15, S48: 0.15},
    }
    measure, calls = _additive(costs)
    outcome = greedy_search(MODULES, [S24, S48], costs, measure, limit=100.5)
    # Order by cheapest candidate: layer 1 (0.05), layer 3 (0.15), layer 0 (0.20), layer 2 (1.50).
    assert outcome.order == [MODULES[1], MODULES[3], MODULES[0], MODULES[2]]
    # Equal sparsity (both 50 %): the cheaper candidate of each layer is tried first; ties keep
    # the given order. Layer 1 takes 2:4 (0.05), layer 3 2:4 (0.15), layer 0 4:8 (0.20):
    # 100.40; layer 2 fits with neither (101.90, 102.40) and stays dense.
    assert outcome.assignment == {MODULES[0]: S48, MODULES[1]: S24, MODULES[3]: S24}
    assert list(outcome.assignment) == [MODULES[0], MODULES[1], MODULES[3]]  # model order
    assert [(t.module, t.setting, t.accepted) for t in outcome.trials] == [
        (MODULES[1], S24, True), (MODULES[3], S24, True), (MODULES[0], S48, True),
        (MODULES[2], S48, False), (MODULES[2], S24, False)]
    assert all((t.ppl <= 100.5) == t.accepted for t in outcome.trials)
    assert len(calls) == len(outcome.trials)
    # Every trial measured the whole assignment so far plus the candidate.
    assert calls[-1] == {MODULES[1]: S24, MODULES[3]: S24, MODULES[0]: S48, MODULES[2]: S24}


def test_greedy_prefers_the_sparsest_candidate_that_fits():
    costs = {m: {S14: 0.4, S24: 0.1} for m in MODULES[:2]}
    measure, _ = _additive(costs)
    # 1:4 keeps a quarter: tried first even though it costs more, kept where it fits.
    outcome = greedy_search(MODULES[:2], [S24, S14], costs, measure, limit=100.5)
    assert outcome.assignment == {MODULES[0]: S14, MODULES[1]: S24}
    tight, _ = _additive(costs)
    assert greedy_search(MODULES[:2], [S24, S14], costs, tight, limit=100.0).assignment == {}


def test_greedy_refuses_bad_inputs():
    costs = {MODULES[0]: {S24: 0.1}}
    with pytest.raises(ValueError, match="dense is every module's fallback"):
        greedy_search(MODULES[:1], [Setting(0, 4, 0, 0)], costs, lambda a: 0.0, 1.0)
    with pytest.raises(ValueError, match="no sensitivity"):
        greedy_search(MODULES[:2], [S24], costs, lambda a: 0.0, 1.0)


def test_assignment_config_sparsifies_exactly_the_assigned_layers(tiny):
    model = load_tiny(tiny)
    cfg = json.loads(json.dumps(assignment_config({"model.layers.1.self_attn": S48}, "torch")))
    mts.sparsify(model, cfg)
    states = {name: m._mts_state for name, m in model.named_modules() if hasattr(m, "_mts_state")}
    assert list(states) == [f"model.layers.{i}.self_attn" for i in range(3)]
    for name, state in states.items():
        sparse = name == "model.layers.1.self_attn"
        assert state.config.enable is sparse
        if sparse:
            assert (state.kernel_kwargs["sparsity_n"], state.kernel_kwargs["sparsity_m"]) == (4, 8)
            assert state.kernel_kwargs["dense_window_size"] == 64
    with pytest.raises(ValueError, match="wildcard"):
        assignment_config({"model.layers.[1].self_attn": S24})


@pytest.mark.parametrize("text, value", [("0.5%", 0.5), ("0.5", 0.5), (" 2 % ", 2.0), ("100", 100.0)])
def test_budget_parsing(text, value):
    assert budget_pct(text) == value


def test_search_command_end_to_end(tiny, tmp_path, capsys):
    out_dir = tmp_path / "search"
    code, out, err = run_cli(capsys, "search", "--model", tiny["dir"], "--text-file", tiny["text"],
                             "--patterns", "2:4,8:16", "--window", 0, "--seq-len", 48, "--budget", "0.2%",
                             "--calib-windows", 2, "--heldout-windows", 3, "--device", "cpu", "--out", out_dir)
    assert code == 0, err
    doc = json.loads((out_dir / "search.json").read_text())
    config = json.loads((out_dir / "sparse_config.json").read_text())
    assert config == doc["config"]
    result, layers = doc["result"], doc["layers"]
    assert [layer["module"] for layer in layers] == [f"model.layers.{i}.self_attn" for i in range(3)]
    for layer in layers:
        for pattern in ("2:4", "8:16"):
            cand = layer["candidates"][pattern]
            assert cand["single_layer_delta_ppl_pct"] is not None and 0 < cand["dropped_mass"] < 1
    # The greedy record is consistent: accepted iff within the limit, one accepted per sparse layer.
    limit = doc["dense"]["heldout_ppl"] * (1 + 0.2 / 100)
    assert result["limit_ppl"] == pytest.approx(limit)
    for trial in doc["trials"]:
        assert trial["accepted"] == (trial["heldout_ppl"] <= limit)
    chosen = {t["module"]: t["pattern"] for t in doc["trials"] if t["accepted"]}
    assert {layer["module"]: layer["chosen"] for layer in layers if layer["chosen"] != "dense"} == chosen
    assert result["sparse_layers"] == len(chosen) and result["within_budget"]
    assert len(doc["trials"]) <= 3 * 2
    assert f"sparse layers: {len(chosen)} of 3" in out

    # The written config, applied with sparsify to a fresh model, gives the reported held-out
    # perplexity; saved and restored, it gives the same logits.
    ids = tokenize(tiny["tokenizer"], load_text(tiny["text"]).text)
    heldout = split_windows(split_tokens(ids, 0.5)[1], 48, 3, "held-out")
    model = load_tiny(tiny)
    mts.sparsify(model, config)
    assert perplexity(model, heldout) == pytest.approx(result["heldout_ppl"], rel=1e-6)
    mts.save(model, tmp_path / "ckpt")
    fresh = mts.restore(load_tiny(tiny), tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(fresh(heldout[:1]).logits, model(heldout[:1]).logits)
    enabled = [n for n, m in fresh.named_modules() if getattr(m, "_mts_state", None) and m._mts_state.config.enable]
    assert enabled == list(chosen) or sorted(enabled) == sorted(chosen)
    assert (out_dir / "search.png").read_bytes()[:4] == b"\x89PNG"


def test_rank_by_mass_skips_the_one_layer_runs(tiny, tmp_path, capsys):
    code, _, err = run_cli(capsys, "search", "--model", tiny["dir"], "--text-file", tiny["text"],
                           "--patterns", "2:4", "--window", 0, "--seq-len", 32, "--rank-by", "mass",
                           "--budget", 50, "--calib-windows", 1, "--heldout-windows", 1, "--device", "cpu",
                           "--out", tmp_path)
    assert code == 0, err
    doc = json.loads((tmp_path / "search.json").read_text())
    assert all(layer["candidates"]["2:4"]["single_layer_delta_ppl_pct"] is None for layer in doc["layers"])
    # Least dropped mass first.
    masses = {layer["module"]: layer["candidates"]["2:4"]["dropped_mass"] for layer in doc["layers"]}
    ranked = sorted(doc["layers"], key=lambda layer: layer["rank"])
    assert [masses[layer["module"]] for layer in ranked] == sorted(masses.values())
    # A +50 % budget takes every layer.
    assert doc["result"]["sparse_layers"] == 3


@pytest.mark.parametrize("argv, message", [
    (["--budget", "0"], "argument --budget: must be in (0, 100], got 0"),
    (["--budget=-1%"], "argument --budget: must be in (0, 100], got -1"),
    (["--budget", "150%"], "argument --budget: must be in (0, 100], got 150"),
    (["--budget", "half"], "argument --budget: expected a percentage such as 0.5%, got 'half'"),
    (["--patterns", "2:4,5:7"], "bad pattern '5:7'"),
    (["--patterns", "sparse"], "bad pattern 'sparse': write 'dense' or N:M"),
    (["--rank-by", "loss"], "argument --rank-by: invalid choice: 'loss'"),
    (["--heldout-fraction", "0.95"], "argument --heldout-fraction: must be in (0, 0.9], got 0.95"),
])
def test_bad_options_are_argument_errors(argv, message, capsys):
    assert message in argument_error(capsys, "search", *argv)


def test_errors_after_parsing(tiny, tmp_path, capsys):
    common = ("--model", tiny["dir"], "--text-file", tiny["text"], "--device", "cpu", "--out", tmp_path)
    code, _, err = run_cli(capsys, "search", *common, "--patterns", "dense,2:4")
    assert code == 2 and "'dense' is every layer's fallback" in err
    code, _, err = run_cli(capsys, "search", *common, "--seq-len", 129)
    assert code == 2 and "--seq-len 129 is longer than the model supports (max_position_embeddings = 128)" in err
    short = tmp_path / "short.txt"
    short.write_text("a few words " * 3)
    code, _, err = run_cli(capsys, "search", "--model", tiny["dir"], "--text-file", short, "--seq-len", 32,
                           "--device", "cpu", "--out", tmp_path)
    assert code == 2 and "fewer than --seq-len 32" in err


def test_help_reads_well(capsys):
    with pytest.raises(SystemExit):
        run_cli(capsys, "search", "--help")
    text = capsys.readouterr().out
    for needle in ("--budget PCT", "'0.5%' or '0.5'", "--rank-by {ppl,mass}", "sparse_config.json",
                   "mts.sparsify(model, json.load(", "examples:"):
        assert needle in text
