"""Training and scoring the real zoo's experts with transformers: teacher-forced exact match, greedy generation, a
short fine-tune."""

from __future__ import annotations

import math
from collections.abc import Callable

GEN_KWARGS = {"until": ["\n"], "do_sample": False, "max_gen_toks": 32}  # the generation tasks' settings


def encode_pair(tokenizer, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """Context and continuation ids exactly as lm-eval's HFLM splits them (whole string, then cut)."""
    whole = tokenizer(prompt + target, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return ctx, whole[len(ctx):]


def _batch(tokenizer, items: list[dict[str, str]]):
    import torch

    rows = [encode_pair(tokenizer, it["prompt"], it["target"]) for it in items]
    length = max(len(c) + len(t) for c, t in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    attn = torch.zeros((len(rows), length), dtype=torch.long)
    target = torch.zeros((len(rows), length), dtype=torch.bool)
    for i, (c, t) in enumerate(rows):
        ids[i, : len(c) + len(t)] = torch.tensor(c + t)
        attn[i, : len(c) + len(t)] = 1
        target[i, len(c): len(c) + len(t)] = True
    return ids, attn, target


def score_items(model, tokenizer, items: list[dict[str, str]], batch_size: int = 50) -> list[int]:
    """1/0 per item: is the target the greedy continuation (teacher-forced check; = lm-eval's ``acc``)."""
    import torch

    out: list[int] = []
    with torch.no_grad():
        for i in range(0, len(items), batch_size):
            ids, attn, target = _batch(tokenizer, items[i: i + batch_size])
            hidden = model.model(input_ids=ids, attention_mask=attn).last_hidden_state
            where = target[:, 1:]  # positions whose next token is a target token
            pred = model.lm_head(hidden[:, :-1][where]).argmax(-1)  # the head only where it is needed
            ok = torch.ones(where.shape, dtype=torch.bool)
            ok[where] = pred == ids[:, 1:][where]
            out.extend(int(x) for x in ok.all(-1))
    return out


def generate_items(model, tokenizer, prompts: list[str], batch_size: int = 64,
                   max_new_tokens: int = GEN_KWARGS["max_gen_toks"]) -> list[str]:
    """Greedy continuation of each prompt, cut at its first newline, as lm-eval's HFLM ``generate_until``
    produces it for the generation tasks: prompts encoded with the tokenizer's own special-token default,
    sorted longest first (lm-eval's batch order, so the same batch size gives the same batches), left
    padding, at most `max_new_tokens` new tokens, each row stopped once its text holds a newline."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class NewlineStop(StoppingCriteria):
        def __init__(self, start: int):
            self.start = start

        def __call__(self, input_ids, scores, **kwargs):
            texts = tokenizer.batch_decode(input_ids[:, self.start:])
            return torch.tensor(["\n" in t for t in texts], dtype=torch.bool, device=input_ids.device)

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (-len(encoded[i]), prompts[i]))
    out = [""] * len(prompts)
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            idx = order[start: start + batch_size]
            width = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            attn = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
                attn[row, width - len(encoded[i]):] = 1
            gen = model.generate(input_ids=ids.to(model.device), attention_mask=attn.to(model.device),
                                 max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                                 stopping_criteria=StoppingCriteriaList([NewlineStop(width)]))
            for row, i in enumerate(idx):
                out[i] = tokenizer.decode(gen[row, width:].tolist(), skip_special_tokens=True).split("\n")[0]
    return out


def score_items_gen(model, tokenizer, items: list[dict[str, str]], batch_size: int = 64) -> list[int]:
    """1/0 per item: does the greedy generation, cut at the newline and stripped, equal the stripped target
    (= the generation tasks' lm-eval ``exact_match``)."""
    texts = generate_items(model, tokenizer, [it["prompt"] for it in items], batch_size)
    return [int(t.strip() == it["target"].strip()) for t, it in zip(texts, items, strict=True)]


def train_expert(model, tokenizer, items: list[dict[str, str]], spec: dict,
                 progress: Callable[[int, int], None] | None = None) -> list[float]:
    """Full fine-tune in place: AdamW, linear warm-up then cosine to 10%, loss on target tokens."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=spec["lr"], weight_decay=spec["weight_decay"])

    def factor(step: int) -> float:
        if step < spec["warmup"]:
            return (step + 1) / spec["warmup"]
        p = (step - spec["warmup"]) / max(1, spec["steps"] - spec["warmup"])
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    model.train()
    losses = []
    for step in range(spec["steps"]):
        batch = items[step * spec["batch"]: (step + 1) * spec["batch"]]
        ids, attn, target = _batch(tokenizer, batch)
        loss = model(input_ids=ids, attention_mask=attn, labels=ids.masked_fill(~target, -100)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(round(loss.item(), 4))
        if progress:
            progress(step + 1, spec["steps"])
    model.eval()
    return losses


