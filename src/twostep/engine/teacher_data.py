"""Teacher trajectories for distillation: the discriminator's "real" samples and the step-1 targets.

For sample ``i`` (prompt ``i % num_prompts``, noise from seed ``seed + i``) the teacher runs its full schedule
(8 Euler steps, shift 3) from that noise, and the cache keeps

- ``noise_seed`` ``(N,)`` int64 and ``noise`` ``(N, C, H, W)``: the starting noise (the seed reproduces it);
- ``prompt_index`` ``(N,)`` int64;
- ``states`` ``(N, K, C, H, W)`` (always float32): the teacher's state at every student sigma (``states[:, 0]`` at sigma=1 is the
  noise itself; ``states[:, 1]`` at 0.75 is the state after 4 of 8 steps: the same trajectory);
- ``final`` ``(N, C, H, W)``: the teacher's 8-step output.

Layout: ``OUT/shard-00000.safetensors ...`` plus ``OUT/manifest.json`` (provenance: teacher id and weight hash,
schedule, steps, shift, resolution, dtype, count, per-shard sha256). A rerun skips finished shards; a shard
whose checksum or provenance does not match is reported by name and never used.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from twostep.core.config import require, require_seed
from twostep.core.dtypes import DTYPES
from twostep.core.errors import TwostepError
from twostep.core.utils import (
    atomic_path,
    ensure_writable_dir,
    file_sha256,
    is_main_process,
    progress,
    rank,
    read_json_file,
    write_text,
)
from twostep.engine import flow
from twostep.engine.checkpoint import remove_stale_temporaries
from twostep.engine.preemption import Preempted, StopOnSignal

Tensor = torch.Tensor
MANIFEST = "manifest.json"
FORMAT_VERSION = 1


@dataclass
class TeacherDataConfig:
    num_samples: int = 4000
    shard_size: int = 500
    seed: int = 100_000  # sample i uses noise seed (seed + i)
    teacher_steps: int = 8
    shift: float = 3.0
    student_sigmas: list[float] = field(default_factory=lambda: [1.0, 0.75])
    dtype: str = "float32"
    batch_size: int = 500
    # cached: trajectories generated once into shards (`twostep teacher-data`); online: each training batch's
    # trajectories are computed when it is drawn, from the frozen teacher (nothing stored; the same sample i)
    mode: str = "cached"

    def validate(self) -> None:
        require(self.mode in ("cached", "online"), "mode", "must be 'cached' or 'online'")
        require(self.num_samples >= 1, "num_samples", "must be at least 1")
        require(self.shard_size >= 1, "shard_size", "must be at least 1")
        require(self.batch_size >= 1, "batch_size", "must be at least 1")
        require_seed(self.seed, "seed")
        require(1 <= self.teacher_steps <= 1000, "teacher_steps", "must be in [1, 1000]")
        require(self.shift > 0, "shift", "must be positive")
        require(self.dtype in DTYPES, "dtype", f"must be one of {sorted(DTYPES)}")
        require(len(self.student_sigmas) >= 1 and self.student_sigmas[0] == 1.0, "student_sigmas",
                "must start at 1.0 (the student starts from pure noise)")
        require(all(a > b for a, b in zip(self.student_sigmas, self.student_sigmas[1:])), "student_sigmas",
                "must be strictly decreasing")
        require(all(0 < s <= 1 for s in self.student_sigmas), "student_sigmas", "must lie in (0, 1]")


def state_indices(teacher_sigmas: Tensor, student_sigmas: list[float]) -> list[int]:
    """Where each student sigma sits on the teacher's grid; a sigma off the grid is an error."""
    indices = []
    for s in student_sigmas:
        hit = torch.nonzero((teacher_sigmas - s).abs() < 1e-4).flatten()
        if len(hit) == 0:
            grid = [round(v, 4) for v in teacher_sigmas.tolist()]
            raise TwostepError(f"student sigma {s} is not on the teacher's {len(teacher_sigmas) - 1}-step grid {grid}; "
                               "pick student sigmas from that grid")
        indices.append(int(hit[0]))
    return indices


@dataclass
class TeacherSource:
    """What generates trajectories: ``velocity(x, sigma, prompt_index)`` plus identity for provenance."""

    velocity: Callable[[Tensor, Tensor, Tensor], Tensor]
    teacher_id: str
    weights_sha256: str
    sample_shape: tuple[int, ...]  # (C, H, W)
    num_prompts: int
    extra: dict = field(default_factory=dict)  # more identity for provenance (real path: prompts, text cache)


def cache_provenance(cfg: TeacherDataConfig, source: TeacherSource) -> dict:
    sigmas = flow.turbo_sigmas(cfg.teacher_steps, cfg.shift)
    return {
        "format_version": FORMAT_VERSION, "teacher_id": source.teacher_id,
        "teacher_weights_sha256": source.weights_sha256, "schedule": "turbo", "teacher_steps": cfg.teacher_steps,
        "shift": cfg.shift, "student_sigmas": list(cfg.student_sigmas),
        "state_indices": state_indices(sigmas, cfg.student_sigmas), "sample_shape": list(source.sample_shape),
        "dtype": cfg.dtype, "num_samples": cfg.num_samples, "shard_size": cfg.shard_size, "seed": cfg.seed,
        "num_prompts": source.num_prompts, **source.extra,
    }


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


@torch.no_grad()
def seeded_noise(seeds: Tensor, shape, dtype: torch.dtype, device=None) -> Tensor:
    """``(N, *shape)`` float32 noise, sample i from seed ``seeds[i]``, rounded to the stored dtype first, so the cached
    noise is exactly what the teacher started from."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s)))
                        for s in seeds]).to(dtype).float().to(device or "cpu")


def trajectories(cfg: TeacherDataConfig, source: TeacherSource, samples: Tensor,
                 stop: StopOnSignal | None = None, desc: str = "", device=None) -> dict[str, Tensor] | None:
    """The teacher's trajectories of the samples numbered ``samples`` ``(N,)`` int64: sample i starts from the noise
    of seed ``cfg.seed + i`` with prompt ``i % num_prompts``. Returns the cache's tensors (module doc) in its
    dtypes; None when ``stop`` was signalled between two batches."""
    sigmas = flow.turbo_sigmas(cfg.teacher_steps, cfg.shift)
    picks = state_indices(sigmas, cfg.student_sigmas)
    samples = samples.to(torch.int64)
    seeds = samples + cfg.seed
    dtype = DTYPES[cfg.dtype]
    noise = seeded_noise(seeds, source.sample_shape, dtype, device)
    prompt_index = samples % source.num_prompts
    finals, states = [], []
    batches = range(0, len(samples), cfg.batch_size)
    for b in progress(batches, desc=desc, leave=False) if len(batches) > 1 and desc else batches:
        if stop is not None and stop.requested:
            return None
        p = prompt_index[b:b + cfg.batch_size]
        final, path = flow.euler_sample(lambda x, s, i: source.velocity(x, s, p), noise[b:b + cfg.batch_size],
                                        sigmas, return_states=True)
        finals.append(final)
        states.append(torch.stack([path[i] for i in picks], dim=1))
    # states stay fp32: the step-1 target (x_T@s2 - s2*eps)/(1-s2) multiplies their rounding error by 1/(1-s2)
    return {"noise_seed": seeds, "prompt_index": prompt_index, "noise": noise.to(dtype),
            "states": torch.cat(states).float(), "final": torch.cat(finals).to(dtype)}


def _make_shard(cfg: TeacherDataConfig, source: TeacherSource, start: int, count: int,
                stop: StopOnSignal | None = None) -> dict[str, Tensor] | None:
    """The shard's tensors; None when ``stop`` was signalled between two batches (the partial shard is dropped)."""
    return trajectories(cfg, source, torch.arange(start, start + count), stop,
                        desc=f"samples {start}-{start + count - 1}")


class OnlineTeacherData:
    """``teacher_data.mode: online``: the :class:`TeacherData` interface, with each batch's trajectories computed
    from the frozen teacher when it is drawn (under no_grad) instead of read from shards. Sample i is the cache's
    sample i (same seed, same prompt), so a run sees the same data either way; nothing is stored, and the data
    set is only the prompt list. Costs ``teacher_steps`` teacher forwards per sample drawn."""

    in_memory = True

    def __init__(self, cfg: TeacherDataConfig, source: TeacherSource, device=None):
        self.cfg, self.source, self.device = cfg, source, device
        self.provenance = cache_provenance(cfg, source)
        self.student_sigmas = list(cfg.student_sigmas)
        self.prompt_index = torch.arange(cfg.num_samples, dtype=torch.int64) % source.num_prompts
        self.noise_seed = torch.arange(cfg.num_samples, dtype=torch.int64) + cfg.seed

    def __len__(self) -> int:
        return self.cfg.num_samples

    @classmethod
    def from_student(cls, cfg: TeacherDataConfig, student, source: TeacherSource, cond: Callable[[Tensor], object],
                     device=None) -> "OnlineTeacherData":
        """Trajectories from ``student``'s frozen base with every adapter off (its ``teacher()`` view: no second
        copy of the teacher in memory); ``cond(prompt_index)`` gives the conditioning, looked up once per batch
        rather than at every Euler step. ``source`` supplies the identity and shapes."""
        looked_up: dict = {}

        def velocity(x, sigma, prompt_index):
            if looked_up.get("index") is not prompt_index:
                looked_up.update(index=prompt_index, cond=cond(prompt_index))
            with student.teacher() as frozen:
                return frozen.velocity(x, sigma, looked_up["cond"]).float()

        return cls(cfg, dataclasses.replace(source, velocity=velocity), device=device)

    def inputs(self, index: Tensor) -> dict[str, Tensor]:
        """The noise and prompt of the samples ``index``, without running the teacher (what a fake-score update
        reads)."""
        samples = index.cpu().to(torch.int64)
        noise = seeded_noise(samples + self.cfg.seed, self.source.sample_shape, DTYPES[self.cfg.dtype], self.device)
        return {"noise": noise, "prompt_index": samples % self.source.num_prompts}

    def batch(self, index: Tensor) -> dict[str, Tensor]:
        out = trajectories(self.cfg, self.source, index.cpu(), device=self.device)
        return {"noise": out["noise"].float(), "states": out["states"], "final": out["final"].float(),
                "prompt_index": out["prompt_index"]}


SHARD_NAME = re.compile(r"shard-\d{5}\.safetensors")
SHARD_KEYS = ("noise_seed", "prompt_index", "noise", "states", "final")


def _fix_hint(out_dir: str) -> str:
    return f"delete {out_dir} and rerun `twostep teacher-data`"


def _is_int(value, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _read_manifest(out_dir: str) -> dict | None:
    """The cache's manifest (None if there is none), checked for the shape :func:`generate_teacher_data` writes;
    anything else is one error naming the file and how to rebuild the cache."""
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.isfile(path):
        return None
    manifest = read_json_file(path, what="teacher-data manifest", hint=_fix_hint(out_dir))

    def bad(what: str) -> TwostepError:
        return TwostepError(f"{path}: teacher-data manifest {what}; {_fix_hint(out_dir)}")

    if not isinstance(manifest, dict):
        raise bad(f"must be a JSON object, not {type(manifest).__name__}")
    for key, kind in (("provenance", dict), ("shards", dict), ("complete", bool)):
        if key not in manifest:
            raise bad(f"lacks '{key}'")
        if not isinstance(manifest[key], kind):
            wanted = "a mapping" if kind is dict else "true or false"
            raise bad(f"'{key}' must be {wanted}, not {type(manifest[key]).__name__}")
    prov = manifest["provenance"]
    for key in ("num_samples", "shard_size"):
        if not _is_int(prov.get(key), 1):
            raise bad(f"provenance lacks a positive integer '{key}'")
    sigmas = prov.get("student_sigmas")
    if not (isinstance(sigmas, list) and sigmas and all(isinstance(s, (int, float)) for s in sigmas)):
        raise bad("provenance lacks the list 'student_sigmas'")
    for name, entry in manifest["shards"].items():
        if not SHARD_NAME.fullmatch(name):
            raise bad(f"lists {name!r}, not a shard name (shard-NNNNN.safetensors)")
        if not isinstance(entry, dict):
            raise bad(f"entry of {name} must be a mapping")
        for key, minimum in (("first_index", 0), ("count", 1)):
            if not _is_int(entry.get(key), minimum):
                raise bad(f"entry of {name} lacks an integer '{key}' >= {minimum}")
        if not isinstance(entry.get("sha256"), str):
            raise bad(f"entry of {name} lacks its 'sha256'")
        if "bytes" in entry and not _is_int(entry["bytes"]):
            raise bad(f"entry of {name}: 'bytes' must be an integer >= 0")
    return manifest


def _check_complete_shards(manifest: dict, out_dir: str) -> None:
    """A finished cache lists exactly the shards :func:`generate_teacher_data` writes: ``shard-k`` holds samples
    ``k * shard_size`` onwards, all of them contiguous from 0, ``num_samples`` in all."""
    path = os.path.join(out_dir, MANIFEST)
    prov, shards = manifest["provenance"], manifest["shards"]
    total, size = prov["num_samples"], prov["shard_size"]
    expected = {_shard_name(k): (k * size, min(size, total - k * size)) for k in range((total + size - 1) // size)}
    missing = sorted(set(expected) - set(shards))
    extra = sorted(set(shards) - set(expected))
    if missing or extra:
        what = (f"does not list {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}" if missing
                else f"lists {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''} beyond the {total} samples")
        raise TwostepError(f"{path}: teacher-data manifest {what} ({len(shards)} shards listed, {len(expected)} "
                           f"expected for num_samples={total}, shard_size={size}); {_fix_hint(out_dir)}")
    for name, (first, count) in expected.items():
        entry = shards[name]
        if (entry["first_index"], entry["count"]) != (first, count):
            raise TwostepError(f"{path}: teacher-data manifest entry of {name} says first_index="
                               f"{entry['first_index']}, count={entry['count']}; samples {first}..{first + count - 1} "
                               f"(count {count}) belong there; {_fix_hint(out_dir)}")


REWRITE_HINT = "use another --out or delete that folder"
TRAIN_HINT = ("train with the settings the cache was made with, or make a cache for these with `twostep teacher-data` "
              "into another folder")
# the differences a user recognises first, in their own terms; the rest are reported by key
_FIRST = ("teacher_id", "teacher_weights_sha256", "prompts_sha256", "resolution")


def _difference(key: str, made: dict, now: dict) -> str:
    if key == "teacher_weights_sha256":
        return f"by another teacher (weights {str(made.get(key))[:12]}, not {str(now.get(key))[:12]})"
    if key == "prompts_sha256":
        return (f"from another prompt set ({made.get('num_prompts')} prompts there, {now.get('num_prompts')} in "
                f"{now.get('_prompts_file') or 'the prompt file'} now)")
    if key == "resolution":
        return f"at {made.get(key)}px, not {now.get(key)}px"
    return f"with {key}={made.get(key)!r}, not {now.get(key)!r}"


class CacheMismatch(TwostepError):
    """A teacher-data cache made by another teacher, prompt set, schedule or resolution than the one asked for."""


def _check_same_provenance(manifest: dict, provenance: dict, where: str, hint: str = REWRITE_HINT) -> None:
    made = manifest.get("provenance", {})
    # keys starting with "_" describe the request (e.g. the prompt file's name) and are not compared
    keys = [k for k in _FIRST if k in provenance] + [k for k in provenance if k not in _FIRST and k[0] != "_"]
    for key in keys:
        if made.get(key) != provenance[key]:
            raise CacheMismatch(f"the teacher-data cache in {where} was made {_difference(key, made, provenance)}; "
                               f"{hint}")


def existing_cache(out_dir: str, provenance: dict) -> dict | None:
    """The manifest already in ``out_dir`` (None if there is none); raises if it was made by another teacher or
    schedule. Call it before loading any model."""
    manifest = _read_manifest(out_dir)
    if manifest is not None:
        _check_same_provenance(manifest, provenance, out_dir)
    return manifest


def generate_teacher_data(cfg: TeacherDataConfig, source: TeacherSource, out_dir: str) -> dict:
    """Write (or finish) the sharded cache in ``out_dir``; returns the manifest.

    Under torchrun each process generates its own shards (shard i on rank i % world size) and records them in its
    own ``manifest.rank-R.json``; after a barrier rank 0 merges every record into ``manifest.json``. Every sample has
    its own seed, so the shards are byte-identical to a one-process run, and a rerun (with any number of processes)
    generates only the shards no record lists.

    SIGTERM / SIGINT stop it at the next batch boundary: finished shards stay (the manifest lists them), the shard
    in progress is dropped, and :class:`~twostep.engine.preemption.Preempted` is raised; rerunning the same command
    generates only the missing shards, byte-identical to an uninterrupted run."""
    from twostep.engine.distributed import barrier, init_process_group, my_items, world_size

    init_process_group()
    provenance = cache_provenance(cfg, source)
    manifest = existing_cache(out_dir, provenance) or {"provenance": provenance, "shards": {}, "complete": False}
    ensure_writable_dir(out_dir, what="teacher-data folder")
    if is_main_process():  # after the checks: a refused command changes nothing
        for path in remove_stale_temporaries(out_dir):
            print(f"twostep: removed {path}, left by an interrupted write")
    barrier()  # no rank writes before rank 0 has cleaned up
    manifest["shards"].update(_rank_records(out_dir, provenance))  # shards an interrupted torchrun job finished
    num_shards = (cfg.num_samples + cfg.shard_size - 1) // cfg.shard_size
    record = MANIFEST if world_size() == 1 else f"manifest.rank-{rank()}.json"
    with StopOnSignal("teacher-data generation") as stop:
        _write_shards(cfg, source, out_dir, manifest, provenance, my_items(num_shards), num_shards, record, stop)
    barrier()
    manifest["shards"].update(_rank_records(out_dir, provenance))  # every rank reads every record: same verdict
    missing = [_shard_name(i) for i in range(num_shards) if _shard_name(i) not in manifest["shards"]]
    if missing:
        raise TwostepError(f"teacher data in {out_dir}: {len(missing)} shards ({missing[0]} ...) were not "
                           "written; rerun the same command to finish them")
    barrier()  # every rank has read the records before rank 0 removes them
    if is_main_process():
        manifest["shards"] = dict(sorted(manifest["shards"].items()))
        manifest["complete"] = True
        write_text(os.path.join(out_dir, MANIFEST), json.dumps(manifest, indent=2) + "\n")
        for name in os.listdir(out_dir):
            if RANK_RECORD.fullmatch(name):
                os.remove(os.path.join(out_dir, name))
    barrier()
    return _read_manifest(out_dir) if not is_main_process() else manifest


RANK_RECORD = re.compile(r"manifest\.rank-\d+\.json")


def _rank_records(out_dir: str, provenance: dict) -> dict:
    """The shard entries in the per-process records of a torchrun job (``manifest.rank-R.json``) made with this
    ``provenance``; a record of another teacher, schedule or prompt set is ignored (its shards are regenerated)."""
    shards = {}
    for name in sorted(os.listdir(out_dir)):
        if RANK_RECORD.fullmatch(name):
            record = read_json_file(os.path.join(out_dir, name), what="teacher-data record",
                                    hint=f"delete it and rerun; {_fix_hint(out_dir)}")
            if not (isinstance(record, dict) and isinstance(record.get("shards"), dict)):
                continue
            if record.get("provenance") != json.loads(json.dumps(provenance)):
                if is_main_process():
                    print(f"twostep: {name} in {out_dir} was made with other settings; its shards are regenerated")
                continue
            shards.update(record["shards"])
    return shards


def _write_shards(cfg, source, out_dir, manifest, provenance, indices: list[int], num_shards: int, record: str,
                  stop: StopOnSignal) -> None:
    """Generate the shards ``indices`` that no record lists as finished; each finished shard is recorded in
    ``record`` (the manifest itself in a one-process run) before the next one starts."""
    mine = {"provenance": provenance, "shards": {}} if record != MANIFEST else manifest
    bar = progress(indices, desc="teacher data")
    for done, index in enumerate(bar):
        name = _shard_name(index)
        path = os.path.join(out_dir, name)
        entry = manifest["shards"].get(name)
        if entry and os.path.isfile(path) and file_sha256(path) == entry["sha256"]:
            mine["shards"][name] = entry
            continue  # finished in an earlier run
        if entry or os.path.isfile(path):
            bar.write(f"teacher data: {name} is incomplete or does not match the manifest; regenerating it")
        start = index * cfg.shard_size
        count = min(cfg.shard_size, cfg.num_samples - start)
        tensors = _make_shard(cfg, source, start, count, stop)
        if tensors is None:
            raise Preempted(f"stopped by {stop.signal_name}: {len(manifest['shards'])} of {num_shards} shards of "
                            f"{out_dir} are done (the one in progress was dropped); rerun the same command to finish "
                            "the rest")
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata={"provenance": json.dumps(provenance, sort_keys=True)})
        manifest["shards"][name] = mine["shards"][name] = {
            "first_index": start, "count": count, "sha256": file_sha256(path), "bytes": os.path.getsize(path)}
        write_text(os.path.join(out_dir, record), json.dumps(mine, indent=2) + "\n")
        if stop.requested and done + 1 < len(indices):
            raise Preempted(f"stopped by {stop.signal_name}: {len(manifest['shards'])} of {num_shards} shards of "
                            f"{out_dir} are done; rerun the same command to finish the rest")


class TeacherData:
    """A verified cache. Tensors as documented in the module; ``batch`` returns float32.

    Small caches (the toy's few MB) are held in memory; large ones (real latents, about 2 MB per sample at
    1024²) stay in their memory-mapped shards and are read per batch (``in_memory=None`` picks by size).
    """

    MEMORY_LIMIT_BYTES = 2 << 30

    def __init__(self, out_dir: str, expected: dict | None = None, verify: bool | str = "auto",
                 in_memory: bool | None = None):
        """``verify``: ``"full"`` (or True) checks every shard's sha256, ``"size"`` its byte count, False nothing;
        ``"auto"`` hashes caches small enough for memory and checks sizes of large ones (hashing 200 GB of real
        latents at every start would cost minutes)."""
        manifest = _read_manifest(out_dir)
        if manifest is None:
            raise TwostepError(f"no teacher data in {out_dir} ({MANIFEST} missing); run `twostep teacher-data` first")
        if not manifest.get("complete"):
            raise TwostepError(f"the teacher data in {out_dir} is unfinished; rerun `twostep teacher-data` to finish it")
        if expected is not None:
            _check_same_provenance(manifest, expected, out_dir, hint=TRAIN_HINT)
        _check_complete_shards(manifest, out_dir)
        self.provenance = manifest["provenance"]
        self._shards: list[tuple[str, int, int]] = []  # (path, first_index, count)
        if verify == "auto":
            total = sum(entry.get("bytes", 0) for entry in manifest["shards"].values())
            verify = "full" if total <= self.MEMORY_LIMIT_BYTES or in_memory else "size"
        for name, entry in sorted(manifest["shards"].items()):
            path = os.path.join(out_dir, name)
            if not os.path.isfile(path):
                raise TwostepError(f"teacher-data shard {name} is missing from {out_dir}; rerun `twostep teacher-data`")
            if verify == "size" and "bytes" in entry:
                corrupt = os.path.getsize(path) != entry["bytes"]
            else:  # a cache written before sizes were recorded falls back to the hash
                corrupt = bool(verify) and file_sha256(path) != entry["sha256"]
            if corrupt:
                raise TwostepError(f"teacher-data shard {name} in {out_dir} is corrupt (checksum mismatch); delete "
                                   "it and rerun `twostep teacher-data`")
            try:
                with safe_open(path, framework="pt") as f:
                    shard_prov = json.loads((f.metadata() or {}).get("provenance", "{}"))
                    rows = {key: f.get_slice(key).get_shape()[0] if key in f.keys() else None for key in SHARD_KEYS}
            except Exception as err:  # noqa: BLE001 - any reader failure means the shard is damaged
                raise TwostepError(f"teacher-data shard {name} in {out_dir} is not readable ({type(err).__name__}); "
                                   "delete it and rerun `twostep teacher-data`") from None
            if shard_prov != self.provenance:
                raise TwostepError(f"teacher-data shard {name} in {out_dir} was made by another teacher or schedule; "
                                   "delete it and rerun `twostep teacher-data`")
            absent = [key for key, n in rows.items() if n is None]
            if absent:
                raise TwostepError(f"teacher-data shard {name} in {out_dir} lacks the tensor '{absent[0]}'; "
                                   f"{_fix_hint(out_dir)}")
            wrong = {n for n in rows.values() if n != entry["count"]}
            if wrong:
                raise TwostepError(f"teacher-data shard {name} in {out_dir} holds {max(wrong)} samples, but "
                                   f"{os.path.join(out_dir, MANIFEST)} says count={entry['count']}; "
                                   f"{_fix_hint(out_dir)}")
            self._shards.append((path, entry["first_index"], entry["count"]))
        self._length = sum(count for _, _, count in self._shards)
        self.student_sigmas = list(self.provenance["student_sigmas"])
        total_bytes = sum(os.path.getsize(path) for path, _, _ in self._shards)
        self.in_memory = total_bytes <= self.MEMORY_LIMIT_BYTES if in_memory is None else in_memory
        self._data: dict[str, Tensor] | None = None
        self._handles: dict[str, object] = {}
        if self.in_memory:
            parts: dict[str, list[Tensor]] = {}
            for path, _, _ in self._shards:
                for key, value in load_file(path).items():
                    parts.setdefault(key, []).append(value)
            self._data = {k: torch.cat(v) for k, v in parts.items()}
        self.prompt_index = self._column("prompt_index")
        self.noise_seed = self._column("noise_seed")

    def _column(self, key: str) -> Tensor:
        if self._data is not None:
            return self._data[key]
        return torch.cat([self._open(path).get_tensor(key) for path, _, _ in self._shards])

    def _open(self, path: str):
        if path not in self._handles:
            self._handles[path] = safe_open(path, framework="pt")
        return self._handles[path]

    def __len__(self) -> int:
        return self._length

    def batch(self, index: Tensor) -> dict[str, Tensor]:
        keys = ("noise", "states", "final")
        if self._data is not None:
            out = {k: self._data[k][index].float() for k in keys}
        else:
            rows: dict[str, list[Tensor]] = {k: [] for k in keys}
            for i in index.tolist():
                path, first, _ = next(s for s in self._shards if s[1] <= i < s[1] + s[2])
                handle = self._open(path)
                for k in keys:
                    rows[k].append(handle.get_slice(k)[i - first:i - first + 1])
            out = {k: torch.cat(v).float() for k, v in rows.items()}
        out["prompt_index"] = self.prompt_index[index]
        return out

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state


# Fewest cached teacher samples for a real run (docs/sizing.md): below this the discriminator sees every real many
# times (2,000 steps x batch 4 draw 8,000) and can tell reals from fakes by remembering the teacher set. A rule
# of thumb, not a measurement on Z-Image.
MIN_REAL_SAMPLES = 1000


def cache_size_warnings(samples: int, batch_size: int, minimum: int | None = None) -> list[str]:
    """Warnings (without the ``twostep: warning:`` prefix) for a teacher-data cache too small for the run: a batch
    larger than the cache (batches are drawn with replacement, so they repeat samples), and, with ``minimum``,
    fewer samples than a real run needs (docs/sizing.md)."""
    out = []
    if batch_size > samples:
        out.append(f"train.batch_size {batch_size} exceeds the {samples} cached samples: every batch repeats samples; "
                   "generate more teacher data or lower train.batch_size")
    if minimum is not None and samples < minimum:
        out.append(f"the teacher-data cache holds {samples} samples, fewer than the {minimum:,} a real run needs: the "
                   "discriminator sees each one many times and can memorise the teacher set; fine for a smoke "
                   "test (docs/sizing.md)")
    return out


def warn_small_cache(samples: int, batch_size: int, minimum: int | None = None) -> list[str]:
    """Print :func:`cache_size_warnings` as ``twostep: warning: ...`` lines on stdout; returns them."""
    messages = cache_size_warnings(samples, batch_size, minimum)
    for message in messages:
        print(f"twostep: warning: {message}", flush=True)
    return messages
