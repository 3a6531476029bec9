"""Converting HuggingFace attention modules in place: sparsify, enable/disable, summary.

Conversion swaps the ``__class__`` of each attention module to a subclass created once per
original class (``LlamaAttention`` -> ``SparseLlamaAttention``). The subclass adds no
parameters: parameter names and state_dict keys stay the same, and the module's own forward
reaches our attention function through transformers' dispatch on
``config._attn_implementation``. It adds a ``forward`` only to classes that can serve as
cross-attention (BART's and Whisper's one class for self- and cross-attention): that forward
records whether the call is a cross-attention call (see :func:`_cross_input`) and calls the
original. Everything sparse lives on the module instance
(``_mts_state``, ``_mts_stats``), so two models, or two threads, never share flags. The HF
configs that conversion changes are copied first, so models that shared a config object
with the converted one keep running as before.
"""

from __future__ import annotations

import copy
import fnmatch
import inspect
import sys
from dataclasses import dataclass, replace
from typing import Any

import torch

from .config import Pattern, SparseAttentionAttributeConfig, SparseAttentionConfig
from .hf_attention import ATTN_IMPLEMENTATION, register_with_transformers
from .hf_attention.forward import CROSS_CALL_ATTR, cross_attention_sparse_message, is_non_causal_decoder_module
from .methods import SparseAttentionMethod, checked_kernel_kwargs, get_method

__all__ = [
    "uses_attention_interface",
    "sparsify",
    "enable",
    "disable",
    "is_sparsified",
    "print_summary",
    "sparse_modules",
]

# The attribute of the model config that save_pretrained writes to config.json.
HF_CONFIG_ATTR = "modelopt_sparse"

_SPARSE_CLASSES: dict[type, type] = {}


@dataclass(frozen=True)
class ModuleAttention:
    """The module's own attention, as conversion found it (sparsity leaves it unchanged).

    At run time the attention function takes these from the call itself (``is_causal``,
    ``sliding_window``, ``softcap``, ``s_aux``), as transformers' own integrations do;
    this record is what :func:`print_summary` shows and what conversion checked.
    """

    causal: bool = True
    sliding_window: int | None = None
    softcap: float | None = None
    learned_sinks: bool = False
    # A cross-attention module by its class or flag; a class that serves both (BART's) is
    # told apart per call, by the forward's arguments.
    cross: bool = False
    # A decoder's module of a class that serves both, not causal itself: BART's encoder_attn
    # (cross-attention calls, dense) or PegasusX's decoder self_attn (causal self-attention
    # calls); which, only its calls tell.
    decoder_either: bool = False

    def describe(self) -> str:
        """``causal``, ``bidirectional``, ``cross-attention``, ``causal self / dense cross``, or
        with the features: ``causal, window 8, softcap 50, learned sinks``."""
        if self.cross:
            kind = "cross-attention"
        elif self.decoder_either:
            kind = "causal self / dense cross"
        else:
            kind = "causal" if self.causal else "bidirectional"
        parts = [kind]
        if self.sliding_window is not None:
            parts.append(f"window {self.sliding_window}")
        if self.softcap is not None:
            parts.append(f"softcap {self.softcap:g}")
        if self.learned_sinks:
            parts.append("learned sinks")
        return ", ".join(parts)


@dataclass(frozen=True)
class ModuleSparseState:
    """Per-module conversion record read by the attention function on every call."""

    name: str
    original_class: str
    patterns: tuple[str, ...]
    config: SparseAttentionAttributeConfig
    method: SparseAttentionMethod
    kernel_kwargs: dict[str, Any]
    attention: ModuleAttention = ModuleAttention()


class SparseAttentionModule:
    """Marker base of converted attention modules (mixed into the dynamic subclasses)."""


# Pickle stores classes by reference (module + qualname) and cannot be told to do otherwise,
# so torch.save(model), pickle and multiprocessing need the dynamic classes to be found by
# name. Their qualname encodes the original class's import path ("/" for "." so that pickle
# does not split it; neither "/" nor ":" occurs in Python names), and the module __getattr__
# below rebuilds the class from it in any process. __name__ stays readable.
_ENCODED_PREFIX = "Sparse<"


def _encoded_qualname(cls: type) -> str:
    return f"{_ENCODED_PREFIX}{cls.__module__.replace('.', '/')}:{cls.__qualname__.replace('.', '/')}>"


def _sparse_class(cls: type) -> type:
    if issubclass(cls, SparseAttentionModule):
        return cls
    sparse_cls = _SPARSE_CLASSES.get(cls)
    if sparse_cls is None:
        sparse_cls = type(f"Sparse{cls.__name__}", (cls, SparseAttentionModule), {"__module__": __name__})
        cross = _cross_input(cls)
        if cross is not None:
            sparse_cls.forward = _cross_marking_forward(sparse_cls, *cross)
        sparse_cls.__qualname__ = _encoded_qualname(cls)
        _SPARSE_CLASSES[cls] = sparse_cls
    return sparse_cls


# The forward arguments that make a transformers attention module a cross-attention one when
# they are not None: its keys and values come from them (another sequence: an encoder's output,
# image features), its queries from hidden_states.
_CROSS_INPUTS = ("key_value_states", "encoder_hidden_states", "cross_attention_states")


def _cross_input(cls: type) -> tuple[str, int] | None:
    """``(name, positional index after self)`` of the forward argument that carries a
    cross-attention call's keys (:data:`_CROSS_INPUTS`), or None if the class has none."""
    chain = _forward_chain(cls)
    if not chain:
        return None
    params = list(inspect.signature(chain[0]).parameters.values())[1:]
    for index, param in enumerate(params):
        if param.name in _CROSS_INPUTS:
            positional = param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD)
            return param.name, index if positional else len(params) + 1
    return None


def _cross_marking_forward(sparse_cls: type, name: str, index: int):
    """A forward that tells the attention function whether this call is cross-attention: the
    masks transformers builds for it look like those of a self-attention chunk after a cache,
    and only the module's own argument tells them apart."""

    def forward(self, *args, **kwargs):
        source = kwargs.get(name) if name in kwargs else (args[index] if len(args) > index else None)
        setattr(self, CROSS_CALL_ATTR, source is not None)
        try:
            return super(sparse_cls, self).forward(*args, **kwargs)
        finally:
            setattr(self, CROSS_CALL_ATTR, False)

    forward.__name__ = forward.__qualname__ = "forward"
    return forward


def is_cross_attention_only(module: torch.nn.Module) -> bool:
    """Whether the module is a cross-attention module by its class or its flag (BERT's
    ``BertCrossAttention``, GPT-2's ``is_cross_attention``), not only by a call's arguments."""
    return bool(getattr(module, "is_cross_attention", False)) or "CrossAttention" in original_class_name(module)


def __getattr__(name: str) -> type:
    """Module attribute lookup of last resort: the converted classes, by their encoded qualname."""
    if not (name.startswith(_ENCODED_PREFIX) and name.endswith(">") and ":" in name):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    module_path, _, qualname = name[len(_ENCODED_PREFIX):-1].partition(":")
    try:
        original: Any = importlib.import_module(module_path.replace("/", "."))
        for part in qualname.split("/"):
            original = getattr(original, part)
    except (ImportError, AttributeError) as err:
        # AttributeError, not ImportError, so that hasattr() and pickle report it as a lookup failure.
        raise AttributeError(f"cannot rebuild {name}: the original class is not importable ({err})") from None
    if not (isinstance(original, type) and issubclass(original, torch.nn.Module)):
        raise AttributeError(f"cannot rebuild {name}: {original!r} is not a torch.nn.Module class")
    # An unpickled model dispatches to our attention function by name: register it here,
    # as a fresh process may not have converted anything yet.
    register_with_transformers()
    return _sparse_class(original)


def original_class_name(module: torch.nn.Module) -> str:
    state = getattr(module, "_mts_state", None)
    return state.original_class if state is not None else type(module).__name__


# --------------------------------------------------------------------------------------
# Which modules convert: the detection rule
# --------------------------------------------------------------------------------------
# A module is an attention module for modelopt_sparse when the ``forward`` its class runs
# (decorators unwrapped) looks up transformers' attention interface: the code names the
# global ``ALL_ATTENTION_FUNCTIONS`` and, in the forward's module, that global is a
# transformers ``AttentionInterface``. That is exactly the dispatch sparsify() relies on (it
# switches ``config._attn_implementation``), and transformers' own check of whether a
# model can switch implementations (``PreTrainedModel._can_set_attn_implementation``)
# looks for the same name. No class list: any module written that way converts, and one
# whose forward computes attention itself (GPT-Neo, Bloom, ...) does not, since switching
# the implementation would not reach it.
_INTERFACE_GLOBAL = "ALL_ATTENTION_FUNCTIONS"


def _forward_chain(cls: type) -> list:
    """The forwards a call of ``cls.forward`` runs, following ``super().forward`` calls down
    the MRO, up to the one that names the attention interface; ``[]`` if none does."""
    chain = []
    for klass in cls.__mro__:
        if "forward" not in vars(klass):
            continue
        forward = inspect.unwrap(vars(klass)["forward"])
        code = getattr(forward, "__code__", None)
        if code is None:
            return []
        chain.append(forward)
        if _INTERFACE_GLOBAL in code.co_names:
            from transformers import AttentionInterface

            interface = getattr(forward, "__globals__", {}).get(_INTERFACE_GLOBAL)
            return chain if isinstance(interface, AttentionInterface) else []
        if not ("super" in code.co_names and "forward" in code.co_names):
            return []
    return []


def uses_attention_interface(module: torch.nn.Module) -> bool:
    """Whether ``module``'s forward dispatches through transformers' attention interface.

    A subclass whose forward calls ``super().forward(...)`` is judged by the forward it
    calls, so wrapping a supported class keeps it supported.
    """
    cls = type(module)
    return issubclass(cls, SparseAttentionModule) or bool(_forward_chain(cls))


def _forward_keywords(module: torch.nn.Module) -> frozenset[str]:
    """Keyword names the module's forward passes to calls: the kernel features it can ask
    the attention function for (``sliding_window=``, ``softcap=``, ``s_aux=``). CPython
    keeps the names of a call's keyword arguments as a tuple of strings among the code's
    constants."""
    names = set()
    for forward in _forward_chain(_original_class(module)):
        for const in forward.__code__.co_consts:
            if isinstance(const, tuple) and all(isinstance(c, str) for c in const):
                names.update(const)
            elif isinstance(const, str):
                names.add(const)  # getattr(self.config, "sliding_window", None) (Mistral)
    return frozenset(names)


_NOT_FOUND_HINT = (
    "modelopt_sparse converts attention modules whose forward dispatches through transformers' "
    "attention interface (ALL_ATTENTION_FUNCTIONS, selected by config._attn_implementation), as "
    "Llama, Mistral, Qwen, Gemma, Phi-3, OLMo, Granite, Cohere, BERT and ViT do in transformers 5.x"
)


def find_attention_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """``(name, module)`` of every attention module behind the attention interface; a clear
    error if there are none."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    found = [(name, module) for name, module in model.named_modules() if uses_attention_interface(module)]
    if not found:
        kinds = sorted({type(m).__name__ for _, m in model.named_modules() if "Attention" in type(m).__name__})
        raise ValueError(
            f"modelopt_sparse found no supported attention module in {type(model).__name__}"
            + (f" (it has {kinds}, which compute attention themselves)" if kinds else "")
            + f"; {_NOT_FOUND_HINT}"
        )
    return found


def _feature_value(module: torch.nn.Module, keyword: str, attributes: tuple[str, ...]):
    """The value the module's forward will pass as ``keyword``: its own attribute when it
    has one (layers differ: Gemma 3, Qwen2 ``max_window_layers``), else its config's."""
    for attr in attributes:
        if attr in vars(module) or attr in getattr(module, "_parameters", {}):
            return getattr(module, attr)
    config = getattr(module, "config", None)
    for attr in attributes:
        if config is not None and hasattr(config, attr):
            return getattr(config, attr)
    return None


def _mask_window(module: torch.nn.Module) -> int | None:
    """The window transformers puts in the mask this module receives, by the rule of its
    models: per layer from ``config.layer_types`` where the config has them, else for every
    layer when ``config.sliding_window`` is set (Mistral, Phi-3, PhiMoE)."""
    config = getattr(module, "config", None)
    window = getattr(config, "sliding_window", None)
    layer_types, layer_idx = getattr(config, "layer_types", None), getattr(module, "layer_idx", None)
    if layer_types is not None and isinstance(layer_idx, int) and 0 <= layer_idx < len(layer_types):
        return window if layer_types[layer_idx] == "sliding_attention" else None
    return window


# transformers' builders of sliding-window masks; a modeling module that imports one may
# give some layers a windowed mask.
_WINDOW_MASK_BUILDERS = ("create_sliding_window_causal_mask", "create_bidirectional_sliding_window_mask")


def module_attention(module: torch.nn.Module) -> ModuleAttention:
    """What the module's forward will ask the attention function for, read from the module
    (its attributes where it has them: layers differ in Gemma 2/3, Qwen2, GPT-OSS) and its config."""
    keywords = _forward_keywords(module)
    window = _feature_value(module, "sliding_window", ("sliding_window",)) if "sliding_window" in keywords else None
    cap = (_feature_value(module, "softcap", ("attn_logit_softcapping", "softcap"))
           if "softcap" in keywords else None)
    sinks = _feature_value(module, "s_aux", ("sinks", "s_aux")) if "s_aux" in keywords else None
    return ModuleAttention(
        causal=getattr(module, "is_causal", True) is not False,
        sliding_window=window,
        softcap=None if cap is None else float(cap),
        learned_sinks=sinks is not None,
        cross=is_cross_attention_only(module),
        decoder_either=is_non_causal_decoder_module(module) and _cross_input(_original_class(module)) is not None,
    )


def _check_module_supported(name: str, module: torch.nn.Module, method=None) -> ModuleAttention:
    """Refuse, before converting anything, modules configured for what the kernel lacks;
    return the module's attention features otherwise.

    Each message names the module, its class and the feature. The attention function
    refuses the same things at run time (a model that sets them some other way).
    """
    where = f"{name} ({original_class_name(module)})"
    attention = module_attention(module)
    keywords = _forward_keywords(module)
    if attention.sliding_window is not None and not attention.causal:
        raise NotImplementedError(
            f"{where}: sliding_window={attention.sliding_window} on bidirectional attention (a local "
            "attention window in an encoder, e.g. ModernBERT's local layers) is not supported by "
            "modelopt_sparse: the kernel implements causal sliding windows only"
        )
    mask_window = _mask_window(module)
    if "sliding_window" not in keywords and mask_window is not None and _imports_window_masks(module):
        raise NotImplementedError(
            f"{where}: this layer gets a sliding-window mask (sliding_window={mask_window}) but its forward "
            "does not pass sliding_window to the attention function; modelopt_sparse takes the window from "
            "that argument, so it would attend past the window. Load the model with sliding_window=None "
            "(or use_sliding_window=False) to run it with full attention"
        )
    if (attention.sliding_window is not None and mask_window is not None and attention.sliding_window != mask_window
            and _imports_window_masks(module)):
        raise NotImplementedError(
            f"{where}: its forward passes sliding_window={attention.sliding_window} but its sliding-window mask "
            f"uses {mask_window} (config.sliding_window); modelopt_sparse applies the argument, transformers' "
            "eager and SDPA attention the mask, so the two would differ"
        )
    if "position_bias" in keywords:
        raise NotImplementedError(
            f"{where}: position_bias (an additive attention bias, as T5's relative positions) is not supported "
            "by modelopt_sparse: the kernel adds no bias to the scores"
        )
    if is_cross_attention_only(module) and _cross_input(_original_class(module)) is None:
        raise NotImplementedError(
            f"{where}: cross-attention (queries from one sequence, keys from another) whose forward takes its keys "
            f"from none of {list(_CROSS_INPUTS)} is not supported by modelopt_sparse"
        )
    if method is not None:
        _check_method_takes(where, method, attention)
    return attention


def _check_method_takes(where: str, method, attention: ModuleAttention) -> None:
    """A module's features reach its method as keywords of ``attention()`` (only those the
    module uses): refuse a method whose ``attention()`` cannot take them."""
    params = inspect.signature(method.attention).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    needed = []
    if not attention.causal:
        needed.append(("is_causal", "bidirectional attention (is_causal=False)"))
    if attention.sliding_window is not None:
        needed.append(("sliding_window", f"sliding-window attention (sliding_window={attention.sliding_window})"))
    if attention.softcap is not None:
        needed.append(("softcap", f"logit soft-capping (softcap={attention.softcap:g})"))
    if attention.learned_sinks:
        needed.append(("learned_sinks", "learned sinks (s_aux)"))
    for keyword, feature in needed:
        if keyword not in params:
            raise NotImplementedError(
                f"{where}: {feature} needs a method whose attention() takes {keyword}; "
                f"{type(method).__name__}.attention does not"
            )


def _imports_window_masks(module: torch.nn.Module) -> bool:
    """Whether the module's modeling code imports a sliding-window mask builder."""
    chain = _forward_chain(_original_class(module))
    return bool(chain) and any(builder in chain[-1].__globals__ for builder in _WINDOW_MASK_BUILDERS)


def _original_class(module: torch.nn.Module) -> type:
    cls = type(module)
    return cls.__mro__[1] if issubclass(cls, SparseAttentionModule) else cls  # see _sparse_class


def check_convertible(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The attention modules :func:`sparsify` would convert; raises as it would if it cannot.

    Changes nothing: callers can refuse a model before spending time on anything else.
    """
    found = find_attention_modules(model)
    for name, module in found:
        _check_module_supported(name, module)
    return found


def build_state(
    name: str,
    module: torch.nn.Module,
    config: SparseAttentionAttributeConfig,
    patterns: tuple[str, ...],
) -> ModuleSparseState:
    method = get_method(config.method)(config)
    attention = _check_module_supported(name, module, method)
    kernel_kwargs = checked_kernel_kwargs(method, name, module)
    if attention.cross and config.enable and kernel_kwargs["sparsity_n"]:
        raise NotImplementedError(cross_attention_sparse_message(f"{name} ({original_class_name(module)})", name))
    return ModuleSparseState(
        name=name,
        original_class=original_class_name(module),
        patterns=patterns,
        config=config,
        method=method,
        kernel_kwargs=kernel_kwargs,
        attention=attention,
    )


def apply_states(model: torch.nn.Module, states: dict[str, ModuleSparseState], config_record: Any) -> None:
    """Mutate: swap classes, attach states, switch the attention implementation.

    Everything that can fail on bad input has been checked by the caller.
    """
    register_with_transformers()
    _own_configs(model)
    modules = dict(model.named_modules())
    for name, state in states.items():
        module = modules[name]
        module.__class__ = _sparse_class(type(module))
        module._mts_state = state
        if not hasattr(module, "_mts_stats"):
            module._mts_stats = None
    _set_attn_implementation(model, [modules[n] for n in states])
    model._mts_config_record = config_record
    sync_hf_config(model)


def _own_configs(model: torch.nn.Module) -> None:
    """Give ``model`` private copies of the HF configs its modules hold, before we mutate them.

    Models built from one config object share it (``LlamaForCausalLM(cfg)`` twice); switching
    ``_attn_implementation`` on a shared config would make the other model dispatch to us
    unconverted, and its save_pretrained would write our record. One deepcopy of all held
    configs with a shared memo maps every original (sub-configs such as ``text_config``
    included) to exactly one copy, so the links between them survive.
    """
    from transformers import PretrainedConfig

    modules = list(model.modules())
    held = {id(v): v for m in modules for v in vars(m).values() if isinstance(v, PretrainedConfig)}
    top = getattr(model, "config", None)
    if isinstance(top, PretrainedConfig):
        held.setdefault(id(top), top)
    owned = {id(c) for c in getattr(model, "_mts_own_configs", ())}
    if not held or held.keys() <= owned:
        return  # copied by an earlier conversion of this model (deepcopy/pickle keep the link)
    memo: dict[int, Any] = {}
    copy.deepcopy(list(held.values()), memo)
    for module in modules:
        for key, value in list(vars(module).items()):
            if isinstance(value, PretrainedConfig) and id(value) in memo:
                setattr(module, key, memo[id(value)])
    # Every config copied (sub-configs too), so a later conversion finds them all owned.
    model._mts_own_configs = tuple(c for c in memo.values() if isinstance(c, PretrainedConfig))


def _set_attn_implementation(model: torch.nn.Module, modules: list[torch.nn.Module]) -> None:
    """Switch the configs the converted modules read to our implementation, and only those.

    transformers switches a composite model's every sub-config; the others are switched back.
    Their masks must stay transformers' own: a part of the model that computes attention itself
    (GIT's text decoder beside its converted vision encoder) adds the mask it gets to its scores."""
    configs = _configs_of(model)
    before = {id(cfg): cfg._attn_implementation for cfg in configs}
    set_impl = getattr(model, "set_attn_implementation", None)
    if callable(set_impl):
        set_impl(ATTN_IMPLEMENTATION)
    # Modules can hold configs that set_attn_implementation did not reach (a bare decoder
    # passed in, nested sub-configs): every converted module must dispatch to us.
    read = set()
    for module in modules:
        cfg = getattr(module, "config", None)
        if cfg is not None:
            read.add(id(cfg))
            if getattr(cfg, "_attn_implementation", None) != ATTN_IMPLEMENTATION:
                cfg._attn_implementation = ATTN_IMPLEMENTATION
    if not read:
        return  # modules without a config: transformers' dispatch reads the model's
    for cfg in configs:
        if id(cfg) not in read and cfg._attn_implementation == ATTN_IMPLEMENTATION \
                and before[id(cfg)] != ATTN_IMPLEMENTATION:
            cfg._attn_implementation = before[id(cfg)]
    # A composite config's setter passes its value down to its sub-configs: set ours again.
    for module in modules:
        cfg = getattr(module, "config", None)
        if cfg is not None and cfg._attn_implementation != ATTN_IMPLEMENTATION:
            cfg._attn_implementation = ATTN_IMPLEMENTATION


def _configs_of(model: torch.nn.Module) -> list:
    """Every HF config the model's modules hold, with their sub-configs."""
    from transformers import PretrainedConfig

    found: dict[int, Any] = {}

    def add(cfg, depth=0):
        if isinstance(cfg, PretrainedConfig) and id(cfg) not in found and depth < 4:
            found[id(cfg)] = cfg
            for value in vars(cfg).values():
                add(value, depth + 1)

    for module in model.modules():
        for value in vars(module).values():
            add(value)
    return list(found.values())


def sparsify(model: torch.nn.Module, config: SparseAttentionConfig | dict) -> torch.nn.Module:
    """Convert every attention module of ``model`` that dispatches through transformers'
    attention interface, in place; returns ``model``.

    Modules get the config merged from the matching ``sparse_cfg`` entries (see
    :mod:`modelopt_sparse.config`); a module that no entry matches, or whose config has
    ``enable=False``, is still converted and runs dense through the same kernel
    (``sparsity_n=0``). Prefill runs sparse; single-token decode steps are dense by the
    kernel's rule. All checks run before the model is touched.

    Raises:
        ValueError: invalid config, or no attention module behind transformers' attention
            interface in ``model`` (see :func:`uses_attention_interface`).
        NotImplementedError: a module uses something the kernel lacks (N:M on a cross-attention
            module, additive position biases, bidirectional sliding windows, a window applied
            through the mask alone); the message names the module, its class and the feature.
            Causal sliding windows, logit soft-capping and learned sinks are supported.
    """
    config = SparseAttentionConfig.coerce(config)
    states = {}
    for name, module in check_convertible(model):
        attr, patterns = config.resolve(name)
        if attr is None:
            attr, patterns = SparseAttentionAttributeConfig(enable=False), []
        states[name] = build_state(name, module, attr, tuple(patterns))
    apply_states(model, states, config.to_json())
    return model


def sparse_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if getattr(m, "_mts_state", None) is not None]


def is_sparsified(model: torch.nn.Module) -> bool:
    """True if ``model`` holds at least one module converted by :func:`sparsify`."""
    return bool(sparse_modules(model))


def _set_enabled(model: torch.nn.Module, value: bool, pattern: Pattern | None) -> list[str]:
    converted = sparse_modules(model)
    if not converted:
        raise ValueError(f"{type(model).__name__} is not sparsified: call modelopt_sparse.sparsify first")
    if pattern is None:
        chosen = converted
    elif isinstance(pattern, str):
        chosen = [(n, m) for n, m in converted if fnmatch.fnmatchcase(n, pattern)]
    elif callable(pattern):
        chosen = [(n, m) for n, m in converted if pattern(n)]
    else:
        raise TypeError(f"pattern must be an fnmatch string or a callable name -> bool, got {type(pattern).__name__}")
    if not chosen:
        raise ValueError(
            f"pattern {pattern!r} matches no sparse attention module; modules are named like {converted[0][0]!r}"
        )
    _own_configs(model)
    for _, module in chosen:
        state = module._mts_state
        module._mts_state = replace(state, config=state.config.model_copy(update={"enable": value}))
    sync_hf_config(model)
    return [n for n, _ in chosen]


def enable(model: torch.nn.Module, pattern: Pattern | None = None) -> list[str]:
    """Turn sparsity back on for all converted modules, or those matching ``pattern``.

    ``pattern`` is an fnmatch string over module names or a callable ``name -> bool``.
    Returns the names of the modules changed.
    """
    return _set_enabled(model, True, pattern)


def disable(model: torch.nn.Module, pattern: Pattern | None = None) -> list[str]:
    """Make converted modules (all, or those matching ``pattern``) run dense.

    They keep running through the same kernel with ``sparsity_n=0``, which is exact dense
    attention (causal or bidirectional, as the module is). Returns the names of the modules changed.
    """
    return _set_enabled(model, False, pattern)


def sync_hf_config(model: torch.nn.Module) -> None:
    """Record the conversion in ``model.config`` so that ``save_pretrained`` writes it."""
    hf_config = getattr(model, "config", None)
    if hf_config is None or not hasattr(hf_config, "to_dict"):
        return
    from .save_restore import sparse_state

    setattr(hf_config, HF_CONFIG_ATTR, sparse_state(model))


def _backend_label(state: ModuleSparseState, module: torch.nn.Module) -> str:
    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    resolved = state.method.select_backend(device)
    return resolved if state.config.backend == resolved else f"{state.config.backend}->{resolved}"


def summary_rows(model: torch.nn.Module) -> list[dict[str, str]]:
    rows = []
    for name, module in sparse_modules(model):
        state = module._mts_state
        kw = state.kernel_kwargs
        sparse = state.config.enable and kw["sparsity_n"] > 0
        rows.append({
            "module": name,
            "class": state.original_class,
            "method": state.config.method,
            "pattern": " + ".join(state.patterns) or "(none: dense)",
            "backend": _backend_label(state, module),
            "N:M": f"{kw['sparsity_n']}:{kw['sparsity_m']}" if sparse else "dense",
            "sinks": str(kw["num_sink_tokens"]),
            "window": str(kw["dense_window_size"]),
            # The module's own attention (its sliding window, soft cap, learned sinks), which
            # sparsity leaves as it is; "window" above is the N:M pattern's dense window.
            "attention": state.attention.describe(),
            "enabled": "yes" if state.config.enable else "no",
        })
    return rows


def print_summary(model: torch.nn.Module, file=None) -> str:
    """Print (to ``file``, default stdout) and return a table of the converted modules."""
    rows = summary_rows(model)
    if not rows:
        text = f"{type(model).__name__}: not sparsified (no modelopt_sparse attention modules)"
    else:
        headers = list(rows[0])
        widths = {h: max(len(h), *(len(r[h]) for r in rows)) for h in headers}
        line = "  ".join(h.ljust(widths[h]) for h in headers)
        sep = "  ".join("-" * widths[h] for h in headers)
        body = ["  ".join(r[h].ljust(widths[h]) for h in headers) for r in rows]
        sparse = sum(r["N:M"] != "dense" for r in rows)
        foot = f"{len(rows)} attention modules converted, {sparse} sparse, {len(rows) - sparse} dense"
        text = "\n".join([line, sep, *body, foot])
    print(text, file=file if file is not None else sys.stdout)
    return text
