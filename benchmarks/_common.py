"""Shared helpers of the benchmarks: the mergekit venv, machine facts, model directories, tensor I/O,
measured subprocesses.

Nothing here asserts a time: benchmarks measure and write tables.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / ".bench"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
os.environ.update(OFFLINE)

NON_WEIGHT_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt",
                    "added_tokens.json", "chat_template.jinja", "chat_template.json")


# ---- environment --------------------------------------------------------------------------------

def env() -> dict[str, str]:
    """The environment for every subprocess: offline, and the project's venv first on PATH."""
    e = dict(os.environ, **OFFLINE)
    e["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{e.get('PATH', '')}"
    return e


def mergekit_python() -> Path:
    """The isolated mergekit venv's python (creates the venv on first use; idempotent)."""
    out = subprocess.run(["bash", str(REPO / "benchmarks" / "mergekit_env.sh")], check=True, env=env(),
                         stdout=subprocess.PIPE, text=True).stdout
    return Path(out.strip().splitlines()[-1])


def _version(py: Path | str, dist: str) -> str:
    code = f"import importlib.metadata as m; print(m.version({dist!r}))"
    r = subprocess.run([str(py), "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                       env=env())
    return r.stdout.strip() or "n/a"


def machine_facts(mk_python: Path | None) -> dict[str, str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "unknown"
    try:
        kb = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        mem = f"{kb / 2**20:.1f} GiB"
    except (OSError, IndexError, ValueError):
        pass
    import torch

    facts = {
        "date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "nproc": str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()),
        "cpu": cpu,
        "memory": mem,
        "python": platform.python_version(),
        "torch (evomerge venv)": torch.__version__,
        "torch threads": str(torch.get_num_threads()),
        "transformers (evomerge venv)": _version(sys.executable, "transformers"),
    }
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "evomerge", "workers"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout.strip()
        facts["evomerge commit"] = (head or "unknown") + (" + uncommitted changes" if dirty else "")
    except OSError:
        pass
    if mk_python is not None:
        facts["mergekit"] = _version(mk_python, "mergekit")
        facts["torch (mergekit venv)"] = _version(mk_python, "torch")
        facts["transformers (mergekit venv)"] = _version(mk_python, "transformers")
    return facts


def header_md(title: str, argv: list[str], facts: dict[str, str]) -> str:
    """The top of a results file: the exact command, the date and the machine facts, then the title."""
    cmd = " ".join(shlex.quote(a) for a in argv)
    lines = ["Command:", "", "```", cmd, "```", "",
             f"Date: {facts['date']}", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in facts.items() if k != "date"), "",
             f"# {title}", ""]
    return "\n".join(lines)


def this_command(script: str) -> list[str]:
    """How the running benchmark was invoked, as a reproducible command line (relative to the repo)."""
    return ["HF_HUB_OFFLINE=1", "HF_DATASETS_OFFLINE=1", ".venv/bin/python", f"benchmarks/{script}", *sys.argv[1:]]


# ---- model directories ----------------------------------------------------------------------------

def weight_files(model_dir: Path) -> list[Path]:
    return sorted(Path(model_dir).glob("*.safetensors"))


def weight_bytes(model_dir: Path) -> int:
    return sum(f.stat().st_size for f in weight_files(model_dir))


def load_tensors(model_dir: Path) -> dict:
    """All tensors of a model directory (every safetensors shard), as torch tensors."""
    from safetensors.torch import load_file

    out = {}
    for f in weight_files(model_dir):
        out.update(load_file(str(f)))
    return out


def derive_finetunes(base_dir: Path, out_root: Path, names: list[str], *, scale: float, seed: int,
                     shared: float = 0.5) -> dict[str, Path]:
    """Save "fine-tunes" of `base_dir` as HF model directories: for every tensor t and fine-tune k,
    t_k = t + scale * rms(t) * (sqrt(shared) * c + sqrt(1 - shared) * n_k), with c a noise shared by all
    fine-tunes (a common task direction, so task vectors correlate as real fine-tunes do) and n_k its
    own. Seeded, float32 like the base; config and tokenizer files are copied. Cached by directory."""
    import torch
    from safetensors.torch import save_file

    out_root = Path(out_root)
    paths = {n: out_root / n for n in names}
    if all((p / "config.json").exists() and weight_files(p) for p in paths.values()):
        return paths
    base = load_tensors(base_dir)
    g = torch.Generator().manual_seed(seed)
    common = {}
    for name in sorted(base):
        common[name] = torch.randn(base[name].shape, generator=g)
    a, b = shared ** 0.5, (1 - shared) ** 0.5
    for k, n in enumerate(names):
        gk = torch.Generator().manual_seed(seed + 1000 * (k + 1))
        state = {}
        for name in sorted(base):
            t = base[name]
            rms = t.float().pow(2).mean().sqrt().clamp(min=1e-3)
            noise = torch.randn(t.shape, generator=gk)
            state[name] = (t.float() + scale * rms * (a * common[name] + b * noise)).to(t.dtype).contiguous()
        tmp = out_root / f".{n}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for f in NON_WEIGHT_FILES:
            if (Path(base_dir) / f).is_file():
                shutil.copyfile(Path(base_dir) / f, tmp / f)
        shutil.rmtree(paths[n], ignore_errors=True)
        tmp.rename(paths[n])
        del state
    return paths


def warm_page_cache(dirs: list[Path]) -> None:
    """Read every weight file once so later reads hit the page cache."""
    for d in dirs:
        for f in weight_files(d):
            with open(f, "rb") as fh:
                while fh.read(64 << 20):
                    pass


# ---- measured subprocesses ------------------------------------------------------------------------

def _status_kb(pid: int, keys: tuple[str, ...]) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in keys:
                    out[k] = int(v.split()[0])
    except (OSError, ValueError):
        pass
    return out


@dataclass
class Measured:
    wall_s: float
    max_rss_mb: float  # the kernel's peak resident set (anonymous + file-backed pages, incl. mmapped inputs)
    peak_anon_mb: float  # peak of sampled RssAnon (private memory; excludes page-cache-backed mmaps)
    rc: int
    stdout: str
    stderr: str


def run_measured(cmd: list[str], *, cwd: Path | None = None, timeout: float | None = None,
                 sample_s: float = 0.01) -> Measured:
    """Run `cmd` as its own process: wall time (parent clock, process start to exit), the kernel's peak
    RSS of that one process (os.wait4 rusage), and the peak of its RssAnon sampled every `sample_s`."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = {"anon": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            s = _status_kb(p.pid, ("RssAnon",))
            if "RssAnon" in s:
                peak["anon"] = max(peak["anon"], s["RssAnon"])
            done.wait(sample_s)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    # Drain pipes in threads so a chatty child never blocks; reap with wait4 for its own rusage.
    bufs: dict[str, str] = {}

    def drain(name: str, stream) -> None:
        bufs[name] = stream.read()

    readers = [threading.Thread(target=drain, args=(n, s), daemon=True) for n, s in (("out", p.stdout),
                                                                                     ("err", p.stderr))]
    for r in readers:
        r.start()
    deadline = None if timeout is None else t0 + timeout
    while True:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid == p.pid:
            break
        if deadline is not None and time.perf_counter() > deadline:
            p.kill()
        time.sleep(0.002)
    wall = time.perf_counter() - t0
    done.set()
    th.join()
    for r in readers:
        r.join()
    p.returncode = os.waitstatus_to_exitcode(status)
    return Measured(wall, ru.ru_maxrss / 1024, peak["anon"] / 1024, p.returncode, bufs.get("out", ""),
                    bufs.get("err", ""))


def last_json(text: str) -> dict:
    """The last line of `text` that parses as a JSON object (drivers print their result that way)."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise ValueError(f"no JSON result in output:\n{text[-2000:]}")


def fmt(x: float | None, nd: int = 2) -> str:
    if x is None:
        return "–"
    if x != x:  # NaN
        return "n/a"
    return f"{x:.{nd}f}"


def md_table(headers: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def write_results(out: Path, text: str, raw: dict) -> None:
    """Write a results file: `text`, then the written analysis of the previous version (between
    `<!-- notes -->` and `<!-- /notes -->`, kept across re-runs: edit it when the numbers change), then the
    raw numbers as JSON."""
    old = out.read_text() if out.exists() else ""
    if "<!-- notes -->" in old and "<!-- /notes -->" in old:
        text += "\n" + old[old.index("<!-- notes -->"):old.index("<!-- /notes -->") + len("<!-- /notes -->")] + "\n"
    text += "\n<!-- raw -->\n```json\n" + json.dumps(raw) + "\n```\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


def write_section(out: Path, marker: str, text: str) -> None:
    """Replace the section of `out` that carries `marker` (or add it): results files that hold one section per
    device or kind of run, each rewritten by its own run."""
    out.parent.mkdir(parents=True, exist_ok=True)
    old = out.read_text() if out.exists() else ""
    sections = [s for s in old.split("\n<!-- section -->\n") if s.strip() and marker not in s]
    sections.append(marker + "\n" + text)
    out.write_text("\n<!-- section -->\n".join(sections))
