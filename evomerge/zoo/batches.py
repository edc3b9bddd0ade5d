"""Items -> padded token tensors, tokenised exactly as the saved tokenizer does (``<s>`` + characters)."""

from __future__ import annotations

import torch


class Encoder:
    """Maps items to right-padded (input_ids, attention_mask, target_mask) using a char tokenizer's vocab."""

    def __init__(self, tokenizer):
        self.vocab = tokenizer.get_vocab()
        self.bos = tokenizer.bos_token_id
        self.pad = tokenizer.pad_token_id

    def ids(self, text: str) -> list[int]:
        try:
            return [self.vocab[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the zoo tokenizer's vocabulary") from None

    def __call__(self, items: list[dict[str, str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """input_ids, attention_mask and target_mask [batch, length]; target_mask marks target tokens."""
        rows = [([self.bos] + self.ids(it["prompt"]), self.ids(it["target"])) for it in items]
        length = max(len(p) + len(t) for p, t in rows)
        ids = torch.full((len(rows), length), self.pad, dtype=torch.long)
        attn = torch.zeros((len(rows), length), dtype=torch.long)
        target = torch.zeros((len(rows), length), dtype=torch.bool)
        for i, (p, t) in enumerate(rows):
            ids[i, : len(p) + len(t)] = torch.tensor(p + t)
            attn[i, : len(p) + len(t)] = 1
            target[i, len(p): len(p) + len(t)] = True
        return ids, attn, target
