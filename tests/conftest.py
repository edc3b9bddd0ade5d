import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


@pytest.fixture(scope="session")
def family(tmp_path_factory):
    """A tiny Llama base + 3 experts (float32, 3 layers, hidden 64)."""
    from evomerge.tiny import make_family

    return make_family(tmp_path_factory.mktemp("family"), "llama", n_experts=3, hidden=64, layers=3)


@pytest.fixture(scope="session")
def sharded_family(tmp_path_factory):
    """The same kind of family saved in several safetensors shards per model."""
    from evomerge.tiny import make_family

    return make_family(tmp_path_factory.mktemp("sharded"), "llama", n_experts=2, hidden=64, layers=3,
                       max_shard_size="40KB")
