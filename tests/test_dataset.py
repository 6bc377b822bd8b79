import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from dataset import (
    EpochSampler,
    ImageDataset,
    MetaEncoder,
    images_per_patient,
    make_folds,
    patient_groups,
    read_melanoma_table,
    train_transforms,
    valid_transforms,
)
from utils import UserError


def _frame(tmp_path, rows):
    frame = pd.DataFrame(
        rows, columns=["image_name", "patient_id", "sex", "age_approx", "anatom_site_general_challenge"]
    )
    paths = []
    for name, size in zip(frame["image_name"], range(100, 100 + len(frame)), strict=True):
        path = tmp_path / f"{name}.jpg"
        path.write_bytes(b"x" * size)
        paths.append(str(path))
    frame["filepath"] = paths
    return frame


def test_patient_without_id_is_a_patient_of_its_own(tmp_path):
    frame = _frame(
        tmp_path,
        [
            ["a", "p1", "male", 50, "torso"],
            ["b", "p1", "male", 50, "torso"],
            ["c", None, "female", 40, "torso"],
            ["d", None, "female", 40, "torso"],
            ["e", "p2", "female", 30, "torso"],
        ],
    )
    assert images_per_patient(frame).tolist() == [2, 2, 1, 1, 1]
    groups = patient_groups(frame)
    assert groups[0] == groups[1] and len({groups[2], groups[3], groups[4]}) == 3


def test_meta_encoding_fits_on_training_rows_only(tmp_path):
    train = _frame(
        tmp_path,
        [
            ["a", "p1", "male", 60, "torso"],
            ["b", "p2", "female", 30, "head/neck"],
            ["c", "p3", None, None, None],
        ],
    )
    valid = _frame(tmp_path, [["v1", "p9", "female", None, "palms/soles"], ["v2", "p9", "male", 90, "torso"]])
    encoder = MetaEncoder().fit(train)
    assert encoder.feature_names == [
        "sex", "age", "site_head/neck", "site_torso", "site_missing", "n_images", "image_size",
    ]  # fmt: skip
    encoded = encoder.transform(train)
    assert encoded[:, 0].tolist() == [1.0, 0.0, -1.0]  # male, female, missing
    assert encoded[2, 1] == pytest.approx(45 / 90)  # missing age: the training median
    assert encoded[2, 2:5].tolist() == [0, 0, 1]  # missing site
    assert encoded[:, 6] == pytest.approx(np.log([100, 101, 102]))

    valid_encoded = encoder.transform(valid)
    assert valid_encoded.shape[1] == encoded.shape[1]
    assert valid_encoded[0, 1] == pytest.approx(45 / 90)  # filled from training rows, not validation ones
    assert valid_encoded[0, 2:5].tolist() == [0, 0, 1]  # a site never seen in training maps to missing
    assert valid_encoded[1, 1] == pytest.approx(1.0)
    assert valid_encoded[:, 5] == pytest.approx(np.log1p([2, 2]))

    restored = MetaEncoder.from_state_dict(encoder.state_dict())
    np.testing.assert_array_equal(restored.transform(valid), valid_encoded)


def test_folds_are_grouped_by_patient_and_stratified(synthetic_dir):
    frame = read_melanoma_table(synthetic_dir, "train", use_meta=True, require_target=True)
    folds = make_folds(frame, n_folds=3, seed=0)
    assert set(folds) == {0, 1, 2}
    groups = patient_groups(frame)
    for group in set(groups):
        assert len(set(folds[groups == group])) == 1, f"patient {group} is on both sides of a split"
    for fold in range(3):
        assert frame["target"][folds == fold].nunique() == 2
    np.testing.assert_array_equal(folds, make_folds(frame, n_folds=3, seed=0))


def test_transforms_build_and_run_without_warnings():
    image = np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for transform in (train_transforms(64), valid_transforms(64)):
            for _ in range(5):
                out = transform(image=image)["image"]
                assert out.shape == (64, 64, 3) and out.dtype == np.float32


def test_dataset_items_and_reproducible_augmentation(synthetic_dir):
    frame = read_melanoma_table(synthetic_dir, "train", use_meta=True, require_target=True)
    meta = MetaEncoder().fit(frame).transform(frame)
    dataset = ImageDataset(frame["filepath"], train_transforms(32), meta, frame["target"], augment_seed=7)
    item = dataset[(3, 5)]
    assert set(item) == {"image", "meta", "target"}
    assert item["image"].shape == (3, 32, 32) and item["meta"].shape == (meta.shape[1],)
    assert item["target"] == frame["target"][5]
    assert torch.equal(dataset[(3, 5)]["image"], item["image"])  # same (epoch, index): same augmentation
    assert not all(torch.equal(dataset[(4, 5)]["image"], dataset[(e, 5)]["image"]) for e in (5, 6, 7))

    bare = ImageDataset(frame["filepath"], valid_transforms(32))
    assert set(bare[0]) == {"image"}


def test_epoch_sampler_reshuffles_per_epoch_and_splits_ranks():
    sampler = EpochSampler(10, shuffle=True, seed=0)
    sampler.set_epoch(1)
    first = [index for _, index in sampler]
    sampler.set_epoch(2)
    second = [index for _, index in sampler]
    assert sorted(first) == list(range(10)) and first != second
    ranks = [EpochSampler(10, shuffle=True, seed=0, rank=r, world_size=3) for r in range(3)]
    seen = [index for sampler in ranks for _, index in sampler]
    assert all(len(sampler) == 4 for sampler in ranks) and set(seen) == set(range(10))


def test_table_errors_name_the_file(tmp_path, synthetic_dir):
    with pytest.raises(UserError, match="does not exist"):
        read_melanoma_table(tmp_path / "nowhere", "train", use_meta=False, require_target=True)
    (tmp_path / "train.csv").write_text("image_name,target\nx,2\n")
    with pytest.raises(UserError, match=r"line 2 has target"):
        read_melanoma_table(tmp_path, "train", use_meta=False, require_target=True)
    (tmp_path / "train.csv").write_text(
        "image_name,target,sex,age_approx,anatom_site_general_challenge\nx,1,male,old,torso\n"
    )
    with pytest.raises(UserError, match="age_approx 'old'"):
        read_melanoma_table(tmp_path, "train", use_meta=True, require_target=True)
