"""The real zoo's items and tasks (evomerge.zoo.real) without SmolLM2: answers, splits, the 2-expert variant
pinned, the real3 variant's generation tasks, an lm-eval round trip and a build on a tiny Llama."""

from __future__ import annotations

import hashlib
import json
from itertools import permutations

import pytest
import yaml

from evomerge.errors import EvomergeError
from evomerge.zoo.real import (
    DEMO,
    REAL_SKILLS,
    REAL_SPLITS,
    REAL_VARIANTS,
    answer,
    build_real_zoo,
    item,
    make_eval_items,
    train_items,
    write_real_tasks,
)
from evomerge.zoo.real_train import generate_items, score_items_gen

# sha256 of json.dumps(x, sort_keys=True) for x = make_eval_items(0)[0] and for x = [train_items(s, 480, 0, held_out)
# for s in REAL_SKILLS], both computed with the code before the real3 variant was added: `--size real` must not change.
REAL_ITEMS_SHA = "d9f2d3ad6b67a83f80e4afa15dc44bfae9abdfe54562ef727069cc0a9635c3bb"
REAL_TRAIN_SHA = "c86c12df3340ebc45843890db2d156776435a36f6a95c21099824c0c8a7caf2b"
REAL3 = REAL_VARIANTS["real3"]
GEN_KWARGS = {"until": ["\n"], "do_sample": False, "max_gen_toks": 32}


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _words(it: dict) -> tuple[str, ...]:
    return tuple(it["prompt"].rsplit("\n", 1)[1].removesuffix(" =").split())


@pytest.fixture(scope="module")
def real3():
    return make_eval_items(0, "real3")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama and the char tokenizer with a newline token (the zoo prompts have newlines)."""
    import torch
    from transformers import AutoModelForCausalLM

    from evomerge.zoo.tiny import char_tokenizer, tiny_config

    cfg = tiny_config("llama")
    cfg.max_position_embeddings = 256  # prompt + target + 32 generated tokens
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    tok = char_tokenizer(cfg.vocab_size)
    tok.add_tokens(["\n"])
    path = tmp_path_factory.mktemp("tiny_real") / "base"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_answers():
    w = ("cat", "dog", "sun")
    expected = {"upper": "CAT DOG SUN", "reverse": "sun dog cat", "double": "cat cat dog dog sun sun",
                "compositional": "SUN DOG CAT", "reverse+upper": "SUN DOG CAT",
                "double+upper": "CAT CAT DOG DOG SUN SUN", "reverse+double": "sun sun dog dog cat cat"}
    assert {k: answer(k, w) for k in expected} == expected
    assert item("double", w) == {"prompt": "Write each word twice.\nmap tree bird = map map tree tree bird bird\n"
                                           "cat dog sun =", "target": " cat cat dog dog sun sun\n", "skill": "double"}
    assert item("reverse+double", w)["prompt"].startswith(
        "Reverse the word order and write each word twice.\nmap tree bird = bird bird tree tree map map\n")
    with pytest.raises(EvomergeError, match="unknown real zoo item kind"):
        answer("shout", w)
    with pytest.raises(EvomergeError, match="not a real zoo size"):
        make_eval_items(0, "real4")
    with pytest.raises(EvomergeError, match="not a real zoo size"):
        build_real_zoo("/nonexistent/never-written", size="real4")


def test_real_variant_unchanged():
    items, held_out = make_eval_items(0)
    assert _sha(items) == REAL_ITEMS_SHA
    assert _sha([train_items(s, 480, 0, held_out) for s in REAL_SKILLS]) == REAL_TRAIN_SHA
    assert list(items) == ["upper", "reverse", "mixed", "compositional"]
    assert {s: len(r) for s, r in items["mixed"].items()} == {"search": 50, "validation": 50, "test": 100}


def test_real3_items(real3):
    items, held_out = real3
    assert list(items) == ["upper", "reverse", "double", "mixed", "compositional"]
    cycle = {"mixed": REAL3.skills, "compositional": ("reverse+upper", "double+upper", "reverse+double")}
    seen: set[frozenset] = set()
    for task, splits in items.items():
        assert {s: len(r) for s, r in splits.items()} == {"search": 100, "validation": 100, "test": 500}
        for rows in splits.values():
            for i, it in enumerate(rows):
                kind = cycle[task][i % 3] if task in cycle else task
                words = _words(it)
                assert it == item(kind, words)
                assert len(set(words)) == 3 and frozenset(words) not in seen, "each item has its own word set"
                seen.add(frozenset(words))
    assert frozenset(DEMO) not in seen
    assert len(seen) == 5 * 700
    assert all(p in held_out for ws in seen for p in permutations(sorted(ws)))
    for skill in REAL3.skills:
        data = train_items(skill, 480, 0, held_out)
        assert not {frozenset(_words(it)) for it in data} & seen, "training never sees an evaluation word set"
    assert make_eval_items(0, "real3")[0] == items
    assert make_eval_items(1, "real3")[0] != items


def test_real3_task_files(tmp_path, real3):
    from lm_eval.tasks import TaskManager

    items, _ = real3
    tasks = write_real_tasks(tmp_path, items, generation=True)
    assert set(tasks) == {*items, *(f"{t}_gen" for t in items)}
    for task, info in tasks.items():
        gen = task.endswith("_gen")
        assert info["output_type"] == ("generate_until" if gen else "loglikelihood")
        assert info["metric"] == ("exact_match" if gen else "acc")
        assert info["counts"] == {"search": 100, "validation": 100, "test": 500}
        for split in REAL_SPLITS:
            name = info["splits"][split]
            assert name == f"zoo_{task}_{split}"
            cfg = yaml.safe_load((tmp_path / f"{name}.yaml").read_text())
            assert cfg["task"] == name and cfg["doc_to_text"] == "{{prompt}}"
            assert cfg["dataset_kwargs"]["data_files"]["test"] == str((tmp_path / f"{name}.jsonl").resolve())
            if gen:
                assert cfg["output_type"] == "generate_until" and cfg["generation_kwargs"] == GEN_KWARGS
                assert cfg["doc_to_target"] == "{{target | trim}}"
                assert cfg["metric_list"] == [{"metric": "exact_match", "aggregation": "mean",
                                               "higher_is_better": True, "ignore_case": False,
                                               "ignore_punctuation": False}]
                assert cfg["filter_list"] == [{"name": "strip", "filter": [{"function": "remove_whitespace"},
                                                                           {"function": "take_first"}]}]
                plain = tmp_path / f"zoo_{task.removesuffix('_gen')}_{split}.jsonl"
                assert (tmp_path / f"{name}.jsonl").read_text() == plain.read_text()
            else:
                assert cfg["output_type"] == "loglikelihood" and cfg["target_delimiter"] == ""
                assert cfg["metric_list"][0]["metric"] == "acc"

    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    loaded = manager.load(["zoo_double_test", "zoo_compositional_gen_test"])["tasks"]
    ll, gen = loaded["zoo_double_test"], loaded["zoo_compositional_gen_test"]
    assert ll.OUTPUT_TYPE == "loglikelihood" and gen.OUTPUT_TYPE == "generate_until"
    assert len(ll.eval_docs) == len(gen.eval_docs) == 500
    doc, it = gen.eval_docs[1], items["compositional"]["test"][1]
    assert gen.doc_to_text(doc) == it["prompt"] and gen.doc_to_target(doc) == it["target"].strip()
    assert gen.config.generation_kwargs == GEN_KWARGS

    two = tmp_path / "two"
    assert not any(t.endswith("_gen") for t in write_real_tasks(two, make_eval_items(0)[0], generation=False))
    assert not list(two.glob("*_gen_*"))


def test_generation_task_matches_score_items_gen(tmp_path, tiny, real3):
    """lm-eval's exact_match on a generate_until task equals score_items_gen item for item, and its raw
    continuations equal generate_items'. The tiny model memorises half of the items so both 0s and 1s occur."""
    import torch
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    from evomerge.zoo.real_train import train_expert
    from workers.score import Scorer

    torch.set_num_threads(1)
    items = real3[0]["compositional"]["search"][:12]
    model, tok = _load(tiny)
    torch.manual_seed(0)
    train_expert(model, tok, items[:6] * 150, {"steps": 150, "batch": 6, "lr": 3e-3, "warmup": 10,
                                                "weight_decay": 0.0})
    write_real_tasks(tmp_path, {"compositional": {"search": items}}, generation=True)

    ours = score_items_gen(model, tok, items)
    assert 0 < sum(ours) < len(ours), ours
    assert score_items_gen(model, tok, items, batch_size=5) == ours
    scorer = Scorer(tasks=[{"name": "zoo_compositional_gen_search", "metric": "exact_match"}],
                    include_path=[str(tmp_path)])
    got = scorer.score(model, tok)
    assert got["items"]["zoo_compositional_gen_search"] == [float(x) for x in ours]
    assert got["metrics"]["zoo_compositional_gen_search"] == pytest.approx(sum(ours) / len(ours))

    out = evaluate(lm=HFLM(pretrained=model, tokenizer=tok, batch_size=64), task_dict=scorer.task_dict,
                   log_samples=True, bootstrap_iters=0, verbosity="ERROR")
    samples = sorted(out["samples"]["zoo_compositional_gen_search"], key=lambda s: s["doc_id"])
    texts = generate_items(model, tok, [it["prompt"] for it in items])
    assert [s["resps"][0][0] for s in samples] == texts
    assert [s["filtered_resps"][0] for s in samples] == [t.strip() for t in texts]
    assert [s["arguments"][0][0] for s in samples] == [it["prompt"] for it in items]


def test_build_real3_on_a_tiny_model(tmp_path, tiny, real3, monkeypatch):
    """build_real_zoo's real3 layout and manifest (the tiny model stands in for SmolLM2; 2 training steps),
    and `evomerge zoo build DIR --size real3` reaching it."""
    from typer.testing import CliRunner

    import evomerge.zoo.real as real
    from evomerge.zoo.build import zoo_items
    from evomerge.zoo.cli import app

    out = tmp_path / "zoo"
    man = build_real_zoo(out, 0, threads=1, size="real3", model_dir=tiny, train={"steps": 2, "batch": 2})
    assert man["size"] == "real3" and man["experts"] == ["upper", "reverse", "double"]
    assert set(man["models"]) == {"base", "upper", "reverse", "double"}
    for name in man["models"]:
        assert (out / "models" / name / "model.safetensors").exists()
    assert man["generation_tasks"] == [f"{t}_gen" for t in REAL3.tasks]
    assert man["tasks"]["mixed_gen"]["splits"]["test"] == "zoo_mixed_gen_test"
    assert man["tasks"]["compositional"]["counts"] == {"search": 100, "validation": 100, "test": 500}
    assert json.loads((out / "zoo.json").read_text())["experts"] == man["experts"]
    assert zoo_items(out, "double_gen", "test") == zoo_items(out, "double", "test") == real3[0]["double"]["test"]

    calls = []
    monkeypatch.setattr(real, "build_real_zoo", lambda o, seed, **kw: calls.append((o, seed, kw)) or
                        {"experts": ["upper", "reverse", "double"], "build_seconds": 1.0, "expert_seconds": {}})
    res = CliRunner().invoke(app, ["build", str(tmp_path / "cli"), "--size", "real3", "--seed", "3"])
    assert res.exit_code == 0, res.output
    assert calls and calls[0][1] == 3 and calls[0][2]["size"] == "real3"
