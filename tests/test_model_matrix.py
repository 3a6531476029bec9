"""The model matrix: sparsify() on tiny random transformers models of many families (CPU,
float64, PyTorch reference backend).

For every model that converts: the sparse logits (or hidden states) equal an independent
eager oracle that applies the N:M rule of docs/semantics.md per sequence, with padding;
``mts.save`` / ``mts.restore`` round-trips; ``generate()`` runs for decoders. Models that
need a feature the kernel lacks today (sliding windows, logit soft-capping, learned sinks)
are refused with a message naming the module, its class and the feature, and convert once
a config switch turns the feature off.

The oracle shares no code with modelopt_sparse: it is an attention function registered
with transformers under its own name, fed the 4-D boolean mask that transformers' own
``sdpa_mask`` builds. It finds each row's real tokens from that mask, checks that the mask
is the causal or bidirectional mask the module's ``is_causal`` says (so a model whose mask
and module disagree fails here), and decides the kept set with a pairwise rank rule.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # a module global, as the detection rule wants

import modelopt_sparse as mts
from modelopt_sparse.conversion import uses_attention_interface

ORACLE = "mts_matrix_oracle"
VOCAB = 128
N, M, SINKS, WINDOW = 2, 4, 1, 4
CFG = {"sparse_cfg": {"default": {"sparsity_n": N, "sparsity_m": M, "num_sink_tokens": SINKS,
                                  "dense_window_size": WINDOW}}}
ATOL = 1e-9
PAD = 5  # padded tokens of batch row 1

COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
    # Large init: peaked attention, so N:M selection visibly changes the outputs.
    initializer_range=0.4, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
FULL = ["full_attention", "full_attention"]

# family -> (config class, overrides). Every entry converts.
DECODERS = {
    "llama": (transformers.LlamaConfig, {}),
    "mistral": (transformers.MistralConfig, {"sliding_window": None}),
    "qwen2": (transformers.Qwen2Config, {"use_sliding_window": False}),
    "qwen3": (transformers.Qwen3Config, {"use_sliding_window": False}),
    "qwen3_moe": (transformers.Qwen3MoeConfig, {"use_sliding_window": False, "num_experts": 4,
                                                "num_experts_per_tok": 2, "moe_intermediate_size": 32}),
    "gemma": (transformers.GemmaConfig, {}),
    "phi3": (transformers.Phi3Config, {"sliding_window": None}),
    "olmo2": (transformers.Olmo2Config, {}),
    "granite": (transformers.GraniteConfig, {}),
    "smollm3": (transformers.SmolLM3Config, {"use_sliding_window": False}),
    "cohere": (transformers.CohereConfig, {}),
    # Converts once the features the kernel lacks today are switched off by config.
    "gemma2_full_no_softcap": (transformers.Gemma2Config, {"layer_types": FULL, "attn_logit_softcapping": None}),
    "gemma3_full": (transformers.Gemma3TextConfig, {"layer_types": FULL}),
    # Not in the list: a model with no class of its own in any list, that the
    # detection rule accepts because its forward dispatches through the interface.
    "gpt2": (transformers.GPT2Config, None),
}

# family -> (config class, overrides, message naming the feature).
REFUSED = {
    "gemma2": (transformers.Gemma2Config, {},
               r"model\.layers\.0\.self_attn: sliding_window=4096 \(sliding-window attention in Gemma2Attention\) "
               r"is not supported by modelopt_sparse today"),
    "gemma2_full": (transformers.Gemma2Config, {"layer_types": FULL},
                    r"model\.layers\.0\.self_attn \(Gemma2Attention\): softcap=50\.0 \(attention logit "
                    r"soft-capping\) is not supported"),
    "gemma3": (transformers.Gemma3TextConfig, {},
               r"model\.layers\.0\.self_attn: sliding_window=4096 \(sliding-window attention in Gemma3Attention\)"),
    "gpt_oss": (transformers.GptOssConfig, {"num_local_experts": 4, "num_experts_per_tok": 2},
                r"model\.layers\.0\.self_attn: sliding_window=128 \(sliding-window attention in GptOssAttention\)"),
    "gpt_oss_full": (transformers.GptOssConfig, {"num_local_experts": 4, "num_experts_per_tok": 2, "layer_types": FULL},
                     r"model\.layers\.0\.self_attn \(GptOssAttention\): s_aux \(learned attention sinks"),
    "mistral_window": (transformers.MistralConfig, {"sliding_window": 16},
                       r"model\.layers\.0\.self_attn: sliding_window=16 \(sliding-window attention in "
                       r"MistralAttention\)"),
}


def _config(cls, overrides):
    if overrides is None:  # GPT-2 names its sizes differently
        return cls(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=128, initializer_range=0.4,
                   bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return cls(**{**COMMON, **overrides})


def _build(model_cls_or_auto, cfg, seed=0):
    torch.manual_seed(seed)
    # eager: the only implementation every family accepts at construction (Gemma 2 and
    # GPT-OSS refuse sdpa); the experts too (grouped_mm has no float64 kernel).
    model = model_cls_or_auto.from_config(cfg, attn_implementation="eager", experts_implementation="eager")
    return model.to(torch.float64).eval()


# --------------------------------------------------------------------------------------
# Oracle
# --------------------------------------------------------------------------------------
def _keep(qk, causal):
    """qk [H, L, L] raw dot products of one sequence's real tokens -> kept mask (semantics.md)."""
    length = qk.shape[-1]
    pos = torch.arange(length)[:, None]
    key = torch.arange(length)[None, :]
    allowed = (key <= pos) if causal else torch.ones(length, length, dtype=torch.bool)
    if length == 1:
        return allowed.expand(qk.shape)
    scores = torch.where(allowed, qk, torch.tensor(float("-inf"), dtype=qk.dtype))
    scores = torch.nn.functional.pad(scores, (0, (-length) % M), value=float("-inf"))
    groups = scores.unflatten(-1, (-1, M))  # keys grouped from the sequence's first key
    rank = (groups[..., None, :] > groups[..., :, None]).sum(-1)  # members that beat each member
    selected = (rank < N).flatten(-2)[..., :length]
    dense = (key < SINKS) | ((pos - key >= 0) & (pos - key < WINDOW))
    return allowed & (selected | dense)


def oracle_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    for feature in ("sliding_window", "softcap", "s_aux"):
        assert kwargs.get(feature) is None, f"the oracle does not implement {feature}"
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    batch, heads, q_len, dim = query.shape
    assert attention_mask is not None and attention_mask.dim() == 4 and attention_mask.dtype == torch.bool
    assert q_len == key.shape[2], "the oracle covers full forwards (no cache)"
    k = key.repeat_interleave(heads // key.shape[1], dim=1)
    v = value.repeat_interleave(heads // value.shape[1], dim=1)
    scale = scaling if scaling is not None else dim ** -0.5
    out = torch.zeros(batch, q_len, heads, dim, dtype=query.dtype)
    for b in range(batch):
        mask = attention_mask[b, 0]
        real = mask.any(0).nonzero().flatten()  # keys some query sees: the real tokens
        length = len(real)
        want = torch.tril(torch.ones(length, length, dtype=torch.bool)) if causal else torch.ones(length, length,
                                                                                                 dtype=torch.bool)
        assert torch.equal(mask[real][:, real], want), "the model's mask disagrees with the module's is_causal"
        qk = query[b][:, real] @ k[b][:, real].transpose(-1, -2)
        scores = torch.where(_keep(qk, causal), qk * scale, torch.tensor(float("-inf"), dtype=qk.dtype))
        out[b, real] = (torch.softmax(scores, -1) @ v[b][:, real]).transpose(0, 1)
    return out, None


def _oracle_mask(*args, **kwargs):
    # Always materialized, so the oracle sees padding and causality explicitly.
    kwargs.update(allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
    return sdpa_mask(*args, **kwargs)


AttentionInterface.register(ORACLE, oracle_attention)
AttentionMaskInterface.register(ORACLE, _oracle_mask)


def _as_oracle(model):
    oracle = copy.deepcopy(model)
    oracle.set_attn_implementation(ORACLE)
    return oracle


def _padding(batch_len, left=True):
    mask = torch.ones(2, batch_len, dtype=torch.long)
    if left:
        mask[1, :PAD] = 0
    else:
        mask[1, -PAD:] = 0
    return mask


def _real(t, mask):
    """The real-token rows of [B, S, ...] outputs (padded rows are unspecified)."""
    return t[mask.bool()]


# --------------------------------------------------------------------------------------
# Decoders
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(DECODERS))
def test_decoder_matches_oracle_saves_and_generates(family, tmp_path):
    cfg = _config(*DECODERS[family])
    base = _build(transformers.AutoModelForCausalLM, cfg)
    sparse = mts.sparsify(copy.deepcopy(base), CFG)
    assert len(mts.conversion.sparse_modules(sparse)) == 2
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 28), generator=gen)
    mask = _padding(ids.shape[1], left=True)
    with torch.no_grad():
        got = sparse(input_ids=ids, attention_mask=mask, use_cache=False).logits
        want = _as_oracle(base)(input_ids=ids, attention_mask=mask, use_cache=False).logits
        dense = base(input_ids=ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(_real(got, mask), _real(want, mask), atol=ATOL, rtol=0)
    # Row 0 only: transformers' eager attention gives NaN rows for left padding in float64.
    assert (got[0] - dense[0]).abs().max() > 1e-4, "sparsity had no visible effect"

    mts.save(sparse, tmp_path)
    fresh = mts.restore(_build(transformers.AutoModelForCausalLM, cfg, seed=1), tmp_path)
    with torch.no_grad():
        again = fresh(input_ids=ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(_real(again, mask), _real(got, mask), atol=0, rtol=0)

    out = sparse.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (2, ids.shape[1] + 3)


@pytest.mark.parametrize("family", list(REFUSED))
def test_unsupported_feature_is_refused_naming_it(family):
    cls, overrides, message = REFUSED[family]
    model = _build(transformers.AutoModelForCausalLM, _config(cls, overrides))
    with pytest.raises(NotImplementedError, match=message):
        mts.sparsify(model, CFG)
    assert not mts.is_sparsified(model)
    assert model.config._attn_implementation == "eager"


def test_refused_kwargs_at_run_time_name_module_and_class():
    """A feature that reaches the attention function some other way than conversion saw
    (here: the module's softcap switched on afterwards) is refused there, naming it."""
    cfg = _config(transformers.Gemma2Config, {"layer_types": FULL, "attn_logit_softcapping": None})
    sparse = mts.sparsify(_build(transformers.AutoModelForCausalLM, cfg), CFG)
    sparse.model.layers[1].self_attn.attn_logit_softcapping = 30.0
    with pytest.raises(NotImplementedError,
                       match=r"model\.layers\.1\.self_attn \(Gemma2Attention\): softcap=30\.0 \(logit soft-capping\)"):
        sparse(input_ids=torch.tensor([[3, 4, 5, 6]]))


# --------------------------------------------------------------------------------------
# Encoders: bidirectional attention
# --------------------------------------------------------------------------------------
def _bert():
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=96, max_position_embeddings=64, initializer_range=0.4)
    return _build(transformers.AutoModel, cfg)


def _vit():
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=96, initializer_range=0.4)
    return _build(transformers.AutoModel, cfg)


@pytest.mark.parametrize("left", [False, True])
def test_bert_encoder_bidirectional_with_padding(left, tmp_path):
    base = _bert()
    sparse = mts.sparsify(copy.deepcopy(base), CFG)
    modules = mts.conversion.sparse_modules(sparse)
    assert [n for n, _ in modules] == ["encoder.layer.0.attention.self", "encoder.layer.1.attention.self"]
    assert all(m.is_causal is False for _, m in modules)
    ids = torch.randint(3, VOCAB, (2, 26), generator=torch.Generator().manual_seed(2))
    mask = _padding(ids.shape[1], left=left)
    with torch.no_grad():
        got = sparse(input_ids=ids, attention_mask=mask).last_hidden_state
        want = _as_oracle(base)(input_ids=ids, attention_mask=mask).last_hidden_state
        dense = base(input_ids=ids, attention_mask=mask).last_hidden_state
        unpadded = sparse(input_ids=ids[:1]).last_hidden_state  # the no-mask (batched) path
    torch.testing.assert_close(_real(got, mask), _real(want, mask), atol=ATOL, rtol=0)
    torch.testing.assert_close(unpadded, got[:1], atol=ATOL, rtol=0)
    assert (_real(got, mask) - _real(dense, mask)).abs().max() > 1e-4
    if not left:
        # A padded row's real tokens see each other only: with right padding (same
        # positions) the row equals the same tokens run alone.
        real_ids = ids[1:, : ids.shape[1] - PAD]
        with torch.no_grad():
            alone = sparse(input_ids=real_ids).last_hidden_state
        torch.testing.assert_close(alone[0], got[1, : real_ids.shape[1]], atol=ATOL, rtol=0)

    mts.save(sparse, tmp_path)
    fresh = mts.restore(_bert(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids, attention_mask=mask).last_hidden_state, got, atol=0, rtol=0)


def test_vit_bidirectional(tmp_path):
    base = _vit()
    sparse = mts.sparsify(copy.deepcopy(base), CFG)
    assert len(mts.conversion.sparse_modules(sparse)) == 2
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        got = sparse(pixel_values=pixels).last_hidden_state
        want = _as_oracle(base)(pixel_values=pixels).last_hidden_state
        dense = base(pixel_values=pixels).last_hidden_state
    assert got.shape[1] == 17  # 16 patches and the class token: sparse beyond the window
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert (got - dense).abs().max() > 1e-4

    mts.save(sparse, tmp_path)
    fresh = mts.restore(_vit(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(pixel_values=pixels).last_hidden_state, got, atol=0, rtol=0)


def test_bert_cross_attention_is_refused():
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=96, is_decoder=True, add_cross_attention=True)
    model = _build(transformers.AutoModelForCausalLM, cfg)
    with pytest.raises(NotImplementedError, match=r"crossattention\.self \(BertCrossAttention\): cross-attention"):
        mts.sparsify(model, CFG)
    assert not mts.is_sparsified(model)


# --------------------------------------------------------------------------------------
# The detection rule
# --------------------------------------------------------------------------------------
def test_detection_rule_reads_the_forward_not_a_class_list():
    class ToyAttention(torch.nn.Module):
        """No transformers class: converts because its forward dispatches through the interface."""

        def __init__(self, config):
            super().__init__()
            self.config, self.is_causal, self.proj = config, True, torch.nn.Linear(32, 96, dtype=torch.float64)

        def forward(self, x):
            q, k, v = self.proj(x).unflatten(-1, (3, 2, 16)).permute(2, 0, 3, 1, 4)
            fn = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, None)
            return fn(self, q, k, v, None, scaling=0.25)[0]

    class ManualAttention(torch.nn.Module):  # attention written out: switching cannot reach it
        def forward(self, q, k, v):
            return torch.softmax(q @ k.transpose(-1, -2), -1) @ v

    toy = ToyAttention(transformers.LlamaConfig())
    assert uses_attention_interface(toy) and not uses_attention_interface(ManualAttention())
    mts.sparsify(toy, CFG)
    x = torch.randn(1, 12, 32, dtype=torch.float64)
    q, k, v = toy.proj(x).unflatten(-1, (3, 2, 16)).permute(2, 0, 3, 1, 4)
    got = toy(x)
    want = mts.attention(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
                         torch.tensor([0], dtype=torch.int32), torch.tensor([12], dtype=torch.int32), 12,
                         softmax_scale=0.25, sparsity_n=N, sparsity_m=M, num_sink_tokens=SINKS,
                         dense_window_size=WINDOW, backend="torch")
    torch.testing.assert_close(got[0], want, atol=ATOL, rtol=0)

    class Wrapped(ToyAttention):  # a subclass judged by the forward it hands over to
        def forward(self, x):
            return super().forward(x) * 1.0

    class Replaced(ToyAttention):  # a subclass that computes attention itself
        def forward(self, x):
            return x

    assert uses_attention_interface(Wrapped(transformers.LlamaConfig()))
    assert not uses_attention_interface(Replaced(transformers.LlamaConfig()))
