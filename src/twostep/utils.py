"""Small shared helpers: atomic writes, rank awareness, progress bars, hashing."""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from typing import Iterator

from .errors import TwostepError


def rank() -> int:
    """Global rank under torchrun (``RANK``), 0 otherwise. Read from the environment, never cached."""
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


def _env_disabled() -> bool:
    """``TQDM_DISABLE=1`` (what the tests set) turns every progress display off."""
    return os.environ.get("TQDM_DISABLE", "").strip().lower() in ("1", "true", "yes", "on")


def _format_s(seconds: float) -> str:
    seconds = int(round(max(0.0, seconds)))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60:02d}:{rest % 60:02d}"


class PlainProgress:
    """tqdm's API (iteration, ``update``, ``set_postfix``, ``write``, ``close``), printed as plain lines.

    For logs that are not a terminal (CI, ``nohup``, ``make demo > log 2>&1``): one line every ``every_fraction``
    of ``total`` or every ``every_s`` seconds, whichever comes first, and a final line; never a carriage return.
    Each line has the count, elapsed time, ETA, rate and the latest postfix. A ``leave=False`` bar (a transient
    inner loop) prints only on the time interval and no final line.
    """

    def __init__(self, iterable=None, total: int | None = None, desc: str = "", initial: int = 0,
                 disable: bool = False, leave: bool = True, file=None, every_fraction: float = 0.1,
                 every_s: float = 30.0, **_ignored):
        if total is None and iterable is not None:
            try:
                total = len(iterable)
            except TypeError:
                total = None
        self.iterable, self.total, self.desc = iterable, total, desc
        self.initial = self.n = initial
        self.disable, self.leave = disable, leave
        self.file = file
        self.every_fraction, self.every_s = every_fraction, every_s
        self.postfix = ""
        self._start = self._last_time = time.perf_counter()
        self._last_n = initial
        self._closed = False

    # -- tqdm API
    def __iter__(self):
        if self.disable:
            yield from self.iterable
            return
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return self.total if self.total is not None else len(self.iterable)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        items = dict(ordered_dict or {}, **kwargs)
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = str(s)

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def refresh(self) -> None:
        pass

    def write(self, s: str, file=None, end: str = "\n") -> None:  # printed even when disabled, as tqdm.write
        print(s, file=file or self._out(), end=end, flush=True)

    def update(self, n: int = 1) -> None:
        if self.disable or self._closed:
            return
        self.n += n
        now = time.perf_counter()
        due = now - self._last_time >= self.every_s
        if self.leave and self.total:
            step = max(1, math.ceil(self.total * self.every_fraction))
            due = due or (self.n // step > self._last_n // step and self.n < self.total)
        if due:
            self._print(now)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.disable and self.leave and (self.n != self._last_n or self.n == self.initial):
            self._print(time.perf_counter())

    # -- output
    def _out(self):
        import sys

        return self.file if self.file is not None else sys.stderr

    def line(self, now: float | None = None) -> str:
        elapsed = (now or time.perf_counter()) - self._start
        done = self.n - self.initial
        rate = done / elapsed if elapsed > 0 else 0.0
        if self.total:
            count = f"{100 * self.n / self.total:3.0f}% {self.n}/{self.total}"
            eta = _format_s((self.total - self.n) / rate) if rate > 0 else "?"
            timing = f"elapsed {_format_s(elapsed)}, ETA {eta}"
        else:
            count, timing = f"{self.n}", f"elapsed {_format_s(elapsed)}"
        speed = f"{rate:.2f} it/s" if rate >= 1 or rate == 0 else f"{1 / rate:.1f} s/it"
        text = f"{self.desc + ': ' if self.desc else ''}{count} [{timing}, {speed}]"
        return text + (f" {self.postfix}" if self.postfix else "")

    def _print(self, now: float) -> None:
        print(self.line(now), file=self._out(), flush=True)
        self._last_time, self._last_n = now, self.n


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def progress(iterable=None, total: int | None = None, desc: str = "", **kwargs):
    """A progress display on rank 0 only (others get a silent one with the same API).

    A tqdm bar when stderr is a terminal (or in a notebook); otherwise :class:`PlainProgress` lines, so a log
    file holds a few readable lines instead of megabytes of carriage-return updates.
    """
    import sys

    disable = not is_main_process() or _env_disabled() or kwargs.pop("disable", False)
    if disable or not (_is_terminal(sys.stderr) or "ipykernel" in sys.modules):
        return PlainProgress(iterable, total=total, desc=desc, disable=disable, **kwargs)
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, dynamic_ncols=True, leave=kwargs.pop("leave", True), **kwargs)


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


def check_can_write_dir(path: str, what: str = "output folder") -> str:
    """Like :func:`ensure_writable_dir` but creates nothing: for checks made before a command may write."""
    target = os.path.abspath(path)
    if os.path.exists(target) and not os.path.isdir(target):
        raise TwostepError(f"{what} {path!r} is a file; choose a folder")
    probe = target
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise TwostepError(f"cannot write to {what} {path!r} ({probe} is not writable); choose another path")
    return path


def trim_jsonl(path: str, keep, report=print) -> None:
    """Rewrite the JSON-lines log ``path`` with only the records ``keep(record)`` accepts. A final line cut short
    by a kill is dropped with a warning; an unreadable line elsewhere is an error naming ``path:LINE``."""
    import json

    if not os.path.isfile(path):
        return
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    kept = []
    for number, raw in enumerate(lines, 1):
        try:
            record = json.loads(raw.decode("utf-8"))
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except (UnicodeDecodeError, ValueError) as err:
            if number == len(lines):
                report(f"twostep: warning: {path}:{number}: dropped a partial last record (an interrupted write)")
                continue
            raise TwostepError(f"{path}:{number}: not a JSON record ({err}); fix or delete that line") from err
        if keep(record):
            kept.append(raw.decode("utf-8") + "\n")
    write_text(path, "".join(kept))
