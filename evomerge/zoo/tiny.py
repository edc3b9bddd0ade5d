"""Tiny model families built offline (random weights from a transformers config), for tests and the zoo.

A family is a base model plus "fine-tunes" that are the base plus small seeded perturbations, saved as
ordinary Hugging Face directories (safetensors, config, a character-level tokenizer).
"""

from __future__ import annotations

import string
from pathlib import Path

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma2")


def tiny_config(arch: str = "llama", *, hidden: int = 64, layers: int = 2, vocab: int = 96):
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "llama":
        return tf.LlamaConfig(**common)
    if arch == "mistral":
        return tf.MistralConfig(**common, sliding_window=None)
    if arch == "qwen2":
        return tf.Qwen2Config(**common)
    if arch == "qwen3":
        return tf.Qwen3Config(**common, head_dim=hidden // 4)
    if arch == "gemma2":
        return tf.Gemma2Config(**common, head_dim=hidden // 4)
    raise ValueError(f"unknown tiny architecture {arch}; choose from {ARCHS}")


def char_tokenizer(vocab: int = 96):
    """A character-level fast tokenizer (ids 0-3 special) that adds <s> like the models expect."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    chars = list(string.ascii_letters + string.digits + " +-*/=?.,:;!()")
    table = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for c in chars[: vocab - 4]:
        table[c] = len(table)
    tok = Tokenizer(WordLevel(table, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def make_family(out: str | Path, arch: str = "llama", n_experts: int = 2, seed: int = 0, *, hidden: int = 64,
                layers: int = 2, scale: float = 0.02, max_shard_size: str | None = None,
                dtype: str = "float32") -> dict[str, Path]:
    """Save base and experts under `out/` and return {name: path}. Expert k = base + scale * noise_k."""
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(out)
    cfg = tiny_config(arch, hidden=hidden, layers=layers)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).to(getattr(torch, dtype))
    tok = char_tokenizer(cfg.vocab_size)
    paths = {}
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out / "base", **kw)
    tok.save_pretrained(out / "base")
    paths["base"] = out / "base"
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(seed + 1)
    for k in range(n_experts):
        with torch.no_grad():
            for name, p in model.named_parameters():
                noise = torch.randn(p.shape, generator=g).to(p.dtype)
                p.copy_(base_state[name] + scale * noise * base_state[name].float().std().clamp(min=1e-3))
        name = f"expert{k + 1}"
        model.save_pretrained(out / name, **kw)
        tok.save_pretrained(out / name)
        paths[name] = out / name
    return paths
