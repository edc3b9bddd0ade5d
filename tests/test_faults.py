"""Fault injection: whatever goes wrong, the search finishes, the ledger holds every completed evaluation
exactly once, and the final best is the best in the ledger.

Also covered elsewhere: a worker process killed at the start of a candidate and a candidate that raises
(tests/test_search.py::test_worker_death_is_retried_and_a_raising_candidate_is_recorded), a hanging worker
(::test_hanging_candidate_times_out, per-candidate timeout from the config), a second controller on the same
run directory (::test_second_controller_on_the_same_run_dir_is_refused), a Ray node lost
(tests/test_cluster.py), a single kill -9 mid-hybrid (tests/test_dataflow.py).
"""

import errno
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from test_search import config

from evomerge.errors import EvomergeError
from evomerge.merge.atomic import write_atomic
from evomerge.run.controller import Controller
from evomerge.run.rundir import LEDGER, RunDir, read_ledger, scan_ledger
from evomerge.run.status import status


def _check_run(run, budget):
    """Every id once, nothing failed, the best is the ledger's best and it was validated."""
    recs = RunDir(run).records()
    evals = [r for r in recs if r["type"] == "eval"]
    ids = [r["id"] for r in evals]
    assert sorted(ids) == list(range(budget)), f"ids {sorted(ids)}"
    assert all(r["fitness"] is not None for r in evals)
    st = status(run)
    best = max(evals, key=lambda r: r["fitness"])
    assert st["best"]["fitness"] == best["fitness"]
    return {r["id"]: r for r in evals}


def _group_alive(pgid):
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_controller_killed_at_10_random_points_then_resumed(micro_zoo, tmp_path):
    """SIGKILL the whole controller (and its embedded Ray) at 10 seeded random moments (each optimizer alone is
    killed at 10 more in tests/test_conformance.py): during start-up,
    mid-evaluation, mid-commit, mid-validation. Each time the ledger stays readable and what it recorded stays
    as it was; resumed to the end, every evaluation is there once, the best is the ledger's best, and the
    search asked exactly what the same search asks without interruptions. (A run that finishes before the
    10th kill is checked and the kills go on in a fresh run directory.)"""
    budget = 24
    cfg = config(micro_zoo, optimizer={"budget": budget, "popsize": 6, "sigma0": 0.4}, workers={"count": 1},
                 objective={"limit": None},
                 validation={"include_path": str(micro_zoo / "tasks"),
                             "tasks": [{"name": "zoo_mixed_validation"}], "limit": 20})
    cfg_path = tmp_path / "search.yaml"
    cfg_path.write_text(cfg.to_yaml())
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}

    def cli(*args, **kw):
        return subprocess.Popen([sys.executable, "-m", "evomerge.cli", *map(str, args), "-q"], env=env,
                                start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)

    ref = tmp_path / "ref"  # the same search, never interrupted
    proc = cli("search", cfg_path, "--run-dir", ref)
    assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()[-2000:]
    want = _check_run(ref, budget)

    rng = random.Random(0)
    groups = []  # each controller's process group: it and the Ray it started (raylet, GCS, workers)
    runs, kills, counts = [tmp_path / "run0"], 0, [0]
    seen: list = []

    def evals_now(ledger):
        return sum(1 for r in scan_ledger(ledger).records if r["type"] == "eval") if ledger.exists() else 0

    cycles = 0
    while kills < 10:
        cycles += 1
        assert cycles < 200, f"no progress: {kills} kills, counts {counts}"  # a guard against looping forever
        run = runs[-1]
        ledger = run / LEDGER
        # killed before its config was written, a run directory holds nothing to resume: start it again
        proc = (cli("resume", run) if (run / "config.yaml").exists()
                else cli("search", cfg_path, "--run-dir", run))
        groups.append(proc.pid)
        # a seeded random moment: after 0-2 more evaluations (0: during start-up), then 0-1.5 s more
        target, deadline = counts[-1] + rng.choice([0, 1, 1, 2]), time.time() + 300
        while proc.poll() is None and evals_now(ledger) < target and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5) if target > counts[-1] else rng.uniform(0.5, 4.0))
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            kills += 1
        else:
            assert proc.returncode == 0, proc.stderr.read().decode()[-3000:]
        proc.stderr.close()
        records, _ = read_ledger(ledger) if ledger.exists() else ([], 0)  # raises on damage
        assert records[:len(seen)] == seen  # what was recorded stays recorded, unchanged
        seen = records
        counts.append(sum(1 for r in records if r["type"] == "eval"))
        if proc.returncode == 0:  # finished before the kill: check it, go on in a fresh run directory
            runs.append(tmp_path / f"run{len(runs)}")
            seen, counts = [], [*counts, 0]
    assert len(set(counts)) >= 4, counts  # the kills landed at many different points of the runs
    proc = (cli("resume", runs[-1]) if (runs[-1] / "config.yaml").exists()
            else cli("search", cfg_path, "--run-dir", runs[-1]))
    assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()[-2000:]
    for run in runs:
        got = _check_run(run, budget)
        assert not [p.name for p in run.iterdir() if p.name.startswith((".config", ".ledger"))]  # no temp left
        assert status(run)["best"]["validation"] is not None
        for i in range(budget):  # the candidates an uninterrupted search asks, with the same scores
            np.testing.assert_allclose(got[i]["x"], want[i]["x"], atol=1e-12)
            assert got[i]["fitness"] == want[i]["fitness"]
    deadline = time.time() + 30  # killed processes can linger as zombies until reaped (slower on a busy machine)
    while [g for g in groups if _group_alive(g)] and time.time() < deadline:
        time.sleep(0.5)
    assert not [g for g in groups if _group_alive(g)], "killed controllers left processes behind"


def test_worker_killed_mid_build_and_mid_score(micro_zoo, ray_local, tmp_path, monkeypatch):
    monkeypatch.setenv("EVOMERGE_TEST_FAULTS", "kill_build:1,kill_score:3")
    Controller(config(micro_zoo), tmp_path / "run", progress=False).run()
    ev = _check_run(tmp_path / "run", 8)
    for i in (1, 3):  # redone on a fresh worker, recorded once
        assert ev[i]["requeued"] == 1 and ev[i]["error"] is None
    assert all(ev[i]["requeued"] == 0 for i in (0, 2, 4, 5, 6, 7))


def _short_run(micro_zoo, tmp_path, budget=6):
    cfg = config(micro_zoo, optimizer={"budget": budget}, workers={"count": 1})
    Controller(cfg, tmp_path / "run", progress=False).run()
    return cfg


def test_damaged_checkpoint_goes_back_to_the_last_good_record(micro_zoo, ray_local, tmp_path, capsys):
    cfg = _short_run(micro_zoo, tmp_path)
    ledger = tmp_path / "run" / LEDGER
    first = {r["id"]: r for r in RunDir(tmp_path / "run").records() if r["type"] == "eval"}
    lines = ledger.read_bytes().split(b"\n")
    damaged = bytearray(lines[2])
    damaged[-5] ^= 0x01  # one flipped bit inside the third record
    original = ledger.read_bytes()
    ledger.write_bytes(b"\n".join([*lines[:2], bytes(damaged), *lines[3:]]))
    with pytest.raises(EvomergeError, match="line 3 fails its checksum"):
        read_ledger(ledger)
    assert len(RunDir(tmp_path / "run").records()) == 2  # read-only views show the good part, with a warning
    capsys.readouterr()
    Controller(cfg, tmp_path / "run", resume=True, progress=False).run()
    err = capsys.readouterr().err
    assert "damaged at line 3" in err and "redone" in err
    (aside,) = (tmp_path / "run").glob(f"{LEDGER}.damaged-*")
    assert aside.read_bytes() == b"\n".join([*lines[:2], bytes(damaged), *lines[3:]])  # kept as found
    assert original != aside.read_bytes()
    again = _check_run(tmp_path / "run", 6)
    for i, r in first.items():  # the evaluations set aside were asked again, identically
        assert again[i]["x"] == r["x"] and again[i]["fitness"] == r["fitness"]


def test_truncated_checkpoint_drops_the_torn_record_and_says_so(micro_zoo, ray_local, tmp_path, capsys):
    cfg = _short_run(micro_zoo, tmp_path)
    ledger = tmp_path / "run" / LEDGER
    data = ledger.read_bytes()
    ledger.write_bytes(data[:len(data) - 40])  # the newest record cut short
    assert scan_ledger(ledger).torn
    capsys.readouterr()
    Controller(cfg, tmp_path / "run", resume=True, progress=False).run()
    assert "cut short" in capsys.readouterr().err
    _check_run(tmp_path / "run", 6)


class _FullDisk:
    """A ledger file that takes `room` more bytes, writes part of the next line, then fails like a full disk."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, data):
        if len(data) > self.room:
            self.f.write(data[:max(0, self.room)])
            self.f.flush()
            self.room = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_full_disk_while_writing_a_checkpoint_keeps_the_previous_one(micro_zoo, ray_local, tmp_path, monkeypatch):
    cfg = config(micro_zoo, optimizer={"budget": 8}, workers={"count": 1})
    real_open = RunDir.open_ledger

    def tight(self):
        records = real_open(self)
        self._ledger = _FullDisk(self._ledger, room=2500)  # a few records fit, then the disk is full
        return records

    monkeypatch.setattr(RunDir, "open_ledger", tight)
    with pytest.raises(EvomergeError, match="disk is full") as e:
        Controller(cfg, tmp_path / "run", progress=False).run()
    assert "evomerge resume" in e.value.fix
    scan = scan_ledger(tmp_path / "run" / LEDGER)
    assert not scan.torn and scan.damaged_line is None and 0 < len(scan.records) < 8  # no partial line left
    kept = {r["id"]: r for r in scan.records if r["type"] == "eval"}
    monkeypatch.setattr(RunDir, "open_ledger", real_open)  # space freed
    Controller(cfg, tmp_path / "run", resume=True, progress=False).run()
    ev = _check_run(tmp_path / "run", 8)
    assert all(ev[i]["fitness"] == r["fitness"] for i, r in kept.items())


def test_full_disk_during_an_atomic_write_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "config.yaml"
    target.write_text("old: 1\n")

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(EvomergeError, match="disk is full"):
        write_atomic(target, yaml.safe_dump({"new": 2}) * 1000)
    assert target.read_text() == "old: 1\n" and [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


def test_run_directory_files_follow_the_umask(tmp_path):
    """write_atomic's temporary file is made 0600 by mkstemp; the file it becomes follows the umask (issue 29)."""
    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "config.yaml", "a: 1\n")
        assert (tmp_path / "config.yaml").stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        write_atomic(tmp_path / "x.yaml", "a: 1\n")
        assert (tmp_path / "x.yaml").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)
