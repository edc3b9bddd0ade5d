"""Real mergekit configs (tests/fixtures/mergekit_corpus/, sources in its README) through evomerge's command line,
without mergekit.

Each config is pointed at small local stand-in models (benchmarks/_corpus.py) and must do, through the `evomerge`
command's entry point, what tests/fixtures/mergekit_corpus/expected.json records (written by
benchmarks/mergekit_corpus.py --expected, which ran both tools):

- `evomerge convert` of the config as published: accepted with exactly the recorded warnings, or refused with
  exit 2, the recorded message and fix line; a refused `evomerge merge` writes nothing;
- `evomerge merge` of its float32 variant, for the deterministic configs cheap enough here: the output's
  fingerprint equals mergekit's float32 build of the same config on the same models (recorded where the two
  tools agreed within 1e-5 in every entry).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _corpus as K  # noqa: E402

CASES = {c.name: c for c in K.load_cases()}
EXPECTED = json.loads(K.EXPECTED.read_text())
# merged here (float32 variant), to stay under a minute: the configs whose recorded fingerprint is mergekit's own
# build, except the 70B ones (80-layer stand-ins). The benchmark merges all of them, random methods included.
MERGED = sorted(n for n, x in EXPECTED.items()
                if x.get("fingerprint_of", "").startswith("mergekit's") and CASES[n].layers < 80)


def test_the_corpus_is_real_and_complete():
    assert len(CASES) >= 20
    assert set(EXPECTED) == set(CASES), "run benchmarks/mergekit_corpus.py --expected after changing the corpus"
    readme = (K.CORPUS / "README.md").read_text()
    for name, c in CASES.items():
        assert c.source.startswith(("http", "Hugging Face model card")), name
        assert name in readme, f"{name} is not listed in the corpus README"
        assert K.references(c.data), name
    assert len({c.method for c in CASES.values()}) >= 15


def _convert(name: str, tmp_path: Path, root: Path) -> tuple[int, str, str, Path]:
    cfg = tmp_path / f"{name}.yml"
    cfg.write_text(K.materialize(CASES[name], K.family_dir(root, CASES[name].arch, CASES[name].layers)))
    code, out, err = K.run_evomerge(["convert", str(cfg), "--to", "evomerge"])
    return code, out, err, cfg


def _norm(text: str, cfg: Path, fam: Path) -> str:
    return " ".join(text.replace(str(cfg), "{config}").replace(str(fam), "{models}").split())


@pytest.mark.parametrize("name", sorted(CASES))
def test_evomerge_reads_the_config_as_recorded(name, tmp_path):
    x, c = EXPECTED[name], CASES[name]
    root = tmp_path / "models"  # convert reads no model: the stand-ins need not exist
    code, out, err, cfg = _convert(name, tmp_path, root)
    fam = K.family_dir(root, c.arch, c.layers)
    assert "Traceback" not in err
    assert [_norm(w, cfg, fam) for w in K.warnings_of(err)] == x["warnings"]
    if x["evomerge"] == "refused":
        problem, fix = K.error_of(err)
        assert code == 2 and fix, err
        assert (_norm(problem, cfg, fam), _norm(fix, cfg, fam)) == (x["error"], x["fix"])
        dest = tmp_path / "out"
        code, _, err = K.run_evomerge(["merge", str(cfg), "--out", str(dest), "--quiet"])
        assert code == 2 and "fix:" in err and not dest.exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([cfg.name])  # nothing written beside it
    else:
        assert code == 0, err
        assert out.startswith("method: "), out[:200]


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus") / "models"
    need: dict[tuple[str, int], int] = {}
    for n in MERGED:
        key = (CASES[n].arch, CASES[n].layers)
        need[key] = max(need.get(key, 0), K.n_finetunes(CASES[n]))
    for (arch, layers), k in need.items():
        K.build_family(root, arch, layers, k)
    return root


@pytest.mark.parametrize("name", MERGED)
def test_evomerge_builds_what_mergekit_built(name, stand_ins, tmp_path):
    x, c = EXPECTED[name], CASES[name]
    cfg = tmp_path / f"{name}.yml"
    cfg.write_text(K.materialize(c, K.family_dir(stand_ins, c.arch, c.layers), float32=True))
    dest = tmp_path / "out"
    code, _, err = K.run_evomerge(["merge", str(cfg), "--out", str(dest), "--quiet"])
    assert code == 0, err
    fp = K.fingerprint(dest)
    want = expected_fingerprint(x)
    assert K.fingerprints_match(fp, want), (fp, want, x["fingerprint_of"])


def expected_fingerprint(x: dict) -> dict:
    """The recorded fingerprint for this CPU's vector unit: Arcee Fusion's softmax/log round differently with
    AVX2 and AVX-512 kernels (in mergekit as in evomerge, which agree on either), and its outlier cut moves."""
    import torch

    return x.get("fingerprint_by_cpu", {}).get(torch.backends.cpu.get_cpu_capability(), x["fingerprint"])


def test_a_changed_merge_changes_the_fingerprint(stand_ins, tmp_path):
    """The fingerprint check can fail: mergekit's linear example with one weight changed (0.3 -> 0.35) does not
    match the recorded build."""
    name = "01_mergekit_linear"
    assert name in MERGED
    c = CASES[name]
    text = K.materialize(c, K.family_dir(stand_ins, c.arch, c.layers), float32=True)
    assert "weight: 0.3\n" in text
    cfg = tmp_path / "changed.yml"
    cfg.write_text(text.replace("weight: 0.3\n", "weight: 0.35\n", 1))
    code, _, err = K.run_evomerge(["merge", str(cfg), "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 0, err
    assert not K.fingerprints_match(K.fingerprint(tmp_path / "out"), EXPECTED[name]["fingerprint"])
