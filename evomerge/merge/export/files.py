"""Writing a model directory from a stream of tensors: output-path checks, a temporary folder renamed into place, and
the clean-up of folders an interrupted write left behind."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from evomerge.errors import EvomergeError
from evomerge.merge.export.safetensors_writer import StreamingWriter

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")


def check_output_path(out_dir: Path) -> None:
    """The output directory can be made: it does not exist, its parent is a writable directory. Removes the
    temporary directories that killed writes to the same output left beside it (see `remove_stale_temps`)."""
    out_dir = Path(out_dir)
    if out_dir.exists() or out_dir.is_symlink():
        raise EvomergeError(f"output path '{out_dir}' already exists",
                            "choose a new --out directory, or remove the old one first")
    parent = out_dir.parent
    for above in (parent, *parent.parents):  # a regular file somewhere above the output
        if above.exists() and not above.is_dir():
            raise EvomergeError(f"cannot write '{out_dir}': '{above}' is a file, not a directory",
                                "choose an --out path inside a directory")
        if above.exists():
            break
    if not parent.exists():
        raise EvomergeError(f"the parent directory of '{out_dir}' does not exist", "create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise EvomergeError(f"cannot write '{out_dir}': the directory '{parent}' is not writable (permissions or a "
                            "read-only filesystem)", "choose an --out path in a directory you can write to")
    remove_stale_temps(out_dir)


def check_tokenizer_files(tokenizer_dir: Path) -> None:
    """The JSON tokenizer files the output would carry parse (a garbage tokenizer.json copied into the output
    makes a model directory that cannot be loaded)."""
    for fname in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                  "vocab.json"):
        f = tokenizer_dir / fname
        if not f.is_file():
            continue
        try:
            json.loads(f.read_bytes())
        except (ValueError, UnicodeDecodeError) as e:
            raise EvomergeError(f"{f} is not valid JSON ({str(e).splitlines()[0][:120]}): the output's tokenizer could "
                                "not be loaded", "copy the tokenizer files of that model again, or choose another "
                                "tokenizer source (tokenizer_source / tokenizer: {source: ...})") from None


def _temp_prefix(out: Path) -> str:
    return f".{out.name}.tmp-"


def remove_stale_temps(out: Path) -> list[Path]:
    """Remove the hidden temporary directories (`.NAME.tmp-PID-XXXX`) that writes of `out` killed before their
    rename (SIGKILL, power loss) left beside it, unless their writer is still running on this machine."""
    removed = []
    for tmp in sorted(out.parent.glob(_temp_prefix(out) + "*")):
        pid = tmp.name[len(_temp_prefix(out)):].split("-", 1)[0]
        if pid.isdigit() and _alive(int(pid)) or not tmp.is_dir() or tmp.is_symlink():
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    if removed:
        from evomerge.errors import warn

        warn(f"removed {len(removed)} unfinished output(s) of an earlier interrupted write beside {out}: "
             + ", ".join(p.name for p in removed))
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_dir(out_dir: str | Path, entries: list[tuple[str, tuple[int, ...]]],
              tensors: Iterable[tuple[str, Any]], dtype: str, config: dict[str, Any], *, tokenizer_dir: Path,
              generation_dir: Path, files: dict[str, str], metadata: dict[str, str],
              max_shard_bytes: int | None = 5 * 2**30, progress: Callable[[int, int], None] | None = None,
              chat_template: str | None = None) -> Path:
    """Write a model directory atomically: weights streamed in `entries` order, config, tokenizer, `files`
    (and `chat_template`, when given, as the tokenizer's chat template)."""
    out = Path(out_dir)
    check_output_path(out)
    check_tokenizer_files(Path(tokenizer_dir))
    tmp = Path(tempfile.mkdtemp(prefix=f"{_temp_prefix(out)}{os.getpid()}-", dir=out.parent))
    writer = None
    try:
        writer = StreamingWriter(tmp, entries, dtype, max_shard_bytes, metadata=metadata)
        for i, (name, tensor) in enumerate(tensors):
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise EvomergeError(f"the merged tensor {name} is not finite (NaN or inf); nothing was written",
                                    "a source model holds NaN/inf weights, or the merge overflows its dtype: check "
                                    "the sources (a fine-tune that diverged?) or merge in float32")
            writer.write(name, tensor)
            if progress:
                progress(i + 1, len(entries))
        writer.close()
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for fname in TOKENIZER_FILES + ("generation_config.json",):
            src = (tokenizer_dir if fname != "generation_config.json" else generation_dir) / fname
            if src.is_file() and not (chat_template is not None and fname.startswith("chat_template.")):
                shutil.copyfile(src, tmp / fname)
        if chat_template is not None:  # the recipe's template replaces the tokenizer's (a .jinja file would win)
            tc = tmp / "tokenizer_config.json"
            tok_cfg = json.loads(tc.read_text()) if tc.is_file() else {}
            tok_cfg["chat_template"] = chat_template
            tc.write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")
        for fname, text in files.items():
            (tmp / fname).write_text(text)
        os.chmod(tmp, 0o755)
        os.rename(tmp, out)
    except BaseException:
        if writer is not None:
            writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
