"""Prompt sets for the real path: ``.txt`` (one per line), ``.jsonl`` (``{"prompt": ...}``), ``.parquet``
(a ``prompt`` column). Every problem is reported with the file and line (or row) before any model loads.
"""

from __future__ import annotations

import hashlib
import json
import os

from .errors import TwostepError

FORMATS = (".txt", ".jsonl", ".parquet")


def read_prompts(path: str) -> list[str]:
    """The prompts of ``path`` in file order; empty prompts, missing keys and unknown formats are errors."""
    if not os.path.isfile(path):
        raise TwostepError(f"prompt file {path} does not exist")
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
    return prompts


def _read_txt(path: str) -> list[str]:
    lines = open(path, encoding="utf-8").read().splitlines()
    while lines and not lines[-1].strip():  # a trailing newline is not an empty prompt
        lines.pop()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            raise TwostepError(f"{path}:{number}: empty line; every line must be one prompt (remove it)")
    return [line.strip() for line in lines]


def _read_jsonl(path: str) -> list[str]:
    prompts = []
    for number, line in enumerate(open(path, encoding="utf-8"), 1):
        if not line.strip():
            raise TwostepError(f"{path}:{number}: empty line; every line must be one JSON object with a 'prompt'")
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise TwostepError(f"{path}:{number}: not valid JSON ({err.msg})") from err
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
