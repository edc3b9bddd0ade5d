"""Data-flow candidates in memory: a model that runs a layer path over the worker's resident source models.

    builder = PathBuilder(device="cpu", dtype="float32")
    model = builder.build(path_recipe)      # an ordinary transformers CausalLM of len(path) layers

The source models are loaded once (transformers, safetensors only). A candidate's model is a skeleton of
model A's class with len(path) layers, built on the meta device, whose parameters and buffers are then
pointed at the sources' own tensors: hop k's layer shares every parameter of its source layer, and A's
embeddings, final norm and head are A's. Nothing is copied, so a candidate costs milliseconds and no
memory. Each hop is its own module (its own layer index for the KV cache, its own attention type), and its
input scale is applied by a forward pre-hook: exactly the path semantics (the exported model folds the
scales into weights instead; tests check that both give the same logits).
"""

from __future__ import annotations

from typing import Any

from evomerge.merge.dataflow import LAYER_RE, PathRecipe, check_path
from evomerge.merge.source_model import SourceModel
from evomerge.merge.sources import local_model_dir, model_key, open_source


class PathBuilder:
    def __init__(self, device: str = "cpu", dtype: str = "float32", trust_remote_code: bool = False):
        self.device, self.dtype, self.trust = device, dtype, trust_remote_code
        self.models: dict[str, Any] = {}
        self.sources: dict[str, SourceModel] = {}
        self.builds = 0

    def _source(self, name: str, path: str) -> SourceModel:
        key = model_key(path)
        if key not in self.sources:
            self.sources[key] = open_source(name, path)
        return self.sources[key]

    def _model(self, name: str, path: str):
        import torch
        from transformers import AutoModelForCausalLM

        key = model_key(path)
        if key not in self.models:
            m = AutoModelForCausalLM.from_pretrained(local_model_dir(name, path), dtype=getattr(torch, self.dtype),
                                                     trust_remote_code=self.trust, use_safetensors=True)
            self.models[key] = m.to(self.device).eval()
        return self.models[key]

    def build(self, recipe: PathRecipe):
        import copy

        import torch
        from transformers import AutoModelForCausalLM

        sources = {n: self._source(n, s.path) for n, s in recipe.models.items()}
        check_path(recipe, sources)
        models = {n: self._model(n, s.path) for n, s in recipe.models.items()}
        a = models[recipe.head]
        cfg = copy.deepcopy(a.config)
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        text.num_hidden_layers = len(recipe.path)
        types = {n: getattr(m.config.get_text_config() if hasattr(m.config, "get_text_config") else m.config,
                            "layer_types", None) for n, m in models.items()}
        if any(isinstance(t, (list, tuple)) for t in types.values()):
            text.layer_types = [types[h.model][h.layer] for h in recipe.path]
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, self.dtype),
                                                     trust_remote_code=self.trust)
        src_params = {n: dict(m.named_parameters(remove_duplicate=False)) for n, m in models.items()}
        src_buffers = {n: dict(m.named_buffers(remove_duplicate=False)) for n, m in models.items()}

        def source_of(name: str, table: dict[str, dict[str, Any]]):
            m = LAYER_RE.match(name)
            if m is None:  # embeddings from model A; final norm and head from the tail model when there is one
                return table[recipe.head if "embed" in name else (recipe.tail or recipe.head)][name]
            hop = recipe.path[int(m.group(2))]
            return table[hop.model][f"{m.group(1)}{hop.layer}.{m.group(3)}"]

        for name, _ in list(model.named_parameters(remove_duplicate=False)):
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner)._parameters[leaf] = source_of(name, src_params)
        for name, _ in list(model.named_buffers(remove_duplicate=False)):
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner)._buffers[leaf] = source_of(name, src_buffers)
        for k, hop in enumerate(recipe.path):
            if hop.scale != 1.0:
                model.model.layers[k].register_forward_pre_hook(_scale_input(hop.scale), with_kwargs=True)
        model.eval()
        self.builds += 1
        return model

    def close(self) -> None:
        for s in self.sources.values():
            s.close()
        self.models.clear()


def _scale_input(s: float):
    def hook(module, args, kwargs):
        if args:
            return (args[0] * s, *args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = kwargs["hidden_states"] * s
        return args, kwargs

    return hook
