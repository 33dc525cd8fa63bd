"""Real-model evaluation (issue 13): ``twostep evaluate`` and ``train.eval_every`` on the tiny random ZImagePipeline,
with tiny random CLIP / DINOv2 / preference models saved locally and loaded through the same ``from_pretrained``
path as their hub ids; FD and KID checked against reference computations on known Gaussians."""

import json
import math
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from twostep.cli import DEFAULT_ZIMAGE_CONFIG, main
from twostep.real.evaluation import metrics as M
from twostep.testing import save_tiny_clip, save_tiny_dinov2

RES = 32  # tiny VAE downsamples 2x: latents (16, 16, 16)
PROMPTS = ["a red cat on a sofa", "a photo of a small house", "the city at night"]
TRAIN = ["train.steps=2", "train.batch_size=2", "train.warmup_steps=1", "train.d_warmup_steps=0", "train.sample_every=2",
         "train.checkpoint_every=2", "train.bf16=false", "model.dtype=float32", "discriminator.blocks=[0,1]",
         "discriminator.hidden=16", "student.lora_rank=4", "student.lora_alpha=8", "train.g_lr=0.01"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny pipeline, a student trained 2 steps on it, its diffusers export, and tiny metric models."""
    from twostep.testing import tiny_zimage_pipeline

    root = tmp_path_factory.mktemp("evaluate")
    pipe = str(root / "pipe")
    tiny_zimage_pipeline(seed=0).save_pretrained(pipe)
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    data, run, export = str(root / "data"), str(root / "run"), str(root / "export")
    assert main(["teacher-data", "--teacher", pipe, "--prompts", str(prompts), "--resolution", str(RES), "--out", data,
                 "teacher_data.shard_size=4", "teacher_data.batch_size=2", "teacher_data.previews=0"]) == 0
    assert main(["train", "--config", DEFAULT_ZIMAGE_CONFIG, "--data", data, "--out", run, *TRAIN]) == 0
    assert main(["export", run, "--format", "diffusers", "--out", export, "--dtype", "float32"]) == 0
    real = root / "real"
    real.mkdir()
    from PIL import Image

    gen = np.random.default_rng(0)
    for i in range(4):  # reference "real" images of another size: evaluate centre-crops and resizes them
        Image.fromarray(gen.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(real / f"{i}.png")
    models = {"clip": save_tiny_clip(str(root / "clip"), seed=1), "dino": save_tiny_dinov2(str(root / "dino"), seed=2),
              "pref": save_tiny_clip(str(root / "pref"), seed=3)}
    return {"root": root, "pipe": pipe, "prompts": str(prompts), "data": data, "run": run, "export": export,
            "real": str(real), **models}


def _models(world, preference=None):
    return [f"models.clip={world['clip']}", f"models.dino={world['dino']}",
            f"models.preference={preference or world['pref']}", "models.preference_processor="]


# --------------------------------------------------------------------------- FD and KID against references


def _gaussian_samples(n, mean, cov, seed):
    """``n`` samples whose sample mean and unbiased covariance are exactly ``mean`` and ``cov``."""
    z = np.random.default_rng(seed).standard_normal((n, len(mean)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # whiten: cov(z) = I exactly
    return torch.from_numpy(z @ np.linalg.cholesky(cov).T + mean)


def _spd(d, seed):
    a = np.random.default_rng(seed).standard_normal((d, d))
    return a @ a.T / d + 0.5 * np.eye(d)


def test_fd_is_the_closed_form_distance_between_the_fitted_gaussians():
    from scipy.linalg import sqrtm

    d = 6
    mu1, mu2 = np.zeros(d), np.linspace(-1, 2, d)
    s1, s2 = _spd(d, 1), _spd(d, 2)
    root1 = sqrtm(s1).real
    reference = float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * sqrtm(root1 @ s2 @ root1).real))
    fd = M.frechet_distance(_gaussian_samples(300, mu1, s1, 3), _gaussian_samples(200, mu2, s2, 4))
    assert fd == pytest.approx(reference, rel=1e-6)
    # diagonal covariances: FD = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    a, b = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 1.0, 9.0])
    fd = M.frechet_distance(_gaussian_samples(100, np.zeros(3), a, 5), _gaussian_samples(100, np.ones(3), b, 6))
    assert fd == pytest.approx(3 + 1 + 1 + 0, rel=1e-6)
    assert M.frechet_distance(*(2 * [_gaussian_samples(50, mu1, s1, 7)])) == pytest.approx(0, abs=1e-6)


def _moments(mu, cov):
    """Second and third raw moments of N(mu, cov): E[x x^T] and E[x_a x_b x_c]."""
    second = cov + np.outer(mu, mu)
    third = (np.einsum("a,b,c->abc", mu, mu, mu) + np.einsum("a,bc->abc", mu, cov) + np.einsum("b,ac->abc", mu, cov)
             + np.einsum("c,ab->abc", mu, cov))
    return second, third


def _expected_kernel(p, q, d):
    """E k(x, y) for independent x ~ p, y ~ q, k(x, y) = (x.y / d + 1)^3 expanded in moments."""
    (mu_p, cov_p), (mu_q, cov_q) = p, q
    m2p, m3p = _moments(mu_p, cov_p)
    m2q, m3q = _moments(mu_q, cov_q)
    e1, e2, e3 = mu_p @ mu_q, np.sum(m2p * m2q), np.sum(m3p * m3q)
    return 1 + 3 * e1 / d + 3 * e2 / d ** 2 + e3 / d ** 3


def test_kid_is_the_unbiased_mmd_and_estimates_the_gaussians_population_value():
    d = 3
    p, q = (np.zeros(d), np.eye(d)), (np.array([1.0, -0.5, 0.5]), np.diag([0.5, 1.0, 2.0]))
    population = _expected_kernel(p, p, d) + _expected_kernel(q, q, d) - 2 * _expected_kernel(p, q, d)
    gen = np.random.default_rng(0)
    x = torch.from_numpy(gen.multivariate_normal(*p, size=2000))
    y = torch.from_numpy(gen.multivariate_normal(*q, size=2000))
    kid, std = M.kernel_distance(x, y, subset_size=500, subsets=20)
    assert kid == pytest.approx(population, rel=0.1) and 0 < std < population  # population MMD² 4.25
    same, _ = M.kernel_distance(x[:1000], x[1000:], subset_size=500, subsets=20)
    assert abs(same) < 0.05 * population  # unbiased: about 0 for one distribution
    # with one subset of every sample, KID is exactly the unbiased MMD^2 written out
    xs, ys = x[:40].numpy(), y[:40].numpy()
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    kxx, kyy, kxy = k(xs, xs), k(ys, ys), k(xs, ys)
    n = len(xs)
    mmd = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (n * (n - 1)) - 2 * kxy.mean()
    assert M.kernel_distance(x[:40], y[:40], subset_size=40, subsets=1)[0] == pytest.approx(mmd, rel=1e-9)


def test_paired_metrics_on_known_images():
    a = torch.randint(0, 240, (2, 3, 32, 32), dtype=torch.uint8)
    b = a + 10  # every pixel 10 levels off: MSE 100 of 255^2
    assert M.psnr(b, a).tolist() == pytest.approx([10 * math.log10(255 ** 2 / 100)] * 2, rel=1e-5)
    assert M.ssim(a, a).tolist() == pytest.approx([1.0, 1.0])
    assert (M.ssim(b, a) < 1).all() and M.sharpness_ratio(a, a) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        M.frechet_distance(torch.zeros(1, 4), torch.zeros(3, 4))  # one sample is not a distribution


# --------------------------------------------------------------------------- the metric models


def _sharp_images(n, seed):
    """Sharp patterns of the detail world (stripes, checkerboards, edges), 16 -> 32 px, as uint8."""
    from twostep.offline.detail.data import NUM_CLASSES, generate

    images = generate(torch.arange(n) % NUM_CLASSES, torch.Generator().manual_seed(seed))
    images = torch.nn.functional.interpolate(images, scale_factor=2, mode="nearest")
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _blur(images, passes=2):
    x = images.float()
    kernel = torch.tensor([1.0, 2.0, 1.0]) / 4
    kernel = (kernel[:, None] * kernel[None, :]).expand(3, 1, 3, 3)
    for _ in range(passes):
        x = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    return x.round().clamp(0, 255).to(torch.uint8)


def test_blur_orders_sharpness_fd_and_kid_teacher_above_blurred_teacher(world):
    """The bar: against a reference set of teacher-like images, the sharp set scores better than the same set
    blurred on sharpness, on FD (DINOv2 and CLIP features) and on KID."""
    from twostep.real.evaluation.feature_models import ClipModel, DinoModel

    teacher, reference = _sharp_images(60, seed=1), _sharp_images(60, seed=2)
    blurred = _blur(teacher)
    assert M.sharpness_ratio(teacher, reference) > 0.8
    assert M.sharpness_ratio(blurred, reference) < 0.5 * M.sharpness_ratio(teacher, reference)
    for model in (DinoModel(world["dino"]), ClipModel(world["clip"])):
        feats = model.features if isinstance(model, DinoModel) else model.image_embeds
        t, b, r = feats(teacher), feats(blurred), feats(reference)
        assert M.frechet_distance(t, r) < M.frechet_distance(b, r), type(model).__name__
        assert M.kernel_distance(t, r, subsets=20)[0] < M.kernel_distance(b, r, subsets=20)[0], type(model).__name__


def test_clip_score_agrees_with_torchmetrics_clipscore(world):
    """Our CLIP score is torchmetrics' CLIPScore, given a model whose feature calls return tensors (transformers 4's
    API, which torchmetrics 1.9 reads)."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    from twostep.real.evaluation.feature_models import ClipModel

    ours = ClipModel(world["clip"])

    class Tensors(torch.nn.Module):  # transformers 5 wraps the embeddings in an output object
        def __init__(self, model):
            super().__init__()
            self.model, self.config = model, model.config

        def get_image_features(self, pixel_values):
            return self.model.get_image_features(pixel_values=pixel_values).pooler_output

        def get_text_features(self, input_ids, attention_mask):
            return self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output

    class Processor:
        def __call__(self, images=None, text=None, **kwargs):
            if images is not None:
                return ours.image_processor(images=[i.permute(1, 2, 0).numpy() for i in images], return_tensors="pt")
            return ours.tokenizer(text, padding=True, return_tensors="pt")

    images = torch.randint(0, 256, (4, 3, 40, 40), dtype=torch.uint8)
    prompts = ["a red cat", "a photo of a house", "the city at night", "a blue tree"]
    reference = CLIPScore(model_name_or_path=lambda: (Tensors(ours.model), Processor()))
    reference.update(images, prompts)
    sims = M.clip_similarity(ours.image_embeds(images), ours.text_embeds(prompts))
    assert M.clip_score(sims) == pytest.approx(float(reference.compute()), abs=1e-4)
    assert M.clip_score(sims - 1000) == 0.0  # floored at 0, as torchmetrics


def test_missing_metric_model_is_one_error_naming_it(tmp_path):
    from twostep.real.evaluation.feature_models import ClipModel, MetricModelUnavailable, check_available

    with pytest.raises(MetricModelUnavailable, match="'nobody/no-such-clip'"):
        check_available("CLIP", "nobody/no-such-clip")
    with pytest.raises(MetricModelUnavailable, match="local folder"):
        ClipModel(str(tmp_path))


def test_builtin_prompt_sets_ship_with_their_source_and_licence():
    from twostep.core.prompts import read_prompts
    from twostep.real.evaluation.prompt_sets import FOLDER, resolve_prompt_file

    smoke, parti = read_prompts(resolve_prompt_file("builtin:smoke")), read_prompts(resolve_prompt_file("builtin:parti"))
    assert len(smoke) == 16 == len(set(smoke)) and len(parti) == 204
    source = open(os.path.join(FOLDER, "SOURCE.md"), encoding="utf-8").read()
    assert "Apache License 2.0" in source and "google-research/parti" in source
    assert "Apache License" in open(os.path.join(FOLDER, "LICENSE.PartiPrompts"), encoding="utf-8").read()
    assert resolve_prompt_file("prompts.txt") == "prompts.txt"


# --------------------------------------------------------------------------- twostep evaluate


SAMPLER_KEYS = {"seconds_per_image", "decode_seconds_per_image", "clip_score", "preference", "sharpness_ratio",
                "fd_dino_real", "kid_dino_real", "fd_clip_real", "kid_clip_real"}
TO_TEACHER = {"psnr", "ssim", "fd_dino", "kid_dino", "fd_clip", "kid_clip"}


def test_evaluate_writes_report_html_md_and_metrics_with_every_metric(world, capsys):
    from twostep.real.pipeline import generate_images, load_two_step_pipeline

    out = world["root"] / "eval_export"
    assert main(["evaluate", "--model", world["export"], "--teacher", world["pipe"], "--prompts", world["prompts"],
                 "--out", str(out), "--real", world["real"], "shard_size=2", *_models(world)]) == 0
    assert "report.html" in capsys.readouterr().out
    result = json.load(open(out / "metrics.json"))
    rows = result["samplers"]
    for name in ("teacher", "naive", "student"):
        missing = (SAMPLER_KEYS | (TO_TEACHER if name != "teacher" else set())) - {k for k, v in rows[name].items()
                                                                                    if v is not None}
        assert not missing, f"{name} lacks {missing}"
    assert [rows[n]["steps"] for n in ("teacher", "naive", "student")] == [8, 2, 2]
    assert rows["teacher"]["sharpness_ratio"] == 1.0 and result["skipped"] == {}
    assert result["speedup"] > 1  # 2 steps against 8, timed in one process
    assert len(result["per_sample"]) == 3 and len(result["worst_prompts"]) == 3
    assert result["worst_prompts"][0]["psnr_student"] <= result["worst_prompts"][-1]["psnr_student"]

    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    for text in (md, page):
        assert "FD-DINOv2 → teacher" in text and "PSNR → teacher" in text and "PickScore" in text
        assert "Worst prompts" in text and "torchmetrics" in text
    for grid in result["grids"].values():
        assert (out / grid).is_file() and grid in md and grid in page

    # the student column is exactly what `twostep generate` draws for the same prompt and seed
    shard = load_file(str(out / "shard-00000.safetensors"))
    pipe, switch = load_two_step_pipeline(world["export"], device="cpu")
    generated = generate_images(pipe, switch, PROMPTS[:2], seed=0, resolution=RES)
    for i, image in enumerate(generated):
        diff = np.abs(np.asarray(image, dtype=np.int16) - shard["student"][i].permute(1, 2, 0).numpy())
        assert diff.max() <= 1, f"sample {i}"
    assert not torch.equal(shard["student"], shard["teacher"])

    # the teacher and naive columns are the stock pipeline without any adapter: 8 steps, and the student's 2 sigmas
    from diffusers import ZImagePipeline

    from twostep.families.zimage.model_card import pipeline_sigmas

    plain = ZImagePipeline.from_pretrained(world["pipe"])
    plain.set_progress_bar_config(disable=True)
    naive_sigmas = pipeline_sigmas([1.0, 0.75], 3.0)
    for column, kwargs in (("teacher", {"num_inference_steps": 8}), ("naive", {"sigmas": naive_sigmas})):
        for i, prompt in enumerate(PROMPTS[:2]):
            image = plain(prompt, height=RES, width=RES, guidance_scale=0.0,
                          generator=torch.Generator("cpu").manual_seed(i), **kwargs).images[0]
            diff = np.abs(np.asarray(image, dtype=np.int16) - shard[column][i].permute(1, 2, 0).numpy())
            assert diff.max() <= 1, f"{column} sample {i}"
    assert not torch.equal(shard["naive"], shard["student"])

    # on the chain's own images: blurring the student's samples lowers its sharpness score below the unblurred one
    student = shard["student"]
    blurred = torch.nn.functional.avg_pool2d(student.float(), 3, stride=1, padding=1,
                                             count_include_pad=False).round().to(torch.uint8)
    assert M.sharpness_ratio(blurred, shard["teacher"]) < 0.8 * M.sharpness_ratio(student, shard["teacher"])

    # PickScore's processor is a separate repository: a missing one skips the preference score, nothing else
    models = [a for a in _models(world) if not a.startswith("models.preference_processor")]
    assert main(["evaluate", "--model", world["export"], "--teacher", world["pipe"], "--prompts", world["prompts"],
                 "--out", str(out), "--real", world["real"], "shard_size=2", *models,
                 "models.preference_processor=nobody/no-such-processor"]) == 0
    again = json.load(open(out / "metrics.json"))
    assert "nobody/no-such-processor" in again["skipped"]["preference"]
    assert again["samplers"]["student"]["psnr"] == rows["student"]["psnr"]


def test_evaluate_resumes_by_shard_and_skips_a_missing_preference_model(world, monkeypatch, capsys):
    """Interrupted after one shard, the rerun makes only the missing ones (and remakes a damaged one); the result
    is the uninterrupted run's. A preference model that cannot load is reported and skipped."""
    from twostep.real.evaluation.sampling import Samplers

    calls = []
    original = Samplers.sample

    def counted(self, name, embed, noise):
        calls.append(name)
        if stop_after is not None and len(calls) > stop_after:
            raise KeyboardInterrupt
        return original(self, name, embed, noise)

    monkeypatch.setattr(Samplers, "sample", counted)
    out = world["root"] / "eval_resume"
    command = ["evaluate", "--model", world["run"], "--prompts", world["prompts"], "--out", str(out), "shard_size=1",
               *_models(world, preference="nobody/no-such-pickscore")]
    stop_after = 3 + 3  # the warm-up, then shard 0
    assert main(command) == 130
    manifest = json.load(open(out / "manifest.json"))
    assert list(manifest["shards"]) == ["shard-00000.safetensors"] and not manifest["complete"]
    first = os.stat(out / "shard-00000.safetensors").st_mtime_ns

    calls.clear()
    stop_after = None
    assert main(command) == 0
    assert len(calls) == 3 + 2 * 3  # warm-up + the two missing shards, three samplers each
    assert os.stat(out / "shard-00000.safetensors").st_mtime_ns == first
    result = json.load(open(out / "metrics.json"))
    assert "preference" in result["skipped"] and result["samplers"]["student"]["preference"] is None
    assert "nobody/no-such-pickscore" in (out / "report.md").read_text()

    damaged = out / "shard-00001.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-5])
    calls.clear()
    assert main(command) == 0
    assert len(calls) == 3 + 3
    again = json.load(open(out / "metrics.json"))
    assert again["per_sample"][1]["student"]["psnr"] == result["per_sample"][1]["student"]["psnr"]
    calls.clear()
    assert main(command) == 0 and calls == []  # complete: metrics and report only
    capsys.readouterr()

    # the same folder with another setting is refused, in one line, before anything is loaded or written
    before = {n: os.stat(out / n).st_mtime_ns for n in os.listdir(out) if n.endswith(".safetensors")}
    assert main([*command, "seed=7"]) == 2
    err = capsys.readouterr().err.strip()
    assert "seed=0" in err and "\n" not in err
    manifest = json.load(open(out / "manifest.json"))
    manifest["shards"]["shard-00000.safetensors"] = "forged"  # an untrusted manifest: refused, not a crash
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert main(command) == 2 and "not a twostep evaluation manifest" in capsys.readouterr().err
    assert before == {n: os.stat(out / n).st_mtime_ns for n in os.listdir(out) if n.endswith(".safetensors")}


def test_a_failing_training_evaluation_is_reported_and_training_goes_on(capsys):
    from twostep.real.evaluation.training import TrainingEvaluator

    evaluator = TrainingEvaluator.__new__(TrainingEvaluator)  # only __call__'s guard is under test

    def out_of_memory(student):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    evaluator._evaluate = out_of_memory
    assert evaluator(student=None) == {}
    assert "this evaluation failed (RuntimeError: CUDA out of memory" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["unknown builtin", "no model", "bad resolution", "missing clip", "bad key",
                                  "foreign out", "one real image", "bad teacher"])
def test_bad_inputs_are_one_line_errors_and_create_nothing(world, case, tmp_path, capsys):
    out = tmp_path / "out"
    args = {"--model": world["export"], "--prompts": world["prompts"], "--out": str(out)}
    extra = _models(world)
    if case == "unknown builtin":
        args["--prompts"] = "builtin:coco"
    elif case == "no model":
        args["--model"] = str(tmp_path / "nothing")
    elif case == "bad resolution":
        extra.append("resolution=30")
    elif case == "missing clip":
        extra.append("models.clip=nobody/no-such-clip")
    elif case == "bad key":
        extra.append("models.clap=x")
    elif case == "foreign out":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "one real image":
        (tmp_path / "real").mkdir()
        (tmp_path / "real" / "a.png").write_bytes(open(os.path.join(world["real"], "0.png"), "rb").read())
        args["--real"] = str(tmp_path / "real")
    elif case == "bad teacher":
        args["--teacher"] = world["data"]  # a folder, but no pipeline
    argv = ["evaluate"] + [x for kv in args.items() for x in kv] + extra
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("twostep: error: ") and "\n" not in err, err
    expected = {"unknown builtin": "builtin:coco", "no model": "nothing", "bad resolution": "resolution 30",
                "missing clip": "nobody/no-such-clip", "bad key": "models.clap", "foreign out": "not empty",
                "one real image": "at least 2", "bad teacher": "not a Z-Image pipeline"}[case]
    assert expected in err
    if case == "foreign out":
        assert os.listdir(out) == ["keep.txt"]
    else:
        assert not out.exists()


# --------------------------------------------------------------------------- during training


def test_eval_every_logs_metrics_with_ema_weights_and_survives_a_missing_model(world, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--config", DEFAULT_ZIMAGE_CONFIG, "--data", world["data"], "--out", str(run), *TRAIN,
                 "train.eval_every=1", f"evaluation.clip={world['clip']}", "evaluation.dino=nobody/no-such-dino",
                 "evaluation.count=3"]) == 0
    out = capsys.readouterr().out
    assert out.count("nobody/no-such-dino") == 1 and "left out of this run" in out
    evals = [r for r in map(json.loads, open(run / "train_log.jsonl")) if "eval/psnr" in r]
    assert [r["step"] for r in evals] == [1, 2]
    for record in evals:
        assert {"eval/psnr", "eval/ssim", "eval/sharpness_ratio", "eval/clip_score"} <= set(record)
        assert not any(k.startswith("eval/") and "dino" in k for k in record)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("eval/psnr")] == [1, 2]


def test_eval_every_refuses_a_bad_prompt_file_before_writing(world, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--config", DEFAULT_ZIMAGE_CONFIG, "--data", world["data"], "--out", str(run), *TRAIN,
                 "train.eval_every=1", f"evaluation.prompts={tmp_path / 'missing.txt'}"]) == 2
    assert "missing.txt" in capsys.readouterr().err and not run.exists()


def test_a_guided_teachers_rows_are_its_pipeline_at_its_guidance_and_the_students_is_not(world):
    """A student distilled from guided teacher data is measured against that teacher: the teacher and naive rows
    run the stock pipeline at the data's guidance and negative prompt, the student row one forward per step."""
    import dataclasses

    from diffusers import ZImagePipeline

    from twostep.real.evaluation.run import noise_for
    from twostep.real.evaluation.sampling import Samplers, read_student

    student = dataclasses.replace(read_student(world["export"]), guidance_scale=3.0, negative_prompt="a blurry photo")
    guided = Samplers(world["pipe"], student, torch.device("cpu"), torch.float32, RES, teacher_steps=8)
    plain = Samplers(world["pipe"], read_student(world["export"]), torch.device("cpu"), torch.float32, RES, 8)
    embed, negative = guided.encode([PROMPTS[0], "a blurry photo"])
    noise = noise_for(0, 0, guided.family.latent_shape(world["pipe"], RES))
    pipe = ZImagePipeline.from_pretrained(world["pipe"])
    reference = pipe(prompt_embeds=[embed], negative_prompt_embeds=[negative], guidance_scale=3.0, latents=noise,
                     num_inference_steps=8, height=RES, width=RES, output_type="latent").images
    teacher, _ = guided.sample("teacher", embed, noise)
    assert (teacher - reference.float()).abs().max() < 1e-4
    assert (plain.sample("teacher", embed, noise)[0] - teacher).abs().max() > 1e-3  # guidance moved it
    assert torch.equal(guided.sample("student", embed, noise)[0], plain.sample("student", embed, noise)[0])
