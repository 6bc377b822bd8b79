import warnings

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from dataset import EpochSampler, ImageDataset, train_transforms, valid_transforms
from melanoma_audit.annotations import read_artifact_annotations
from melanoma_audit.image_files import image_dimensions, image_file_problem, read_image
from melanoma_audit.metadata import MetaEncoder
from melanoma_audit.patients import images_per_patient, make_folds, patient_groups
from melanoma_audit.tables import read_melanoma_table
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
    assert set(item) == {"image", "side", "target"}
    assert item["image"].shape == (3, 32, 32) and item["side"].shape == (meta.shape[1],)
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


# --------------------------------------------------------------------------- inputs from users' own files


def _layout(tmp_path, csv_text: str, names=("a", "b"), encoding: str = "utf-8"):
    """A minimal Kaggle-layout folder with a CSV written as given and 40 px images for `names`."""
    (tmp_path / "train" / "train").mkdir(parents=True, exist_ok=True)
    for name in names:
        cv2.imwrite(str(tmp_path / "train" / "train" / f"{name}.jpg"), np.full((40, 40, 3), 128, np.uint8))
    (tmp_path / "train.csv").write_bytes(csv_text.encode(encoding))
    return tmp_path


@pytest.mark.parametrize("name", ["../secret", "sub/a", "..\\secret", "/etc/passwd", "C:secret", ".."])
def test_image_names_that_are_paths_are_refused_with_the_line(tmp_path, name):
    outside = tmp_path / "secret.jpg"
    cv2.imwrite(str(outside), np.full((40, 40, 3), 128, np.uint8))
    data = _layout(tmp_path / "data", f"image_name,target\na,0\n{name},1\n")
    with pytest.raises(UserError, match=r"train\.csv line 3 has image_name .* a path rather than a file name"):
        read_melanoma_table(data, "train", use_meta=False, require_target=True)


def test_annotation_lines_that_name_paths_are_refused(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    cv2.imwrite(str(tmp_path / "outside.jpg"), np.full((40, 40, 3), 128, np.uint8))
    cv2.imwrite(str(images / "inside.jpg"), np.full((40, 40, 3), 128, np.uint8))
    annotations = tmp_path / "artifacts.csv"
    annotations.write_text("image,hair\ninside.jpg,1\n../outside.jpg,0\n")
    with pytest.raises(UserError, match=r"artifacts\.csv line 3 names image '\.\./outside\.jpg', a path rather than"):
        read_artifact_annotations(annotations, images)


def test_csv_as_excel_writes_it(tmp_path):
    """UTF-8 byte-order mark, CRLF, `;` separators with decimal commas, spaces around headers and cells, and the
    usual spellings of a missing value."""
    text = (
        "image_name ; patient_id;sex;age_approx;anatom_site_general_challenge ;target\r\n"
        "a;007;male ;45,5;torso;1\r\n"
        "b ;;NaN;;  ;0\r\n"
    )
    data = _layout(tmp_path, text, encoding="utf-8-sig")
    frame = read_melanoma_table(data, "train", use_meta=True, require_target=True)
    assert frame["image_name"].tolist() == ["a", "b"]
    assert frame["patient_id"][0] == "007" and pd.isna(frame["patient_id"][1])
    assert frame["age_approx"][0] == 45.5 and pd.isna(frame["age_approx"][1])
    assert frame["target"].tolist() == [1, 0]
    encoded = MetaEncoder(["sex", "site"]).fit(frame).transform(frame)
    assert encoded[:, 0].tolist() == [1.0, -1.0]  # "male " is male, "NaN" is missing
    assert encoded[1, 1:].tolist() == [0.0, 1.0]  # a site of spaces is missing

    _layout(tmp_path, "image_name,target,target \na,1,1\n")
    with pytest.raises(UserError, match="has the column target twice"):
        read_melanoma_table(tmp_path, "train", use_meta=False, require_target=True)
    (tmp_path / "train.csv").write_bytes("image_name,target\na,1\nb\u00e9,0\n".encode("cp1252"))
    with pytest.raises(UserError, match="is not UTF-8 text"):
        read_melanoma_table(tmp_path, "train", use_meta=False, require_target=True)


@pytest.mark.parametrize("age", ["inf", "-inf", "-3", "150"])
def test_impossible_ages_are_refused_with_the_line(tmp_path, age):
    header = "image_name,age_approx,sex,anatom_site_general_challenge,target"
    data = _layout(tmp_path, f"{header}\na,40,male,,0\nb,{age},,,1\n")
    with pytest.raises(UserError, match=rf"line 3 has age_approx '{age}': ages must be numbers from 0 to 120"):
        read_melanoma_table(data, "train", use_meta=True, require_target=True)


def test_sex_spellings_and_site_cases_are_one_value_and_others_are_named(tmp_path):
    """sex M/F (any case) is male/female, not unknown for every row; a site matches in any case; anything else is
    listed by `unrecognised`, for the readers of new metadata to refuse or name."""
    train = _frame(
        tmp_path, [["a", "p1", "M", 60, "Torso"], ["b", "p2", "f", 30, "head/neck"], ["c", "p3", "male", 40, "torso"]]
    )
    encoder = MetaEncoder(["sex", "site"]).fit(train)
    assert encoder.sites == ["Torso", "head/neck"]  # one column for Torso and torso
    new = _frame(
        tmp_path,
        [["d", "p4", "Female", 50, "TORSO"], ["e", "p5", "1", 50, "banana"], ["f", "p6", None, 50, None],
         ["g", "p7", "1", 50, "Head/Neck"]],
    )  # fmt: skip
    encoded = encoder.transform(new)
    assert encoded[:, 0].tolist() == [0.0, -1.0, -1.0, -1.0]
    assert encoded[:, 1:].tolist() == [[1, 0, 0], [0, 0, 1], [0, 0, 1], [0, 1, 0]]
    assert encoder.transform(train)[:, 0].tolist() == [1.0, 0.0, 1.0]
    found = [(column, value, rows.tolist()) for column, value, rows in encoder.unrecognised(new)]
    assert found == [
        ("sex", "1", [False, True, False, True]),
        ("anatom_site_general_challenge", "banana", [False, True, False, False]),
    ]


def test_a_training_csv_with_an_unknown_sex_or_a_blank_target_is_refused_with_the_line(tmp_path):
    header = "image_name,age_approx,sex,anatom_site_general_challenge,target"
    data = _layout(tmp_path, f"{header}\na,40,M,,0\nb,50,0,,1\n")
    with pytest.raises(UserError, match=r"line 3 has sex '0': sex must be male or female \(M/F"):
        read_melanoma_table(data, "train", use_meta=True, require_target=True)
    data = _layout(tmp_path, f"{header}\na,40,M,,0\nb,50,F,,\n")
    with pytest.raises(UserError, match=r"line 3 has no target: targets must be 0 or 1"):
        read_melanoma_table(data, "train", use_meta=True, require_target=True)


def test_meta_encoder_treats_impossible_ages_as_missing(tmp_path):
    frame = _frame(tmp_path, [["a", "p1", "male", 40, "torso"], ["b", "p2", "female", 60, "torso"]])
    encoder = MetaEncoder(["age"]).fit(frame)
    odd = frame.assign(age_approx=[float("inf"), -5.0])
    np.testing.assert_allclose(encoder.transform(odd)[:, 0], [50 / 90, 50 / 90])
    np.testing.assert_allclose(encoder.transform(odd.assign(age_approx=["x", None]))[:, 0], [50 / 90, 50 / 90])


# --------------------------------------------------------------------------- image files


def _jpeg(width: int = 64, height: int = 64) -> bytes:
    image = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    return cv2.imencode(".jpg", image)[1].tobytes()


def test_bytes_after_the_end_marker_are_not_truncation(tmp_path):
    whole = _jpeg()
    trailer = tmp_path / "trailer.jpg"
    trailer.write_bytes(whole + b"\x00camera trailer" * 50)
    assert image_file_problem(str(trailer)) is None
    assert read_image(str(trailer)).shape == (64, 64, 3)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(whole[: len(whole) - 200])
    assert image_file_problem(str(cut)) == "truncated JPEG: no end-of-image marker"
    png = cv2.imencode(".png", np.zeros((40, 40, 3), np.uint8))[1].tobytes()
    (tmp_path / "trailer.png").write_bytes(png + b"x" * 200)
    assert image_file_problem(str(tmp_path / "trailer.png")) is None
    (tmp_path / "cut.png").write_bytes(png[:-20])
    assert image_file_problem(str(tmp_path / "cut.png")) == "truncated PNG"


def test_a_thumbnail_end_marker_does_not_hide_truncation(tmp_path):
    thumbnail = _jpeg(8, 8)
    app1 = b"\xff\xe1" + (len(thumbnail) + 2).to_bytes(2, "big") + thumbnail
    whole = _jpeg()
    with_thumbnail = whole[:2] + app1 + whole[2:]
    path = tmp_path / "exif.jpg"
    path.write_bytes(with_thumbnail + b"x" * 100)
    assert image_file_problem(str(path)) is None
    path.write_bytes(with_thumbnail[: len(app1) + len(whole) // 2])
    assert image_file_problem(str(path)) == "truncated JPEG: no end-of-image marker"


def _claim_size(jpeg: bytes, width: int, height: int) -> bytes:
    """The same file with its frame header claiming another size (what a decompression bomb does)."""
    frame = jpeg.index(b"\xff\xc0")
    return jpeg[: frame + 5] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + jpeg[frame + 9 :]


def test_images_beyond_the_pixel_limit_are_refused_from_the_header(tmp_path):
    path = tmp_path / "huge.jpg"
    path.write_bytes(_claim_size(_jpeg(), 20000, 10000))
    with open(path, "rb") as handle:
        assert image_dimensions(handle) == (20000, 10000)
    assert image_file_problem(str(path)) == "20000x10000 px, beyond the 100-megapixel limit"
    with pytest.raises(UserError, match=r"huge\.jpg is 20000x10000 px, beyond the 100-megapixel limit"):
        read_image(str(path))
    png = bytearray(cv2.imencode(".png", np.zeros((40, 40, 3), np.uint8))[1].tobytes())
    png[16:24] = (30000).to_bytes(4, "big") * 2
    (tmp_path / "huge.png").write_bytes(bytes(png))
    with pytest.raises(UserError, match="30000x30000 px"):
        read_image(str(tmp_path / "huge.png"))


def test_large_images_are_decoded_at_reduced_size(tmp_path, monkeypatch):
    path = tmp_path / "large.jpg"
    path.write_bytes(_jpeg(2400, 1800))
    with open(path, "rb") as handle:
        assert image_dimensions(handle) == (2400, 1800)
    assert read_image(str(path)).shape == (1800, 2400, 3)
    assert read_image(str(path), 128).shape == (900, 1200, 3)  # 1/2 scale keeps 4x the 128 px needed
    assert read_image(str(path), 64).shape == (450, 600, 3)
    assert read_image(str(path), 256).shape == (1800, 2400, 3)  # 1/2 would leave less than 4x: full decode
    small = tmp_path / "small.jpg"
    small.write_bytes(_jpeg(256, 256))
    assert read_image(str(small), 64).shape == (256, 256, 3)  # the Kaggle files at the usual sizes: in full

    sizes = []
    real_read = read_image
    monkeypatch.setattr("dataset.read_image", lambda path, size=None: sizes.append(size) or real_read(path, size))
    item = ImageDataset([str(path)], valid_transforms(64))[0]
    assert item["image"].shape == (3, 64, 64) and sizes == [64]


def test_too_few_images_of_each_class_for_the_folds_is_refused():
    frame = pd.DataFrame({"patient_id": ["p1", "p2", "p3", "p4"], "target": [0, 0, 1, 1]})
    with pytest.raises(UserError, match="--n-folds 3 needs at least 3 images of one class, the largest class has 2"):
        make_folds(frame, n_folds=3, seed=0)
    assert sorted(make_folds(frame, n_folds=2, seed=0)) == [0, 0, 1, 1]


def test_annotation_file_as_excel_writes_it(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a", "b"):
        cv2.imwrite(str(images / f"{name}.jpg"), np.full((40, 40, 3), 128, np.uint8))
    annotations = tmp_path / "artifacts.csv"
    annotations.write_bytes("image ; hair;ruler\r\na.jpg;1;0\r\nb ; 0 ;\r\n".encode("utf-8-sig"))
    frame, heads, labels = read_artifact_annotations(annotations, images)
    assert heads == ["hair", "ruler"] and frame["image_name"].tolist() == ["a.jpg", "b"]
    np.testing.assert_array_equal(labels, np.array([[1, 0], [0, np.nan]], dtype=np.float32))


def test_unreadable_files_are_named_not_raised(tmp_path):
    folder = tmp_path / "x.jpg"
    folder.mkdir()  # opening it fails as an unreadable file would
    assert image_file_problem(str(folder)) == "unreadable (Is a directory)"
    with pytest.raises(UserError, match=r"x\.jpg cannot be read \(Is a directory\): restore it or remove its row\."):
        read_image(str(folder))
