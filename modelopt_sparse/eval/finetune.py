"""The training and held-out evaluation loops of ``modelopt-sparse finetune``, on accelerate.

One :class:`accelerate.Accelerator` drives both runs (sparse and dense control), so the
same code runs in one process (CPU or one GPU) or under ``accelerate launch`` on several
GPUs (DistributedDataParallel). Batches are drawn from one seeded generator as a global
batch and sliced by rank: every run, and every number of processes, trains on the same
windows in the same order (non-overlapping windows of the corpus, see :func:`batch_starts`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .errors import EvalError


@dataclass(frozen=True)
class TrainSettings:
    steps: int
    batch_size: int  # windows per optimizer step, over all processes
    seq_len: int
    lr: float
    warmup_steps: int
    weight_decay: float
    max_grad_norm: float
    seed: int


def batch_starts(n_tokens: int, settings: TrainSettings) -> torch.Tensor:
    """``[steps, batch_size]`` window starts in a corpus of ``n_tokens``, from the seed alone.

    The corpus is cut into non-overlapping windows of ``seq_len`` tokens, taken in a seeded
    random order: while the steps need no more windows than the corpus holds, no token is
    trained on twice. Each further pass over the corpus takes its windows in a new order,
    on a grid shifted by a seeded offset below ``seq_len``.
    """
    seq_len = settings.seq_len
    if n_tokens < seq_len:
        raise EvalError(f"the training corpus has {n_tokens:,} tokens, fewer than --seq-len {seq_len}")
    needed = settings.steps * settings.batch_size
    generator = torch.Generator().manual_seed(settings.seed)
    offset, taken, passes = 0, 0, []
    while taken < needed:
        count = (n_tokens - offset) // seq_len
        passes.append(offset + seq_len * torch.randperm(count, generator=generator))
        taken += count
        offset = int(torch.randint(0, min(seq_len, n_tokens - seq_len + 1), (1,), generator=generator))
    return torch.cat(passes)[:needed].view(settings.steps, settings.batch_size)


def lr_factor(step: int, settings: TrainSettings) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak at the last step."""
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    span = max(1, settings.steps - settings.warmup_steps)
    progress = (step - settings.warmup_steps) / span
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train(accelerator, model: torch.nn.Module, train_ids: torch.Tensor, settings: TrainSettings,
          progress=None, after_step: Callable[[int], None] | None = None) -> list[float]:
    """Train ``model`` (already converted, not yet prepared) in place; returns the mean
    training loss of every step over all processes.

    ``model`` itself holds the trained weights afterwards: the distributed wrapper that
    ``prepare`` adds shares its parameters. ``after_step(n)`` is called on every process
    after optimizer step ``n`` (1-based), e.g. to measure held-out perplexity on the way.
    """
    if settings.batch_size % accelerator.num_processes:
        raise EvalError(f"--batch-size {settings.batch_size} is not a multiple of the "
                        f"{accelerator.num_processes} processes")
    per_rank = settings.batch_size // accelerator.num_processes
    rank = accelerator.process_index
    starts = batch_starts(train_ids.numel(), settings)[:, rank * per_rank : (rank + 1) * per_rank]
    offsets = torch.arange(settings.seq_len)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay,
                                  betas=(0.9, 0.95))
    # The schedule is stepped by hand, once per optimizer step: accelerate's scheduler
    # wrapper steps once per process, for data loaders it shards itself.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, settings))
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    losses = []
    for step in range(settings.steps):
        batch = train_ids[starts[step][:, None] + offsets].to(accelerator.device)
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        accelerator.backward(loss)
        if settings.max_grad_norm > 0:
            accelerator.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())  # no host sync per step
        if progress is not None:
            progress.update(1)
            if step % 10 == 0 or step == settings.steps - 1:
                progress.set_postfix_str(f"loss {loss.item():.3f}")
        if after_step is not None:
            after_step(step + 1)
    model.eval()
    if not losses:
        return []
    mean_losses = accelerator.reduce(torch.stack(losses), reduction="mean")
    values = [float(v) for v in mean_losses.cpu()]
    if not all(math.isfinite(v) for v in values):
        raise EvalError("the training loss became non-finite; lower --lr or use --mixed-precision no")
    # Drop the accelerator's references to this run's wrapper and optimizer (the next run
    # prepares its own); the trained weights stay in ``model``'s own module.
    accelerator.free_memory()
    return values


@torch.no_grad()
def heldout_ppl(accelerator, model: torch.nn.Module, windows: torch.Tensor, progress=None) -> float:
    """Perplexity over ``windows`` (``[n, seq_len]``), the windows shared out over processes.

    Sums of NLL and token counts are reduced across processes, so the result is the same
    token-weighted perplexity whatever the number of processes.
    """
    was_training = model.training
    model.eval()
    nll = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    count = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    for i in range(accelerator.process_index, windows.shape[0], accelerator.num_processes):
        ids = windows[i : i + 1].to(accelerator.device)
        with accelerator.autocast():
            logits = model(input_ids=ids, use_cache=False).logits
        nll += torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum").double()
        count += ids.shape[1] - 1
        if progress is not None:
            progress.update(1)
    nll, count = accelerator.reduce(nll, "sum"), accelerator.reduce(count, "sum")
    model.train(was_training)
    value = math.exp(float(nll) / float(count))
    if not math.isfinite(value):
        raise EvalError("the held-out loss is not finite; the model overflows (try --mixed-precision no)")
    return value
