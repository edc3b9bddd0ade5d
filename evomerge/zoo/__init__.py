"""The tiny expert zoo: a base and skill experts on which merging measurably helps (issue 12).

    from evomerge.zoo import build_zoo
    manifest = build_zoo("zoo", size="micro", seed=0)
"""

from evomerge.zoo.build import build_zoo, load_zoo, zoo_items
from evomerge.zoo.sizes import SIZES, TrainSpec, ZooSize
from evomerge.zoo.skills import EXPERT_SKILLS, SPLITS, TASKS

__all__ = ["EXPERT_SKILLS", "SIZES", "SPLITS", "TASKS", "TrainSpec", "ZooSize", "build_zoo", "load_zoo", "zoo_items"]
