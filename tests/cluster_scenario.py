"""A search on a real three-node Ray cluster on this machine, with one worker node lost mid-search.

Run by tests/test_cluster.py in its own process (a process joins one Ray cluster only):

    python tests/cluster_scenario.py ZOO_DIR RUN_DIR OUT_JSON

Head node: no CPUs (it hosts the controller only, as on a real cluster); two worker nodes with one CPU
each, so the two workers land one per node. Every first attempt at a candidate waits 1.5 s
(EVOMERGE_TEST_FAULTS=delay:1500) so that a candidate is in flight when the second node is killed
(no graceful shutdown) after the third evaluation is recorded.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ["EVOMERGE_TEST_FAULTS"] = "delay:1500"


def main() -> None:
    import ray
    from ray.cluster_utils import Cluster

    from evomerge.run.config import parse_config
    from evomerge.run.controller import Controller
    from evomerge.run.rundir import RunDir

    zoo, run_dir, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    cfg = parse_config({
        "models": {n: str(zoo / "models" / n) for n in ("base", "shift", "mirror")},
        "base": "base",
        "space": {"method": "task_arithmetic", "search": ["weight"], "bounds": {"weight": [0.0, 1.5]}, "x0": 0.5},
        "objective": {"include_path": str(zoo / "tasks"), "tasks": [{"name": "zoo_mixed_search"}], "limit": 20},
        "optimizer": {"seed": 0, "budget": 10, "popsize": 4, "sigma0": 0.3},
        "workers": {"count": 2, "cpus": 1, "timeout_s": 300},
    }, zoo)
    ctl = Controller(cfg, run_dir, progress=False)
    state: dict = {}

    def kill_second_node() -> None:
        while True:
            recs = [r for r in RunDir(run_dir).records() if r["type"] == "eval"] if run_dir.exists() else []
            if len(recs) >= 3:
                break
            time.sleep(0.05)
        state["before"] = {r["id"]: r["fitness"] for r in recs}
        state["slots_on_lost_node"] = [i for i, n in enumerate(ctl.pool.nodes) if n == nodes[1].node_id]
        state["removed_at"] = time.time()
        cluster.remove_node(nodes[1], allow_graceful=False)

    killer = threading.Thread(target=kill_second_node, daemon=True)
    killer.start()
    summary = ctl.run()
    killer.join(timeout=60)
    deadline = time.time() + 90  # the cluster declares a killed node dead after its health checks fail (~15 s)
    while time.time() < deadline:
        alive = {n["NodeID"]: n["Alive"] for n in ray.nodes()}
        if not alive.get(nodes[1].node_id, False):
            break
        time.sleep(0.5)
    state.update(summary=summary, node_ids=[n.node_id for n in nodes],
                 alive=[alive.get(n.node_id, False) for n in nodes])
    out.write_text(json.dumps(state, default=str))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()
