"""Execute a merge plan tensor by tensor: into a resident model's parameters (in place) or a stream.

Sources are memory-mapped; each output tensor is computed from the matching source tensors and written
straight into its destination, so a build allocates only a few tensor-sized temporaries.

On CPU, tensors are merged by a few threads in parallel, each running torch single-threaded: the methods
work in cache-sized blocks, where torch's own intra-op threads cost more in synchronisation than they
gain (badly so on a machine shared with other work).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

import torch

from evomerge.errors import EvomergeError
from evomerge.merge.methods import merge_tensor
from evomerge.merge.plan import MergePlan, TensorJob
from evomerge.merge.source_model import ResidentSource, SourceModel

T = TypeVar("T")
R = TypeVar("R")


def default_threads(device: torch.device | str = "cpu") -> int:
    """Threads for a CPU build: EVOMERGE_THREADS, else the cores this process may use (at most 8)."""
    if torch.device(device).type != "cpu":
        return 1
    env = os.environ.get("EVOMERGE_THREADS")
    if env:
        return max(1, int(env))
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


@contextmanager
def _torch_threads(n: int):
    old = torch.get_num_threads()
    if n != old:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != old:
            torch.set_num_threads(old)


def ordered_map(fn: Callable[[T], R], items: Iterable[T], threads: int) -> Iterator[R]:
    """fn over items on `threads` threads, results in input order, at most 2 x threads in flight."""
    if threads <= 1:
        for x in items:
            yield fn(x)
        return
    with _torch_threads(1), ThreadPoolExecutor(threads, thread_name_prefix="evomerge-merge") as ex:
        it = iter(items)
        pending: deque[Any] = deque(ex.submit(fn, x) for _, x in zip(range(2 * threads), it, strict=False))
        try:
            while pending:
                res = pending.popleft().result()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append(ex.submit(fn, nxt))
                yield res
        finally:
            # Stopped early (a failure here or in the consumer, which then closes this generator): cancel what
            # has not started; leaving the `with` waits for what is running, so no merge thread still reads the
            # sources' memory maps when the caller closes them (reading an unmapped file is a segfault).
            for f in pending:
                f.cancel()



def merge_job(plan: MergePlan, job: TensorJob, out: torch.Tensor | None = None,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """The merged tensor for one job (float32; written into `out` when the method can)."""
    method = plan.method
    dev = torch.device(device)

    def load(model: str) -> torch.Tensor:
        t = plan.sources[model].get(job.source_name(model))
        return t if dev.type == "cpu" else t.to(dev, non_blocking=True)

    uses_base = method.uses_base(plan.recipe.base)
    base = load(plan.recipe.base) if uses_base else None
    tensors = [load(m) for m in job.inputs]
    direct = out if out is not None and out.dtype == torch.float32 and out.device == dev else None
    stats = _source_stats(plan, job, [plan.recipe.base, *job.inputs] if uses_base else list(job.inputs), dev)
    return merge_tensor(method, base, tensors, list(job.tensor_params), job.global_params, list(job.seeds),
                        out=direct, stats=stats)


def _source_stats(plan: MergePlan, job: TensorJob, roles: list[str], dev: torch.device) -> dict | None:
    """The dict in which a `source_stats` method keeps this tensor's statistics between builds: held by the
    first source (so it lives as long as the open sources: a search worker's), keyed by the method, the
    device and every source file and tensor read in its role. None (computed afresh) for other methods and
    for sources whose tensors are derived per plan (vocabulary-mapped, LoRA)."""
    if not plan.method.source_stats:
        return None
    srcs = [plan.sources[m] for m in roles]
    if not srcs or any(type(s) not in (SourceModel, ResidentSource) for s in srcs):
        return None
    key = (plan.method.name, str(dev), tuple((str(s.path), s.ref, job.source_name(m))
                                             for s, m in zip(srcs, roles, strict=True)))
    return srcs[0].stats.setdefault(key, {})


def iter_merged(plan: MergePlan, device: torch.device | str = "cpu",
                threads: int | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, merged float32 tensor) for every output tensor, in plan order."""
    n = default_threads(device) if threads is None else threads
    yield from ordered_map(lambda job: (job.name, merge_job(plan, job, device=device)), plan.jobs, n)


def build_into(plan: MergePlan, params: Mapping[str, torch.Tensor],
               progress: Callable[[int, int], None] | None = None, threads: int | None = None) -> None:
    """Write the merged weights into existing tensors (a resident model's parameters) in place."""
    missing = [j.name for j in plan.jobs if j.name not in params]
    if missing:
        raise EvomergeError(f"the resident model has no parameter '{missing[0]}' ({len(missing)} missing)",
                            "build the resident model from the same architecture as the sources")
    for job in plan.jobs:
        dest = params[job.name]
        if tuple(dest.shape) != job.shape:
            raise EvomergeError(f"resident parameter '{job.name}' has shape {list(dest.shape)}, "
                                f"the sources {list(job.shape)}", "use a resident model of the same config")

    def one(job: TensorJob) -> None:
        dest = params[job.name]
        with torch.no_grad():
            res = merge_job(plan, job, out=dest, device=dest.device)
            if res is not dest:
                dest.copy_(res)

    device = next(iter(params.values())).device if params else "cpu"
    n = default_threads(device) if threads is None else threads
    for i, _ in enumerate(ordered_map(one, plan.jobs, n)):
        if progress:
            progress(i + 1, len(plan.jobs))
