"""Data-flow (layer-path) candidates in one vLLM engine (issue 32).

    backend = VllmPathBackend(models, head="a", slots=T, dtype="float32")
    backend.load(path_recipe)     # any path of <= T hops: only the slots that changed are reloaded
    scorer.score_lm(backend.lm)

An engine has a fixed number of layers, and a path's length changes from candidate to candidate. The engine
is built once, from model A's config with T layers (`hf_overrides`, no weights read: `load_format: dummy`),
where T is the longest path the search space can ask for (its slot count, or `dataflow.max_hops`). A path of
n <= T hops fills slots 0..n-1 with its hops' layers; every slot after it is an identity: its attention
o_proj and MLP down_proj are zero (biases too), so both branches add nothing and the residual stream passes
through unchanged (the other tensors of the slot stay finite: model A's layer 0). A hop's input scale folds
into its o_proj and down_proj exactly as the data-flow export does (evomerge/merge/dataflow.py: the stream is
divided by the running product P_k of the scales; pre-norm branches do not see the scale). That identity
holds up to the norms' eps only: the path model's norms see P_k times the folded stream. So each hop's two
norms get eps / P_k^2 (the final norm eps / P^2 of the last hop), a number set on the engine's norm modules
per candidate (the engine runs eagerly, so no compiled graph freezes it), and the engine computes the hf
backend's path model exactly: its scores agree per item (tests/test_vllm_dfs.py; SmolLM2 paths in
results/backends.md). An exported path keeps one eps per model and differs from both where P drifts far from
1 (the same gap the hf backend's scores have to the export; measured in results/backends.md).

Loading runs inside vLLM's worker (`PathExtension`, part of workers/vllm_ext.py's extension class):
each slot remembers what it holds (model, layer, fold factor, or identity), and only slots whose content
changed are streamed through the worker's own `reload_weights` (vLLM reloads layer by layer and keeps the
processed weights of layers it is not given); embeddings, final norm and head are model A's, loaded once.

Refused, with the reason (`check_engine_paths`): architectures whose branches do not end in a linear map
(Gemma2's post-norms: no zero-output identity by weights alone, and its layers alternate attention kinds),
and sources whose per-layer attention types differ (sliding vs full attention by layer index: an engine's
slot k has one attention type, a path may put any layer there). Llama, Mistral, Qwen2 and Qwen3 with one
attention type in every layer are supported.
"""

from __future__ import annotations

import json
import time
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.merge.dataflow import (
    ARCH_FOLD,
    FOLD_LINEAR,
    PathRecipe,
    check_path,
    fold,
    head_tensors,
    layer_tensors,
    source_layer_types,
)
from evomerge.merge.source_model import SourceModel
from evomerge.merge.sources import model_key
from workers.vllm_backend import EXTENSION, VllmBackend


def check_engine_paths(sources: dict[str, SourceModel], head: str) -> list[str] | None:
    """Refuse what one fixed engine cannot run for every path (see the module docstring); the attention
    types of the engine's layers (None when the config has none)."""
    cfg = sources[head].config.get("text_config", sources[head].config)
    arch = cfg.get("model_type", "?")
    kind = ARCH_FOLD.get(arch)
    if kind is None:
        raise EvomergeError(f"data-flow search on vLLM: model '{head}' is '{arch}', which data-flow merges do not "
                            "support", f"use one of {', '.join(sorted(ARCH_FOLD))}")
    if kind != "linear":
        raise EvomergeError(f"data-flow search on vLLM: '{arch}' layers end their branches in a norm (post-norms), so "
                            "an unused engine layer cannot be made an identity by zeroing its output projections, "
                            "and its layers alternate attention kinds", "use workers.backend: hf for this search")
    seen: dict[str, set[str]] = {}
    for name, src in sources.items():
        types = source_layer_types(src.config)
        for t in set(types or ["full_attention"]):
            seen.setdefault(t, set()).add(name)
    if len(seen) > 1:
        where = "; ".join(f"{t} in {', '.join(sorted(ns))}" for t, ns in sorted(seen.items()))
        raise EvomergeError(f"data-flow search on vLLM: the layers' attention types differ by layer ({where}): an "
                            "engine's layer has one attention type, and a path can put any layer in it",
                            "use workers.backend: hf for this search (its path model gives each hop its own type)")
    types = source_layer_types(sources[head].config)
    return list(types) if types is not None else None


def identity_path(head: str, path: str, layers: int) -> PathRecipe:
    """Model A itself as a path (its own layers in order): the x0 of a data-flow space."""
    from evomerge.merge.dataflow import Hop
    from evomerge.merge.recipe import ModelSpec

    return PathRecipe(head=head, models={head: ModelSpec(path=path)},
                      path=tuple(Hop(model=head, layer=i) for i in range(layers)))


class VllmPathBackend(VllmBackend):
    """The vllm backend for data-flow candidates: an engine of `slots` layers over model A's head."""

    def __init__(self, models: dict[str, str], head: str, slots: int, **kw: Any):
        from evomerge.merge.sources import open_source

        opened = {n: open_source(n, p) for n, p in models.items()}
        try:
            types = check_engine_paths(opened, head)
            n_head = opened[head].num_layers or 0
        finally:
            for s in opened.values():
                s.close()
        if slots < 1:
            raise EvomergeError(f"a data-flow engine needs at least one layer, got {slots}", "check dataflow.max_hops")
        overrides: dict[str, Any] = {"num_hidden_layers": slots}
        if types is not None:
            overrides["layer_types"] = [types[0]] * slots
        args = dict(kw.pop("engine_args", None) or {})
        args.update(load_format="dummy", hf_overrides=overrides)
        kw["enforce_eager"] = True  # per-path norm epsilons (PathExtension._evomerge_set_eps) need eager execution
        super().__init__(models, base=head, engine_args=args, extension=EXTENSION, **kw)
        self.head, self.slots = head, slots
        info = self.llm.collective_rpc("evomerge_path_setup", args=(json.dumps({"head": head, "slots": slots}),))
        self.placement = {**self.placement, **info[0]}
        self.load(identity_path(head, models[head], n_head))  # the engine starts as model A itself
        self.loads = 0

    def load(self, recipe) -> dict[str, Any]:
        if getattr(recipe, "method", None) != "dataflow":
            raise EvomergeError("this worker's vLLM engine runs data-flow paths only",
                                "a search has one kind of candidate per stage")
        if recipe.head != self.head:
            raise EvomergeError(f"the path's model A is '{recipe.head}', the engine was built for '{self.head}'",
                                "model A is fixed for a data-flow search")
        for name, spec in recipe.models.items():
            if self.models.get(name) != model_key(spec.path):
                raise EvomergeError(f"candidate names model '{name}' at {spec.path}, which this engine did not load",
                                    f"the engine holds: {', '.join(f'{n}={p}' for n, p in self.models.items())}")
        if len(recipe.path) > self.slots:
            raise EvomergeError(f"the path has {len(recipe.path)} hops, the engine {self.slots} layers",
                                "raise dataflow.max_hops (the engine is built with that many layers)")
        stats = self.llm.collective_rpc("evomerge_path_load", args=(json.dumps(recipe.to_dict()),))
        self.llm.reset_prefix_cache()
        self.loads += 1
        bad = sorted({n for s in stats for n in s["nonfinite"]})
        if bad:
            raise FloatingPointError(f"the path's weights of {bad[0]} are not finite ({len(bad)} tensors)")
        return {"t_load": max(s["t_load"] for s in stats), "tensors": stats[0]["tensors"],
                "slots_loaded": stats[0]["slots_loaded"]}


class PathExtension:
    """Runs inside vLLM's worker: fills the engine's layer slots with path hops or identities. A part of
    workers.vllm_ext.EvomergeWorkerExtension (vLLM adds an extension class to its Worker class for the life
    of the process, so one process can only ever use one extension class: it has the methods of both
    backends)."""

    def _evomerge_refresh_tied(self) -> bool:
        """With tied embeddings, vLLM's LM head shares the embedding's weight but is never given a weight of
        its own (its checkpoint name is skipped), so a reload leaves it unprocessed: on CPU it keeps the
        weights it prepacked at the previous load (the dummy or the previous model's embeddings). Re-run its
        processing from the shared, reloaded weight. (A no-op on GPU, where the head reads the weight itself.)"""
        model = self.get_model()
        head = getattr(model, "lm_head", None)
        embed = getattr(getattr(model, "model", None), "embed_tokens", None)
        w, e = getattr(head, "weight", None), getattr(embed, "weight", None)
        if w is None or e is None or w.data_ptr() != e.data_ptr():
            return False
        method = getattr(head, "quant_method", None)
        if method is not None:
            method.process_weights_after_loading(head)
        return True

    def evomerge_path_setup(self, payload: str) -> dict[str, Any]:
        spec = json.loads(payload)
        self._evomerge_head = spec["head"]
        self._evomerge_slots = [None] * int(spec["slots"])  # what each slot holds now (None: dummy weights)
        self._evomerge_head_loaded = False
        model = self.get_model()
        layers = list(getattr(getattr(model, "model", None), "layers", []))
        norms = [(getattr(m, "input_layernorm", None), getattr(m, "post_attention_layernorm", None)) for m in layers]
        final = getattr(getattr(model, "model", None), "norm", None)
        if len(layers) != len(self._evomerge_slots) or final is None or any(
                not hasattr(n, "variance_epsilon") for pair in norms for n in pair):
            raise ValueError(f"{type(model).__name__}: the engine's layers and norms are not where a Llama-family "
                             "model has them (model.layers[k].input_layernorm, .post_attention_layernorm, model.norm)")
        self._evomerge_norms, self._evomerge_final_norm = norms, final
        self._evomerge_eps = float(final.variance_epsilon)
        return {"slots": len(self._evomerge_slots), "rms_norm_eps": self._evomerge_eps}

    def _evomerge_set_eps(self, cumulative: list[float]) -> None:
        """The path model scales hop k's input by s_k, so its norms see P_k * g where the engine's stream is g
        (the folded stream, divided by the running product P_k): rms(P*g) with eps equals rms(g) with eps / P^2.
        Setting that epsilon on hop k's two norms (and eps / P_last^2 on the final norm) makes the engine compute
        the path model's function exactly, not only up to the norms' eps. The engine runs eagerly (no compiled
        graph freezes these numbers); an exported path keeps one eps per model, so it differs from both by
        that eps effect when the scales' product drifts far from 1 (results/backends.md)."""
        eps = self._evomerge_eps
        for k, (pre, post) in enumerate(self._evomerge_norms):
            p = cumulative[k] if k < len(cumulative) else 1.0
            pre.variance_epsilon = post.variance_epsilon = eps / (p * p)
        last = cumulative[-1] if cumulative else 1.0
        self._evomerge_final_norm.variance_epsilon = eps / (last * last)

    def _evomerge_weights(self, recipe: PathRecipe, bad: list[str], counts: dict[str, int]):
        import torch

        sources = self._evomerge_sources
        kind = check_path(recipe, {n: sources[n] for n in recipe.models})
        device = torch.device(getattr(self, "device", "cpu"))
        dtype = self._evomerge_dtype
        head = sources[recipe.head]

        def out(name: str, t):
            counts["tensors"] += 1
            return name, t.to(device=device, dtype=dtype)

        if not self._evomerge_head_loaded:
            for name in head_tensors(head):
                yield out(name, head.get(name))
        want = []
        for hop, p in zip(recipe.path, recipe.cumulative_scales(), strict=True):
            want.append((hop.model, hop.layer, 1.0 / p))
        want += [("identity",)] * (len(self._evomerge_slots) - len(want))
        for k, content in enumerate(want):
            if self._evomerge_slots[k] == content:
                continue
            counts["slots"] += 1
            if content[0] == "identity" and len(content) == 1:
                for suffix, tname in layer_tensors(head, 0).items():
                    t = head.get(tname)
                    yield out(f"model.layers.{k}.{suffix}", torch.zeros_like(t) if suffix in FOLD_LINEAR else t)
            else:
                model, layer, factor = content
                src = sources[model]
                for suffix, tname in layer_tensors(src, layer).items():
                    t = src.get(tname)
                    if factor != 1.0 and suffix in FOLD_LINEAR:
                        t = fold(t.to(device=device, dtype=torch.float32), suffix, factor, kind)
                        if not bool(torch.isfinite(t).all()):
                            bad.append(f"model.layers.{k}.{suffix}")
                    yield out(f"model.layers.{k}.{suffix}", t)
        self._evomerge_next = want

    def evomerge_path_load(self, recipe_json: str) -> dict[str, Any]:
        """Load a path (recipe as JSON) into the engine's slots; returns timings."""
        import logging

        import torch

        from evomerge.merge.dataflow import parse_path_recipe

        t0 = time.perf_counter()
        recipe = parse_path_recipe(json.loads(recipe_json), "candidate")
        unknown = [n for n in recipe.models if n not in self._evomerge_sources]
        if unknown:
            raise ValueError(f"the path names model(s) {unknown} this engine did not open")
        bad: list[str] = []
        counts = {"tensors": 0, "slots": 0}
        # vLLM warns about every layer a reload leaves as it was: here that is the point
        quiet = [logging.getLogger(f"vllm.model_executor.model_loader.reload.{m}") for m in ("layerwise", "inplace")]
        levels = [q.level for q in quiet]
        for q in quiet:
            q.setLevel(logging.ERROR)
        try:
            with torch.no_grad():
                self.reload_weights(weights_iterator=self._evomerge_weights(recipe, bad, counts))
                if not self._evomerge_head_loaded:
                    self._evomerge_refresh_tied()
        except BaseException:
            self._evomerge_slots = [None] * len(self._evomerge_slots)  # unknown state: reload all next time
            self._evomerge_head_loaded = False
            raise
        finally:
            for q, level in zip(quiet, levels, strict=True):
                q.setLevel(level)
        self._evomerge_slots = list(self._evomerge_next)
        self._evomerge_head_loaded = True
        self._evomerge_set_eps(recipe.cumulative_scales())
        if getattr(self, "device", None) is not None and torch.device(self.device).type == "cuda":
            torch.cuda.synchronize(self.device)
        return {"t_load": time.perf_counter() - t0, "tensors": counts["tensors"], "slots_loaded": counts["slots"],
                "nonfinite": bad}
