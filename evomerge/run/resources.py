"""Resources for a search: what the cluster (or this machine) offers, and the memory a worker needs, checked against
each other by `evomerge check`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.run.config import SearchConfig

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def human_size(n: float) -> str:
    for unit, div in (("TiB", 2**40), ("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{int(n)} B"


def available_resources(address: str | None) -> dict[str, Any]:
    """CPUs, GPUs and memory: of the Ray cluster at `address`, else of this machine (what a local Ray gets)."""
    if address:
        import ray

        started = not ray.is_initialized()
        if started:
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False)
            except Exception as e:  # noqa: BLE001 - any failure to connect is the user's to fix
                raise EvomergeError(f"cannot reach the Ray cluster at '{address}' ({type(e).__name__}: "
                                    f"{str(e).splitlines()[0][:200] if str(e) else ''})",
                                    "start it (`ray start --head`), or leave --address out for a local run") from None
        try:
            nodes = [n for n in ray.nodes() if n.get("Alive")]
            res = [n.get("Resources", {}) for n in nodes]
            return {"where": f"Ray cluster at {address} ({len(nodes)} nodes)",
                    "cpus": sum(r.get("CPU", 0) for r in res), "gpus": sum(r.get("GPU", 0) for r in res),
                    "node_cpus": max((r.get("CPU", 0) for r in res), default=0),
                    "node_gpus": max((r.get("GPU", 0) for r in res), default=0),
                    "memory": int(max((r.get("memory", 0) for r in res), default=0)),
                    "memory_available": int(max((r.get("memory", 0) for r in res), default=0))}
        finally:
            if started:
                ray.shutdown()
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    gpus = 0
    try:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - no usable torch: no GPUs to offer
        gpus = 0
    total, avail = _meminfo()
    return {"where": "this machine (a local Ray)", "cpus": cpus, "gpus": gpus, "node_cpus": cpus, "node_gpus": gpus,
            "memory": total, "memory_available": avail}


def _meminfo() -> tuple[int, int]:
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
        info = {ln.split(":")[0]: int(ln.split()[1]) * 1024 for ln in lines
                if ln.split()[1:2] and ln.split()[1].isdigit()}
        return info.get("MemTotal", 0), info.get("MemAvailable", info.get("MemFree", 0))
    except OSError:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return total, total


def estimate_memory(cfg: SearchConfig, ref, source_bytes: int) -> dict[str, int]:
    """Bytes one worker needs, roughly: its resident model (the reference's parameters in workers.dtype), the
    sources it maps (the page cache shares them between the workers of a node), merge scratch (two float32
    copies of the largest tensor per merge thread) and scoring (a batch of 1,024-token rows: float32 logits
    and log-probabilities, and a layer's activations; for vLLM its KV cache)."""
    from evomerge.merge.vocab import text_config

    if ref is None:
        return {}
    c = text_config(ref.config)
    numel = {n: shape_numel(i.shape) for n, i in ref.tensors.items()}
    w = cfg.workers
    model = sum(numel.values()) * _DTYPE_BYTES[w.dtype]
    tokens = (w.batch_size if isinstance(w.batch_size, int) else 64) * 1024
    scoring = tokens * 4 * (2 * int(c.get("vocab_size") or 0) + 8 * int(c.get("hidden_size") or 0))
    if w.backend == "vllm":
        scoring = int((w.vllm.kv_cache_gb or 0.25) * GiB)
    scratch = 2 * 4 * max(numel.values(), default=0) * max(1, min(8, int(w.cpus) or 1))
    return {"resident model": model, "sources (memory-mapped, shared per node)": source_bytes,
            "scoring": scoring, "merge scratch": scratch, "total per worker": model + source_bytes + scoring + scratch}


def shape_numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n




GiB = 2**30
