"""Evaluation options passed through to lm-eval and vLLM, and how they are checked (issue 32).

What a search config may set, and where it goes:

    objective.apply_chat_template   lm-eval's `apply_chat_template` (true, or the name of one of the tokenizer's
                                    templates): prompts are rendered through the scoring model's chat template
    objective.fewshot_as_multiturn  lm-eval's `fewshot_as_multiturn` (needs apply_chat_template)
    objective.system_instruction    lm-eval's `system_instruction` (a system turn with a template, else a prefix)
    objective.chat_template_args    keyword arguments for the template (e.g. {enable_thinking: false})
    objective.tasks[].gen_kwargs    lm-eval's `gen_kwargs`, per task (generate_until tasks only)
    objective.tasks[].function      a task scored by the user's own function (workers/user_function.py)
    workers.batch_size              an int or `auto` (vLLM: the engine schedules every request; hf: lm-eval's
                                    largest-batch search on a GPU, 64 on CPU)
    workers.vllm.*                  vLLM engine options (evomerge.run.config.VllmSpec)

A validation objective that sets none of the prompt options takes the objective's, so the held-out score
is measured the way the search score is.

Every key is checked when the config is loaded: an unknown one is named with the nearest known key (see
`unknown_key_hint`), and options that exist in lm-eval's or vLLM's own interfaces but mean something else
here (`data_parallel_size`, `max_batch_size`, ...) say what to set instead. `evomerge check` adds what needs
the files: the scoring model has a chat template (and the named one), gen_kwargs only on generate_until tasks,
the scoring function imports and has a usable signature.
"""

from __future__ import annotations

import difflib
import json
import math
from pathlib import Path
from typing import Any

PROMPT_OPTIONS = ("apply_chat_template", "fewshot_as_multiturn", "system_instruction", "chat_template_args")

# generation settings both lm-eval backends (transformers' generate and vLLM's SamplingParams) understand
GEN_KWARGS: dict[str, str] = {
    "until": "a stop string or a list of them",
    "max_gen_toks": "an integer >= 1",
    "do_sample": "true or false",
    "temperature": "a number >= 0",
    "top_p": "a number in (0, 1]",
    "top_k": "an integer >= 0 (0: off)",
    "min_p": "a number in [0, 1]",
    "repetition_penalty": "a number > 0",
}

# keys users bring from lm-eval's `--model vllm --model_args ...` that mean something else here
VLLM_MOVED: dict[str, str] = {
    "data_parallel_size": "each worker runs one engine: data parallelism is workers.count (one worker per GPU, "
                          "workers.gpus: 1)",
    "batch_size": "set workers.batch_size (an integer or auto)",
    "max_batch_size": "set workers.vllm.max_num_seqs",
    "max_length": "set workers.vllm.max_model_len",
    "pretrained": "the engine is built from the search's models (models:, base:)",
    "tokenizer": "the tokenizer is the scoring model's own",
    "trust_remote_code": "set workers.trust_remote_code",
    "device": "set workers.gpus (0: CPU)",
    "lora_local_path": "name a LoRA adapter directory under models: (it is merged like any source)",
    "kv_cache_memory_bytes": "set workers.vllm.kv_cache_gb",
    "swap_space": "vLLM no longer has a swap space",
    "enable_thinking": "set objective.chat_template_args: {enable_thinking: ...}",
    "chat_template_args": "set objective.chat_template_args",
}


# other tools' names for the same settings (lm-eval's CLI, transformers' generate, vLLM's SamplingParams)
ALIASES = {"system_prompt": "system_instruction", "system": "system_instruction",
           "chat_template": "apply_chat_template", "use_chat_template": "apply_chat_template",
           "max_new_tokens": "max_gen_toks", "max_tokens": "max_gen_toks", "stop": "until", "stop_sequences": "until",
           "num_gpus": "tensor_parallel_size", "tp": "tensor_parallel_size"}


def nearest(key: str, known: list[str] | set[str]) -> str:
    """' (did you mean 'x'?)' for the closest known key, or ''."""
    if ALIASES.get(str(key)) in known:
        return f" (did you mean '{ALIASES[str(key)]}'?)"
    hint = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.6)
    return f" (did you mean '{hint[0]}'?)" if hint else ""


def check_gen_kwargs(d: dict[str, Any] | None) -> dict[str, Any] | None:
    """Validate one task's gen_kwargs; a ValueError names the first bad key or value."""
    if d is None:
        return None
    for k, v in d.items():
        if k not in GEN_KWARGS:
            raise ValueError(f"gen_kwargs has an unknown setting '{k}'{nearest(k, set(GEN_KWARGS))}; known: "
                             f"{', '.join(GEN_KWARGS)}")
        ok = True
        if k == "until":
            ok = isinstance(v, str) or (isinstance(v, list) and all(isinstance(s, str) for s in v))
        elif k == "do_sample":
            ok = isinstance(v, bool)
        elif k in ("max_gen_toks", "top_k"):
            ok = isinstance(v, int) and not isinstance(v, bool) and v >= (1 if k == "max_gen_toks" else 0)
        else:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (
                (k == "temperature" and v >= 0) or (k == "top_p" and 0 < v <= 1) or (k == "min_p" and 0 <= v <= 1)
                or (k == "repetition_penalty" and v > 0))
        if not ok:
            raise ValueError(f"gen_kwargs.{k} is {v!r}: it must be {GEN_KWARGS[k]}")
    return dict(d)


def sampling(d: dict[str, Any] | None) -> bool:
    """Whether these gen_kwargs sample (scores then change from one evaluation of a candidate to the next)."""
    d = d or {}
    return bool(d.get("do_sample")) or (d.get("do_sample") is None and float(d.get("temperature", 0) or 0) > 0)


def unknown_key_hint(loc: tuple[Any, ...], root: type) -> str:
    """For pydantic's `extra_forbidden` error at `loc` under model class `root`: the nearest known key, or what
    to set instead (VLLM_MOVED)."""
    from pydantic import BaseModel

    model: Any = root
    for part in loc[:-1]:
        if isinstance(part, int) or model is None:
            continue
        field = getattr(model, "model_fields", {}).get(part)
        model = _model_in(field.annotation) if field is not None else None
        if model is None:
            return ""
    key = str(loc[-1])
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return ""
    if model.__name__ == "VllmSpec" and key in VLLM_MOVED:
        return f": {VLLM_MOVED[key]}"
    known = set(model.model_fields)
    hint = nearest(key, known)
    return hint + f"; known keys: {', '.join(sorted(known))}" if len(known) <= 24 else hint


def _model_in(annotation: Any):
    """The pydantic model class inside an annotation (X, X | None, list[X], dict[str, X])."""
    import typing

    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def scoring_model(cfg) -> str | None:
    """The model whose tokenizer renders the prompts (the resident model's: base, or model A of a path)."""
    if cfg.search == "dataflow" and cfg.dataflow is not None:
        return cfg.models.get(cfg.dataflow.head)
    name = cfg.base or next(iter(cfg.models))
    return cfg.models.get(name)


def chat_templates(model_dir: str | Path) -> dict[str, str] | None:
    """The chat templates a local tokenizer directory carries, by name ('default' for the main one), read from
    its files (tokenizer_config.json, chat_template.jinja / .json, additional_chat_templates/); None if none."""
    d = Path(model_dir)
    out: dict[str, str] = {}
    cfg_file = d / "tokenizer_config.json"
    if cfg_file.is_file():
        try:
            t = json.loads(cfg_file.read_text()).get("chat_template")
        except (OSError, ValueError):
            t = None
        if isinstance(t, str):
            out["default"] = t
        elif isinstance(t, list):
            out.update({e["name"]: e["template"] for e in t if isinstance(e, dict) and "name" in e})
    if (d / "chat_template.jinja").is_file():
        out["default"] = (d / "chat_template.jinja").read_text()
    elif (d / "chat_template.json").is_file():
        try:
            t = json.loads((d / "chat_template.json").read_text()).get("chat_template")
        except (OSError, ValueError):
            t = None
        if isinstance(t, str):
            out["default"] = t
    extra = d / "additional_chat_templates"
    if extra.is_dir():
        out.update({p.stem: p.read_text() for p in sorted(extra.glob("*.jinja"))})
    return out or None


def check_prompt_options(cfg, report) -> None:
    """`evomerge check`: the options that need files (a chat template in the scoring model's tokenizer, the
    template named), and gen_kwargs that sample. Adds findings to `report` (evomerge.run.check.CheckReport)."""
    from evomerge.merge.sources import is_hub_ref, local_model_dir

    for label, obj in (("objective", cfg.objective), ("validation", cfg.validation)):
        if obj is None:
            continue
        for t in obj.tasks:
            if sampling(t.gen_kwargs):
                report.add("tasks", "warn", f"{label}: task {t.name} samples (gen_kwargs {t.gen_kwargs}): a "
                           "candidate's score changes from one evaluation to the next",
                           "set do_sample: false (greedy) for a search, unless the noise is wanted")
        want = obj.apply_chat_template
        if not want:
            continue
        ref = scoring_model(cfg)
        if ref is None:
            continue
        try:
            d = local_model_dir("model", ref) if is_hub_ref(ref) else Path(ref)
        except Exception:  # noqa: BLE001 - a missing source is reported by the sources check
            continue
        templates = chat_templates(d)
        if not templates:
            report.add("tasks", "error", f"{label}: apply_chat_template is set, but the scoring model's tokenizer "
                       f"({d}) has no chat template",
                       "use an instruct model with a chat template, add one to its tokenizer_config.json "
                       "(chat_template) or chat_template.jinja, or drop apply_chat_template")
        elif isinstance(want, str) and want not in templates:
            report.add("tasks", "error", f"{label}: apply_chat_template names template '{want}', the tokenizer has "
                       f"{', '.join(sorted(templates))}{nearest(want, set(templates))}",
                       "name one of its templates, or set apply_chat_template: true for the default one")
        else:
            report.add("tasks", "ok", f"{label}: prompts rendered with the chat template "
                       f"'{want if isinstance(want, str) else 'default'}' of {d.name}")


# ---- the user's scoring function: the config side (no import here; see workers/user_function.py) ----------

def check_function_spec(spec: str) -> None:
    """`module.path:function` or `path/to/file.py:function` (syntax only; nothing is imported)."""
    import keyword

    where, sep, attr = str(spec).rpartition(":")
    if not sep or not where or not attr.isidentifier() or keyword.iskeyword(attr):
        raise ValueError(f"function '{spec}' must be 'module:function' or 'path/to/file.py:function'")
    if not where.endswith(".py") and not all(p.isidentifier() for p in where.split(".")):
        raise ValueError(f"function '{spec}': '{where}' is neither a module name (a.b.c) nor a .py file")


def expand_function_shorthand(v: Any) -> Any:
    """`objective.function: mod:fn` is one more task, named after the function, scored by it."""
    if not isinstance(v, dict) or "function" not in v:
        return v
    v = dict(v)
    spec = v.pop("function")
    if spec is None:
        return v
    if not isinstance(spec, str):
        raise ValueError(f"objective.function must be a string 'module:function', got {spec!r}")
    tasks = list(v.get("tasks") or [])
    tasks.append({"name": spec.rpartition(":")[2] or "function", "function": spec})
    v["tasks"] = tasks
    return v


def is_file_function(spec: str) -> bool:
    return spec.rpartition(":")[0].endswith(".py")


def resolve_functions(obj, root: Path):
    """Objective `obj` with function files given relative to the config's folder made absolute."""
    if not any(t.function and is_file_function(t.function) for t in obj.tasks):
        return obj
    tasks = []
    for t in obj.tasks:
        if t.function and is_file_function(t.function):
            where, _, attr = t.function.rpartition(":")
            p = Path(where).expanduser()
            t = t.model_copy(update={"function": f"{p if p.is_absolute() else (root / p).resolve()}:{attr}"})
        tasks.append(t)
    return obj.model_copy(update={"tasks": tasks})


def with_prompt_options(validation, objective):
    """A validation objective that sets none of the prompt options takes the objective's."""
    if any(k in validation.model_fields_set for k in PROMPT_OPTIONS):
        return validation
    return validation.model_copy(update={k: getattr(objective, k) for k in PROMPT_OPTIONS})


def prompt_options(obj: dict[str, Any]) -> dict[str, Any]:
    """The lm-eval prompt options of an objective (a model_dump), as the workers' Scorer takes them."""
    return {k: obj.get(k) for k in PROMPT_OPTIONS if obj.get(k) not in (None, False, {})}


def import_functions(cfg) -> dict[str, Any]:
    """Import every scoring function a config names (runs the user's modules), checking each can be called
    the way the workers call it; {spec: function}. Nothing is imported when the config names none."""
    specs = [t.function for obj in (cfg.objective, cfg.validation) if obj is not None for t in obj.tasks
             if t.function]
    if not specs:
        return {}
    from workers.user_function import load_function

    return {s: load_function(s) for s in dict.fromkeys(specs)}
