"""The run directory: everything needed to resume and export a search, written safely.

    RUN_DIR/config.yaml    the resolved search config (written once, atomically)
    RUN_DIR/ledger.jsonl   append-only records, one per line: "<crc32> <json>"; every completed evaluation
                           and validation, fsync'd as it is written
    RUN_DIR/.lock          held (flock) by the controller that runs the search

The ledger is the source of truth: resuming rebuilds the optimizer by replaying it. A torn last line
(the controller killed mid-write) is detected by its checksum and dropped; damage anywhere else is
reported, never silently skipped.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
import zlib
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError

LEDGER = "ledger.jsonl"
CONFIG = "config.yaml"


def write_atomic(path: Path, text: str) -> None:
    """Write a file so that readers see the old or the new content, never a mix."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _encode(record: dict[str, Any]) -> str:
    # keys keep their order: a recipe's model order is part of its meaning (the reference model, tie-breaking)
    body = json.dumps(record, separators=(",", ":"), allow_nan=False)
    return f"{zlib.crc32(body.encode()):08x} {body}\n"


def read_ledger(path: Path) -> tuple[list[dict[str, Any]], int]:
    """(records, byte length of the valid prefix). A bad final line is a torn write and is left out."""
    if not path.exists():
        return [], 0
    data = path.read_bytes()
    records: list[dict[str, Any]] = []
    good = 0
    lines = data.split(b"\n")
    for i, raw in enumerate(lines):
        if not raw:
            if i != len(lines) - 1:
                raise EvomergeError(f"{path}: empty line {i + 1} inside the ledger", "the ledger is damaged")
            continue
        ok = False
        try:
            crc, body = raw.split(b" ", 1)
            ok = int(crc, 16) == zlib.crc32(body)
            rec = json.loads(body) if ok else None
        except (ValueError, UnicodeDecodeError):
            ok = False
        complete_line = i < len(lines) - 1  # followed by a newline
        if not ok or not complete_line:
            if i >= len(lines) - 2:  # the last line: a torn write
                break
            raise EvomergeError(f"{path}: line {i + 1} of {len(lines) - 1} fails its checksum",
                                "the ledger was modified or the disk is damaged; restore it from a backup")
        records.append(rec)
        good += len(raw) + 1
    return records, good


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock_fd: int | None = None
        self._ledger = None

    @property
    def ledger_path(self) -> Path:
        return self.path / LEDGER

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    def exists(self) -> bool:
        return self.config_path.is_file()

    def lock(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise EvomergeError(f"another controller (pid {holder}) is running a search in {self.path}",
                                "wait for it to finish, or stop it before resuming") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._ledger is not None:
            self._ledger.close()
            self._ledger = None
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def records(self) -> list[dict[str, Any]]:
        return read_ledger(self.ledger_path)[0]

    def open_ledger(self) -> list[dict[str, Any]]:
        """Records so far; drops a torn final line so that appends continue a clean file."""
        records, good = read_ledger(self.ledger_path)
        if self.ledger_path.exists() and self.ledger_path.stat().st_size != good:
            with open(self.ledger_path, "r+b") as f:
                f.truncate(good)
        self._ledger = open(self.ledger_path, "a", encoding="utf-8")  # noqa: SIM115 - held for the run
        return records

    def append(self, record: dict[str, Any], sync: bool = True) -> None:
        """Append one record; with sync=False the caller groups several appends under one `sync()`."""
        assert self._ledger is not None, "open_ledger() first"
        self._ledger.write(_encode(record))
        if sync:
            self.sync()

    def sync(self) -> None:
        self._ledger.flush()
        os.fsync(self._ledger.fileno())
