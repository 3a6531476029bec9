"""Quick GPU check of the SmolLM2-shape 1x1024 forward under CUDA graphs and torch.compile:
SDPA against a sparsified model, with the bench's own measurement functions (one setting,
few reps, so it fits a short device call). Prints one line per row as it goes.

    python tools/check_smollm2_graphs.py [--impls dense 2:4] [--reps 20]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from modelopt_sparse.bench.model import measure  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impls", nargs="+", default=["dense", "2:4"])
    parser.add_argument("--modes", nargs="+", default=["cudagraphs", "compiled"], choices=["cudagraphs", "compiled"])
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    device = torch.device("cuda")
    base = measure.build_model("smollm2", False, device, torch.bfloat16, 0)
    ids = torch.randint(0, 1000, (1, 1024), device=device)
    call_kw = {"use_cache": False, "logits_to_keep": 1}
    for mode in args.modes:
        ms = {}
        for impl in ["sdpa", *args.impls]:
            t0 = time.perf_counter()
            model = measure.implementation(base, impl)
            with torch.no_grad():
                try:
                    if mode == "cudagraphs":
                        row = measure.forward_cudagraphs(model, ids, call_kw, device, 3, args.reps)
                    else:
                        row = measure.forward_compiled(model, ids, call_kw, device, 3, args.reps, "inductor")
                except Exception as exc:  # noqa: BLE001 - report and go on
                    print(f"{mode:<10} {impl:<6} ERROR {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                    continue
            ms[impl] = row["ms"]
            ratio = f"{row['ms'] / ms['sdpa']:.2f}x SDPA" if "sdpa" in ms and impl != "sdpa" else ""
            extra = {k: row[k] for k in ("graph_breaks", "replay_vs_eager_max_abs", "note") if row.get(k) is not None}
            print(f"{mode:<10} {impl:<6} {row['ms']:8.3f} ms  {ratio:<11} {extra} ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
            del model


if __name__ == "__main__":
    main()
