"""The networks metrics look through, loaded with transformers' ``from_pretrained`` from a hub id or a local folder
(the tests save tiny random instances of the same classes and load them through this same code):

- CLIP (``CLIPModel``; default ``openai/clip-vit-large-patch14``): image and text embeddings for the CLIP score and
  for FD/KID in CLIP image space;
- DINOv2 (``Dinov2Model``, loaded by ``AutoModel``; default ``facebook/dinov2-large``): the CLS feature after the
  final layer norm (``pooler_output``), the space of FD-DINOv2;
- a human-preference model: PickScore (``yuvalkirstain/PickScore_v1``, a CLIP-H ``CLIPModel``; its processor is
  the one of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``): score ``exp(logit_scale) * cos(image, text)``.

Each model brings its own preprocessing (``AutoImageProcessor``: resize, crop, normalise) and tokenizer
(``AutoTokenizer``). An id that cannot be loaded (not downloaded, offline, a typo) raises
:class:`MetricModelUnavailable`, a one-line :class:`~twostep.core.errors.TwostepError` naming the id; callers decide
whether that stops them (``twostep evaluate`` for CLIP and DINOv2) or is reported and skipped (the preference
model, and every model during training).
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager

import torch

from twostep.core.errors import TwostepError

Tensor = torch.Tensor
DISABLED = ("", "none")  # a model id that turns its metrics off


class MetricModelUnavailable(TwostepError):
    """A metric model id that cannot be loaded here."""


def is_disabled(model_id: str | None) -> bool:
    return model_id is None or model_id.strip().lower() in DISABLED


@contextmanager
def _quiet_transformers():
    """Without torchvision transformers warns once per processor that it uses the PIL backend: expected here."""
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _load(kind: str, model_id: str, load):
    try:
        with _quiet_transformers():
            return load()
    except (OSError, ValueError, KeyError, ImportError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        where = "local folder" if os.path.isdir(model_id) else "model id"
        raise MetricModelUnavailable(f"{kind} model {model_id!r} ({where}) cannot be loaded: {reason[:300]}") from None


def check_available(kind: str, model_id: str) -> None:
    """Cheap check before hours of sampling: the model's config loads (downloaded when online, else from the
    local cache or folder). Weights are loaded later, by the metric."""
    from transformers import AutoConfig

    _load(kind, model_id, lambda: AutoConfig.from_pretrained(model_id))


def _to_arrays(images: Tensor) -> list:
    """``uint8 (N, 3, H, W)`` -> ``N`` arrays ``(H, W, 3)``, what every image processor accepts."""
    return [img.permute(1, 2, 0).cpu().numpy() for img in images]


def _pixel_batches(processor, images: Tensor, batch_size: int, device):
    """The model's own preprocessing of uint8 ``(N, 3, H, W)`` images, ``batch_size`` at a time, on ``device``."""
    for start in range(0, len(images), batch_size):
        with _quiet_transformers():
            pixels = processor(images=_to_arrays(images[start:start + batch_size]), return_tensors="pt")
        yield pixels["pixel_values"].to(device)


def _embeds(output) -> Tensor:
    """transformers 4 returns the projected embeddings as a tensor, transformers 5 inside ``pooler_output``."""
    return output if isinstance(output, Tensor) else output.pooler_output


class ClipModel:
    """A ``CLIPModel`` with its processor. ``image_embeds`` / ``text_embeds``: ``(N, D)`` projected embeddings."""

    def __init__(self, model_id: str, device="cpu", processor_id: str | None = None, kind: str = "CLIP"):
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        source = processor_id or model_id
        self.model_id, self.device = model_id, torch.device(device)
        self.model = _load(kind, model_id, lambda: CLIPModel.from_pretrained(model_id)).to(self.device).eval()
        self.image_processor = _load(kind, source, lambda: AutoImageProcessor.from_pretrained(source))
        self.tokenizer = _load(kind, source, lambda: AutoTokenizer.from_pretrained(source))
        self.max_tokens = int(self.model.config.text_config.max_position_embeddings)

    @torch.no_grad()
    def image_embeds(self, images: Tensor, batch_size: int = 16) -> Tensor:
        return torch.cat([_embeds(self.model.get_image_features(pixel_values=pixels)).float().cpu()
                          for pixels in _pixel_batches(self.image_processor, images, batch_size, self.device)])

    @torch.no_grad()
    def text_embeds(self, prompts: list[str], batch_size: int = 16) -> Tensor:
        """Prompts longer than the text tower's context (77 tokens for CLIP) are cut there, as CLIP was trained."""
        out = []
        for start in range(0, len(prompts), batch_size):
            tokens = self.tokenizer(prompts[start:start + batch_size], padding=True, truncation=True,
                                    max_length=self.max_tokens, return_tensors="pt")
            out.append(_embeds(self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                            attention_mask=tokens["attention_mask"].to(self.device)))
                       .float().cpu())
        return torch.cat(out)

    def preference(self, images: Tensor, prompts: list[str], batch_size: int = 16) -> Tensor:
        """PickScore's score per (image, prompt) pair: ``exp(logit_scale) * cos``. ``(N,)``."""
        img = torch.nn.functional.normalize(self.image_embeds(images, batch_size), dim=-1)
        txt = torch.nn.functional.normalize(self.text_embeds(prompts, batch_size), dim=-1)
        return float(self.model.logit_scale.detach().exp()) * (img * txt).sum(-1)


class DinoModel:
    """A DINOv2 backbone (``AutoModel``): ``features`` gives the ``(N, D)`` CLS features (``pooler_output``)."""

    def __init__(self, model_id: str, device="cpu"):
        from transformers import AutoImageProcessor, AutoModel

        self.model_id, self.device = model_id, torch.device(device)
        self.model = _load("DINOv2", model_id, lambda: AutoModel.from_pretrained(model_id)).to(self.device).eval()
        self.image_processor = _load("DINOv2", model_id, lambda: AutoImageProcessor.from_pretrained(model_id))

    @torch.no_grad()
    def features(self, images: Tensor, batch_size: int = 16) -> Tensor:
        return torch.cat([self.model(pixel_values=pixels).pooler_output.float().cpu()
                          for pixels in _pixel_batches(self.image_processor, images, batch_size, self.device)])
