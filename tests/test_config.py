"""Config validation, pattern merging, presets and the method registry."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

import modelopt_sparse as mts
from modelopt_sparse.config import SparseAttentionAttributeConfig as Attr
from modelopt_sparse.config import SparseAttentionConfig as Cfg

L0, L1 = "model.layers.0.self_attn", "model.layers.1.self_attn"


# --------------------------------------------------------------------------------------
# Attribute config
# --------------------------------------------------------------------------------------
def test_attribute_defaults_match_the_kernel():
    attr = Attr()
    assert (attr.method, attr.enable, attr.backend, attr.tie_break) == ("triton_sparse_softmax", True, "auto", "threshold")
    assert (attr.sparsity_n, attr.sparsity_m, attr.num_sink_tokens, attr.dense_window_size) == (2, 4, 0, 64)
    assert attr.model_fields_set == set()


@pytest.mark.parametrize(
    "fields,match",
    [
        ({"sparsity_m": 6}, r"sparsity_m must be one of \(2, 4, 8, 16\)"),
        ({"sparsity_n": 4}, r"0 <= N < M"),
        ({"sparsity_n": -1}, r"0 <= N < M"),
        ({"num_sink_tokens": -2}, "num_sink_tokens must be >= 0"),
        ({"dense_window_size": -1}, "dense_window_size must be >= 0"),
        ({"tie_break": "random"}, "tie_break"),
        ({"backend": "cuda"}, "backend"),
        ({"method": "no_such_method"}, r"unknown sparse-attention method 'no_such_method'.*triton_sparse_softmax"),
        ({"method": "torch_sparse_softmax", "backend": "triton"}, r"supports backend in \['auto', 'torch'\]"),
        ({"sparsity_n": True}, "valid integer"),
        ({"sparsity_n": 2.0}, "valid integer"),
        ({"sparsity_n": "2"}, "valid integer"),
        ({"enable": 1}, "valid boolean"),
        ({"sparse_n": 2}, r"unknown sparse-attention config key 'sparse_n' \(did you mean 'sparsity_n'\?\)"),
        ({"window": 2}, r"unknown sparse-attention config key 'window'"),
    ],
)
def test_attribute_errors(fields, match):
    with pytest.raises(ValidationError, match=match):
        Attr(**fields)


def test_attribute_config_is_frozen():
    with pytest.raises(ValidationError):
        Attr().sparsity_n = 3


# --------------------------------------------------------------------------------------
# Pattern merging
# --------------------------------------------------------------------------------------
def test_later_patterns_override_only_their_fields():
    cfg = Cfg(sparse_cfg={
        "default": {"sparsity_n": 4, "sparsity_m": 8, "num_sink_tokens": 2},
        "*layers.0.*": {"sparsity_n": 6},          # valid only together with the default's M=8
        "*layers.*": {"dense_window_size": 16},
        "*layers.1.*": {"enable": False},
    })
    a0, p0 = cfg.resolve(L0)
    assert (a0.sparsity_n, a0.sparsity_m, a0.num_sink_tokens, a0.dense_window_size, a0.enable) == (6, 8, 2, 16, True)
    assert p0 == ["default", "*layers.0.*", "*layers.*"]
    a1, p1 = cfg.resolve(L1)
    assert (a1.sparsity_n, a1.sparsity_m, a1.num_sink_tokens, a1.dense_window_size, a1.enable) == (4, 8, 2, 16, False)
    assert p1 == ["default", "*layers.*", "*layers.1.*"]


def test_default_is_the_base_wherever_it_sits():
    cfg = Cfg(sparse_cfg={"*layers.0.*": {"sparsity_n": 1}, "default": {"sparsity_n": 3, "sparsity_m": 8}})
    attr, patterns = cfg.resolve(L0)
    assert (attr.sparsity_n, attr.sparsity_m) == (1, 8) and patterns == ["default", "*layers.0.*"]


def test_config_objects_merge_by_fields_set():
    cfg = Cfg(sparse_cfg={
        "default": Attr(sparsity_n=4, sparsity_m=8),
        "*layers.1.*": Attr(num_sink_tokens=3),  # N/M not set explicitly: not reset to 2:4
    })
    attr, _ = cfg.resolve(L1)
    assert (attr.sparsity_n, attr.sparsity_m, attr.num_sink_tokens) == (4, 8, 3)


def test_callable_patterns():
    cfg = Cfg(sparse_cfg={"default": {}, (lambda name: name.endswith("1.self_attn")): {"enable": False}})
    assert cfg.resolve(L0)[0].enable and not cfg.resolve(L1)[0].enable
    assert cfg.resolve(L1)[1][1].startswith("<callable")
    record = cfg.to_json()
    json.dumps(record)
    assert record[1]["pattern"] is None and record[1]["settings"] == {"enable": False}
    bad = Cfg(sparse_cfg={(lambda name: 1): {}})
    with pytest.raises(TypeError, match="must return a bool"):
        bad.resolve(L0)


def test_unmatched_module_without_default():
    cfg = Cfg(sparse_cfg={"*layers.0.*": {"sparsity_n": 1}})
    assert cfg.resolve(L1) == (None, [])
    assert cfg.resolve(L0)[0].sparsity_n == 1


def test_invalid_combination_names_the_entries():
    with pytest.raises(ValidationError, match=r"entries \[default, \*layers\.0\.\*\] merge into an invalid config.*N=6, M=4"):
        Cfg(sparse_cfg={"default": {}, "*layers.0.*": {"sparsity_n": 6}})
    # Only the combination of two patterns is invalid: caught when the module is resolved.
    cfg = Cfg(sparse_cfg={"*layers.*": {"sparsity_m": 4}, "*layers.0.*": {"sparsity_n": 5, "sparsity_m": 8}})
    assert cfg.resolve(L0)[0].sparsity_n == 5
    cfg2 = Cfg(sparse_cfg={"*layers.0.*": {"sparsity_n": 5, "sparsity_m": 8}, "*layers.*": {"sparsity_m": 4}})
    assert cfg2.resolve(L1)[0].sparsity_m == 4
    with pytest.raises(ValueError, match=r"\[\*layers\.0\.\*, \*layers\.\*\].*'model\.layers\.0\.self_attn'.*N=5, M=4"):
        cfg2.resolve(L0)
    with pytest.raises(ValidationError, match=r"entries \[\(class defaults\), \*attn\]"):
        Cfg(sparse_cfg={"*attn": {"sparsity_m": 2}})


@pytest.mark.parametrize(
    "data,match",
    [
        ({"sparse_cfg": {}}, "sparse_cfg is empty"),
        ({"sparse_cfg": [("default", {})]}, "must be a mapping"),
        ({"sparse_cfg": {"default": 3}}, r"sparse_cfg\['default'\] must be a dict"),
        ({"sparse_cfg": {"": {}}}, "keys must be non-empty strings"),
        ({"sparse_cfg": {7: {}}}, "keys must be non-empty strings"),
        ({"sparse_cfg": {"*attn": {"sparsity": 2}}}, r"sparse_cfg\['\*attn'\]: unknown sparse-attention config key 'sparsity'"),
        ({"sparse_cfg": {"default": {"method": "nope"}}}, "unknown sparse-attention method 'nope'"),
        ({"sparse_cfg": {"default": {}}, "extra": 1}, "unknown SparseAttentionConfig key 'extra'"),
        ({}, "sparse_cfg"),
    ],
)
def test_config_errors(data, match):
    with pytest.raises(ValidationError, match=match):
        Cfg.coerce(data)


def test_dicts_and_objects_are_both_accepted():
    as_dict = {"sparse_cfg": {"default": {"sparsity_n": 1}}}
    assert Cfg.coerce(as_dict).resolve(L0)[0].sparsity_n == 1
    obj = Cfg(**as_dict)
    assert Cfg.coerce(obj) is obj
    with pytest.raises(TypeError, match="SparseAttentionConfig or a dict"):
        Cfg.coerce("default")


# --------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "preset,nm,sinks,window",
    [
        (mts.SPARSE_SOFTMAX_DEFAULT, (2, 4), 0, 64),
        (mts.SPARSE_SOFTMAX_4_8, (4, 8), 0, 64),
        (mts.SPARSE_SOFTMAX_8_16, (8, 16), 0, 64),
        (mts.SPARSE_SOFTMAX_2_4_SINKS, (2, 4), 4, 128),
    ],
)
def test_presets(preset, nm, sinks, window):
    attr, patterns = preset.resolve(L0)
    assert (attr.sparsity_n, attr.sparsity_m) == nm and attr.enable and patterns == ["default"]
    assert (attr.num_sink_tokens, attr.dense_window_size, attr.method) == (sinks, window, "triton_sparse_softmax")
    with pytest.raises(TypeError):
        preset.sparse_cfg["*"] = {}  # shared presets are read-only
    with pytest.raises(ValidationError):
        preset.sparse_cfg = {}


def test_preset_can_be_extended():
    cfg = Cfg(sparse_cfg={**mts.SPARSE_SOFTMAX_DEFAULT.sparse_cfg, "*layers.0.*": {"enable": False}})
    assert not cfg.resolve(L0)[0].enable and cfg.resolve(L1)[0].enable


# --------------------------------------------------------------------------------------
# Method registry
# --------------------------------------------------------------------------------------
def test_builtin_methods():
    assert {"triton_sparse_softmax", "torch_sparse_softmax"} <= set(mts.registered_methods())
    assert mts.get_method("triton_sparse_softmax") is mts.TritonSparseSoftmax
    assert mts.get_method("torch_sparse_softmax").backends == ("auto", "torch")
    with pytest.raises(ValueError, match=r"unknown sparse-attention method 'x'; registered methods: \["):
        mts.get_method("x")


def test_register_custom_method():
    @mts.register_method("test_config_custom")
    class Custom(mts.SparseAttentionMethod):
        backends = ("torch",)

    assert mts.get_method("test_config_custom") is Custom and Custom.name == "test_config_custom"
    assert Attr(method="test_config_custom", backend="torch").method == "test_config_custom"
    with pytest.raises(ValidationError, match=r"supports backend in \['torch'\], got 'auto'"):
        Attr(method="test_config_custom")
    # Re-registering the same class is harmless; another class needs overwrite=True.
    mts.register_method("test_config_custom")(Custom)
    with pytest.raises(ValueError, match="already registered"):
        @mts.register_method("test_config_custom")
        class Other(mts.SparseAttentionMethod):
            pass

    @mts.register_method("test_config_custom", overwrite=True)
    class Replacement(mts.SparseAttentionMethod):
        pass

    assert mts.get_method("test_config_custom") is Replacement


def test_register_errors():
    with pytest.raises(TypeError, match="SparseAttentionMethod subclass"):
        mts.register_method("test_config_bad")(object)
    with pytest.raises(ValueError, match="non-empty string"):
        mts.register_method("")
    with pytest.raises(ValueError, match="backends must be"):
        @mts.register_method("test_config_bad_backend")
        class Bad(mts.SparseAttentionMethod):
            backends = ("cuda",)
    assert "test_config_bad" not in mts.registered_methods()


def test_config_dump_round_trips():
    cfg = Cfg(sparse_cfg={"default": {"sparsity_n": 4, "sparsity_m": 8}, "*layers.0.*": {"enable": False}})
    dumped = cfg.model_dump()
    assert dumped == {"sparse_cfg": {"default": {"sparsity_n": 4, "sparsity_m": 8}, "*layers.0.*": {"enable": False}}}
    again = Cfg.model_validate(json.loads(cfg.model_dump_json()))
    assert again.resolve(L0) == cfg.resolve(L0) and again.resolve(L1) == cfg.resolve(L1)
