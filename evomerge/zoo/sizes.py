"""What defines a zoo besides its seed: model size, training phases, base mixture, item counts (no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field

from evomerge.zoo.skills import DEFAULT, Curriculum


@dataclass(frozen=True)
class TrainSpec:
    """One training phase: steps of AdamW at `lr` (linear warm-up, then cosine decay to 10%)."""

    steps: int
    lr: float
    batch: int
    warmup: int = 0
    weight_decay: float = 0.0


@dataclass(frozen=True)
class ZooSize:
    """Everything that defines a zoo besides its seed."""

    hidden: int
    layers: int
    base: TrainSpec
    expert: TrainSpec
    counts: dict[str, int]  # items per split, for every task
    mixture: dict[str, float] = field(default_factory=lambda: {
        "copy": 0.90, "shift": 0.02, "mirror": 0.03, "compositional": 0.05})
    expert_replay: float = 0.5  # share of each expert batch drawn from the replay mixture
    replay_mixture: dict[str, float] | None = None  # what experts replay (None: the base mixture)
    min_len: int = 4
    max_len: int = 8
    curriculum: Curriculum = DEFAULT  # expert skills and compositional pairs

    def expert_mixture(self, skill: str) -> dict[str, float]:
        """What expert `skill` is fine-tuned on: its skill, plus `expert_replay` of the replay mixture."""
        replay = self.replay_mixture if self.replay_mixture is not None else self.mixture
        total = sum(replay.values())
        mix = {k: self.expert_replay * v / total for k, v in replay.items()}
        mix[skill] = mix.get(skill, 0.0) + 1.0 - self.expert_replay
        return {k: v for k, v in mix.items() if v > 0}


SIZES = {
    "micro": ZooSize(hidden=128, layers=2, base=TrainSpec(steps=320, lr=3e-3, batch=64, warmup=50),
                     expert=TrainSpec(steps=80, lr=3e-4, batch=32),
                     counts={"search": 100, "validation": 100, "test": 200}),
    "small": ZooSize(hidden=128, layers=2, base=TrainSpec(steps=350, lr=3e-3, batch=64, warmup=50),
                     expert=TrainSpec(steps=200, lr=2e-4, batch=32),
                     counts={"search": 200, "validation": 200, "test": 500}),
    # The test bed on which search has room to win (issue 27; results/table1.md): four experts of a 6-layer
    # model, fine-tuned at 5e-4 with little replay so that their task vectors interfere (all four added at
    # weight 1 lose nearly everything), a base with partial competence in each skill, a compositional task
    # chaining four different pairs of skills, and 500 test items per task.
    "deep": ZooSize(hidden=128, layers=6, base=TrainSpec(steps=600, lr=3e-3, batch=64, warmup=50),
                    expert=TrainSpec(steps=200, lr=5e-4, batch=32),
                    counts={"search": 200, "validation": 200, "test": 500},
                    mixture={"copy": 0.86, "shift": 0.02, "mirror": 0.02, "swap": 0.03, "upper": 0.01,
                             "compositional": 0.06},
                    expert_replay=0.3,
                    curriculum=Curriculum(experts=("shift", "mirror", "swap", "upper"),
                                          pairs=(("shift", "mirror"), ("swap", "shift"),
                                                 ("mirror", "swap"), ("mirror", "upper")))),
}
