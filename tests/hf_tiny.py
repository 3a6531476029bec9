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
