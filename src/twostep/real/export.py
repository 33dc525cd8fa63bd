"""``twostep export RUN --format diffusers | lora | comfyui | merged``: a trained student where people generate
images. The key names, the ComfyUI graph and the model card come from the teacher's model family.

Student step ``k`` (1-based in every file name) has its own LoRA (``shared``: the same one for both steps).
The LoRA scale ``alpha / rank`` is baked into ``lora_B``, so each file works at strength 1 with no alpha key
(diffusers) or with ``alpha = rank`` (ComfyUI).

- ``lora``: ``OUT/step{k}_lora.safetensors`` in diffusers/PEFT naming (``transformer.layers.0.attention.to_q.lora_A
  .weight``), loadable with the pipeline's ``load_lora_weights``.
- ``comfyui``: ``OUT/step{k}_lora_comfyui.safetensors`` in the keys ComfyUI's loader of the family maps (Z-Image:
  ``diffusion_model.`` + diffusers names, with ``.alpha``; diffusers reads them too) + ``OUT/workflow_api.json``,
  the one-sampler-per-step ComfyUI workflow for these files (the family's ``comfy_workflow``), which
  ``OUT/README.md`` explains node by node.
- ``diffusers``: a complete pipeline folder (the teacher's components, hard-linked when possible) plus
  ``twostep_lora/step{k}_lora.safetensors`` and ``twostep.json``; see :mod:`twostep.real.pipeline` for the switch.
- ``merged``: ``OUT/transformer_step{k}/``: one full diffusers transformer per step (``W + scale·B·A``).
"""

from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

from twostep.core.errors import TwostepError
from twostep.core.utils import atomic_dir, check_replaceable_dir, write_text
from twostep.engine.checkpoint import assert_finite
from twostep.engine.student import StudentConfig
from twostep.families.base import ModelFamily

Tensor = torch.Tensor
FORMATS = ("diffusers", "lora", "comfyui", "merged")
LORA_DIR = "twostep_lora"
INFO = "twostep.json"
_STUDENT_PREFIX = "base.transformer."


def step_lora(state: dict[str, Tensor], cfg: StudentConfig, step: int) -> dict[str, Tensor]:
    """Student step ``step`` (0-based) as ``{module}.lora_A.weight`` / ``{module}.lora_B.weight`` (scale in B).

    ``state``: the run's trainable state (``base.transformer.{module}.lora_A.step{k}.weight``).
    """
    if cfg.form != "lora":
        raise TwostepError("this run trained full per-step copies (student.form=full): export it with --format merged")
    adapter = f"step{step if cfg.params == 'decoupled' else 0}"
    scale = cfg.lora_alpha / cfg.lora_rank
    out = {}
    for key, value in state.items():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}.{adapter}.weight"
            if key.endswith(marker):
                module = key[len(_STUDENT_PREFIX):-len(marker)]
                out[f"{module}.{part}.weight"] = (value * scale if part == "lora_B" else value).contiguous()
    if not out:
        raise TwostepError(f"the run's weights hold no LoRA for student step {step + 1}")
    return out


def lora_files(state: dict[str, Tensor], cfg: StudentConfig, dtype: torch.dtype = torch.bfloat16,
               family: ModelFamily | None = None) -> list[dict[str, Tensor]]:
    """One state dict per student step, in diffusers naming (``transformer.``), or with ``family`` in the keys
    ComfyUI's loader of that family maps."""
    files = []
    for step in range(cfg.num_steps):
        lora = step_lora(state, cfg, step)
        if family is None:
            files.append({f"transformer.{k}": v.to(dtype) for k, v in lora.items()})
        else:
            files.append({k: v.to(dtype) if v.is_floating_point() and v.ndim else v
                          for k, v in family.comfy_lora(lora).items()})
    return files


def _file_meta(info: dict) -> dict[str, str]:
    """The safetensors header of a LoRA file: which step it is, the schedule and the base model, readable by any
    tool that shows metadata, plus the whole export record under ``twostep``."""
    return {"format": "pt", "twostep": json.dumps(info, sort_keys=True), "twostep.step": str(info["step"]),
            "twostep.num_steps": str(info["num_steps"]), "twostep.sigmas": json.dumps(info["student_sigmas"]),
            "twostep.shift": str(info["shift"]), "twostep.base_model": str(info.get("base_model") or "")}


def _run_info(cfg, meta: dict, family: ModelFamily) -> dict:
    from twostep.engine.flow import turbo_sigmas

    sigmas = list(cfg.student.sigmas)
    default = turbo_sigmas(len(sigmas), cfg.teacher_data.shift).tolist()[:-1]
    return {"num_steps": len(sigmas), "student_sigmas": sigmas, "shift": cfg.teacher_data.shift,
            "renoise": cfg.student.renoise,
            "default_schedule": all(abs(a - b) < 1e-6 for a, b in zip(sigmas, default)),
            "params": cfg.student.params, "form": cfg.student.form, "rank": cfg.student.lora_rank,
            "family": family.name,
            "base_model": family.teacher_name(cfg.model.path, meta.get("teacher_fingerprint")),
            "teacher_fingerprint": meta.get("teacher_fingerprint"),
            "resolution": cfg.teacher_data.resolution, "teacher_steps": cfg.teacher_data.teacher_steps,
            "train_steps": meta.get("steps"), **teacher_guidance_record(cfg.teacher_data)}


def teacher_guidance_record(data_cfg) -> dict:
    """``{"teacher_guidance": {"scale", "negative_prompt"}}`` when the teacher data was sampled with CFG, else ``{}``:
    evaluate then runs the teacher as the data was made."""
    if not data_cfg.guidance_scale:
        return {}
    return {"teacher_guidance": {"scale": float(data_cfg.guidance_scale), "negative_prompt": data_cfg.negative_prompt}}


def _config_summary(cfg, meta: dict) -> dict[str, str]:
    """The run's recipe in a few rows for the model card."""
    import diffusers

    s, r, t = cfg.student, cfg.recipe, cfg.train
    return {
        "student": f"{s.form}, {s.params} parameters per step" + (f", LoRA rank {s.lora_rank}" if s.form == "lora"
                                                                     else ""),
        "recipe": (f"{'DMD2' if r.kind == 'dmd2' else 'Turbo++'}: "
                   + (f"distribution matching weight {r.dmd_weight} ({t.fake_steps_per_g} fake-score updates per "
                      f"step), " if r.uses_dmd else "")
                   + f"adversarial weight {r.adv_weight}, step-1 loss {r.step1_loss} (weight {r.step1_weight}), "
                   f"end to end {r.end_to_end}, reals from the {r.real_source}"),
        "discriminator": f"heads on blocks {list(cfg.discriminator.blocks)}, {cfg.discriminator.loss} loss",
        "training": f"{meta.get('steps')} steps, batch {t.batch_size}, lr {t.g_lr} / {t.d_lr}, EMA {t.ema_decay}",
        "teacher data": f"{cfg.teacher_data.resolution}px, {cfg.teacher_data.teacher_steps} teacher steps"
                        + (f", guidance {cfg.teacher_data.guidance_scale:g}" if cfg.teacher_data.guidance_scale else ""),
        "exported with": f"twostep, diffusers {diffusers.__version__}",
    }


def _link_tree(src: str, dst: str) -> None:
    """Copy ``src`` into ``dst`` with hard links where the filesystem allows (a 6B pipeline is ~30 GB)."""
    def link_or_copy(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link_or_copy, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns(".cache", ".git*"))


def _save_loras(folder: str, files: list[dict], info: dict, name: str) -> list[str]:
    paths = []
    for step, tensors in enumerate(files, 1):
        path = os.path.join(folder, name.format(step=step))
        assert_finite(tensors, path)  # the storage dtype can overflow (float16 above 65504)
        save_file(tensors, path, metadata=_file_meta({**info, "step": step}))
        paths.append(path)
    return paths


def is_export(folder: str) -> bool:
    """Whether ``folder`` was written by ``twostep export`` (its ``twostep.json`` says so)."""
    try:
        with open(os.path.join(folder, INFO), encoding="utf-8") as f:
            return json.load(f).get("written_by") == "twostep export"
    except (OSError, ValueError, AttributeError):
        return False


SAMPLES = "samples.png"


def write_sample_grid(cfg, state: dict[str, Tensor], teacher, path: str, count: int, device=None) -> bool:
    """``samples.png``: the first ``count`` prompts of the run's text cache, teacher (8 steps) beside the exported
    student (2 steps) on the same fixed noise, the preview grid's layout. False (and a note) when the run's text
    cache is gone."""
    from twostep.families.folders import pick_device
    from twostep.real.preview import preview_writer
    from twostep.real.text_cache import PromptEmbeds
    from twostep.real.train import build_real_student

    text = os.path.join(cfg.data_dir, "text")
    if not os.path.isdir(text):
        print(f"note: no sample grid: the run's text cache {text} is gone")
        return False
    embeds = PromptEmbeds(text)
    device = device or pick_device(cfg.model.device)
    student, _ = build_real_student(cfg, teacher.folder, embeds.width, device, teacher.family)
    params = dict(student.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
    student.eval()
    write = preview_writer(teacher.folder, embeds, teacher.latent_shape, device, cfg.teacher_data, count=count)
    write(student, path, title=f"this export after {cfg.train.steps} training steps: same noise per row")
    del student
    return True


def export_run(run_dir: str, out: str, fmt: str, dtype: str = "bfloat16", overwrite: bool = False,
               samples: int | None = None, checkpoint: str | None = None) -> list[str]:
    """Write ``fmt`` for a finished real run into ``out``; returns the files that matter. The new folder is built
    beside ``out`` and swapped in, so a failed export leaves ``out`` as it was. A non-empty ``out`` that an earlier
    export did not write is refused unless ``overwrite``. ``samples``: prompts in the ``samples.png`` grid (teacher
    8 steps | student 2 steps, same noise); None = 4 on a GPU, none on CPU (the full model's 8 steps at 1024² take
    minutes there). ``checkpoint`` (``latest`` or a ``step_*`` folder): export that checkpoint's EMA weights instead
    of the finished run's (an FSDP2 checkpoint is gathered whole from its shards)."""
    from twostep.core.dtypes import torch_dtype
    from twostep.real.teacher_data import resolve_teacher
    from twostep.real.train import load_real_run

    if fmt not in FORMATS:
        raise TwostepError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    check_replaceable_dir(out, overwrite, "export folder", owned=is_export(out), protected=(run_dir,))
    cfg, meta, state = load_real_run(run_dir, checkpoint)
    assert_finite(state, f"an export of {run_dir}")  # a NaN student is never shipped
    if cfg.student.renoise != "euler" and fmt != "merged":
        raise TwostepError(f"{run_dir} was trained with student.renoise={cfg.student.renoise}, but diffusers and "
                           "ComfyUI samplers move between steps by the deterministic Euler step; export --format merged "
                           "and sample with twostep's own sampler, or train with renoise=euler")
    store = torch_dtype(dtype)
    need = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler") if fmt == "diffusers" else ("transformer",)
    recorded = meta.get("teacher") or ""  # the absolute folder training used; model.path may be relative
    teacher = resolve_teacher(recorded if os.path.isdir(recorded) else cfg.model.path, cfg.teacher_data.resolution,
                              need=need)
    if teacher.fingerprint != meta.get("teacher_fingerprint"):
        raise TwostepError(f"the teacher at {cfg.model.path} is not the one {run_dir} was trained on (fingerprint "
                           "differs); point model.path at the original weights")
    check_replaceable_dir(out, overwrite, "export folder", owned=is_export(out), protected=(run_dir, teacher.folder))
    family = teacher.family
    info = _run_info(cfg, meta, family)
    info["latent_shape"] = list(teacher.latent_shape)
    info["written_by"] = "twostep export"
    info["format"] = fmt
    comfy_text = ""
    with atomic_dir(out) as tmp:
        if fmt == "lora":
            paths = _save_loras(tmp, lora_files(state, cfg.student, store), info, "step{step}_lora.safetensors")
        elif fmt == "comfyui":
            paths = _save_loras(tmp, lora_files(state, cfg.student, store, family), info,
                                "step{step}_lora_comfyui.safetensors")
            workflow_file, graph, comfy_text = family.comfy_export(info, [os.path.basename(p) for p in paths])
            workflow = os.path.join(tmp, workflow_file)
            write_text(workflow, json.dumps(graph, indent=2) + "\n")
            info["workflow"] = workflow_file
        elif fmt == "diffusers":
            files = lora_files(state, cfg.student, store)  # fail on a full-form run before linking 30 GB
            _link_tree(teacher.folder, tmp)
            os.makedirs(os.path.join(tmp, LORA_DIR), exist_ok=True)
            paths = _save_loras(os.path.join(tmp, LORA_DIR), files, info, "step{step}_lora.safetensors")
        else:
            paths, rounding = _export_merged(state, cfg, teacher.folder, tmp, store, family)
            info["merge_rounding"] = rounding
            worst = max(rounding)
            if worst > 0.05:
                print(f"warning: storing W + BA in {dtype} loses {worst:.0%} of the LoRA update (relative norm) in the "
                      "worst layer; export with --dtype float32 to keep it")
        if samples is None:
            samples = 4 if torch.cuda.is_available() else 0
        if samples and write_sample_grid(cfg, state, teacher, os.path.join(tmp, SAMPLES), samples):
            info["samples"] = SAMPLES
        if fmt != "merged":
            info["adapters"] = [f"step{k}" for k in range(1, len(paths) + 1)]
        info["files"] = [os.path.relpath(p, tmp) for p in paths]
        if fmt == "diffusers":
            info["lora_files"] = info["files"]
        write_text(os.path.join(tmp, INFO), json.dumps(info, indent=2) + "\n")
        # replaces the base model's card (a hard link): written to a new file, the base model's copy is untouched
        write_text(os.path.join(tmp, "README.md"), family.model_card(fmt, info, _config_summary(cfg, meta), comfy_text))
    if fmt == "comfyui":
        paths = paths + [workflow]
    return [os.path.join(out, os.path.relpath(p, tmp)) for p in paths]


@torch.no_grad()
def _export_merged(state: dict[str, Tensor], cfg, folder: str, out: str, dtype: torch.dtype,
                   family: ModelFamily) -> tuple[list[str], list[float]]:
    """One plain transformer per step: the base plus that step's LoRA delta (or the step's full copy).

    Also returns, per step, the worst layer's ``|| stored(W + BA) - W - BA || / || BA ||``: how much of the update
    the storage dtype rounds away (small deltas on bf16 weights can vanish).
    """
    paths, rounding = [], []
    for step in range(cfg.student.num_steps):
        transformer = family.load_transformer(folder, dtype)
        if cfg.student.form == "lora":
            lora = step_lora(state, cfg.student, step)
            modules = dict(transformer.named_modules())
            worst = 0.0
            for key, a in lora.items():
                if key.endswith(".lora_A.weight"):
                    name = key[:-len(".lora_A.weight")]
                    weight = modules[name].weight
                    base = weight.float().clone()  # .float() of fp32 weights is the same tensor
                    delta = lora[f"{name}.lora_B.weight"].float() @ a.float()
                    weight.copy_((base + delta).to(weight.dtype))
                    if delta.norm() > 0:
                        worst = max(worst, float((weight.float() - base - delta).norm() / delta.norm()))
            rounding.append(worst)
        else:
            prefix = f"copies.{step if cfg.student.params == 'decoupled' else 0}.transformer."
            own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            transformer.load_state_dict({k: v.to(dtype) for k, v in own.items()})
            rounding.append(0.0)
        path = os.path.join(out, f"transformer_step{step + 1}")
        assert_finite(dict(transformer.named_parameters()), path)
        transformer.save_pretrained(path)
        paths.append(path)
        del transformer
    return paths, rounding


def load_step_loras(paths: list[str]) -> list[dict[str, Tensor]]:
    """Read exported per-step LoRA files back (either naming) as ``{module}.lora_A/B.weight`` dicts."""
    out = []
    for path in paths:
        tensors = load_file(path)
        lora = {}
        for key, value in tensors.items():
            if key.endswith(".alpha"):
                continue
            for prefix in ("transformer.", "diffusion_model."):
                if key.startswith(prefix):
                    key = key[len(prefix):]
            lora[key] = value
        out.append(lora)
    return out


def apply_step_loras(student, loras: list[dict[str, Tensor]]) -> None:
    """Load per-step LoRAs (scale baked into B) into a :class:`Student` built with the same config."""
    cfg = student.cfg
    scale = cfg.lora_alpha / cfg.lora_rank
    params = dict(student.named_parameters())
    for step, lora in enumerate(loras):
        adapter = f"step{step if cfg.params == 'decoupled' else 0}"
        for key, value in lora.items():
            module, part = key.rsplit(".", 2)[0], key.rsplit(".", 2)[1]
            target = params.get(f"{_STUDENT_PREFIX}{module}.{part}.{adapter}.weight")
            if target is None or target.shape != value.shape:
                raise TwostepError(f"LoRA tensor {key} does not fit this student (rank or targets differ)")
            with torch.no_grad():
                target.copy_(value.float() / scale if part == "lora_B" else value.float())
