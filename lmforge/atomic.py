"""Writes that never leave a half-written file or folder under a final name: everything lmforge saves
goes through here (checkpoints, token caches, tokenizer files, results, exports, adapters, Space folders).

A file or folder is written under a temporary name in the folder it belongs to, flushed, and renamed
over its final name (a rename within one filesystem is atomic; a copy from $TMPDIR is not). A failure,
a Ctrl-C included, removes the temporary; a process killed outright cannot, so temporary names carry
the host and process id (``.NAME.lmtmp-HOST-PID-XXXXXXXX``), and the next write into the same folder
removes those whose process is gone (:func:`clean_stale`). Saved files get the usual permissions
(0644 under the common umask), not the private 0600 of a temporary file.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lmforge.errors import ExistingPathError, UserError

log = logging.getLogger("lmforge")

_HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname() or "host")
_TEMP = re.compile(r"^\..+\.lmtmp-(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-[A-Za-z0-9_]+(\.[A-Za-z0-9_.]+)?$")
# Temporaries of lmforge before host and pid were in the name: removed once a day old.
_LEGACY_TEMP = re.compile(r"^\..+\.[a-z0-9_]{8}\.(bin\.|json\.)?tmp$")
STALE_AFTER_S = 24 * 3600
"""A temporary of another host (a shared filesystem), or of an older lmforge, untouched this long is stale."""
_mine: set[str] = set()
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS}  # temporaries this process created: a stale one may carry a recycled pid


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()
DIR_MODE = 0o777 & ~_umask()


def temp_prefix(name: str) -> str:
    """The prefix of a temporary for the final name ``name``, recognisable by :func:`clean_stale`."""
    return f".{name}.lmtmp-{_HOST}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _last_touched(path: Path) -> float:
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for root, _, files in os.walk(path):
            for name in files:
                try:
                    newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
                except OSError:
                    pass
    return newest


def _is_stale(entry: Path) -> bool:
    match = _TEMP.match(entry.name)
    if match:
        pid = int(match.group("pid"))
        if match.group("host") == _HOST:
            if pid == os.getpid():
                return str(entry) not in _mine
            return not _alive(pid)
    elif not _LEGACY_TEMP.match(entry.name):
        return False
    return time.time() - _last_touched(entry) > STALE_AFTER_S


def clean_stale(folder: str | Path) -> list[Path]:
    """Remove the temporaries in ``folder`` left by killed lmforge processes; returns what was removed."""
    folder = Path(folder)
    removed: list[Path] = []
    try:
        entries = [e for e in folder.iterdir() if e.name.startswith(".")]
    except OSError:
        return removed
    for entry in entries:
        try:
            if not _is_stale(entry):
                continue
            size = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file()) if entry.is_dir() else entry.stat().st_size
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError:
            continue  # gone already, or not ours to remove
        log.info("removed %s (%.1f MB), left behind by an interrupted lmforge run", entry, size / 1e6)
        removed.append(entry)
    return removed


@contextmanager
def _write_errors(path: Path) -> Iterator[None]:
    """A full disk, a quota or a folder without write permission as the one-line error it is (not a bug)."""
    try:
        yield
    except OSError as err:
        if err.errno in _NO_SPACE:
            what = "Free some space (or raise the quota) and run again"
        elif err.errno in _NOT_WRITABLE:
            what = "Choose a folder you can write to"
        else:
            raise
        raise UserError(
            f"cannot write {path}: {os.strerror(err.errno)}; nothing was left under that name. {what}"
        ) from None


@contextmanager
def staged_file(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on success it is flushed to disk and renamed to
    ``path``, on any failure removed. Nothing ever exists under ``path`` that was not completely written."""
    path = Path(path)
    with _write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(path.parent)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path.name), suffix=suffix)
        os.close(fd)
        tmp = Path(name)
        _mine.add(str(tmp))
        try:
            yield tmp
            os.chmod(tmp, FILE_MODE)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
            _mine.discard(str(tmp))


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` (UTF-8) through a temporary file in the same folder, renamed at the end."""
    with staged_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, values: dict) -> None:
    """``values`` as indented JSON, written like :func:`write_text`."""
    write_text(path, json.dumps(values, indent=2, ensure_ascii=False) + "\n")


def _normal_modes(folder: Path) -> None:
    """Give a staged folder and what is in it the permissions of a normally created file or folder."""
    for root, _dirs, files in os.walk(folder):
        os.chmod(root, DIR_MODE)
        for name in files:
            file = os.path.join(root, name)
            executable = os.lstat(file).st_mode & 0o100
            os.chmod(file, FILE_MODE | (0o111 & DIR_MODE if executable else 0))


@contextmanager
def staged_folder(out_dir: str | Path, keep_name: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``out_dir`` to fill; on success it becomes ``out_dir``, on any
    failure (Ctrl-C included) it is removed. ``out_dir`` must not exist, before or after.

    ``keep_name=True`` yields a folder already named like ``out_dir`` (inside the temporary one), for
    writers that use their folder's name (an exporter titling a model card)."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise ExistingPathError(f"folder {out_dir} already exists; remove it or choose another")
    with _write_errors(out_dir):
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(out_dir.parent)
        tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=temp_prefix(out_dir.name)))
        _mine.add(str(tmp))
        target = tmp / out_dir.name if keep_name else tmp
        try:
            target.mkdir(exist_ok=True)
            yield target
            if out_dir.exists():
                raise ExistingPathError(f"folder {out_dir} appeared while writing; nothing was written there")
            _normal_modes(target)
            target.rename(out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            _mine.discard(str(tmp))
