import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


@pytest.fixture(scope="session")
def family(tmp_path_factory):
    """A tiny Llama base + 3 experts (float32, 3 layers, hidden 64)."""
    from evomerge.zoo.tiny import make_family

    return make_family(tmp_path_factory.mktemp("family"), "llama", n_experts=3, hidden=64, layers=3)


@pytest.fixture(scope="session")
def sharded_family(tmp_path_factory):
    """The same kind of family saved in several safetensors shards per model."""
    from evomerge.zoo.tiny import make_family

    return make_family(tmp_path_factory.mktemp("sharded"), "llama", n_experts=2, hidden=64, layers=3,
                       max_shard_size="40KB")


@pytest.fixture(scope="session")
def micro_zoo(tmp_path_factory):
    """The micro expert zoo (built once per test session; ~30-40 s on 2 cores)."""
    from evomerge.zoo.build import build_zoo

    out = tmp_path_factory.mktemp("zoo") / "micro"
    build_zoo(out, "micro", seed=0)
    return out


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray instance for the whole test run (starting Ray costs seconds)."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # address "local": a Ray of the test run's own, never a cluster another process started on the machine
    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
