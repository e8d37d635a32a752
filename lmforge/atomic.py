"""Writes that never leave a half-written file or folder behind: everything lmforge saves goes
through here (tokenizer files, results, exports, adapters, Space folders)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder, renamed at the end."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, values: dict) -> None:
    """``values`` as indented JSON, written like :func:`write_text`."""
    write_text(path, json.dumps(values, indent=2) + "\n")


@contextmanager
def staged_folder(out_dir: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``out_dir`` to fill; on success it becomes ``out_dir``, on any
    failure (Ctrl-C included) it is removed. ``out_dir`` must not exist, before or after."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"folder {out_dir} already exists; remove it or choose another")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        yield tmp
        if out_dir.exists():
            raise FileExistsError(f"folder {out_dir} appeared while writing; nothing was written there")
        tmp.chmod(0o755)  # mkdtemp makes it private to this user; a saved folder should not be
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
