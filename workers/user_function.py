"""Your own scoring function as an objective task (issue 32). This runs the user's code.

A task entry with `function: my_module:score` (or `path/to/file.py:score`; `objective.function:` is the
shorthand for one such task) is scored by calling that function in the worker, on the candidate just built,
instead of an lm-eval task. Nothing is imported unless a config names a function: the default loads no code.

    def score(model, tokenizer, items=None, engine=None):
        ...
        return [1.0, 0.0, 0.5, ...]          # one score in [0, 1] per item

The function declares the arguments it wants, by name; it is given those of:

    model      the built candidate, a transformers model (hf backend); None on the vllm backend
    tokenizer  the scoring model's tokenizer
    engine     the vllm.LLM engine holding the candidate (vllm backend); None on the hf backend
    lm         lm-eval's model object around it (HFLM or VLLM), e.g. for lm.loglikelihood(...)
    items      None: score every item, in a fixed order; a list of item indices: score exactly those, in
               that order (racing and IRT estimates score subsets; a function without `items` is called for
               every item and the subset taken from its answer)
    backend    "hf" or "vllm"

It returns one score per item, each a number in [0, 1], always the same number of items for a full call: the
task's metric is their mean, and racing, IRT estimates and M2N2 (which competes on per-item scores) use
them like an lm-eval task's. A function that cannot be imported, raises, or returns anything else is an
EvomergeError / RuntimeError that names it: at the dry call each worker makes on the base model before it
takes a candidate (so a broken function stops the search before its first evaluation), or recorded as the
candidate's failure during the search.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import math
import sys
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError

ARGS = ("model", "tokenizer", "engine", "lm", "items", "backend")


def load_function(spec: str):
    """Import `module:function` or `file.py:function` and return the callable (runs the module's code)."""
    where, _, attr = spec.rpartition(":")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise EvomergeError(f"scoring function {spec}: file {path} not found",
                                "give the path of the .py file (relative paths are read from the config's folder; "
                                "every worker node must see it at that path)")
        name = "evomerge_user_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
        module = sys.modules.get(name)
        if module is None:
            mspec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(mspec)
            sys.modules[name] = module
            try:
                mspec.loader.exec_module(module)
            except Exception as e:
                del sys.modules[name]
                raise EvomergeError(f"scoring function {spec}: importing {path} raised {type(e).__name__}: {e}",
                                    "fix the module (it is imported in the controller and in every worker)") from e
    else:
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as e:
            if e.name and (where == e.name or where.startswith(e.name + ".")):
                raise EvomergeError(f"scoring function {spec}: no module named '{where}' in this Python "
                                    f"environment", "install it or put it on PYTHONPATH on every node, or give a "
                                    "file path (path/to/file.py:function)") from None
            raise EvomergeError(f"scoring function {spec}: importing {where} raised {type(e).__name__}: {e}",
                                "install what the module needs on every node") from e
        except Exception as e:
            raise EvomergeError(f"scoring function {spec}: importing {where} raised {type(e).__name__}: {e}",
                                "fix the module (it is imported in the controller and in every worker)") from e
    fn = getattr(module, attr, None)
    if fn is None:
        names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        hint = difflib.get_close_matches(attr, names, n=1)
        raise EvomergeError(f"scoring function {spec}: {where} has no '{attr}'"
                            + (f" (did you mean '{hint[0]}'?)" if hint else ""),
                            f"its functions: {', '.join(names) or 'none'}")
    if not callable(fn):
        raise EvomergeError(f"scoring function {spec}: '{attr}' is a {type(fn).__name__}, not a function",
                            "name a function")
    _accepted(spec, fn)
    return fn


def _accepted(spec: str, fn) -> tuple[set[str], bool]:
    """The argument names the function takes (and whether it takes **kwargs); refuses required arguments
    evomerge cannot give."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return set(ARGS), True
    names, var_kw = set(), False
    for p in sig.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            var_kw = True
        elif p.kind is p.VAR_POSITIONAL:
            continue
        elif p.name in ARGS:
            if p.kind is p.POSITIONAL_ONLY:
                raise EvomergeError(f"scoring function {spec}: argument '{p.name}' is positional-only",
                                    "evomerge passes arguments by name")
            names.add(p.name)
        elif p.default is p.empty:
            raise EvomergeError(f"scoring function {spec}: required argument '{p.name}' is not one evomerge gives",
                                f"take some of {', '.join(ARGS)} (by name), give '{p.name}' a default")
    return (set(ARGS) if var_kw else names), var_kw


class UserFunction:
    """One function task: the callable, how to call it, and the item count its full calls return."""

    def __init__(self, name: str, spec: str):
        self.name, self.spec = name, spec
        self.fn = load_function(spec)
        self.accepts, _ = _accepted(spec, self.fn)
        self.n: int | None = None

    def __call__(self, lm, items: list[int] | None = None) -> list[float]:
        ctx = context(lm)
        kwargs = {k: v for k, v in ctx.items() if k in self.accepts}
        subset = items is not None and "items" not in self.accepts
        if "items" in self.accepts:
            kwargs["items"] = list(items) if items is not None else None
        try:
            out = self.fn(**kwargs)
        except Exception as e:  # the user's code: name it, keep its message
            raise RuntimeError(f"scoring function {self.spec} (task {self.name}) raised {type(e).__name__}: "
                               f"{e}") from e
        scores = self._check(out, None if subset or items is None else len(items))
        if items is None or subset:
            if self.n is None:
                self.n = len(scores)
            elif len(scores) != self.n:
                raise RuntimeError(f"scoring function {self.spec} (task {self.name}) returned {len(scores)} scores; "
                                   f"it returned {self.n} on the base model (the item set must stay fixed)")
        if subset:
            bad = [i for i in items if not 0 <= i < len(scores)]
            if bad:
                raise RuntimeError(f"scoring function {self.spec}: item {bad[0]} asked for, it scores {len(scores)}")
            return [scores[i] for i in items]
        return scores

    def _check(self, out: Any, want: int | None) -> list[float]:
        what = f"scoring function {self.spec} (task {self.name})"
        if hasattr(out, "tolist"):  # numpy arrays, torch tensors
            out = out.tolist()
        if isinstance(out, (str, bytes, dict)) or not hasattr(out, "__iter__"):
            raise RuntimeError(f"{what} returned a {type(out).__name__}: it must return a list of per-item scores "
                               "in [0, 1]")
        scores = list(out)
        if not scores:
            raise RuntimeError(f"{what} returned no scores: it must score at least one item")
        for i, v in enumerate(scores):
            if isinstance(v, bool):
                v = float(v)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or not 0.0 <= v <= 1.0:
                raise RuntimeError(f"{what} returned {v!r} for item {i}: every score must be a number in [0, 1] "
                                   "(racing, IRT estimates and M2N2 treat scores as per-item accuracies)")
            scores[i] = float(v)
        if want is not None and len(scores) != want:
            raise RuntimeError(f"{what} returned {len(scores)} scores for {want} items asked for")
        return scores


def context(lm) -> dict[str, Any]:
    """What a scoring function can be given, from lm-eval's model object (HFLM or VLLM)."""
    inner = getattr(lm, "model", None)
    if type(inner).__module__.startswith("vllm"):
        return {"model": None, "engine": inner, "tokenizer": lm.tokenizer, "lm": lm, "backend": "vllm"}
    return {"model": inner, "engine": None, "tokenizer": getattr(lm, "tokenizer", None), "lm": lm, "backend": "hf"}
