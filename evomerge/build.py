"""Execute a merge plan tensor by tensor: into a resident model's parameters (in place) or a stream.

Sources are memory-mapped; each output tensor is computed from the matching source tensors and written
straight into its destination, so a build allocates only a few tensor-sized temporaries.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch

from evomerge.errors import EvomergeError
from evomerge.methods import merge_tensor
from evomerge.plan import MergePlan, TensorJob


def merge_job(plan: MergePlan, job: TensorJob, out: torch.Tensor | None = None,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """The merged tensor for one job (float32; written into `out` when the method can)."""
    method = plan.method
    dev = torch.device(device)

    def load(model: str) -> torch.Tensor:
        t = plan.sources[model].get(job.name)
        return t if dev.type == "cpu" else t.to(dev, non_blocking=True)

    base = load(plan.recipe.base) if method.needs_base else None
    tensors = [load(m) for m in job.inputs]
    direct = out if out is not None and out.dtype == torch.float32 and out.device == dev else None
    return merge_tensor(method, base, tensors, list(job.tensor_params), job.global_params, list(job.seeds),
                        out=direct)


def iter_merged(plan: MergePlan, device: torch.device | str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """(name, merged float32 tensor) for every output tensor, in plan order."""
    for job in plan.jobs:
        yield job.name, merge_job(plan, job, device=device)


def build_into(plan: MergePlan, params: Mapping[str, torch.Tensor],
               progress: Callable[[int, int], None] | None = None) -> None:
    """Write the merged weights into existing tensors (a resident model's parameters) in place."""
    missing = [j.name for j in plan.jobs if j.name not in params]
    if missing:
        raise EvomergeError(f"the resident model has no parameter '{missing[0]}' ({len(missing)} missing)",
                            "build the resident model from the same architecture as the sources")
    with torch.no_grad():
        for i, job in enumerate(plan.jobs):
            dest = params[job.name]
            if tuple(dest.shape) != job.shape:
                raise EvomergeError(f"resident parameter '{job.name}' has shape {list(dest.shape)}, "
                                    f"the sources {list(job.shape)}", "use a resident model of the same config")
            res = merge_job(plan, job, out=dest, device=dest.device)
            if res is not dest:
                dest.copy_(res)
            if progress:
                progress(i + 1, len(plan.jobs))
