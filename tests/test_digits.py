"""The bundled digits DiT and digit classifier: loading, reproducibility, class-correctness, EMAG."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import emag
from emag import metrics
from emag.digits import (
    CLASS_NAMES,
    DEFAULT_EMAG_LAYERS,
    NULL_CLASS,
    bundled_model_path,
    load_digits_pipeline,
)
from emag.digits import classifier as digit_classifier
from emag.digits.data import load_images, to_model_range, train_heldout_split
from emag.digits.reference import PROTOCOL, reference_samples, sample_statistics


@pytest.fixture(scope="module")
def pipe():
    return load_digits_pipeline()


@pytest.fixture(scope="module")
def reference():
    return json.loads((bundled_model_path() / "reference_stats.json").read_text())


# ------------------------------------------------------------------------------------------------
# data


def test_data_range_shape_and_split():
    images, labels = load_images()
    assert images.shape == (1797, 1, 8, 8) and images.dtype == torch.float32
    assert float(images.min()) == -1.0 and float(images.max()) == 1.0
    assert sorted(set(labels.tolist())) == list(range(10))
    assert torch.equal(to_model_range(np.array([[[0, 8, 16]]])), torch.tensor([[[[-1.0, 0.0, 1.0]]]]))
    train, held = train_heldout_split(labels, 0.2, seed=0)
    assert len(np.intersect1d(train, held)) == 0 and len(train) + len(held) == 1797
    t2, h2 = train_heldout_split(labels, 0.2, seed=0)
    assert np.array_equal(held, h2) and np.array_equal(train, t2)
    counts = np.bincount(labels.numpy()[held], minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38  # stratified: ~20 % of every class


# ------------------------------------------------------------------------------------------------
# the bundled model


def test_bundled_files_are_present_and_small():
    folder = bundled_model_path()
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    assert weights.is_file() and weights.stat().st_size < 8 * 2**20
    for name in ("model_index.json", "scheduler/scheduler_config.json", "transformer/config.json",
                 "loss_curve.png", "losses.csv", "reference_stats.json"):
        assert (folder / name).is_file(), name
    assert (digit_classifier.bundled_classifier_path() / "model.safetensors").is_file()


def test_bundled_pipeline_loads_with_from_pretrained(pipe):
    loaded = emag.DiTEMAGPipeline.from_pretrained(str(bundled_model_path()))
    assert type(loaded).__name__ == "DiTEMAGPipeline" and loaded.vae is None
    cfg = loaded.transformer.config
    assert (cfg.in_channels, cfg.out_channels, cfg.sample_size, cfg.patch_size) == (1, 1, 8, 1)
    assert cfg.num_layers == 8 and cfg.num_embeds_ada_norm == NULL_CLASS == 10
    assert loaded.null_class == 10
    assert loaded.get_label_ids(["three", "seven"]) == [3, 7]
    assert loaded.scheduler.config.beta_schedule == "linear"
    assert loaded.scheduler.config.beta_start == pytest.approx(1e-4)
    assert loaded.scheduler.config.beta_end == pytest.approx(0.02)
    assert loaded.scheduler.config.num_train_timesteps == 1000
    assert {name: loaded.labels[name] for name in CLASS_NAMES} == {name: i for i, name in enumerate(CLASS_NAMES)}
    assert not loaded.transformer.training


def test_reference_statistics_are_reproduced(pipe, reference):
    assert reference["protocol"] == json.loads(json.dumps(PROTOCOL))
    for key, with_emag in (("cfg", False), ("emag", True)):
        stats = sample_statistics(reference_samples(pipe, with_emag=with_emag))
        want = reference[key]
        assert stats["num_images"] == want["num_images"]
        # float32 rounding across machines / thread counts moves these by ~1e-6; a 0.1 % perturbation
        # of the weights moves them by ~1e-3
        np.testing.assert_allclose(stats["image_means"], want["image_means"], atol=5e-4, rtol=0, err_msg=key)
        np.testing.assert_allclose(stats["mean_image"], want["mean_image"], atol=5e-4, rtol=0, err_msg=key)
        assert stats["pixel_mean"] == pytest.approx(want["pixel_mean"], abs=5e-4)
        assert stats["pixel_std"] == pytest.approx(want["pixel_std"], abs=5e-4)
        # predictions may flip only for a sample sitting on a decision boundary
        same = np.mean(np.array(stats["predicted_classes"]) == np.array(want["predicted_classes"]))
        assert same >= 0.95, key


def test_cfg_samples_show_the_requested_class(pipe):
    labels = [c for c in range(10) for _ in range(5)]
    images = pipe(class_labels=labels, num_inference_steps=20, guidance_scale=3.0,
                  generator=torch.Generator().manual_seed(123), output_type="pt").images
    assert images.shape == (50, 1, 8, 8)
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    acc = metrics.classifier_accuracy(digit_classifier.predict(images, value_range=(0, 1)), labels)
    assert acc >= 0.9, acc


def test_emag_runs_on_the_bundled_model_and_changes_the_output(pipe):
    labels = list(range(10))
    kw = dict(class_labels=labels, num_inference_steps=10, guidance_scale=3.0, output_type="pt")
    base = pipe(generator=torch.Generator().manual_seed(5), **kw).images
    cfg = emag.EMAG(scale=2.0, layers=list(DEFAULT_EMAG_LAYERS), ema_window=(0.0, 1.0), apply_window=(0.2, 1.0))
    guided = pipe(generator=torch.Generator().manual_seed(5), emag=cfg, **kw).images
    assert torch.isfinite(guided).all()
    assert (guided - base).abs().max() > 1e-2
    assert pipe.emag_trace  # EMAG was active (the trace lists what it did per step)
    acc = metrics.classifier_accuracy(digit_classifier.predict(guided, value_range=(0, 1)), labels)
    assert acc >= 0.8
    # the neutral EMAG scale reproduces plain CFG on the same row layout
    neutral = emag.EMAG(scale=1.0, layers=list(DEFAULT_EMAG_LAYERS), ema_window=(0.0, 1.0), apply_window=(0.2, 1.0))
    same = pipe(generator=torch.Generator().manual_seed(5), emag=neutral, **kw).images
    plain = pipe(generator=torch.Generator().manual_seed(5), noise_layout="samples", **kw).images
    assert torch.allclose(same, plain, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# the classifier


def test_classifier_config_and_heldout_accuracy():
    cfg = digit_classifier.read_config()
    assert cfg["heldout_accuracy"] >= 0.95
    images, labels = load_images()
    _, held = train_heldout_split(labels, cfg["split"]["heldout_fraction"], cfg["split"]["seed"])
    acc = metrics.classifier_accuracy(digit_classifier.predict(images[held]), labels[held])
    assert acc == pytest.approx(cfg["heldout_accuracy"], abs=1e-6)


def test_classifier_features_and_value_ranges():
    images, labels = load_images()
    x = images[:64]
    f = digit_classifier.features(x)
    assert f.shape == (64, cfg_feature_dim()) and f.dtype == torch.float32
    # the same images given in [0, 1] give the same features
    f01 = digit_classifier.features((x + 1) / 2, value_range=(0, 1))
    assert torch.allclose(f, f01, atol=1e-5)
    assert torch.equal(digit_classifier.predict(x), digit_classifier.logits(x).argmax(1))


def cfg_feature_dim():
    return digit_classifier.read_config()["architecture"]["feature_dim"]


def test_real_data_metrics_sanity():
    """Real vs real: FD ~0 for a split of the data with itself, PRDC near 1; noise is far away."""
    images, labels = load_images()
    f = digit_classifier.features(images)
    a, b = f[::2], f[1::2]
    fd_same = metrics.frechet_distance_from_features(a, b)
    noise = digit_classifier.features(torch.rand(900, 1, 8, 8) * 2 - 1)
    fd_noise = metrics.frechet_distance_from_features(a, noise)
    assert fd_same < 0.1 * fd_noise
    p = metrics.prdc(a, b, k=5)
    assert p["precision"] > 0.8 and p["recall"] > 0.8
    assert p["density"] > 0.8 and p["coverage"] > 0.8
    # noise: density and coverage collapse. (k-NN precision does not: the large balls of real outliers
    # swallow about half of the noise features here, the weakness density/coverage were designed for.)
    q = metrics.prdc(a, noise, k=5)
    assert q["density"] < 0.3 and q["coverage"] < 0.1 and q["recall"] < 0.1
