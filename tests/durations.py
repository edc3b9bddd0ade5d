"""Write tests/durations.json (seconds per test file) from a JUnit report, for conftest's longest-first order.

    python -m pytest -n 2 --dist loadfile --no-loadscope-reorder --junitxml=/tmp/junit.xml
    python tests/durations.py /tmp/junit.xml

Run it again when files grow or new slow ones appear; a file missing from the table simply runs last.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET  # noqa: S405 — our own pytest report, not untrusted input
from collections import defaultdict
from pathlib import Path


def _file(classname: str) -> str:
    """`tests.test_x` or `tests.test_x.TestCase` -> `tests/test_x.py` (the longest prefix that is a file)."""
    parts = classname.split(".")
    root = Path(__file__).resolve().parents[1]
    for n in range(len(parts), 0, -1):
        path = "/".join(parts[:n]) + ".py"
        if (root / path).is_file():
            return path
    return "/".join(parts) + ".py"


def per_file(junit: Path) -> dict[str, float]:
    seconds: dict[str, float] = defaultdict(float)
    for case in ET.parse(junit).iter("testcase"):  # noqa: S314
        seconds[_file(case.get("classname", ""))] += float(case.get("time") or 0.0)
    return {k: round(v, 1) for k, v in sorted(seconds.items(), key=lambda kv: -kv[1])}


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    table = per_file(Path(sys.argv[1]))
    out = Path(__file__).with_name("durations.json")
    out.write_text(json.dumps(table, indent=1) + "\n")
    print(f"{len(table)} files, {sum(table.values()) / 60:.1f} min in all -> {out}")
