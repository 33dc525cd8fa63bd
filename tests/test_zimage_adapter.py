"""The Z-Image adapter: list conversion, time direction, output sign, features, checkpointing."""

import os

import pytest
import torch
from diffusers import ZImageTransformer2DModel

from twostep.core.errors import TwostepError
from twostep.engine import flow
from twostep.engine.backbone import Conditioning
from twostep.families.zimage.adapter import ZIMAGE_TURBO_CONFIG, ZImageBackbone
from twostep.testing import tiny_transformer_config


@pytest.fixture(scope="module")
def backbone():
    return ZImageBackbone.from_config(tiny_transformer_config(cap_feat_dim=32), seed=0).eval()


def make_cond(batch, lengths=None, dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = lengths or [5 + 3 * i for i in range(batch)]
    return Conditioning.from_list([torch.randn(n, dim, generator=g) for n in lengths])


def test_full_config_on_meta_device_has_6_155b_parameters():
    model = ZImageBackbone.from_config(ZIMAGE_TURBO_CONFIG, device="meta")
    count = sum(p.numel() for p in model.parameters())
    assert round(count / 1e9, 3) == 6.155


def test_turbo_config_is_the_published_one():
    """The package's config equals an independent copy of Z-Image-Turbo's transformer/config.json, and every key
    is a real ZImageTransformer2DModel argument (the RoPE table covers 1536 caption positions, not the default 1024)."""
    import json

    published = json.load(open(os.path.join(os.path.dirname(__file__), "fixtures",
                                             "zimage_turbo_transformer_config.json")))
    assert ZIMAGE_TURBO_CONFIG == {k: v for k, v in published.items() if not k.startswith("_")}
    assert ZIMAGE_TURBO_CONFIG["axes_lens"] == [1536, 512, 512]
    with torch.device("meta"):
        model = ZImageTransformer2DModel(**ZIMAGE_TURBO_CONFIG)
    for key, value in ZIMAGE_TURBO_CONFIG.items():
        assert model.config[key] == value or list(model.config[key]) == value, key


def test_velocity_is_minus_output_at_time_one_minus_sigma(backbone):
    x = torch.randn(3, 16, 8, 8)
    sigma = torch.tensor([1.0, 0.75, 0.3])
    cond = make_cond(3)
    with torch.no_grad():
        raw = backbone.transformer(list(x.unsqueeze(2).unbind(0)), 1 - sigma, cond.to_list(), return_dict=False)[0]
        v = backbone.velocity(x, sigma, cond)
    torch.testing.assert_close(v, -torch.stack(raw).squeeze(2))
    assert v.shape == x.shape


def test_batched_call_equals_one_by_one_with_different_caption_lengths(backbone):
    x = torch.randn(3, 16, 8, 8)
    sigma = torch.tensor([0.9, 0.5, 0.2])
    cond = make_cond(3, lengths=[3, 40, 11])
    with torch.no_grad():
        batched = backbone.velocity(x, sigma, cond)
        single = torch.cat([backbone.velocity(x[i:i + 1], sigma[i:i + 1], cond[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-4)


def test_features_are_image_token_maps_and_carry_gradient(backbone):
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    cond = make_cond(2)
    maps = backbone.features(x, torch.tensor([0.5, 0.5]), cond, blocks=[0, 1])
    assert [tuple(m.shape) for m in maps] == [(2, 64, 4, 4), (2, 64, 4, 4)]
    maps[1].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None or p.requires_grad for p in backbone.parameters())


def test_features_match_block_outputs_and_stop_early(backbone):
    x, sigma, cond = torch.randn(2, 16, 8, 8), torch.tensor([0.7, 0.2]), make_cond(2)
    started = []
    handles = [blk.register_forward_pre_hook(lambda m, a, i=i: started.append(i))
               for i, blk in enumerate(backbone.transformer.layers)]
    try:
        with torch.no_grad():
            (first,) = backbone.features(x, sigma, cond, blocks=[0])
    finally:
        for h in handles:
            h.remove()
    assert started == [0], "the forward should stop after the deepest requested block"
    outputs = {}
    handle = backbone.transformer.layers[0].register_forward_hook(lambda m, a, o: outputs.setdefault(0, o))
    try:
        with torch.no_grad():  # a plain full forward, as diffusers runs it
            backbone.transformer(list(x.unsqueeze(2).unbind(0)), 1 - sigma, cond.to_list(), return_dict=False)
    finally:
        handle.remove()
    image_tokens = outputs[0][:, :16]  # 4x4 image tokens come first in [image, caption]
    torch.testing.assert_close(first, image_tokens.transpose(1, 2).reshape(2, 64, 4, 4))


def test_features_reject_bad_blocks(backbone):
    with pytest.raises(ValueError, match="feature blocks"):
        backbone.features(torch.randn(1, 16, 8, 8), torch.tensor([0.5]), make_cond(1), blocks=[7])


def test_gradient_checkpointing_gives_same_values_and_gradients():
    plain = ZImageBackbone.from_config(tiny_transformer_config(), seed=1)
    ckpt = ZImageBackbone.from_config(tiny_transformer_config(), seed=1)
    ckpt.set_gradient_checkpointing(True)
    x, sigma, cond = torch.randn(2, 16, 8, 8), torch.tensor([0.6, 0.4]), make_cond(2)
    for model in (plain, ckpt):  # features() too: its hooks must stay inactive while blocks are recomputed
        loss = model.velocity(x, sigma, cond).square().mean() + model.features(x, sigma, cond, [0])[0].mean()
        loss.backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_velocity_matches_flow_training_target_convention():
    """A perfect model of one point would output eps - x: check the adapter does not flip that sign."""
    model = ZImageBackbone.from_config(tiny_transformer_config(), seed=2)
    x0, eps = torch.randn(4, 16, 8, 8), torch.randn(4, 16, 8, 8)
    sigma = torch.rand(4)
    cond = make_cond(4)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss = (model.velocity(flow.add_noise(x0, eps, sigma), sigma, cond) - flow.velocity_target(x0, eps)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        raw = torch.stack(model.transformer(list(flow.add_noise(x0, eps, sigma).unsqueeze(2).unbind(0)), 1 - sigma,
                                            cond.to_list(), return_dict=False)[0]).squeeze(2)
    # the raw Z-Image output has learned x - eps (its own convention), i.e. minus our target
    assert torch.nn.functional.cosine_similarity(raw.flatten(), (x0 - eps).flatten(), dim=0) > 0.5


def test_bad_config_and_bad_folder_are_clear_errors(tmp_path):
    with pytest.raises(TwostepError, match="invalid Z-Image transformer config"):
        ZImageBackbone.from_config(dict(tiny_transformer_config(), axes_dims=[1, 1, 1]))
    with pytest.raises(TwostepError, match="cannot load a Z-Image transformer"):
        ZImageBackbone.from_pretrained(str(tmp_path))


def test_from_pretrained_loads_pipeline_folder(tiny_pipeline_dir):
    model = ZImageBackbone.from_pretrained(tiny_pipeline_dir, dtype=torch.float32)
    assert model.in_channels == 16 and model.cap_feat_dim == 32
