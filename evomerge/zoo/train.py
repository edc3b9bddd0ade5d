"""Deterministic CPU training of the zoo's tiny Llama models (loss on target tokens only)."""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager

import torch

from evomerge.zoo.batches import Encoder
from evomerge.zoo.sizes import TrainSpec
from evomerge.zoo.skills import ItemStream


@contextmanager
def deterministic(seed: int, threads: int):
    """Fixed seed, fixed thread count and deterministic kernels; restores the previous settings."""
    prev_threads, prev_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_det)


def _lr_factor(step: int, spec: TrainSpec) -> float:
    if step < spec.warmup:
        return (step + 1) / spec.warmup
    progress = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train(model, tokenizer, stream: ItemStream, spec: TrainSpec,
          progress: Callable[[int, int], None] | None = None) -> float:
    """Train `model` in place on `spec.steps` batches from `stream`; returns the mean loss of the last 20."""
    encode = Encoder(tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, spec))
    model.train()
    losses: list[float] = []
    for step in range(spec.steps):
        ids, attn, target = encode(stream.batch(spec.batch))
        labels = ids.masked_fill(~target, -100)
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if progress:
            progress(step + 1, spec.steps)
    model.eval()
    tail = losses[-20:]
    return sum(tail) / len(tail)
