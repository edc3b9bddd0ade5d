"""The run report of the quickstart search, committed under results/, and a screenshot of it in headless Chromium.

    evomerge search configs/quickstart.yaml --run-dir runs/report-quickstart     (unless --reuse and it exists)
    evomerge report runs/report-quickstart --baselines --out results/report-quickstart
    chromium --headless --screenshot=results/report-quickstart/screenshot.png file://.../index.html

Chromium is Debian's `chromium` package (`apt-get install -y chromium`); without it the screenshot is skipped
and the script says so.

Run:  HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/report_quickstart.py [--reuse]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reuse", action="store_true", help="reuse runs/report-quickstart if it holds a finished run")
    ap.add_argument("--run-dir", default=str(ROOT / "runs/report-quickstart"))
    ap.add_argument("--out", default=str(ROOT / "results/report-quickstart"))
    ap.add_argument("--height", type=int, default=5200, help="screenshot height in pixels")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    exe = str(Path(sys.executable).parent / "evomerge")
    run, out = Path(args.run_dir), Path(args.out)
    if not (ROOT / "zoo-small" / "zoo.json").exists():
        subprocess.run([exe, "zoo", "build", str(ROOT / "zoo-small"), "--size", "small"], cwd=ROOT, check=True)
    if not (args.reuse and (run / "ledger.jsonl").exists()):
        shutil.rmtree(run, ignore_errors=True)
        subprocess.run([exe, "search", "configs/quickstart.yaml", "--run-dir", str(run), "-q"], cwd=ROOT, check=True)
    subprocess.run([exe, "report", str(run), "--baselines", "--out", str(out)], cwd=ROOT, check=True)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("no headless Chromium (apt-get install -y chromium): screenshot skipped")
        return
    shot = out / "screenshot.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={shot}", f"--window-size=1400,{args.height}", (out / "index.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    print(f"wrote {out / 'index.html'} and {shot}")


if __name__ == "__main__":
    main()
