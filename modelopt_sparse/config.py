"""Configuration of the plugin layer (pydantic v2) and the presets.

A :class:`SparseAttentionConfig` maps module-name patterns to partial
:class:`SparseAttentionAttributeConfig` entries. For one attention module the entries are
merged in this order:

1. the class defaults of :class:`SparseAttentionAttributeConfig`;
2. the ``"default"`` entry, if any (it matches every attention module);
3. every other entry whose pattern matches the full module name, in mapping order.

Each entry overrides only the fields it sets explicitly (pydantic's ``model_fields_set``),
so ``{"*layers.0.*": {"enable": False}}`` disables layer 0 and leaves its N:M untouched. A
module that no entry matches (possible only without a ``"default"`` entry) runs dense.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)

from .kernels.semantics import check_pattern
from .methods import get_method

__all__ = [
    "SparseAttentionAttributeConfig",
    "SparseAttentionConfig",
    "Pattern",
    "SPARSE_SOFTMAX_DEFAULT",
    "SPARSE_SOFTMAX_4_8",
    "SPARSE_SOFTMAX_8_16",
    "SPARSE_SOFTMAX_2_4_SINKS",
]

DEFAULT_KEY = "default"
# Validation context flag: an entry of sparse_cfg may be partial (cross-field rules wait for the merge).
_PARTIAL = "modelopt_sparse_partial"

Pattern = Union[str, Callable[[str], bool]]


class SparseAttentionAttributeConfig(BaseModel):
    """Sparse-attention settings of one attention module."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: StrictStr = Field("triton_sparse_softmax", description="a registered method name")
    enable: StrictBool = Field(True, description="False: the module runs dense (same kernel, N=0)")
    sparsity_n: StrictInt = Field(2, description="keep N scores of every group of M keys; 0 = dense")
    sparsity_m: StrictInt = Field(4, description="group size M: 2, 4, 8 or 16")
    num_sink_tokens: StrictInt = Field(0, description="first keys of every sequence, always kept")
    dense_window_size: StrictInt = Field(64, description="keys this close before a query are always kept")
    tie_break: Literal["threshold", "index"] = "threshold"
    backend: Literal["auto", "triton", "torch"] = Field(
        "auto", description="auto: on CUDA the kernels' own choice per call (the Hopper engine for long "
        "prefills on sm_90, else triton), torch (the reference) on CPU"
    )

    @model_validator(mode="before")
    @classmethod
    def _name_unknown_keys(cls, data: Any) -> Any:
        # pydantic's own extra="forbid" error is terse; name the key and suggest a spelling.
        if isinstance(data, Mapping):
            fields = list(cls.model_fields)
            for key in data:
                if key not in fields:
                    close = difflib.get_close_matches(str(key), fields, n=1)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    raise ValueError(f"unknown sparse-attention config key {key!r}{hint}; allowed keys: {fields}")
        return data

    @field_validator("method")
    @classmethod
    def _method_registered(cls, value: str) -> str:
        get_method(value)
        return value

    @model_validator(mode="after")
    def _check_combination(self, info: ValidationInfo):
        if info.context and info.context.get(_PARTIAL):
            return self
        try:
            check_pattern(
                self.sparsity_n, self.sparsity_m, self.num_sink_tokens, self.dense_window_size, self.tie_break
            )
        except TypeError as err:  # pydantic reports only ValueError/AssertionError as validation errors
            raise ValueError(str(err)) from None
        method_cls = get_method(self.method)
        if self.backend not in method_cls.backends:
            raise ValueError(
                f"method {self.method!r} supports backend in {list(method_cls.backends)}, got {self.backend!r}"
            )
        return self

    def set_fields(self) -> dict[str, Any]:
        """Only the fields given explicitly: what this entry overrides when merged."""
        return {name: getattr(self, name) for name in type(self).model_fields if name in self.model_fields_set}

    def merged_with(self, override: SparseAttentionAttributeConfig) -> SparseAttentionAttributeConfig:
        """This config with the explicitly set fields of ``override`` on top, fully validated."""
        data = self.model_dump()
        data.update(override.set_fields())
        return SparseAttentionAttributeConfig.model_validate(data)


def _parse_entry(pattern: Any, value: Any) -> SparseAttentionAttributeConfig:
    if isinstance(value, SparseAttentionAttributeConfig):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(
            f"sparse_cfg[{_pattern_label(pattern)}] must be a dict or SparseAttentionAttributeConfig, "
            f"got {type(value).__name__}"
        )
    try:
        return SparseAttentionAttributeConfig.model_validate(dict(value), context={_PARTIAL: True})
    except ValidationError as err:
        messages = "; ".join(
            (f"{'.'.join(map(str, e['loc']))}: " if e["loc"] else "") + e["msg"].removeprefix("Value error, ")
            for e in err.errors()
        )
        raise ValueError(f"sparse_cfg[{_pattern_label(pattern)}]: {messages}") from None


def _pattern_label(pattern: Pattern) -> str:
    if isinstance(pattern, str):
        return repr(pattern)
    return f"<callable {getattr(pattern, '__qualname__', type(pattern).__name__)}>"


class SparseAttentionConfig(BaseModel):
    """Ordered mapping from module-name patterns to (partial) attribute configs.

    Keys are ``"default"``, fnmatch patterns over the full module name (``"*layers.0.*"``)
    or callables ``name -> bool``. Values are dicts or :class:`SparseAttentionAttributeConfig`
    objects. The mapping is stored read-only; build a new config to change it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    sparse_cfg: Any = Field(description="ordered {pattern: attribute config}")

    @model_validator(mode="before")
    @classmethod
    def _name_unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            unknown = [k for k in data if k != "sparse_cfg"]
            if unknown:
                raise ValueError(
                    f"unknown SparseAttentionConfig key {unknown[0]!r}; the only key is 'sparse_cfg' "
                    "(a mapping from module-name patterns to attribute configs)"
                )
        return data

    @field_validator("sparse_cfg", mode="plain")
    @classmethod
    def _parse_sparse_cfg(cls, value: Any) -> Mapping[Pattern, SparseAttentionAttributeConfig]:
        if not isinstance(value, Mapping):
            raise ValueError(f"sparse_cfg must be a mapping of pattern -> config, got {type(value).__name__}")
        if not value:
            raise ValueError("sparse_cfg is empty: give at least a 'default' entry")
        parsed: dict[Pattern, SparseAttentionAttributeConfig] = {}
        for pattern, entry in value.items():
            if not (isinstance(pattern, str) and pattern) and not callable(pattern):
                raise ValueError(
                    f"sparse_cfg keys must be non-empty strings (fnmatch patterns or 'default') or "
                    f"callables name -> bool, got {pattern!r}"
                )
            parsed[pattern] = _parse_entry(pattern, entry)
        # Catch impossible combinations now, not at conversion time: the default alone and
        # every entry on top of the default must be valid configs.
        base, base_label = SparseAttentionAttributeConfig(), "(class defaults)"
        if DEFAULT_KEY in parsed:
            base, base_label = _merge_or_raise(base, parsed[DEFAULT_KEY], [DEFAULT_KEY]), DEFAULT_KEY
        for pattern, entry in parsed.items():
            if pattern != DEFAULT_KEY:
                _merge_or_raise(base, entry, [base_label, pattern])
        return MappingProxyType(parsed)

    @field_serializer("sparse_cfg")
    def _serialize_sparse_cfg(self, value, info):
        # Entries dump only their explicit fields, so that dumping and re-validating merges the same.
        # JSON keys must be strings: callable patterns appear by name there (not re-loadable).
        return {
            (p if isinstance(p, str) or info.mode == "python" else _pattern_label(p)): e.set_fields()
            for p, e in value.items()
        }

    @classmethod
    def coerce(cls, config: Any) -> SparseAttentionConfig:
        """Accept a :class:`SparseAttentionConfig` or a plain ``{"sparse_cfg": {...}}`` dict."""
        if isinstance(config, cls):
            return config
        if isinstance(config, Mapping):
            return cls.model_validate(dict(config))
        raise TypeError(
            f"config must be a SparseAttentionConfig or a dict with key 'sparse_cfg', got {type(config).__name__}"
        )

    def resolve(self, module_name: str) -> tuple[SparseAttentionAttributeConfig | None, list[str]]:
        """Merged config of one module and the labels of the entries that matched it.

        Returns ``(None, [])`` when no entry matches (the module then runs dense).
        """
        config = SparseAttentionAttributeConfig()
        matched: list[str] = []
        entries = list(self.sparse_cfg.items())
        # "default" is the base of every module, wherever it sits in the mapping.
        entries.sort(key=lambda item: item[0] != DEFAULT_KEY)
        for pattern, entry in entries:
            if pattern == DEFAULT_KEY or _matches(pattern, module_name):
                matched.append(pattern if isinstance(pattern, str) else _pattern_label(pattern))
                config = _merge_or_raise(config, entry, matched, module_name)
        if not matched:
            return None, []
        return config, matched

    def to_json(self) -> list[dict[str, Any]]:
        """JSON-able record of the entries (callable patterns are recorded by name only)."""
        out = []
        for pattern, entry in self.sparse_cfg.items():
            if isinstance(pattern, str):
                out.append({"pattern": pattern, "settings": entry.set_fields()})
            else:
                out.append({"pattern": None, "callable": _pattern_label(pattern), "settings": entry.set_fields()})
        return out


def _matches(pattern: Pattern, module_name: str) -> bool:
    if isinstance(pattern, str):
        return fnmatch.fnmatchcase(module_name, pattern)
    result = pattern(module_name)
    if not isinstance(result, bool):
        raise TypeError(f"pattern {_pattern_label(pattern)} must return a bool, got {type(result).__name__}")
    return result


def _merge_or_raise(base, entry, matched, module_name=None) -> SparseAttentionAttributeConfig:
    try:
        return base.merged_with(entry)
    except ValidationError as err:
        labels = ", ".join(m if isinstance(m, str) else _pattern_label(m) for m in matched)
        where = f" for module {module_name!r}" if module_name else ""
        messages = "; ".join(e["msg"].removeprefix("Value error, ") for e in err.errors())
        raise ValueError(f"sparse_cfg entries [{labels}] merge into an invalid config{where}: {messages}") from None


def _preset(**fields) -> SparseAttentionConfig:
    return SparseAttentionConfig(sparse_cfg={DEFAULT_KEY: {"method": "triton_sparse_softmax", "enable": True, **fields}})


# 2:4 on every attention module with the kernel's own defaults: no sinks, a 64-key dense
# window. docs/api.md ("Presets") explains why sinks are off by default.
SPARSE_SOFTMAX_DEFAULT = _preset(sparsity_n=2, sparsity_m=4, num_sink_tokens=0, dense_window_size=64)
SPARSE_SOFTMAX_4_8 = _preset(sparsity_n=4, sparsity_m=8, num_sink_tokens=0, dense_window_size=64)
SPARSE_SOFTMAX_8_16 = _preset(sparsity_n=8, sparsity_m=16, num_sink_tokens=0, dense_window_size=64)
# StreamingLLM-style: 4 sink tokens plus a wider local window kept dense.
SPARSE_SOFTMAX_2_4_SINKS = _preset(sparsity_n=2, sparsity_m=4, num_sink_tokens=4, dense_window_size=128)
