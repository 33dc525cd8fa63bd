"""Prompt sets for the real path: ``.txt`` (one per line), ``.jsonl`` (``{"prompt": ...}``), ``.parquet``
(a ``prompt`` column). Every problem is reported with the file and line (or row) before any model loads.
"""

from __future__ import annotations

import hashlib
import json
import os

from twostep.core.errors import TwostepError

FORMATS = (".txt", ".jsonl", ".parquet")
MAX_FILE_BYTES = 1 << 30  # 1 GiB of prompts is millions of them: anything larger is the wrong file
MAX_PROMPT_CHARS = 20_000  # far beyond any encoder's token limit; longer lines are refused before tokenising
MAX_LISTED = 5  # line numbers listed in one error


def read_prompts(path: str) -> list[str]:
    """The prompts of ``path`` in file order; empty prompts, missing keys and unknown formats are errors."""
    if not os.path.isfile(path):
        raise TwostepError(f"prompt file {path} does not exist" + (" (it is a folder)" if os.path.isdir(path) else ""))
    if os.path.getsize(path) > MAX_FILE_BYTES:
        raise TwostepError(f"prompt file {path} is {os.path.getsize(path):,} bytes, more than the "
                           f"{MAX_FILE_BYTES:,} accepted; split it or check that it is the right file")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".txt":
        prompts = _read_txt(path)
    elif ext == ".jsonl":
        prompts = _read_jsonl(path)
    elif ext == ".parquet":
        prompts = _read_parquet(path)
    else:
        raise TwostepError(f"prompt file {path}: unknown format {ext or '(no extension)'}; use one of "
                           f"{', '.join(FORMATS)}")
    if not prompts:
        raise TwostepError(f"prompt file {path} holds no prompts")
    check_prompt_sizes(prompts, path)
    return prompts


def prompt_location(path: str | None, index: int) -> str:
    """Where prompt ``index`` (0-based) of :func:`read_prompts` ``(path)`` is: ``FILE:LINE`` or ``FILE: row R``."""
    if path is None:
        return "the prompt"
    if os.path.splitext(path)[1].lower() == ".parquet":
        return f"{path}: row {index}"
    return f"{path}:{index + 1}"


def _too_long(path: str | None, bad: list[int], what: str, limit: str) -> TwostepError:
    """One line naming the first offending prompt, then up to :data:`MAX_LISTED` line (row) numbers in all."""
    first, measure = bad[0]
    text = f"{prompt_location(path, first)}: prompt is {measure:,} {what}, {limit}"
    if len(bad) > 1:
        unit = "rows" if path and path.lower().endswith(".parquet") else "lines"
        shown = ", ".join(str(i if unit == "rows" else i + 1) for i, _ in bad[:MAX_LISTED])
        more = f" and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
        text += f" ({len(bad)} prompts too long: {unit} {shown}{more})"
    return TwostepError(text + "; shorten " + ("them" if len(bad) > 1 else "it"))


def check_prompt_sizes(prompts: list[str], path: str | None = None) -> None:
    """Refuse prompts longer than :data:`MAX_PROMPT_CHARS` characters before any tokenizer sees them."""
    bad = [(i, len(p)) for i, p in enumerate(prompts) if len(p) > MAX_PROMPT_CHARS]
    if bad:
        raise _too_long(path, bad, "characters", f"more than the {MAX_PROMPT_CHARS:,} accepted")


def check_prompt_tokens(counts: list[int], limit: int, path: str | None = None) -> None:
    """``counts[i]``: tokens of prompt ``i`` as the encoder sees it (chat template included). More than ``limit``
    would be cut off silently by the pipeline, so it is refused with the line numbers."""
    bad = [(i, n) for i, n in enumerate(counts) if n > limit]
    if bad:
        raise _too_long(path, bad, "tokens", f"the encoder takes at most {limit}")


def _read_text(path: str) -> str:
    from twostep.core.utils import read_text_file

    return read_text_file(path, what="prompt file", max_bytes=MAX_FILE_BYTES)


def _read_txt(path: str) -> list[str]:
    lines = _read_text(path).splitlines()
    while lines and not lines[-1].strip():  # a trailing newline is not an empty prompt
        lines.pop()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            raise TwostepError(f"{path}:{number}: empty line; every line must be one prompt (remove it)")
    return [line.strip() for line in lines]


def _read_jsonl(path: str) -> list[str]:
    prompts = []
    lines = _read_text(path).replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if lines and lines[-1] == "":  # the final newline
        lines.pop()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            raise TwostepError(f"{path}:{number}: empty line; every line must be one JSON object with a 'prompt'")
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise TwostepError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        except RecursionError:
            raise TwostepError(f"{path}:{number}: JSON nested too deeply") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise TwostepError(f"{path}:{number}: missing the string field 'prompt'")
        if not record["prompt"].strip():
            raise TwostepError(f"{path}:{number}: empty prompt")
        prompts.append(record["prompt"].strip())
    return prompts


def _read_parquet(path: str) -> list[str]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # noqa: BLE001 - any reader failure means the file is not usable parquet
        raise TwostepError(f"{path}: not a readable parquet file ({err})".splitlines()[0]) from err
    if "prompt" not in table.column_names:
        raise TwostepError(f"{path}: no 'prompt' column (columns: {', '.join(table.column_names) or 'none'})")
    prompts = table.column("prompt").to_pylist()
    for row, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise TwostepError(f"{path}: row {row} of column 'prompt' is empty or not a string")
    return [p.strip() for p in prompts]


def prompts_sha256(prompts: list[str]) -> str:
    """Identity of a prompt list (order matters: sample i uses prompt i % len)."""
    return hashlib.sha256(json.dumps(prompts, ensure_ascii=False).encode("utf-8")).hexdigest()
