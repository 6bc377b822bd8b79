"""The artifact detector past a single model: --n-tta dihedral views and several --model_path files in val and
test mode, each head's probability averaged (tiny b0 detectors at 32 px, one epoch, random weights)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from test_multi_classification import train_argv
from torch import nn

import multi_classification as mc
import utils
from melanoma_audit import detector_inference
from melanoma_audit.checkpoints import load_checkpoint
from melanoma_audit.cli import ScoringRuntime
from melanoma_audit.detector_inference import ArtifactEnsemble, ArtifactPredictor
from melanoma_audit.image_files import list_images
from melanoma_audit.inference import TTAModel, dihedral
from melanoma_audit.synthetic_dataset import make_synthetic_dataset


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), n_train=36, n_test=11, image_size=64, seed=3)


@pytest.fixture(scope="module")
def detectors(synthetic, tmp_path_factory) -> list[Path]:
    """Two detectors that differ only in --seed, and so in their train/val split."""
    folder = tmp_path_factory.mktemp("detectors")
    paths = [folder / f"seed{seed}.pth" for seed in (0, 1)]
    for seed, path in zip((0, 1), paths, strict=True):
        mc.main([*train_argv(synthetic, path, epochs=1), "--seed", str(seed)])
    return paths


def scoring_argv(synthetic: Path, models: list[Path], save_path: Path, *extra: str) -> list[str]:
    argv = ["--img_path", str(synthetic / "test" / "test"), "--mode", "test", "--num_workers", "0"]
    return [*argv, "--model_path", *map(str, models), "--save_path", str(save_path), *extra]


class CornerHeads(nn.Module):
    """Three orientation-sensitive heads: the means of three quadrants of the image, as logits."""

    def forward(self, image, meta=None):
        half_h, half_w = image.shape[2] // 2, image.shape[3] // 2
        quadrants = [image[:, :, :half_h, :half_w], image[:, :, :half_h, half_w:], image[:, :, half_h:, :half_w]]
        return torch.stack([q.mean(dim=(1, 2, 3)) * 4 for q in quadrants], dim=1)


def test_tta_with_independent_heads_averages_each_heads_probability():
    image = torch.randn(5, 3, 8, 8)
    model = CornerHeads()
    for n_tta in (2, 5, 8):
        expected = torch.stack([torch.sigmoid(model(dihedral(image, i))) for i in range(n_tta)]).mean(0)
        got = torch.sigmoid(TTAModel(model, n_tta, independent_heads=True)(image))
        torch.testing.assert_close(got, expected)
        # without the flag several outputs are one softmax, which is not what the detector's heads are
        softmax = torch.sigmoid(TTAModel(model, n_tta)(image))
        assert not torch.allclose(softmax, expected, atol=1e-3)


def test_test_mode_averages_heads_over_models_and_thresholds(synthetic, detectors, tmp_path):
    singles = []
    for index, model in enumerate(detectors):
        mc.main(scoring_argv(synthetic, [model], tmp_path / f"single{index}.csv", "--n-tta", "4"))
        singles.append(pd.read_csv(tmp_path / f"single{index}.csv"))
    result = mc.main(scoring_argv(synthetic, detectors, tmp_path / "both.csv", "--n-tta", "4"))
    both = pd.read_csv(tmp_path / "both.csv")
    assert result["n_images"] == 11 and both["image_name"].tolist() == singles[0]["image_name"].tolist()

    checkpoints = [load_checkpoint(path, "artifact") for path in detectors]
    heads = checkpoints[0]["heads"]
    for i, head in enumerate(heads):
        mean = (singles[0][f"{head}_prob"] + singles[1][f"{head}_prob"]) / 2
        np.testing.assert_allclose(both[f"{head}_prob"], mean, atol=2e-6)  # each file is rounded to 6 places
        threshold = np.mean([checkpoint["thresholds"][i] for checkpoint in checkpoints])
        np.testing.assert_array_equal(both[head], (both[f"{head}_prob"] >= threshold).astype(int))
    assert not np.allclose(singles[0][[f"{h}_prob" for h in heads]], singles[1][[f"{h}_prob" for h in heads]])


def test_tta8_makes_the_detector_invariant_to_flips_and_transposes(synthetic, detectors, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    source = cv2.imread(str(sorted((synthetic / "test" / "test").glob("*.jpg"))[0]))
    views = {"a_identity.png": source, "b_flipped.png": source[:, ::-1], "c_transposed.png": source.transpose(1, 0, 2)}
    for name, pixels in views.items():
        cv2.imwrite(str(images / name), np.ascontiguousarray(pixels))  # PNG: lossless, the views stay exact
    argv = ["--img_path", str(images), "--mode", "test", "--num_workers", "0", "--model_path", str(detectors[0])]
    heads = load_checkpoint(detectors[0], "artifact")["heads"]
    probs = {}
    for n_tta in (1, 8):
        out = mc.main([*argv, "--n-tta", str(n_tta), "--save_path", str(tmp_path / f"tta{n_tta}.csv")])
        probs[n_tta] = out["annotations"][[f"{head}_prob" for head in heads]].to_numpy()
    assert not np.allclose(probs[1][0], probs[1][1], atol=1e-5)  # the bare network sees the flip
    np.testing.assert_allclose(probs[8][1], probs[8][0], atol=2e-6)
    np.testing.assert_allclose(probs[8][2], probs[8][0], atol=2e-6)


def test_val_with_several_models_scores_only_images_every_model_held_out(synthetic, detectors, tmp_path, capsys):
    argv = ["--img_path", str(synthetic / "train" / "train"), "--ann_path", str(synthetic / "gans_biases.csv")]
    argv += ["--mode", "val", "--num_workers", "0", "--n-tta", "2"]
    held_out = [set(load_checkpoint(path, "artifact")["val_images"]) for path in detectors]
    both_held_out = held_out[0] & held_out[1]
    assert both_held_out and held_out[0] != held_out[1]  # the seeds split differently, with some overlap
    result = mc.main([*argv, "--model_path", *map(str, detectors), "--save_path", str(tmp_path / "val.csv")])
    assert result["n_images"] == len(both_held_out)
    # an image any of the models trained on is left out
    assert f"holds {36 - len(both_held_out)} images" in capsys.readouterr().out
    everything = mc.main(
        [*argv, "--all", "--model_path", *map(str, detectors), "--save_path", str(tmp_path / "all.csv")]
    )
    assert everything["n_images"] == 36

    # models whose held-out images share nothing leave nothing unseen to score: refused, not scored in-sample
    disjoint = load_checkpoint(detectors[1], "artifact")
    names = pd.read_csv(synthetic / "gans_biases.csv", header=None)[0]
    disjoint["val_images"] = sorted(set(names) - held_out[0])[:7]
    disjoint["train_images"] = sorted(set(names) - set(disjoint["val_images"]))
    torch.save(disjoint, tmp_path / "disjoint.pth")
    with pytest.raises(SystemExit) as exit_info:
        mc.main(
            [*argv, "--model_path", str(detectors[0]), str(tmp_path / "disjoint.pth")]
            + ["--save_path", str(tmp_path / "x.csv")]
        )
    error = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "trained on every image" in error and "--all" in error


def test_several_models_need_the_same_heads_a_save_path_and_scoring_modes(synthetic, detectors, tmp_path, capsys):
    def fails_with(argv, fragment):
        with pytest.raises(SystemExit) as exit_info:
            mc.main(argv)
        error = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and error.count("\n") == 0 and fragment in error, error

    other_heads = load_checkpoint(detectors[1], "artifact")
    other_heads["heads"] = [*other_heads["heads"][1:], other_heads["heads"][0]]
    torch.save(other_heads, tmp_path / "other.pth")
    fails_with(scoring_argv(synthetic, [detectors[0], tmp_path / "other.pth"], tmp_path / "o.csv"), "same heads")
    no_save = ["--img_path", str(synthetic / "test" / "test"), "--mode", "test", "--num_workers", "0"]
    fails_with([*no_save, "--model_path", *map(str, detectors)], "--save_path")
    fails_with([*train_argv(synthetic, tmp_path / "a.pth", 1), "--model_path", "b.pth", "c.pth"], "give one")
    fails_with([*train_argv(synthetic, tmp_path / "a.pth", 1), "--n-tta", "2"], "--mode val and test")
    fails_with(scoring_argv(synthetic, detectors[:1], tmp_path / "t.csv", "--n-tta", "9"), "outside 1..8")
    assert not (tmp_path / "a.pth").exists() and not (tmp_path / "o.csv").exists()


def test_the_predictor_scores_as_test_mode_and_the_ensemble_averages_heads_and_thresholds(
    synthetic, detectors, tmp_path
):
    files = [str(path) for path in list_images(synthetic / "test" / "test")]
    runtime = ScoringRuntime(torch.device("cpu"), n_tta=2, batch_size=16, channels_last=True)
    predictors = [ArtifactPredictor.from_checkpoint(path, runtime) for path in detectors]
    ensemble = ArtifactEnsemble(predictors)
    heads = load_checkpoint(detectors[0], "artifact")["heads"]
    assert ensemble.heads == heads and predictors[0].image_size == 32
    singles = [predictor.probabilities(files) for predictor in predictors]
    assert singles[0].shape == (11, len(heads)) and not np.allclose(singles[0], singles[1])
    np.testing.assert_array_equal(ensemble.probabilities(files), np.mean(singles, axis=0))

    # what test mode writes for the first model is its predictor's probabilities (rounded to 6 places)
    written = mc.main(scoring_argv(synthetic, detectors[:1], tmp_path / "one.csv", "--n-tta", "2", "--batch", "16"))
    np.testing.assert_allclose(written["annotations"][[f"{h}_prob" for h in heads]], singles[0], atol=1e-6)

    mean_cut_offs = np.mean([predictor.thresholds for predictor in predictors], axis=0)
    np.testing.assert_allclose(ensemble.thresholds(heads), mean_cut_offs)
    some = [heads[2], heads[0]]  # val scores only the heads its annotation file has, in the model's order or not
    np.testing.assert_allclose(ensemble.thresholds(some), mean_cut_offs[[2, 0]])
    assert ensemble.thresholds(some, threshold=0.3) == [0.3, 0.3]


def test_precision_auto_follows_each_models_own_image_size(synthetic, detectors, tmp_path, monkeypatch, capsys):
    """--precision auto picks bf16 on a CPU with native bf16 from 192 px: by the size each model scores at (its
    own), not by --image-size."""
    large = load_checkpoint(detectors[1], "artifact")
    large["image_size"] = 256  # the network is size-agnostic; only the size it is fed changes
    torch.save(large, tmp_path / "large.pth")
    models = [detectors[0], tmp_path / "large.pth"]
    cpu = torch.device("cpu")

    def dtypes(*extra: str, native_bf16: bool = True) -> list[torch.dtype | None]:
        monkeypatch.setattr(utils, "cpu_has_native_bf16", lambda: native_bf16)
        config = mc.parse_args([*scoring_argv(synthetic, models, tmp_path / "x.csv"), "--device", "cpu", *extra])
        return [predictor.runtime.amp_dtype for predictor in mc.load_models(config, cpu).predictors]

    assert dtypes() == [None, torch.bfloat16]
    assert dtypes("--image-size", "256") == [None, torch.bfloat16]  # the 32 px model stays fp32
    assert "trained at 32 px; using that, not --image-size 256" in capsys.readouterr().out
    assert dtypes("--image-size", "32") == [None, torch.bfloat16]
    assert dtypes(native_bf16=False) == [None, None]
    assert dtypes("--precision", "fp32") == [None, None]
    assert dtypes("--precision", "bf16") == [torch.bfloat16, torch.bfloat16]

    # and the scoring loop runs under the model's own: a 32 px model with --image-size 256 stays in fp32
    seen = []
    real_tta_logits = detector_inference.tta_logits

    def spy(network, batches, n_items, runtime, **options):
        seen.append(runtime.amp_dtype)
        return real_tta_logits(network, batches, n_items, runtime, **options)

    monkeypatch.setattr(detector_inference, "tta_logits", spy)
    mc.main([*scoring_argv(synthetic, detectors[:1], tmp_path / "small.csv"), "--device", "cpu", "--image-size", "256"])
    assert seen == [None]
