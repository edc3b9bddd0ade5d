"""The zoo's synthetic skills and its evaluation items (pure Python: no torch).

Every item is a prompt and a target; the model reads ``<s>`` + prompt and must continue with the target,
which always ends with ``.`` so that greedy decoding, teacher-forced greedy checking and lm-eval's
``is_greedy`` all mean the same thing (exact match including the terminator).

    copy           c:abcxy=abcxy.         filler: what the base mostly sees
    shift          s:abcxy=bcdyz.         skill A: each letter one on in the alphabet (z -> a)
    mirror         m:abcxy=zyxcb.         skill B: each letter mirrored in the alphabet (a <-> z)
    compositional  sm:abcxy=bcdyz;yxwba.  both: A's output written out, then B applied to it

Target tasks: each skill, ``mixed`` (alternating shift and mirror items) and ``compositional``.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass

LETTERS = string.ascii_lowercase
END = "."


def _shift(s: str) -> str:
    return "".join(LETTERS[(LETTERS.index(c) + 1) % len(LETTERS)] for c in s)


def _mirror(s: str) -> str:
    return "".join(LETTERS[len(LETTERS) - 1 - LETTERS.index(c)] for c in s)


def _compose(s: str) -> str:
    shifted = _shift(s)
    return f"{shifted};{_mirror(shifted)}"


@dataclass(frozen=True)
class Skill:
    """A string skill: a prompt prefix and the function from the input string to the answer."""

    name: str
    prefix: str
    answer: Callable[[str], str]

    def item(self, s: str) -> dict[str, str]:
        """One item (prompt, target, skill) for input string `s`."""
        return {"prompt": f"{self.prefix}:{s}=", "target": self.answer(s) + END, "skill": self.name}


SKILLS = {s.name: s for s in (
    Skill("copy", "c", lambda s: s),
    Skill("shift", "s", _shift),
    Skill("mirror", "m", _mirror),
    Skill("compositional", "sm", _compose),
)}
EXPERT_SKILLS = ("shift", "mirror")
TASKS = (*EXPERT_SKILLS, "mixed", "compositional")
SPLITS = ("search", "validation", "test")


def random_string(rng: random.Random, min_len: int, max_len: int) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(min_len, max_len)))


def task_skills(task: str) -> tuple[str, ...]:
    """The skills whose items make up `task` (mixed alternates between the expert skills)."""
    return EXPERT_SKILLS if task == "mixed" else (task,)


def make_eval_items(counts: dict[str, int], seed: int, min_len: int,
                    max_len: int) -> tuple[dict[str, dict[str, list[dict]]], set[str]]:
    """Items for every task and split ({task: {split: [item]}}), all with distinct input strings.

    Returns the items and the set of input strings they use, which training data must avoid.
    """
    rng = random.Random(f"zoo-eval-{seed}")
    used: set[str] = set()
    items: dict[str, dict[str, list[dict]]] = {}
    for task in TASKS:
        skills = task_skills(task)
        items[task] = {}
        for split in SPLITS:
            rows = []
            for i in range(counts[split]):
                s = random_string(rng, min_len, max_len)
                while s in used:
                    s = random_string(rng, min_len, max_len)
                used.add(s)
                rows.append(SKILLS[skills[i % len(skills)]].item(s))
            items[task][split] = rows
    return items, used


class ItemStream:
    """An endless seeded stream of training items drawn from a skill mixture, avoiding held-out strings."""

    def __init__(self, mixture: dict[str, float], seed: int | str, min_len: int, max_len: int,
                 held_out: set[str]):
        self.rng = random.Random(seed)
        self.names = list(mixture)
        self.weights = [mixture[n] for n in self.names]
        self.min_len, self.max_len, self.held_out = min_len, max_len, held_out

    def batch(self, n: int) -> list[dict[str, str]]:
        out = []
        for name in self.rng.choices(self.names, self.weights, k=n):
            s = random_string(self.rng, self.min_len, self.max_len)
            while s in self.held_out:
                s = random_string(self.rng, self.min_len, self.max_len)
            out.append(SKILLS[name].item(s))
        return out
