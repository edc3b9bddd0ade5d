import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n 2`: one torch thread per test process (two busy processes
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # with two threads each run ~4x slower on 2 cores)

import json
import shutil
from pathlib import Path

import pytest

_DURATIONS = Path(__file__).with_name("durations.json")


def pytest_collection_modifyitems(session, config, items):
    """Longest files first (seconds per file measured by `python tests/durations.py`), so that two test processes
    (`pytest -n 2 --dist loadfile --no-loadscope-reorder`) do not end with one long file running alone. Within a
    file the order is unchanged; a file not measured yet goes last."""
    try:
        seconds = json.loads(_DURATIONS.read_text())
    except (OSError, ValueError):
        return
    first = {}
    for i, item in enumerate(items):
        first.setdefault(item.nodeid.split("::", 1)[0], i)
    items.sort(key=lambda it: (-seconds.get(it.nodeid.split("::", 1)[0], 0.0),
                               first[it.nodeid.split("::", 1)[0]]))


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
    """The micro expert zoo, built once per test run (~80 s on one core) and shared by the test processes of
    `pytest -n N`: the first process to need it builds it under a file lock in the run's common temporary
    folder, the others wait and read it. Tests treat it as read-only (they copy what they change)."""
    from filelock import FileLock

    from evomerge.zoo.build import build_zoo

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # xdist: one basetemp per process
    out = shared / "shared-zoo" / "micro"
    with FileLock(str(shared / "shared-zoo.lock")):
        if not (out / "zoo.json").exists():  # written last: a zoo without it is a build that died halfway
            shutil.rmtree(out, ignore_errors=True)
            build_zoo(out, "micro", seed=0)  # in place: the manifest and task files hold absolute paths
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


# A chat template for the micro zoo's tokenizer (it knows letters, digits and a few signs): the system turn is a
# skill prefix, the user turn the input; what the zoo was trained on is `<s>s:abc=` -> `bcd.`
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}:"
                 "{% elif m['role'] == 'user' %}{{ m['content'] }}={% else %}{{ m['content'] }}.{% endif %}"
                 "{% endfor %}")


@pytest.fixture(scope="session")
def chat_zoo(micro_zoo, tmp_path_factory):
    """The micro zoo's shift expert with a chat template (`chat`), the same expert without one (`plain`), and
    `zoo_bare_shift`: the shift items with the bare input as the prompt (no `s:` prefix, no `=`), which only
    the chat template with the system instruction `s` turns back into the prompt the expert knows."""
    import yaml

    root = tmp_path_factory.mktemp("chat_zoo")
    shutil.copytree(micro_zoo / "models" / "shift", root / "chat")
    p = root / "chat" / "tokenizer_config.json"
    p.write_text(json.dumps({**json.loads(p.read_text()), "chat_template": CHAT_TEMPLATE}))
    (root / "tasks").mkdir()
    common = {"dataset_path": "json", "test_split": "test", "doc_to_text": "{{prompt[2:-1]}}",
              "dataset_kwargs": {"data_files": {"test": str(micro_zoo / "tasks" / "zoo_shift_search.jsonl")}},
              "target_delimiter": "", "metadata": {"version": 1.0}}
    (root / "tasks" / "zoo_bare_shift.yaml").write_text(yaml.safe_dump({
        **common, "task": "zoo_bare_shift", "output_type": "loglikelihood", "doc_to_target": "{{target}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}))
    (root / "tasks" / "zoo_bare_shift_gen.yaml").write_text(yaml.safe_dump({
        **common, "task": "zoo_bare_shift_gen", "output_type": "generate_until", "doc_to_target": "{{target[:-1]}}",
        "generation_kwargs": {"until": ["."], "do_sample": False, "max_gen_toks": 24},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]}))
    return {"chat": root / "chat", "plain": micro_zoo / "models" / "shift", "tasks": root / "tasks",
            "zoo": micro_zoo}
