"""``twostep plan``: per-GPU memory of a distillation run, counted on the meta device (no weights loaded).

Parameters are counted exactly from the transformer config (``ZImageTransformer2DModel`` built on ``meta``);
activations are an estimate from the formulas below. Training holds no text encoder (caption embeddings and
latents are cached by ``teacher-data``); the VAE is loaded only while a preview grid is decoded, outside the
training step's peak.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from .errors import TwostepError

GIB = 1024 ** 3
BF16, FP32 = 2, 4
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
OVERHEAD_BYTES = 2 * GIB  # CUDA context, cuBLAS workspaces, allocator fragmentation
FSDP_PREFETCH_BLOCKS = 2  # FSDP2 keeps the current and the prefetched block unsharded
CARDS: list[tuple[float, str]] = [(24, "RTX 4090"), (40, "A100-40GB"), (48, "L40S / RTX 6000 Ada"),
                                  (80, "H100 / A100-80GB"), (141, "H200")]


@dataclass
class PlanRequest:
    """One planned run. ``resolution`` in pixels (square), ``batch`` per GPU."""

    model: str = "zimage-turbo"
    mode: str = "lora"  # "lora" | "full"
    resolution: int = 1024
    batch: int = 2
    gpus: int = 1
    lora_rank: int = 64
    num_steps: int = 2
    card_gib: float | None = None
    caption_tokens: int = CAPTION_TOKENS

    def validate(self) -> None:
        if self.mode not in ("lora", "full"):
            raise TwostepError(f"mode must be 'lora' or 'full', got {self.mode!r}")
        if self.resolution % (2 * VAE_DOWN) or not 4 * 2 * VAE_DOWN <= self.resolution <= 8192:
            raise TwostepError(f"resolution must be a multiple of 16 (8x VAE, patch 2) from 64 to 8192 (Z-Image's "
                               f"rotary positions), got {self.resolution}")
        for name in ("batch", "gpus", "lora_rank", "num_steps", "caption_tokens"):
            if getattr(self, name) < 1:
                raise TwostepError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.card_gib is not None and not (0 < self.card_gib < 1e6):  # also refuses nan and inf
            raise TwostepError(f"--card-gib must be a positive number of GiB, got {self.card_gib}")


def _read_config(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as err:
        raise TwostepError(f"cannot read transformer config {path}: {err}") from err
    name = config.get("_class_name", "ZImageTransformer2DModel") if isinstance(config, dict) else None
    if name != "ZImageTransformer2DModel":
        raise TwostepError(f"{path} is not a Z-Image transformer config (class {name!r})")
    return {k: v for k, v in config.items() if not k.startswith("_")}


def load_transformer_config(model: str) -> dict[str, Any]:
    """``ZImageTransformer2DModel`` kwargs for ``zimage-turbo``, a pipeline/transformer folder, or a cached hub id."""
    if model == "zimage-turbo":
        from .backbones.zimage import ZIMAGE_TURBO_CONFIG

        return dict(ZIMAGE_TURBO_CONFIG)
    candidates = ("transformer/config.json", "config.json")  # pipeline folder first, then a bare transformer
    if os.path.isdir(model):
        for rel in candidates:
            if os.path.isfile(os.path.join(model, rel)):
                return _read_config(os.path.join(model, rel))
        raise TwostepError(f"{model} has no transformer/config.json or config.json: pass a diffusers Z-Image "
                           "pipeline or transformer folder, or zimage-turbo")
    if os.path.exists(model):
        raise TwostepError(f"{model} is a file: pass a diffusers Z-Image pipeline or transformer folder")
    from huggingface_hub import hf_hub_download

    for rel in candidates:  # the hub is unreachable here: the local cache only
        try:
            return _read_config(hf_hub_download(model, rel, local_files_only=True))
        except (OSError, ValueError):
            continue
    raise TwostepError(f"{model!r} is neither a local folder nor in the Hugging Face cache (no download is "
                       "attempted): pass a local pipeline/transformer folder or zimage-turbo")


def count_parameters(config: dict[str, Any], lora_rank: int) -> dict[str, int]:
    """Exact counts on the meta device: ``base``, ``block`` (largest block), ``lora_per_step``, ``discriminator``."""
    import torch
    from diffusers import ZImageTransformer2DModel
    from torch import nn

    from .engine.discriminator import Discriminator
    from .engine.student import StudentConfig

    try:
        with torch.device("meta"):
            model = ZImageTransformer2DModel(**config)
            disc = Discriminator(int(config["dim"]), int(config["cap_feat_dim"]), _real_discriminator_config())
    except (TypeError, KeyError, AssertionError, ValueError) as err:
        raise TwostepError(f"invalid Z-Image transformer config: {err}") from err
    suffixes = StudentConfig().lora_targets
    # same name matching as peft's target_modules list: exact name or a ".suffix" ending
    lora = sum(lora_rank * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and any(name == s or name.endswith("." + s) for s in suffixes))
    blocks = [*model.layers, *model.noise_refiner, *model.context_refiner]
    return {"base": sum(p.numel() for p in model.parameters()),
            "block": max(sum(p.numel() for p in b.parameters()) for b in blocks),
            "blocks": len(blocks), "dim": int(config["dim"]), "ffn_hidden": int(blocks[0].feed_forward.w1.out_features),
            "lora_per_step": lora, "discriminator": sum(p.numel() for p in disc.parameters())}


def _real_discriminator_config():
    """The heads configs/zimage_turbo_2step_lora.yaml trains (the real path's defaults)."""
    from .worlds.zimage.train import ZImageDistillConfig

    return ZImageDistillConfig().discriminator


def plan_memory(req: PlanRequest, config: dict[str, Any] | None = None) -> dict:
    """Per-GPU bytes by component. ``config`` (transformer kwargs) overrides ``req.model`` when given."""
    req.validate()
    config = load_transformer_config(req.model) if config is None else config
    n = count_parameters(config, req.lora_rank)
    patch = int(config.get("all_patch_size", [2])[0])
    image_tokens = (req.resolution // VAE_DOWN // patch) ** 2
    tokens = image_tokens + req.caption_tokens
    optim = FP32 + FP32 + ADAM_STATES * FP32  # fp32 trainable weight + grad + AdamW states
    parts: dict[str, int] = {}
    if req.mode == "lora":
        trainable = req.num_steps * n["lora_per_step"]
        parts["frozen base (bf16, = teacher)"] = n["base"] * BF16  # DDP: every GPU holds the whole base
        parts["LoRA adapters + grads + AdamW (fp32)"] = trainable * optim
        parts["EMA of the adapters (fp32)"] = trainable * FP32
        if req.gpus > 1:
            parts["DDP gradient buckets"] = trainable * FP32
    else:
        trainable = req.num_steps * n["base"]
        # bf16 compute copy + fp32 master/grad/AdamW, FSDP2-sharded (conservative: FSDP2 mixed precision can
        # drop the persistent bf16 copy)
        parts["student copies: bf16 + fp32 master/grads/AdamW (sharded)"] = -(-trainable * (BF16 + optim) // req.gpus)
        parts["frozen teacher (bf16, sharded)"] = -(-n["base"] * BF16 // req.gpus)
        parts["EMA of the copies (fp32, sharded)"] = -(-trainable * FP32 // req.gpus)
        if req.gpus > 1:
            parts["FSDP2 unsharded block buffers"] = n["block"] * (FSDP_PREFETCH_BLOCKS * BF16 + FP32)
    parts["discriminator heads + grads + AdamW (fp32)"] = n["discriminator"] * optim
    saved = GRAPH_PASSES * n["blocks"] * tokens * n["dim"] * BF16  # one block input kept per checkpointed block
    recompute = tokens * (RECOMPUTE_DIM_FACTOR * n["dim"] + RECOMPUTE_FFN_FACTOR * n["ffn_hidden"]) * BF16
    parts["activations: checkpointed block inputs (estimate)"] = req.batch * saved
    parts["activations: one block recompute (estimate)"] = req.batch * recompute
    parts["CUDA / framework overhead"] = OVERHEAD_BYTES
    total = sum(parts.values())
    return {"request": {k: getattr(req, k) for k in PlanRequest.__dataclass_fields__},
            "params": {"base": n["base"], "trainable": trainable, "lora_per_step": n["lora_per_step"],
                       "discriminator": n["discriminator"]},
            "tokens": {"image": image_tokens, "caption": req.caption_tokens, "blocks": n["blocks"]},
            "components": parts, "total_bytes": total,
            "fits": {f"{gib:g}": total <= gib * GIB for gib, _ in CARDS}}


def _fit_word(total: int, gib: float) -> str:
    if total > gib * GIB:
        return "no"
    return "yes (tight)" if total > (1 - TIGHT) * gib * GIB else "yes"


def format_plan(plan: dict) -> str:
    """A table in GiB, the common cards it fits, and a verdict for ``request.card_gib`` if set."""
    req, p, t = plan["request"], plan["params"], plan["tokens"]
    width = max(len(k) for k in plan["components"]) + 2
    lines = [f"{req['model']} | {req['mode']} | {req['resolution']}px | batch {req['batch']}/GPU | {req['gpus']} GPU(s)"
             f" | {req['num_steps']} student steps"
             + (f" | LoRA rank {req['lora_rank']}" if req["mode"] == "lora" else ""),
             f"params: base {p['base'] / 1e9:.3f}B, trainable {p['trainable'] / 1e6:,.1f}M, "
             f"discriminator {p['discriminator'] / 1e6:.1f}M; tokens/sample: {t['image']} image + {t['caption']} "
             f"caption (max assumed) through {t['blocks']} blocks", "",
             f"{'component':<{width}}GiB", "-" * (width + 8)]
    lines += [f"{k:<{width}}{v / GIB:8.2f}" for k, v in plan["components"].items()]
    total = plan["total_bytes"]
    lines += ["-" * (width + 8), f"{'total per GPU':<{width}}{total / GIB:8.2f}", "",
              "fits: " + " / ".join(f"{gib:g} GiB ({name}) {_fit_word(total, gib)}" for gib, name in CARDS),
              "activations are an estimate (gradient checkpointing on, 3 graph-keeping passes); weights and optimizer "
              "states are exact counts. VAE and text encoder are not loaded (cached latents and embeddings)."]
    card = req.get("card_gib")
    if card:
        spare = card - total / GIB
        if spare >= 0:
            lines.append(f"verdict: fits a {card:g} GiB card with {spare:.1f} GiB to spare"
                         + (" (tight: activations are an estimate)" if spare < TIGHT * card else ""))
        else:
            # LoRA holds the whole base on every GPU: only the activations shrink
            hint = "--batch 1 or a lower --resolution" + (", or more --gpus" if req["mode"] == "full" else "")
            lines.append(f"verdict: does NOT fit a {card:g} GiB card ({-spare:.1f} GiB short); try {hint}")
    return "\n".join(lines)


def add_plan_arguments(parser) -> None:
    """``twostep plan`` flags."""
    parser.add_argument("--model", default="zimage-turbo",
                        help="Z-Image pipeline/transformer folder, a cached hub id, or zimage-turbo (default)")
    parser.add_argument("--mode", choices=["lora", "full"], default="lora",
                        help="per-step LoRA adapters (default) or full per-step copies (FSDP2)")
    parser.add_argument("--resolution", type=int, default=1024, help="square training resolution in px (default 1024)")
    parser.add_argument("--batch", type=int, default=2, help="batch per GPU (default 2)")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs (full mode shards with FSDP2; default 1)")
    parser.add_argument("--lora-rank", type=int, default=64, help="LoRA rank (default 64, as configs/zimage_turbo_2step_lora.yaml)")
    parser.add_argument("--card-gib", type=float, default=None, help="say whether it fits a card of this many GiB")
    parser.add_argument("--results", help="also write the plan into a marked section of this markdown file")


def cmd_plan(args) -> None:
    req = PlanRequest(model=args.model, mode=args.mode, resolution=args.resolution, batch=args.batch, gpus=args.gpus,
                      lora_rank=args.lora_rank, card_gib=args.card_gib)
    if getattr(args, "results", None):
        from .reports import check_markdown_target

        check_markdown_target(args.results)
    text = format_plan(plan_memory(req))
    print(text)
    if getattr(args, "results", None):
        from .reports import update_section

        command = "twostep " + " ".join(getattr(args, "argv", []))
        name = f"plan-{req.mode}-{req.resolution}-b{req.batch}-g{req.gpus}"
        update_section(args.results, name, f"Written by `{command}`:\n\n```\n{text}\n```")
        print(f"updated {args.results}")
