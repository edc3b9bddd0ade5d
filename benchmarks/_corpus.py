"""The real-config corpus (tests/fixtures/mergekit_corpus/): reading its files, the small local models that stand
in for the Hugging Face models they name, the config text pointed at those models, evomerge's command line run
in-process, and tensor fingerprints.

Shared by benchmarks/mergekit_corpus.py (both tools, mergekit in its own venv) and tests/test_mergekit_corpus.py
(evomerge only). Nothing here imports evomerge's modules: evomerge is driven through its `evomerge` console
script's entry point, exactly as the command line runs it.

Stand-in models: for each (architecture, layer count) a base and up to N fine-tunes, float32, hidden 64,
intermediate 128, 4 heads (2 key/value heads), vocabulary 96 (a character tokenizer), with the layer count
of the real model the config was written for (so `layer_range`s and per-layer value lists mean what they meant:
no index is mapped or scaled). Weights are drawn with numpy's PCG64 (stable across numpy and torch versions):
base matrices N(0, 0.02^2), norm weights 1 + N(0, 0.02^2); fine-tune k = base + 0.1 * rms(t) * (sqrt(.5) c +
sqrt(.5) n_k) per tensor t, with c a direction shared by all fine-tunes (task vectors correlate as real ones do)
and n_k the fine-tune's own.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "tests" / "fixtures" / "mergekit_corpus"
EXPECTED = CORPUS / "expected.json"
HIDDEN, INTER, HEADS, KV_HEADS, VOCAB = 64, 128, 4, 2, 96
SCALE = 0.1
NON_WEIGHT = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "generation_config.json", "chat_template.jinja")


# ---- the corpus files -----------------------------------------------------------------------------------

@dataclass
class Case:
    name: str          # file stem, e.g. "07_chimerallama_3_8b_v3"
    path: Path
    source: str        # where the config was published
    arch: str          # llama | mistral
    layers: int
    body: str          # the config text, verbatim as published

    @property
    def data(self) -> dict:
        return yaml.safe_load(self.body)

    @property
    def method(self) -> str:
        return str(self.data.get("merge_method"))


def load_cases(corpus: Path = CORPUS) -> list[Case]:
    out = []
    for p in sorted(corpus.glob("[0-9][0-9]_*.yml")):
        text = p.read_text()
        head, sep, body = text.partition("# ---\n")
        if not sep:
            raise ValueError(f"{p}: no '# ---' line between the header and the config")
        fields = dict(re.findall(r"^# ([\w -]+): (.*)$", head, flags=re.M))
        m = re.match(r"arch (\w+), layers (\d+)", fields.get("stand-ins", ""))
        if not m or "source" not in fields:
            raise ValueError(f"{p}: header needs '# source:' and '# stand-ins: arch A, layers N (...)'")
        out.append(Case(p.stem, p, fields["source"], m.group(1), int(m.group(2)), body))
    return out


def references(data: dict) -> list[str]:
    """Every model reference of a mergekit config, the base model first, then in order of appearance."""
    refs: list[str] = []

    def add(v):
        if isinstance(v, str) and v and v not in ("union", "base") and v not in refs:
            refs.append(v)

    add(data.get("base_model"))
    blocks = [data] + [m for m in (data.get("modules") or {}).values() if isinstance(m, dict)]
    for b in blocks:
        add(b.get("base_model"))
        for m in b.get("models") or []:
            add(m.get("model") if isinstance(m, dict) else None)
        for sl in b.get("slices") or []:
            for s in (sl or {}).get("sources") or []:
                add(s.get("model") if isinstance(s, dict) else None)
    add(data.get("tokenizer_source"))
    tok = data.get("tokenizer")
    if isinstance(tok, dict):
        add(tok.get("source"))
    return refs


def stand_ins(case: Case) -> dict[str, str]:
    """{model reference: stand-in name}: the base_model -> "base", the other models -> ft1, ft2, ... in order."""
    data = case.data
    mapping, k = {}, 0
    for ref in references(data):
        if ref == data.get("base_model"):
            mapping[ref] = "base"
        else:
            k += 1
            mapping[ref] = f"ft{k}"
    return mapping


def n_finetunes(case: Case) -> int:
    return sum(1 for v in stand_ins(case).values() if v != "base")


def materialize(case: Case, model_root: Path, *, float32: bool = False) -> str:
    """The config text with every model reference replaced by its stand-in's directory (nothing else changes).
    `float32`: also the top-level `dtype:` set to float32 and `out_dtype:` removed (the variant whose merge
    is compared tensor by tensor)."""
    mapping = stand_ins(case)
    text = case.body
    for ref in sorted(mapping, key=len, reverse=True):
        pat = r"(?<![\w./\\-])" + re.escape(ref) + r"(?![\w./\\-])"
        text = re.sub(pat, lambda _m, r=ref: str(model_root / mapping[r]), text)
    if float32:
        text, n = re.subn(r"(?m)^dtype:[^\n#]*", "dtype: float32", text)
        text = re.sub(r"(?m)^out_dtype:.*\n?", "", text)
        if n == 0 and "dype:" not in text:
            text = text.rstrip("\n") + "\ndtype: float32\n"
    return text


def out_dtype(case: Case) -> str:
    d = case.data
    return str(d.get("out_dtype") or d.get("dtype") or "float32")


# ---- stand-in models ------------------------------------------------------------------------------------

def _tensor_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    hd = HIDDEN // HEADS
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
                       p + "self_attn.k_proj.weight": (KV_HEADS * hd, HIDDEN),
                       p + "self_attn.v_proj.weight": (KV_HEADS * hd, HIDDEN),
                       p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
                       p + "mlp.gate_proj.weight": (INTER, HIDDEN),
                       p + "mlp.up_proj.weight": (INTER, HIDDEN),
                       p + "mlp.down_proj.weight": (HIDDEN, INTER),
                       p + "input_layernorm.weight": (HIDDEN,),
                       p + "post_attention_layernorm.weight": (HIDDEN,)})
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    return shapes


def _config(arch: str, layers: int) -> dict:
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=layers,
                  num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=128,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    cfg = tf.LlamaConfig(**common) if arch == "llama" else tf.MistralConfig(**common, sliding_window=None)
    d = cfg.to_dict()
    d["architectures"] = ["LlamaForCausalLM" if arch == "llama" else "MistralForCausalLM"]
    d["torch_dtype"] = d["dtype"] = "float32"
    return d


def _tokenizer_files(dest: Path) -> None:
    """A character-level fast tokenizer with exactly VOCAB tokens (ids 0-3 special)."""
    import string

    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    table = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    chars = string.ascii_letters + string.digits + " +-*/=?.,:;!()" + "".join(
        c for c in string.punctuation if c not in " +-*/=?.,:;!()")
    for c in chars[: VOCAB - 4]:
        table[c] = len(table)
    assert len(table) == VOCAB  # as in real Llama/Mistral models: one embedding row per token (mergekit's
    # `tokenizer:` / union resizes the embeddings to the tokenizer's length)
    tok = Tokenizer(WordLevel(table, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(str(dest))


def _save(state: dict[str, np.ndarray], dest: Path, config: dict, tok_dir: Path) -> None:
    from safetensors.numpy import save_file

    tmp = dest.parent / f".{dest.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    for f in tok_dir.iterdir():
        shutil.copyfile(f, tmp / f.name)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def family_dir(root: Path, arch: str, layers: int) -> Path:
    return Path(root) / f"{arch}-L{layers}"


def build_family(root: Path, arch: str, layers: int, n_ft: int) -> Path:
    """base, ft1..ft{n_ft} under root/{arch}-L{layers}/ (cached: only missing models are written)."""
    fam = family_dir(root, arch, layers)
    names = ["base"] + [f"ft{k}" for k in range(1, n_ft + 1)]
    if all((fam / n / "model.safetensors").exists() for n in names):
        return fam
    fam.mkdir(parents=True, exist_ok=True)
    tok_dir = Path(root) / "_tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        tmp = Path(root) / "._tokenizer.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        _tokenizer_files(tmp)
        shutil.rmtree(tok_dir, ignore_errors=True)
        tmp.rename(tok_dir)
    config = _config(arch, layers)
    shapes = _tensor_shapes(layers)
    seed = zlib.crc32(f"{arch}-{layers}".encode())
    rng = np.random.Generator(np.random.PCG64(seed))
    base = {}
    for name, shape in shapes.items():
        z = rng.standard_normal(shape).astype(np.float32) * np.float32(0.02)
        base[name] = (z + np.float32(1.0)) if name.endswith("norm.weight") else z
    if not (fam / "base" / "model.safetensors").exists():
        _save(base, fam / "base", config, tok_dir)
    crng = np.random.Generator(np.random.PCG64(seed + 1))
    common = {name: crng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    a = b = np.float32(0.5 ** 0.5)
    for k in range(1, n_ft + 1):
        dest = fam / f"ft{k}"
        if (dest / "model.safetensors").exists():
            continue
        krng = np.random.Generator(np.random.PCG64(seed + 1000 * k))
        state = {}
        for name, shape in shapes.items():
            t = base[name]
            rms = np.float32(max(float(np.sqrt(np.mean(t.astype(np.float64) ** 2))), 1e-3))
            noise = krng.standard_normal(shape).astype(np.float32)
            state[name] = (t + np.float32(SCALE) * rms * (a * common[name] + b * noise)).astype(np.float32)
        _save(state, dest, config, tok_dir)
    return fam


def build_all(root: Path, cases: list[Case]) -> dict[str, Path]:
    """Every family the cases need, with as many fine-tunes as the most demanding case; {case name: family}."""
    need: dict[tuple[str, int], int] = {}
    for c in cases:
        key = (c.arch, c.layers)
        need[key] = max(need.get(key, 0), n_finetunes(c))
    fams = {key: build_family(root, *key, n) for key, n in need.items()}
    return {c.name: fams[(c.arch, c.layers)] for c in cases}


# ---- tensors --------------------------------------------------------------------------------------------

def load_tensors(model_dir: Path) -> dict[str, np.ndarray]:
    """All tensors of a model directory as float32 numpy arrays (bf16/fp16 widened exactly)."""
    import torch
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        for k, v in load_file(str(f)).items():
            out[k] = v.to(torch.float32).numpy()
    return out


def fingerprint(model_dir: Path) -> dict:
    """A few numbers that change when any tensor of a model changes: the tensor names, shapes and dtypes, the
    sum of squares and the sum of each tensor projected on a fixed pseudo-random direction (seeded by the
    tensor's name), in float64. Builds that agree to float32 rounding agree here to ~1e-7 relative."""
    import torch
    from safetensors.torch import load_file

    names, dot, sq, dtypes = [], 0.0, 0.0, set()
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        for k, v in load_file(str(f)).items():
            dtypes.add(str(v.dtype).replace("torch.", ""))
            t = v.to(torch.float64).numpy().ravel()
            r = np.random.Generator(np.random.PCG64(zlib.crc32(k.encode()))).standard_normal(t.size)
            names.append(f"{k}:{tuple(v.shape)}")
            dot += float(t @ r)
            sq += float(t @ t)
    names.sort()
    return {"tensors": len(names), "names_crc": zlib.crc32("\n".join(names).encode()), "dot": dot, "sumsq": sq,
            "dtypes": sorted(dtypes)}


def fingerprints_match(a: dict, b: dict, rtol: float = 1e-5) -> bool:
    if a["tensors"] != b["tensors"] or a["names_crc"] != b["names_crc"]:
        return False
    return (abs(a["dot"] - b["dot"]) <= rtol * max(1.0, abs(b["dot"]))
            and abs(a["sumsq"] - b["sumsq"]) <= rtol * max(1.0, abs(b["sumsq"])))


# ---- evomerge's command line, in-process ----------------------------------------------------------------

def evomerge_entry_point():
    """The function the `evomerge` console script runs (from the installed package metadata)."""
    import importlib.metadata as md

    (ep,) = [e for e in md.entry_points(group="console_scripts") if e.name == "evomerge"]
    return ep.load()


def run_evomerge(argv: list[str]) -> tuple[int, str, str]:
    """`evomerge ARGV...` in this process: (exit code, stdout, stderr)."""
    main = evomerge_entry_point()
    out, err = io.StringIO(), io.StringIO()
    old_argv = sys.argv
    sys.argv = ["evomerge", *argv]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old_argv
    return code, out.getvalue(), err.getvalue()


def warnings_of(stderr: str) -> list[str]:
    """The `warning:` lines evomerge printed (joined where the terminal wrapped them)."""
    text = re.sub(r"\s+", " ", stderr)
    return [w.strip() for w in re.findall(r"warning: (.*?)(?= warning: | error: |$)", text)]


def error_of(stderr: str) -> tuple[str, str]:
    """(problem, fix) of evomerge's error message."""
    text = re.sub(r"\s+", " ", stderr)
    m = re.search(r"error: (.*?)(?: fix: (.*))?$", text)
    return (m.group(1).strip(), (m.group(2) or "").strip()) if m else ("", "")
