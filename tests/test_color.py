"""Another clinic's images: colour constancy (Shades of Gray), the square rule (--resize-mode), the "robust"
augmentation, on the CPU and the device path, in training and in prediction, and the source classifier.
Tiny synthetic images (32-64 px), written as PNG where a JPEG's loss would blur what is compared."""

import dataclasses
import math

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from image_helpers import CPU, byte_batch, to_pixels, write_image

import multi_classification
import predict
import source_shift
import train
from dataset import ImageDataset, train_transforms, valid_transforms
from melanoma_audit import device_data as dd
from melanoma_audit.checkpoints import load_checkpoint, save_checkpoint
from melanoma_audit.color import illuminant, shades_of_gray, shades_of_gray_batch
from melanoma_audit.inference import LoadedModel, load_melanoma_model, make_dataset
from melanoma_audit.loops import Images, Preparation, image_dataset
from melanoma_audit.preprocessing import IMAGENET_MEAN, IMAGENET_STD, RESIZE_MODES, Preprocessing, square_image
from utils import UserError

SOG = Preprocessing("shades-of-gray")
CAST = (0.8, 1.0, 1.2)  # a bluish illuminant: red down, blue up


def _skin(height: int, width: int, variant: int = 0) -> np.ndarray:
    """RGB uint8 within 40..200 (a cast by CAST stays unclipped): skin with a gradient, a dark lesion left of
    centre and a light mark in the top-right corner, so that crops, pads and stretches all differ."""
    rng = np.random.default_rng(variant)
    yy, xx = np.mgrid[0:height, 0:width] / np.array([height, width]).reshape(2, 1, 1)
    image = np.array([180, 140, 120]) * (0.85 + 0.15 * xx[..., None]) + rng.normal(0, 3, (height, width, 3))
    lesion = (yy - 0.5) ** 2 + (xx - 0.4 - 0.02 * variant) ** 2 < 0.2**2
    image = np.where(lesion[..., None], np.array([90, 60, 50]), image)
    image[: height // 6, -width // 6 :] = (195, 190, 185)
    return np.clip(image, 40, 200).astype(np.uint8)


def _cast(image: np.ndarray, gains=CAST) -> np.ndarray:
    return np.clip(image * np.array(gains) + 0.5, 0, 255).astype(np.uint8)


def _cpu_inputs(files: list[str], size: int, preprocessing: Preprocessing) -> torch.Tensor:
    dataset = ImageDataset(files, valid_transforms(size, preprocessing=preprocessing))
    return to_pixels(torch.stack([dataset[i]["image"] for i in range(len(files))]))


def _device_inputs(files: list[str], size: int, preprocessing: Preprocessing, strength="none", **seeds):
    pipeline = dd.DevicePipeline(size, strength, IMAGENET_MEAN, IMAGENET_STD, CPU, preprocessing=preprocessing)
    return to_pixels(pipeline(byte_batch(files), **seeds)["image"])


# --------------------------------------------------------------------------- colour constancy


@pytest.mark.parametrize("path", ["cpu", "gpu"])
def test_a_colour_cast_is_divided_out(tmp_path, path):
    """A copy under another illuminant gives nearly the network input of the original with shades-of-gray (the
    gains are divided out; what is left is the copy's overall brightness, which the correction keeps: 3 % here),
    and a clearly different one without."""
    image = _skin(48, 64)
    files = [write_image(tmp_path / "original.png", image), write_image(tmp_path / "cast.png", _cast(image))]
    inputs = _cpu_inputs if path == "cpu" else _device_inputs
    corrected, plain = inputs(files, 32, SOG), inputs(files, 32, Preprocessing())
    assert (corrected[0] - corrected[1]).abs().mean() <= 6.0
    brightness = corrected[0].mean() / corrected[1].mean()
    assert (corrected[0] - corrected[1] * brightness).abs().mean() <= 1.0
    assert (plain[0] - plain[1]).abs().mean() >= 15.0
    # per channel: without correction red and blue move apart by the cast; with it they stay where they were
    ratio = corrected[1].mean((1, 2)) / corrected[0].mean((1, 2))
    assert (ratio.max() / ratio.min()).item() <= 1.02
    assert not torch.allclose(corrected[0], plain[0], atol=1.0)  # the correction does act on the original


def test_shades_of_gray_arithmetic():
    """A grey world is left alone, a black image too (no division by zero), and the estimate follows p: a large
    p weighs the brightest pixels, p = 1 is the mean."""
    grey = np.full((40, 40, 3), 128, np.uint8)
    assert np.array_equal(shades_of_gray(grey), grey)
    black = np.zeros((40, 40, 3), np.uint8)
    assert np.array_equal(shades_of_gray(black), black)
    image = _skin(40, 40)
    corrected = shades_of_gray(image, 1.0).reshape(-1, 3).astype(float)
    means = corrected.mean(0)
    assert means.max() - means.min() <= 1.0  # Gray World: equal channel means after the correction
    batch = torch.from_numpy(np.stack([image, _cast(image), black])).permute(0, 3, 1, 2).float()
    ours = shades_of_gray_batch(batch, 6.0).permute(0, 2, 3, 1).numpy()
    for got, original in zip(ours, [image, _cast(image), black], strict=True):
        assert np.abs(got - shades_of_gray(original, 6.0)).max() <= 0.5 + 1e-4  # the CPU path rounds to uint8


@pytest.mark.parametrize("mode", RESIZE_MODES)
def test_cpu_and_device_paths_prepare_alike(tmp_path, mode):
    """Colour constancy and the square rule give the same input on both paths, for square and 4:3 files, a
    very wide one (padding reflects more than once) and one decoded at reduced scale on the CPU path: within
    the 2.5 levels (0.5 on average) that the resize alone differs by (test_device_data), plus the 0.5 by which the
    CPU path rounds the corrected image to uint8."""
    files = [
        write_image(tmp_path / "square.jpg", _skin(64, 64)),
        write_image(tmp_path / "wide.jpg", _skin(48, 64, 1)),
        write_image(tmp_path / "tall.png", _skin(64, 48, 2)),
        write_image(tmp_path / "strip.png", _skin(32, 120, 3)),
        write_image(tmp_path / "large.jpg", cv2.resize(_skin(96, 128, 4), (512, 384), interpolation=cv2.INTER_CUBIC)),
    ]
    preprocessing = Preprocessing("shades-of-gray", 6.0, mode)
    for size in (48, 32):
        difference = (_cpu_inputs(files, size, preprocessing) - _device_inputs(files, size, preprocessing)).abs()
        assert difference.max() <= 3.0, size
        assert difference.mean() <= 0.5, size


def test_settings_are_checked():
    with pytest.raises(UserError, match="--minkowski-p 0.5 must be a finite number of at least 1"):
        Preprocessing("shades-of-gray", 0.5)
    with pytest.raises(UserError, match="unknown --resize-mode 'fit'"):
        Preprocessing(resize_mode="fit")
    with pytest.raises(SystemExit) as stopped:
        train.main(["--save-name", "x", "--data-dir", "d", "--minkowski-p", "nan"])
    assert stopped.value.code == 2


# --------------------------------------------------------------------------- the square rule


def test_each_mode_makes_a_square_as_it_says():
    """crop: the centre square of the shorter side; pad: the image in the middle, reflected borders (never black);
    stretch: left to the resize."""
    image = _skin(48, 64)
    assert np.array_equal(square_image(image, "crop"), image[:, 8:56])
    padded = square_image(image, "pad")
    assert padded.shape == (64, 64, 3) and np.array_equal(padded[8:56], image)
    assert np.array_equal(padded[:8], image[8:0:-1]) and np.array_equal(padded[56:], image[-2:-10:-1])
    assert square_image(image, "stretch") is image


@pytest.mark.parametrize("mode", RESIZE_MODES)
def test_training_and_prediction_see_the_same_input(tmp_path, mode):
    """The training loader at --augment none, the validation loader and prediction's make_dataset give the same
    tensor for a 4:3 image, in each mode; pad and crop keep the lesion's shape (4:3 wide, as in the file),
    stretch squeezes it round."""
    files = [write_image(tmp_path / f"wide{i}.png", _skin(48, 64, i)) for i in range(2)]
    preprocessing = Preprocessing("none", 6.0, mode)
    training = image_dataset(Images(files), Preparation(32, IMAGENET_MEAN, IMAGENET_STD, "none", 5, preprocessing))
    loaded = LoadedModel(tmp_path, torch.nn.Identity(), 32, list(IMAGENET_MEAN), list(IMAGENET_STD), None)
    loaded = dataclasses.replace(loaded, preprocessing=preprocessing)
    predicting = make_dataset(loaded, pd.DataFrame({"filepath": files}))
    for i in range(len(files)):
        assert torch.equal(training[(3, i)]["image"], predicting[i]["image"])
    dark = _cpu_inputs(files, 32, preprocessing).mean(1) < 100  # the lesion
    width, height = dark.any(1).sum(1).float(), dark.any(2).sum(1).float()
    if mode == "stretch":
        assert ((width / height - 1).abs() <= 0.15).all()
    else:
        assert ((width / height - 4 / 3).abs() <= 0.15).all()


# --------------------------------------------------------------------------- the robust augmentation


def test_robust_augmentation_is_seeded_per_image_on_the_cpu_path(tmp_path):
    files = [write_image(tmp_path / "same.png", _skin(48, 64))] * 2
    dataset = ImageDataset(files, train_transforms(32, strength="robust", preprocessing=SOG), augment_seed=3)
    first = dataset[(1, 0)]["image"]
    assert torch.equal(dataset[(1, 0)]["image"], first)  # the same (seed, epoch, index): the same image
    assert not torch.equal(dataset[(1, 1)]["image"], first)  # the same file at another index: other parameters
    assert not torch.equal(dataset[(2, 0)]["image"], first)
    other_seed = ImageDataset(files, train_transforms(32, strength="robust", preprocessing=SOG), augment_seed=4)
    assert not torch.equal(other_seed[(1, 0)]["image"], first)


def test_robust_augmentation_is_seeded_per_image_on_the_device_path(tmp_path):
    files = [write_image(tmp_path / "same.png", _skin(48, 64))] * 6
    first = _device_inputs(files, 32, SOG, "robust", epoch=1, batch_index=2)
    assert torch.equal(_device_inputs(files, 32, SOG, "robust", epoch=1, batch_index=2), first)
    assert not torch.equal(_device_inputs(files, 32, SOG, "robust", epoch=1, batch_index=3), first)
    for i in range(6):  # every image of the batch draws its own parameters
        for j in range(i + 1, 6):
            assert not torch.allclose(first[i], first[j]), (i, j)


@pytest.mark.parametrize("path", ["cpu", "gpu"])
def test_robust_changes_colour_and_scale_without_black_borders(tmp_path, path):
    """Per-channel gains shift the colour balance from image to image, the zoom moves the lesion's size, and the
    borders the zoom-out opens are reflected: on skin at 40-200 levels no pixel turns black (vignetting darkens
    the corners by at most half)."""
    n = 48
    files = [write_image(tmp_path / "same.png", _skin(64, 64))] * n
    if path == "cpu":
        dataset = ImageDataset(files, train_transforms(32, strength="robust"), augment_seed=0)
        images = to_pixels(torch.stack([dataset[(0, i)]["image"] for i in range(n)]))
    else:
        images = _device_inputs(files, 32, Preprocessing(), "robust")
    assert images.amin() >= 15
    balance = images[:, 0].mean((1, 2)) / images[:, 2].mean((1, 2))
    assert balance.std() >= 0.03
    lesion_area = (images.mean(1) < 100).float().mean((1, 2))
    assert lesion_area.std() >= 0.01


# --------------------------------------------------------------------------- checkpoints and every script


def _non_square_data(synthetic_dir, tmp_path):
    """The synthetic data set with every image cut to 64 x 48 (4:3), under a bluish illuminant."""
    data = tmp_path / "data"
    for split in ("train", "test"):
        (data / split / split).mkdir(parents=True)
        (data / f"{split}.csv").write_bytes((synthetic_dir / f"{split}.csv").read_bytes())
        for source in (synthetic_dir / split / split).glob("*.jpg"):
            image = cv2.imread(str(source))[8:56]
            cast = np.clip(image * (1.15, 1.0, 0.85), 0, 255).astype(np.uint8)  # BGR: blue up, red down
            cv2.imwrite(str(data / split / split / source.name), cast)
    return data


def test_a_checkpoint_carries_its_preprocessing_to_predict(synthetic_dir, tmp_path):
    """train.py --color-constancy shades-of-gray --resize-mode pad stores both; predict.py scores with them: its
    probabilities are those of the network on inputs built from the dataset's own steps with these settings, not
    with the defaults. The same checkpoint without the fields (as written before them) loads as none / stretch."""
    data = _non_square_data(synthetic_dir, tmp_path)
    train.main([
        "--save-name", "sog", "--data-dir", str(data), "--image-size", "32", "--n-epochs", "1",
        "--enet-type", "efficientnet-b0", "--no-pretrained", "--no-lesion-features", "--batch-size", "16",
        "--num-workers", "0", "--n-folds", "3", "--model-dir", str(tmp_path / "weights"),
        "--log-dir", str(tmp_path / "logs"), "--color-constancy", "shades-of-gray", "--resize-mode", "pad",
    ])  # fmt: skip
    path = tmp_path / "weights" / "sog_best.pth"
    checkpoint = load_checkpoint(path, "melanoma")
    expected = {"color_constancy": "shades-of-gray", "minkowski_p": 6.0, "resize_mode": "pad"}
    assert {key: checkpoint[key] for key in expected} == expected
    assert {key: checkpoint["config"][key] for key in expected} == expected

    command = ["--data-dir", str(data), "--num-workers", "0", "--model-path"]
    result = predict.main([*command, str(path), "--out", str(tmp_path / "p.csv")])
    loaded = load_melanoma_model(path, CPU)
    assert loaded.preprocessing == Preprocessing("shades-of-gray", 6.0, "pad")
    files = [str(data / "test" / "test" / f"{name}.jpg") for name in result["image_name"]]

    def network_probabilities(preprocessing: Preprocessing) -> np.ndarray:
        dataset = ImageDataset(files, valid_transforms(32, loaded.mean, loaded.std, preprocessing))
        with torch.no_grad():
            logits = loaded.model.eval()(torch.stack([dataset[i]["image"] for i in range(len(files))]), None)
        return torch.sigmoid(logits[:, 0]).numpy()

    # predict.py batches the images differently: float sums in another order, 1e-5 apart
    np.testing.assert_allclose(result["target"], network_probabilities(loaded.preprocessing), atol=1e-4)
    assert np.abs(result["target"] - network_probabilities(Preprocessing())).max() > 1e-2

    old = {key: value for key, value in checkpoint.items() if key not in expected}
    old["config"] = {key: value for key, value in checkpoint["config"].items() if key not in expected}
    save_checkpoint(tmp_path / "old.pth", old)
    assert load_melanoma_model(tmp_path / "old.pth", CPU).preprocessing == Preprocessing()
    scored = predict.main([*command, str(tmp_path / "old.pth"), "--out", str(tmp_path / "o.csv")])
    np.testing.assert_allclose(scored["target"], network_probabilities(Preprocessing()), atol=1e-4)


def test_the_detector_keeps_its_preprocessing(synthetic_dir, tmp_path, capsys):
    """multi_classification.py stores --color-constancy and --resize-mode in its model and scores with them in
    val and test mode, whatever those modes are given (with a notice)."""
    images, model = synthetic_dir / "train" / "train", tmp_path / "detector.pth"
    common = ["--img_path", str(images), "--model_path", str(model), "--num_workers", "0"]
    multi_classification.main([
        *common, "--ann_path", str(synthetic_dir / "gans_biases.csv"), "--mode", "train", "--image_size", "32",
        "--epochs", "1", "--batch", "16", "--enet_type", "efficientnet-b0", "--no-pretrained",
        "--color-constancy", "shades-of-gray", "--minkowski-p", "3", "--resize-mode", "crop",
    ])  # fmt: skip
    checkpoint = load_checkpoint(model, "artifact")
    assert Preprocessing.from_checkpoint(checkpoint) == Preprocessing("shades-of-gray", 3.0, "crop")
    capsys.readouterr()
    multi_classification.main(
        [*common, "--mode", "test", "--color-constancy", "none", "--save_path", str(tmp_path / "a.csv")]
    )
    assert "was trained with --color-constancy shades-of-gray; using that, not none" in capsys.readouterr().out


# --------------------------------------------------------------------------- the source classifier


def test_source_classifier_sees_a_cast_and_shades_of_gray_removes_it(synthetic_dir, tmp_path, capsys):
    """Two halves of the synthetic images: the same source is hard to tell apart, one half under another
    illuminant is easy, and after Shades of Gray hard again. (Small sets: the leaves shrink, else no tree splits.)"""
    files = sorted((synthetic_dir / "train" / "train").glob("*.jpg"))
    folders = {name: tmp_path / name for name in ("a", "b", "cast")}
    for folder in folders.values():
        folder.mkdir()
    for i, file in enumerate(files):
        image = cv2.imread(str(file))
        if i % 2:
            cv2.imwrite(str(folders["b"] / f"{file.stem}.png"), image)
            rgb = image[..., ::-1]
            # another illuminant of the same strength: the gains scaled so that the corrected brightness stays
            estimate = illuminant(rgb)
            gains = np.array(CAST) * np.linalg.norm(estimate) / np.linalg.norm(np.array(CAST) * estimate)
            cv2.imwrite(str(folders["cast"] / f"{file.stem}.png"), _cast(rgb, gains)[..., ::-1])
        else:
            cv2.imwrite(str(folders["a"] / f"{file.stem}.png"), image)
    common = ["--a", str(folders["a"]), "--n-bootstrap", "200", "--n-folds", "4"]
    same = source_shift.main([*common, "--b", str(folders["b"])])
    cast = source_shift.main([*common, "--b", str(folders["cast"])])
    corrected = source_shift.main([*common, "--b", str(folders["cast"]), "--color-constancy", "shades-of-gray"])
    assert cast["auc"] >= 0.95 and same["auc"] <= 0.8 and corrected["auc"] <= 0.8
    assert cast["low"] <= cast["auc"] <= cast["high"] and not math.isnan(same["low"])
    assert same["n_a"] == same["n_b"] == len(files) // 2
    assert "source classifier AUC" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stopped:
        source_shift.main(["--a", str(folders["a"]), "--b", str(tmp_path / "missing")])
    assert stopped.value.code == 2
