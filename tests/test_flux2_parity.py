"""FLUX.2 klein's conventions, each pinned against a tiny random ``Flux2KleinPipeline`` loaded from disk.

Every convention that differs from Z-Image has its own test, written so that flipping it in our adapter fails:
σ (not 1 - σ) as the time input, the output used as ``v = ε - x`` with no sign flip, 2x2-patchified latents
packed row-major with 4-axis position ids, the full padded prompt with no mask, the size-dependent schedule shift
(``compute_empirical_mu``), the VAE's batch-norm latent normalisation, and block features taken after the text
tokens in single-stream blocks.
"""

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

from twostep.engine import flow
from twostep.engine.backbone import Conditioning
from twostep.families.flux2 import pipeline_io
from twostep.families.flux2.adapter import Flux2Backbone, image_ids, pack, text_ids, unpack
from twostep.families.flux2.text import encode_prompts

PROMPTS = ["a red cat on the sofa", "a photo of a small house in the city at night"]
RES, TEXT_LEN = 32, 24  # tiny VAE 2x and 2x2 patches: engine latents (16, 8, 8), 64 image tokens


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from twostep.testing import tiny_flux2_klein_pipeline

    path = str(tmp_path_factory.mktemp("tiny_flux2"))
    tiny_flux2_klein_pipeline(seed=0).save_pretrained(path)
    return Flux2KleinPipeline.from_pretrained(path)


def _cond(pipe, prompts=PROMPTS) -> Conditioning:
    return Conditioning.from_list(encode_prompts(pipe.tokenizer, pipe.text_encoder, list(prompts), TEXT_LEN))


def _noise(seed=3, batch=2):
    return torch.randn(batch, 16, RES // 4, RES // 4, generator=torch.Generator().manual_seed(seed))


def test_text_is_the_full_padded_prompt_of_three_hidden_layers(pipe):
    ours = torch.stack(encode_prompts(pipe.tokenizer, pipe.text_encoder, list(PROMPTS), TEXT_LEN))
    theirs, ids = pipe.encode_prompt(list(PROMPTS), max_sequence_length=TEXT_LEN)
    assert ours.shape == (2, TEXT_LEN, 3 * 16)  # padding kept: both prompts have TEXT_LEN tokens
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(text_ids(TEXT_LEN), ids[0])
    cond = _cond(pipe)
    assert bool(cond.mask.all())
    masked = Conditioning(cond.embeds, cond.mask.clone())
    masked.mask[0, -1] = False  # a masked prompt is not what the transformer reads
    with pytest.raises(ValueError, match="full padded prompt"):
        Flux2Backbone(pipe.transformer).velocity(_noise(), torch.ones(2), masked)


def test_packing_and_position_ids_are_the_pipelines(pipe):
    x = _noise()
    packed = pack(x)
    torch.testing.assert_close(packed, pipe._pack_latents(x))
    ids = pipe._prepare_latent_ids(x)
    torch.testing.assert_close(image_ids(8, 8), ids[0])
    assert ids[0, 1].tolist() == [0, 0, 1, 0]  # row-major: the second token is (row 0, column 1)
    torch.testing.assert_close(unpack(packed, 8, 8), pipe._unpack_latents_with_ids(packed, ids, 8, 8))
    transposed = x.transpose(-1, -2)
    assert not torch.equal(pack(transposed), packed)  # column-major packing would be caught


def test_time_input_is_sigma_and_the_output_is_v_with_no_sign_flip(pipe):
    backbone, cond, x = Flux2Backbone(pipe.transformer), _cond(pipe), _noise()
    sigma = torch.tensor([0.9, 0.4])

    def raw(t):
        return unpack(pipe.transformer(hidden_states=pack(x), encoder_hidden_states=cond.embeds, timestep=t,
                                       img_ids=image_ids(8, 8), txt_ids=text_ids(TEXT_LEN),
                                       return_dict=False)[0], 8, 8)

    with torch.no_grad():
        ours = backbone.velocity(x, sigma, cond)
        torch.testing.assert_close(ours, raw(sigma))
        assert (ours - raw(1 - sigma)).abs().max() > 1e-3  # 1 - σ (Z-Image's direction) is another input
    # one scheduler step of the pipeline is x + (σ' - σ)·v with our v: the sign is the scheduler's
    pipe.scheduler.set_timesteps(sigmas=[1.0, 0.5], mu=0.0)
    s0, s1 = pipe.scheduler.sigmas[:2].tolist()
    with torch.no_grad():
        v = backbone.velocity(x, torch.full((2,), s0), cond)
        stepped = pipe.scheduler.step(pack(v), pipe.scheduler.timesteps[0], pack(x), return_dict=False)[0]
    torch.testing.assert_close(unpack(stepped, 8, 8), flow.euler_step(x, v, s0, s1))
    assert (unpack(stepped, 8, 8) - flow.euler_step(x, -v, s0, s1)).abs().max() > 1e-3


@pytest.mark.parametrize("seq_len", [64, 1024, 4096, 5000])
def test_the_schedule_shift_is_compute_empirical_mu(pipe, seq_len):
    for steps in (1, 2, 4, 8, 50):
        assert abs(pipeline_io.empirical_mu(seq_len, steps) - compute_empirical_mu(seq_len, steps)) < 1e-9
        shift = pipeline_io.schedule_shift(seq_len, steps)
        pipe.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps),
                                     mu=compute_empirical_mu(seq_len, steps))
        torch.testing.assert_close(pipe.scheduler.sigmas, flow.turbo_sigmas(steps, shift), atol=2e-6, rtol=0)
    assert abs(pipeline_io.schedule_shift(seq_len, 4) - pipeline_io.schedule_shift(seq_len, 2)) > 1e-3 or seq_len > 4300


@pytest.mark.parametrize("num_steps", [2, 4])
def test_euler_sampler_reproduces_the_klein_pipeline(pipe, num_steps):
    """Everything at once: same noise and prompts in, same latents out, for the pipeline's own schedule."""
    cond, noise = _cond(pipe), _noise()
    backbone = Flux2Backbone(pipe.transformer)
    expected = pipe(prompt_embeds=cond.embeds, num_inference_steps=num_steps, height=RES, width=RES,
                    latents=noise.clone(), output_type="latent", guidance_scale=1.0).images
    expected = pipeline_io.from_vae_latents(pipe.vae, expected)  # the VAE's latents -> the engine's
    sigmas = flow.turbo_sigmas(num_steps, pipeline_io.schedule_shift(64, num_steps))
    with torch.no_grad():
        ours = flow.euler_sample(lambda x, s, i: backbone.velocity(x, s, cond), noise.clone(), sigmas)
    assert (ours - expected).abs().max().item() <= 1e-4
    assert (expected - noise).abs().max() > 1e-2, "the model must actually move the latents"
    wrong = flow.turbo_sigmas(num_steps, 3.0)  # the scheduler config's static shift is not the schedule
    with torch.no_grad():
        static = flow.euler_sample(lambda x, s, i: backbone.velocity(x, s, cond), noise.clone(), wrong)
    assert (static - expected).abs().max() > 1e-3


def test_vae_latents_are_batch_norm_normalised_patches(pipe):
    latents = _noise(seed=5, batch=1)
    vae_latents = pipeline_io.to_vae_latents(pipe.vae, latents)
    assert vae_latents.shape == (1, 4, 16, 16)
    torch.testing.assert_close(pipeline_io.from_vae_latents(pipe.vae, vae_latents), latents)
    torch.testing.assert_close(pipeline_io.patchify(vae_latents), pipe._patchify_latents(vae_latents))
    torch.testing.assert_close(pipeline_io.unpatchify(pipeline_io.patchify(vae_latents)), vae_latents)
    # decoding: the pipeline's own image from the same final latents (a 0-step run ends where it starts)
    with torch.no_grad():
        theirs = pipe.vae.decode(vae_latents, return_dict=False)[0]
    theirs = pipe.image_processor.postprocess(theirs, output_type="np")[0]
    ours = pipeline_io.decode_to_uint8(pipe.vae, latents)[0].permute(1, 2, 0).numpy()
    assert np.abs(ours.astype(int) - np.round(theirs * 255).astype(int)).max() <= 1
    unnormalised = pipeline_io.decode_to_uint8(pipe.vae, pipeline_io.patchify(vae_latents))  # skipping the BN
    assert np.abs(unnormalised[0].permute(1, 2, 0).numpy().astype(int) - ours.astype(int)).max() > 0


def test_the_batch_norm_is_the_pipelines_own_with_its_eps_and_direction(pipe):
    """With non-trivial running statistics (the tiny VAE's are 0 and 1): decoding denormalises as the pipeline's
    ``__call__`` does before ``_unpatchify_latents``, encoding normalises as its ``_encode_vae_image`` does after
    ``_patchify_latents``, eps included."""
    import copy

    vae = copy.deepcopy(pipe.vae)
    channels = vae.bn.running_mean.numel()
    g = torch.Generator().manual_seed(7)
    vae.bn.running_mean.copy_(torch.randn(channels, generator=g))
    vae.bn.running_var.copy_(torch.rand(channels, generator=g) * 0.01)  # small: eps is a visible share of the std
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    latents = _noise(seed=6, batch=1)
    torch.testing.assert_close(pipeline_io.to_vae_latents(vae, latents),
                               Flux2KleinPipeline._unpatchify_latents(latents * std + mean))
    vae_latents = torch.randn(1, 4, 16, 16, generator=g)
    torch.testing.assert_close(pipeline_io.from_vae_latents(vae, vae_latents),
                               (Flux2KleinPipeline._patchify_latents(vae_latents) - mean) / std)


def test_the_prompt_length_is_the_pipelines_512_tokens(pipe):
    """The transformer reads the padded prompt with no mask, so the length is part of the conditioning: ours is
    the pipeline's own, in its tokenizer limit and in its call's default."""
    import inspect

    assert pipeline_io.MAX_SEQUENCE_LENGTH == pipe.tokenizer_max_length == 512
    assert inspect.signature(Flux2KleinPipeline.__call__).parameters["max_sequence_length"].default == 512


def test_single_stream_features_are_the_image_tokens_after_the_text(pipe):
    backbone, cond, x = Flux2Backbone(pipe.transformer), _cond(pipe), _noise()
    sigma = torch.tensor([0.7, 0.7])
    assert backbone.num_blocks == 3 and backbone.num_double_blocks == 1
    seen = {}
    handles = [pipe.transformer.transformer_blocks[0].register_forward_hook(
                   lambda m, a, out: seen.__setitem__("double", out)),
               pipe.transformer.single_transformer_blocks[1].register_forward_hook(
                   lambda m, a, out: seen.__setitem__("single", out))]
    try:
        with torch.no_grad():
            backbone.velocity(x, sigma, cond)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        double, single = backbone.features(x, sigma, cond, [0, 2])
    assert double.shape == single.shape == (2, 32, 8, 8)
    torch.testing.assert_close(double, seen["double"][1].transpose(1, 2).reshape(2, 32, 8, 8))
    torch.testing.assert_close(single, seen["single"][:, TEXT_LEN:].transpose(1, 2).reshape(2, 32, 8, 8))
    text_first = seen["single"][:, :64].transpose(1, 2).reshape(2, 32, 8, 8)  # the first tokens are text
    assert (single - text_first).abs().max() > 1e-3
    with pytest.raises(ValueError, match="feature blocks"):
        backbone.features(x, sigma, cond, [3])
