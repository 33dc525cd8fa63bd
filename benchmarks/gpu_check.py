"""GPU check of a family's full-size transformer (random weights): sampling latency and training-step memory.

``--family zimage`` (default: Z-Image-Turbo, 8 teacher steps) or ``--family flux2`` (FLUX.2 klein 4B, 4 teacher
steps, its 512 padded prompt tokens). Measures, on one CUDA device:
  (a) latency of 2-step vs teacher-step sampling at 1024^2 (Z-Image latents (1, 16, 128, 128), klein's
      (1, 128, 64, 64)) on the family's packaged schedule, median of --repeats runs after warm-up, and their ratio;
  (b) peak memory and wall time of one per-step-LoRA training step (discriminator step + generator step, the
      way ``Trainer.d_step`` / ``g_step`` run them) at 512^2 and 1024^2, batches 1, 2 and 4, gradient
      checkpointing on, next to what ``twostep plan`` predicts for the same run and the plan's error.

``--tiny`` runs the same code on a tiny config (CPU is fine: memory is reported as n/a there). Results go to
``OUT/gpu_check.json`` (rewritten after every measurement, so a killed run keeps what it measured).

  (c) with ``--end-to-end``: the whole ``pipe(prompt)`` (text encoder, 2 vs the teacher's transformer steps,
      VAE decode) at 1024^2 with full-size random weights, the latency a user sees, plus the text encoder
      and VAE decode alone.

    python benchmarks/gpu_check.py --out runs/gpu_check [--end-to-end]  # CUDA, ~3-6 min on one H100 (+1-2 min)
    python benchmarks/gpu_check.py --family flux2 --out runs/gpu_check_klein [--end-to-end]  # CUDA, ~2-4 min
    python benchmarks/gpu_check.py --tiny --end-to-end --out /tmp/gpu_check   # CPU smoke run, seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

try:
    import twostep  # noqa: F401  (only probes whether the package is importable)
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch

from twostep.engine import flow
from twostep.engine.backbone import Conditioning
from twostep.engine.discriminator import Discriminator
from twostep.engine.recipe import discriminator_loss, generator_loss
from twostep.engine.student import Student
from twostep.families.registry import FAMILY_MODULES, family_named
from twostep.real.plan import PlanRequest, load_plan_config, plan_memory

CAPTION_TOKENS = 128  # a typical prompt's length (the planner's 512 is the maximum)
TINY_CAPTION_TOKENS = 64


class Target:
    """What is measured: a family's transformer config, its packaged recipe and what its pipeline feeds it.
    (A plain class: a dataclass needs its module in sys.modules, and the tests load this script from its path.)"""

    def __init__(self, family, config: dict, cfg, caption_tokens: int):
        self.family = family  # a ModelFamily
        self.config = config  # transformer kwargs (published, or a tiny test config)
        self.cfg = cfg  # the family's packaged distillation config (student, discriminator, recipe, schedule)
        self.caption_tokens = caption_tokens  # prompt tokens the transformer reads (klein: its padded 512)

    @property
    def latent_down(self) -> int:  # pixels per cell of the engine's latents
        return self.family.vae_downsample

    @property
    def teacher_steps(self) -> int:
        return self.cfg.teacher_data.teacher_steps

    @property
    def shift(self) -> float:
        return self.cfg.teacher_data.shift


def make_target(family_name: str, tiny: bool) -> Target:
    from twostep.testing import tiny_transformer_config_of

    family = family_named(family_name)
    cfg, _ = load_plan_config(family.default_config)
    if tiny:
        return Target(family, tiny_transformer_config_of(family_name), cfg, TINY_CAPTION_TOKENS)
    config = family.published_config()
    return Target(family, config, cfg, family.max_sequence_length if family.prompt_padded else CAPTION_TOKENS)


def _gib(n: int | None) -> float | None:
    return None if n is None else round(n / 1024 ** 3, 3)


class Run:
    """Device, timing and the JSON record; ``over_budget()`` guards every further measurement."""

    def __init__(self, out: str, budget_s: float):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.cuda = self.device.type == "cuda"
        self.budget_s, self.start = budget_s, time.monotonic()
        self.path = os.path.join(out, "gpu_check.json")
        os.makedirs(out, exist_ok=True)
        self.record: dict = {"skipped": []}

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def over_budget(self, what: str, needs_s: float = 0.0) -> bool:
        if self.elapsed() + needs_s <= self.budget_s:
            return False
        self.record["skipped"].append(f"{what} (over the {self.budget_s:.0f}s budget at {self.elapsed():.0f}s)")
        print(f"skipped {what}: over budget", flush=True)
        return True

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    @property
    def dtype(self) -> torch.dtype:  # CPU bf16 kernels are slow and the CPU run only smoke-tests the code path
        return torch.bfloat16 if self.cuda else torch.float32

    def autocast(self):  # as Trainer._autocast on CUDA
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else nullcontext()

    def save(self) -> None:
        self.record["elapsed_s"] = round(self.elapsed(), 2)
        with open(self.path, "w", encoding="utf-8") as f:
            json.dump(self.record, f, indent=2)


def environment(run: Run, tiny: bool, family: str) -> dict:
    import diffusers
    import peft

    env = {"tiny": tiny, "family": family, "device": str(run.device), "torch": torch.__version__,
           "diffusers": diffusers.__version__, "peft": peft.__version__, "python": platform.python_version()}
    if run.cuda:
        props = torch.cuda.get_device_properties(run.device)
        env.update(device_name=props.name, device_memory_gib=_gib(props.total_memory), cuda=torch.version.cuda)
    else:
        env["device_name"] = platform.processor() or platform.machine()
    return env


def caption(batch: int, width: int, device, tokens: int, seed: int = 0) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    return Conditioning.from_list([torch.randn(tokens, width, generator=g) for _ in range(batch)]).to(device)


def timed(run: Run, fn) -> float:
    run.sync()
    t0 = time.perf_counter()
    fn()
    run.sync()
    return time.perf_counter() - t0


def measure_latency(run: Run, backbone, target: Target, px: int, repeats: int) -> None:
    """Median seconds of 2-step and teacher-step sampling, one image; warm-up runs first."""
    latent, teacher_steps = px // target.latent_down, target.teacher_steps
    cond = caption(1, backbone.cap_feat_dim, run.device, target.caption_tokens)
    noise = torch.randn(1, backbone.in_channels, latent, latent, generator=torch.Generator().manual_seed(0))
    noise = noise.to(run.device)
    velocity = lambda x, sigma, i: backbone.velocity(x, sigma, cond)  # noqa: E731
    result = {"latent_shape": list(noise.shape), "repeats": repeats, "teacher_steps": teacher_steps,
              "caption_tokens": target.caption_tokens, "shift": target.shift}
    for steps in (2, teacher_steps):
        if run.over_budget(f"latency_{steps}"):
            break
        sigmas = flow.turbo_sigmas(steps, target.shift)
        sample = lambda: flow.euler_sample(velocity, noise, sigmas)  # noqa: E731
        for _ in range(2):
            sample()
        times = [timed(run, sample) for _ in range(repeats)]
        result[f"latency_{steps}"] = statistics.median(times)
        result[f"latency_{steps}_all"] = [round(t, 5) for t in times]
        print(f"{steps}-step sampling at {px}px: median {result[f'latency_{steps}']:.4f}s", flush=True)
    if "latency_2" in result and f"latency_{teacher_steps}" in result:
        result["ratio"] = result[f"latency_{teacher_steps}"] / result["latency_2"]
        print(f"{teacher_steps}-step / 2-step latency: {result['ratio']:.2f}x", flush=True)
    run.record["sampling"] = result
    run.save()


def train_step(run: Run, student: Student, disc: Discriminator, opt_g, opt_d, latent: int, gen, target: Target,
               size: int = 1) -> dict:
    """One discriminator update then one generator update, as ``Trainer.d_step`` / ``g_step``, batch ``size``."""
    c, k = student.base.in_channels, student.cfg.num_steps
    device = run.device
    batch = {"noise": torch.randn(size, c, latent, latent, generator=gen).to(device),
             "states": torch.randn(size, k, c, latent, latent, generator=gen).to(device),
             "final": torch.randn(size, c, latent, latent, generator=gen).to(device),
             "prompt_index": torch.zeros(size, dtype=torch.long, device=device)}
    cond = caption(size, student.base.cap_feat_dim, device, target.caption_tokens)
    disc.requires_grad_(True)
    with run.autocast():
        d_total, d_logs = discriminator_loss(student, disc, batch, batch["final"], cond, gen)
    opt_d.zero_grad(set_to_none=True)
    d_total.backward()
    opt_d.step()
    disc.requires_grad_(False)
    try:
        with run.autocast():
            g_total, g_logs, _ = generator_loss(student, disc, batch, cond, target.cfg.recipe, gen)
        opt_g.zero_grad(set_to_none=True)
        g_total.backward()
    finally:
        disc.requires_grad_(True)
    opt_g.step()
    return {"d_loss": d_logs["d_loss"], "g_total": g_logs["g_total"]}


def measure_training(run: Run, backbone, target: Target, resolutions: list[int], blocks: list[int],
                     batches: list[int] = (1,)) -> None:
    """Peak memory and wall time of one LoRA training step per resolution and batch, next to the planner's
    prediction and its error."""
    shipped = target.cfg  # the family's packaged config: its student, heads and recipe
    student = Student(backbone, shipped.student)
    groups = student.parameter_groups()
    for ps in groups.values():  # LoRA trains in fp32 over the bf16 base
        for p in ps:
            p.data = p.data.float()
    student.set_gradient_checkpointing(True)
    heads = dataclasses.replace(shipped.discriminator, blocks=blocks)
    disc = Discriminator(target.family.hidden_width(backbone), backbone.cap_feat_dim, heads).to(run.device)
    opt_g = torch.optim.AdamW([{"params": ps, "name": n} for n, ps in groups.items()], lr=1e-5)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    run.record["training"] = {"disc_blocks": blocks, "caption_tokens": target.caption_tokens, "batches": list(batches),
                              "lora_params": sum(p.numel() for ps in groups.values() for p in ps)}
    last_s, last_cost = 0.0, resolutions[0] ** 2
    for res, size in [(r, b) for r in resolutions for b in batches]:
        latent = res // target.latent_down
        # a step costs ~ tokens x batch; skip if the projected warm-up + timed step would overrun the budget
        projected = 2 * last_s * (res ** 2 * size) / last_cost
        key = f"train_step_{res}_b{size}"
        if run.over_budget(key, projected):
            continue
        entry: dict = {"resolution": res, "batch": size, "latent_shape": [size, backbone.in_channels, latent, latent]}
        plan = plan_memory(PlanRequest(mode="lora", resolution=res, batch=size, caption_tokens=target.caption_tokens,
                                       lora_rank=shipped.student.lora_rank, lora_targets=shipped.student.lora_targets,
                                       discriminator=heads), target.config, target.family)
        # max_memory_allocated does not see the CUDA context: compare without the planner's overhead constant
        entry["plan_bytes_without_overhead"] = plan["total_bytes"] - plan["components"]["CUDA / framework overhead"]
        try:
            entry["warmup_s"] = timed(run, lambda: train_step(run, student, disc, opt_g, opt_d, latent, gen, target,
                                                              size))
            if run.cuda:
                torch.cuda.reset_peak_memory_stats(run.device)
                entry["allocated_before_bytes"] = torch.cuda.memory_allocated(run.device)
            losses = {}
            entry["step_s"] = timed(run, lambda: losses.update(
                train_step(run, student, disc, opt_g, opt_d, latent, gen, target, size)))
            entry.update(losses)
            entry["peak_bytes"] = torch.cuda.max_memory_allocated(run.device) if run.cuda else None
            last_s, last_cost = entry["step_s"], res ** 2 * size
        except torch.cuda.OutOfMemoryError as err:
            entry["error"] = f"out of memory: {str(err).splitlines()[0]}"
            opt_g.zero_grad(set_to_none=True)
            opt_d.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
        entry["peak_gib"] = _gib(entry.get("peak_bytes"))
        entry["allocated_before_gib"] = _gib(entry.get("allocated_before_bytes"))
        entry["plan_gib_without_overhead"] = _gib(entry["plan_bytes_without_overhead"])
        if entry.get("peak_bytes"):  # the plan's error: positive = the plan overestimates
            entry["plan_error"] = round(entry["plan_bytes_without_overhead"] / entry["peak_bytes"] - 1, 4)
        run.record["training"][key] = entry
        run.save()
        if "error" in entry:
            print(f"train step at {res}px batch {size}: {entry['error']}", flush=True)
        else:
            peak = "n/a (CPU)" if entry["peak_gib"] is None else f"{entry['peak_gib']:.2f} GiB"
            error = f", plan error {entry['plan_error']:+.0%}" if "plan_error" in entry else ""
            print(f"train step at {res}px batch {size}: {entry['step_s']:.3f}s, peak {peak}, planned "
                  f"{entry['plan_gib_without_overhead']:.2f} GiB (+ overhead){error}", flush=True)


E2E_PROMPT = "a red fox standing in fresh snow at golden hour, detailed fur, soft light, shallow depth of field"


def end_to_end_pipeline(run: Run, target: Target, tiny: bool) -> tuple[object, int]:
    """``(pipeline, px)``: the family's stock pipeline with random weights, full size at 1024² in the run's dtype
    on the device (built there directly: no fp32 copy of 8B parameters on the host), or tiny at 64²."""
    from twostep.testing import TINY_WORDS

    words = TINY_WORDS + E2E_PROMPT.replace(",", " ").split()
    if tiny:
        return target.family.random_pipeline(words).to(run.device), 64
    previous = torch.get_default_dtype()
    torch.set_default_dtype(run.dtype)
    try:
        with torch.device(run.device):
            return target.family.random_pipeline(words, full=True), 1024
    finally:
        torch.set_default_dtype(previous)


def measure_end_to_end(run: Run, pipe, target: Target, px: int, repeats: int) -> None:
    """What a user waits for: ``pipe(prompt)`` with text encoding, 2 (the packaged student schedule, explicit
    sigmas) vs the teacher's transformer steps and VAE decode to a PIL image, medians after warm-up; plus the shared
    parts (text encoder, VAE decode to uint8) timed alone."""
    family, teacher = target.family, target.teacher_steps
    result = {"resolution": px, "repeats": repeats, "teacher_steps": teacher}
    with torch.no_grad():
        embed = family.encode_with_pipeline(pipe, [E2E_PROMPT], run.device)[0]
        # one teacher sample (the pipeline draws its noise): its latent cells set klein's shift, and it is what
        # the decode timing decodes
        teacher_call = {**family.pipeline_call_kwargs(teacher), "num_inference_steps": teacher}
        latents = family.pipeline_latents(pipe, embed, None, px, **teacher_call)
        sigmas = family.pipeline_sigmas(list(target.cfg.student.sigmas), target.shift,
                                        latents.shape[-2] * latents.shape[-1])
        calls = {2: {**family.pipeline_call_kwargs(2), "sigmas": sigmas}, teacher: teacher_call}
        for steps, kwargs in calls.items():
            if run.over_budget(f"end_to_end_{steps}"):
                break
            call = lambda: pipe(prompt=E2E_PROMPT, height=px, width=px,  # noqa: E731
                                generator=torch.Generator().manual_seed(0), **kwargs)
            call()
            times = [timed(run, call) for _ in range(repeats)]
            result[f"pipeline_{steps}"] = statistics.median(times)
            print(f"end to end, {steps} steps at {px}²: median {result[f'pipeline_{steps}']:.3f}s", flush=True)
        if not run.over_budget("end_to_end_parts"):
            encode = lambda: family.encode_with_pipeline(pipe, [E2E_PROMPT], run.device)  # noqa: E731
            encode()
            result["text_encoder"] = statistics.median([timed(run, encode) for _ in range(repeats)])
            decode = lambda: family.decode_to_uint8(pipe.vae, latents.to(run.device, pipe.vae.dtype))  # noqa: E731
            decode()
            result["vae_decode"] = statistics.median([timed(run, decode) for _ in range(repeats)])
    if "pipeline_2" in result and f"pipeline_{teacher}" in result:
        result["ratio"] = result[f"pipeline_{teacher}"] / result["pipeline_2"]
        print(f"end to end, {teacher}-step / 2-step: {result['ratio']:.2f}x", flush=True)
    run.record["end_to_end"] = result
    run.save()


def measure_all(run: Run, args, target: Target, sample_px: int, train_px: list[int], blocks: list[int]) -> None:
    """Build the random-weight backbone, then (a) sampling latency and (b) training steps."""
    run.record["environment"] = environment(run, args.tiny, target.family.name)
    t0 = time.perf_counter()
    # CPU: build in fp32 directly (no cast, no "keep in float32" warning)
    backbone = target.family.random_backbone(target.config, seed=0, device=run.device,
                                             dtype=torch.bfloat16 if run.cuda else None)
    backbone.requires_grad_(False)
    if run.cuda:
        torch.cuda.empty_cache()  # the fp32 build before the bf16 cast is not part of any measurement
    run.record["model"] = {"family": target.family.name, "title": target.family.title,
                           "params": sum(p.numel() for p in backbone.parameters()),
                           "dtype": str(run.dtype).replace("torch.", ""), "build_s": round(time.perf_counter() - t0, 2)}
    print(f"{run.record['environment']['device_name']}: {target.family.title}, "
          f"{run.record['model']['params'] / 1e9:.3f}B params built in {run.record['model']['build_s']}s", flush=True)
    with torch.no_grad():
        measure_latency(run, backbone, target, sample_px, args.repeats)
    measure_training(run, backbone, target, train_px, blocks, [1, 2] if args.tiny else [1, 2, 4])
    run.save()
    if args.end_to_end and not run.over_budget("end_to_end"):
        del backbone  # the pipeline brings its own transformer
        if run.cuda:
            torch.cuda.empty_cache()
        pipe, px = end_to_end_pipeline(run, target, args.tiny)
        measure_end_to_end(run, pipe, target, px, max(1, min(args.repeats, 5)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", default="zimage", choices=list(FAMILY_MODULES),
                        help="model family whose published transformer is built (default zimage)")
    parser.add_argument("--tiny", action="store_true", help="tiny config at 64/128 px (runs on CPU)")
    parser.add_argument("--out", default="runs/gpu_check", help="folder for gpu_check.json")
    parser.add_argument("--repeats", type=int, default=10, help="timed sampling runs per step count (default 10)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip what is left after this many seconds")
    parser.add_argument("--results", help="also write the numbers into a marked section of this markdown file")
    parser.add_argument("--end-to-end", action="store_true",
                        help="also time the whole pipeline (text encoder, 2 vs the teacher's steps, VAE decode) at "
                             "1024² with full-size random weights (--tiny: the tiny pipeline at 64²)")
    args = parser.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        print("gpu_check: the full-size check needs a CUDA GPU; use --tiny on CPU", file=sys.stderr)
        return 2
    run = Run(args.out, args.budget_s)
    target = make_target(args.family, args.tiny)
    if args.tiny:
        sample_px, train_px, blocks = 128, [64, 128], [0, 1]
    else:
        sample_px, train_px, blocks = 1024, [512, 1024], list(target.cfg.discriminator.blocks)
    threads = torch.get_num_threads()
    if not run.cuda:  # tiny ops gain nothing from threads, and on a busy CPU spinning OpenMP threads cost 100x
        torch.set_num_threads(1)
    try:
        measure_all(run, args, target, sample_px, train_px, blocks)
    finally:
        torch.set_num_threads(threads)
    print(f"wrote {run.path} ({run.elapsed():.0f}s)", flush=True)
    if args.results:
        from twostep.core.reports import update_section

        command = "python benchmarks/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:])
        section = "gpu-check" + ("" if args.family == "zimage" else f"-{args.family}") + ("-tiny" if args.tiny else "")
        update_section(args.results, section, results_section(run.record, command))
        print(f"updated {args.results}")
    return 0


def results_section(record: dict, command: str) -> str:
    """Markdown for docs/results.md: the device, sampling latency and ratio, training-step peak vs the plan."""
    env, sampling = record["environment"], record.get("sampling", {})
    model = record["model"]
    title = model.get("title", "Z-Image")
    lines = [f"### GPU check, {title} (`benchmarks/gpu_check.py`)", "",
             f"Written by `{command}`; device: {env['device_name']} ({env['device']}), torch {env['torch']}, "
             f"diffusers {env['diffusers']}; {model['params'] / 1e9:.3f}B-parameter {title} transformer, random "
             f"weights, {model['dtype']}.", ""]
    teacher = sampling.get("teacher_steps", 8)
    if "ratio" in sampling:
        tokens = f", {sampling['caption_tokens']} prompt tokens" if "caption_tokens" in sampling else ""
        lines += [f"- Sampling at latents {tuple(sampling['latent_shape'])}{tokens}: 2 steps "
                  f"{sampling['latency_2'] * 1e3:.1f} ms, {teacher} steps "
                  f"{sampling[f'latency_{teacher}'] * 1e3:.1f} ms (medians of {sampling['repeats']}): "
                  f"**{sampling['ratio']:.2f}×** faster."]
    for key, step in sorted(record.get("training", {}).items()):
        if not key.startswith("train_step_") or not isinstance(step, dict):
            continue
        if "step_s" not in step:
            lines.append(f"- Training step at {step['resolution']}², batch {step['batch']}: {step.get('error')}.")
            continue
        peak = "n/a (CPU)" if step.get("peak_gib") is None else f"{step['peak_gib']:.2f} GiB"
        error = f", plan error {step['plan_error']:+.0%}" if "plan_error" in step else ""
        lines.append(f"- One per-step-LoRA training step at {step['resolution']}², batch {step['batch']} "
                     f"(checkpointing): {step['step_s']:.2f} s, peak memory {peak} (plan without overhead: "
                     f"{step['plan_gib_without_overhead']:.2f} GiB{error}).")
    e2e = record.get("end_to_end", {})
    e2e_teacher = e2e.get("teacher_steps", 8)  # records from before klein's end-to-end part: Z-Image's 8
    if "ratio" in e2e:
        parts = "".join(f", {name.replace('_', ' ')} {e2e[name] * 1e3:.1f} ms" for name in ("text_encoder", "vae_decode")
                        if name in e2e)
        lines.append(f"- End to end (`pipe(prompt)` at {e2e['resolution']}², text encoder + transformer steps + VAE "
                     f"decode, medians of {e2e['repeats']}): 2 steps {e2e['pipeline_2']:.3f} s, {e2e_teacher} steps "
                     f"{e2e[f'pipeline_{e2e_teacher}']:.3f} s: **{e2e['ratio']:.2f}×** faster as a user sees it{parts}.")
    if record.get("skipped"):
        lines.append(f"- Skipped (budget or memory): {', '.join(map(str, record['skipped']))}.")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
