"""Parameter settings and how they resolve for one tensor (mergekit's semantics, which model cards use).

A *setting* is one of
  - a scalar (`0.5`, `true`);
  - a gradient: a list of numbers interpolated over the layers of a slice (layer i of n gets
    t = i / (n - 1); embeddings, final norm and head get t = 0), so a list with one value per layer
    gives each layer exactly its own value;
  - a list of rules `{filter: SUBSTRING, value: scalar-or-gradient}`, where the first rule whose filter is
    a substring of the tensor name (or has no filter, or `*`) applies.

Precedence for a per-model parameter, as in mergekit: the model's own setting in the slice, then the
slice's, then the recipe's top-level `parameters`.
"""

from __future__ import annotations

import math
import re
from typing import Any

_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


def layer_index(tensor_name: str) -> int | None:
    """The transformer block a tensor belongs to (`model.layers.7.mlp...` -> 7), or None."""
    m = _LAYER_RE.search(tensor_name)
    return int(m.group(1)) if m else None


def is_pre_layer(tensor_name: str) -> bool:
    """Non-layer tensors before the blocks (embeddings); the rest (final norm, head) come after."""
    return "embed" in tensor_name


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def evaluate_setting(setting: Any, tensor_name: str, t: float) -> Any:
    """The value of `setting` for `tensor_name` at layer position `t` in [0, 1]; None if no rule matches."""
    if isinstance(setting, (int, float, bool, str)):
        return setting
    if isinstance(setting, (list, tuple)):
        if setting and all(_is_number(e) for e in setting):
            scaled = t * (len(setting) - 1)
            i0 = int(scaled)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * setting[i0] + frac * setting[i1]
        if setting and all(isinstance(e, (int, float, bool, str)) for e in setting):
            return setting[int(t * (len(setting) - 1))]
        for rule in setting:
            filt = rule.get("filter")
            if filt is None or filt == "*" or (tensor_name and filt in tensor_name):
                return evaluate_setting(rule["value"], tensor_name, t)
        return None
    raise TypeError(f"unexpected setting {setting!r}")


def setting_values(setting: Any) -> list[Any]:
    """Every literal value a setting can produce (for range checks)."""
    if isinstance(setting, (int, float, bool, str)):
        return [setting]
    out: list[Any] = []
    for e in setting:
        if isinstance(e, dict):
            out.extend(setting_values(e["value"]))
        else:
            out.append(e)
    return out


def check_setting_shape(setting: Any, where: str) -> None:
    """Raise ValueError with a readable message if `setting` is not a valid setting."""
    if isinstance(setting, bool) or _is_number(setting) or isinstance(setting, str):
        if _is_number(setting) and not math.isfinite(setting):
            raise ValueError(f"{where}: {setting} is not a finite number")
        return
    if isinstance(setting, (list, tuple)):
        if not setting:
            raise ValueError(f"{where}: an empty list is not a value")
        if all(isinstance(e, dict) for e in setting):
            for i, rule in enumerate(setting):
                extra = set(rule) - {"filter", "value"}
                if "value" not in rule or extra:
                    raise ValueError(
                        f"{where}[{i}]: a rule is {{filter: SUBSTRING, value: ...}}"
                        + (f"; unknown keys {sorted(extra)}" if extra else "; 'value' is missing")
                    )
                if rule.get("filter") is not None and not isinstance(rule["filter"], str):
                    raise ValueError(f"{where}[{i}].filter: must be a string")
                check_setting_shape(rule["value"], f"{where}[{i}].value")
            return
        if all(isinstance(e, (int, float, bool, str)) for e in setting):
            for e in setting:
                check_setting_shape(e, where)
            return
        raise ValueError(f"{where}: mix of rules and plain values in one list")
    raise ValueError(f"{where}: {setting!r} is not a number, a list of numbers or a list of filter rules")
