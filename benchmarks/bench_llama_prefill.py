"""Prefill latency of a random-init Llama (8 layers, hidden 2048, 32/8 heads) on one GPU:
SDPA against the model sparsified with modelopt_sparse (dense through our kernel, 2:4, 4:8).

    python benchmarks/bench_llama_prefill.py --seq-len 8192 --out results/
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import modelopt_sparse as mts  # noqa: E402


def _time_ms(fn, warmup=3, reps=10):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--out", default=None, help="folder for prefill.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=args.layers,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=args.seq_len,
    )
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()
    model.set_attn_implementation("sdpa")
    ids = torch.randint(0, config.vocab_size, (1, args.seq_len), device="cuda")

    @torch.no_grad()
    def prefill():
        return model(ids, logits_to_keep=1).logits

    rows = {"sdpa": _time_ms(prefill)}
    reference_logits = prefill().float()
    mts.sparsify(model, {"sparse_cfg": {"*": {"sparsity_n": 0, "backend": "triton"}}})
    rows["mts dense"] = _time_ms(prefill)
    dense_err = ((prefill().float() - reference_logits).norm() / reference_logits.norm()).item()
    for name, (n, m) in {"mts 2:4": (2, 4), "mts 4:8": (4, 8), "mts 8:16": (8, 16)}.items():
        # sparsify() on a converted model re-applies the new config to every module.
        mts.sparsify(model, {"sparse_cfg": {"*": {"sparsity_n": n, "sparsity_m": m, "backend": "triton"}}})
        rows[name] = _time_ms(prefill)
    result = {
        "seq_len": args.seq_len, "layers": args.layers, "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__, "prefill_ms": rows, "dense_vs_sdpa_rel_err": dense_err,
    }
    print(f"Llama {args.layers}x2048, 32/8 heads, bf16, prefill of {args.seq_len} tokens on {result['gpu']}")
    for name, ms in rows.items():
        print(f"  {name:<10} {ms:8.2f} ms   {rows['sdpa'] / ms:5.2f}x SDPA")
    print(f"  mts dense vs SDPA logits, relative error: {dense_err:.2e}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "prefill.json"), "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
