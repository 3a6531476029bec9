"""Sweep transformers' model types: does sparsify() convert each, and is it exact with N:M off?

For every causal-LM, seq2seq and image-text-to-text model type that transformers registers,
the sweep builds a tiny random model from the type's default config with its sizes shrunk
(sub-configs too; multimodal models get text only, which runs their language model), runs a left-padded batch in float64 on the CPU through the model's own
(eager) attention and through ``mts.sparsify`` with ``sparsity_n=0`` (cross-attention kept
dense), and compares the logits on the real tokens. Each type ends in one verdict:

* ``exact``: converted, the logits agree to 1e-8 (what every supported model must give);
* ``exact (sdpa)``: equal to transformers' SDPA path, where its own eager and SDPA paths
  disagree (a module's ``is_causal`` against the mask it gets: PaliGemma's text-only prefix);
* ``DIFFERENT``: converted but the logits differ: a silent error, a bug to fix;
* ``refused``: sparsify (or the first forward) raised NotImplementedError naming the feature;
* ``no attention``: nothing converts (the model computes attention itself);
* ``skipped`` / ``error``: the tiny model could not be built or run as such (not ours).

Usage::

    python tools/model_sweep.py                       # every type, table on stdout
    python tools/model_sweep.py llama bart --json out.json

A developer tool: its results go to docs/results/, and a DIFFERENT line is a bug.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import signal
import sys
import time
import warnings

import torch

SIZES = {
    # attribute: tiny value (set only where the default config has the attribute)
    "vocab_size": 128, "hidden_size": 64, "d_model": 64, "n_embd": 64, "embed_dim": 64,
    "num_hidden_layers": 2, "n_layer": 2, "num_layers": 2, "encoder_layers": 2, "decoder_layers": 2,
    "num_decoder_layers": 2, "num_attention_heads": 4, "n_head": 4, "encoder_attention_heads": 4,
    "decoder_attention_heads": 4, "num_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "d_kv": 16,
    "intermediate_size": 96, "ffn_dim": 96, "encoder_ffn_dim": 96, "decoder_ffn_dim": 96, "d_ff": 96,
    "n_inner": 96, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "num_experts": 4,
    "num_local_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2, "max_position_embeddings": 128,
    "n_positions": 128, "sliding_window": 8, "attention_dropout": 0.0, "attn_pdrop": 0.0,
    "attention_probs_dropout_prob": 0.0, "dropout": 0.0, "hidden_dropout_prob": 0.0, "kv_lora_rank": 16,
    "q_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
}
SEQ, PAD = 24, 5
MAX_PARAMETERS = 30_000_000


def tiny_config(config_class, keep_head_dim: bool = False):
    """The type's default config, shrunk. ``keep_head_dim``: the second try, for models whose
    rotary sections or head layout fix the head size: two heads of the default head size."""
    cfg = config_class()
    shrink(cfg, keep_head_dim)
    return cfg


def shrink(cfg, keep_head_dim: bool = False, depth: int = 0) -> None:
    # Composite configs (vision-language, audio-language): every sub-config alike, nested
    # ones too; the sweep then feeds text only, which runs the language model.
    if depth < 4:
        for value in list(vars(cfg).values()):
            if hasattr(value, "to_dict") and hasattr(value, "model_type"):
                shrink(value, keep_head_dim, depth + 1)
    sizes = dict(SIZES)
    if keep_head_dim:
        heads, hidden = getattr(cfg, "num_attention_heads", None), getattr(cfg, "hidden_size", None)
        head_dim = getattr(cfg, "head_dim", None) or (hidden // heads if heads and hidden else None)
        if isinstance(head_dim, int):
            kv = getattr(cfg, "num_key_value_heads", None)
            sizes.update(hidden_size=2 * head_dim, num_attention_heads=2, head_dim=head_dim,
                         num_key_value_heads=1 if kv and heads and kv < heads else 2)
    for name, value in sizes.items():
        if hasattr(cfg, name) and not isinstance(getattr(cfg, name), (dict, list)) and getattr(cfg, name) is not None:
            setattr(cfg, name, value)
    for name in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "sep_token_id"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value >= SIZES["vocab_size"]:
            setattr(cfg, name, {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}.get(name, 3))
    for name in ("suppress_tokens", "begin_suppress_tokens"):
        if hasattr(cfg, name):
            setattr(cfg, name, None)
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = list(cfg.layer_types)[: SIZES["num_hidden_layers"]]


@contextlib.contextmanager
def time_limit(seconds):
    def fail(*_):
        raise TimeoutError(f"over {seconds} s")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def sweep_one(model_type: str, model_class) -> dict:
    result = _sweep_one(model_type, model_class, keep_head_dim=False)
    if result["verdict"] == "skipped":  # the tiny config did not build or run: keep the head size
        second = _sweep_one(model_type, model_class, keep_head_dim=True)
        if second["verdict"] != "skipped":
            return {**second, "config": "two heads of the default head size"}
    return result


def _sweep_one(model_type: str, model_class, keep_head_dim: bool) -> dict:
    import transformers

    import modelopt_sparse as mts

    config_class = transformers.CONFIG_MAPPING[model_type]
    try:
        cfg = tiny_config(config_class, keep_head_dim)
        with torch.device("meta"):  # count first: a config the shrinking missed can be huge
            size = sum(p.numel() for p in model_class._from_config(cfg, attn_implementation="eager").parameters())
    except Exception as err:  # noqa: BLE001
        return {"verdict": "skipped", "why": f"build: {type(err).__name__}: {str(err)[:160]}"}
    if size > MAX_PARAMETERS:
        return {"verdict": "skipped", "why": f"{size / 1e6:.0f}M parameters after shrinking"}
    try:
        torch.manual_seed(0)
        model = model_class._from_config(cfg, attn_implementation="eager").to(torch.float32).eval()
    except Exception as err:  # noqa: BLE001 - a sweep reports every failure
        return {"verdict": "skipped", "why": f"build: {type(err).__name__}: {str(err)[:160]}"}
    vocab = getattr(cfg, "vocab_size", 128) or 128
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(5, min(vocab, 128), (2, SEQ), generator=gen)
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[1, :PAD] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    seq2seq = model.config.is_encoder_decoder
    if seq2seq:
        inputs["decoder_input_ids"] = torch.randint(5, min(vocab, 128), (2, 9), generator=gen)
    try:
        with torch.no_grad():
            want = model(**inputs, use_cache=False).logits
    except Exception as err:  # noqa: BLE001
        return {"verdict": "skipped", "why": f"eager run: {type(err).__name__}: {str(err)[:160]}"}
    cfg_dense = {"sparse_cfg": {"default": {"sparsity_n": 0, "sparsity_m": 4}}}
    try:
        sparse = mts.sparsify(copy.deepcopy(model), cfg_dense)
        with torch.no_grad():
            got = sparse(**inputs, use_cache=False).logits
    except NotImplementedError as err:
        return {"verdict": "refused", "why": str(err)[:240]}
    except ValueError as err:
        if "found no supported attention module" in str(err):
            return {"verdict": "no attention", "why": str(err)[:160]}
        return {"verdict": "error", "why": f"ValueError: {str(err)[:240]}"}
    except Exception as err:  # noqa: BLE001
        return {"verdict": "error", "why": f"{type(err).__name__}: {str(err)[:240]}"}
    real = slice(None) if seq2seq else mask.bool()

    def close(a, b):
        diff = (a[real] - b[real]).abs().max().item() if a.shape == b.shape else float("inf")
        return diff, diff <= 1e-4 * max(1.0, b[real].abs().max().item())

    diff, same = close(got, want)
    result = {"verdict": "exact" if same else "DIFFERENT", "max_abs_diff": diff,
              "modules": len(mts.conversion.sparse_modules(sparse))}
    if not same and getattr(model_class, "_supports_sdpa", False):
        # transformers' eager and SDPA paths can disagree (a module's is_causal against the mask
        # it gets: PaliGemma's prefix); SDPA is the model's default path.
        torch.manual_seed(0)
        sdpa = model_class._from_config(cfg, attn_implementation="sdpa").to(torch.float32).eval()
        with torch.no_grad():
            sdpa_logits = sdpa(**inputs, use_cache=False).logits
        sdpa_diff, sdpa_same = close(got, sdpa_logits)
        if sdpa_same and not close(sdpa_logits, want)[1]:
            result.update(verdict="exact (sdpa)", max_abs_diff=sdpa_diff, eager_diff=diff)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("types", nargs="*", help="model types (default: every causal-LM and seq2seq type)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--timeout", type=int, default=120, help="seconds per model type")
    args = p.parse_args(argv)
    import transformers
    from transformers.models.auto import modeling_auto as auto

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    names = {**auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES, **auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
             **auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES}
    types = args.types or sorted(names)
    results = {}
    for model_type in types:
        start = time.perf_counter()
        class_name = names.get(model_type)
        model_class = getattr(transformers, class_name, None) if isinstance(class_name, str) else None
        if model_class is None:
            results[model_type] = {"verdict": "skipped", "why": f"no class {class_name!r}"}
        else:
            try:
                with time_limit(args.timeout), contextlib.redirect_stdout(io.StringIO()):
                    results[model_type] = sweep_one(model_type, model_class)
            except Exception as err:  # noqa: BLE001
                results[model_type] = {"verdict": "error", "why": f"{type(err).__name__}: {str(err)[:240]}"}
        results[model_type]["seconds"] = round(time.perf_counter() - start, 1)
        r = results[model_type]
        detail = f"{r['max_abs_diff']:.1e} ({r['modules']} modules)" if "max_abs_diff" in r else r.get("why", "")
        print(f"{model_type:28s} {r['verdict']:12s} {detail}", flush=True)
    counts: dict[str, int] = {}
    for r in results.values():
        counts[r["verdict"]] = counts.get(r["verdict"], 0) + 1
    print("\n" + ", ".join(f"{v}: {n}" for v, n in sorted(counts.items())))
    if args.json:
        versions = {"torch": torch.__version__, "transformers": transformers.__version__}
        with open(args.json, "w") as f:
            json.dump({"versions": versions, "results": results}, f, indent=1)
    return 1 if counts.get("DIFFERENT") else 0


if __name__ == "__main__":
    sys.exit(main())
