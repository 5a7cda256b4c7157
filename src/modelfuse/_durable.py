"""Durable, atomic outputs: the one place where modelfuse moves a finished output into place.

Every writer (checkpoint folders and files, the merge's and fuse-features' extra files,
the cache of datasets and trained pools) writes into a temporary sibling of its target,
then calls :func:`publish`, which

1. fsyncs every file below the temporary output, then every folder, deepest first, the
   output's own folder last (a rename is durable only once the data it names is);
2. renames it onto the target (atomic: readers see the old output or the new one);
3. fsyncs the parent folder, so that the rename itself survives a crash.

After ``publish`` returns, a power loss leaves either the complete new output or (before
step 3 finished) the old one, never a mix or an empty file. Folders that cannot be
opened or fsynced (some filesystems refuse) are skipped; a file that cannot be fsynced
is an error.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from modelfuse.errors import OutputError


def fsync_file(path: str | os.PathLike) -> None:
    """Flush one file's data and metadata to the storage device."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_folder(path: str | os.PathLike) -> None:
    """Flush a folder's entries (names created, renamed or removed in it), where the system allows."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # e.g. Windows: folders cannot be opened
        return
    try:
        with contextlib.suppress(OSError):  # e.g. EINVAL on filesystems without folder fsync
            os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every regular file below ``root`` (or ``root`` itself, a file), then every folder
    bottom-up, ``root`` last. Links are not followed."""
    root = Path(root)
    if not root.is_dir() or root.is_symlink():
        fsync_file(root)
        return
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            path = Path(folder) / name
            if path.is_file() and not path.is_symlink():
                fsync_file(path)
        fsync_folder(folder)


def publish(tmp: str | os.PathLike, target: str | os.PathLike, *, replace: bool = True) -> Path:
    """Make ``tmp`` (a file or a folder beside ``target``) durable and move it onto ``target``.

    ``replace``: an existing target is replaced (a file atomically; a folder is moved aside,
    the new one renamed into place, then the old one removed; on a failure the old one
    comes back). Without it an existing target is an :class:`OutputError`.
    """
    tmp, target = Path(tmp), Path(target)
    fsync_tree(tmp)
    exists = target.exists() or target.is_symlink()
    if exists and not replace:
        raise OutputError(f"the output {target} exists already; pass force=True (--force) to replace it")
    if not tmp.is_dir():
        os.replace(tmp, target)
    elif not exists:
        os.rename(tmp, target)
    else:
        aside = target.with_name(f".{target.name}.old-{secrets.token_hex(4)}")
        os.rename(target, aside)
        try:
            os.rename(tmp, target)
        except BaseException:
            os.rename(aside, target)
            raise
        if aside.is_dir() and not aside.is_symlink():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            aside.unlink(missing_ok=True)
    fsync_folder(target.parent)
    return target


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """``with atomic_file(path) as tmp: write tmp``: a temporary file beside ``path`` that is
    published onto ``path`` when the block succeeds, and removed when it fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
