"""``twostep plan``: per-GPU memory of a distillation run, counted on the meta device (no weights loaded).

Parameters are counted exactly from the transformer config (the model family's diffusers transformer built on
``meta``, ``ModelFamily.transformer_layout``);
activations are an estimate from the formulas below. Training holds no text encoder (caption embeddings and
latents are cached by ``teacher-data``); the VAE is loaded only while a preview grid is decoded, outside the
training step's peak.

``twostep plan`` reads a distillation config (``--config``, default the packaged ``zimage_turbo_2step_lora``, plus
dotted overrides): batch, resolution, LoRA rank and targets, parameter form, discriminator heads, gradient
checkpointing and precision come from it; explicit flags win and are named in the output. It also estimates the
teacher-data cache's size on disk (:func:`cache_bytes_per_sample`, docs/sizing.md).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

from twostep.core.errors import TwostepError

GIB = 1024 ** 3
MIB = 1024 ** 2
BF16, FP32 = 2, 4
INT64 = 8
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}  # core.dtypes.DTYPES, without importing torch
DTYPE_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
LATENT_CHANNELS = 16  # Z-Image's VAE latents (the transformer's in_channels)
DEFAULT_CONFIG = "zimage_turbo_2step_lora"
ADAM_STATES = 2  # AdamW: exp_avg + exp_avg_sq, fp32
VAE_DOWN = 8  # Flux-style VAE: 8x spatial downsampling
CAPTION_TOKENS = 512  # ZImagePipeline's max_sequence_length; real prompts are usually shorter
# Transformer passes whose (checkpointed) graph is alive at the peak of one generator step: student step 1,
# student step 2, and the frozen teacher's feature pass for the discriminator (frozen is not no_grad). Counted at
# full depth (worst case): the feature pass really stops after the deepest discriminator block.
GRAPH_PASSES = 3
TIGHT = 0.10  # a fit with less than 10% of the card to spare is flagged: activations are an estimate
# One block recomputed in backward, per token: ~10 hidden-width tensors (norm outputs, q, k, v, attention out,
# to_out, adaLN-modulated copies, residuals, incoming/outgoing grads) and 3 ffn-width ones (w1, w3, silu(w1)*w3).
# Flash/SDPA attention keeps no tokens x tokens matrix.
RECOMPUTE_DIM_FACTOR = 10
RECOMPUTE_FFN_FACTOR = 3
# fp32 tensors of width dim per token inside a block's forward: the input of each of its 4 RMSNorms and 2 q/k
# norms upcast to fp32, and q and k upcast for the rotary embedding with their rotated outputs (4)
FP32_INTERMEDIATES = 10
OVERHEAD_BYTES = 2 * GIB  # CUDA context, cuBLAS workspaces, allocator fragmentation
# time estimate (docs/sizing.md "Time"): one transformer forward of one sample costs F = 2·P·T + 4·L·T²·d FLOPs; a
# generator step of the default recipe runs about 13.4 F per sample (D update 4.7 F, G update 8.7 F) and a teacher
# sample 8 F; an H100 SXM peaks at 989 TFLOP/s dense bf16, of which 30-50 % is typical here (not measured)
STEP_FORWARDS = 13.4
# DMD2 (recipe.dmd_weight > 0), per sample, with S student steps, K outputs under the DMD loss and N fake-score
# updates per generator step: a fake-score update runs the student without a graph (S F) and the fake score with its
# backward (3 F per output); the generator update adds the teacher's and the fake score's estimates without a graph
# (2 F per output). Without an adversarial term the generator update is the student with its backward (3 S F) instead
# of Turbo++'s 13.4 F (no discriminator, so no feature pass): 50 / 13.4 = 3.7x a Turbo++ step (the detail bench's
# measured ratio per step is in the DMD2 block of docs/results.md)
H100_BF16_FLOPS = 989e12
MFU_RANGE = (0.30, 0.50)
TYPICAL_CAPTION_TOKENS = 128
FSDP_PREFETCH_BLOCKS = 2  # FSDP2 keeps the current and the prefetched block unsharded
CARDS: list[tuple[float, str]] = [(24, "RTX 4090"), (40, "A100-40GB"), (48, "L40S / RTX 6000 Ada"),
                                  (80, "H100 / A100-80GB"), (141, "H200")]


@dataclass
class PlanRequest:
    """One planned run. ``resolution`` in pixels (square), ``batch`` per GPU. The defaults are the packaged
    ``zimage_turbo_2step_lora`` config's; :func:`request_from_config` fills them from any config."""

    model: str = "zimage-turbo"
    mode: str = "lora"  # "lora" | "full" (student.form)
    resolution: int = 1024
    batch: int = 4
    gpus: int = 1
    lora_rank: int = 64
    num_steps: int = 2
    card_gib: float | None = None
    caption_tokens: int = CAPTION_TOKENS
    params: str = "decoupled"  # student.params: "decoupled" (one parameter set per step) | "shared" (one set)
    lora_targets: list[str] | None = None  # student.lora_targets (None: StudentConfig's)
    gradient_checkpointing: bool = True  # train.gradient_checkpointing
    bf16: bool = True  # train.bf16 (autocast)
    base_dtype: str = "bfloat16"  # model.dtype: the frozen base
    discriminator: Any = None  # a DiscriminatorConfig (None: the real path's default heads)
    adversarial: bool = True  # a loss is adversarial (recipe.adv_weight > 0 or an adversarial step-1 loss)
    dmd: bool = False  # distribution matching: a fake-score network (recipe.dmd_weight > 0)
    dmd_outputs: int = 1  # outputs under the DMD loss (every step's with end_to_end false, the final one else)
    fake_steps_per_g: int = 5  # train.fake_steps_per_g
    fake_score_rank: int = 0  # student.fake_score_rank (0 = lora_rank)

    @property
    def parameter_sets(self) -> int:
        return self.num_steps if self.params == "decoupled" else 1

    @property
    def activation_bytes(self) -> int:
        """bf16 under autocast or on a half-precision base; fp32 only for an fp32 base without autocast."""
        return BF16 if self.bf16 or self.base_dtype != "float32" else FP32

    def validate(self) -> None:
        if self.mode not in ("lora", "full"):
            raise TwostepError(f"mode must be 'lora' or 'full', got {self.mode!r}")
        if self.params not in ("decoupled", "shared"):
            raise TwostepError(f"params must be 'decoupled' or 'shared', got {self.params!r}")
        if self.base_dtype not in DTYPE_BYTES:
            raise TwostepError(f"base dtype must be one of {sorted(DTYPE_BYTES)}, got {self.base_dtype!r}")
        if self.resolution % (2 * VAE_DOWN) or not 4 * 2 * VAE_DOWN <= self.resolution <= 8192:
            raise TwostepError(f"resolution must be a multiple of 16 (8x VAE, patch 2) from 64 to 8192 (Z-Image's "
                               f"rotary positions), got {self.resolution}")
        for name in ("batch", "gpus", "lora_rank", "num_steps", "caption_tokens"):
            if getattr(self, name) < 1:
                raise TwostepError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.card_gib is not None and not (0 < self.card_gib < 1e6):  # also refuses nan and inf
            raise TwostepError(f"--card-gib must be a positive number of GiB, got {self.card_gib}")


def _read_config(path: str):
    """``(family, transformer kwargs)`` of a transformer ``config.json``."""
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as err:
        raise TwostepError(f"cannot read transformer config {path}: {err}") from err
    from twostep.families.registry import all_families

    families = all_families()
    # a config without a class name is read as the first family's (the one twostep was built for)
    name = config.get("_class_name", families[0].transformer_class) if isinstance(config, dict) else None
    for family in families:
        if name == family.transformer_class:
            return family, {k: v for k, v in config.items() if not k.startswith("_")}
    raise TwostepError(f"{path} is not a {' or '.join(f.title for f in families)} transformer config "
                       f"(class {name!r})")


def _released(model: str):
    """The family whose released config ``model`` names (a ``plan_aliases`` entry or its hub id), else None."""
    from twostep.families.registry import all_families

    return next((f for f in all_families() if model in f.plan_aliases or model == f.default_model), None)


def load_transformer_config(model: str):
    """``(family, transformer kwargs)`` for a released model's alias (``zimage-turbo``), a pipeline/transformer
    folder, or a cached hub id."""
    released = _released(model)
    if released is not None and model in released.plan_aliases:
        return released, released.published_config()
    candidates = ("transformer/config.json", "config.json")  # pipeline folder first, then a bare transformer
    if os.path.isdir(model):
        for rel in candidates:
            if os.path.isfile(os.path.join(model, rel)):
                return _read_config(os.path.join(model, rel))
        raise TwostepError(f"{model} has no transformer/config.json or config.json: pass a diffusers pipeline or "
                           f"transformer folder, or a release's alias ({_aliases()})")
    if os.path.exists(model):
        raise TwostepError(f"{model} is a file: pass a diffusers pipeline or transformer folder")
    from huggingface_hub import hf_hub_download

    for rel in candidates:  # the hub is unreachable here: the local cache only
        try:
            return _read_config(hf_hub_download(model, rel, local_files_only=True))
        except (OSError, ValueError):
            continue
    raise TwostepError(f"{model!r} is neither a local folder nor in the Hugging Face cache (no download is "
                       f"attempted): pass a local pipeline/transformer folder or a release's alias ({_aliases()})")


def _aliases() -> str:
    from twostep.families.registry import all_families

    return ", ".join(alias for family in all_families() for alias in family.plan_aliases)


def default_config_for(model: str | None) -> str:
    """The packaged config ``plan`` reads when no ``--config`` is given: the recipe of ``--model``'s family (a
    FLUX.2 klein folder or alias plans the klein recipe), else :data:`DEFAULT_CONFIG`."""
    if not model:
        return DEFAULT_CONFIG
    family, _ = load_transformer_config(model)
    return family.default_config or DEFAULT_CONFIG


def count_parameters(config: dict[str, Any], lora_rank: int, lora_targets: list[str] | None = None,
                     discriminator=None, family=None) -> dict[str, int]:
    """Exact counts on the meta device: ``base``, ``block`` (largest block), ``lora_per_step``, ``discriminator``.
    ``lora_targets`` (module-name suffixes) and ``discriminator`` (a DiscriminatorConfig) default to the real
    path's; ``family`` (a ModelFamily) the first registered one."""
    import torch
    from torch import nn

    from twostep.engine.discriminator import Discriminator
    from twostep.engine.student import StudentConfig
    from twostep.families.registry import all_families

    family = family or all_families()[0]
    layout = family.transformer_layout(config)
    model, blocks = layout["model"], layout["blocks"]
    with torch.device("meta"):
        disc = Discriminator(layout["dim"], layout["text_dim"], discriminator or _real_discriminator_config())
    suffixes = list(lora_targets) if lora_targets is not None else StudentConfig().lora_targets
    # same name matching as peft's target_modules list: exact name or a ".suffix" ending
    lora = sum(lora_rank * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and any(name == s or name.endswith("." + s) for s in suffixes))
    # input widths of one main block's LoRA-wrapped linears: peft casts each input to fp32 (7 targets, w2's 10240)
    lora_in = sum(m.in_features for name, m in layout["main_blocks"][0].named_modules()
                  if isinstance(m, nn.Linear) and any(name == s or name.endswith("." + s) for s in suffixes))
    return {"base": sum(p.numel() for p in model.parameters()), "lora_in_per_block": lora_in,
            "main_blocks": len(layout["main_blocks"]),
            "disc_blocks": len((discriminator or _real_discriminator_config()).blocks),
            "block": max(sum(p.numel() for p in b.parameters()) for b in blocks),
            "blocks": len(blocks), "dim": layout["dim"], "ffn_hidden": layout["ffn_hidden"],
            "lora_per_step": lora, "discriminator": sum(p.numel() for p in disc.parameters()),
            "cap_feat_dim": layout["text_dim"], "in_channels": layout["vae_latent_channels"], "patch": layout["patch"],
            "text_padded": family.prompt_padded}


def _real_discriminator_config():
    """The heads configs/zimage_turbo_2step_lora.yaml trains (the real path's defaults)."""
    from twostep.real.config import ZImageDistillConfig

    return ZImageDistillConfig().discriminator


def plan_memory(req: PlanRequest, config: dict[str, Any] | None = None, family=None) -> dict:
    """Per-GPU bytes by component. ``config`` (transformer kwargs of ``family``, a ModelFamily; default the first
    registered one) overrides ``req.model`` when given."""
    req.validate()
    family, config = load_transformer_config(req.model) if config is None else (family, config)
    n = count_parameters(config, req.lora_rank, req.lora_targets, req.discriminator, family)
    patch = n["patch"]
    image_tokens = (req.resolution // VAE_DOWN // patch) ** 2
    tokens = image_tokens + req.caption_tokens
    optim = FP32 + FP32 + ADAM_STATES * FP32  # fp32 trainable weight + grad + AdamW states
    base_bytes, base_name = DTYPE_BYTES[req.base_dtype], DTYPE_SHORT[req.base_dtype]
    parts: dict[str, int] = {}
    if req.mode == "lora":
        trainable = req.parameter_sets * n["lora_per_step"]
        parts[f"frozen base ({base_name}, = teacher)"] = n["base"] * base_bytes  # DDP: every GPU holds the base
        parts["LoRA adapters + grads + AdamW (fp32)"] = trainable * optim
        parts["EMA of the adapters (fp32)"] = trainable * FP32
        if req.gpus > 1:
            parts["DDP gradient buckets"] = trainable * FP32
    else:
        trainable = req.parameter_sets * n["base"]
        # bf16 compute copy + fp32 master/grad/AdamW, FSDP2-sharded (conservative: FSDP2 mixed precision can
        # drop the persistent bf16 copy)
        parts["student copies: bf16 + fp32 master/grads/AdamW (sharded)"] = -(-trainable * (BF16 + optim) // req.gpus)
        parts[f"frozen teacher ({base_name}, sharded)"] = -(-n["base"] * base_bytes // req.gpus)
        parts["EMA of the copies (fp32, sharded)"] = -(-trainable * FP32 // req.gpus)
        if req.gpus > 1:
            parts["FSDP2 unsharded block buffers"] = n["block"] * (FSDP_PREFETCH_BLOCKS * BF16 + FP32)
    if req.dmd:  # DMD's fake-score network: one more adapter on the same base, or one more (sharded) copy
        if req.mode == "lora":
            fake = n["lora_per_step"] * (req.fake_score_rank or req.lora_rank) // req.lora_rank  # linear in rank
            parts["fake-score LoRA + grads + AdamW (fp32)"] = fake * optim
            if req.gpus > 1:
                parts["DDP gradient buckets (fake score)"] = fake * FP32
        else:
            parts["fake-score copy: bf16 + fp32 master/grads/AdamW (sharded)"] = -(-n["base"] * (BF16 + optim)
                                                                                 // req.gpus)
    parts["discriminator heads + grads + AdamW (fp32)"] = n["discriminator"] * optim
    act = req.activation_bytes
    per_block = tokens * (RECOMPUTE_DIM_FACTOR * n["dim"] + RECOMPUTE_FFN_FACTOR * n["ffn_hidden"]) * act
    # the terms a block's own dtype hides: peft casts every LoRA input to the adapter's fp32 and autocast keeps a
    # bf16 copy of it for the matmul's backward; RMSNorm and RoPE compute in fp32
    casts = tokens * n["lora_in_per_block"] * (FP32 + BF16) if req.mode == "lora" else 0
    fp32_parts = tokens * n["dim"] * FP32 * FP32_INTERMEDIATES
    passes = graph_passes(req)
    if req.gradient_checkpointing:
        saved = passes * n["blocks"] * tokens * n["dim"] * act  # one block input kept per checkpointed block
        parts["activations: checkpointed block inputs (estimate)"] = req.batch * saved
        parts["activations: one block recompute (estimate)"] = req.batch * per_block
        scale, where = 1, "in the recomputed block"
    else:  # every block keeps its tensors for backward, in every graph-keeping pass
        parts["activations: every block's tensors, no checkpointing (estimate)"] = \
            req.batch * passes * n["blocks"] * per_block
        scale, where = passes * n["blocks"], "in every block"
    if casts:
        parts[f"activations: peft's fp32 LoRA-input casts + autocast bf16 copies {where} (estimate)"] = \
            req.batch * scale * casts
    parts[f"activations: fp32 RMSNorm / RoPE intermediates {where} (estimate)"] = req.batch * scale * fp32_parts
    # each head reads its block's image tokens as fp32 (feats.float()), kept for the head's backward, for every
    # output the generator scores adversarially (both student steps at most)
    if req.adversarial:
        parts["activations: discriminator heads' fp32 feature maps (estimate)"] = \
            req.batch * req.num_steps * n["disc_blocks"] * image_tokens * n["dim"] * FP32
    parts["CUDA / framework overhead"] = OVERHEAD_BYTES
    total = sum(parts.values())
    text_tokens = req.caption_tokens if n["text_padded"] else min(req.caption_tokens, TYPICAL_CAPTION_TOKENS)
    typical = image_tokens + text_tokens
    forward_flops = 2 * n["base"] * typical + 4 * n["main_blocks"] * typical ** 2 * n["dim"]
    return {"request": _request_dict(req), "forward_flops": forward_flops, "step_forwards": step_forwards(req),
            "graph_passes": passes,
            "params": {"base": n["base"], "trainable": trainable, "lora_per_step": n["lora_per_step"],
                       "discriminator": n["discriminator"]},
            "tokens": {"image": image_tokens, "caption": req.caption_tokens, "blocks": n["blocks"]},
            "shapes": {"cap_feat_dim": n["cap_feat_dim"], "in_channels": n["in_channels"]},
            "components": parts, "total_bytes": total, "flops_text_tokens": text_tokens,
            "fits": {f"{gib:g}": total <= gib * GIB for gib, _ in CARDS}}


def graph_passes(req: PlanRequest) -> int:
    """Transformer passes whose graph is alive at the step's peak: Turbo++'s 3 (:data:`GRAPH_PASSES`); with
    distribution matching the larger of the generator update's (the student's steps, plus the discriminator's
    feature pass when a loss is adversarial) and the fake-score update's (one per output under the DMD loss)."""
    if not req.dmd:
        return GRAPH_PASSES
    generator = GRAPH_PASSES if req.adversarial else req.num_steps
    return max(generator, req.dmd_outputs)


def step_forwards(req: PlanRequest) -> float:
    """Transformer forwards per sample of one generator step with its critic updates (the FLOPs of the time
    estimate; :data:`STEP_FORWARDS`, and the DMD2 terms above it)."""
    if not req.dmd:
        return STEP_FORWARDS
    base = STEP_FORWARDS if req.adversarial else 3 * req.num_steps
    return base + req.fake_steps_per_g * (req.num_steps + 3 * req.dmd_outputs) + 2 * req.dmd_outputs


def _request_dict(req: PlanRequest) -> dict:
    out = {k: getattr(req, k) for k in PlanRequest.__dataclass_fields__}
    if dataclasses.is_dataclass(req.discriminator):
        out["discriminator"] = dataclasses.asdict(req.discriminator)
    return out


def _fit_word(total: int, gib: float) -> str:
    if total > gib * GIB:
        return "no"
    return "yes (tight)" if total > (1 - TIGHT) * gib * GIB else "yes"


def format_plan(plan: dict) -> str:
    """A table in GiB, the common cards it fits, and a verdict for ``request.card_gib`` if set. ``plan["source"]``
    (where the settings came from) and ``plan["disk"]`` (:func:`disk_estimate`) add their lines when present."""
    req, p, t = plan["request"], plan["params"], plan["tokens"]
    width = max(len(k) for k in plan["components"]) + 2
    shared = " (one shared parameter set)" if req.get("params", "decoupled") == "shared" else ""
    lines = [f"{req['model']} | {req['mode']} | {req['resolution']}px | batch {req['batch']}/GPU | {req['gpus']} GPU(s)"
             f" | {req['num_steps']} student steps{shared}"
             + (f" | LoRA rank {req['lora_rank']}" if req["mode"] == "lora" else ""),
             f"params: base {p['base'] / 1e9:.3f}B, trainable {p['trainable'] / 1e6:,.1f}M, "
             f"discriminator {p['discriminator'] / 1e6:.1f}M; tokens/sample: {t['image']} image + {t['caption']} "
             f"caption (max assumed) through {t['blocks']} blocks"]
    lines += _source_lines(plan.get("source"))
    if req["gpus"] > 1:
        lines.append("parallelism: " + (
            f"DDP over {req['gpus']} GPUs (torchrun; every GPU holds the frozen base, the adapters' gradients are "
            "averaged; the batch above is per GPU: train.batch_size, the global batch, split over the GPUs unless "
            "--batch is given)" if req["mode"] == "lora" else
            f"FSDP2 over {req['gpus']} GPUs (torchrun; fully_shard per transformer block of each step copy and of "
            "the frozen teacher, the heads under DDP; compute dtype train.fsdp_param_dtype; checkpoints are DCP "
            "shards, docs/distributed.md)"))
    lines += ["", f"{'component':<{width}}GiB", "-" * (width + 8)]
    lines += [f"{k:<{width}}{v / GIB:8.2f}" for k, v in plan["components"].items()]
    total = plan["total_bytes"]
    checkpointing = "on" if req.get("gradient_checkpointing", True) else "off"
    lines += ["-" * (width + 8), f"{'total per GPU':<{width}}{total / GIB:8.2f}", "",
              "fits: " + " / ".join(f"{gib:g} GiB ({name}) {_fit_word(total, gib)}" for gib, name in CARDS),
              f"activations are an estimate (gradient checkpointing {checkpointing}, "
              f"{plan.get('graph_passes', GRAPH_PASSES)} graph-keeping passes); weights "
              "and optimizer states are exact counts. VAE and text encoder are not loaded (cached latents and "
              "embeddings)."]
    lines += _disk_lines(plan.get("disk"))
    lines += _time_lines(plan)
    card = req.get("card_gib")
    if card:
        spare = card - total / GIB
        if spare >= 0:
            lines.append(f"verdict: fits a {card:g} GiB card with {spare:.1f} GiB to spare"
                         + (" (tight: activations are an estimate)" if spare < TIGHT * card else ""))
        else:
            # LoRA holds the whole base on every GPU: only the activations shrink
            hint = "--batch 1 or a lower --resolution" + (", or more --gpus" if req["mode"] == "full" else "")
            if checkpointing == "off":
                hint = "train.gradient_checkpointing=true, " + hint
            lines.append(f"verdict: does NOT fit a {card:g} GiB card ({-spare:.1f} GiB short); try {hint}")
    return "\n".join(lines)


def _hours(flops: float) -> str:
    slow, fast = (flops / (mfu * H100_BF16_FLOPS) / 3600 for mfu in MFU_RANGE)
    return f"{fast:.1f}-{slow:.1f} h"


def _time_lines(plan: dict) -> list[str]:
    """Hours on one H100 for the run's steps and its teacher data, from the FLOPs formula (an estimate)."""
    req, steps, disk = plan["request"], plan.get("steps"), plan.get("disk")
    if not steps:
        return []
    forward = plan["forward_flops"]
    online = plan.get("online_forwards", 0)  # teacher_data.mode online: each batch drawn runs the teacher
    per_sample = round(plan.get("step_forwards", STEP_FORWARDS), 1) + online
    step = per_sample * req["batch"] * forward
    lines = [f"time (estimate, not measured; docs/sizing.md): one forward {forward:.2e} FLOPs at {req['resolution']}px "
             f"with a {plan.get('flops_text_tokens', TYPICAL_CAPTION_TOKENS)}-token prompt; a step ~{per_sample:g} forwards per sample"
             + (f" ({per_sample - online:g} training + {online} online-teacher)" if online else "")
             + (f" (DMD2: {req.get('fake_steps_per_g', 5)} fake-score updates each)" if req.get("dmd") else "") + " = "
             f"{step:.2e} FLOPs: {steps:,} steps take {_hours(steps * step)} on one H100 at "
             f"{MFU_RANGE[1]:.0%}-{MFU_RANGE[0]:.0%} of its {H100_BF16_FLOPS / 1e12:.0f} TFLOP/s bf16"
             + (f" (/{req['gpus']} GPUs ideal)" if req["gpus"] > 1 else "")]
    if disk and online:
        lines.append("  teacher data: none cached (teacher_data.mode online; its cost is in the step above)")
    elif disk:
        teacher_steps = plan.get("teacher_steps", 8)
        lines.append(f"  teacher data: {disk['samples']:,} samples x {teacher_steps} forwards take "
                     f"{_hours(disk['samples'] * teacher_steps * forward)} on one H100 (split over the GPUs of a "
                     "torchrun job)")
    return lines


def _source_lines(source: dict | None) -> list[str]:
    if not source:
        return []
    req = source["settings"]
    overrides = f" + {' '.join(source['overrides'])}" if source["overrides"] else ""
    disc = req["discriminator"]
    lines = [f"config: {source['config']}{overrides} | student {req['params']} {req['mode']}"
             + (f" on {','.join(req['lora_targets'])}" if req["mode"] == "lora" else "")
             + f" | discriminator blocks {list(disc['blocks'])} hidden {disc['hidden']}"
             f" | model.dtype {req['base_dtype']}, train.bf16 {'on' if req['bf16'] else 'off'}, "
             f"train.gradient_checkpointing {'on' if req['gradient_checkpointing'] else 'off'}"]
    if source["flags"]:
        lines.append("flags over the config: " + ", ".join(
            f"{flag} {value}" + ("" if config_value is None else f" (config: {config_value})")
            for flag, value, config_value in source["flags"]))
    return lines


def _disk_lines(disk: dict | None) -> list[str]:
    if not disk:
        return []
    c, side = disk["channels"], disk["side"]
    if disk.get("online"):
        return [f"teacher-data cache on disk: no latents (teacher_data.mode online); at most "
                f"{disk['text_bytes'] / GIB:.1f} GiB of prompt embeddings for {disk['prompts']:,} prompts "
                f"({disk['prompt_bytes'] / MIB:.2f} MiB each, {disk['max_length']} tokens x {disk['width']} "
                f"{disk['dtype']})"]
    return [f"teacher-data cache on disk: {disk['sample_bytes'] / MIB:.2f} MiB per sample at {disk['resolution']}px "
            f"(latents {c}x{side}x{side}: noise + final {disk['dtype']}, {disk['states']} states fp32) + at most "
            f"{disk['prompt_bytes'] / MIB:.2f} MiB of prompt embeddings per prompt ({disk['max_length']} tokens x "
            f"{disk['width']} {disk['dtype']})",
            f"  for {disk['samples']:,} samples ({disk['count_from']}): {disk['latent_bytes'] / GIB:.1f} GiB of "
            f"latents + at most {disk['text_bytes'] / GIB:.1f} GiB of embeddings for {disk['prompts']:,} prompts "
            "(docs/sizing.md)"]


# --------------------------------------------------------------------------- sizing


def cache_bytes_per_sample(resolution: int, cfg, channels: int = LATENT_CHANNELS, downsample: int = VAE_DOWN) -> int:
    """Bytes one sample takes in a teacher-data shard (``engine/teacher_data.py``), the shard's header aside.

    ``cfg`` is a teacher-data config (``dtype``, ``student_sigmas``): noise and final in ``cfg.dtype``, one fp32
    state per student sigma (``states`` are always fp32), and two int64 (noise seed, prompt index). Latents are
    ``channels x (resolution / downsample)^2`` (Z-Image: 16 channels, 8x VAE)."""
    side = resolution // downsample
    elements = channels * side * side
    return elements * (2 * DTYPE_BYTES[cfg.dtype] + len(cfg.student_sigmas) * FP32) + 2 * INT64


def prompt_bytes(tokens: int, width: int, dtype: str) -> int:
    """Bytes of one prompt's cached embedding (``text_cache.py``: ``(tokens, width)`` in ``dtype``)."""
    return tokens * width * DTYPE_BYTES[dtype]


def disk_estimate(data_cfg, resolution: int, samples: int, prompts: int, count_from: str,
                  channels: int = LATENT_CHANNELS, width: int = 2560) -> dict:
    """The teacher-data folder's size for ``samples`` latents of ``prompts`` prompts (text cache at most
    ``max_length`` tokens per prompt; real prompts are usually far shorter)."""
    per_sample = cache_bytes_per_sample(resolution, data_cfg, channels)
    per_prompt = prompt_bytes(data_cfg.max_length, width, data_cfg.dtype)
    return {"resolution": resolution, "channels": channels, "side": resolution // VAE_DOWN, "dtype": data_cfg.dtype,
            "states": len(data_cfg.student_sigmas), "sample_bytes": per_sample, "samples": samples,
            "latent_bytes": samples * per_sample, "max_length": data_cfg.max_length, "width": width,
            "prompt_bytes": per_prompt, "prompts": prompts, "text_bytes": prompts * per_prompt,
            "count_from": count_from}


# --------------------------------------------------------------------------- command


def add_plan_arguments(parser) -> None:
    """``twostep plan`` flags: a config (default the packaged real recipe) and dotted overrides; the flags below
    replace the config's value when given."""
    parser.add_argument("--config", help="YAML file or packaged config name (default: the packaged recipe of "
                                         f"--model's family, else {DEFAULT_CONFIG}); batch, resolution, LoRA, "
                                         "discriminator and precision come from it")
    parser.add_argument("--model", help="pipeline/transformer folder, a cached hub id, or a release's alias such as "
                                        "zimage-turbo (default: the config's model.path; a release's hub id plans "
                                        "its published config)")
    parser.add_argument("--mode", choices=["lora", "full"],
                        help="per-step LoRA adapters or full per-step copies (FSDP2) (default: student.form)")
    parser.add_argument("--resolution", type=int,
                        help="square training resolution in px (default: teacher_data.resolution)")
    parser.add_argument("--batch", type=int, help="batch per GPU (default: train.batch_size)")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs (full mode shards with FSDP2; default 1)")
    parser.add_argument("--lora-rank", type=int, help="LoRA rank (default: student.lora_rank)")
    parser.add_argument("--card-gib", type=float, default=None, help="say whether it fits a card of this many GiB")
    parser.add_argument("--num-prompts", type=int,
                        help="prompts the teacher data will hold, for the disk estimate (default: the count of "
                             "teacher_data.prompts if that file exists, else train.steps x train.batch_size samples)")
    parser.add_argument("--results", help="also write the plan into a marked section of this markdown file")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted config overrides, e.g. train.batch_size=8 student.lora_rank=32")


# argparse attribute -> (flag, PlanRequest field) of the flags that replace a config value
_FLAGS = {"model": ("--model", "model"), "mode": ("--mode", "mode"), "resolution": ("--resolution", "resolution"),
          "batch": ("--batch", "batch"), "lora_rank": ("--lora-rank", "lora_rank")}


def load_plan_config(name_or_path: str | None, overrides=()):
    """The distillation config to plan (a :class:`ZImageDistillConfig`) and its path. As for `twostep train`, a
    Z-Image config is one with a pipeline ``model:`` section or a ``data_dir`` (:func:`is_real_config`); a toy
    world's config is refused (unset keys of a Z-Image config take the packaged recipe's defaults)."""
    from twostep.core.config import load_config
    from twostep.core.packaged_configs import resolve_config
    from twostep.real.config import ZImageDistillConfig, is_real_config

    path = resolve_config(name_or_path or DEFAULT_CONFIG)
    if not is_real_config(path):
        raise TwostepError(f"{name_or_path}: `twostep plan` sizes the real Z-Image path (or another family's), and "
                           f"this is not such a config (no pipeline model: section or data_dir); give one such as {DEFAULT_CONFIG}")
    return load_config(ZImageDistillConfig, path, list(overrides)), path


def request_from_config(cfg, **flags) -> PlanRequest:
    """A :class:`PlanRequest` with every setting from ``cfg`` (a ``ZImageDistillConfig``); ``flags`` (PlanRequest
    fields, None = not given) replace them."""
    released = _released(cfg.model.path)  # a config naming a release's hub id is planned with its published config
    model = released.plan_aliases[0] if released is not None and not os.path.isdir(cfg.model.path) else cfg.model.path
    req = PlanRequest(model=model, mode=cfg.student.form, resolution=cfg.teacher_data.resolution,
                      batch=cfg.train.batch_size, lora_rank=cfg.student.lora_rank, num_steps=cfg.student.num_steps,
                      params=cfg.student.params, lora_targets=list(cfg.student.lora_targets),
                      gradient_checkpointing=cfg.train.gradient_checkpointing, bf16=cfg.train.bf16,
                      base_dtype=cfg.model.dtype, discriminator=cfg.discriminator,
                      adversarial=cfg.recipe.uses_discriminator,
                      dmd=cfg.recipe.uses_dmd, fake_steps_per_g=cfg.train.fake_steps_per_g,
                      fake_score_rank=cfg.student.fake_score_rank,
                      dmd_outputs=cfg.student.num_steps if cfg.recipe.uses_dmd and not cfg.recipe.end_to_end else 1)
    return dataclasses.replace(req, **{k: v for k, v in flags.items() if v is not None})


def _planned_samples(cfg, num_prompts: int | None) -> tuple[int, int, str]:
    """``(samples, prompts, where the count came from)`` for the disk estimate."""
    data = cfg.teacher_data
    if num_prompts is not None:
        if num_prompts < 1:
            raise TwostepError(f"--num-prompts must be at least 1, got {num_prompts}")
        prompts, where = num_prompts, "--num-prompts"
    elif data.prompts and os.path.isfile(data.prompts):
        from twostep.core.prompts import read_prompts

        prompts, where = len(read_prompts(data.prompts)), f"the prompts in {data.prompts}"
    else:
        samples = cfg.train.steps * cfg.train.batch_size
        prompts = -(-samples // data.samples_per_prompt) if not data.num_samples else samples
        return (data.num_samples or samples, prompts,
                "teacher_data.num_samples" if data.num_samples else
                f"train.steps x train.batch_size = {cfg.train.steps:,} x {cfg.train.batch_size}, each real drawn "
                "about once; --num-prompts N for yours")
    if data.num_samples:
        return data.num_samples, prompts, f"teacher_data.num_samples; {prompts:,} prompts from {where}"
    return (prompts * data.samples_per_prompt, prompts,
            f"{prompts:,} prompts from {where} x teacher_data.samples_per_prompt {data.samples_per_prompt}")


def cmd_plan(args) -> None:
    config = getattr(args, "config", None) or default_config_for(getattr(args, "model", None))
    cfg, path = load_plan_config(config, getattr(args, "overrides", None) or [])
    flags = {field: getattr(args, attr, None) for attr, (_, field) in _FLAGS.items()}
    req = request_from_config(cfg, gpus=args.gpus, card_gib=args.card_gib, **flags)
    if flags.get("batch") is None and req.gpus > 1:  # train.batch_size is the global batch under torchrun
        req = dataclasses.replace(req, batch=-(-cfg.train.batch_size // req.gpus))
    from_config = request_from_config(cfg)
    if getattr(args, "results", None):
        from twostep.core.reports import check_markdown_target

        check_markdown_target(args.results)
    plan = plan_memory(req)
    given = [(flag, getattr(req, field), getattr(from_config, field)) for attr, (flag, field) in _FLAGS.items()
             if getattr(args, attr, None) is not None]
    plan["source"] = {"config": config, "path": path,
                      "overrides": list(getattr(args, "overrides", None) or []), "flags": given,
                      "settings": _request_dict(from_config)}
    samples, prompts, where = _planned_samples(cfg, getattr(args, "num_prompts", None))
    plan["disk"] = disk_estimate(cfg.teacher_data, req.resolution, samples, prompts, where,
                                 channels=plan["shapes"]["in_channels"], width=plan["shapes"]["cap_feat_dim"])
    plan["steps"], plan["teacher_steps"] = cfg.train.steps, cfg.teacher_data.teacher_steps
    if cfg.teacher_data.mode == "online":  # every batch drawn for a D or G update runs the teacher's steps (the
        plan["disk"]["online"] = True      # fake score's draw only the noise)
        d_batches = cfg.train.d_steps_per_g if req.adversarial else 0
        plan["online_forwards"] = cfg.teacher_data.teacher_steps * (d_batches + 1)
    text = format_plan(plan)
    print(text)
    if getattr(args, "results", None):
        from twostep.core.reports import update_section

        command = "twostep " + " ".join(getattr(args, "argv", []))
        name = f"plan-{req.mode}-{req.resolution}-b{req.batch}-g{req.gpus}"
        update_section(args.results, name, f"Written by `{command}`:\n\n```\n{text}\n```")
        print(f"updated {args.results}")
