"""A real multi-node Ray cluster on one machine (ray.cluster_utils.Cluster): a search spread over two worker
nodes survives losing one of them mid-search (see tests/cluster_scenario.py)."""

import json
import subprocess
import sys
from pathlib import Path

from evomerge.run.rundir import RunDir


def test_search_survives_losing_a_node(micro_zoo, tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "out.json"
    script = Path(__file__).with_name("cluster_scenario.py")
    proc = subprocess.run([sys.executable, str(script), str(micro_zoo), str(run_dir), str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    st = json.loads(out.read_text())
    assert st["alive"] == [True, False]  # the second worker node really is gone
    assert len(st["slots_on_lost_node"]) == 1  # one worker per node: the search was spread over both
    evals = [r for r in RunDir(run_dir).records() if r["type"] == "eval"]
    ids = [r["id"] for r in evals]
    # the search finished its budget, each candidate recorded exactly once, none failed
    assert sorted(ids) == list(range(10)) and len(set(ids)) == len(ids)
    assert all(r["fitness"] is not None for r in evals)
    # nothing recorded before the loss was lost or changed
    by_id = {r["id"]: r for r in evals}
    assert all(by_id[int(i)]["fitness"] == f for i, f in st["before"].items())
    # the lost node's in-flight candidate was redone on the surviving worker
    redone = [r for r in evals if r["requeued"] >= 1]
    assert redone and all(r["fitness"] is not None for r in redone)
    # (a result the lost worker had already sent can be recorded a moment after the kill: count from 2 s later)
    after = {r["worker"] for r in evals if r["time"] > st["removed_at"] + 2.0}
    assert len(after) == 1 and {r["worker"] for r in redone} <= after


CLUSTER = Path(__file__).resolve().parents[1] / "configs" / "cluster"


def test_cluster_launcher_config_passes_rays_own_validation():
    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text()))
    validate_config(cfg)  # raises on a schema violation
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--num-cpus=0" in head  # the controller's node hosts no workers
    assert any("/shared:/shared" in o for o in cfg["docker"]["run_options"])


def test_kuberay_manifest_is_a_consistent_raycluster():
    import yaml

    m = yaml.safe_load((CLUSTER / "kuberay.yaml").read_text())
    assert m["apiVersion"] == "ray.io/v1" and m["kind"] == "RayCluster"
    head = m["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    pods = [head["template"]["spec"]] + [g["template"]["spec"] for g in m["spec"]["workerGroupSpecs"]]
    images = {c["image"] for p in pods for c in p["containers"]}
    assert len(images) == 1  # one image for controller and workers
    for p in pods:
        claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in p["volumes"]}
        mounts = {vm["name"]: vm["mountPath"] for c in p["containers"] for vm in c["volumeMounts"]}
        assert mounts["shared"] == "/shared" and claims["shared"] == "evomerge-shared"
    for g in m["spec"]["workerGroupSpecs"]:
        (c,) = g["template"]["spec"]["containers"]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
