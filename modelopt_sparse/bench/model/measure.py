"""How implementations are timed on one setting: build, convert, run, time.

Every function here returns the fields of one result row (``ms``, ``compile_s``, ``note``,
...), or of one row per implementation (the ``*_interleaved`` ones, which time several
side by side), or raises; the runner records an exception as the error of the rows it
concerns and goes on. Only :func:`generate_static_interleaved` reports a failure of one
implementation itself (an error row beside the others), since its compile is per
implementation.
"""

from __future__ import annotations

import copy
import gc
import os
import re
import time

import torch

from ..errors import detail, short
from ..timing import interleaved_median_ms, median_ms, sync
from .cases import MODELS, Setting

# sparsify() configs of our implementations. Dense is the same kernel with N=0: it measures
# what the plugin costs, the sparse one what the sparsity gains on top.
DENSE_CFG = {"sparse_cfg": {"default": {"sparsity_n": 0}}}


def sparse_config(impl: str):
    import modelopt_sparse as mts

    return {"dense": DENSE_CFG, "2:4": mts.SPARSE_SOFTMAX_DEFAULT}[impl]


def build_model(model: str, tiny: bool, device: torch.device, dtype: torch.dtype, seed: int):
    """A random-weight ``LlamaForCausalLM`` of the named shape, with SDPA attention, in eval mode.

    The weights are drawn on ``device`` (an 8B-wide model initialises in seconds there, not
    minutes on the host), from ``seed``, so a rebuild gives the same weights.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = dict(MODELS[model]["tiny" if tiny else "full"])
    theta = fields.pop("rope_theta")
    # rope_parameters is the 5.x spelling; 5.17 and 5.24 both read it.
    config = LlamaConfig(**fields, rope_parameters={"rope_type": "default", "rope_theta": theta},
                         attn_implementation="sdpa")
    torch.manual_seed(seed)
    # Parameters are created in the target dtype, as from_pretrained(dtype=...) does: casting
    # afterwards would also cast the fp32 RoPE frequencies, which no real model has.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            net = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    net.eval()  # no .to(dtype): it would cast the float32 RoPE buffers too
    if net.config._attn_implementation != "sdpa":
        net.set_attn_implementation("sdpa")
    # No early stop: every generate call produces exactly the tokens asked for.
    net.generation_config.eos_token_id = None
    return net


def implementation(base, impl: str):
    """A copy of ``base`` running ``impl``: SDPA as built, or converted by ``mts.sparsify``."""
    model = copy.deepcopy(base)
    if impl == "sdpa":
        return model
    import modelopt_sparse as mts

    return mts.sparsify(model, sparse_config(impl))


def token_ids(setting: Setting, vocab: int, device, seed: int) -> torch.Tensor:
    # Drawn on the CPU from a fixed seed: the same prompt on every device and in every run.
    # Ids 0-2 (pad, bos, eos of the default config) are left out, so no id reads as padding.
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (setting.batch, setting.length), generator=gen).to(device)


def _last_logits(out) -> torch.Tensor:
    return out.logits[:, -1].float().cpu()


def _graph_counts() -> dict:
    """Dynamo's graph-break and graph counts since the last reset (private counters: None if
    this torch has none)."""
    try:
        from torch._dynamo.utils import counters

        return {"graph_breaks": int(sum(counters["graph_break"].values())),
                "graphs": int(counters["stats"]["unique_graphs"])}
    except Exception:
        return {"graph_breaks": None, "graphs": None}


def _graph_stats_since(before: dict) -> dict:
    """What :func:`_graph_counts` gained since ``before``: one model's own graphs and breaks
    when others were compiled before it without a reset."""
    after = _graph_counts()
    return {key: None if after[key] is None or before[key] is None else after[key] - before[key] for key in after}


def compile_failure(exc: BaseException) -> str:
    """One line on why Dynamo could not capture a whole graph: its complaint, the operator,
    and the last line of user code it was tracing (Dynamo's message puts the stack between)."""
    text = str(exc)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    what = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    context = next((ln for ln in lines if ln.startswith("Developer debug context:")), None)
    if context and context.removeprefix("Developer debug context:").strip():
        what += f" ({context.removeprefix('Developer debug context:').strip()})"
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(\S.*)', text)
    if frames:
        path, line, func, code = frames[-1]
        what += f" at {os.path.basename(path)}:{line} in {func}: {code.strip()}"
    return what if len(what) <= 500 else what[:497] + "..."


def _reset_dynamo() -> None:
    import torch._dynamo

    torch._dynamo.reset()
    try:
        from torch._dynamo.utils import counters

        counters.clear()
    except Exception:
        pass


def forward_eager(model, ids, call_kw, device, warmup, reps) -> dict:
    def call():
        return model(ids, **call_kw)

    ms = median_ms(call, device, warmup, reps)
    return {"ms": ms, "_last_logits": _last_logits(call())}


def forward_eager_interleaved(models: dict, ids, call_kw, device, warmup, reps) -> dict:
    """:func:`forward_eager` of several implementations (name -> model) in interleaved
    rounds (see :func:`..timing.interleaved_median_ms`); name -> fields of its row."""
    calls = {name: (lambda m=m: m(ids, **call_kw)) for name, m in models.items()}
    ms = interleaved_median_ms(calls, device, warmup, reps)
    return {name: {"ms": ms[name], "note": "timed in rounds interleaved with " + ", ".join(n for n in calls if n != name),
                   "_last_logits": _last_logits(call())} for name, call in calls.items()}


def _compile_fullgraph_first(attempt, reset: bool = True):
    """``attempt(fullgraph)`` with ``fullgraph=True``, and again with ``False`` if that raised.

    Dynamo is reset before each attempt unless ``reset`` is False (other models' compiled
    calls must stay alive); the graph stats count the attempt that worked either way.
    Returns ``(its value, fullgraph, seconds of the attempt that worked, graph stats,
    failure)``, where ``failure`` keeps the fullgraph error for the report (empty if none).
    """
    failure = {}
    for fullgraph in (True, False):
        if reset:
            _reset_dynamo()
        before = _graph_counts()
        start = time.perf_counter()
        try:
            value = attempt(fullgraph)
        except Exception as exc:
            if not fullgraph:
                raise
            failure = {"note": "fullgraph=True failed; compiled again with fullgraph=False",
                       "fullgraph_error": compile_failure(exc), "fullgraph_error_detail": detail(exc)}
            continue
        return value, fullgraph, time.perf_counter() - start, _graph_stats_since(before), failure
    raise AssertionError("unreachable: the fullgraph=False attempt returns or raises")


def forward_compiled(model, ids, call_kw, device, warmup, reps, backend) -> dict:
    """``torch.compile(model, fullgraph=True)``; if that cannot capture the model, the error is
    kept in ``note`` and the model is compiled again with ``fullgraph=False``."""

    def attempt(fullgraph):
        compiled = torch.compile(model, fullgraph=fullgraph, backend=backend)
        compiled(ids, **call_kw)
        sync(device)
        return compiled

    compiled, fullgraph, compile_s, stats, failure = _compile_fullgraph_first(attempt)
    ms = median_ms(lambda: compiled(ids, **call_kw), device, warmup, reps)
    last = _last_logits(compiled(ids, **call_kw))
    _reset_dynamo()  # frees the compiled graphs before the next model is compiled
    return {"ms": ms, "compile_s": compile_s, "fullgraph": fullgraph, **stats, **failure, "_last_logits": last}


def forward_cudagraphs(model, ids, call_kw, device, warmup, reps) -> dict:
    """One forward captured in a ``torch.cuda.CUDAGraph`` (static input, warm-up on a side
    stream as the PyTorch docs prescribe); ``graph.replay()`` is timed.

    transformers builds its masks differently while a stream captures (it skips the checks
    that read tensors back), so the capture runs a path the eager warm-up did not; a first
    capture that fails is tried once more, in case it failed on one-time set-up, and its
    error is kept in ``note``.
    """
    static_ids = ids.clone()
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(max(3, warmup)):
            model(static_ids, **call_kw)
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    note = None
    for attempt in range(2):
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.current_stream(device)
        try:
            with torch.cuda.graph(graph):
                static_out = model(static_ids, **call_kw)
            break
        except Exception as exc:
            # torch.cuda.graph's exit ends the capture and raises its own "capture invalidated"
            # error, leaving the capture stream current: restore it, and report the error that
            # broke the capture (the exit's exception carries it as __context__).
            torch.cuda.set_stream(stream)
            cause = exc.__context__ if exc.__context__ is not None else exc
            message = f"CUDA graph capture failed: {short(cause, 300)}"
            if cause is not exc:
                message += f" (then {short(exc, 150)})"
            if attempt == 1:
                raise RuntimeError(message) from exc
            note = f"first capture failed, the second one worked: {message}"
            graph = None  # dropped before the next capture (as `del`, which pyflakes misreads in a loop)
            torch.cuda.synchronize(device)
    ms = median_ms(graph.replay, device, warmup, reps)
    graph.replay()
    replayed = _last_logits(static_out)
    eager = _last_logits(model(static_ids, **call_kw))
    # A graph that baked in host-side state would replay something else than eager runs.
    diff = float((replayed - eager).abs().max())
    del graph, static_out
    return {"ms": ms, "replay_vs_eager_max_abs": diff, "note": note, "_last_logits": replayed}


def _greedy_config(new_tokens: int):
    """Greedy decoding of exactly ``new_tokens`` tokens: no early stop, no sampling."""
    from transformers import GenerationConfig

    return GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=1,
                            eos_token_id=None, pad_token_id=0)


def _static_compiled_config(new_tokens: int, fullgraph: bool, backend, device):
    """:func:`_greedy_config` with ``cache_implementation="static"`` and a ``CompileConfig``.

    On CUDA, transformers 5.x then compiles the decode step itself
    (``_valid_auto_compile_criteria`` and ``get_compiled_call`` in generation/utils.py and
    modeling_utils.py; the prefill runs eagerly). On the CPU that needs
    ``CompileConfig._compile_all_devices``.
    """
    from transformers import CompileConfig

    config = _greedy_config(new_tokens)
    compile_config = CompileConfig(fullgraph=fullgraph, backend=backend)
    if torch.device(device).type != "cuda":
        compile_config._compile_all_devices = True
    config.cache_implementation = "static"
    config.compile_config = compile_config
    return config


def _generate_call(model, ids, config):
    mask = torch.ones_like(ids)
    return lambda: model.generate(ids, attention_mask=mask, generation_config=config)


def compile_static_generate(model, ids, new_tokens: int, device, backend):
    """Compile ``model``'s decode step by one static-cache generate call, fullgraph first (see
    :func:`_compile_fullgraph_first`). Dynamo is not reset, so implementations compiled
    before keep their compiled calls. Returns the generation config that compiled and the
    row fields ``compile_s``, ``fullgraph``, ``graph_breaks``, ``graphs`` (and ``note``,
    ``fullgraph_error`` after a fallback)."""

    def attempt(fullgraph):
        # transformers keeps one compiled call per model, made from the first config it saw.
        for attr in ("_compiled_call", "_last_compile_config"):
            if attr in vars(model):
                delattr(model, attr)
        config = _static_compiled_config(new_tokens, fullgraph, backend, device)
        _generate_call(model, ids, config)()
        sync(device)
        return config

    config, fullgraph, compile_s, stats, failure = _compile_fullgraph_first(attempt, reset=False)
    note = None
    if "_compiled_call" not in vars(model):
        note = "transformers did not compile the decode step (generate ran eagerly)"
        fullgraph = None
    elif stats["graphs"] == 0:
        # Dense and 2:4 decode alike: the second finds the first one's graph in Dynamo's cache.
        note = "no new graph: Dynamo reused one compiled for an implementation before this one"
    return config, {"compile_s": compile_s, "fullgraph": fullgraph, **stats, **failure,
                    "note": _joined(failure.get("note"), note)}


def generate_eager_interleaved(models: dict, ids, setting: Setting, device, warmup, reps) -> dict:
    """Eager greedy ``generate`` of several implementations (name -> model), timed in rounds
    of one call each (see :func:`_generate_in_rounds`). name -> fields of its row."""
    config = _greedy_config(setting.new_tokens)
    calls = {name: _generate_call(model, ids, config) for name, model in models.items()}
    return _generate_in_rounds(calls, ids, setting, device, warmup, reps)


def generate_static_interleaved(models: dict, ids, setting: Setting, device, warmup, reps, backend) -> dict:
    """Static-cache greedy ``generate`` with a compiled decode step, of several
    implementations (name -> model) side by side: each one's decode step compiled in turn
    (:func:`compile_static_generate`), then all of them timed in rounds as
    :func:`generate_eager_interleaved` times the eager ones. Timed one after another, each
    on a fresh compile, two implementations with the same decode graph read 0.72 and 0.97 of
    SDPA in one run.

    Every compiled call stays alive until the rounds are over: Dynamo is reset once before
    the first compile and once after the last round, never in between. The compiling calls
    do not count as warm-up (each ran before the next implementation compiled): ``warmup``
    rounds follow the last compile. An implementation whose compile fails gets an error row
    (``status``, ``reason``, ``detail``); the others are timed without it. name -> fields
    of its row.
    """
    compiled, failed, calls = {}, {}, {}
    _reset_dynamo()
    try:
        for name, model in models.items():
            try:
                config, compiled[name] = compile_static_generate(model, ids, setting.new_tokens, device, backend)
            except Exception as exc:
                failed[name] = {"status": "error", "reason": short(exc), "detail": detail(exc)}
                continue
            calls[name] = _generate_call(model, ids, config)
        timed = _generate_in_rounds(calls, ids, setting, device, warmup, reps) if calls else {}
    finally:
        _reset_dynamo()  # frees the compiled graphs before the next setting compiles
    out = {}
    for name in models:
        if name in failed:
            out[name] = failed[name]
            continue
        # The compile's note (a fullgraph fallback, a reused graph) first: it says what was timed.
        out[name] = {**compiled[name], **timed[name], "note": _joined(compiled[name]["note"], timed[name]["note"])}
    return out


def _joined(*notes) -> str | None:
    """The notes that are there, in order, as one; None if there is none."""
    return "; ".join(n for n in notes if n) or None


def _generate_in_rounds(calls: dict, ids, setting: Setting, device, warmup, reps) -> dict:
    """Generate calls (name -> zero-argument callable), ``warmup`` untimed rounds and then
    ``reps`` timed ones (:func:`_timed_rounds`); name -> ``ms`` (median), ``tokens_per_s``
    (batch x new tokens over it, prefill included), ``round_ms``, ``note``, ``_tokens`` and,
    beside an ``sdpa`` entry, ``paired_ratio_vs_sdpa``.

    Generate is host-bound and the host drifts: back-to-back blocks of one implementation
    read up to 2x apart between runs, so every round calls each implementation once, and
    the paired ratio compares calls of the same round.
    """
    n = setting.new_tokens
    for _ in range(warmup):
        for call in calls.values():
            call()
    times, last = _timed_rounds(calls, device, reps)
    note = f"median of {reps} calls"
    if len(calls) > 1:
        note += ", in rounds with the other implementations (rotating order)"
    out = {}
    for name, ts in times.items():
        new = last[name][:, ids.shape[1]:]
        if new.shape[1] != n:
            raise RuntimeError(f"{name}: generate returned {new.shape[1]} new tokens, not {n}")
        ms = sorted(ts)[len(ts) // 2]
        out[name] = {"ms": ms, "tokens_per_s": setting.batch * n / (ms / 1e3), "_tokens": new.tolist(),
                     "round_ms": [round(t, 3) for t in ts], "note": note}
    if "sdpa" in times:
        for name, ts in times.items():
            if name != "sdpa":
                # tok/s ratio of each round (SDPA's time / ours, same round), then the median:
                # slow drift across rounds cancels in the pair.
                out[name]["paired_ratio_vs_sdpa"] = paired_median_ratio(times["sdpa"], ts)
    return out


def _timed_rounds(calls: dict, device, reps: int) -> tuple[dict, dict]:
    """``reps`` rounds that call each of ``calls`` (name -> zero-argument callable) once,
    synchronised before and after each call. Each round starts with another implementation
    than the round before, so that no one always runs first (right after the previous
    round's last call, or on a cold cache). Returns name -> wall ms of each round, and
    name -> what its last call returned."""
    names = list(calls)
    times = {name: [] for name in names}
    last = {}
    for round_index in range(reps):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            sync(device)
            t0 = time.perf_counter()
            last[name] = calls[name]()
            sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times, last


def paired_median_ratio(reference_ms: list[float], mine_ms: list[float]) -> float:
    """Median over rounds of ``reference / mine`` (a speed ratio: above 1 when mine is faster)."""
    ratios = sorted(r / m for r, m in zip(reference_ms, mine_ms))
    mid = len(ratios) // 2
    return ratios[mid] if len(ratios) % 2 else (ratios[mid - 1] + ratios[mid]) / 2


def host_call_fn(impl: str, grad: bool, device):
    """One attention call at a tiny shape (1 sequence of 16 tokens, 4 heads, D=64, bf16), as
    a zero-argument callable: the GPU work is a few µs, so back-to-back calls measure the
    host's cost of issuing one.

    ``dense`` and ``2:4`` are ``mts.attention`` on ``[16, 4, 64]`` with N=0 and with the
    default preset's pattern (2:4, window 64: at 16 tokens every key is in the window);
    ``sdpa`` is ``F.scaled_dot_product_attention`` on ``[1, 4, 16, 64]`` with ``is_causal=True``.
    """
    import torch.nn.functional as F

    import modelopt_sparse as mts

    s, h, d, dtype = 16, 4, 64, torch.bfloat16
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype).requires_grad_(grad)

    if impl == "sdpa":
        q, k, v = randn(1, h, s, d), randn(1, h, s, d), randn(1, h, s, d)
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    q, k, v = randn(s, h, d), randn(s, h, d), randn(s, h, d)
    start = torch.zeros(1, dtype=torch.int32, device=device)
    lens = torch.full((1,), s, dtype=torch.int32, device=device)
    pattern = {"dense": 0, "2:4": 2}[impl]
    # What sparsify's "auto" picks: the Triton kernel on CUDA, the reference elsewhere
    # (attention()'s own "auto" would take the Triton interpreter under TRITON_INTERPRET=1).
    backend = "triton" if torch.device(device).type == "cuda" else "torch"
    return lambda: mts.attention(q, k, v, start, lens, s, is_causal=True, sparsity_n=pattern, sparsity_m=4,
                                 num_sink_tokens=0, dense_window_size=64, backend=backend)


def host_calls_interleaved(impls, grad: bool, device, calls: int, warmup: int, rounds: int = 10) -> dict:
    """µs per call of each implementation: ``calls`` back-to-back calls in total, split into
    ``rounds`` blocks that take turns between the implementations (synchronised around each
    block; the median block counts), so a drifting host affects every one alike. Garbage
    collection is off inside the blocks, as timeit does: the first calls of an
    implementation compile its kernels, and the objects that leaves behind made a later
    full collection land in another implementation's loop. impl -> fields of its row."""
    fns = {impl: host_call_fn(impl, grad, device) for impl in impls}
    per_block = max(1, calls // rounds)
    blocks = {impl: [] for impl in impls}
    with torch.set_grad_enabled(grad):
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        sync(device)
        gc.collect()
        gc.disable()
        try:
            for _ in range(rounds):
                for impl, fn in fns.items():
                    sync(device)
                    t0 = time.perf_counter()
                    for _ in range(per_block):
                        fn()
                    sync(device)
                    blocks[impl].append((time.perf_counter() - t0) / per_block)
        finally:
            gc.enable()
    out = {}
    for impl, times in blocks.items():
        us = sorted(times)[len(times) // 2] * 1e6
        out[impl] = {"us_per_call": us, "ms": us / 1e3, "calls": per_block * rounds,
                     "note": f"median of {rounds} blocks of {per_block} calls, in turn with the other implementations"}
    return out
