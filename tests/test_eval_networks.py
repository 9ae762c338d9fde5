"""The standard scoring networks through their libraries, with random weights of the real architectures
(torch-fidelity's Inception-v3, open_clip's CLIP): feature shapes, weight checks, FID / sFID / IS / KID /
precision-recall end to end on a sample folder, HPS v2.1's preprocessing and CLIPScore on a text protocol.

Needs the ``eval`` extra (torch-fidelity, open_clip_torch, torchvision); CI installs it. Without it
these tests are skipped with the reason shown in pytest's summary."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

torch_fidelity = pytest.importorskip("torch_fidelity", reason="the eval extra (torch-fidelity) is not installed")
open_clip = pytest.importorskip("open_clip", reason="the eval extra (open_clip_torch) is not installed")

from diffusers import DDIMScheduler, DiTTransformer2DModel  # noqa: E402
from PIL import Image  # noqa: E402
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3  # noqa: E402

import emag  # noqa: E402
from emag import metrics as M  # noqa: E402
from emag.evaluation import plan_sampling, run_sampling  # noqa: E402
from emag.evaluation import weights as W  # noqa: E402
from emag.evaluation.networks import CLIPScorer, InceptionExtractor  # noqa: E402
from emag.evaluation.scoring import score_folder  # noqa: E402
from tiny_models import randomize_, tiny_vae  # noqa: E402


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory) -> Path:
    """A weights file for torch-fidelity's Inception with random weights that give usable features:
    Kaiming-normal convolutions, then every batch norm calibrated on one batch (the default init makes
    the features vanish)."""
    orig = FeatureExtractorInceptionV3.load_state_dict
    FeatureExtractorInceptionV3.load_state_dict = lambda self, sd, strict=True: None  # keep the random init
    try:
        import torch_fidelity.feature_extractor_inceptionv3 as fe

        url_loader = fe.load_state_dict_from_url
        fe.load_state_dict_from_url = lambda *a, **k: {}
        try:
            model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"])
        finally:
            fe.load_state_dict_from_url = url_loader
    finally:
        FeatureExtractorInceptionV3.load_state_dict = orig
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight)
    with torch.no_grad():  # calibrate: in training mode every BN normalises by its input batch's statistics;
        for m in model.modules():  # with momentum None one pass stores exactly those as the running ones
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None
        model.train()
        model(torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8))
        model.eval()
    path = tmp_path_factory.mktemp("weights") / "inception-random.pth"
    torch.save(model.state_dict(), path)
    return path


def test_inception_features_have_the_standard_shapes(inception_file):
    net = InceptionExtractor(inception_file)
    images = np.random.default_rng(0).integers(0, 256, size=(3, 40, 56, 3), dtype=np.uint8)  # any size: resized to 299
    out = net(images)
    assert out["features"].shape == (3, 2048) and out["logits_unbiased"].shape == (3, 1008)
    assert out["spatial"].shape == (3, 7 * 17 * 17)
    assert out["features"].std(axis=0).mean() > 1e-3  # the random network's features do not vanish
    grey = net(images[..., :1])["features"]  # one channel is repeated to RGB
    rgb = net(np.repeat(images[..., :1], 3, axis=3))["features"]
    np.testing.assert_array_equal(grey, rgb)
    assert len(net.fingerprint()) == 64


def test_weight_files_are_checked_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(FileNotFoundError, match="weights-inception-2015-12-05-6726825d.pth was not found.*--weights-dir"):
        W.locate(W.INCEPTION, tmp_path)
    (tmp_path / W.INCEPTION.name).write_bytes(b"a partial download")
    with pytest.raises(ValueError, match="sha256 does not start with 6726825d"):
        W.locate(W.INCEPTION, tmp_path)
    with pytest.raises(FileNotFoundError, match="hf download xswu/HPSv2"):
        W.locate(W.HPS_V21, tmp_path)
    (tmp_path / "vit_large_patch14_clip_224.openai").mkdir()
    (tmp_path / "vit_large_patch14_clip_224.openai" / "open_clip_pytorch_model.bin").write_bytes(b"x")
    assert W.locate(W.CLIP_L14, tmp_path).name == "open_clip_pytorch_model.bin"


def _ten_class_dit(folder: Path) -> Path:
    torch.manual_seed(0)
    tr = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
                               sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_type="ada_norm_zero")
    pipe = emag.DiTEMAGPipeline(transformer=randomize_(tr, 0).eval(), vae=tiny_vae(4, 0, sd3=False),
                                scheduler=DDIMScheduler(clip_sample=False))
    pipe.save_pretrained(folder)
    return folder


def test_imagenet_protocol_scored_with_inception_against_an_adm_reference_batch(tmp_path, inception_file):
    model = _ten_class_dit(tmp_path / "dit")
    plan = plan_sampling(str(model), "imagenet", num_samples=10, batch_size=5, method="cfg", guidance_scale=1.5,
                         num_inference_steps=2)
    out = tmp_path / "run"
    run_sampling(plan, out)
    net = InceptionExtractor(inception_file)
    rng = np.random.default_rng(1)
    ref_images = rng.integers(0, 256, size=(8, 16, 16, 3), dtype=np.uint8)
    ref_feats = net(ref_images)
    mu, sigma = ref_feats["features"].mean(0) + 0.01, np.cov(ref_feats["features"], rowvar=False)
    mu_s, sigma_s = ref_feats["spatial"].mean(0), np.cov(ref_feats["spatial"], rowvar=False)
    npz = tmp_path / "VIRTUAL_test.npz"
    np.savez(npz, arr_0=ref_images, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    res = score_folder(out, extractor=net, reference=npz, k=3, kid_subset_size=5, is_splits=2,
                       cache_dir=tmp_path / "cache")
    m = res["metrics"]
    assert {"fid", "sfid", "is", "is_std", "kid", "kid_std", "precision", "recall", "density", "coverage"} <= set(m)
    # independently: the sample PNGs through the network, the npz's own statistics, emag.metrics
    samples = np.stack([np.asarray(Image.open(out / f"{i:06d}.png").convert("RGB")) for i in range(10)])
    feats = net(samples)
    assert m["fid"] == pytest.approx(M.frechet_distance(mu, sigma, feats["features"].mean(0),
                                                        np.cov(feats["features"], rowvar=False)), rel=1e-6)
    assert m["sfid"] == pytest.approx(M.frechet_distance(mu_s, sigma_s, feats["spatial"].mean(0),
                                                         np.cov(feats["spatial"], rowvar=False)), rel=1e-6)
    for key, v in M.prdc(ref_feats["features"], feats["features"], k=3).items():
        assert m[key] == pytest.approx(v, abs=1e-12)
    isc = torch_fidelity.metric_isc.isc_features_to_metric(torch.from_numpy(feats["logits_unbiased"]), splits=2)
    assert m["is"] == pytest.approx(isc["inception_score_mean"], rel=1e-9)
    assert res["reference"]["policy"] == "ADM reference batch as stored" and res["prdc_k"] == 3
    assert res["versions"]["torch-fidelity"] == torch_fidelity.__version__
    assert json.loads((out / "results.json").read_text())["metrics"] == m


def test_fid_of_a_set_against_itself_is_zero_and_against_a_shifted_set_larger(tmp_path, inception_file):
    model = _ten_class_dit(tmp_path / "dit")
    plan = plan_sampling(str(model), "imagenet", num_samples=10, batch_size=10, method="cfg", num_inference_steps=2)
    out = tmp_path / "run"
    run_sampling(plan, out)
    same, shifted = tmp_path / "same", tmp_path / "shifted"
    same.mkdir()
    shifted.mkdir()
    for i in range(10):
        im = np.asarray(Image.open(out / f"{i:06d}.png").convert("RGB"))
        Image.fromarray(im).save(same / f"{i}.png")
        Image.fromarray(np.clip(im.astype(int) + 60, 0, 255).astype(np.uint8)).save(shifted / f"{i}.png")
    size = Image.open(out / "000000.png").size[0]
    net = InceptionExtractor(inception_file)
    itself = score_folder(out, extractor=net, reference=same, reference_size=size, k=3, kid_subset_size=5, is_splits=2)
    other = score_folder(out, extractor=net, reference=shifted, reference_size=size, k=3, kid_subset_size=5, is_splits=2)
    # identical features; what is left is the matrix square root's rounding on a rank-deficient covariance
    # (10 samples, 2048 dimensions)
    assert abs(itself["metrics"]["fid"]) < 1e-3 * other["metrics"]["fid"]
    assert itself["metrics"]["precision"] == itself["metrics"]["recall"] == 1.0
    assert itself["reference"]["policy"] == f"centre crop to a square, Lanczos resize to {size}x{size}"


def test_hps_and_clip_score_with_random_clip_weights(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(3, 64, 48, 3), dtype=np.uint8)
    prompts = ["a red fox", "a lighthouse", "a bowl of fruit"]
    hps = CLIPScorer("hps", None, model_name="ViT-B-32", random_weights=True)  # a real open_clip architecture
    s = hps(images, prompts)["hps"]
    assert s.shape == (3,) and np.all(np.abs(s) <= 1)
    # hpsv2's preprocessing, written out: ToTensor, Resize(224, bicubic) on the tensor, CenterCrop, Normalize
    from torchvision.transforms import functional as TF

    t = TF.to_tensor(Image.fromarray(images[0]))
    t = TF.center_crop(TF.resize(t, 224, interpolation=TF.InterpolationMode.BICUBIC), 224)
    t = TF.normalize(t, [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])
    torch.testing.assert_close(hps.preprocess(Image.fromarray(images[0])), t)
    with torch.no_grad():
        img = hps.model.encode_image(t[None])
        txt = hps.model.encode_text(hps.tokenizer([prompts[0]]))
    assert s[0] == pytest.approx(float(torch.nn.functional.cosine_similarity(img.double(), txt.double())), abs=1e-6)
    clip = CLIPScorer("clip_score", None, model_name="ViT-B-32", random_weights=True)
    c = clip(images, prompts)["clip_score"]
    assert c.shape == (3,) and np.all((c >= 0) & (c <= 100))
    with pytest.raises(ValueError, match="class labels"):
        clip(images, [1, 2, 3])


def test_hps_runs_on_the_real_vit_h_14_architecture():
    """HPS v2.1's own architecture (open_clip ViT-H-14, ~1B parameters) with random weights: ~20 s here."""
    hps = CLIPScorer("hps", None, random_weights=True)
    assert hps.model_name == "ViT-H-14" and sum(p.numel() for p in hps.model.parameters()) > 9e8
    s = hps(np.random.default_rng(0).integers(0, 256, size=(2, 64, 64, 3), dtype=np.uint8), ["a fox", "a dog"])["hps"]
    assert s.shape == (2,) and np.all(np.abs(s) <= 1)
