"""Cross-attention (queries from one sequence, keys from another): encoder-decoder models.

BART and Whisper use one attention class for self- and cross-attention and tell them apart
per call (``key_value_states=``); BERT as a decoder has a class of its own
(``BertCrossAttention``). Cross-attention runs dense (every query sees every real key of its
row); an N:M pattern on it is refused with the pattern that keeps it dense. These tests pin:

* with N:M off everywhere, the logits equal the model's own attention, with left-padded
  encoder inputs and decoders shorter and longer than the encoder (a cross-attention mask
  looks like the mask of a self-attention chunk after a cache: only the module's forward
  argument tells them apart);
* with N:M on the self-attention layers and cross-attention kept dense, the logits and greedy
  ``generate()`` equal an independent oracle (tests/test_model_matrix.py's, which gets
  transformers' own 4-D masks), and ``mts.save`` / ``mts.restore`` round-trip;
* an N:M pattern on cross-attention raises, naming the module and the fix.

CPU, float64, the PyTorch reference backend.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, bidirectional_mask_function

import modelopt_sparse as mts
from modelopt_sparse.hf_attention import sparse_attention_forward, sparse_attention_mask, token_codes
from modelopt_sparse.hf_attention.masks import codes_from_key_codes

from .hf_tiny import matrix_model
from .test_model_matrix import _oracle_mask, _within_bf16_noise, oracle_attention

ORACLE = "mts_cross_oracle"
VOCAB = 64
PAD = 5  # padded encoder tokens of batch row 1 (left padding)
ENC = 20  # encoder tokens
SPARSE = {"default": {"sparsity_n": 2, "sparsity_m": 4, "num_sink_tokens": 1, "dense_window_size": 4}}
DENSE_CFG = {"sparse_cfg": {"default": {"sparsity_n": 0, "sparsity_m": 4}}}
ATOL = 1e-9


def _dense_cross_oracle(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Cross-attention written out: each query over the keys transformers' 4-D mask allows;
    self-attention goes to the matrix's N:M oracle. Whisper's encoder passes no mask at all
    (its inputs are never padded): every pair is allowed."""
    if attention_mask is None:
        attention_mask = torch.ones(query.shape[0], 1, query.shape[2], key.shape[2], dtype=torch.bool)
    if not getattr(module, "_oracle_cross", False):
        return oracle_attention(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    assert attention_mask.dim() == 4 and attention_mask.dtype == torch.bool
    heads = query.shape[1]
    k = key.repeat_interleave(heads // key.shape[1], dim=1)
    v = value.repeat_interleave(heads // value.shape[1], dim=1)
    scores = (query @ k.transpose(-1, -2)) * scaling
    probs = torch.softmax(scores.masked_fill(~attention_mask, float("-inf")), -1)
    return (probs @ v).transpose(1, 2), None


AttentionInterface.register(ORACLE, _dense_cross_oracle)
AttentionMaskInterface.register(ORACLE, _oracle_mask)


def _bart(seed=0):
    cfg = transformers.BartConfig(
        vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64,
        init_std=0.3, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
        forced_eos_token_id=None)
    return matrix_model(transformers.AutoModelForSeq2SeqLM, cfg, seed)


def _whisper(seed=0):
    cfg = transformers.WhisperConfig(
        vocab_size=VOCAB, num_mel_bins=8, d_model=64, encoder_layers=1, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_source_positions=16,
        max_target_positions=32, init_std=0.3, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=3, suppress_tokens=None, begin_suppress_tokens=None)
    return matrix_model(transformers.AutoModelForSpeechSeq2Seq, cfg, seed)


def _bert_decoder(seed=0):
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, is_decoder=True, add_cross_attention=True,
                                  initializer_range=0.3)
    return matrix_model(transformers.AutoModelForCausalLM, cfg, seed)


def _as_oracle(model):
    oracle = copy.deepcopy(model)
    oracle.set_attn_implementation(ORACLE)
    for name, module in oracle.named_modules():
        if name.endswith(("encoder_attn", "crossattention.self")):
            module._oracle_cross = True
    return oracle


def _bart_inputs(dec_len):
    gen = torch.Generator().manual_seed(dec_len)
    ids = torch.randint(3, VOCAB, (2, ENC), generator=gen)
    mask = torch.ones(2, ENC, dtype=torch.long)
    mask[1, :PAD] = 0
    return {"input_ids": ids, "attention_mask": mask,
            "decoder_input_ids": torch.randint(3, VOCAB, (2, dec_len), generator=gen)}


def _whisper_inputs(dec_len):
    gen = torch.Generator().manual_seed(dec_len)
    return {"input_features": torch.randn(2, 8, 32, generator=gen, dtype=torch.float64),
            "decoder_input_ids": torch.randint(4, VOCAB, (2, dec_len), generator=gen)}


FAMILIES = {"bart": (_bart, _bart_inputs), "whisper": (_whisper, _whisper_inputs)}
CROSS = "model.decoder.layers.*.encoder_attn"


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("dec_len", [1, 7, 30])  # one query, fewer and more queries than encoder tokens
def test_dense_equals_the_models_attention(family, dec_len):
    build, inputs = FAMILIES[family]
    base = build()
    dense = mts.sparsify(copy.deepcopy(base), DENSE_CFG)
    x = inputs(dec_len)
    torch.testing.assert_close(_logits(dense, x), _logits(base, x), atol=ATOL, rtol=0)


# Models whose attention code is BART's (transformers copies it): one class for self- and
# cross-attention, the cross-attention mask built from the encoder's padding.
BART_LIKE = ["MBartConfig", "MarianConfig", "PegasusConfig", "BlenderbotConfig", "M2M100Config", "PLBartConfig"]


@pytest.mark.parametrize("config_class", BART_LIKE)
def test_bart_like_dense_equals_the_models_attention(config_class):
    cfg = getattr(transformers, config_class)(
        vocab_size=VOCAB, d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
    base = matrix_model(transformers.AutoModelForSeq2SeqLM, cfg)
    dense = mts.sparsify(copy.deepcopy(base), DENSE_CFG)
    for dec_len in (7, 30):
        x = _bart_inputs(dec_len)
        torch.testing.assert_close(_logits(dense, x), _logits(base, x), atol=ATOL, rtol=0)


@pytest.mark.parametrize("config_class", ["PegasusXConfig", "NllbMoeConfig"])
def test_decoder_self_attention_built_bidirectional_runs_causal(config_class):
    """PegasusX and NLLB-MoE build their decoders' self-attention with is_causal=False (and
    is_decoder=True); transformers runs them in eager mode only, causal through the mask.
    With N:M off the logits equal that, on a left-padded encoder batch."""
    cfg = getattr(transformers, config_class)(
        vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, init_std=0.3)
    base = matrix_model(transformers.AutoModelForSeq2SeqLM, cfg)
    assert base.model.decoder.layers[0].self_attn.is_causal is False
    dense = mts.sparsify(copy.deepcopy(base), DENSE_CFG)
    rows = {row["module"]: row["attention"] for row in mts.conversion.summary_rows(dense)}
    assert rows["model.decoder.layers.0.self_attn"] == "causal self / dense cross"
    for dec_len in (7, 30):
        x = _bart_inputs(dec_len)
        torch.testing.assert_close(_logits(dense, x), _logits(base, x), atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_sparse_self_attention_dense_cross_attention_match_the_oracle(family, tmp_path):
    build, inputs = FAMILIES[family]
    base = build()
    sparse = mts.sparsify(copy.deepcopy(base), {"sparse_cfg": {**SPARSE, CROSS: {"enable": False}}})
    rows = {row["module"]: row for row in mts.conversion.summary_rows(sparse)}
    assert rows["model.decoder.layers.1.encoder_attn"]["enabled"] == "no"
    assert rows["model.decoder.layers.1.self_attn"]["N:M"] == "2:4"
    assert [rows[f"model.{part}.layers.0.{name}"]["attention"] for part, name in (
        ("encoder", "self_attn"), ("decoder", "self_attn"), ("decoder", "encoder_attn"))] == [
        "bidirectional", "causal", "causal self / dense cross"]
    oracle = _as_oracle(base)
    x = inputs(26)
    got = _logits(sparse, x)
    torch.testing.assert_close(got, _logits(oracle, x), atol=ATOL, rtol=0)
    assert (got - _logits(base, x)).abs().max() > 1e-4, "sparsity had no visible effect"

    # Greedy decoding: the decoder's prefill of one start token, then dense steps; the
    # cross-attention keys come from the encoder cache after the first step (dynamic and
    # static caches).
    encoder_inputs = {k: v for k, v in x.items() if k != "decoder_input_ids"}

    def greedy(model, cache):
        with torch.no_grad():
            out = model.generate(**encoder_inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True, cache_implementation=cache)
        return out.sequences, torch.stack(out.logits, 1)

    for cache in (None, "static"):
        tokens, logits = greedy(sparse, cache)
        want_tokens, want_logits = greedy(oracle, cache)
        assert torch.equal(tokens, want_tokens)
        torch.testing.assert_close(logits, want_logits, atol=ATOL, rtol=0)

    mts.save(sparse, tmp_path)
    fresh = mts.restore(build(seed=1), tmp_path)
    torch.testing.assert_close(_logits(fresh, x), got, atol=0, rtol=0)


def test_sparse_cross_attention_is_refused_with_the_fix():
    bart = mts.sparsify(_bart(), {"sparse_cfg": SPARSE})  # BartAttention serves both: known per call
    with pytest.raises(NotImplementedError, match=r"model\.decoder\.layers\.0\.encoder_attn \(BartAttention\): N:M "
                                                  r"sparsity on cross-attention .*add "
                                                  r"\"model\.decoder\.layers\.\*\.encoder_attn\": \{\"enable\": False\}"):
        _logits(bart, _bart_inputs(7))

    with pytest.raises(NotImplementedError, match=r"crossattention\.self \(BertCrossAttention\): N:M sparsity on "
                                                  r"cross-attention .*\"bert\.encoder\.layer\.\*\.crossattention\.self\""):
        mts.sparsify(_bert_decoder(), {"sparse_cfg": SPARSE})


def test_bert_decoder_cross_attention_runs_dense():
    base = _bert_decoder()
    cfg = {"sparse_cfg": {**SPARSE, "bert.encoder.layer.*.crossattention.self": {"enable": False}}}
    sparse = mts.sparsify(copy.deepcopy(base), cfg)
    attention = {row["module"]: row["attention"] for row in mts.conversion.summary_rows(sparse)}
    assert attention["bert.encoder.layer.0.crossattention.self"] == "cross-attention"
    assert attention["bert.encoder.layer.0.attention.self"] == "causal"
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (2, 24), generator=gen)
    encoder_states = torch.randn(2, 11, 64, generator=gen, dtype=torch.float64)
    encoder_mask = torch.ones(2, 11, dtype=torch.long)
    encoder_mask[1, :4] = 0
    x = {"input_ids": ids, "encoder_hidden_states": encoder_states, "encoder_attention_mask": encoder_mask}
    got = _logits(sparse, x)
    torch.testing.assert_close(got, _logits(_as_oracle(base), x), atol=ATOL, rtol=0)
    dense = mts.sparsify(copy.deepcopy(base), DENSE_CFG)
    torch.testing.assert_close(_logits(dense, x), _logits(base, x), atol=ATOL, rtol=0)


def test_key_codes_stand_for_token_codes_outside_cross_attention():
    """The mask function cannot tell a cross-attention mask from a bidirectional chunk after a
    cache: it returns key codes, which a call that is not cross-attention reads as the token
    codes it would have made (queries in the first slots, nothing real after them)."""
    padding = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1, 1]])
    for mask in (padding, None):
        key_codes = sparse_attention_mask(2, 3, 8, mask_function=bidirectional_mask_function, attention_mask=mask)
        assert key_codes.shape == (2, 1, 8) and key_codes.dtype == torch.int32
        want_keys = torch.ones(2, 8, dtype=torch.int32) if mask is None else padding.int()
        assert torch.equal(key_codes[:, 0], want_keys)
        assert torch.equal(codes_from_key_codes(key_codes, 3), token_codes(2, 3, 8, 0, 0, mask))
    # As many queries as keys: the token codes, as for an encoder's self-attention.
    codes = sparse_attention_mask(2, 8, 8, mask_function=bidirectional_mask_function, attention_mask=padding)
    assert torch.equal(codes, token_codes(2, 8, 8, 0, 0, padding))


def test_more_queries_than_keys_without_a_cross_attention_call_is_refused():
    model = mts.sparsify(_bart(), DENSE_CFG)
    encoder_self = model.model.encoder.layers[0].self_attn  # never a cross-attention call
    query = torch.randn(2, 4, 9, 16, dtype=torch.float64)
    key = torch.randn(2, 4, 6, 16, dtype=torch.float64)
    key_codes = sparse_attention_mask(2, 9, 6, mask_function=bidirectional_mask_function,
                                      attention_mask=torch.ones(2, 6, dtype=torch.long))
    with pytest.raises(NotImplementedError, match=r"encoder\.layers\.0\.self_attn \(BartAttention\): a bidirectional "
                                                  r"mask of 9 queries and 6 keys: cross-attention"):
        sparse_attention_forward(encoder_self, query, key, key, key_codes, scaling=0.3)


def test_whole_model_compiles_in_one_graph():
    """The forward that marks cross-attention calls traces: BART in one graph (fullgraph=True),
    equal to eager."""
    sparse = mts.sparsify(_bart(), {"sparse_cfg": {**SPARSE, CROSS: {"enable": False}}})
    x = _bart_inputs(7)
    torch._dynamo.reset()
    compiled = torch.compile(sparse, fullgraph=True)
    torch.testing.assert_close(_logits(compiled, x), _logits(sparse, x), atol=1e-12, rtol=0)


@pytest.mark.gpu
def test_gpu_bart_bf16_triton_matches_reference():
    """BART on CUDA: N:M self-attention and dense cross-attention (compacted encoder keys) on the
    Triton kernels in bf16, held to the bf16 floor against the float32 reference."""
    base = _bart().float()
    dense_cross = {CROSS: {"enable": False}}
    triton_cfg = {"sparse_cfg": {"default": {**SPARSE["default"], "backend": "triton"}, **dense_cross}}
    reference_cfg = {"sparse_cfg": {"default": {**SPARSE["default"], "method": "torch_sparse_softmax"}, **dense_cross}}
    fast = mts.sparsify(copy.deepcopy(base).to("cuda", torch.bfloat16), triton_cfg)
    floor = mts.sparsify(copy.deepcopy(base).to("cuda", torch.bfloat16), reference_cfg)
    exact = mts.sparsify(copy.deepcopy(base).to("cuda", torch.float32), reference_cfg)
    for dec_len in (1, 26):
        x = {k: v.cuda() for k, v in _bart_inputs(dec_len).items()}
        _within_bf16_noise(*[_logits(m, x) for m in (fast, floor, exact)])
    with torch.no_grad():
        tokens = fast.generate(input_ids=x["input_ids"], attention_mask=x["attention_mask"], max_new_tokens=6,
                               min_new_tokens=6, do_sample=False)
    assert tokens.shape[0] == 2 and tokens.shape[1] >= 7
