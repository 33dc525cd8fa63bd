"""The run's scalars: ``RUN/train_log.jsonl`` (one JSON record per logged step) and ``RUN/tb/`` for TensorBoard.

Rank 0 writes; the other ranks get a :class:`TrainLog` that writes nothing. A resumed run first drops the records
written after its checkpoint, so the log reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import os

from twostep.core.utils import trim_jsonl


class TrainLog:
    """``with TrainLog(run_dir, step, enabled) as log: log.write(record)``."""

    def __init__(self, run_dir: str, step: int, enabled: bool):
        self.path = os.path.join(run_dir, "train_log.jsonl")
        self.tb_dir = os.path.join(run_dir, "tb")
        self.step, self.enabled = step, enabled
        self.file = self.writer = None

    def __enter__(self) -> TrainLog:
        if not self.enabled:
            return self
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(self.tb_dir, purge_step=self.step or None)
        except ImportError:
            self.writer = None
        trim_jsonl(self.path, lambda record: record.get("step", 0) <= self.step, report=print)
        self.file = open(self.path, "a", encoding="utf-8")
        return self

    def write(self, record: dict, scalars: dict[str, float]) -> None:
        """One JSON line (flushed: a killed run keeps every record it wrote) and ``scalars`` to TensorBoard."""
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, record["step"])

    def __exit__(self, *exc) -> None:
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


def step_record(step: int, elapsed: float, g_lr: float, logs: dict[str, float], problems: list[str]) -> dict:
    """The JSON record of one step: its losses and health rounded to 6 places, and any skipped update."""
    record = {"step": step, "elapsed_s": round(elapsed, 2), "g_lr": g_lr, **{k: round(v, 6) for k, v in logs.items()}}
    if problems:
        record["skipped"] = list(problems)
    return record
