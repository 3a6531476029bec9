"""What the model benchmark runs: the models, the cases, their shapes and rough costs.

Every model is a ``LlamaForCausalLM`` with random weights built from a config (nothing is
downloaded). A *case* is one model and one way of running it (eager, compiled, CUDA graphs,
generate, the host cost of one attention call); each case times its implementations
(SDPA, ours dense, ours 2:4) on each of its settings (batch x length).
"""

from __future__ import annotations

from dataclasses import dataclass

# Shapes of real checkpoints, for LlamaConfig. SmolLM2-135M: HuggingFaceTB/SmolLM2-135M's
# config.json. Llama-3-8B with 4 of its 32 layers, so that 16k-token prefills fit and the
# attention share of the time is that of the full model.
SMOLLM2 = dict(
    num_hidden_layers=30, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
    num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True,
    max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
)
LLAMA8B = dict(
    num_hidden_layers=4, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
    max_position_embeddings=16384, rms_norm_eps=1e-5, rope_theta=500000.0,
)
# --device cpu: the same architectures shrunk until the whole run takes seconds (GQA kept).
SMOLLM2_TINY = dict(SMOLLM2, num_hidden_layers=2, hidden_size=96, intermediate_size=192,
                    num_attention_heads=3, num_key_value_heads=1, head_dim=32, vocab_size=512,
                    max_position_embeddings=512)
LLAMA8B_TINY = dict(LLAMA8B, num_hidden_layers=2, hidden_size=128, intermediate_size=256,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=512,
                    max_position_embeddings=512)

MODELS = {
    "smollm2": {"full": SMOLLM2, "tiny": SMOLLM2_TINY, "label": "SmolLM2-135M"},
    "llama8b": {"full": LLAMA8B, "tiny": LLAMA8B_TINY, "label": "Llama-3-8B (4 layers)"},
}

# Our implementations are sparsify() configs; "sdpa" is the unconverted model.
IMPLS = ("sdpa", "dense", "2:4")
OURS = ("dense", "2:4")


@dataclass(frozen=True)
class Setting:
    """One input shape of a case: ``batch`` sequences of ``length`` tokens (the prompt, for
    generate), ``new_tokens`` generated (generate only)."""

    batch: int
    length: int
    new_tokens: int = 0

    @property
    def label(self) -> str:
        return f"{self.batch}x{self.length}" + (f"+{self.new_tokens}" if self.new_tokens else "")


@dataclass(frozen=True)
class CaseSpec:
    name: str
    model: str | None  # a key of MODELS; None for the host case
    kind: str  # "forward", "generate" or "host"
    mode: str  # forward: eager / compiled / cudagraphs; generate: eager / static-compiled
    full: tuple[Setting, ...]
    tiny: tuple[Setting, ...]
    help: str
    # Rough seconds on an H200 per implementation (both settings, first Triton compiles
    # included, model build excluded), for the estimate printed before a run; a guess made
    # without a GPU at hand: the JSON records the real time of every row.
    est_s: float
    needs_cuda: bool = False  # CUDA graphs
    prefill: bool = False  # logits of the last position only (logits_to_keep=1), as generate's prefill
    compiles: bool = False  # torch.compile: skipped on CPU unless --compile-backend is given

    def settings(self, tiny: bool) -> tuple[Setting, ...]:
        return self.tiny if tiny else self.full


_SMOLLM2_SETTINGS = dict(full=(Setting(1, 1024), Setting(8, 1024)), tiny=(Setting(1, 64), Setting(2, 64)))
_GENERATE_SETTINGS = dict(full=(Setting(1, 512, 128), Setting(8, 512, 128)),
                          tiny=(Setting(1, 16, 8), Setting(2, 16, 8)))

CASES: dict[str, CaseSpec] = {c.name: c for c in (
    CaseSpec("host", None, "host", "no_grad+autograd", (Setting(1, 16),), (Setting(1, 16),),
             "host time of one mts.attention call vs one SDPA call at 1x16 tokens, 4 heads, D=64",
             est_s=1),
    CaseSpec("smollm2-eager", "smollm2", "forward", "eager", **_SMOLLM2_SETTINGS,
             help="SmolLM2-135M forward (no mask, use_cache=False unless --use-cache), eager", est_s=15),
    CaseSpec("llama8b", "llama8b", "forward", "eager",
             full=(Setting(1, 4096), Setting(1, 16384)), tiny=(Setting(1, 64), Setting(1, 128)),
             help="Llama-3-8B shape, 4 layers: prefill (logits of the last token), eager", est_s=20,
             prefill=True),
    CaseSpec("generate-eager", "smollm2", "generate", "eager", **_GENERATE_SETTINGS,
             help="SmolLM2-135M greedy generate, 512-token prompt + 128 new tokens, dynamic cache",
             est_s=25),
    CaseSpec("smollm2-cudagraphs", "smollm2", "forward", "cudagraphs", **_SMOLLM2_SETTINGS,
             help="SmolLM2-135M forward, one CUDA graph per implementation, replays timed in rotating rounds",
             est_s=5,
             needs_cuda=True),
    CaseSpec("smollm2-compiled", "smollm2", "forward", "compiled", **_SMOLLM2_SETTINGS,
             help="SmolLM2-135M forward under torch.compile(model, fullgraph=True): all implementations compiled, "
                  "then timed in rotating rounds",
             est_s=120, compiles=True),
    CaseSpec("generate-static", "smollm2", "generate", "static-compiled", **_GENERATE_SETTINGS,
             help="the same with cache_implementation='static': transformers compiles the decode step",
             est_s=130, compiles=True),
)}

# Named groups for --cases. "default" stays within a few minutes on an H200; the compiled
# cases compile a 30-layer model once per implementation and shape (30-90 s each).
GROUPS = {
    "default": ("host", "smollm2-eager", "llama8b", "generate-eager", "smollm2-cudagraphs"),
    "compiled": ("smollm2-compiled", "generate-static"),
    "smollm2": ("smollm2-eager", "smollm2-cudagraphs", "smollm2-compiled"),
    "generate": ("generate-eager", "generate-static"),
    "all": tuple(CASES),
}
DEFAULT_CASES = GROUPS["default"]

# Seconds on an H200 that do not depend on the cases: start-up and imports, and building
# each model (random init on the GPU).
STARTUP_EST_S = 15
BUILD_EST_S = {"smollm2": 2, "llama8b": 6}


def expand_cases(names) -> list[str]:
    """Case names and group names -> case names in run order, each once. ValueError names the
    unknown ones."""
    chosen: list[str] = []
    unknown = []
    for name in names:
        if name in GROUPS:
            chosen.extend(GROUPS[name])
        elif name in CASES:
            chosen.append(name)
        else:
            unknown.append(name)
    if unknown:
        raise ValueError(f"unknown case(s) {unknown}; choose from {', '.join(CASES)} "
                         f"or the groups {', '.join(GROUPS)}")
    # Run order is the registry's: cheap and safe cases first, compiles last.
    chosen_set = set(chosen)
    return [name for name in CASES if name in chosen_set]


def estimate_s(cases: list[str], impls: tuple[str, ...]) -> float:
    """Rough H200 seconds for a run (see CaseSpec.est_s)."""
    total = STARTUP_EST_S
    built = set()
    for name in cases:
        spec = CASES[name]
        if spec.model is not None and spec.model not in built:
            built.add(spec.model)
            total += BUILD_EST_S[spec.model]
        total += spec.est_s * len(impls)
    return total
