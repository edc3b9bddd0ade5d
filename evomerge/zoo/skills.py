"""The zoo's synthetic skills and its evaluation items (pure Python: no torch).

Every item is a prompt and a target; the model reads ``<s>`` + prompt and must continue with the target,
which always ends with ``.`` so that greedy decoding, teacher-forced greedy checking and lm-eval's
``is_greedy`` all mean the same thing (exact match including the terminator).

    copy           c:abcxy=abcxy.         filler: what the base mostly sees
    shift          s:abcxy=bcdyz.         each letter one on in the alphabet (z -> a)
    mirror         m:abcxy=zyxcb.         each letter mirrored in the alphabet (a <-> z)
    reverse        r:abcxy=yxcba.         the letters in reverse order
    swap           w:abcxy=bacyx.         each adjacent pair of letters swapped (a last odd letter stays)
    upper          u:abcxy=ABCXY.         each letter in upper case
    A then B       sm:abcxy=bcdyz;yxwba.  both: A's output written out, then B applied to it

A zoo names its expert skills and the skill pairs of its compositional task (`Curriculum`). Target tasks:
each expert skill, ``mixed`` (items cycling through the expert skills) and ``compositional`` (items cycling
through the pairs). The default curriculum is the original two-skill zoo: experts shift and mirror, one
pair (shift then mirror), and it draws exactly the same items and training streams as before.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass

LETTERS = string.ascii_lowercase
END = "."
COMPOSITIONAL = "compositional"


def _shift(s: str) -> str:
    return "".join(LETTERS[(LETTERS.index(c) + 1) % len(LETTERS)] for c in s)


def _mirror(s: str) -> str:
    return "".join(LETTERS[len(LETTERS) - 1 - LETTERS.index(c)] for c in s)


def _reverse(s: str) -> str:
    return s[::-1]


def _swap(s: str) -> str:
    pairs = [s[i + 1] + s[i] for i in range(0, len(s) - 1, 2)]
    return "".join(pairs) + (s[-1] if len(s) % 2 else "")


@dataclass(frozen=True)
class Skill:
    """A string skill: a prompt prefix and the function from the input string to the answer."""

    name: str
    prefix: str
    answer: Callable[[str], str]

    def item(self, s: str, skill: str | None = None) -> dict[str, str]:
        """One item (prompt, target, skill) for input string `s`."""
        return {"prompt": f"{self.prefix}:{s}=", "target": self.answer(s) + END, "skill": skill or self.name}


BASIC = {s.name: s for s in (
    Skill("copy", "c", lambda s: s),
    Skill("shift", "s", _shift),
    Skill("mirror", "m", _mirror),
    Skill("reverse", "r", _reverse),
    Skill("swap", "w", _swap),
    Skill("upper", "u", str.upper),
)}
SECOND_ONLY = {"upper"}  # its output is not lowercase letters: it can only end a pair


def composite(first: str, second: str) -> Skill:
    """`first` applied, its output written out, then `second` applied to that output."""
    a, b = BASIC[first], BASIC[second]

    def answer(s: str) -> str:
        mid = a.answer(s)
        return f"{mid};{b.answer(mid)}"

    return Skill(f"{first}+{second}", a.prefix + b.prefix, answer)


@dataclass(frozen=True)
class Curriculum:
    """Which skills a zoo's experts learn and which pairs its compositional task chains."""

    experts: tuple[str, ...] = ("shift", "mirror")
    pairs: tuple[tuple[str, str], ...] = (("shift", "mirror"),)

    def __post_init__(self):
        for name in (*self.experts, *(n for p in self.pairs for n in p)):
            if name not in BASIC or name == "copy":
                raise ValueError(f"unknown zoo skill {name!r}; known: {', '.join(n for n in BASIC if n != 'copy')}")
        for first, _ in self.pairs:
            if first in SECOND_ONLY:
                raise ValueError(f"zoo skill {first!r} can only be the second skill of a pair")

    @property
    def tasks(self) -> tuple[str, ...]:
        return (*self.experts, "mixed", COMPOSITIONAL)

    def task_skills(self, task: str) -> tuple[Skill, ...]:
        """The skills whose items make up `task`, in the order items cycle through them."""
        if task == "mixed":
            return tuple(BASIC[e] for e in self.experts)
        if task == COMPOSITIONAL:
            return tuple(composite(a, b) for a, b in self.pairs)
        return (BASIC[task],)

    def skill_label(self, skill: Skill) -> str:
        """The `skill` field of an item (one-pair zoos label their composite items 'compositional')."""
        return COMPOSITIONAL if len(self.pairs) == 1 and "+" in skill.name else skill.name


DEFAULT = Curriculum()
EXPERT_SKILLS = DEFAULT.experts
TASKS = DEFAULT.tasks
SPLITS = ("search", "validation", "test")
SKILLS = {**BASIC, COMPOSITIONAL: composite(*DEFAULT.pairs[0])}  # the two-skill zoo's names


def random_string(rng: random.Random, min_len: int, max_len: int) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(min_len, max_len)))


def task_skills(task: str) -> tuple[str, ...]:
    """The default zoo's skill names for `task` (mixed alternates between the expert skills)."""
    return EXPERT_SKILLS if task == "mixed" else (task,)


def make_eval_items(counts: dict[str, int], seed: int, min_len: int, max_len: int,
                    curriculum: Curriculum = DEFAULT) -> tuple[dict[str, dict[str, list[dict]]], set[str]]:
    """Items for every task and split ({task: {split: [item]}}), all with distinct input strings.

    Returns the items and the set of input strings they use, which training data must avoid.
    """
    rng = random.Random(f"zoo-eval-{seed}")
    used: set[str] = set()
    items: dict[str, dict[str, list[dict]]] = {}
    for task in curriculum.tasks:
        skills = curriculum.task_skills(task)
        items[task] = {}
        for split in SPLITS:
            rows = []
            for i in range(counts[split]):
                s = random_string(rng, min_len, max_len)
                while s in used:
                    s = random_string(rng, min_len, max_len)
                used.add(s)
                skill = skills[i % len(skills)]
                rows.append(skill.item(s, curriculum.skill_label(skill)))
            items[task][split] = rows
    return items, used


class ItemStream:
    """An endless seeded stream of training items drawn from a skill mixture, avoiding held-out strings.

    Mixture keys are basic skill names or 'compositional' (a pair of the curriculum, drawn uniformly).
    """

    def __init__(self, mixture: dict[str, float], seed: int | str, min_len: int, max_len: int,
                 held_out: set[str], curriculum: Curriculum = DEFAULT):
        self.rng = random.Random(seed)
        self.names = list(mixture)
        self.weights = [mixture[n] for n in self.names]
        self.min_len, self.max_len, self.held_out = min_len, max_len, held_out
        self.composites = curriculum.task_skills(COMPOSITIONAL)
        self.curriculum = curriculum

    def _skill(self, name: str) -> Skill:
        if name != COMPOSITIONAL:
            return BASIC[name]
        if len(self.composites) == 1:  # no extra draw: the two-skill zoo's stream stays what it was
            return self.composites[0]
        return self.composites[self.rng.randrange(len(self.composites))]

    def batch(self, n: int) -> list[dict[str, str]]:
        out = []
        for name in self.rng.choices(self.names, self.weights, k=n):
            skill = self._skill(name)
            s = random_string(self.rng, self.min_len, self.max_len)
            while s in self.held_out:
                s = random_string(self.rng, self.min_len, self.max_len)
            out.append(skill.item(s, self.curriculum.skill_label(skill)))
        return out
