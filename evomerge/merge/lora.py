"""PEFT LoRA adapters as merge sources: a base model plus a low-rank task vector, never materialised on disk.

An adapter directory (`adapter_config.json` + `adapter_model.safetensors`, as PEFT's `save_pretrained`
writes it) is accepted wherever a model directory is. It reads as the base model's tensors with
`W + scale * B @ A` on the modules the adapter targets (transposed for `fan_in_fan_out` layers and for
embeddings), computed per tensor when the tensor is asked for: the same numbers PEFT's `merge_and_unload`
writes, with `scale = lora_alpha / r` (`/ sqrt(r)` with `use_rslora`; `alpha_pattern` per module; r read
from the tensors, so `rank_pattern` needs no special case). Modules the adapter saves whole
(`modules_to_save`, saved embedding layers, biases trained with `bias: all | lora_only`) replace the base's
(a saved `base_layer` is the weight the LoRA update then applies to).

The base is found, in this order: `BASE+ADAPTER` (mergekit's syntax, e.g. `models/base+adapters/math`);
the adapter's `base_model_name_or_path` when it is a local directory (absolute, or relative to the
adapter); the same name as a hub model in the Hugging Face cache.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.merge.source_model import SourceModel, read_header

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_UNSUPPORTED = {  # adapter_config.json keys whose non-empty value changes the merged weights in ways not handled
    "use_dora": "DoRA adapters", "layer_replication": "layer replication", "target_parameters": "LoRA on "
    "parameters (target_parameters)", "trainable_token_indices": "trainable token indices",
    "use_qalora": "QA-LoRA", "use_bdlora": "block-diagonal LoRA"}


def is_adapter_dir(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file()


@dataclass(frozen=True)
class LoraDelta:
    """How one base tensor changes: W + scale * (B @ A), transposed when `transpose` (fan_in_fan_out, embeddings)."""

    a: str  # adapter tensor names
    b: str
    scale: float
    transpose: bool
    bias: bool = False  # the tensor is a bias changed by lora_B.bias * scale


@dataclass
class AdapterSource(SourceModel):
    """A base model seen through a LoRA adapter: same config, tensor names and shapes as the base."""

    base: SourceModel | None = None
    adapter_path: Path | None = None
    adapter_config: dict[str, Any] = field(default_factory=dict)
    weights: SourceModel | None = None  # the adapter's own safetensors (its tensors under PEFT's names)
    deltas: dict[str, LoraDelta] = field(default_factory=dict)
    replaced: dict[str, str] = field(default_factory=dict)  # base tensor -> adapter tensor saved whole

    def get(self, tensor_name: str):
        """The merged tensor (float32, a new tensor) for targeted modules; the base's view for the rest."""
        saved = self.replaced.get(tensor_name)  # saved whole (e.g. a resized embedding's base layer)
        t = self.weights.get(saved) if saved is not None else self.base.get(tensor_name)
        d = self.deltas.get(tensor_name)
        if d is None:
            return t
        b = self.weights.get(d.b).float()
        if d.bias:
            return t.float() + b * d.scale
        a = self.weights.get(d.a).float()
        delta = b @ a
        if d.transpose:
            delta = delta.T
        delta = delta * d.scale
        return t.float() + delta

    def release(self, tensor_name: str) -> None:
        self.base.release(tensor_name)

    def advise_willneed(self) -> None:
        self.base.advise_willneed()

    def close(self) -> None:
        self.base.close()
        self.weights.close()


def _pattern_key(keys: list[str], module: str) -> str | None:
    """PEFT's get_pattern_key: the first pattern that matches the module name's tail."""
    for k in keys:
        if re.match(rf"(.*\.)?({k})$", module):
            return k
    return None


def read_adapter_config(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((path / ADAPTER_CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise EvomergeError(f"adapter '{path}': {ADAPTER_CONFIG} is not readable JSON ({e})",
                            "re-save the adapter with PEFT's save_pretrained") from None
    if not isinstance(cfg, dict):
        raise EvomergeError(f"adapter '{path}': {ADAPTER_CONFIG} is not a JSON object", "re-save the adapter")
    return cfg


def adapter_base_ref(path: Path, cfg: dict[str, Any]) -> str | None:
    """The base named in adapter_config.json as a reference open_source understands: a local directory if
    one exists (absolute or relative to the adapter), else `hf:NAME` for the Hugging Face cache."""
    name = cfg.get("base_model_name_or_path")
    if not name:
        return None
    for cand in (Path(name).expanduser(), path / name):
        if cand.is_dir():
            return str(cand.resolve())
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        revision = cfg.get("revision")
        return f"hf:{name}" + (f"@{revision}" if revision else "")
    return None


def open_adapter(name: str, path: Path, base: SourceModel, ref: str) -> AdapterSource:
    """Index an adapter over an opened base; check every adapter tensor against the base (no weight read)."""
    cfg = read_adapter_config(path)
    where = f"model '{name}' (adapter {path})"
    kind = cfg.get("peft_type", "LORA")
    if kind != "LORA":
        raise EvomergeError(f"{where}: a {kind} adapter; evomerge merges LoRA adapters only",
                            "merge it into its base with PEFT (`merge_and_unload`) and use that model directory")
    for key, what in _UNSUPPORTED.items():
        if cfg.get(key):
            raise EvomergeError(f"{where}: {what} are not supported as merge sources",
                                "merge the adapter into its base with PEFT (`merge_and_unload()`, then "
                                "`save_pretrained`) and use that model directory")
    wfile = path / ADAPTER_WEIGHTS
    if not wfile.is_file():
        pickles = sorted(p.name for p in path.glob("adapter_model.*"))
        raise EvomergeError(f"{where}: no {ADAPTER_WEIGHTS}" + (f" (found {', '.join(pickles)})" if pickles else ""),
                            "save the adapter with `save_pretrained(..., safe_serialization=True)`")
    infos = read_header(wfile)
    weights = SourceModel(name=f"{name}:adapter", path=path, config={}, tensors=infos, ref=str(path))
    alpha = float(cfg.get("lora_alpha", cfg.get("r", 8)))
    alpha_pattern = dict(cfg.get("alpha_pattern") or {})
    rslora = bool(cfg.get("use_rslora"))
    fan_in_fan_out = bool(cfg.get("fan_in_fan_out"))

    pairs: dict[str, dict[str, str]] = {}  # module -> {A, B, bias, embA, embB}
    replaced: dict[str, str] = {}
    for key in infos:
        k = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        m = re.fullmatch(r"(.+)\.lora_(A|B)\.(weight|bias)", k)
        e = re.fullmatch(r"(.+)\.lora_embedding_(A|B)", k)
        if m:
            slot = m.group(2) if m.group(3) == "weight" else "bias"
            if slot == "bias" and m.group(2) != "B":
                raise EvomergeError(f"{where}: unexpected tensor '{key}'", "re-save the adapter with PEFT")
            pairs.setdefault(m.group(1), {})[slot] = key
        elif e:
            pairs.setdefault(e.group(1), {})["emb" + e.group(2)] = key
        else:
            target = k.replace(".base_layer.", ".")
            if target not in base.tensors:
                raise EvomergeError(f"{where}: adapter tensor '{key}' has no counterpart '{target}' in the base "
                                    f"'{base.path}'", "use the base the adapter was trained on (BASE+ADAPTER)")
            replaced[target] = key

    deltas: dict[str, LoraDelta] = {}
    for module, slots in pairs.items():
        emb = "embA" in slots or "embB" in slots
        a, b = (slots.get("embA"), slots.get("embB")) if emb else (slots.get("A"), slots.get("B"))
        if a is None or b is None:
            raise EvomergeError(f"{where}: module '{module}' has only one of its LoRA matrices",
                                "the adapter file is incomplete; save it again")
        target = f"{module}.weight"
        if target not in base.tensors:
            raise EvomergeError(f"{where}: the adapter changes '{module}', which the base '{base.path}' does not "
                                "have", "use the base the adapter was trained on (write the model as BASE+ADAPTER)")
        ka, kb = infos[a].shape, infos[b].shape
        if len(ka) != 2 or len(kb) != 2 or ka[0] != kb[1]:
            raise EvomergeError(f"{where}: LoRA matrices of '{module}' have shapes {list(kb)} and {list(ka)}",
                                "the adapter file is damaged; save it again")
        r = ka[0]
        transpose = emb or fan_in_fan_out
        shape = (ka[1], kb[0]) if transpose else (kb[0], ka[1])
        if tuple(base.tensors[target].shape) != shape:
            raise EvomergeError(
                f"{where}: the adapter's update of '{target}' has shape {list(shape)} but the base "
                f"'{base.path}' has {list(base.tensors[target].shape)}",
                "apply the adapter to the base it was trained on (write the model as BASE+ADAPTER)")
        key_alpha = _pattern_key(list(alpha_pattern), module)
        a_ = float(alpha_pattern[key_alpha]) if key_alpha is not None else alpha
        scale = a_ / math.sqrt(r) if rslora else a_ / r
        deltas[target] = LoraDelta(a, b, scale, transpose)
        if "bias" in slots:
            bias = f"{module}.bias"
            if bias not in base.tensors:
                raise EvomergeError(f"{where}: lora_B of '{module}' has a bias but the base layer has none",
                                    "use the base the adapter was trained on")
            deltas[bias] = LoraDelta("", slots["bias"], scale, False, bias=True)
    for target, key in replaced.items():
        if tuple(infos[key].shape) != tuple(base.tensors[target].shape):
            raise EvomergeError(f"{where}: the adapter's '{key}' has shape {list(infos[key].shape)} but the base's "
                                f"'{target}' has {list(base.tensors[target].shape)}",
                                "apply the adapter to the base it was trained on (write the model as BASE+ADAPTER)")
    if not deltas and not replaced:
        raise EvomergeError(f"{where}: {ADAPTER_WEIGHTS} holds no LoRA tensors", "save the trained adapter again")
    return AdapterSource(name=name, path=base.path, config=base.config, tensors=dict(base.tensors), ref=ref,
                         base=base, adapter_path=path, adapter_config=cfg, weights=weights, deltas=deltas,
                         replaced=replaced)
