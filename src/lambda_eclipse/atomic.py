"""The one way the package writes files: atomically, so nothing already written is lost or left half-written.

Every writer goes through :func:`atomic_path` (a file) or :func:`atomic_dir` (a folder): the content is produced
under a temporary name beside the target and moved over it in one rename, so a reader (or a rerun after a kill)
sees the old complete file or folder, or the new complete one, never a part of one.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def _temporary_beside(final: Path, kind: str) -> Path:
    # A unique name: two writers of the same target (two ranks, two lanes) never share a temporary.
    return final.parent / f".{kind}-{final.name}-{uuid.uuid4().hex[:8]}"


def _commit(temporary: Path, final: Path) -> None:
    """Move ``temporary`` over ``final`` in one rename (the package's only ``os.replace``)."""
    os.replace(temporary, final)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path beside ``path``; when the block ends without error it replaces ``path``.

    For writers that want a path (``image.save``, ``torch.save``, ``safetensors.save_file``)::

        with atomic_path(out / "image.png") as temporary:
            image.save(temporary, format="PNG")

    The parent folder is created. On error the temporary is removed and ``path`` is untouched.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary_beside(final, "tmp")
    try:
        yield temporary
        if temporary.exists():
            os.chmod(temporary, 0o644)  # some writers (safetensors) create 0600 files; outputs are meant to be shared
        _commit(temporary, final)
    finally:
        temporary.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, data: bytes | str, fsync: bool = False) -> Path:
    """Write ``data`` (text is UTF-8 encoded) to ``path`` atomically; ``fsync`` also flushes it to disk first."""
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
    return Path(path)


def write_new_file(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write a file that never replaces another: ``write(temporary)`` fills a temporary beside ``path``, which is
    then claimed under ``path``, or ``<stem>-1<suffix>``, ``<stem>-2<suffix>``... if that name is taken.

    The claim is a hard link, which fails if the name exists, so two writers (two processes, two ranks) never
    overwrite each other, and a reader sees a complete file or none. Returns the name the file got.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary_beside(final, "tmp")
    try:
        write(temporary)
        os.chmod(temporary, 0o644)
        for counter in range(100_000):
            candidate = final if counter == 0 else final.with_name(f"{final.stem}-{counter}{final.suffix}")
            try:
                os.link(temporary, candidate)
                return candidate
            except FileExistsError:
                continue
        raise FileExistsError(f"no free name for {final} after 100000 tries")
    finally:
        temporary.unlink(missing_ok=True)


def publish_dir(source: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Move the complete folder ``source`` (on the same file system) into place as ``path``, replacing it.

    An existing ``path`` is first moved aside and deleted only after the new folder is in place, so at every
    moment one complete folder is there (or, for an instant between the two renames, none: never a partial one).
    """
    final = Path(path)
    old = None
    if final.exists():
        old = _temporary_beside(final, "old")
        _commit(final, old)
    _commit(Path(source), final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``path``; on success it replaces the folder ``path``
    (see :func:`publish_dir`). On error the temporary folder is removed and ``path`` is untouched."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary_beside(final, "tmp")
    temporary.mkdir()
    try:
        yield temporary
        publish_dir(temporary, final)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)
