"""Every bad input gets a one-line error (issue 12): a table of malformed inputs run through ``twostep.cli.main``.

Each row builds one bad input inside the test's folder and runs one command on it in-process. The row passes when
the command returns 2, stderr is exactly one line in the ``twostep: error: ...`` form (argparse's
``twostep CMD: error: ...`` for flags), no traceback is printed, and no file or folder was created, deleted or
changed: neither in the test's folder nor in the shared fixtures (tree snapshots of paths + sha256, compared
before and after).

To add a case, append a ``Case(id, setup, argv)`` to ``CASES``: ``setup(tmp, world)`` writes the bad input under
``tmp`` (the working directory); ``argv`` may use ``{name}`` placeholders for the shared fixtures in ``world``
(``teacher``, ``toy_data``, ``pipe``, ``prompts``, ``real_data``, ``export``, ``zcfg``); ``match`` is a substring
the error line must hold.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml

from twostep.cli import DEFAULT_ZIMAGE_CONFIG, main
from twostep.core.config import ConfigError, from_dict, load_config
from twostep.core.errors import TwostepError
from twostep.core.packaged_configs import packaged_config

REPO = Path(__file__).resolve().parents[1]
SHIPPED_DIGITS = REPO / "src" / "twostep" / "offline" / "shipped" / "digits"
ZCFG = packaged_config(DEFAULT_ZIMAGE_CONFIG)
RES = 32  # the tiny pipeline: VAE 2x, patch 2 -> a grid of 4 px; rotary positions cover 32 x 4 = 128 px
PROMPTS = ["a red cat on a sofa", "the city at night"]
TOY_DATA_ARGS = ["teacher_data.num_samples=8", "teacher_data.shard_size=4", "teacher_data.batch_size=4"]
# keep a run that wrongly goes ahead short; none of these is the bad input
REAL_TRAIN_ARGS = ["train.steps=1", "train.batch_size=2", "train.bf16=false", "model.dtype=float32",
                   "discriminator.blocks=[0,1]", "discriminator.hidden=16", "student.lora_rank=4"]
ERROR_LINE = re.compile(r"^twostep(?: [a-z-]+)?: error: \S")


# --------------------------------------------------------------------------- shared fixtures (built once)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The fixtures run a few tiny forward passes: one thread is faster than two fighting over shared cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_pipeline_dir):
    root = tmp_path_factory.mktemp("bad_inputs")
    toy_data = str(root / "toy_data")
    assert main(["teacher-data", "--teacher", str(SHIPPED_DIGITS), "--out", toy_data, *TOY_DATA_ARGS]) == 0
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    real_data = str(root / "real_data")
    assert main(["teacher-data", "--teacher", tiny_pipeline_dir, "--prompts", str(prompts), "--resolution",
                 str(RES), "--out", real_data, "teacher_data.samples_per_prompt=2", "teacher_data.shard_size=2",
                 "teacher_data.batch_size=2", "teacher_data.previews=0"]) == 0
    # a diffusers export as `generate` reads it; no bad-input row gets as far as loading its weights
    export = root / "export"
    shutil.copytree(tiny_pipeline_dir, export)
    (export / "twostep.json").write_text(json.dumps({
        "num_steps": 2, "student_sigmas": [1.0, 0.75], "shift": 3.0, "default_schedule": True,
        "resolution": RES, "adapters": ["step1", "step2"],
        "lora_files": ["twostep_lora/step1_lora.safetensors", "twostep_lora/step2_lora.safetensors"]}))
    return {"root": str(root), "teacher": str(SHIPPED_DIGITS), "toy_data": toy_data, "pipe": tiny_pipeline_dir,
            "prompts": str(prompts), "real_data": real_data, "export": str(export), "zcfg": ZCFG}


def snapshot(*roots: str) -> dict[str, str]:
    """Relative path -> sha256 (files) or "dir" (folders) for everything under ``roots``."""
    tree = {}
    for index, root in enumerate(roots):
        for folder, dirs, files in os.walk(root):
            rel = os.path.relpath(folder, root)
            tree[f"{index}/{rel}"] = "dir"
            for name in files:
                path = os.path.join(folder, name)
                with open(path, "rb") as f:
                    tree[f"{index}/{os.path.join(rel, name)}"] = hashlib.sha256(f.read()).hexdigest()
    return tree


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, out, err, match=""):
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err + out
    assert code == 2, f"exit code {code}; stderr: {err!r}"
    assert len(lines) == 1, f"stderr is not one line: {err!r}"
    assert ERROR_LINE.match(lines[0]), lines[0]
    assert match in lines[0], f"{match!r} not in {lines[0]!r}"
    return lines[0]


# --------------------------------------------------------------------------- setups


def write(rel: str, data: str | bytes) -> Callable[[Path, dict], None]:
    def setup(tmp: Path, world: dict) -> None:
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, bytes):
            path.write_bytes(data)
        else:
            path.write_text(data, encoding="utf-8")
    return setup


def folder(rel: str) -> Callable[[Path, dict], None]:
    def setup(tmp: Path, world: dict) -> None:
        (tmp / rel).mkdir(parents=True)
    return setup


def remove(rel: str) -> Callable[[Path, dict], None]:
    def setup(tmp: Path, world: dict) -> None:
        os.remove(tmp / rel)
    return setup


def steps(*setups: Callable[[Path, dict], None]) -> Callable[[Path, dict], None]:
    def setup(tmp: Path, world: dict) -> None:
        for s in setups:
            s(tmp, world)
    return setup


def copy(name: str, rel: str) -> Callable[[Path, dict], None]:
    """Copy the shared fixture ``world[name]`` to ``tmp/rel`` (rows that damage it damage a copy)."""
    def setup(tmp: Path, world: dict) -> None:
        shutil.copytree(world[name], tmp / rel)
    return setup


def edit_json(rel: str, change: Callable[[object], object]) -> Callable[[Path, dict], None]:
    def setup(tmp: Path, world: dict) -> None:
        path = tmp / rel
        data = json.loads(path.read_text())
        change(data)  # edits in place
        path.write_text(json.dumps(data))
    return setup


def manifest_edit(change: Callable[[dict], object]) -> Callable[[Path, dict], None]:
    return steps(copy("real_data", "data"), edit_json("data/manifest.json", change))


def text_manifest_edit(change: Callable[[dict], object]) -> Callable[[Path, dict], None]:
    return steps(copy("real_data", "data"), edit_json("data/text/manifest.json", change))


def toy_manifest(data: str | bytes) -> Callable[[Path, dict], None]:
    return steps(copy("toy_data", "data"), write("data/manifest.json", data))


def toy_manifest_edit(change: Callable[[dict], object]) -> Callable[[Path, dict], None]:
    return steps(copy("toy_data", "data"), edit_json("data/manifest.json", change))


def teacher_copy(rel: str = "teacher", drop_provenance: bool = True) -> Callable[[Path, dict], None]:
    def setup(tmp: Path, world: dict) -> None:
        shutil.copytree(world["teacher"], tmp / rel)
        if drop_provenance:  # a plain train-teacher run (a shipped folder's checksums would catch edits first)
            os.remove(tmp / rel / "provenance.json")
    return setup


def pop_shard(name: str) -> Callable[[dict], None]:
    return lambda m: m["shards"].pop(name)


def set_entry(name: str, key: str, value) -> Callable[[dict], None]:
    return lambda m: m["shards"][name].__setitem__(key, value)


LONG = " ".join(["cat"] * 600)  # 600 words: more than 512 tokens with any tokenizer


@dataclass
class Case:
    id: str
    setup: Callable[[Path, dict], None] | None
    argv: list[str]
    match: str = ""

    def resolved_argv(self, world: dict) -> list[str]:
        return [a.format(**world) for a in self.argv]


TEACHER_DATA = ["teacher-data", "--teacher", "{teacher}", "--out", "data", *TOY_DATA_ARGS]
REAL_DATA = ["teacher-data", "--teacher", "{pipe}", "--resolution", str(RES), "--out", "data"]
REAL_TRAIN = ["train", "--config", "{zcfg}", "--data", "data", "--out", "run", *REAL_TRAIN_ARGS]
GENERATE = ["generate", "--model", "{export}"]
TRAIN_TEACHER = ["train-teacher", "--out", "t"]
TOY_TRAIN = ["train", "--teacher", "{teacher}", "--data", "{toy_data}", "--out", "run"]

CASES = [
    # ---- 1. config files that are not UTF-8, not YAML, not a mapping
    Case("yaml-not-utf8", write("c.yaml", b"seed: 0\nmodel:\n  dim: \xff96\n"),
         ["train-teacher", "--config", "c.yaml", "--out", "t"], "c.yaml:3: config file is not valid UTF-8"),
    Case("yaml-latin1-comment", write("c.yaml", b"# caf\xe9\nseed: 0\n"), ["train", "--config", "c.yaml"], "c.yaml:1:"),
    Case("yaml-syntax", write("c.yaml", "train: [1, 2\nseed: 0\n"), [*TRAIN_TEACHER, "--config", "c.yaml"],
         "not valid YAML"),
    Case("yaml-top-level-list", write("c.yaml", "- 1\n- 2\n"), [*TRAIN_TEACHER, "--config", "c.yaml"], "mapping"),
    Case("yaml-is-a-folder", folder("c.yaml"), [*TRAIN_TEACHER, "--config", "c.yaml"], "folder"),
    Case("yaml-python-tag", write("c.yaml", "seed: !!python/object:os.system [ls]\n"),
         [*TRAIN_TEACHER, "--config", "c.yaml"], "not valid YAML"),
    Case("yaml-non-string-keys", write("c.yaml", "1: 2\nfoo: 3\n"), [*TRAIN_TEACHER, "--config", "c.yaml"],
         "unknown config key"),
    Case("data-record-not-utf8", steps(copy("real_data", "data"), write("data/teacher_data.yaml", b"model: \xfe\n")),
         REAL_TRAIN, "teacher_data.yaml:1:"),
    # ---- 2. numeric ranges, every config section
    Case("model-n-heads-0", None, [*TRAIN_TEACHER, "model.n_heads=0"], "model.n_heads"),
    Case("model-dim-not-multiple-of-heads", None, [*TRAIN_TEACHER, "model.dim=30"], "model.dim"),
    Case("model-n-refiner-negative", None, [*TRAIN_TEACHER, "model.n_refiner_layers=-1"], "model.n_refiner_layers"),
    Case("model-axes-dims-odd", None, [*TRAIN_TEACHER, "model.axes_dims=[5,5,14]"], "model.axes_dims"),
    Case("model-axes-lens-too-short", None, [*TRAIN_TEACHER, "model.axes_lens=[64,2,2]"], "model.axes_lens"),
    Case("text-num-layers-0", None, [*TRAIN_TEACHER, "text.num_layers=0"], "text.num_layers"),
    Case("text-max-length-huge", None, [*TRAIN_TEACHER, "text.max_length=100000"], "text.max_length"),
    Case("text-seed-negative", None, [*TRAIN_TEACHER, "text.seed=-1"], "text.seed"),
    Case("data-split-seed-too-big", None, [*TRAIN_TEACHER, "data.split_seed=5000000000"], "data.split_seed"),
    Case("sampling-shift-nan", None, [*TRAIN_TEACHER, "sampling.shift=.nan"], "sampling.shift"),
    Case("sampling-steps-0", None, [*TRAIN_TEACHER, "sampling.steps=0"], "sampling.steps"),
    Case("eval-seed-negative", None, [*TRAIN_TEACHER, "eval.seed=-3"], "eval.seed"),
    Case("eval-throughput-batch-0", None, [*TRAIN_TEACHER, "eval.throughput_batch=0"], "eval.throughput_batch"),
    Case("teacher-data-batch-size-0", None, [*TEACHER_DATA, "teacher_data.batch_size=0"], "teacher_data.batch_size"),
    Case("teacher-data-teacher-steps-0", None, [*TEACHER_DATA, "teacher_data.teacher_steps=0"],
         "teacher_data.teacher_steps"),
    Case("teacher-data-shift-0", None, [*TEACHER_DATA, "teacher_data.shift=0"], "teacher_data.shift"),
    Case("teacher-data-sigma-0", None, [*TEACHER_DATA, "teacher_data.student_sigmas=[1.0,0.0]",
                                        "student.sigmas=[1.0,0.0]"], "teacher_data.student_sigmas"),
    Case("student-lora-alpha-0", None, [*TOY_TRAIN, "student.lora_alpha=0"], "student.lora_alpha"),
    Case("discriminator-r1-weight-inf", None, [*TOY_TRAIN, "discriminator.r1_weight=.inf"],
         "discriminator.r1_weight"),
    Case("discriminator-sigma-std-0", None, [*TOY_TRAIN, "discriminator.sigma_std=0"], "discriminator.sigma_std"),
    Case("discriminator-r1-sigma-2", None, [*TOY_TRAIN, "discriminator.r1_sigma=2"], "discriminator.r1_sigma"),
    Case("recipe-weight-negative", None, [*TOY_TRAIN, "recipe.step1_weight=-1"], "recipe.step1_weight"),
    Case("real-max-length-over-512", None, [*REAL_DATA, "--prompts", "{prompts}", "teacher_data.max_length=4096"],
         "teacher_data.max_length"),
    Case("real-text-batch-size-0", None, [*REAL_DATA, "--prompts", "{prompts}", "teacher_data.text_batch_size=0"],
         "teacher_data.text_batch_size"),
    Case("real-model-device-bogus", None, [*REAL_DATA, "--prompts", "{prompts}", "model.device=banana"],
         "model.device"),
    Case("real-resolution-off-grid", None, ["teacher-data", "--teacher", "{pipe}", "--prompts", "{prompts}",
                                            "--resolution", "30", "--out", "data"], "multiple of 4"),
    Case("plan-card-gib-nan", None, ["plan", "--card-gib", "nan"], "--card-gib"),
    Case("plan-resolution-tiny", None, ["plan", "--resolution", "16"], "from 64 to 8192"),
    # ---- 1 + 7. prompt files: not UTF-8, too long for the encoder, oversized
    Case("prompts-txt-not-utf8", write("p.txt", b"a red cat\nthe city \xff at night\n"),
         [*REAL_DATA, "--prompts", "p.txt"], "p.txt:2: prompt file is not valid UTF-8"),
    Case("prompts-jsonl-not-utf8", write("p.jsonl", b'{"prompt": "a cat"}\n{"prompt": "caf\xe9"}\n'),
         [*REAL_DATA, "--prompts", "p.jsonl"], "p.jsonl:2:"),
    Case("prompts-jsonl-nested-deeply", write("p.jsonl", "[" * 100000 + "\n"), [*REAL_DATA, "--prompts", "p.jsonl"],
         "p.jsonl:1:"),
    Case("prompts-too-many-tokens", write("p.txt", f"a red cat\n{LONG}\nthe sky\n"), [*REAL_DATA, "--prompts", "p.txt"],
         "p.txt:2: prompt is 6"),
    Case("prompts-jsonl-too-many-tokens", write("p.jsonl", json.dumps({"prompt": "a dog"}) + "\n"
                                                + json.dumps({"prompt": LONG}) + "\n"),
         [*REAL_DATA, "--prompts", "p.jsonl"], "the encoder takes at most 512"),
    Case("prompts-many-too-long", write("p.txt", "\n".join(["a cat", *[LONG] * 7, "a dog"]) + "\n"),
         [*REAL_DATA, "--prompts", "p.txt"], "7 prompts too long: lines 2, 3, 4, 5, 6 and 2 more"),
    Case("prompts-1.2MB-line", write("p.txt", "a cat\n" + "x" * 1_200_000 + "\n"), [*REAL_DATA, "--prompts", "p.txt"],
         "p.txt:2: prompt is 1,200,000 characters"),
    Case("prompts-is-a-folder", folder("p.txt"), [*REAL_DATA, "--prompts", "p.txt"], "folder"),
    Case("generate-prompts-too-long", write("p.txt", f"a cat\n{LONG}\n"), [*GENERATE, "--prompts", "p.txt"],
         "p.txt:2: prompt is"),
    Case("generate-prompt-too-long", None, [*GENERATE, LONG], "the prompt: prompt is"),
    Case("generate-prompt-huge", None, [*GENERATE, "y" * 30000], "characters"),
    # ---- 3. --out naming an existing folder (or an unwritable place) for commands that write one file
    Case("sample-out-is-folder", folder("grid.png"), ["sample", "--model", "{teacher}", "--out", "grid.png"],
         "existing folder"),
    Case("sample-out-under-a-file", write("notes.txt", "x"), ["sample", "--model", "{teacher}", "--out",
                                                               "notes.txt/grid.png"], "is a file"),
    Case("sample-out-bad-extension", None, ["sample", "--model", "{teacher}", "--out", "grid.xyz"], ".xyz"),
    Case("sample-missing-model-creates-nothing", None, ["sample", "--model", "nope", "--out", "new/grid.png"],
         "holds no trained teacher"),
    Case("eval-out-is-folder", folder("m.json"), ["eval", "--model", "{teacher}", "--out", "m.json"],
         "existing folder"),
    Case("eval-results-not-utf8", write("r.md", b"# R\xe9sultats\n"),
         ["eval", "--model", "{teacher}", "--out", "m.json", "--results", "r.md"], "r.md:1:"),
    Case("generate-out-is-folder", folder("img.png"), [*GENERATE, "a cat", "--out", "img.png"], "existing folder"),
    Case("generate-out-bad-extension", None, [*GENERATE, "a cat", "--out", "img.notanimage"], ".notanimage"),
    Case("generate-prompts-out-is-file", steps(write("p.txt", "a cat\n"), write("imgs", "x")),
         [*GENERATE, "--prompts", "p.txt", "--out", "imgs"], "existing file"),
    # ---- 6. generate: blank prompt, resolution, device
    Case("generate-blank-prompt", None, [*GENERATE, "   "], "empty"),
    Case("generate-empty-prompt", None, [*GENERATE, ""], "empty"),
    Case("generate-resolution-30", None, [*GENERATE, "a cat", "--resolution", "30"], "multiple of 4"),
    Case("generate-resolution-too-small", None, [*GENERATE, "a cat", "--resolution", "8"], "from 16"),
    Case("generate-resolution-too-big", None, [*GENERATE, "a cat", "--resolution", "4096"], "to 128"),
    Case("generate-device-banana", None, [*GENERATE, "a cat", "--device", "banana"], "unknown device 'banana'"),
    Case("generate-device-cuda-99", None, [*GENERATE, "a cat", "--device", "cuda:99"], "cuda:99"),
    Case("generate-device-negative", None, [*GENERATE, "a cat", "--device", "cuda:-1"], "cuda:-1"),
    # ---- 8. export records and other JSON a command reads
    Case("generate-export-record-not-json", steps(copy("export", "exp"), write("exp/twostep.json", "{oops")),
         ["generate", "--model", "exp", "a cat"], "twostep.json:1: export record is not valid JSON"),
    Case("generate-export-record-wrong-types", steps(copy("export", "exp"),
                                                     write("exp/twostep.json", '{"adapters": "step1"}')),
         ["generate", "--model", "exp", "a cat"], "'adapters'"),
    Case("generate-export-vae-config-broken", steps(copy("export", "exp"), write("exp/vae/config.json", "[1,")),
         ["generate", "--model", "exp", "a cat"], "VAE config is not valid JSON"),
    Case("export-meta-not-json", lambda tmp, world: _fake_real_run(tmp, world, meta=b"{\xff"),
         ["export", "run", "--format", "lora"], "meta.json:1:"),
    Case("ship-teacher-meta-not-json", steps(teacher_copy(drop_provenance=False), write("teacher/meta.json", "{")),
         ["ship-teacher", "teacher", "--out", "shipped", "--command", "x"], "meta.json:1:"),
    Case("sample-teacher-config-not-utf8", steps(teacher_copy(), write("teacher/config.yaml", b"seed: \x80\n")),
         ["sample", "--model", "teacher", "--out", "g.png"], "config.yaml:1:"),
    # ---- 4. teacher-data manifests (toy: a rerun of teacher-data; real: train, which reads the cache first)
    Case("manifest-empty-list", toy_manifest("[]"), TEACHER_DATA, "must be a JSON object, not list"),
    Case("manifest-shards-list", toy_manifest_edit(lambda m: m.__setitem__("shards", list(m["shards"].values()))),
         TEACHER_DATA, "'shards' must be a mapping"),
    Case("manifest-not-utf8", toy_manifest(b'{"provenance": "\xff"}'), TEACHER_DATA, "manifest.json:1:"),
    Case("manifest-not-json", toy_manifest("{"), TEACHER_DATA, "not valid JSON"),
    Case("manifest-missing-provenance", toy_manifest_edit(lambda m: m.pop("provenance")), TEACHER_DATA,
         "lacks 'provenance'"),
    Case("manifest-entry-missing-sha", toy_manifest_edit(set_entry("shard-00000.safetensors", "sha256", None)),
         TEACHER_DATA, "sha256"),
    Case("manifest-shard-name-escapes", toy_manifest_edit(
        lambda m: m["shards"].__setitem__("../x.safetensors", m["shards"]["shard-00000.safetensors"])),
         TEACHER_DATA, "not a shard name"),
    Case("real-manifest-count-edited", manifest_edit(set_entry("shard-00001.safetensors", "count", 1)), REAL_TRAIN,
         "count=1"),
    Case("real-manifest-count-bigger", manifest_edit(set_entry("shard-00000.safetensors", "count", 5)), REAL_TRAIN,
         "shard-00000"),
    Case("real-manifest-entry-deleted", manifest_edit(pop_shard("shard-00001.safetensors")), REAL_TRAIN,
         "does not list shard-00001.safetensors"),
    Case("real-manifest-first-index-edited", manifest_edit(set_entry("shard-00001.safetensors", "first_index", 3)),
         REAL_TRAIN, "first_index=3"),
    Case("real-manifest-shards-list", manifest_edit(lambda m: m.__setitem__("shards", [])), REAL_TRAIN,
         "must be a mapping"),
    Case("real-manifest-empty-list", steps(copy("real_data", "data"), write("data/manifest.json", "[]")), REAL_TRAIN,
         "JSON object"),
    Case("real-manifest-missing-complete", manifest_edit(lambda m: m.pop("complete")), REAL_TRAIN,
         "lacks 'complete'"),
    # ---- 5. the real path's text-cache manifest
    Case("text-manifest-not-json", steps(copy("real_data", "data"), write("data/text/manifest.json", "{]")),
         REAL_TRAIN, "prompt-cache manifest is not valid JSON"),
    Case("text-manifest-not-utf8", steps(copy("real_data", "data"), write("data/text/manifest.json", b"\xff{}")),
         REAL_TRAIN, "text/manifest.json:1:"),
    Case("text-manifest-prompts-not-list", text_manifest_edit(lambda m: m.__setitem__("prompts", "a cat")), REAL_TRAIN,
         "'prompts' must be a list"),
    Case("text-manifest-shard-size-string", text_manifest_edit(lambda m: m.__setitem__("shard_size", "512")),
         REAL_TRAIN, "'shard_size' must be an integer"),
    Case("text-manifest-no-shards", text_manifest_edit(lambda m: m.__setitem__("shards", [])), REAL_TRAIN,
         "do not cover"),
    Case("text-manifest-shard-file-gone",
         steps(copy("real_data", "data"), remove("data/text/embeds-00000.safetensors")), REAL_TRAIN, "is missing"),
    # ---- training-loop ranges and resume refusals (the reliability core; more in test_reliability.py)
    Case("train-grad-clip-negative", None, [*TOY_TRAIN, "train.grad_clip=-1"], "train.grad_clip"),
    Case("train-weight-decay-negative", None, [*TOY_TRAIN, "train.weight_decay=-1"], "train.weight_decay"),
    Case("train-lr-nan", None, [*TOY_TRAIN, "train.g_lr=.nan"], "train.g_lr"),
    Case("train-keep-last-0", None, [*TOY_TRAIN, "train.keep_last=0"], "train.keep_last"),
    Case("train-max-bad-steps-0", None, [*TOY_TRAIN, "train.max_bad_steps=0"], "train.max_bad_steps"),
    Case("train-grad-accum-0", None, [*TOY_TRAIN, "train.grad_accum_steps=0"], "train.grad_accum_steps"),
    Case("train-batch-not-split-by-accum", None, [*TOY_TRAIN, "train.batch_size=8", "train.grad_accum_steps=3"],
         "multiple of train.grad_accum_steps"),
    Case("train-fsdp-dtype-unknown", None, [*TOY_TRAIN, "train.fsdp_param_dtype=float8"], "train.fsdp_param_dtype"),
    Case("teacher-grad-clip-0", None, [*TRAIN_TEACHER, "train.grad_clip=0"], "train.grad_clip"),
    Case("teacher-warmup-negative", None, [*TRAIN_TEACHER, "train.warmup_steps=-5"], "train.warmup_steps"),
    Case("train-resume-nothing-to-resume", None, [*TOY_TRAIN, "--resume", "latest"], "no checkpoint"),
    Case("train-resume-old-pickle-latest", write("run/checkpoints/step_000002.pt", b"\x80\x04K\x01."),
         [*TOY_TRAIN, "--resume", "latest"], "old pickle format"),
    Case("train-resume-old-pickle-path", write("old.pt", b"\x80\x04K\x01."), [*TOY_TRAIN, "--resume", "old.pt"],
         "old pickle format"),
    Case("train-resume-missing-path", None, [*TOY_TRAIN, "--resume", "run/checkpoints/step_000009"],
         "does not exist"),
    Case("train-resume-only-broken-checkpoint", write("run/checkpoints/step_000002/MANIFEST.json", "{"),
         [*TOY_TRAIN, "--resume", "latest"], "no usable checkpoint"),
    Case("train-allow-change-without-resume", None, [*TOY_TRAIN, "--allow-config-change"], "only applies with"),
    Case("teacher-resume-old-state", write("t/state.pt", b"\x80\x04K\x01."), [*TRAIN_TEACHER, "--resume"],
         "old pickle format"),
    Case("teacher-resume-nothing", None, [*TRAIN_TEACHER, "--resume"], "no checkpoint"),
    Case("toy-train-bad-cache-creates-no-run", toy_manifest("[]"),
         ["train", "--teacher", "{teacher}", "--data", "data", "--out", "run"], "manifest.json"),
    Case("text-manifest-on-rerun", steps(copy("real_data", "data"),
                                         edit_json("data/manifest.json", lambda m: m.__setitem__("complete", False)),
                                         write("data/text/manifest.json", "[]")),
         [*REAL_DATA, "--prompts", "{prompts}", "teacher_data.samples_per_prompt=2", "teacher_data.shard_size=2",
          "teacher_data.batch_size=2", "teacher_data.previews=0"], "JSON object"),
]


def _fake_real_run(tmp: Path, world: dict, meta: bytes) -> None:
    """A real-path run folder as `export` reads it: config, weights file, and the given meta.json."""
    from twostep.core.config import save_config
    from twostep.real.train import ZImageDistillConfig

    run = tmp / "run"
    run.mkdir()
    save_config(ZImageDistillConfig(), str(run / "config.yaml"))
    (run / "student.safetensors").write_bytes(b"")
    (run / "meta.json").write_bytes(meta)


def test_table_has_forty_distinct_cases():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 40


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(case, world, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    if case.setup is not None:
        case.setup(tmp_path, world)
    roots = (str(tmp_path), world["root"], world["pipe"], world["teacher"])
    before = snapshot(*roots)
    code, out, err = run_cli(case.resolved_argv(world), capsys)
    assert_one_line_error(code, out, err, case.match)
    after = snapshot(*roots)
    assert after == before, (f"files changed: created {sorted(set(after) - set(before))}, deleted "
                             f"{sorted(set(before) - set(after))}, modified "
                             f"{sorted(k for k in before if k in after and before[k] != after[k])}")


# --------------------------------------------------------------------------- what does not fit a table row


def test_device_check_names_the_device_and_what_exists(monkeypatch):
    import torch

    from twostep.core.utils import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device(None) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(TwostepError, match=r"device 'cuda': no CUDA GPU is visible here \(this machine has: cpu\)"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(TwostepError, match=r"device 'cuda:7': there is no GPU 7 \(this machine has: cpu, cuda:0\)"):
        resolve_device("cuda:7")
    for bogus in ("banana", "CUDA", "meta", "cuda:x", "cpu:3"):
        with pytest.raises(TwostepError, match="cuda:0"):
            resolve_device(bogus)


def test_every_device_string_from_a_user_goes_through_one_check():
    """pipeline loading, the text cache, teacher data and training resolve devices with resolve_device only."""
    from twostep.core.utils import resolve_device
    from twostep.families.zimage.pipeline_io import pick_device

    for name in ("banana", "cuda:99"):
        with pytest.raises(TwostepError) as ours:
            resolve_device(name)
        with pytest.raises(TwostepError) as theirs:
            pick_device(name)
        assert str(ours.value) == str(theirs.value)
    package = REPO / "src/twostep"
    for path in package.rglob("*.py"):
        if path in (package / "core/utils.py", package / "engine/distributed.py"):  # resolve_device; local rank
            continue
        text = path.read_text()
        assert "torch.device(name)" not in text and 'torch.device("cuda' not in text, path


def test_generate_cuda_without_gpu_is_one_line(world, tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    code, out, err = run_cli(["generate", "--model", world["export"], "a cat", "--device", "cuda"], capsys)
    assert_one_line_error(code, out, err, "device 'cuda': no CUDA GPU is visible here")
    assert os.listdir(tmp_path) == []


def test_prompt_length_errors_list_up_to_five_lines(tmp_path):
    from twostep.core.prompts import check_prompt_tokens, prompt_location, read_prompts

    with pytest.raises(TwostepError) as err:
        check_prompt_tokens([10, 600, 20, 700, 513, 900, 1000, 2000, 3000], 512, "p.txt")
    assert str(err.value) == ("p.txt:2: prompt is 600 tokens, the encoder takes at most 512 (7 prompts too long: "
                              "lines 2, 4, 5, 6, 7 and 2 more); shorten them")
    check_prompt_tokens([512, 3], 512, "p.txt")  # at the limit is fine
    with pytest.raises(TwostepError, match=r"^p.parquet: row 1: prompt is 600 tokens"):
        check_prompt_tokens([1, 600], 512, "p.parquet")
    with pytest.raises(TwostepError, match=r"^the prompt: prompt is 600 tokens, the encoder takes at most 512; "
                                           r"shorten it$"):
        check_prompt_tokens([600], 512, None)
    assert prompt_location("p.jsonl", 0) == "p.jsonl:1"
    # line numbers are file lines: a .txt keeps every line (empty ones are errors), so prompt i is on line i + 1
    path = tmp_path / "p.txt"
    path.write_bytes(b"\xef\xbb\xbfa cat\r\nthe dog\r\n\r\n")  # BOM and CRLF: read as UTF-8 text, trailing blank ok
    assert read_prompts(str(path)) == ["a cat", "the dog"]


def test_token_count_is_what_the_pipeline_encodes(world):
    """The count includes the chat template, as ZImagePipeline's tokenizer call sees it; the limit is its 512."""
    from twostep.families.zimage.pipeline_io import MAX_SEQUENCE_LENGTH, load_tokenizer
    from twostep.families.zimage.text import prompt_token_counts

    tokenizer = load_tokenizer(world["pipe"])
    short, long = prompt_token_counts(tokenizer, ["a cat", LONG])
    assert 2 < short < 20 and long == short - 2 + 600
    assert MAX_SEQUENCE_LENGTH == 512
    import inspect

    from diffusers import ZImagePipeline

    assert inspect.signature(ZImagePipeline.__call__).parameters["max_sequence_length"].default == 512


def test_shipped_and_repo_configs_all_load():
    from twostep.offline.distill import DistillConfig
    from twostep.offline.teacher import TeacherConfig
    from twostep.real.train import ZImageDistillConfig

    paths = sorted((REPO / "configs").glob("*.yaml")) + sorted((REPO / "src/twostep/offline/shipped").glob("*/config.yaml"))
    assert len(paths) >= 7
    for path in paths:
        data = yaml.safe_load(path.read_text())
        cls = (ZImageDistillConfig if "data_dir" in data else DistillConfig if "teacher_data" in data
               else TeacherConfig)
        load_config(cls, str(path))


# engine/train.py and teacher.py's TeacherTrainConfig/TeacherConfig are another change's (TeacherConfig.seed
# has no range yet: see the issue)
OWNED_ELSEWHERE = ("DistillTrainConfig", "TeacherTrainConfig", "TeacherConfig",
                   "PlanRequest")  # plan's flags, not a config file: its errors name the flag


def _config_classes():
    """Every config dataclass of the package (a ``validate`` method or a ``*Config`` name), except the two training
    configs another change owns."""
    import pkgutil

    import twostep

    modules = [m.name for m in pkgutil.walk_packages(twostep.__path__, "twostep.") if not m.name.endswith("__main__")]
    found = {}
    for name in modules:
        for obj in vars(importlib.import_module(name)).values():
            if (isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__module__ == name
                    and (hasattr(obj, "validate") or obj.__name__.endswith("Config"))
                    and obj.__name__ not in OWNED_ELSEWHERE):
                found[obj.__name__] = obj
    return found


def test_every_numeric_config_value_has_a_range():
    """For every int/float field: a huge negative value and a non-finite one are refused, naming the key."""
    import typing

    classes = _config_classes()
    assert {"TinyZImageConfig", "ToyTextConfig", "ToyDataConfig", "SamplingConfig", "EvalConfig",
            "TeacherDataConfig", "ZImageDataConfig", "StudentConfig", "DiscriminatorConfig", "RecipeConfig",
            "BenchConfig", "ZImageModelConfig"} <= set(classes)
    checked = 0
    for cls in classes.values():
        for f in dataclasses.fields(cls):
            hint = typing.get_type_hints(cls)[f.name]
            if hint not in (int, float):
                continue
            for bad in ([-10 ** 12] + ([math.nan, math.inf] if hint is float else [])):
                with pytest.raises(ConfigError, match=f"'{f.name}"):
                    from_dict(cls, {f.name: bad})
            checked += 1
    assert checked >= 45


def test_config_text_with_a_bom_still_loads(tmp_path):
    from twostep.offline.teacher import TeacherConfig

    path = tmp_path / "c.yaml"
    path.write_bytes(b"\xef\xbb\xbfseed: 3\n")
    assert load_config(TeacherConfig, str(path)).seed == 3


def test_toy_teacher_data_checks_shards_against_the_manifest(world, tmp_path):
    """The toy cache (read by `twostep train` after it creates its run folder, so not a table row)."""
    from twostep.engine.teacher_data import TeacherData

    def damaged(change) -> str:
        out = tmp_path / f"d{len(os.listdir(tmp_path))}"
        shutil.copytree(world["toy_data"], out)
        manifest = json.loads((out / "manifest.json").read_text())
        change(out, manifest)
        (out / "manifest.json").write_text(json.dumps(manifest))
        return str(out)

    assert len(TeacherData(world["toy_data"])) == 8
    cases = {
        "count edited": (lambda d, m: m["shards"]["shard-00001.safetensors"].update(count=3), "count=3"),
        "entry deleted": (lambda d, m: m["shards"].pop("shard-00001.safetensors"), "does not list shard-00001"),
        "extra entry": (lambda d, m: m["shards"].__setitem__("shard-00002.safetensors",
                                                             dict(m["shards"]["shard-00001.safetensors"])),
                        "lists shard-00002.safetensors beyond the 8 samples"),
        "total edited": (lambda d, m: m["provenance"].update(num_samples=4), "lists shard-00001.safetensors beyond"),
    }
    for name, (change, match) in cases.items():
        with pytest.raises(TwostepError, match=re.escape(match)) as err:
            TeacherData(damaged(change))
        assert "manifest.json" in str(err.value) and "rerun `twostep teacher-data`" in str(err.value), name
        assert "\n" not in str(err.value)

    def swap_shard(d, m):  # the file of another shard size put in place, manifest consistent but unhashed
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        path = str(d / "shard-00001.safetensors")
        with safe_open(path, framework="pt") as f:
            meta = f.metadata()
        save_file({k: v[:2].contiguous() for k, v in load_file(path).items()}, path, metadata=meta)

    with pytest.raises(TwostepError, match="holds 2 samples, but .* says count=4"):
        TeacherData(damaged(swap_shard), verify=False)
