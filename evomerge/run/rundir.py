"""The run directory: everything needed to resume and export a search, written safely.

    RUN_DIR/config.yaml    the resolved search config (written once, atomically)
    RUN_DIR/ledger.jsonl   append-only records, one per line: "<crc32> <json>"; every completed evaluation
                           and validation, fsync'd as it is written
    RUN_DIR/config.sha256.json  the checksum (and content) of config.yaml as evomerge wrote it: `resume`
                           refuses a config.yaml edited by hand since, showing what changed
    RUN_DIR/.lock          held (flock) by the controller that runs the search

The ledger is the source of truth and the run's checkpoint: resuming rebuilds the optimizer by replaying
it, and it only ever grows by appends (the cost of a checkpoint does not grow with the run). A torn last
line (the controller killed mid-write) is detected by its checksum and dropped; damage before the end
(a bad checksum) sends the run back to its last good record, with the damaged rest kept in a side file
and the user told. A full disk cuts the ledger back to its last complete record and stops the search with
a clear message; nothing already recorded is lost.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError, warn
from evomerge.merge.atomic import disk_full, write_atomic, write_atomic_bytes

LEDGER = "ledger.jsonl"
CONFIG = "config.yaml"
CONFIG_RECORD = "config.sha256.json"  # the checksum of config.yaml as evomerge last wrote it, and its content


def _encode(record: dict[str, Any]) -> str:
    # keys keep their order: a recipe's model order is part of its meaning (the reference model, tie-breaking)
    body = json.dumps(record, separators=(",", ":"), allow_nan=False)
    return f"{zlib.crc32(body.encode()):08x} {body}\n"


@dataclass
class LedgerScan:
    records: list[dict[str, Any]]
    good: int  # byte length of the valid prefix
    torn: bool = False  # the last line was cut short (a controller killed mid-write): dropped
    damaged_line: int | None = None  # the first line that fails its checksum before the end
    dropped: int = 0  # lines from the damage on (not used)


def scan_ledger(path: Path) -> LedgerScan:
    """Read the ledger up to its first bad line. A bad final line is a torn write; a bad line before the
    end is damage (the file was edited, or the disk corrupted it): the records before it are the last good
    state of the run, and the caller decides what to tell the user."""
    if not path.exists():
        return LedgerScan([], 0)
    if not path.is_file():
        raise EvomergeError(f"{path} is not a file: the run's ledger must be the file of its records",
                            f"move '{path}' aside (it is not a ledger evomerge wrote), or give the right run "
                            "directory")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise EvomergeError(f"the ledger {path} cannot be read ({e.strerror})",
                            "check the file's permissions") from None
    records: list[dict[str, Any]] = []
    good = 0
    lines = data.split(b"\n")
    for i, raw in enumerate(lines):
        last = i >= len(lines) - 2  # the final line (or the empty string after the final newline)
        if not raw and i == len(lines) - 1:
            break
        ok = False
        try:
            crc, body = raw.split(b" ", 1)
            ok = int(crc, 16) == zlib.crc32(body)
            rec = json.loads(body) if ok else None
        except (ValueError, UnicodeDecodeError):
            ok = False
        if not ok or i == len(lines) - 1:  # bad, or not followed by a newline
            if last:
                return LedgerScan(records, good, torn=True)
            rest = sum(1 for x in lines[i:] if x)
            return LedgerScan(records, good, damaged_line=i + 1, dropped=rest)
        records.append(rec)
        good += len(raw) + 1
    return LedgerScan(records, good)


def read_ledger(path: Path) -> tuple[list[dict[str, Any]], int]:
    """(records, byte length of the valid prefix); damage before the end is an error here."""
    scan = scan_ledger(path)
    if scan.damaged_line is not None:
        raise EvomergeError(f"{path}: line {scan.damaged_line} fails its checksum",
                            "resume the run (`evomerge resume`): it keeps the records before the damage and sets the "
                            "rest aside, or restore the ledger from a backup")
    return scan.records, scan.good


def check_new_run_dir(path: Path) -> None:
    """A --run-dir a new search can use: a directory (or a path that can become one) that is writable."""
    path = Path(path)
    for above in (path, *path.parents):
        if above.exists() and not above.is_dir():
            what = "is a file" if above == path else f"lies under the file '{above}'"
            raise EvomergeError(f"--run-dir '{path}' {what}, not a directory",
                                "give a new directory path (it is created) or an existing directory")
        if above.exists():
            if not os.access(above, os.W_OK | os.X_OK):
                raise EvomergeError(f"--run-dir '{path}': the directory '{above}' is not writable (permissions or "
                                    "a read-only filesystem)", "give a --run-dir in a directory you can write to")
            return


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

    def write_config(self, text: str) -> None:
        """Write config.yaml and, after it, its checksum record (both atomically)."""
        import hashlib

        from evomerge.merge.yaml_io import load_yaml_text

        digest = hashlib.sha256(text.encode()).hexdigest()
        if self.config_path.is_file() and self.config_path.read_text() == text and self._recorded_digest() == digest:
            return  # unchanged, and so recorded: nothing is rewritten
        write_atomic(self.config_path, text)
        rec = {"sha256": digest, "config": load_yaml_text(text)}
        write_atomic(self.path / CONFIG_RECORD, json.dumps(rec, indent=1) + "\n")

    def _recorded_digest(self) -> str | None:
        try:
            return json.loads((self.path / CONFIG_RECORD).read_text()).get("sha256")
        except (OSError, ValueError, AttributeError):
            return None

    def config_edits(self, text: str | None = None) -> list[str]:
        """What was changed by hand in config.yaml since evomerge wrote it ("key: recorded -> now" lines); empty
        when nothing was, or when the run predates checksum records. With `text`: what differs between the
        recorded config and that config text (what a resume is about to write)."""
        import hashlib

        from evomerge.merge.yaml_io import load_yaml_text, read_yaml

        rec_path = self.path / CONFIG_RECORD
        if not rec_path.is_file():
            return []
        try:
            rec = json.loads(rec_path.read_text())
            recorded, digest = rec["config"], rec["sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            raise EvomergeError(f"{rec_path} is damaged: the checksum of the run's config cannot be checked",
                                "restore it from a backup, or delete it to resume without the check") from None
        data = text.encode() if text is not None else self.config_path.read_bytes()
        if hashlib.sha256(data).hexdigest() == digest:
            return []
        now = load_yaml_text(text) if text is not None else read_yaml(self.config_path)
        old, new = _flatten(recorded), _flatten(now if isinstance(now, dict) else {"(top level)": now})
        lines = [f"{k}: {old.get(k, '(absent)')} -> {new.get(k, '(absent)')}"
                 for k in sorted(set(old) | set(new)) if old.get(k, _ABSENT) != new.get(k, _ABSENT)]
        if not lines:  # the same values written differently (comments, spacing, quoting)
            return [] if load_yaml_text(data.decode()) == recorded else ["(formatting)"]
        return lines

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
        for stale in [*self.path.glob(f".{CONFIG}.*"), *self.path.glob(f".{LEDGER}.*"),
                      *self.path.glob(f".{CONFIG_RECORD}.*")]:
            stale.unlink(missing_ok=True)  # temporary files of a controller killed mid atomic write

    def unlock(self) -> None:
        if self._ledger is not None:
            self._ledger.close()
            self._ledger = None
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def records(self) -> list[dict[str, Any]]:
        """The run's records, read-only: with damage before the end, those before it (and a warning)."""
        scan = scan_ledger(self.ledger_path)
        if scan.damaged_line is not None:
            warn(f"{self.ledger_path}: line {scan.damaged_line} fails its checksum; showing the "
                 f"{len(scan.records)} records before it (`evomerge resume` repairs the ledger)")
        return scan.records

    def open_ledger(self) -> list[dict[str, Any]]:
        """Records so far, ready to append. A torn final line (a controller killed mid-write) is dropped; a
        damaged line before the end is treated like a bad checkpoint: the ledger goes back to the last good
        record, the damaged rest is kept in a side file, and the user is told. Evaluations set aside are
        asked again (the optimizers replay or rebuild from the records kept)."""
        scan = scan_ledger(self.ledger_path)
        if scan.damaged_line is not None:
            aside = self.path / f"{LEDGER}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"
            data = self.ledger_path.read_bytes()
            write_atomic_bytes(aside, data)
            write_atomic_bytes(self.ledger_path, data[:scan.good])
            warn(f"the ledger of {self.path} is damaged at line {scan.damaged_line} (checksum mismatch): resuming "
                 f"from the {len(scan.records)} good records before it; the damaged part ({scan.dropped} lines) "
                 f"is kept in {aside.name} and those evaluations will be redone")
        elif scan.torn:
            warn(f"the last record of {self.ledger_path} was cut short (the controller stopped mid-write); it is "
                 "dropped and that evaluation will be redone")
            with open(self.ledger_path, "r+b") as f:
                f.truncate(scan.good)
        self._ledger = open(self.ledger_path, "ab")  # noqa: SIM115 - held for the run
        self._synced = scan.good
        return scan.records

    def append(self, record: dict[str, Any], sync: bool = True) -> None:
        """Append one record; with sync=False the caller groups several appends under one `sync()`."""
        assert self._ledger is not None, "open_ledger() first"
        try:
            self._ledger.write(_encode(record).encode())
        except OSError as e:
            self._roll_back(e)
        if sync:
            self.sync()

    def sync(self) -> None:
        """Flush and fsync the appends so far; if the disk is full, cut the ledger back to the last synced
        record (so it never ends in a partial line) and stop with a clear message."""
        try:
            self._ledger.flush()
            os.fsync(self._ledger.fileno())
        except OSError as e:
            self._roll_back(e)
        self._synced = self._ledger.tell()

    def _roll_back(self, e: OSError) -> None:
        try:
            self._ledger.close()
        except OSError:
            pass  # the buffered bytes could not be written either: the truncate below removes what was
        with open(self.ledger_path, "r+b") as f:
            f.truncate(self._synced)
        self._ledger = open(self.ledger_path, "ab")  # noqa: SIM115
        if disk_full(e):
            raise EvomergeError(f"the disk is full: could not write the ledger of {self.path} ({e.strerror})",
                                "free some space, then `evomerge resume " + str(self.path) + "`: every "
                                "evaluation recorded so far is intact") from e
        raise EvomergeError(f"could not write the ledger of {self.path}: {e}",
                            "check the disk, then `evomerge resume` the run") from e


_ABSENT = object()


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict) and d:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


BUDGET_KEYS = ("optimizer.budget", "dataflow.budget")
# where and how fast the search runs, not what it searches or how it scores: `resume --accept-edits` takes edits of
# these (recorded in the ledger as a `config_edit` record); any other edit would mix two searches in one ledger
OPERATIONAL_KEYS = ("workers.count", "workers.cpus", "workers.gpus", "workers.timeout_s", "workers.device_sources")




REPORT_DIR = "report"


INDEX = "index.html"


def report_index(run_dir: str | Path) -> Path | None:
    """RUN_DIR/report/index.html when a report has been written there (what `evomerge status` points to)."""
    p = Path(run_dir) / REPORT_DIR / INDEX
    return p if p.is_file() else None
