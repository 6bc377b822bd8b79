"""The synthetic artifacts must be visible at the resolutions the demo and the tests train at: a mark that blends
into the skin makes the detector's check fail for reasons that have nothing to do with the code under test."""

import cv2
import numpy as np
import pytest

import synthetic_image
from artifacts import DEFAULT_ARTIFACT_HEADS, draw_other
from synthetic_image import render_image


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
