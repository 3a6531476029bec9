"""Exact wording of messages that list or explain: truncated lists say how much is left out,
and allowed values are stated once."""

from __future__ import annotations

import pytest

import modelopt_sparse as mts
from modelopt_sparse import cli

from .hf_tiny import sparse_cfg


def test_bad_m_is_explained_once_by_the_eval_command(capsys):
    with pytest.raises(SystemExit):
        cli.main(["eval", "--patterns", "dense,2:3"])
    err = capsys.readouterr().err
    assert err.strip().endswith("argument --patterns: bad pattern '2:3': sparsity_m must be one of (2, 4, 8, 16), got 3")
    assert err.count("one of") == 1


def test_bad_m_is_explained_once_by_the_config_and_the_kernel():
    import torch

    with pytest.raises(ValueError) as err:
        mts.SparseAttentionConfig.coerce(sparse_cfg(2, 3))
    assert str(err.value).count("must be one of (2, 4, 8, 16)") == 1
    q = torch.randn(8, 2, 16)
    with pytest.raises(ValueError) as err:
        mts.attention(q, q, q, torch.tensor([0]), torch.tensor([8]), 8, sparsity_n=2, sparsity_m=3)
    assert str(err.value) == "sparsity_m must be one of (2, 4, 8, 16), got 3"
