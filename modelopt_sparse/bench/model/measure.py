"""How implementations are timed on one setting: build, convert, run, time.

Every function here returns the fields of one result row (``ms``, ``compile_s``, ``note``,
...), or of one row per implementation (the ``*_interleaved`` ones, which time several
side by side), or raises; the runner records an exception as the error of the rows it
concerns and goes on. The compiled and captured ones (:func:`forward_compiled_interleaved`,
:func:`forward_cudagraphs_interleaved`, :func:`generate_static_interleaved`) report a
failure of one implementation themselves (an error row beside the others), since its
compile or capture is per implementation.

Side by side means: every implementation prepared first (converted, compiled, captured),
then all timed in the same rounds (:func:`_timed_rounds`: the order changes every round),
and each of ours reported with the median of its per-round ratios to SDPA
(``paired_ratio_vs_sdpa``) beside the median of its own times (``ms``).
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


def _compile_fullgraph_first(attempt):
    """``attempt(fullgraph)`` with ``fullgraph=True``, and again with ``False`` if that raised.

    Dynamo is not reset between the attempts (other implementations' compiled calls must
    stay alive until their rounds); the graph stats count the attempt that worked. Returns
    ``(its value, fullgraph, seconds of the attempt that worked, graph stats, failure)``,
    where ``failure`` keeps the fullgraph error for the report (empty if none).
    """
    failure = {}
    for fullgraph in (True, False):
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


def _compile_fields(fullgraph, compile_s: float, stats: dict, failure: dict, note: str | None = None) -> dict:
    """The compile fields of a row; a compile that added no graph says so in its note."""
    if stats["graphs"] == 0 and note is None:
        # Two implementations with the same graph: the second finds the first one's in Dynamo's cache.
        note = "no new graph: Dynamo reused one compiled for an implementation before this one"
    return {"compile_s": compile_s, "fullgraph": fullgraph, **stats, **failure,
            "note": _joined(failure.get("note"), note)}


def forward_compiled_interleaved(models: dict, ids, call_kw, device, warmup, reps, backend) -> dict:
    """``torch.compile(model, fullgraph=True)`` of several implementations (name -> model)
    side by side, then timed in rotating rounds (:func:`forward_in_rounds`). A model whose
    whole graph cannot be captured keeps the error (``fullgraph_error``, ``note``) and is
    compiled again with ``fullgraph=False``; one that cannot be compiled at all is an error
    row and the others are timed without it.

    Compiled one after another and each timed right after its compile, the same model read
    SDPA 12.6 ms at 1x1024 and 10.0 ms at 8x1024, 2:4 a third faster than SDPA at 1x1024 and
    slower at 8x1024 (H200, session 13): host-bound calls timed minutes apart. Dynamo is reset
    once before the first compile and once after the last round, never in between, so every
    compiled model stays alive until the rounds are over. name -> fields of its row.
    """

    def prepare(name, model):
        def attempt(fullgraph):
            compiled = torch.compile(model, fullgraph=fullgraph, backend=backend)
            compiled(ids, **call_kw)
            sync(device)
            return compiled

        compiled, fullgraph, compile_s, stats, failure = _compile_fullgraph_first(attempt)
        return (lambda: compiled(ids, **call_kw)), _compile_fields(fullgraph, compile_s, stats, failure)

    _reset_dynamo()
    try:
        return _prepare_then_rounds(models, prepare, lambda calls: forward_in_rounds(calls, device, warmup, reps))
    finally:
        _reset_dynamo()  # frees the compiled graphs before the next setting compiles


def forward_compiled(model, ids, call_kw, device, warmup, reps, backend) -> dict:
    """:func:`forward_compiled_interleaved` of one model (raises if it cannot be compiled)."""
    return _only(forward_compiled_interleaved({"model": model}, ids, call_kw, device, warmup, reps, backend))


def capture_forward(model, ids, call_kw, device, warmup):
    """One forward captured in a ``torch.cuda.CUDAGraph`` (a static copy of ``ids``, warm-up
    on a side stream as the PyTorch docs prescribe). Returns ``(replay, static_ids, note)``:
    ``replay()`` replays the graph and returns its (static) output.

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

    def replay():
        graph.replay()
        return static_out

    return replay, static_ids, note


def forward_cudagraphs_interleaved(models: dict, ids, call_kw, device, warmup, reps) -> dict:
    """Every implementation (name -> model) captured in its own CUDA graph
    (:func:`capture_forward`), then the replays timed in rotating rounds
    (:func:`forward_in_rounds`); all graphs stay alive until the rounds are over. After
    them each replay's output is checked against an eager forward of the same input
    (``replay_vs_eager_max_abs``: a graph that baked in host-side state would replay
    something else). An implementation whose capture fails is an error row beside the
    others. name -> fields of its row."""
    static = {}

    def prepare(name, model):
        replay, static_ids, note = capture_forward(model, ids, call_kw, device, warmup)
        static[name] = (model, static_ids)
        return replay, {"note": note}

    def rounds_then_check(calls):
        timed = forward_in_rounds(calls, device, warmup, reps)
        for name, fields in timed.items():
            model, static_ids = static[name]
            eager = _last_logits(model(static_ids, **call_kw))
            fields["replay_vs_eager_max_abs"] = float((fields["_last_logits"] - eager).abs().max())
        return timed

    return _prepare_then_rounds(models, prepare, rounds_then_check)


def forward_cudagraphs(model, ids, call_kw, device, warmup, reps) -> dict:
    """:func:`forward_cudagraphs_interleaved` of one model (raises if its capture fails)."""
    return _only(forward_cudagraphs_interleaved({"model": model}, ids, call_kw, device, warmup, reps))


def _only(out: dict) -> dict:
    """The one row of a side-by-side measurement of one model; its error raised."""
    (row,) = out.values()
    if row.get("status") == "error":
        raise RuntimeError(row["reason"])
    return row


def _prepare_then_rounds(models: dict, prepare, timed_rounds) -> dict:
    """Side by side: ``prepare(name, model)`` of every model first (a compile, a capture),
    which returns ``(zero-argument call, fields of its row)``; then ``timed_rounds(calls)``
    (name -> call) times all the prepared calls together, name -> fields. A model whose
    prepare raises gets an error row (``status``, ``reason``, ``detail``) and the others go
    on without it. name -> fields of its row, in the order of ``models``; the prepare's note
    comes first (a fullgraph fallback, a reused graph: it says what was timed)."""
    prepared, calls, failed = {}, {}, {}
    for name, model in models.items():
        try:
            calls[name], prepared[name] = prepare(name, model)
        except Exception as exc:
            failed[name] = {"status": "error", "reason": short(exc), "detail": detail(exc)}
    timed = timed_rounds(calls) if calls else {}
    calls.clear()  # the compiled calls and graphs go before the caller releases memory
    out = {}
    for name in models:
        if name in failed:
            out[name] = failed[name]
        else:
            out[name] = {**prepared[name], **timed[name],
                         "note": _joined(prepared[name].get("note"), timed[name].get("note"))}
    return out


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

    config, fullgraph, compile_s, stats, failure = _compile_fullgraph_first(attempt)
    note = None
    if "_compiled_call" not in vars(model):
        note = "transformers did not compile the decode step (generate ran eagerly)"
        fullgraph = None
    # Dense and 2:4 decode alike: the second finds the first one's graph (graphs 0, its note).
    return config, _compile_fields(fullgraph, compile_s, stats, failure, note)


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

    def prepare(name, model):
        config, fields = compile_static_generate(model, ids, setting.new_tokens, device, backend)
        return _generate_call(model, ids, config), fields

    _reset_dynamo()
    try:
        return _prepare_then_rounds(
            models, prepare, lambda calls: _generate_in_rounds(calls, ids, setting, device, warmup, reps))
    finally:
        _reset_dynamo()  # frees the compiled graphs before the next setting compiles


def _joined(*notes) -> str | None:
    """The notes that are there, in order, as one; None if there is none."""
    return "; ".join(n for n in notes if n) or None


def _generate_in_rounds(calls: dict, ids, setting: Setting, device, warmup, reps) -> dict:
    """Generate calls (name -> zero-argument callable), ``warmup`` untimed calls each and
    then ``reps`` timed rounds of one call each (:func:`_timed_rounds`); name -> ``ms``
    (median), ``tokens_per_s`` (batch x new tokens over it, prefill included),
    ``round_ms``, ``note``, ``_tokens`` and, beside an ``sdpa`` entry,
    ``paired_ratio_vs_sdpa`` (a tok/s ratio: SDPA's time / ours, per round).

    Generate is host-bound and the host drifts: back-to-back blocks of one implementation
    read up to 2x apart between runs, so every round calls each implementation once, and
    the paired ratio compares calls of the same round.
    """
    n = setting.new_tokens
    times, last = _timed_rounds(calls, device, reps, per_round=1, warmup=warmup)
    out = _round_fields(times, per_round=1, speed=True)
    for name, fields in out.items():
        new = last[name][:, ids.shape[1]:]
        if new.shape[1] != n:
            raise RuntimeError(f"{name}: generate returned {new.shape[1]} new tokens, not {n}")
        fields.update(tokens_per_s=setting.batch * n / (fields["ms"] / 1e3), _tokens=new.tolist())
    return out


# Forward calls timed back to back within a round: one call between two synchronisations
# would time the launch queue filling up, not a call in a stream of calls.
FORWARD_CALLS_PER_ROUND = 3


def forward_in_rounds(calls: dict, device, warmup, reps) -> dict:
    """Forward calls (name -> zero-argument callable returning the model's output),
    ``warmup`` untimed calls each, then ``reps`` rounds of :data:`FORWARD_CALLS_PER_ROUND`
    back-to-back calls each (:func:`_timed_rounds`). name -> ``ms`` (the median round's ms
    per call), ``round_ms``, ``note``, ``_last_logits`` and, beside an ``sdpa`` entry,
    ``paired_ratio_vs_sdpa`` (a time ratio: ours / SDPA's, per round)."""
    times, last = _timed_rounds(calls, device, reps, per_round=FORWARD_CALLS_PER_ROUND, warmup=warmup)
    out = _round_fields(times, per_round=FORWARD_CALLS_PER_ROUND, speed=False)
    for name, fields in out.items():
        fields["_last_logits"] = _last_logits(last[name])
    return out


def _round_fields(times: dict, per_round: int, speed: bool) -> dict:
    """The row fields of rounds timed by :func:`_timed_rounds` (name -> ms per call of each
    round): ``ms`` (the median round), ``round_ms``, ``note`` and, beside ``sdpa``,
    ``paired_ratio_vs_sdpa``: the median over rounds of SDPA's time / ours (``speed``: a
    tok/s ratio) or of ours / SDPA's (a time ratio). Slow drift across rounds cancels in
    each pair, which the ratio of the medians does not."""
    out = {}
    for name, ts in times.items():
        rounds = len(ts)
        note = f"median of {rounds} calls" if per_round == 1 else f"median of {rounds} rounds of {per_round} calls"
        if len(times) > 1:
            note += ", in rounds with the other implementations (rotating order)"
        out[name] = {"ms": sorted(ts)[rounds // 2], "round_ms": [round(t, 3) for t in ts], "note": note}
    if "sdpa" in times:
        for name, ts in times.items():
            if name != "sdpa":
                pair = (times["sdpa"], ts) if speed else (ts, times["sdpa"])
                out[name]["paired_ratio_vs_sdpa"] = paired_median_ratio(*pair)
    return out


def round_order(names: list, round_index: int) -> list:
    """The order of ``names`` in round ``round_index``: rotated by one each round, and
    reversed every other cycle of ``len(names)`` rounds, so that over ``2 len(names)``
    rounds each one runs first as often as any other and right after each other one as
    often (a rotation alone keeps dense right after SDPA in two rounds of three)."""
    n = len(names)
    base = list(names) if (round_index // n) % 2 == 0 else list(reversed(names))
    shift = round_index % n
    return base[shift:] + base[:shift]


def _timed_rounds(calls: dict, device, rounds: int, per_round: int = 1, warmup: int = 0) -> tuple[dict, dict]:
    """The rounds every side-by-side measurement is timed in: ``warmup`` untimed calls of
    each of ``calls`` (name -> zero-argument callable) in turn, then ``rounds`` rounds that
    call each one ``per_round`` times back to back, synchronised before and after each
    block, in the order :func:`round_order` gives (no implementation always runs first,
    right after the previous round's last call or on a cold cache, nor always after the
    same other). Returns name -> wall ms per call of each round (the block over
    ``per_round``), and name -> what its last call returned."""
    names = list(calls)
    for _ in range(warmup):
        for call in calls.values():
            call()
    times = {name: [] for name in names}
    last = {}
    for round_index in range(rounds):
        for name in round_order(names, round_index):
            sync(device)
            t0 = time.perf_counter()
            for _ in range(per_round):
                last[name] = calls[name]()
            sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3 / per_round)
    return times, last


def paired_median_ratio(numerators: list[float], denominators: list[float]) -> float:
    """Median over rounds of ``numerators[i] / denominators[i]`` (two implementations' times
    in the same round)."""
    ratios = sorted(a / b for a, b in zip(numerators, denominators))
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


def host_calls_interleaved(impls, grad: bool, device, calls: int, warmup: int, rounds: int = 30) -> dict:
    """µs per call of each implementation: ``calls`` back-to-back calls in total, split into
    ``rounds`` blocks timed in the rotating order of every side-by-side measurement
    (:func:`_timed_rounds`), with the paired ratio to SDPA per round (:func:`_round_fields`):
    a host whose speed drifts, or that another process loads for a moment, then moves each
    pair alike (session 15 read dense and 2:4, which run the same host code, 30 % apart with
    ten fixed-order blocks). Garbage collection is off inside the rounds, as timeit does: the
    first calls of an implementation compile its kernels, and the objects that leaves behind
    made a later full collection land in another implementation's block. impl -> fields of
    its row."""
    fns = {impl: host_call_fn(impl, grad, device) for impl in impls}
    rounds = max(1, min(rounds, calls))
    per_round = max(1, calls // rounds)
    with torch.set_grad_enabled(grad):
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        sync(device)
        gc.collect()
        gc.disable()
        try:
            times, _ = _timed_rounds(fns, device, rounds, per_round=per_round)
        finally:
            gc.enable()
    out = _round_fields(times, per_round=per_round, speed=False)
    for impl, fields in out.items():
        fields["us_per_call"] = fields["ms"] * 1e3
        fields["calls"] = per_round * rounds
        # µs, not the rounded ms of the forward cases (a call is ~0.02 ms).
        fields["round_us"] = [round(t * 1e3, 2) for t in times[impl]]
        del fields["round_ms"]
    return out
