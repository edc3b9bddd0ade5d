"""The test beds of issue 27: the multi-expert curriculum, the deep zoo's layout and determinism, and the
default zoo left exactly as it was."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest

from evomerge.zoo import SIZES, SPLITS, TrainSpec, build_zoo, load_zoo, zoo_items
from evomerge.zoo.skills import BASIC, DEFAULT, Curriculum, ItemStream, composite, make_eval_items


def _h(x) -> str:
    return hashlib.sha256(json.dumps(x, sort_keys=True).encode()).hexdigest()[:16]


def test_skills_answer():
    assert BASIC["swap"].answer("abcde") == "badce"
    assert BASIC["swap"].answer("abcd") == "badc"
    assert BASIC["upper"].answer("abz") == "ABZ"
    assert BASIC["reverse"].answer("abc") == "cba"
    item = composite("swap", "shift").item("abcd")
    assert item == {"prompt": "ws:abcd=", "target": "badc;cbed.", "skill": "swap+shift"}


def test_curriculum_refuses_bad_skills():
    with pytest.raises(ValueError, match="unknown zoo skill"):
        Curriculum(experts=("shift", "juggle"))
    with pytest.raises(ValueError, match="second skill"):
        Curriculum(experts=("shift", "upper"), pairs=(("upper", "shift"),))


def test_default_curriculum_draws_what_it_always_drew():
    """The two-skill zoos (micro, small) must not change: the items and training streams of the default
    curriculum are pinned to the hashes of the code before curricula existed."""
    items, used = make_eval_items({"search": 20, "validation": 20, "test": 30}, 3, 4, 8)
    assert _h(items) == "b1327509f6a834f5"
    stream = ItemStream({"copy": 0.9, "shift": 0.02, "mirror": 0.03, "compositional": 0.05}, "s", 4, 8, used)
    assert _h(stream.batch(300)) == "02b0987f5f7e9363"
    assert DEFAULT.tasks == ("shift", "mirror", "mixed", "compositional")


def test_deep_items_cycle_through_skills_and_pairs():
    cur = SIZES["deep"].curriculum
    assert len(cur.experts) >= 4 and len(cur.pairs) >= 2
    items, used = make_eval_items({"search": 8, "validation": 8, "test": 8}, 0, 4, 8, cur)
    assert [r["skill"] for r in items["mixed"]["test"][:len(cur.experts)]] == list(cur.experts)
    assert [r["skill"] for r in items["compositional"]["test"][:len(cur.pairs)]] == [f"{a}+{b}" for a, b in cur.pairs]
    strings = [r["prompt"].split(":", 1)[1][:-1] for t in items.values() for s in t.values() for r in s]
    assert len(strings) == len(set(strings)) == len(used)  # every item its own input string
    batch = ItemStream(SIZES["deep"].mixture, "x", 4, 8, used, cur).batch(400)
    assert not {r["prompt"].split(":", 1)[1][:-1] for r in batch} & used  # training never sees them
    assert {r["skill"] for r in batch if "+" in r["skill"]} == {f"{a}+{b}" for a, b in cur.pairs}


def test_deep_spec_is_a_test_bed_with_room():
    spec = SIZES["deep"]
    assert spec.layers >= 6 and len(spec.curriculum.experts) >= 4
    assert spec.counts["test"] >= 500


def test_deep_zoo_layout_and_determinism(tmp_path):
    """A shortened deep zoo: every expert and task is there, same seed => identical weights and items."""
    quick = dataclasses.replace(SIZES["deep"], hidden=32, base=TrainSpec(steps=6, lr=3e-3, batch=8, warmup=2),
                                expert=TrainSpec(steps=2, lr=3e-4, batch=8),
                                counts={"search": 4, "validation": 4, "test": 6})
    hashes = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        build_zoo(tmp_path / name, quick, seed=seed)
        hashes.append({m: hashlib.sha256((tmp_path / name / "models" / m / "model.safetensors").read_bytes())
                       .hexdigest() for m in ("base", *quick.curriculum.experts)})
    assert hashes[0] == hashes[1] and hashes[0]["base"] != hashes[2]["base"]
    man = load_zoo(tmp_path / "a")
    assert set(man["models"]) == {"base", *quick.curriculum.experts}
    assert man["config"]["layers"] == 6 and len(man["config"]["curriculum"]["pairs"]) == len(quick.curriculum.pairs)
    for task in quick.curriculum.tasks:
        assert set(man["tasks"][task]["counts"]) == set(SPLITS)
        for split in SPLITS:
            assert len(zoo_items(tmp_path / "a", task, split)) == quick.counts[split]
            assert (tmp_path / "a" / "tasks" / f"zoo_{task}_{split}.yaml").exists()
    assert set(man["scores"]["models"]["base"]) == set(quick.curriculum.tasks)
