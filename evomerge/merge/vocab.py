"""Sources whose vocabularies differ (added tokens): rows of the embeddings and heads mapped by token string.

A recipe's `tokenizer_source` picks the output tokenizer as mergekit's does: `base` (the base model's),
a model name (that model's), or `union` (the base's tokenizer plus every token the other models add, in
model order, as mergekit's union builds it). The output has one embedding/head row per token of that
tokenizer, and each source is seen through a permutation onto it: a token's row comes from the source's
own row for the same token string, wherever its id is. A token a source lacks gets mergekit's default
(`mergekit/tokenizer/embed.py`, no `tokens:` settings): the row of the only model that has it; else the
base model's row when the base has it; else the mean of the rows of the models that have it; zeros when
none has it. Tokens with an id past a model's embedding rows are padding, as in mergekit, and not used.

Sources conflict, with an error instead of a merge, when a token of the reference tokenizer (the base's, or
the first model's) has a different id in another source: their tokenizers are not the same base tokenizer
with tokens added, so their embeddings do not describe the same tokens.

Only the vocabulary files are read here (tokenizer.json, or the tokenizer through transformers when there
is none); no weight is read until a tensor is asked for.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.merge.source_model import SourceModel

EMBED_SUFFIXES = ("embed_tokens.weight", "lm_head.weight", "wte.weight", "embed_in.weight", "embed_out.weight",
                  "word_embeddings.weight", "tok_embeddings.weight", "output.weight")


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    return config.get("text_config", config)


def vocab_rows(src: SourceModel) -> int | None:
    """Embedding rows of a source (config vocab_size)."""
    return text_config(src.config).get("vocab_size")


def vocab_tensors(src: SourceModel) -> list[str]:
    """The source's tensors indexed by token: input embeddings and output heads."""
    rows = vocab_rows(src)
    return [n for n, i in src.tensors.items()
            if n.endswith(EMBED_SUFFIXES) and len(i.shape) == 2 and i.shape[0] == rows]


def tokenizer_dir(src: SourceModel) -> Path:
    """Where a source's tokenizer lives (an adapter saved with its own tokenizer has it in its directory)."""
    adapter = getattr(src, "adapter_path", None)
    if adapter is not None and any((adapter / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return adapter
    return src.path


def read_vocab(path: Path, name: str = "") -> dict[str, int]:
    """token string -> id, from tokenizer.json when there is one (no transformers import), else transformers."""
    tj = path / "tokenizer.json"
    if tj.is_file():
        try:
            data = json.loads(tj.read_text())
            model = data["model"]
            raw = model.get("vocab")
            if isinstance(raw, dict):
                vocab = {str(k): int(v) for k, v in raw.items()}
            elif isinstance(raw, list):  # Unigram: [[piece, score], ...] in id order
                vocab = {str(p[0]): i for i, p in enumerate(raw)}
            else:
                raise KeyError("model.vocab")
            for t in data.get("added_tokens") or []:
                vocab[t["content"]] = int(t["id"])
            return vocab
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, UnicodeDecodeError) as e:
            raise EvomergeError(f"model '{name}': {tj} is not a readable tokenizer ({e})",
                                "re-save the tokenizer with save_pretrained") from None
    try:
        from transformers import AutoTokenizer

        return dict(AutoTokenizer.from_pretrained(path).get_vocab())
    except Exception as e:  # noqa: BLE001 - any tokenizer that cannot be read is named to the user
        raise EvomergeError(f"model '{name}': no tokenizer could be read from '{path}' ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200] if str(e) else ''})",
                            "save the model's tokenizer next to its weights (tokenizer.json)") from None


def find_conflict(vocabs: dict[str, dict[str, int]], rows: dict[str, int], reference: str) -> EvomergeError | None:
    """The error for the first source whose ids for the reference's tokens differ, else None."""
    ref = vocabs[reference]
    for name, voc in vocabs.items():
        if name == reference:
            continue
        limit = min(rows.get(reference) or len(ref), rows.get(name) or len(voc))
        shared = [(t, i) for t, i in ref.items() if i < limit]
        moved = [(t, i, voc[t]) for t, i in shared if t in voc and voc[t] != i]
        missing = [t for t, _ in shared if t not in voc]
        if moved or len(missing) > len(shared) // 2:
            t, i, j = moved[0] if moved else (missing[0], ref[missing[0]], None)
            what = f"is token {i} in '{reference}' but {j} in '{name}'" if j is not None else \
                f"(token {i} of '{reference}') is missing from '{name}'"
            return EvomergeError(
                f"models '{reference}' and '{name}' have different tokenizers: {t!r} {what} "
                f"({len(moved)} of {len(shared)} shared ids differ, {len(missing)} tokens missing); their "
                "embeddings describe different tokens",
                "merge models fine-tuned from one base model (a tokenizer with tokens added is fine: set "
                "tokenizer_source: base, union or a model name); otherwise leave this model out")
    return None


def _write_union(base_dir: Path, order: list[tuple[str, Path, int]], out: Path) -> None:
    """mergekit's union tokenizer: the base's, plus other models' tokens (regular, then added) it lacks."""
    from transformers import AutoTokenizer

    base = AutoTokenizer.from_pretrained(base_dir)
    base_vocab = base.get_vocab()
    regular: dict[str, None] = {}
    added: dict[str, Any] = {}
    for _, path, rows in order:
        tok = AutoTokenizer.from_pretrained(path)
        decoder = tok.added_tokens_decoder
        for t, i in tok.get_vocab().items():
            if i < rows and i not in decoder:
                regular.setdefault(t, None)
        for i, info in decoder.items():
            if i < rows:
                added.setdefault(info.content, info)
    for t in regular:
        if t not in base_vocab:
            base.add_tokens(t)
    for info in added.values():
        if info.content not in base.get_vocab():
            base.add_tokens(info)
    base.save_pretrained(out)


@dataclass
class VocabMap:
    """The output vocabulary and, per source, which of its rows each output token takes."""

    source: str  # base | union | a model name
    reference: str
    tokenizer_path: Path  # the directory whose tokenizer files the output carries
    size: int
    perms: dict[str, list[int]]  # model -> per output id, the source's row or -1
    base: str | None
    names: frozenset[str]  # tensors indexed by token
    inner: dict[str, SourceModel]
    _tmp: Path | None = field(default=None, repr=False)

    def default(self, token_id: int):
        """mergekit's default row for a token some sources lack: (models averaged) or None for zeros."""
        have = [m for m, p in self.perms.items() if p[token_id] >= 0]
        if len(have) == 1:
            return have
        if not have:
            return None
        if self.base is not None and self.base in have:
            return [self.base]
        return have

    def mapped(self, model: str, name: str):
        import torch

        src = self.inner[model]
        t = src.get(name)
        perm = torch.tensor(self.perms[model], dtype=torch.long)
        out = torch.zeros((self.size, *t.shape[1:]), dtype=torch.float32, device=t.device)
        present = (perm >= 0).nonzero().flatten()
        out[present] = t[perm[present].to(t.device)].float()
        for i in (perm < 0).nonzero().flatten().tolist():
            donors = self.default(i)
            if donors is None:
                continue
            rows = [self.inner[m].get(name)[self.perms[m][i]].float().to(t.device) for m in donors]
            out[i] = rows[0] if len(rows) == 1 else torch.stack(rows).mean(0)
        return out

    def is_identity(self) -> bool:
        return all(p == list(range(self.size)) and vocab_rows(self.inner[m]) == self.size
                   for m, p in self.perms.items())

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


@dataclass
class VocabSource(SourceModel):
    """A source seen through the output vocabulary: embedding/head tensors permuted onto it."""

    inner: SourceModel | None = None
    vmap: VocabMap | None = None

    def get(self, tensor_name: str):
        if tensor_name in self.vmap.names:
            return self.vmap.mapped(self.name, tensor_name)
        return self.inner.get(tensor_name)

    def release(self, tensor_name: str) -> None:
        self.inner.release(tensor_name)

    def close(self) -> None:
        self.inner.close()


def _with_vocab_size(config: dict[str, Any], size: int) -> dict[str, Any]:
    cfg = dict(config)
    if "text_config" in cfg:
        cfg["text_config"] = {**cfg["text_config"], "vocab_size": size}
    else:
        cfg["vocab_size"] = size
    return cfg


def map_vocab(sources: dict[str, SourceModel], tokenizer_source: str | None, reference: str,
              base: str | None) -> tuple[dict[str, SourceModel], VocabMap | None]:
    """Sources seen through the output vocabulary (unchanged when every source already matches it)."""
    rows = {n: vocab_rows(s) for n, s in sources.items()}
    if tokenizer_source is None:
        if len(set(rows.values())) > 1:
            other = next(n for n in sources if rows[n] != rows[reference])
            raise EvomergeError(
                f"models '{reference}' and '{other}' differ in vocab_size ({rows[reference]} vs {rows[other]}): "
                "added tokens", "set tokenizer_source: base, union or a model name to map embedding rows by "
                "token (mergekit's option of the same name)")
        return sources, None
    vocabs = {n: read_vocab(tokenizer_dir(s), n) for n, s in sources.items()}
    err = find_conflict(vocabs, rows, reference)
    if err is not None:
        raise err
    tmp: Path | None = None
    if tokenizer_source == "union":
        tmp = Path(tempfile.mkdtemp(prefix="evomerge-union-tok-"))
        try:
            order = [(n, tokenizer_dir(s), rows[n] or len(vocabs[n])) for n, s in sources.items()]
            _write_union(tokenizer_dir(sources[reference]), order, tmp)
            out_vocab = read_vocab(tmp, "union")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        tok_path = tmp
    else:
        chosen = reference if tokenizer_source == "base" else tokenizer_source
        tok_path = tokenizer_dir(sources[chosen])
        out_vocab = vocabs[chosen]
    size = max(out_vocab.values()) + 1 if out_vocab else 0
    perms: dict[str, list[int]] = {}
    for n, voc in vocabs.items():
        limit = rows[n] or len(voc)
        p = [-1] * size
        for t, i in out_vocab.items():
            j = voc.get(t)
            if j is not None and j < limit:
                p[i] = j
        perms[n] = p
    names = set(vocab_tensors(sources[reference]))
    for n, s in sources.items():
        if set(vocab_tensors(s)) != names:
            raise EvomergeError(f"models '{reference}' and '{n}' differ in which tensors are indexed by token "
                                f"({sorted(names)} vs {sorted(vocab_tensors(s))})",
                                "merge models of the same architecture and tying of embeddings")
    vmap = VocabMap(tokenizer_source, reference, tok_path, size, perms, base, frozenset(names), dict(sources),
                    _tmp=tmp)
    if vmap.is_identity():
        return sources, vmap
    wrapped: dict[str, SourceModel] = {}
    for n, s in sources.items():
        tensors = {k: (replace(i, shape=(size, *i.shape[1:])) if k in names else i) for k, i in s.tensors.items()}
        wrapped[n] = VocabSource(name=s.name, path=s.path, config=_with_vocab_size(s.config, size),
                                 tensors=tensors, ref=s.ref, inner=s, vmap=vmap)
    return wrapped, vmap
