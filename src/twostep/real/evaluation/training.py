"""Evaluation during training on the real path (``train.eval_every``): a few of ``twostep evaluate``'s metrics on
the EMA weights, logged by the trainer as ``eval/*`` to ``train_log.jsonl`` and TensorBoard.

The smoke set (16 prompts), fixed noise; the student's 2-step images against the teacher's 8-step images from the
same noise (sampled once, at the first evaluation, by the frozen base with its adapters off):

- ``eval/psnr``, ``eval/ssim``, ``eval/sharpness_ratio``: need no model, always there;
- ``eval/clip_score`` (CLIP) and ``eval/kid_dino``, ``eval/fd_dino`` (DINOv2, to the teacher's images): only when the
  metric model loads. A model that cannot be loaded is reported once, at the start, and its metrics are left out;
  a metric that fails later is reported once and left out from then on; an evaluation that fails as a whole (out
  of memory while sampling, say) is reported and skipped. Nothing here stops the run.

Not numerically a ``twostep evaluate``: the noise is one batch drawn from ``seed`` (evaluate draws sample i from
``seed + i``) and the images come from the training backbone's own Euler loop, not the diffusers pipeline; the
values are a trend to watch during training.

The prompts are encoded once, before the student is built (the text encoder is loaded, used and freed); the VAE
and metric models are loaded per evaluation and freed, so none of them stays resident during training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from twostep.core.config import require, require_seed
from twostep.core.utils import is_main_process
from twostep.real.evaluation import metrics as M
from twostep.real.evaluation.feature_models import (
    ClipModel,
    DinoModel,
    MetricModelUnavailable,
    check_available,
    is_disabled,
)


@dataclass
class TrainEvalConfig:
    """The ``evaluation:`` section of a Z-Image training config (unset: these defaults)."""

    prompts: str = "builtin:smoke"
    count: int = 16  # prompts of the set used (the first ones)
    seed: int = 0
    clip: str = "openai/clip-vit-large-patch14"  # "" or none: no CLIP score
    dino: str = "facebook/dinov2-large"  # "" or none: no FD / KID
    batch_size: int = 8

    def validate(self) -> None:
        require(bool(self.prompts.strip()), "prompts", "must name a prompt file or builtin:smoke")
        require(self.count >= 2, "count", "must be at least 2 (distances need two samples)")
        require_seed(self.seed, "seed")
        require(self.batch_size >= 1, "batch_size", "must be at least 1")


def _warn(message: str) -> None:
    print(f"twostep: warning: evaluation during training: {message}", flush=True)


class TrainingEvaluator:
    """``evaluator(student) -> {metric: value}`` for :class:`~twostep.engine.train.Trainer`'s ``eval_fn``.

    Construction only reads and checks the prompts (a bad prompt file refuses the run before anything is
    written); :meth:`setup` encodes them and checks the metric models, before the student is built."""

    def __init__(self, cfg: TrainEvalConfig, folder: str, latent_shape, data_cfg, device):
        from twostep.core.prompts import read_prompts
        from twostep.real.evaluation.prompt_sets import resolve_prompt_file
        from twostep.real.text_cache import check_prompt_lengths

        path = resolve_prompt_file(cfg.prompts)
        self.prompts = read_prompts(path)[:cfg.count]
        check_prompt_lengths(folder, self.prompts, data_cfg.max_length, path)
        from twostep.families.registry import detect_family

        self.cfg, self.folder, self.data_cfg, self.device = cfg, folder, data_cfg, torch.device(device)
        self.family = detect_family(folder)
        self.noise = torch.randn((len(self.prompts), *latent_shape), generator=torch.Generator().manual_seed(cfg.seed))
        self.cond = None
        self.teacher_images = None
        self.models = {"CLIP": None if is_disabled(cfg.clip) else cfg.clip,
                       "DINOv2": None if is_disabled(cfg.dino) else cfg.dino}
        self.failed: set[str] = set()

    def setup(self) -> None:
        """Encode the prompts with the pipeline's text encoder (then freed) and check the metric models once."""
        from twostep.engine.backbone import Conditioning

        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        tokenizer, encoder = self.family.load_text_encoder(self.folder, self.device, dtype)
        feats = self.family.encode_prompts(tokenizer, encoder, self.prompts, self.data_cfg.max_length,
                                           device=self.device)
        self.cond = Conditioning.from_list([f.cpu() for f in feats])
        del encoder, feats
        for kind, model_id in list(self.models.items()):
            if model_id is None:
                continue
            try:
                check_available(kind, model_id)
            except MetricModelUnavailable as err:
                _warn(f"{str(err).rstrip('.')}; its metrics are left out of this run")
                self.models[kind] = None

    def _images(self, vae, latents: torch.Tensor) -> torch.Tensor:
        """uint8 ``(N, 3, H, W)``, decoded one at a time (the smallest activations)."""
        return torch.cat([self.family.decode_to_uint8(vae, latents[i:i + 1]) for i in range(len(latents))])

    def _guarded(self, name: str, compute, out: dict) -> None:
        """Run one metric group; a failure is reported once and that group is skipped from then on."""
        if name in self.failed:
            return
        try:
            out.update(compute())
        except Exception as err:  # noqa: BLE001 - a metric must never stop the training run
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            _warn(f"{name} failed ({reason[:200]}); left out from now on")
            self.failed.add(name)

    def __call__(self, student) -> dict[str, float]:
        """The metrics, or none this time when anything fails (out of memory while sampling or decoding, say): the
        failure is reported and training goes on."""
        try:
            return self._evaluate(student)
        except Exception as err:  # noqa: BLE001 - an evaluation must never stop the training run
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            _warn(f"this evaluation failed ({type(err).__name__}: {reason[:200]}); training goes on without it")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return {}

    @torch.no_grad()
    def _evaluate(self, student) -> dict[str, float]:
        from twostep.real.preview import teacher_latents

        if self.cond is None:
            self.setup()
        latents = student.sample(self.noise.to(self.device), self.cond.to(self.device), batch_size=1)["final"]
        first = None
        if self.teacher_images is None:
            first = teacher_latents(student, self.noise, self.cond, self.data_cfg.teacher_steps,
                                    self.data_cfg.shift, self.device)
        if not is_main_process():  # FSDP2: every rank samples (the forward is a collective); rank 0 scores
            self.teacher_images = self.teacher_images if self.teacher_images is not None else []
            return {}
        vae = self.family.load_vae(self.folder, self.device, torch.float32)
        if first is not None:
            self.teacher_images = self._images(vae, first)
        images = self._images(vae, latents)
        del vae
        teacher, bs, out = self.teacher_images, self.cfg.batch_size, {}
        out["psnr"] = float(M.psnr(images, teacher).clamp(max=100.0).mean())
        out["ssim"] = float(M.ssim(images, teacher).mean())
        out["sharpness_ratio"] = M.sharpness_ratio(images, teacher)

        def clip_metrics() -> dict:
            clip = ClipModel(self.models["CLIP"], self.device)
            sims = M.clip_similarity(clip.image_embeds(images, bs), clip.text_embeds(self.prompts, bs))
            return {"clip_score": M.clip_score(sims)}

        def dino_metrics() -> dict:
            dino = DinoModel(self.models["DINOv2"], self.device)
            a, b = dino.features(images, bs), dino.features(teacher, bs)
            kid, _ = M.kernel_distance(a, b, subsets=20, seed=self.cfg.seed)
            return {"fd_dino": M.frechet_distance(a, b), "kid_dino": kid}

        if self.models["CLIP"]:
            self._guarded("CLIP score", clip_metrics, out)
        if self.models["DINOv2"]:
            self._guarded("DINOv2 distances", dino_metrics, out)
        return {k: v for k, v in out.items() if v == v}  # NaN (e.g. a flat teacher image set) is not logged
