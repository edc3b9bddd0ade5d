"""The zoo's fast scorer: exact match of the greedy continuation, checked in one teacher-forced pass.

Greedy decoding reproduces the target (terminator included) exactly when, at every target position, the
model's argmax given the true prefix is the target token — so one batched forward pass per batch gives the
same per-item scores as batched greedy decoding, and the same as lm-eval's ``acc`` (``is_greedy``) on the
zoo's loglikelihood tasks.
"""

from __future__ import annotations

import torch

from evomerge.zoo.batches import Encoder


@torch.no_grad()
def score_items(model, tokenizer, items: list[dict[str, str]], batch_size: int = 256) -> list[int]:
    """1/0 per item: does greedy decoding produce the item's target exactly?"""
    encode = Encoder(tokenizer)
    was_training = model.training
    model.eval()
    out: list[int] = []
    for i in range(0, len(items), batch_size):
        ids, attn, target = encode(items[i: i + batch_size])
        pred = model(input_ids=ids, attention_mask=attn).logits[:, :-1].argmax(-1)
        hit = (pred == ids[:, 1:]) | ~target[:, 1:]
        out.extend(hit.all(dim=1).int().tolist())
    model.train(was_training)
    return out


def accuracy(model, tokenizer, items: list[dict[str, str]], batch_size: int = 256) -> float:
    """Mean exact match over `items`."""
    scores = score_items(model, tokenizer, items, batch_size)
    return sum(scores) / len(scores)
