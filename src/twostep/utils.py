"""Small shared helpers: atomic writes, rank awareness, progress bars, hashing."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Iterator

from .errors import TwostepError


def rank() -> int:
    """Global rank under torchrun (``RANK``), 0 otherwise. Read from the environment, never cached."""
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


def progress(iterable=None, total: int | None = None, desc: str = "", **kwargs):
    """A tqdm bar on rank 0 only (others get a silent one with the same API)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not is_main_process(), dynamic_ncols=True,
                leave=kwargs.pop("leave", True), **kwargs)


def ensure_writable_dir(path: str, what: str = "output folder") -> str:
    """Create ``path`` if needed and check that a file can be written there, before any expensive work."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".twostep-write-test-"):
            pass
    except OSError as err:
        raise TwostepError(f"cannot write to {what} {path!r} ({err.strerror or err}); choose another path") from err
    return path


def ensure_parent_writable(path: str, what: str = "output file") -> str:
    ensure_writable_dir(os.path.dirname(os.path.abspath(path)), what=f"folder of the {what}")
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary file name next to ``path``; rename it over ``path`` only if the block succeeds."""
    ensure_parent_writable(path)
    directory, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextmanager
def atomic_dir(path: str) -> Iterator[str]:
    """Yield a temporary folder next to ``path``; it replaces ``path`` only if the block succeeds."""
    parent, name = os.path.split(os.path.abspath(path))
    ensure_writable_dir(parent, what="parent folder")
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{name}.", suffix=".tmp")
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if os.path.isdir(path):
            old = tempfile.mkdtemp(dir=parent, prefix=f".{name}.", suffix=".old")
            os.rmdir(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
