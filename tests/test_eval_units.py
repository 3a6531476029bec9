"""The eval job's small pieces: patterns, sweeps, windows, the table."""

from __future__ import annotations

import pytest
import torch

from modelopt_sparse.eval import EvalError, Setting, build_settings, parse_pattern, parse_patterns
from modelopt_sparse.eval.data import make_windows
from modelopt_sparse.eval.perplexity import SettingResult
from modelopt_sparse.eval.report import format_table


def test_parse_patterns():
    assert parse_pattern("dense") == (0, 4)
    assert parse_pattern(" 2:4 ") == (2, 4)
    assert parse_patterns("dense,2:4, 8:16,2:4") == [(0, 4), (2, 4), (8, 16)]
    for bad, match in (("2:3", "sparsity_m must be one of"), ("16:16", "0 <= N < M"), ("2-4", "N:M"),
                       ("2:4:8", "N:M"), ("-1:4", "N:M"), ("0:8", "write 'dense'")):
        with pytest.raises(EvalError, match=match):
            parse_pattern(bad)


def test_build_settings_dense_first_once():
    settings = build_settings([(2, 4), (0, 4), (4, 8)], [0, 4, 0], [64])
    assert settings[0] == Setting(0, 4, 0, 0) and settings[0].dense
    assert [s.label for s in settings[1:]] == [
        "2:4 sink=0 window=64", "2:4 sink=4 window=64", "4:8 sink=0 window=64", "4:8 sink=4 window=64"]
    cfg = settings[1].sparse_cfg("torch")["sparse_cfg"]["default"]
    assert cfg == {"sparsity_n": 2, "sparsity_m": 4, "num_sink_tokens": 0, "dense_window_size": 64,
                   "backend": "torch", "enable": True}
    with pytest.raises(EvalError, match="--window must be >= 0"):
        build_settings([(2, 4)], [0], [-1])


def test_windows_do_not_overlap_and_drop_the_tail():
    ids = torch.arange(103)
    w = make_windows(ids, 25, None)
    assert w.shape == (4, 25) and w[1, 0] == 25 and w[-1, -1] == 99
    assert make_windows(ids, 25, 2).shape == (2, 25)
    assert make_windows(ids, 25, 10).shape == (4, 25)
    with pytest.raises(EvalError, match="only 103 tokens"):
        make_windows(ids, 104, None)


def test_table_has_one_row_per_setting_and_delta_vs_dense():
    def result(setting, nll):
        return SettingResult(setting, nll=nll, predicted_tokens=100, windows=1, seconds=1.0,
                             timed_tokens=101, timed_seconds=1.0, timed_with_stats=False, stats_windows=1,
                             kept_fraction=0.5, dropped_mass=0.01)

    dense = result(Setting(0, 4, 0, 0), 200.0)
    sparse = result(Setting(2, 4, 4, 64), 210.0)
    lines = format_table([dense, sparse]).splitlines()
    assert lines[0].split()[:4] == ["pattern", "sink", "window", "ppl"]
    assert lines[2].split()[0] == "dense" and lines[3].split()[:3] == ["2:4", "4", "64"]
    expected = 100 * (torch.tensor(2.1).exp() / torch.tensor(2.0).exp() - 1)
    assert f"{expected.item():+.2f}%" in lines[3]
