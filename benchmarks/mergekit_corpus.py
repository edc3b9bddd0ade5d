"""Real mergekit configs, as published, through evomerge and through mergekit: does each tool accept the config,
and do the two builds agree?

The corpus is tests/fixtures/mergekit_corpus/ (its README lists the sources): configs from mergekit's own
examples/, from Hugging Face model cards and from a public GitHub repository, each kept verbatim with a header
naming its source and the architecture and layer count of the models it was written for. Each model reference
is replaced by a small local stand-in of that architecture family and layer count (see benchmarks/_corpus.py:
hidden 64, float32, a base and correlated fine-tunes; the base_model maps to the base, the other models to
fine-tunes in order), so layer ranges and per-layer value lists keep their meaning.

For every config:
- as published (only the model references replaced): `evomerge convert` and `evomerge merge` (accepted,
  with its warnings, or refused with its message) and `mergekit-yaml` in mergekit's own venv (built or refused);
  where the config's dtype is bfloat16/float16, the two builds are compared in ulps of that type against the
  float32 merge, as benchmarks/mergekit_agreement.py does for its bf16 rows;
- float32 variant (the top-level `dtype:` set to float32, `out_dtype:` removed): both tools build it and every
  tensor is compared in float32 (max |evomerge - mergekit|, goal <= --tol); random methods (dare_*, della*)
  are compared statistically over --evo-seeds evomerge recipe seeds and --mk-seeds mergekit --random-seeds
  (fraction of entries changed from the base, mean |merged - base|, std(merged - base); consistent if every
  z <= --z-tol), unless no entry is dropped (density 1), where the builds must agree exactly.

evomerge is driven only through its command line (the `evomerge` console script's entry point, in-process);
mergekit through `mergekit-yaml`'s entry point in one process of its venv (benchmarks/_mergekit_batch.py).

Run (about 10-15 minutes on 2 busy cores; creates the mergekit venv on first use):

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/python benchmarks/mergekit_corpus.py \
        [--out results/mergekit_agreement.md] [--workdir .bench/corpus] [--expected]

Writes the section "Real configs from model cards" of --out (replacing that section, keeping the rest of the
file), the raw numbers to results/mergekit_corpus.json, and with --expected the outcomes and fingerprints that
tests/test_mergekit_corpus.py checks evomerge against (tests/fixtures/mergekit_corpus/expected.json).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import _corpus as K  # noqa: E402
import mergekit_agreement as A  # noqa: E402  (its comparison helpers)

RANDOM_METHODS = ("dare_ties", "dare_linear", "della", "della_linear")
SECTION = "## Real configs from model cards"
MANTISSA_BITS = {"bfloat16": 8, "float16": 11}  # significant bits
MIN_SPACING = {"bfloat16": 2.0 ** -133, "float16": 2.0 ** -24}  # the spacing of subnormals


def _norm(text: str, paths: dict[str, str]) -> str:
    """A message with this run's paths replaced by placeholders (so the test can compare it)."""
    for p, name in sorted(paths.items(), key=lambda kv: -len(kv[0])):
        text = text.replace(p, name)
    return re.sub(r"\s+", " ", text).strip()


def _ulp(x, dtype: str):
    """The spacing of `dtype` at |x| (subnormals included)."""
    import torch

    _, e = torch.frexp(x.abs())
    return torch.ldexp(torch.ones_like(x), (e - MANTISSA_BITS[dtype]).to(torch.int32)).clamp(min=MIN_SPACING[dtype])


def compare_lowp(evo: Path, mk: Path, ref: Path, inputs: list[Path], dtype: str) -> dict:
    """Two bf16/fp16 builds against each other and against the float32 merge `ref`, in ulps of `dtype` at the
    inputs' scale (max_k |input_k| at each entry), as mergekit_agreement.compare_bf16 does for bf16."""
    a, b = A._pair(evo, mk)
    r = C.load_tensors(ref)
    ins = [C.load_tensors(d) for d in inputs]
    n = differ = 0
    max_abs = max_ulp = 0.0
    err = {"evomerge": [0.0, 0], "mergekit": [0.0, 0]}
    dtypes = set()
    for k in a:
        x, y, z = a[k].float(), b[k].float(), r[k].float()
        dtypes.add((str(a[k].dtype), str(b[k].dtype)))
        present = [t[k].float().abs() for t in ins if k in t and t[k].shape == x.shape]
        scale = (__import__("torch").stack(present).amax(dim=0) if present else z.abs())
        ulp = _ulp(scale, dtype)
        n += x.numel()
        differ += int((x != y).sum())
        max_abs = max(max_abs, (x - y).abs().max().item())
        max_ulp = max(max_ulp, ((x - y).abs() / ulp).max().item())
        for tool, t in (("evomerge", x), ("mergekit", y)):
            u = (t - z).abs() / ulp
            err[tool][0] = max(err[tool][0], u.max().item())
            err[tool][1] += int((u > 1).sum())
    return {"max_abs_diff": max_abs, "max_ulp_between": max_ulp, "frac_differ": differ / n, "elements": n,
            "dtypes": sorted(dtypes),
            "vs_float32": {t: {"max_ulp": v[0], "frac_over_1ulp": v[1] / n} for t, v in err.items()}}


def chat_template(model_dir: Path) -> str | None:
    d = Path(model_dir)
    if (d / "chat_template.jinja").exists():
        return (d / "chat_template.jinja").read_text()
    try:
        return json.loads((d / "tokenizer_config.json").read_text()).get("chat_template")
    except (OSError, ValueError):
        return None


def compare_templates(evo: str | None, mk: str | None) -> str:
    """The two outputs' chat templates: the same text, the same rendering (as transformers renders them:
    trim_blocks, lstrip_blocks) of a short conversation, or different."""
    if evo == mk:
        return "same"
    if evo is None or mk is None:
        return f"differs: only {'mergekit' if evo is None else 'evomerge'} writes one"
    import jinja2

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]
    try:
        ren = [env.from_string(t).render(messages=msgs, add_generation_prompt=True, bos_token="<s>",
                                         eos_token="</s>") for t in (evo, mk)]
    except jinja2.TemplateError as ex:
        return f"differs (a template does not render: {ex})"
    return "same rendering (texts differ in whitespace)" if ren[0] == ren[1] else "differs"


def run_mergekit(mk_python: Path, jobs: list[dict], work: Path) -> list[dict]:
    jf, rf = work / "mk_jobs.json", work / "mk_results.json"
    jf.write_text(json.dumps(jobs))
    rf.unlink(missing_ok=True)
    with open(work / "mk_batch.log", "w") as log:  # mergekit's progress bars and warnings
        subprocess.run([str(mk_python), str(Path(__file__).parent / "_mergekit_batch.py"), str(jf), str(rf)],
                       env={**C.env(), "TQDM_DISABLE": "1"}, check=True, stdout=log, stderr=log)
    return json.loads(rf.read_text())


MAGNITUDE_METHODS = ("ties", "breadcrumbs", "breadcrumbs_ties")


def tie_check(evo: Path, mk: Path, fam: Path, stand_ins: dict[str, str], tol: float) -> dict:
    """Whether every entry where the two builds differ (> tol) is a tie at a magnitude cut: at that entry some
    fine-tune's task-vector magnitude occurs at least twice in its tensor (both tools keep int(density*n)
    entries; mergekit breaks ties at the cut arbitrarily, evomerge towards earlier entries)."""
    import numpy as np

    e, m = K.load_tensors(evo), K.load_tensors(mk)
    base = K.load_tensors(fam / "base")
    fts = [K.load_tensors(fam / v) for v in dict.fromkeys(stand_ins.values()) if v != "base"]
    n = explained = 0
    for name in e:
        idx = np.flatnonzero(np.abs(e[name] - m[name]).ravel() > tol)
        if not idx.size:
            continue
        mags = [np.abs(ft[name] - base[name]).ravel() for ft in fts]
        for i in idx[:10000]:
            n += 1
            explained += any(int((a == a[i]).sum()) >= 2 and a[i] > 0 for a in mags)
    return {"entries": n, "explained": explained}


def _has_gradient(node) -> bool:
    """Whether any `parameters:` block of the config holds a list of numbers (a per-layer gradient)."""
    def is_grad(v) -> bool:
        if isinstance(v, list):
            return (len(v) > 0 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)) or any(
                isinstance(r, dict) and is_grad(r.get("value")) for r in v)
        return False

    if isinstance(node, dict):
        params = node.get("parameters")
        if isinstance(params, dict) and any(is_grad(v) for v in params.values()):
            return True
        return any(_has_gradient(v) for k, v in node.items() if k != "parameters")
    if isinstance(node, list):
        return any(_has_gradient(v) for v in node)
    return False


def features(case: K.Case) -> str:
    """The config's notable features, read from its text (for the table)."""
    d, body = case.data, case.body
    f = []
    n = len(K.stand_ins(case))
    f.append(f"{n} model{'s' if n != 1 else ''}" + (" incl. base" if d.get("base_model") else ""))
    if d.get("slices"):
        f.append(f"slices ×{len(d['slices'])}")
    if d.get("modules"):
        f.append("`modules: default`")
    if _has_gradient(d):
        f.append("per-layer value lists")
    if "filter:" in body:
        f.append("filter rules")
    for key in ("normalize", "int8_mask", "rescale", "lambda", "epsilon", "gamma", "tol", "select_topk",
                "normalize_weights"):
        if re.search(rf"(?m)^\s*{key}:", body):
            f.append(key)
    for key in ("tokenizer_source", "tokenizer", "chat_template", "out_dtype", "name"):
        if re.search(rf"(?m)^{key}:", body):
            f.append(f"`{key}`")
    if d.get("dtype"):
        f.append(str(d["dtype"]))
    return ", ".join(f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=C.REPO / "results" / "mergekit_agreement.md")
    ap.add_argument("--raw", type=Path, default=C.REPO / "results" / "mergekit_corpus.json")
    ap.add_argument("--workdir", type=Path, default=C.BENCH / "corpus")
    ap.add_argument("--tol", type=float, default=1e-5)
    ap.add_argument("--z-tol", type=float, default=4.0)
    ap.add_argument("--evo-seeds", type=int, default=5)
    ap.add_argument("--mk-seeds", type=int, default=3)
    ap.add_argument("--only", default=None, help="run only the cases whose name contains this (debugging)")
    ap.add_argument("--expected", action="store_true",
                    help=f"write {K.EXPECTED.relative_to(C.REPO)} (what the test checks evomerge against; with --only, "
                    "update just those cases)")
    args = ap.parse_args()

    t_start = time.perf_counter()
    load_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    mk_python = C.mergekit_python()
    facts = C.machine_facts(mk_python)
    work = args.workdir.resolve()
    models = work / "models"
    cases = [c for c in K.load_cases() if not args.only or args.only in c.name]
    fams = K.build_all(models, cases)
    dirs = {k: work / k for k in ("configs", "configs_f32", "evo", "evo_f32", "mk", "mk_f32", "recipes")}
    for k, d in dirs.items():
        if k not in ("configs", "configs_f32", "recipes"):
            shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True, exist_ok=True)

    entries: dict[str, dict] = {}
    mk_jobs = []
    for c in cases:
        cfg, cfg32 = dirs["configs"] / f"{c.name}.yml", dirs["configs_f32"] / f"{c.name}.yml"
        cfg.write_text(K.materialize(c, fams[c.name]))
        cfg32.write_text(K.materialize(c, fams[c.name], float32=True))
        paths = {str(cfg): "{config}", str(cfg32): "{config}", str(fams[c.name]): "{models}"}
        e = entries[c.name] = {"name": c.name, "source": c.source, "method": c.method, "arch": c.arch,
                               "layers": c.layers, "features": features(c), "dtype": K.out_dtype(c),
                               "random": c.method in RANDOM_METHODS, "stand_ins": K.stand_ins(c)}
        # evomerge, as published
        code, out, err = K.run_evomerge(["convert", str(cfg), "--to", "evomerge"])
        e["evomerge_warnings"] = [_norm(w, paths) for w in K.warnings_of(err)]
        if code != 0:
            prob, fix = K.error_of(err)
            e["evomerge"] = {"status": "refused", "exit": code, "error": _norm(prob, paths), "fix": _norm(fix, paths)}
        else:
            t0 = time.perf_counter()
            code, out, err = K.run_evomerge(["merge", str(cfg), "--out", str(dirs["evo"] / c.name), "--quiet"])
            e["evomerge"] = {"status": "built" if code == 0 else "merge failed", "exit": code,
                             "seconds": time.perf_counter() - t0}
            if code != 0:
                e["evomerge"]["error"] = _norm(" ".join(K.error_of(err)), paths) or err[-500:]
            # float32 variant (and seeds for random methods)
            seeds = range(args.evo_seeds) if e["random"] else [None]
            e["evo_f32_dirs"] = []
            for s in seeds:
                target = cfg32
                if s is not None:
                    code, rec, err = K.run_evomerge(["convert", str(cfg32), "--to", "evomerge"])
                    target = dirs["recipes"] / f"{c.name}.seed{s}.yml"
                    target.write_text(re.sub(r"(?m)^seed: .*$", f"seed: {s}", rec))
                dest = dirs["evo_f32"] / (c.name + ("" if s is None else f".seed{s}"))
                code, out, err = K.run_evomerge(["merge", str(target), "--out", str(dest), "--quiet"])
                if code != 0:
                    e["evomerge_f32_error"] = _norm(" ".join(K.error_of(err)), paths) or err[-500:]
                    break
                e["evo_f32_dirs"].append(str(dest))
        # mergekit jobs
        mk_jobs.append({"config": str(cfg), "out": str(dirs["mk"] / c.name), "seed": 0, "case": c.name,
                        "variant": "published"})
        for s in (range(args.mk_seeds) if e["random"] else [0]):
            mk_jobs.append({"config": str(cfg32), "out": str(dirs["mk_f32"] / f"{c.name}.seed{s}"), "seed": s,
                            "case": c.name, "variant": "f32"})
        print(f"evomerge: {c.name}: {e['evomerge']['status']}", file=sys.stderr, flush=True)

    for job, res in zip(mk_jobs, run_mergekit(mk_python, mk_jobs, work), strict=True):
        e = entries[job["case"]]
        paths = {str(dirs["configs"] / f"{job['case']}.yml"): "{config}",
                 str(dirs["configs_f32"] / f"{job['case']}.yml"): "{config}", str(fams[job["case"]]): "{models}"}
        if job["variant"] == "published":
            e["mergekit"] = {"status": "built" if res["ok"] else "refused", "seconds": res["seconds"]}
            if not res["ok"]:
                e["mergekit"]["error"] = _norm(res["error"].strip().splitlines()[-1], paths)
        else:
            e.setdefault("mk_f32_dirs", [])
            if res["ok"]:
                e["mk_f32_dirs"].append(res["out"])
            else:
                e["mergekit_f32_error"] = _norm(res["error"].strip().splitlines()[-1], paths)

    # comparisons
    for c in cases:
        e = entries[c.name]
        fam = fams[c.name]
        inputs = [fam / v for v in dict.fromkeys(e["stand_ins"].values())]
        evo32, mk32 = e.get("evo_f32_dirs") or [], e.get("mk_f32_dirs") or []
        try:
            if evo32 and mk32:
                ex = A.compare_exact(Path(evo32[0]), Path(mk32[0]), args.tol)
                e["f32"] = {k: ex[k] for k in ("max_abs_diff", "worst_tensor", "tensors", "elements", "n_over_tol")}
                if e["method"] in MAGNITUDE_METHODS and ex["max_abs_diff"] > args.tol:
                    e["ties"] = tie_check(Path(evo32[0]), Path(mk32[0]), fam, e["stand_ins"], args.tol)
                if e["random"] and ex["max_abs_diff"] > args.tol:
                    e["stats"] = A.compare_stats([Path(d) for d in evo32], [Path(d) for d in mk32], fam / "base")
                    e["stats"].pop("raw", None)
                e["fp_mergekit_f32"] = K.fingerprint(Path(mk32[0]))
                e["fp_evomerge_f32"] = K.fingerprint(Path(evo32[0]))
            if e["evomerge"]["status"] == "built" and e.get("mergekit", {}).get("status") == "built":
                evo, mk = dirs["evo"] / c.name, dirs["mk"] / c.name
                if e["random"] and "stats" in e:
                    e["published"] = {"random": True}  # different masks: only the float32 statistics compare
                elif e["dtype"] in MANTISSA_BITS and mk32:
                    e["published"] = compare_lowp(evo, mk, Path(mk32[0]), inputs, e["dtype"])
                else:
                    ex = A.compare_exact(evo, mk, args.tol)
                    e["published"] = {k: ex[k] for k in ("max_abs_diff", "worst_tensor", "dtypes")}
                e["chat_template"] = compare_templates(chat_template(evo), chat_template(mk))
                cfg_e = json.loads((evo / "config.json").read_text())
                cfg_m = json.loads((mk / "config.json").read_text())
                e["layers_out"] = [cfg_e.get("num_hidden_layers"), cfg_m.get("num_hidden_layers")]
        except Exception as ex:  # a comparison that cannot run is a result too
            e["compare_error"] = f"{type(ex).__name__}: {ex}"
        e["verdict"] = verdict(e, args)
        print(f"{c.name}: {e['verdict']}", file=sys.stderr, flush=True)

    elapsed = time.perf_counter() - t_start
    load_after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    md = section(cases, entries, args, facts, load_before, load_after, elapsed)
    write_section(args.out, md)
    raw = {"facts": facts, "uptime_before": load_before, "uptime_after": load_after, "seconds": elapsed,
           "cases": [entries[c.name] for c in cases]}
    args.raw.write_text(json.dumps(raw, indent=1, default=str) + "\n")
    if args.expected:
        write_expected(cases, entries, update=bool(args.only))
    print(f"wrote {args.out} ({SECTION}) and {args.raw}")


def verdict(e: dict, args) -> str:
    ev, mk = e["evomerge"]["status"], e.get("mergekit", {}).get("status")
    if ev == "refused" and mk == "refused":
        return "both refuse"
    if ev == "refused":
        return "evomerge refuses, mergekit builds"
    if mk == "refused":
        return "mergekit refuses, evomerge builds"
    if ev != "built" or "f32" not in e or e.get("compare_error"):
        return "**error**: " + (e.get("compare_error") or e.get("evomerge_f32_error") or e.get("mergekit_f32_error")
                                or str(e["evomerge"]))
    if "stats" in e:
        return "statistically consistent" if e["stats"]["max_z"] <= args.z_tol else "**statistically inconsistent**"
    if e["f32"]["max_abs_diff"] <= args.tol:
        return "agree" + (" (no entry dropped: density 1)" if e["random"] else "")
    t = e.get("ties")
    if t and t["entries"] and t["explained"] == t["entries"]:
        return "agree up to tie-breaking"
    return "**DISAGREE**"


def _stat_txt(st: dict) -> str:
    parts = []
    for k, label in (("frac_changed", "changed"), ("mean_abs", "mean\\|Δ\\|"), ("std", "std")):
        v = st[k]
        fmt = ".4f" if k == "frac_changed" else ".3e"
        parts.append(f"{label} {v['evomerge']:{fmt}} vs {v['mergekit']:{fmt}} (z {v['z']:.1f})")
    return "; ".join(parts)


def _published_txt(e: dict) -> str:
    p = e.get("published")
    if p is None:
        return "–"
    if p.get("random"):
        return f"{e['dtype']}: built by both (random masks: compared in float32, previous column)"
    if "max_ulp_between" in p:
        v = p["vs_float32"]
        return (f"{e['dtype']}: {p['frac_differ'] * 100:.1f}% of entries differ, max {p['max_ulp_between']:.0f} ulp; "
                f"vs the float32 merge: evomerge ≤ {v['evomerge']['max_ulp']:.2g} ulp, mergekit ≤ "
                f"{v['mergekit']['max_ulp']:.3g} ulp ({v['mergekit']['frac_over_1ulp'] * 100:.2f}% > 1 ulp)")
    return f"{e['dtype']}: max \\|Δ\\| {p['max_abs_diff']:.2e}"


def section(cases, entries, args, facts, load_before, load_after, elapsed) -> str:
    es = [entries[c.name] for c in cases]
    n = len(es)
    mk_built = sum(e.get("mergekit", {}).get("status") == "built" for e in es)
    ev_built = sum(e["evomerge"]["status"] == "built" for e in es)
    both = [e for e in es if e["evomerge"]["status"] == "built" and e.get("mergekit", {}).get("status") == "built"]
    exact = [e for e in both if "f32" in e and "stats" not in e]
    agree = [e for e in exact if e["f32"]["max_abs_diff"] <= args.tol]
    ties = [e for e in exact if e["verdict"] == "agree up to tie-breaking"]
    stats = [e for e in both if "stats" in e]
    consistent = [e for e in stats if e["stats"]["max_z"] <= args.z_tol]
    worst = max((e["f32"]["max_abs_diff"] for e in agree), default=float("nan"))
    methods = sorted({e["method"] for e in es})
    lowp = [e for e in both if "vs_float32" in (e.get("published") or {})]
    ev_ulp = [e["published"]["vs_float32"]["evomerge"]["max_ulp"] for e in lowp]
    mk_ulp = [e["published"]["vs_float32"]["mergekit"]["max_ulp"] for e in lowp]
    cmd = " ".join(C.this_command("mergekit_corpus.py"))
    rows = []
    for e in es:
        if e["evomerge"]["status"] == "refused":
            evo = f"refused: {e['evomerge']['error']} (fix: {e['evomerge']['fix']})"
        else:
            evo = e["evomerge"]["status"] + (f"; {len(e['evomerge_warnings'])} warning(s)" if e["evomerge_warnings"]
                                             else "")
        mk = e.get("mergekit", {}).get("status", "?")
        if mk == "refused":
            mk += f": {e['mergekit']['error']}"
        if "stats" in e:
            f32 = _stat_txt(e["stats"])
        elif "f32" in e:
            f32 = f"{e['f32']['max_abs_diff']:.2e}"
            if e["f32"]["max_abs_diff"] > args.tol:
                f32 += f" (`{e['f32']['worst_tensor']}`; {e['f32']['n_over_tol']} of {e['f32']['elements']} entries)"
                if e.get("ties"):
                    f32 += (f"; {e['ties']['explained']} of {e['ties']['entries']} at a magnitude two entries of "
                            "one task vector share (a tie at the cut)")
        else:
            f32 = "–"
        rows.append([f"`{e['name']}`", e["method"], e["features"], mk, evo, f32, _published_txt(e), e["verdict"]])
    src_rows = [[f"`{e['name']}`", e["source"], f"{e['arch']}, {e['layers']} layers"] for e in es]
    warn_rows = [[f"`{e['name']}`", "<br>".join(e["evomerge_warnings"])] for e in es if e["evomerge_warnings"]]
    md = [SECTION, "",
          "Command:", "", "```", cmd, "```", "",
          f"Date: {facts['date']}. Machine load (`uptime`) before: `{load_before}`; after: `{load_after}`. "
          f"Wall time {elapsed:.0f} s.", "",
          "Machine: " + ", ".join(f"{k} {v}" for k, v in facts.items() if k != "date"), "",
          f"{n} configs published by others (mergekit's examples/, Hugging Face model cards, a GitHub repository; "
          "sources in the second table and in tests/fixtures/mergekit_corpus/README.md), kept verbatim; only the "
          "model references are replaced, by local stand-ins of the same architecture family (Llama or Mistral) "
          "and the same layer count as the models named (so `layer_range`s and per-layer value lists are not "
          "rescaled): hidden 64, float32, a base and correlated fine-tunes (benchmarks/_corpus.py). "
          f"{len(methods)} methods: {', '.join(methods)}.", "",
          f"- mergekit {facts.get('mergekit')} builds **{mk_built} of {n}**; evomerge builds **{ev_built} of {n}** "
          f"and refuses {n - ev_built}, each with an error and a fix line (exit 2).",
          f"- Built by both: {len(both)}. Deterministic, float32 variant (top-level `dtype: float32`, no "
          f"`out_dtype`), every tensor compared: **{len(agree)} of {len(exact)} agree** within {args.tol:g}"
          + (f", {len(ties)} more up to tie-breaking" if ties else "")
          + f" (largest max \\|Δ\\| among those {worst:.2e}). Random methods: **{len(consistent)} of {len(stats)}** "
          f"statistically consistent ({args.evo_seeds} evomerge seeds, {args.mk_seeds} mergekit seeds, "
          f"every z ≤ {args.z_tol:g}).",
          "- As published (bf16/fp16 configs): evomerge merges in float32 and rounds once; mergekit computes in "
          "the config's dtype. Differences are counted in ulps of that dtype at the inputs' scale, against "
          f"the float32 merge (column *as published*): over the {len(lowp)} deterministic bf16/fp16 configs built "
          f"by both, evomerge is within {max(ev_ulp, default=float('nan')):.2g} ulp of it everywhere, mergekit "
          f"within {max(mk_ulp, default=float('nan')):.3g} ulp.", "",
          C.md_table(["config", "method", "features", "mergekit (as published)", "evomerge (as published)",
                      "float32: max \\|Δ\\| / statistics", "as published: evomerge vs mergekit", "verdict"], rows),
          "", "### Sources and stand-ins", "",
          C.md_table(["config", "source", "stand-ins"], src_rows), "",
          "### evomerge's warnings", "",
          "(Printed by `evomerge convert`/`merge` before building, or before refusing; `{config}` is the config "
          "file; each warning is one line.)", "",
          C.md_table(["config", "warnings"], warn_rows), ""]
    md += ["### Notes", "",
           "- What differs from mergekit, config by config, is in the table's *verdict* and *evomerge* columns; "
           "the raw numbers (per config: messages, both builds' times, every comparison) are in "
           f"`{args.raw.relative_to(C.REPO) if args.raw.is_relative_to(C.REPO) else args.raw}`.",
           "- Chat templates: mergekit writes the named template (`chatml`, `llama3`, `alpaca`, `auto`) into "
           "the output's tokenizer files; evomerge writes `chatml` or a template string and warns that other "
           "names are ignored. The tensors are unaffected; per config: "
           + "; ".join(f"`{e['name']}` {e['chat_template']}" for e in es
                       if e.get("chat_template") and e["chat_template"] != "same") + ".",
           ""]
    return "\n".join(md)


NOTES = ("<!-- corpus-notes -->", "<!-- /corpus-notes -->")


def write_section(out: Path, md: str) -> None:
    """Replace the section (from its heading to the next heading of the same level, or the end) or append it.
    The written analysis between the NOTES markers is kept across re-runs (edit it when the numbers change)."""
    old = out.read_text() if out.exists() else ""
    if SECTION in old:
        start = old.index(SECTION)
        nxt = re.search(r"(?m)^## (?!#)", old[start + len(SECTION):])
        end = start + len(SECTION) + nxt.start() if nxt else len(old)
        sec = old[start:end]
        if NOTES[0] in sec and NOTES[1] in sec:
            md = md.rstrip("\n") + "\n\n" + sec[sec.index(NOTES[0]):sec.index(NOTES[1]) + len(NOTES[1])] + "\n"
        new = old[:start] + md + ("\n" + old[end:] if nxt else "")
    else:
        new = old.rstrip("\n") + "\n\n" + md
    out.write_text(new.rstrip("\n") + "\n")


def write_expected(cases, entries, update: bool = False) -> None:
    """What tests/test_mergekit_corpus.py checks evomerge against: the outcome of `evomerge convert` on the
    config as published (refused: the message; accepted: the warnings), and the float32 variant's fingerprint:
    mergekit's where the two tools agree exactly, evomerge's own (seed 0) for random methods."""
    old = json.loads(K.EXPECTED.read_text()) if K.EXPECTED.exists() else {}
    exp = dict(old) if update else {}  # update: only the cases run (--only)
    for c in cases:
        e = entries[c.name]
        x: dict = {"method": e["method"], "evomerge": e["evomerge"]["status"], "warnings": e["evomerge_warnings"]}
        if e["evomerge"]["status"] == "refused":
            x["error"], x["fix"] = e["evomerge"]["error"], e["evomerge"]["fix"]
        if "f32" in e and "stats" not in e and e["f32"]["max_abs_diff"] <= 1e-5:
            x["fingerprint"] = e["fp_mergekit_f32"]
            x["fingerprint_of"] = "mergekit's float32 build (evomerge's agrees within 1e-5 in every entry)"
        elif "stats" in e:
            x["fingerprint"] = e["fp_evomerge_f32"]
            x["fingerprint_of"] = "evomerge's own float32 build, seed 0 (random method: mergekit agrees statistically)"
        elif e["verdict"] == "agree up to tie-breaking":
            x["fingerprint"] = e["fp_evomerge_f32"]
            x["fingerprint_of"] = "evomerge's own float32 build (mergekit's differs only at ties at a magnitude cut)"
        x["mergekit"] = e.get("mergekit", {}).get("status")
        if "fingerprint_by_cpu" in old.get(c.name, {}) and "fingerprint" in x:
            # a method whose build depends on the CPU's vector unit (Arcee Fusion's softmax/log): the fingerprints
            # recorded on machines with another unit are kept, this machine's is updated
            import torch

            x["fingerprint_by_cpu"] = {**old[c.name]["fingerprint_by_cpu"],
                                       torch.backends.cpu.get_cpu_capability(): x["fingerprint"]}
        exp[c.name] = x
    K.EXPECTED.write_text(json.dumps(exp, indent=1, sort_keys=True) + "\n")
    print(f"wrote {K.EXPECTED}")


if __name__ == "__main__":
    main()
