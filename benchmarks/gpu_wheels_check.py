"""Check, here, that the carried wheels install on the GPU machine: resolve the install gpu_check.sh does.

    python benchmarks/gpu_wheels_check.py .bench/gpu-wheels

The GPU machine (Python 3.12, no network) has PyTorch, transformers and the packages listed in IMAGE. This
makes an empty stand-in wheel (name and version, no code, no requirements) for each of those, then asks pip
to resolve `-r engine.txt -r lmeval.txt` for Python 3.12 / manylinux x86-64 from the carried wheels and the
stand-ins only (`pip install --dry-run --no-index --target ...`): it fails if a requirement is met by neither.
Versions: where the device docs list one (pip list seen 2026-11) it is used; the rest are unknown and taken
from this machine's environment ("assumed"). A second scenario gives the image an older pyarrow and
typing-extensions and a newer fsspec, which the carried fallbacks must cover.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

# The packages of the device machines' image 'cuda' (/work/.library/device/KINDS.md, read 2026-11-17).
IMAGE = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro onnx onnx-ir
onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint
packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil
pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov
pytest-mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu
safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio
torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions
typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp""".split()
SEEN = {"accelerate": "1.15.0", "huggingface-hub": "1.33.0", "numpy": "2.5.2", "safetensors": "0.8.0",
        "tokenizers": "0.23.2", "torch": "2.11.0", "transformers": "5.17.0", "sentencepiece": "0.2.2",
        "jax": "0.11.2", "jaxlib": "0.11.2", "triton": "3.6.0", "torchvision": "0.26.0", "torchaudio": "2.11.0"}
SCENARIOS = {
    "image as listed (unlisted versions assumed = this machine's)": {},
    "older pyarrow and typing-extensions, newer fsspec": {"pyarrow": "21.0.0", "typing-extensions": "4.15.0",
                                                         "fsspec": "2026.12.0"},
}
TARGET = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312",
          "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
          "--platform", "manylinux2014_x86_64"]


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def stub_wheel(folder: Path, name: str, version: str) -> None:
    dist = f"{norm(name).replace('-', '_')}-{version}"
    with zipfile.ZipFile(folder / f"{dist}-py3-none-any.whl", "w") as z:
        z.writestr(f"{dist}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: stub\nRoot-Is-Purelib: true\n"
                                              "Tag: py3-none-any\n")
        z.writestr(f"{dist}.dist-info/RECORD", "")


def main() -> int:
    wheels = Path(sys.argv[1] if len(sys.argv) > 1 else ".bench/gpu-wheels").resolve()
    local = {norm(d.metadata["Name"]): d.version for d in md.distributions()}
    ok = True
    for title, override in SCENARIOS.items():
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            stubs = tmp / "image"
            stubs.mkdir()
            versions = {}
            for name in IMAGE:
                v = override.get(name) or SEEN.get(name) or local.get(norm(name)) or "1.0"
                versions[name] = v
                stub_wheel(stubs, name, v)
            report = tmp / "report.json"
            cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--no-index", "--ignore-installed",
                   "--find-links", str(wheels), "--find-links", str(stubs), *TARGET, "--target", str(tmp / "t"),
                   "--report", str(report), "-r", str(wheels / "engine.txt"), "-r", str(wheels / "lmeval.txt")]
            r = subprocess.run(cmd, capture_output=True, text=True)
            print(f"\n[{title}]" + (f" pyarrow {versions['pyarrow']}, typing-extensions "
                                     f"{versions['typing-extensions']}, fsspec {versions['fsspec']}"))
            if r.returncode != 0:
                ok = False
                print("  RESOLUTION FAILED:\n" + (r.stderr or r.stdout)[-3000:])
                continue
            items = json.loads(report.read_text())["install"]
            carried = sorted(f"{i['metadata']['name']} {i['metadata']['version']}" for i in items
                             if "/image/" not in i["download_info"]["url"])
            image = sorted(f"{i['metadata']['name']}" for i in items if "/image/" in i["download_info"]["url"])
            print(f"  resolves: {len(carried)} carried wheels installed: {', '.join(carried)}")
            print(f"  taken from the image: {', '.join(image)}")
    print("\nwheel check: " + ("the install resolves" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
