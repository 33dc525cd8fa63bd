"""Our sampler and text encoding reproduce a real (tiny, random) ZImagePipeline loaded from disk."""

import pytest
import torch
from diffusers import ZImagePipeline

from twostep.engine import flow
from twostep.engine.backbone import Conditioning
from twostep.families.zimage.adapter import ZImageBackbone
from twostep.families.zimage.text import encode_prompts

PROMPTS = ["a red cat on the sofa", "a photo of a small house in the city at night"]


@pytest.fixture(scope="module")
def pipe(tiny_pipeline_dir):
    return ZImagePipeline.from_pretrained(tiny_pipeline_dir)


def count_calls(module):
    calls = []
    original = module.forward

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    module.forward = counted
    return calls


def test_text_encoding_matches_pipeline(pipe):
    ours = encode_prompts(pipe.tokenizer, pipe.text_encoder, list(PROMPTS), max_length=64)
    theirs, _ = pipe.encode_prompt(list(PROMPTS), do_classifier_free_guidance=False, max_sequence_length=64)
    assert [t.shape for t in ours] == [t.shape for t in theirs]
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)
    assert ours[0].shape[0] != ours[1].shape[0], "variable length: padding must be masked out"


@pytest.mark.parametrize("num_steps", [2, 8])
def test_euler_sampler_reproduces_zimage_pipeline(pipe, num_steps):
    embeds = encode_prompts(pipe.tokenizer, pipe.text_encoder, list(PROMPTS), max_length=64)
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    backbone = ZImageBackbone(pipe.transformer)
    calls = count_calls(pipe.transformer)
    expected = pipe(prompt_embeds=embeds, guidance_scale=0.0, num_inference_steps=num_steps, height=16, width=16,
                    latents=latents.clone(), output_type="latent").images
    assert len(calls) == num_steps
    calls.clear()
    cond = Conditioning.from_list(embeds)
    sigmas = flow.turbo_sigmas(num_steps, shift=pipe.scheduler.config.shift)
    ours = flow.euler_sample(lambda x, s, i: backbone.velocity(x, s, cond), latents.clone(), sigmas)
    assert len(calls) == num_steps
    assert (ours - expected).abs().max().item() <= 1e-5
    assert (expected - latents).abs().max() > 1e-2, "the model must actually move the latents"
