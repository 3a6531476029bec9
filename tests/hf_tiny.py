"""Tiny random-init HuggingFace models and an independent N:M oracle for the plugin tests.

The oracle shares no code with modelopt_sparse: it is an eager attention function,
registered with transformers under its own name, that computes every score, decides the
kept set with a pairwise rank rule written from docs/semantics.md, and applies softmax.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
import transformers
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

ORACLE = "mts_test_oracle"
# transformers renamed the forward argument past_key_values to cache (5.2x); both still work.
CACHE_KW = "cache" if "cache" in inspect.signature(transformers.LlamaForCausalLM.forward).parameters else "past_key_values"
VOCAB = 96


def tiny_config(family: str = "llama", **overrides):
    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        # Large init: peaked attention, so N:M selection visibly changes the logits.
        initializer_range=0.4, tie_word_embeddings=False,
    )
    classes = {
        "llama": (transformers.LlamaConfig, {}),
        "qwen2": (transformers.Qwen2Config, {"use_sliding_window": False}),
        "qwen3": (transformers.Qwen3Config, {"use_sliding_window": False}),
        "mistral": (transformers.MistralConfig, {"sliding_window": None}),
    }
    cls, family_defaults = classes[family]
    cfg = cls(**{**common, **family_defaults, **overrides})
    return cfg


def tiny_model(family: str = "llama", seed: int = 0, dtype=torch.float64, **overrides):
    cfg = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    return model.to(dtype).eval()


def attention_inputs(batch: int = 1, seq: int = 8):
    """q [batch, 4, seq, 16] and k = v [batch, 2, seq, 16], float64: what transformers hands
    the attention function of a tiny model's layer (GQA 4/2, head dim 16)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, 4, seq, 16, generator=g, dtype=torch.float64)
    k = torch.randn(batch, 2, seq, 16, generator=g, dtype=torch.float64)
    return q, k, k.clone()


def token_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=gen)


def attention_modules(model):
    return [m for n, m in model.named_modules() if n.endswith("self_attn")]


# --------------------------------------------------------------------------------------
# The model matrix: one tiny config per decoder family, its own attention features on
# --------------------------------------------------------------------------------------
MATRIX_VOCAB = 128
MATRIX_SLIDING = 8  # the models' own sliding window: far shorter than the test sequences
MATRIX_SOFTCAP = 8.0  # Gemma 2's attention soft cap, low enough to bend the tiny models' scores
MATRIX_COMMON = dict(
    vocab_size=MATRIX_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
    # Large init: peaked attention, so N:M selection visibly changes the outputs.
    initializer_range=0.4, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
_MIXED = ["sliding_attention", "full_attention"]
_MOE = {"num_experts_per_tok": 2}

# family -> (config class, overrides). Every entry converts, features on.
MATRIX_DECODERS = {
    "llama": (transformers.LlamaConfig, {}),
    "mistral": (transformers.MistralConfig, {"sliding_window": MATRIX_SLIDING}),
    # max_window_layers=1: layer 0 full, layer 1 sliding.
    "qwen2": (transformers.Qwen2Config, {"use_sliding_window": True, "sliding_window": MATRIX_SLIDING,
                                         "max_window_layers": 1}),
    "qwen3": (transformers.Qwen3Config, {}),
    "qwen3_moe": (transformers.Qwen3MoeConfig, {"num_experts": 4, "moe_intermediate_size": 32, **_MOE}),
    "gemma": (transformers.GemmaConfig, {}),
    "gemma2": (transformers.Gemma2Config, {"sliding_window": MATRIX_SLIDING, "layer_types": _MIXED,
                                           "attn_logit_softcapping": MATRIX_SOFTCAP}),
    "gemma3": (transformers.Gemma3TextConfig, {"sliding_window": MATRIX_SLIDING, "layer_types": _MIXED}),
    "phi3": (transformers.Phi3Config, {"sliding_window": MATRIX_SLIDING}),
    "olmo2": (transformers.Olmo2Config, {}),
    "granite": (transformers.GraniteConfig, {}),
    "smollm3": (transformers.SmolLM3Config, {}),
    "gpt_oss": (transformers.GptOssConfig, {"sliding_window": MATRIX_SLIDING, "layer_types": _MIXED,
                                            "num_local_experts": 4, **_MOE}),
    "cohere": (transformers.CohereConfig, {}),
    # Not in the list: a model with no class of its own in any list, that the
    # detection rule accepts because its forward dispatches through the interface.
    "gpt2": (transformers.GPT2Config, None),
}


def matrix_config(family: str, **overrides):
    """The tiny config of a matrix family (``overrides``, e.g. ``vocab_size``, on top)."""
    cls, family_overrides = MATRIX_DECODERS[family]
    if family_overrides is None:  # GPT-2 names its sizes differently
        return cls(**{**dict(n_layer=2, n_embd=64, n_head=4, vocab_size=MATRIX_VOCAB, n_positions=128,
                             initializer_range=0.4, bos_token_id=1, eos_token_id=2, pad_token_id=0), **overrides})
    return cls(**{**MATRIX_COMMON, **family_overrides, **overrides})


def matrix_model(model_cls_or_auto, cfg, seed: int = 0, dtype=torch.float64):
    """A random-init model of ``cfg`` in eval mode, with learned sinks of a trained model's size."""
    torch.manual_seed(seed)
    # eager: the only implementation every family accepts at construction (Gemma 2 and
    # GPT-OSS refuse sdpa); the experts too (grouped_mm has no float64 kernel).
    model = model_cls_or_auto.from_config(cfg, attn_implementation="eager", experts_implementation="eager")
    with torch.no_grad():
        for module in model.modules():
            if isinstance(getattr(module, "sinks", None), torch.nn.Parameter):
                # GPT-OSS's learned sinks: a few units in a trained model, not init noise.
                module.sinks.normal_(0.0, 2.0)
    return model.to(dtype).eval()


# --------------------------------------------------------------------------------------
# Oracle
# --------------------------------------------------------------------------------------
def oracle_keep(qk, *, n, m, sinks, window, tie_break):
    """qk [..., S, Skv] raw dot products, queries aligned to the end of the keys -> kept mask."""
    s_len, kv_len = qk.shape[-2], qk.shape[-1]
    pos = torch.arange(s_len)[:, None] + (kv_len - s_len)
    key = torch.arange(kv_len)[None, :]
    allowed = key <= pos
    if n == 0 or s_len == 1:
        return allowed.expand(qk.shape)
    scores = torch.where(allowed, qk, torch.tensor(float("-inf"), dtype=qk.dtype))
    pad = (-kv_len) % m
    scores = torch.nn.functional.pad(scores, (0, pad), value=float("-inf"))
    g = scores.unflatten(-1, (-1, m))  # [..., S, G, M]
    a, b = g[..., :, None], g[..., None, :]  # member j (rows) against member k (columns)
    beats = b > a
    if tie_break == "index":
        idx = torch.arange(m)
        beats = beats | ((b == a) & (idx[None, :] < idx[:, None]))
    rank = beats.sum(-1)  # how many members of the group outrank member j
    selected = (rank < n).flatten(-2)[..., :kv_len]
    dense = (key < sinks) | ((pos - key >= 0) & (pos - key < window))
    return allowed & (selected | dense)


def oracle_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    assert attention_mask is None, "the oracle covers unpadded batches only"
    settings = module._oracle_settings
    groups = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(groups, dim=1)
    v = value.repeat_interleave(groups, dim=1)
    qk = query @ k.transpose(-1, -2)
    keep = oracle_keep(qk, **settings)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.where(keep, qk * scale, torch.tensor(float("-inf"), dtype=qk.dtype))
    probs = torch.softmax(scores, dim=-1)
    return (probs @ v).transpose(1, 2).contiguous(), None


def _oracle_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                 attention_mask=None, **kwargs):
    if attention_mask is not None and not bool(attention_mask.all()):
        raise AssertionError("the oracle covers unpadded batches only")
    return None


AttentionInterface.register(ORACLE, oracle_attention)
AttentionMaskInterface.register(ORACLE, _oracle_mask)


def as_oracle(model, per_layer):
    """Switch ``model`` (unconverted) to the oracle; ``per_layer(i)`` gives layer i's settings."""
    for i, module in enumerate(attention_modules(model)):
        module._oracle_settings = per_layer(i)
    model.set_attn_implementation(ORACLE)
    return model


def settings(n=2, m=4, sinks=0, window=64, tie_break="threshold"):
    return dict(n=n, m=m, sinks=sinks, window=window, tie_break=tie_break)


def sparse_cfg(n=2, m=4, sinks=0, window=64, tie_break="threshold", method="triton_sparse_softmax", **extra):
    entry = dict(method=method, sparsity_n=n, sparsity_m=m, num_sink_tokens=sinks,
                 dense_window_size=window, tie_break=tie_break, **extra)
    return {"sparse_cfg": {"default": entry}}


@torch.no_grad()
def logits(model, ids, **kwargs):
    return model(input_ids=ids, use_cache=False, **kwargs).logits


# --------------------------------------------------------------------------------------
# Fixtures shared by the adapter tests (import them by name into a test module)
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture()
def sparse(llama):
    import modelopt_sparse as mts

    return mts.sparsify(copy.deepcopy(llama), sparse_cfg(2, 4, 0, 2))
