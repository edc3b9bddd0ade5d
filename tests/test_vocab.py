"""Sources with added tokens: embedding and head rows mapped by token string onto the chosen tokenizer."""

import json
import subprocess
import sys

import pytest
import torch
import yaml

from evomerge.errors import EvomergeError
from evomerge.merge.load import load_recipe, parse_recipe
from evomerge.merge.plan import make_plan
from evomerge.merge.sources import open_source

EMB = ("model.embed_tokens.weight", "lm_head.weight")


def add_tokens(base_dir, out, tokens, seed):
    """A fine-tune of `base_dir` with `tokens` added (tokenizer and resized embeddings), weights perturbed.

    The tiny models' character tokenizer has 80 tokens and their embeddings 96 rows (16 padding rows), so
    resizing to len(tokenizer), the usual way to add tokens, drops the padding: 80 + 2 rows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if tokens:
        tok.add_tokens(tokens)
        model.resize_token_embeddings(len(tok), mean_resizing=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def vocab_family(tmp_path_factory):
    from evomerge.zoo.tiny import make_family

    root = tmp_path_factory.mktemp("vocab")
    base = make_family(root, "llama", n_experts=0, hidden=64, layers=2)["base"]
    return {"base": base,
            "a": add_tokens(base, root / "a", ["<think>", "<x>"], 1),   # <x> is id 81 in a ...
            "b": add_tokens(base, root / "b", ["<x>", "<tool>"], 2),    # ... and 80 in b
            "c": add_tokens(base, root / "c", [], 3)}


def recipe(fam, tokenizer_source, method="linear"):
    models = {n: {"path": str(p), "parameters": {"weight": 1.0 if n != "base" else 0.0}} for n, p in fam.items()}
    r = {"method": method, "models": models, "tokenizer_source": tokenizer_source}
    if method == "task_arithmetic":
        r["base"] = "base"
        models["base"].pop("parameters")
    else:
        r["parameters"] = {"normalize": False}
        for n, m in models.items():
            m["parameters"]["weight"] = {"base": 0.1, "a": 0.2, "b": 0.3, "c": 0.4}[n]
    return parse_recipe(r)


def vocab_of(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path).get_vocab()


def expected_rows(fam, out_vocab, name, base="base"):
    """Per model, its embedding/head re-indexed onto out_vocab with mergekit's defaults for missing tokens."""
    vocabs = {n: vocab_of(p) for n, p in fam.items()}
    tensors = {n: open_source(n, p).get(name) for n, p in fam.items()}
    out = {}
    for n in fam:
        rows = []
        for tok, _ in sorted(out_vocab.items(), key=lambda kv: kv[1]):
            if tok in vocabs[n]:
                rows.append(tensors[n][vocabs[n][tok]])
                continue
            have = [m for m in fam if tok in vocabs[m]]
            if len(have) == 1:
                rows.append(tensors[have[0]][vocabs[have[0]][tok]])
            elif base in have:
                rows.append(tensors[base][vocabs[base][tok]])
            elif have:
                rows.append(torch.stack([tensors[m][vocabs[m][tok]] for m in have]).mean(0))
            else:
                rows.append(torch.zeros(tensors[n].shape[1]))
        out[n] = torch.stack(rows)
    return out


def test_union_vocabulary(vocab_family, tmp_path):
    from evomerge.merge.export.model_dir import write_model_dir

    r = recipe(vocab_family, "union")
    plan = make_plan(r)
    assert plan.vocab.size == 83
    out = write_model_dir(plan, tmp_path / "out")
    plan.close()
    voc = vocab_of(out)
    assert len(voc) == 83 and voc["<think>"] == 80 and voc["<x>"] == 81 and voc["<tool>"] == 82
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 83
    from transformers import AutoModelForCausalLM

    sd = AutoModelForCausalLM.from_pretrained(out).state_dict()
    weights = {"base": 0.1, "a": 0.2, "b": 0.3, "c": 0.4}
    for name in EMB:
        exp = expected_rows(vocab_family, voc, name)
        want = sum(weights[n] * exp[n] for n in vocab_family)
        assert torch.allclose(sd[name], want, atol=1e-6), name
    # rows of <x>: each of a and b uses its own row, though the ids differ (81 in a, 80 in b)
    a, b = open_source("a", vocab_family["a"]), open_source("b", vocab_family["b"])
    base = open_source("base", vocab_family["base"])
    x_base = base.get(EMB[0])[0] * 0  # base lacks <x>; not the only one lacking it, and a and b have it: mean
    want_x = (0.1 + 0.4) * ((a.get(EMB[0])[81] + b.get(EMB[0])[80]) / 2) + 0.2 * a.get(EMB[0])[81] \
        + 0.3 * b.get(EMB[0])[80] + x_base
    assert torch.allclose(sd[EMB[0]][81], want_x, atol=1e-6)
    # the other tensors are merged as usual
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(sd[q], sum(weights[n] * open_source(n, p).get(q) for n, p in vocab_family.items()),
                          atol=1e-6)
    # and the merged model runs with the union tokenizer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("ab<tool>", return_tensors="pt")["input_ids"]
    assert 82 in ids[0].tolist()
    AutoModelForCausalLM.from_pretrained(out)(ids)


def test_base_and_named_tokenizer(vocab_family):
    plan = make_plan(recipe(vocab_family, "base", method="task_arithmetic"))
    # as in mergekit, the output has one row per token of the chosen tokenizer: base's 16 padding rows go
    assert plan.vocab.size == 80 and plan.tokenizer_dir == vocab_family["base"]
    from evomerge.merge.build import iter_merged

    merged = dict(iter_merged(plan, threads=1))
    assert merged[EMB[0]].shape == (80, 64)
    plan.close()
    plan = make_plan(recipe(vocab_family, "b", method="task_arithmetic"))
    assert plan.vocab.size == 82 and plan.tokenizer_dir == vocab_family["b"]
    merged = {n: t.clone() for n, t in iter_merged(plan, threads=1)}
    voc = vocab_of(vocab_family["b"])
    exp = expected_rows(vocab_family, voc, EMB[1])
    want = exp["base"] + sum(exp[n] - exp["base"] for n in ("a", "b", "c"))
    assert torch.allclose(merged[EMB[1]], want, atol=1e-5)
    plan.close()


def test_differing_vocab_without_tokenizer_source(vocab_family):
    with pytest.raises(EvomergeError, match="vocab_size") as e:
        make_plan(recipe(vocab_family, None))
    assert "tokenizer_source" in e.value.fix


def test_conflicting_tokenizers(vocab_family, tmp_path):
    """A model whose tokenizer numbers the base's tokens differently cannot be mapped: a clear error."""
    from tokenizers import Tokenizer

    other = add_tokens(vocab_family["base"], tmp_path / "other", ["<think>"], 5)
    tj = json.loads((other / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    keys = [k for k in vocab if len(k) == 1]
    for k1, k2 in zip(keys[::2], keys[1::2], strict=False):  # swap ids pairwise: a different tokenizer
        vocab[k1], vocab[k2] = vocab[k2], vocab[k1]
    Tokenizer.from_str(json.dumps(tj))  # still a valid tokenizer
    (other / "tokenizer.json").write_text(json.dumps(tj))
    fam = {"base": vocab_family["base"], "a": vocab_family["a"], "other": other}
    with pytest.raises(EvomergeError, match="different tokenizers") as e:
        make_plan(recipe(fam, "union", method="task_arithmetic"))
    assert "'base' and 'other'" in e.value.problem


def test_mergekit_config_union_cli(vocab_family, tmp_path):
    cfg = {"merge_method": "task_arithmetic", "base_model": str(vocab_family["base"]), "tokenizer_source": "union",
           "models": [{"model": str(vocab_family[n]), "parameters": {"weight": 0.5}} for n in ("a", "b")]}
    (tmp_path / "mk.yml").write_text(yaml.safe_dump(cfg))
    r = load_recipe(tmp_path / "mk.yml")
    assert r.tokenizer_source == "union"
    from evomerge.merge.mergekit_out import to_mergekit

    assert to_mergekit(r)["tokenizer_source"] == "union"
    res = subprocess.run([sys.executable, "-m", "evomerge.cli", "merge", str(tmp_path / "mk.yml"), "--out",
                          str(tmp_path / "out"), "-q"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert len(vocab_of(tmp_path / "out")) == 83
