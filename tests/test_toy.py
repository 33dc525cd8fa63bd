import numpy as np
import pytest
import torch

from twostep.engine.backbone import Conditioning
from twostep.families.zimage.text import (
    build_local_tokenizer,
    build_tiny_qwen3,
    encode_prompts,
    load_prompt_embeds,
    save_prompt_embeds,
    words_of,
)
from twostep.offline.digits.data import balanced_labels, class_prompts, load_digit_splits
from twostep.offline.digits.evaluator import Evaluator, frechet_distance, per_prompt_diversity


@pytest.fixture(scope="module")
def splits():
    return load_digit_splits()


@pytest.fixture(scope="module")
def evaluator(splits):
    return Evaluator(*splits, seed=0)


def test_split_is_fixed_stratified_and_in_range(splits):
    train, heldout = splits
    assert len(train) + len(heldout) == 1797 and len(heldout) == 540
    assert train.images.shape[1:] == (1, 8, 8)
    assert train.images.min() == -1 and train.images.max() == 1
    assert torch.equal(load_digit_splits()[1].labels, heldout.labels)
    counts = torch.bincount(heldout.labels)
    assert counts.min() >= 50


def test_prompts_and_balanced_labels():
    prompts = class_prompts()
    assert prompts[3] == "a handwritten digit 3" and len(prompts) == 10
    assert balanced_labels(25).tolist()[:12] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]


def test_frechet_distance_properties():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2000, 8))
    b = rng.normal(size=(2000, 8))
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-6)
    assert frechet_distance(a, b) < 0.1
    assert frechet_distance(a, b + 1.0) == pytest.approx(8.0, rel=0.1)
    assert frechet_distance(a, 2 * b) == pytest.approx(8.0, rel=0.15)  # (2-1)^2 per dim


def test_diversity_zero_for_copies():
    feats = np.repeat(np.random.default_rng(0).normal(size=(1, 4)), 6, axis=0)
    assert per_prompt_diversity(feats, np.zeros(6, dtype=int)) == pytest.approx(0)


def test_evaluator_judges_real_digits_well_and_noise_badly(evaluator, splits):
    train, heldout = splits
    assert evaluator.heldout_accuracy > 0.9
    floor = evaluator.real_floor(500)
    noise = torch.rand(500, 1, 8, 8) * 2 - 1
    junk = evaluator.score(noise, balanced_labels(500))
    assert floor["fd_real"] < junk["fd_real"] / 10
    assert junk["class_accuracy"] < 0.35
    # a collapsed generator (one image per class) has no diversity
    idx = torch.stack([torch.nonzero(train.labels == c)[0, 0] for c in range(10)])
    collapsed = train.images[idx].repeat(50, 1, 1, 1)
    assert evaluator.score(collapsed, torch.arange(10).repeat(50))["diversity"] == pytest.approx(0, abs=1e-9)


def test_local_text_encoder_and_cache(tmp_path):
    prompts = class_prompts()
    tok = build_local_tokenizer(words_of(prompts))
    enc = build_tiny_qwen3(len(tok), hidden_size=16, num_layers=2, seed=0)
    feats = encode_prompts(tok, enc, prompts, max_length=32)
    assert len(feats) == 10 and feats[0].shape[1] == 16
    assert not torch.allclose(feats[3], feats[5]), "prompts must be distinguishable"
    path = str(tmp_path / "cache.safetensors")
    save_prompt_embeds(path, prompts, feats, provenance={"seed": 0})
    back_prompts, back_feats, prov = load_prompt_embeds(path)
    assert back_prompts == prompts and prov == {"seed": 0}
    for a, b in zip(feats, back_feats):
        torch.testing.assert_close(a, b)
    cond = Conditioning.from_list(back_feats)
    assert cond.mask.sum(1).tolist() == [f.shape[0] for f in feats]
    torch.testing.assert_close(cond.to_list()[2], feats[2])
