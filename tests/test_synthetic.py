"""The synthetic artifacts must be visible at the resolutions the demo and the tests train at: a mark that blends
into the skin makes the detector's check fail for reasons that have nothing to do with the code under test."""

import cv2
import numpy as np
import pandas as pd
import pytest

import synthetic
from melanoma_audit import synthetic_dataset, synthetic_image
from melanoma_audit.annotations import DEFAULT_ARTIFACT_HEADS
from melanoma_audit.synthetic_artifacts import draw_other
from melanoma_audit.synthetic_image import render_image
from utils import UserError


def luminance(image: np.ndarray) -> np.ndarray:
    return image[..., 0] * 0.299 + image[..., 1] * 0.587 + image[..., 2] * 0.114


@pytest.mark.parametrize("seed", range(40))
def test_other_marks_stand_out_from_the_skin_at_64_px(seed):
    rng = np.random.default_rng(seed)
    skin = synthetic_image._skin(rng, 256)
    marked = skin.copy()
    draw_other(rng, marked)
    small_skin = cv2.resize(skin, (64, 64), interpolation=cv2.INTER_AREA)
    small_marked = cv2.resize(marked, (64, 64), interpolation=cv2.INTER_AREA)
    changed = np.abs(small_marked - small_skin).sum(axis=2) > 30
    assert changed.sum() >= 6, "the mark covers too few pixels at 64 px"
    # much darker than the skin it covers (a white patch on light skin was nearly invisible to the network)
    drop = luminance(small_skin)[changed] - luminance(small_marked)[changed]
    assert np.median(drop) > 30


@pytest.mark.parametrize("head", ["hair_dense", "hair_short", "hair_medium", "ruler_mark"])
def test_thin_artifacts_survive_the_resize_to_64_px(head):
    for seed in range(10):
        flags = [int(name == head) for name in DEFAULT_ARTIFACT_HEADS]
        with_mark = render_image(np.random.default_rng(seed), 256, False, flags)
        without = render_image(np.random.default_rng(seed), 256, False, [0] * len(DEFAULT_ARTIFACT_HEADS))
        if head == "ruler_mark":  # the ruler's ticks: dark lines on a light strip
            assert (np.abs(with_mark.astype(int) - without).sum(axis=2) > 60).mean() > 0.02
        small_with = cv2.resize(with_mark, (64, 64), interpolation=cv2.INTER_AREA).astype(np.float32)
        small_without = cv2.resize(without, (64, 64), interpolation=cv2.INTER_AREA).astype(np.float32)
        darker = luminance(small_without) - luminance(small_with)
        assert (darker > 25).sum() >= 20, f"{head} (seed {seed}) fades out at 64 px"


def test_a_folder_with_anyone_elses_files_is_never_written_into(tmp_path, capsys):
    """The README's own data path, melanoma_external_256, holds the Kaggle files: a real test.csv was replaced, and
    a new train.csv shadowed train_concat.csv."""
    real = tmp_path / "melanoma_external_256"
    real.mkdir()
    (real / "train_concat.csv").write_text("image_name,target\nISIC_1,0\n")
    for argv in ([str(real)], [str(real), "--overwrite"]):
        with pytest.raises(SystemExit) as exit_info:
            synthetic.main([*argv, "--n-train", "8", "--n-test", "2", "--image-size", "32"])
        error = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and len(error.splitlines()) == 1 and "not empty" in error, error
    assert [path.name for path in real.iterdir()] == ["train_concat.csv"]


def test_an_earlier_synthetic_data_set_is_replaced_only_with_overwrite(tmp_path, capsys):
    out = tmp_path / "data"
    first = synthetic_dataset.make_synthetic_dataset(out, n_train=8, n_test=2, image_size=32, seed=0)
    earlier = sorted(path.relative_to(out) for path in out.rglob("*.jpg"))
    with pytest.raises(UserError, match="pass --overwrite"):
        synthetic_dataset.make_synthetic_dataset(out, n_train=8, n_test=2, image_size=32, seed=1)
    assert sorted(path.relative_to(out) for path in out.rglob("*.jpg")) == earlier
    synthetic_dataset.make_synthetic_dataset(first, n_train=6, n_test=2, image_size=32, seed=1, overwrite=True)
    now = sorted(path.relative_to(out) for path in out.rglob("*.jpg"))
    assert len(now) == 8 and not set(now) & set(earlier)  # the earlier images are gone, not mixed in
    assert len(pd.read_csv(out / "train.csv")) == 6
    (out / "train" / "train" / "mine.jpg").write_bytes(b"a user's file")
    with pytest.raises(UserError, match="did not write, e.g. .*mine.jpg"):
        synthetic_dataset.make_synthetic_dataset(out, n_train=8, n_test=2, image_size=32, overwrite=True)
    assert len(list(out.rglob("*.jpg"))) == 9
