"""From a recipe and its source headers to a per-tensor merge plan (no weights read).

`make_plan` checks that the sources fit together (architecture, layer count, vocabulary, tensor names,
shapes, dtypes) and resolves every parameter of every tensor with mergekit's precedence: the model's
setting in the slice, then the model's own, then the slice's, then the recipe's top level.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from evomerge.errors import EvomergeError, warn
from evomerge.merge.dataflow import source_layer_types
from evomerge.merge.methods import MergeMethod, get_method
from evomerge.merge.recipe import Recipe, SliceSpec
from evomerge.merge.settings import evaluate_setting, is_pre_layer, layer_index
from evomerge.merge.source_model import ST_DTYPES, SourceModel
from evomerge.merge.sources import open_source
from evomerge.merge.vocab import VocabMap, map_vocab, vocab_tensors

_LAYER_SPLIT = re.compile(r"^(.*?\blayers\.)(\d+)\.(.+)$")  # (prefix, layer, suffix) of a decoder layer's tensor
_CONFIG_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size",
                "num_attention_heads", "num_key_value_heads")


@dataclass(frozen=True)
class TensorJob:
    name: str
    shape: tuple[int, ...]
    inputs: tuple[str, ...]  # the models merged (the base is separate for methods that need one)
    tensor_params: tuple[dict[str, Any], ...]
    global_params: dict[str, Any]
    seeds: tuple[int, ...]
    reads: tuple[tuple[str, str], ...] = ()  # (model, source tensor) where a model's input is another layer

    def source_name(self, model: str) -> str:
        """The tensor of `model` this job reads."""
        for m, n in self.reads:
            if m == model:
                return n
        return self.name


@dataclass
class MergePlan:
    recipe: Recipe
    method: MergeMethod
    sources: dict[str, SourceModel]
    jobs: list[TensorJob]
    out_dtype: str  # torch dtype name
    reference: str  # the model whose config and tensor layout the output takes
    num_layers: int
    vocab: VocabMap | None = None  # set when the recipe names a tokenizer_source (evomerge.merge.vocab)
    layer_sources: tuple[int, ...] | None = None  # restacked slices: the reference's layer behind each output layer

    def output_config(self) -> dict[str, Any]:
        """The reference model's config with the output's dtype and, for restacked slices, its layer count
        and per-layer attention types."""
        config = json.loads(json.dumps(self.sources[self.reference].config))
        config["torch_dtype" if "torch_dtype" in config and "dtype" not in config else "dtype"] = self.out_dtype
        if self.layer_sources is not None:
            text = config.get("text_config", config)
            text["num_hidden_layers"] = len(self.layer_sources)
            types = source_layer_types(self.sources[self.reference].config)
            if types is not None:
                text["layer_types"] = [types[i] for i in self.layer_sources]
        return config

    @property
    def tokenizer_dir(self):
        """The directory whose tokenizer files the output carries."""
        if self.vocab is not None:
            return self.vocab.tokenizer_path
        return self.sources[self.recipe.tokenizer_model].path

    def close(self) -> None:
        for s in self.sources.values():
            s.close()
        if self.vocab is not None:
            self.vocab.close()


def tensor_seed(recipe_seed: int, model: str, tensor: str) -> int:
    """Seed of a random mask: fixed by the recipe's seed, the model and the tensor, and independent of
    the weights, so candidates of one search share their masks (common random numbers)."""
    h = hashlib.sha256(f"{recipe_seed}|{model}|{tensor}".encode()).digest()
    return int.from_bytes(h[:8], "little")


def open_sources(recipe: Recipe) -> dict[str, SourceModel]:
    return {name: open_source(name, spec.path) for name, spec in recipe.models.items()}


def check_compatible(sources: dict[str, SourceModel], reference: str, vocab_free: bool = False) -> None:
    """Raise EvomergeError naming the first mismatch between `reference` and the other sources.
    `vocab_free`: vocabulary sizes may differ (rows are mapped by token, evomerge.merge.vocab)."""
    ref = sources[reference]
    vocab_names = set(vocab_tensors(ref)) if vocab_free else set()
    rcfg = ref.config.get("text_config", ref.config)
    for name, src in sources.items():
        if name == reference:
            continue
        cfg = src.config.get("text_config", src.config)
        if ref.config.get("architectures") != src.config.get("architectures"):
            raise EvomergeError(
                f"models '{reference}' and '{name}' have different architectures "
                f"({ref.config.get('architectures')} vs {src.config.get('architectures')})",
                "merge models fine-tuned from the same base model",
            )
        for key in _CONFIG_KEYS:
            if vocab_free and key == "vocab_size":
                continue
            if rcfg.get(key) != cfg.get(key):
                fix = ("sources with added tokens: set tokenizer_source (base, union or a model name) to map "
                       "embedding rows by token"
                       if key == "vocab_size" else "merge models fine-tuned from the same base model")
                raise EvomergeError(
                    f"models '{reference}' and '{name}' differ in {key} ({rcfg.get(key)} vs {cfg.get(key)})", fix)
        missing = sorted(set(ref.tensors) - set(src.tensors))
        extra = sorted(set(src.tensors) - set(ref.tensors))
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"lacks {len(missing)} tensor(s) of '{reference}' (e.g. {missing[0]})")
            if extra:
                parts.append(f"has {len(extra)} tensor(s) '{reference}' lacks (e.g. {extra[0]})")
            raise EvomergeError(f"model '{name}' " + " and ".join(parts),
                                "all sources must have the same tensors (same architecture and tying of "
                                "embeddings); check that the files are complete")
        for tname, info in ref.tensors.items():
            other = src.tensors[tname]
            if tname in vocab_names and other.shape[1:] == info.shape[1:]:
                continue
            if other.shape != info.shape:
                raise EvomergeError(
                    f"tensor '{tname}' has shape {list(info.shape)} in '{reference}' but "
                    f"{list(other.shape)} in '{name}'", "merge models fine-tuned from the same base model")


def _ordered(names: list[str]) -> list[str]:
    def key(n: str) -> tuple[int, int, str]:
        i = layer_index(n)
        if i is None:
            return (0 if is_pre_layer(n) else 2, 0, n)
        return (1, i, n)

    return sorted(names, key=key)


def resolve_params(recipe: Recipe, method: MergeMethod, tensor: str, num_layers: int,
                   inputs: list[str], placed: tuple[SliceSpec, float] | None = None
                   ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Global and per-input parameters of one tensor (`placed`: its slice and position t in it, where the
    slices restack the layers)."""
    idx = layer_index(tensor)
    slices = recipe.slices
    slice_ = None
    if placed is not None:
        slice_, t = placed
    elif slices:
        if idx is None:
            slice_ = slices[0] if is_pre_layer(tensor) else slices[-1]
            t = 0.0
        else:
            for s in slices:
                if s.layer_range[0] <= idx < s.layer_range[1]:
                    slice_ = s
                    break
            if slice_ is None:
                raise EvomergeError(f"layer {idx} ({tensor}) is in no slice of the recipe",
                                    "make the slices cover every layer of the models")
            lo, hi = slice_.layer_range
            t = (idx - lo) / (hi - lo - 1) if hi - lo > 1 else 1.0
    else:
        t = 0.0 if idx is None else (idx / (num_layers - 1) if num_layers > 1 else 1.0)

    def lookup(name: str, model: str | None) -> Any:
        chain: list[dict[str, Any]] = []
        if model is not None:
            if slice_ is not None and model in slice_.models:
                chain.append(slice_.models[model])
            chain.append(recipe.models[model].parameters)
        if slice_ is not None:
            chain.append(slice_.parameters)
        chain.append(recipe.parameters)
        for block in chain:
            if name in block:
                v = evaluate_setting(block[name], tensor, t)
                if v is not None:
                    return v
        return None

    gp: dict[str, Any] = {}
    for p in method.global_params:
        v = lookup(p.name, None)
        if v is None:
            if p.required:
                raise EvomergeError(f"no value of '{p.name}' applies to tensor {tensor}",
                                    f"add a rule without a filter to parameters.{p.name}")
            v = p.default
        gp[p.name] = v
    tps: list[dict[str, Any]] = []
    for m in inputs:
        tp: dict[str, Any] = {}
        for p in method.tensor_params:
            v = lookup(p.name, m)
            if v is None:
                if p.required:
                    raise EvomergeError(f"no value of '{p.name}' for model '{m}' applies to tensor {tensor}",
                                        f"add a rule without a filter to models.{m}.parameters.{p.name}")
                v = p.default
            tp[p.name] = v
        if method.extra_check is not None:
            method.extra_check(tp, f"model '{m}', tensor {tensor}")
        tps.append(tp)
    return gp, tps


def make_plan(recipe: Recipe, sources: dict[str, SourceModel] | None = None) -> MergePlan:
    """Check the sources against each other and resolve every tensor's parameters."""
    recipe.validate_semantics()
    method = get_method(recipe.method)
    sources = sources if sources is not None else open_sources(recipe)
    reference = recipe.base if recipe.base is not None else next(iter(recipe.models))
    check_compatible(sources, reference, vocab_free=recipe.tokenizer_source is not None)
    vocab = None
    if recipe.tokenizer_source is not None:
        sources, vocab = map_vocab(sources, recipe.tokenizer_source, reference, recipe.base)
    ref = sources[reference]
    num_layers = ref.num_layers or 1
    inputs = recipe.non_base if method.uses_base(recipe.base) else list(recipe.models)
    restack = _restacked(recipe, num_layers)
    jobs = []
    layer_sources = None
    if restack is None:
        for name in _ordered(list(ref.tensors)):
            gp, tps = resolve_params(recipe, method, name, num_layers, inputs)
            seeds = tuple(tensor_seed(recipe.seed, m, name) for m in inputs) if method.random else ()
            jobs.append(TensorJob(name, ref.tensors[name].shape, tuple(inputs), tuple(tps), gp, seeds))
    else:
        jobs, layer_sources = _restacked_jobs(recipe, method, sources, reference, restack, inputs)
    num_layers = len(layer_sources) if layer_sources is not None else num_layers
    out_dtype = recipe.out_dtype or recipe.dtype or ST_DTYPES[ref.tensors[jobs[0].name].dtype][0]
    return MergePlan(recipe, method, sources, jobs, out_dtype, reference, num_layers, vocab, layer_sources)


def _restacked(recipe: Recipe, num_layers: int) -> list[tuple[SliceSpec, int]] | None:
    """(slice, position in it) for every output layer, where the slices do not simply tile the models'
    layers [0, num_layers) with the same range from every model; None where they do."""
    slices = recipe.slices or ()
    if not slices:
        return None
    tiles = slices[0].layer_range[0] == 0 and slices[-1].layer_range[1] == num_layers and all(
        a.layer_range[1] == b.layer_range[0] for a, b in zip(slices, slices[1:], strict=False))
    if tiles and not any(sl.ranges for sl in slices):
        return None
    for i, sl in enumerate(slices):
        for m in recipe.models:
            a, b = sl.range_of(m)
            if b > num_layers:
                raise EvomergeError(f"recipe: slices[{i}] takes layers [{a}, {b}) of model '{m}', which has "
                                    f"{num_layers} layers", f"keep every layer_range within [0, {num_layers}]")
    out = [(sl, i) for sl in slices for i in range(sl.layer_range[1] - sl.layer_range[0])]
    if len(out) != num_layers:
        warn(f"the recipe's slices stack {len(out)} layers; the models have {num_layers}: the output has "
             f"{len(out)} (as mergekit builds it)")
    return out


def _restacked_jobs(recipe: Recipe, method: MergeMethod, sources: dict[str, SourceModel], reference: str,
                    restack: list[tuple[SliceSpec, int]], inputs: list[str]
                    ) -> tuple[list[TensorJob], tuple[int, ...]]:
    """The jobs of a restacked merge: output layer j of slice s, position i, merges layer start_m + i of
    every model m (mergekit's slices); embeddings take the first slice's parameters, the final norm and
    head the last's. Random masks are seeded by the output tensor's name."""
    ref = sources[reference]
    by_layer: dict[int, list[tuple[str, str]]] = {}
    other = []
    for name in ref.tensors:
        m = _LAYER_SPLIT.match(name)
        if m and layer_index(name) is not None:
            by_layer.setdefault(int(m.group(2)), []).append((m.group(1), m.group(3)))
        else:
            other.append(name)
    involved = list(dict.fromkeys(inputs + ([recipe.base] if method.uses_base(recipe.base) else [])))
    num = len(restack)

    def job(out_name: str, src_names: dict[str, str], placed: tuple[SliceSpec, float]) -> TensorJob:
        gp, tps = resolve_params(recipe, method, out_name, num, inputs, placed)
        seeds = tuple(tensor_seed(recipe.seed, m, out_name) for m in inputs) if method.random else ()
        reads = tuple((m, n) for m, n in src_names.items() if n != out_name)
        shape = ref.tensors[src_names.get(reference, next(iter(src_names.values())))].shape
        return TensorJob(out_name, shape, tuple(inputs), tuple(tps), gp, seeds, reads)

    pre = [n for n in other if is_pre_layer(n)]
    post = [n for n in other if not is_pre_layer(n)]
    slices = recipe.slices or ()
    jobs = [job(n, {m: n for m in involved}, (slices[0], 0.0)) for n in pre]
    layer_sources = []
    for j, (sl, i) in enumerate(restack):
        n_in = sl.layer_range[1] - sl.layer_range[0]
        t = i / (n_in - 1) if n_in > 1 else 1.0
        src_layer = {m: sl.range_of(m)[0] + i for m in involved}
        layer_sources.append(sl.range_of(reference)[0] + i)
        for prefix, suffix in sorted(by_layer.get(layer_sources[-1], ())):
            names = {m: f"{prefix}{src_layer[m]}.{suffix}" for m in involved}
            jobs.append(job(f"{prefix}{j}.{suffix}", names, (sl, t)))
    jobs += [job(n, {m: n for m in involved}, (slices[-1], 0.0)) for n in post]
    return jobs, tuple(layer_sources)
