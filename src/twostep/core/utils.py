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

from twostep.core.errors import TwostepError


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


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def check_output_file(path: str, what: str = "output file") -> str:
    """Refuse, before any work and creating nothing, an output file path that names a folder or lies where no
    file can be made (under a file, or in a folder this user cannot write). Its folder is made when it is written."""
    if os.path.isdir(path):
        raise TwostepError(f"{what} {path!r} is an existing folder; give a file name (e.g. "
                           f"{os.path.join(path, 'out')!r})")
    return _check_creatable(os.path.dirname(os.path.abspath(path)), what=f"folder of the {what}")


def check_output_dir(path: str, what: str = "output folder") -> str:
    """Refuse, creating nothing, an output folder path that is an existing file or cannot be created/written."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise TwostepError(f"{what} {path!r} is an existing file, not a folder; choose another path")
    _check_creatable(path, what=what)
    return path


def _check_creatable(folder: str, what: str) -> str:
    existing = _nearest_existing(folder)
    if not os.path.isdir(existing):
        raise TwostepError(f"cannot write to {what} {folder!r}: {existing!r} is a file; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise TwostepError(f"cannot write to {what} {folder!r} (permission denied on {existing!r}); choose another "
                           "path")
    return folder


def resolve_device(name: str | None = "auto"):
    """The ``torch.device`` for a device string a user gave (``auto``/None, ``cpu``, ``cuda``, ``cuda:N``, ``mps``).

    Every command that takes a device goes through here, so a bogus or absent device is one error naming what this
    machine has, before any model loads."""
    import torch

    if name is None or str(name).strip() in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    text = str(name).strip()
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    have = ", ".join(["cpu"] + [f"cuda:{i}" for i in range(gpus)] + (["mps"] if mps else []))
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps") or text != text.lower():
        raise TwostepError(f"unknown device {text!r}; use auto, cpu, cuda or cuda:N (this machine has: {have})")
    if device.type == "cuda" and gpus == 0:
        raise TwostepError(f"device {text!r}: no CUDA GPU is visible here (this machine has: {have}); use "
                           "--device cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= gpus:
        raise TwostepError(f"device {text!r}: there is no GPU {device.index} (this machine has: {have})")
    if device.type == "mps" and not mps:
        raise TwostepError(f"device {text!r}: MPS is not available here (this machine has: {have})")
    if device.type == "cpu" and device.index not in (None, 0):
        raise TwostepError(f"device {text!r}: use plain cpu (this machine has: {have})")
    return device


def check_device_name(name: str) -> bool:
    """Whether ``name`` is a device string :func:`resolve_device` could accept on some machine (no hardware check)."""
    import re

    return bool(re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", str(name).strip()))


def _utf8_error(path: str, data: bytes, err: UnicodeDecodeError, what: str) -> TwostepError:
    line = data.count(b"\n", 0, err.start) + 1
    column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
    return TwostepError(f"{path}:{line}: {what} is not valid UTF-8 (byte 0x{data[err.start]:02x} at column "
                        f"{column}); save it as UTF-8")


def read_text_file(path: str, what: str = "file", max_bytes: int | None = None) -> str:
    """The text of a user-given file; unreadable, oversized or non-UTF-8 files are one :class:`TwostepError` naming
    the file (and the line of the first bad byte)."""
    try:
        if max_bytes is not None and os.path.getsize(path) > max_bytes:
            raise TwostepError(f"{what} {path} is {os.path.getsize(path):,} bytes, more than the {max_bytes:,} "
                               "this command reads; split it or check that it is the right file")
        with open(path, "rb") as f:
            data = f.read()
    except IsADirectoryError:
        raise TwostepError(f"{what} {path} is a folder, not a file") from None
    except OSError as err:
        raise TwostepError(f"cannot read {what} {path} ({err.strerror or err})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _utf8_error(path, data, err, what) from None
    return text[1:] if text.startswith("\ufeff") else text  # a BOM is not part of the content


def read_json_file(path: str, what: str = "file", hint: str = ""):
    """A user-given (or tool-written, maybe damaged) JSON file, or one :class:`TwostepError` naming it."""
    import json

    text = read_text_file(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise TwostepError(f"{path}:{err.lineno}: {what} is not valid JSON ({err.msg} at column {err.colno})"
                           + (f"; {hint}" if hint else "")) from None
    except RecursionError:
        raise TwostepError(f"{path}: {what} is nested too deeply to be read" + (f"; {hint}" if hint else "")) from None


def read_json_object(path: str, what: str = "file", hint: str = "") -> dict:
    """:func:`read_json_file` that must hold a JSON object."""
    data = read_json_file(path, what, hint)
    if not isinstance(data, dict):
        raise TwostepError(f"{path}: {what} must hold a JSON object, not {type(data).__name__}"
                           + (f"; {hint}" if hint else ""))
    return data


def read_jsonl_file(path: str, what: str = "log", hint: str = "") -> list[dict]:
    """The JSON objects of a JSON-lines file (blank lines skipped); a bad line is one error naming ``path:LINE``."""
    import json

    records = []
    for number, line in enumerate(read_text_file(path, what).split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as err:
            reason = err.msg if isinstance(err, json.JSONDecodeError) else "nested too deeply"
            raise TwostepError(f"{path}:{number}: {what} line is not valid JSON ({reason})"
                               + (f"; {hint}" if hint else "")) from None
        if not isinstance(record, dict):
            raise TwostepError(f"{path}:{number}: {what} line must be a JSON object" + (f"; {hint}" if hint else ""))
        records.append(record)
    return records


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


def check_replaceable_dir(path: str, overwrite: bool, what: str, owned: bool = False,
                          protected: tuple[str, ...] = ()) -> str:
    """Checks only, for a folder a command will replace as a whole. Refused: a file in its place; the working
    folder, a ``protected`` folder (the run being exported, the teacher) or any folder holding one; and a non-empty
    folder the command did not write itself (``owned``) unless ``overwrite``."""
    target = os.path.realpath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise TwostepError(f"{what} {path!r} is an existing file; choose a folder")
    for keep in (os.getcwd(), *protected):
        real = os.path.realpath(keep)
        if real == target or real.startswith(target + os.sep):
            raise TwostepError(f"{what} {path!r} would replace {keep!r} (or a folder holding it); choose a new folder")
    if os.path.isdir(path) and os.listdir(path) and not (owned or overwrite):
        raise TwostepError(f"{what} {path!r} is not empty and was not written by this command; choose a new "
                           "folder, or pass --overwrite to replace its contents")
    check_output_dir(path, what=what)
    return path


def platform_summary() -> str:
    """Where a number was measured: machine, cores, torch, OS."""
    import platform

    import torch

    return f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, {platform.system()}"
