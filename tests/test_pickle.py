"""Converted models pickle (pickle, torch.save, copy.deepcopy, a fresh process).

The library's own save/restore never pickles; this is for users who pickle whole models
(torch.save(model), multiprocessing).
"""

from __future__ import annotations

import copy
import io
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch

import modelopt_sparse as mts

from .hf_tiny import logits, sparse_cfg, tiny_model, token_ids

IDS = token_ids(2, 24)


@pytest.fixture(scope="module")
def sparse():
    model = mts.sparsify(tiny_model("llama", seed=0), sparse_cfg(2, 4, 0, 2))
    mts.disable(model, "*layers.0.*")  # a per-module flag that must survive the trip
    return model


def _assert_same_sparse_model(copy_, original):
    assert copy_ is not original and mts.is_sparsified(copy_)
    torch.testing.assert_close(logits(copy_, IDS), logits(original, IDS), atol=0, rtol=0)
    assert mts.print_summary(copy_, file=io.StringIO()) == mts.print_summary(original, file=io.StringIO())
    assert mts.sparse_state(copy_) == mts.sparse_state(original)
    attn, attn0 = copy_.model.layers[1].self_attn, original.model.layers[1].self_attn
    assert type(attn) is type(attn0) and attn._mts_state.config == attn0._mts_state.config
    assert attn.config is copy_.config  # the copy's modules share its config, not the original's
    assert copy_.config is not original.config


def test_pickle_round_trip(sparse):
    _assert_same_sparse_model(pickle.loads(pickle.dumps(sparse)), sparse)


def test_pickle_the_class_itself(sparse):
    cls = type(sparse.model.layers[0].self_attn)
    assert cls.__name__ == "SparseLlamaAttention"
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        assert pickle.loads(pickle.dumps(cls, protocol=protocol)) is cls


def test_torch_save_load(sparse, tmp_path):
    path = tmp_path / "model.pt"
    torch.save(sparse, path)
    _assert_same_sparse_model(torch.load(path, weights_only=False), sparse)


def test_deepcopy(sparse):
    _assert_same_sparse_model(copy.deepcopy(sparse), sparse)


def test_unknown_names_still_raise_attribute_error():
    assert not hasattr(mts.conversion, "NoSuchThing")
    with pytest.raises(AttributeError):
        mts.conversion.SparseNoSuchThing  # noqa: B018


def test_fresh_process_unpickles(sparse, tmp_path):
    """A new interpreter has no sparse classes and no registered attention function yet:
    loading must rebuild the classes by name and the model must run."""
    torch.save(sparse, tmp_path / "model.pt")
    torch.save({"ids": IDS, "logits": logits(sparse, IDS)}, tmp_path / "want.pt")
    script = textwrap.dedent(f"""
        import io, pickle, sys, torch
        model = torch.load({str(tmp_path / 'model.pt')!r}, weights_only=False)
        assert "modelopt_sparse" in sys.modules  # imported by the name lookup, not by us
        import modelopt_sparse as mts
        want = torch.load({str(tmp_path / 'want.pt')!r})
        with torch.no_grad():
            got = model(input_ids=want["ids"], use_cache=False).logits
        torch.testing.assert_close(got, want["logits"], atol=0, rtol=0)
        assert mts.is_sparsified(model)
        again = pickle.loads(pickle.dumps(model))
        mts.print_summary(again, file=io.StringIO())
        print("OK", type(model.model.layers[1].self_attn).__name__)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["OK", "SparseLlamaAttention"]
