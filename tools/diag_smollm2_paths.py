"""Why a sparsified SmolLM2-shape forward fails CUDA-graph capture or runs slow compiled (GPU).

Prints, for one implementation (default dense): the first host-device synchronisation of an
eager forward (``torch.cuda.set_sync_debug_mode("error")``, with the stack inside this
package), the stack of the first operation a CUDA-graph capture refuses, and the GPU kernels
of one eager and one compiled forward (torch.profiler, top by total time).

    python tools/diag_smollm2_paths.py [--impl dense] [--batch 1] [--length 1024]
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from modelopt_sparse.bench.model import measure  # noqa: E402


def _our_frames(exc: BaseException, limit: int = 14) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    keep = [f for f in frames if "modelopt_sparse" in f.filename or "transformers" in f.filename] or frames
    return "".join(traceback.format_list(keep[-limit:])) + f"{type(exc).__name__}: {str(exc)[:300]}"


def _kernels(fn, label: str, top: int = 12) -> None:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0 and e.device_type.name == "CUDA"]
    total = sum(e.device_time_total for e in events)
    print(f"-- {label}: {len(events)} kernel kinds, {total / 1e3:.2f} ms GPU")
    for e in sorted(events, key=lambda e: -e.device_time_total)[:top]:
        print(f"   {e.device_time_total / 1e3:8.3f} ms  x{e.count:<4} {e.key[:90]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", default="dense", choices=["sdpa", "dense", "2:4"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--length", type=int, default=1024)
    args = parser.parse_args()
    device = torch.device("cuda")
    base = measure.build_model("smollm2", False, device, torch.bfloat16, 0)
    model = measure.implementation(base, args.impl)
    ids = torch.randint(0, 1000, (args.batch, args.length), device=device)
    call_kw = {"use_cache": False, "logits_to_keep": 1}
    with torch.no_grad():
        for _ in range(3):
            model(ids, **call_kw)
        torch.cuda.synchronize()
        print("== first synchronisation of an eager forward")
        torch.cuda.set_sync_debug_mode("error")
        try:
            model(ids, **call_kw)
            print("   none")
        except Exception as exc:  # noqa: BLE001 - report whatever it is
            print(_our_frames(exc))
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
        print("== CUDA graph capture")
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.current_stream()
        try:
            with torch.cuda.graph(graph):
                model(ids, **call_kw)
            print("   captured")
        except Exception as exc:  # noqa: BLE001
            torch.cuda.set_stream(stream)
            cause = exc.__context__ if exc.__context__ is not None else exc
            print(_our_frames(cause))
        torch.cuda.synchronize()
        _kernels(lambda: model(ids, **call_kw), f"eager {args.impl}")
        compiled = torch.compile(model, fullgraph=True)
        _kernels(lambda: compiled(ids, **call_kw), f"compiled {args.impl}")


if __name__ == "__main__":
    main()
