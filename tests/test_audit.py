import shutil

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

import audit
import train
from audit import PasteThenTransform, paste_artifact
from dataset import EpochSampler, ImageDataset, valid_transforms
from melanoma_audit.annotations import DEFAULT_ARTIFACT_HEADS
from melanoma_audit.inference import make_dataset
from melanoma_audit.patients import make_folds
from melanoma_audit.tables import read_melanoma_table


@pytest.fixture(scope="module")
def checkpoint(synthetic_dir, tmp_path_factory):
    """One --use-meta train.py run at 32 px, one epoch: a real checkpoint whose outputs differ between images.
    --seed 1 with the default --fold-seed 0: the folds must not follow the training seed."""
    out = tmp_path_factory.mktemp("audit_run")
    train.main([
        "--save-name", "r", "--data-dir", str(synthetic_dir), "--image-size", "32", "--n-epochs", "1",
        "--enet-type", "efficientnet-b0", "--no-pretrained", "--batch-size", "16", "--num-workers", "0",
        "--n-folds", "3", "--model-dir", str(out / "weights"), "--log-dir", str(out / "logs"), "--use-meta",
        "--seed", "1",
    ])  # fmt: skip
    return out / "weights" / "r_best.pth"


def oof_names(checkpoint):
    return pd.read_csv(checkpoint.parent.parent / "logs" / "oof_r.csv")["image_name"]


def run_audit(tmp_path, *args):
    """audit.main with its table checked against the CSV it wrote. The synthetic fold 0 holds sites the model's
    training folds did not (head/neck, palms/soles): --allow-missing-meta encodes them as missing, as validation did."""
    out = tmp_path / "audit.csv"
    argv = [*map(str, args), "--out", str(out), "--num-workers", "0", "--overwrite", "--allow-missing-meta"]
    table = audit.main(argv)
    pd.testing.assert_frame_equal(pd.read_csv(out), table, check_dtype=False)
    return table


def test_table_rows_on_the_held_out_fold(synthetic_dir, checkpoint, tmp_path, capsys):
    table = run_audit(
        tmp_path, "--model-path", checkpoint, "--data-dir", synthetic_dir, "--artifacts",
        synthetic_dir / "gans_biases.csv",
    )  # fmt: skip
    hair = "hair_dense|hair_short|hair_medium"
    expected = [
        ("(all)", "all"), ("hair_dense", "with"), ("hair_dense", "without"), ("hair_short", "with"),
        ("hair_short", "without"), ("hair_medium", "with"), ("hair_medium", "without"), (hair, "inserted hair"),
        ("black_frame", "with"), ("black_frame", "without"), ("black_frame", "inserted black_frame"),
        ("ruler_mark", "with"), ("ruler_mark", "without"), ("ruler_mark", "inserted ruler"), ("other", "with"),
        ("other", "without"),
    ]  # fmt: skip
    assert list(zip(table["artifact"], table["test"], strict=True)) == expected

    # the model trained on the other folds: only its validation fold is audited
    frame = read_melanoma_table(synthetic_dir, "train", use_meta=False, require_target=True)
    held_out = frame[frame["image_name"].isin(oof_names(checkpoint))]
    overall = table.iloc[0]
    assert overall["images"] == len(held_out) and overall["melanoma"] == held_out["target"].sum()
    assert "held-out" in capsys.readouterr().out

    labels = pd.read_csv(synthetic_dir / "gans_biases.csv", header=None, names=["file", *DEFAULT_ARTIFACT_HEADS])
    labels = labels.set_index(labels["file"].str.removesuffix(".jpg")).loc[held_out["image_name"]]
    rows = table.set_index(["artifact", "test"])
    for head in DEFAULT_ARTIFACT_HEADS:
        assert rows.loc[(head, "with"), "images"] == (labels[head] == 1).sum()
        assert rows.loc[(head, "with"), "images"] + rows.loc[(head, "without"), "images"] == len(held_out)
    assert rows.loc[("black_frame", "inserted black_frame"), "images"] == (labels["black_frame"] == 0).sum()
    no_hair = (labels[["hair_dense", "hair_short", "hair_medium"]] == 0).all(axis=1).sum()
    assert rows.loc[(hair, "inserted hair"), "images"] == no_hair
    inserted = table[table["test"].str.startswith("inserted")]
    switches = inserted["benign_to_malignant"] + inserted["malignant_to_benign"]
    assert (switches <= inserted["images"]).all() and inserted["mean_shift"].notna().all()
    assert table[~table["test"].str.startswith("inserted")]["benign_to_malignant"].isna().all()


def test_audits_exactly_the_rows_of_the_runs_oof_file(synthetic_dir, checkpoint, tmp_path, monkeypatch):
    """The model trained with --seed 1 validated on fold 0 of --fold-seed 0: its audit must score exactly the
    images its OOF file lists, which a split rebuilt from --seed would not."""
    frame = read_melanoma_table(synthetic_dir, "train", use_meta=False, require_target=True)
    oof = set(oof_names(checkpoint))
    assert set(frame["image_name"][make_folds(frame, 3, 1) == 0]) != oof  # the seed's split is another one
    scored = []

    def record(predictor, rows, *args, **kwargs):
        scored.append(list(rows["image_name"]))
        return np.full(len(rows), 0.5)

    monkeypatch.setattr(audit.MelanomaPredictor, "probabilities", record)
    run_audit(
        tmp_path, "--model-path", checkpoint, "--data-dir", synthetic_dir, "--artifacts",
        synthetic_dir / "gans_biases.csv", "--insert", "",
    )  # fmt: skip
    assert len(scored) == 1 and sorted(scored[0]) == sorted(oof)


def test_checkpoint_without_validation_images_is_refused(synthetic_dir, checkpoint, tmp_path, capsys):
    """An older train.py did not store its fold: the audit cannot tell held-out images from training ones."""
    state = torch.load(checkpoint, weights_only=True)
    del state["val_images"]
    old = tmp_path / "old_best.pth"
    torch.save(state, old)
    out = tmp_path / "a.csv"
    command = [
        "--model-path", str(old), "--data-dir", str(synthetic_dir), "--artifacts",
        str(synthetic_dir / "gans_biases.csv"), "--out", str(out), "--num-workers", "0", "--insert", "",
    ]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        audit.main(command)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(error.strip().splitlines()) == 1
    assert "retrain" in error and "--all-rows" in error and not out.exists()


def test_same_seed_same_table_and_all_rows(synthetic_dir, checkpoint, tmp_path):
    command = [
        "--model-path", checkpoint, "--data-dir", synthetic_dir, "--artifacts", synthetic_dir / "gans_biases.csv",
    ]  # fmt: skip
    first = run_audit(tmp_path / "a", *command, "--insert", "ruler", "--seed", 3)
    again = run_audit(tmp_path / "b", *command, "--insert", "ruler", "--seed", 3)
    pd.testing.assert_frame_equal(first, again)
    assert first.iloc[0]["images"] < 48
    every_row = run_audit(tmp_path / "c", *command, "--insert", "", "--all-rows")
    assert every_row.iloc[0]["images"] == 48 and not every_row["test"].str.startswith("inserted").any()


def test_pasted_artifacts_depend_on_the_seed_only(synthetic_dir):
    frame = read_melanoma_table(synthetic_dir, "train", use_meta=False, require_target=True).head(4)

    def pasted(seed, kind="hair"):
        transform = PasteThenTransform(kind, 64, valid_transforms(64))
        dataset = ImageDataset(frame["filepath"], transform, augment_seed=seed)
        return [dataset[key]["image"].numpy() for key in EpochSampler(len(dataset), shuffle=False, seed=0)]

    first, again, other = pasted(5), pasted(5), pasted(6)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not any(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


@pytest.mark.parametrize("kind", ["black_frame", "ruler", "hair"])
def test_paste_artifact_draws_on_a_copy(kind):
    image = np.full((256, 256, 3), 200, dtype=np.uint8)
    result = paste_artifact(image, kind, np.random.default_rng(0))
    assert result.dtype == np.uint8 and result.shape == image.shape
    assert (image == 200).all()  # the input is untouched
    changed = np.abs(result.astype(int) - 200).max(axis=2) > 30
    assert 0.005 < changed.mean() < 0.6
    if kind == "black_frame":
        assert result[0, 0].max() < 40 and (result[128, 128] == 200).all()  # dark corners, clear centre


def test_labels_with_a_header_and_prob_columns(synthetic_dir, checkpoint, tmp_path):
    """The file multi_classification.py --mode test writes: names without extension, <head>_prob columns."""
    raw = pd.read_csv(synthetic_dir / "gans_biases.csv", header=None, names=["file", *DEFAULT_ARTIFACT_HEADS])
    labels = pd.DataFrame({
        "image_name": raw["file"].str.removesuffix(".jpg"), "dark_corner": raw["black_frame"],
        "dark_corner_prob": raw["black_frame"] * 0.9,
    })  # fmt: skip
    labels.to_csv(tmp_path / "annotations.csv", index=False)
    table = run_audit(
        tmp_path, "--model-path", checkpoint, "--images", synthetic_dir / "train" / "train", "--meta-csv",
        synthetic_dir / "train.csv", "--artifacts", tmp_path / "annotations.csv", "--insert", "black_frame,ruler",
    )  # fmt: skip
    assert list(zip(table["artifact"], table["test"], strict=True)) == [
        ("(all)", "all"), ("dark_corner", "with"), ("dark_corner", "without"),
        ("dark_corner", "inserted black_frame"), ("ruler (unlabelled)", "inserted ruler"),
    ]  # fmt: skip
    # a folder of images with a labelled CSV is audited whole; unlabelled artifacts are pasted onto every image
    assert table.iloc[0]["images"] == 48 and table.iloc[-1]["images"] == 48


def test_bad_input_is_one_clear_error(synthetic_dir, checkpoint, tmp_path, capsys):
    base = ["--model-path", str(checkpoint), "--data-dir", str(synthetic_dir), "--out", str(tmp_path / "a.csv")]
    base += ["--allow-missing-meta"]
    for extra, expected in (
        (["--artifacts", str(tmp_path / "missing.csv")], "missing.csv"),
        (["--artifacts", str(synthetic_dir / "gans_biases.csv"), "--insert", "tattoo"], "tattoo"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            audit.main(base + extra)
        error = capsys.readouterr().err
        assert exit_info.value.code == 2 and expected in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "a.csv").exists()


def test_counterfactual_counts_follow_the_model(synthetic_dir, checkpoint, tmp_path, monkeypatch):
    """With a stand-in model whose P(melanoma) grows as the image darkens, a pasted black frame must raise the
    probability and switch benign calls to malignant, never the other way round."""

    def darkness_model(predictor, frame, transform=None, augment_seed=None, **unused):
        dataset = make_dataset(predictor.loaded, frame, transform, augment_seed)
        means = np.array([dataset[(0, i)]["image"].mean().item() for i in range(len(dataset))])
        return 1 / (1 + np.exp(4 * means))

    monkeypatch.setattr(audit.MelanomaPredictor, "probabilities", darkness_model)
    table = run_audit(
        tmp_path, "--model-path", checkpoint, "--data-dir", synthetic_dir, "--artifacts",
        synthetic_dir / "gans_biases.csv", "--insert", "black_frame", "--threshold", "0.15",
    )  # fmt: skip
    framed = table.set_index("test").loc["inserted black_frame"]
    assert framed["mean_shift"] > 0.05
    assert framed["benign_to_malignant"] > 0 and framed["malignant_to_benign"] == 0
    assert framed["specificity"] < table.set_index(["artifact", "test"]).loc[("black_frame", "without"), "specificity"]


def test_leftover_temp_files_of_the_output_are_removed(synthetic_dir, checkpoint, tmp_path):
    leftover, other = tmp_path / ".audit.csv.x81bq.tmp", tmp_path / ".notes.txt.x81bq.tmp"
    leftover.write_text("half a table")
    other.write_text("not audit.py's")
    run_audit(
        tmp_path, "--model-path", checkpoint, "--data-dir", synthetic_dir, "--artifacts",
        synthetic_dir / "gans_biases.csv", "--insert", "",
    )  # fmt: skip
    assert not leftover.exists() and other.exists()


def test_nothing_pasted_changes_nothing(synthetic_dir, checkpoint, tmp_path, monkeypatch):
    """The metadata is encoded once for every audited row: a subset encoded on its own recounted each patient's
    images, so that the "inserted" rows differed from the reference even with nothing pasted."""
    monkeypatch.setattr(audit, "paste_artifact", lambda image, kind, rng: image.copy())
    table = run_audit(
        tmp_path, "--model-path", checkpoint, "--data-dir", synthetic_dir, "--artifacts",
        synthetic_dir / "gans_biases.csv",
    )  # fmt: skip
    inserted = table[table["test"].str.startswith("inserted")]
    assert len(inserted) == 3 and (inserted["images"] > 0).all()
    np.testing.assert_allclose(inserted["mean_shift"], 0, atol=1e-6)
    assert (inserted["benign_to_malignant"] == 0).all() and (inserted["malignant_to_benign"] == 0).all()


def test_an_artifact_on_every_image_gives_a_row_that_is_not_measurable(synthetic_dir, checkpoint, tmp_path, capsys):
    names = pd.read_csv(synthetic_dir / "train.csv")["image_name"]
    pd.DataFrame({"image_name": names, "black_frame": 1}).to_csv(tmp_path / "framed.csv", index=False)
    table = run_audit(
        tmp_path, "--model-path", checkpoint, "--data-dir", synthetic_dir, "--artifacts", tmp_path / "framed.csv",
        "--insert", "black_frame",
    )  # fmt: skip
    row = table.set_index("test").loc["inserted black_frame"]
    assert row["images"] == 0 and np.isnan(row["auc"]) and np.isnan(row["mean_shift"])
    assert pd.isna(row["benign_to_malignant"])
    assert "no audited image is labelled without black_frame" in capsys.readouterr().out


def test_two_files_of_one_image_are_refused_naming_both(synthetic_dir, checkpoint, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(synthetic_dir, data)
    names = pd.read_csv(data / "train.csv")["image_name"]
    image = cv2.imread(str(data / "train" / "train" / f"{names[0]}.jpg"))
    cv2.imwrite(str(data / "train" / "train" / f"{names[0]}.png"), image)
    lines = [f"{name}.jpg,0,0,0,0,0,0" for name in names] + [f"{names[0]}.png,0,0,0,1,0,0"]
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        audit.main([
            "--model-path", str(checkpoint), "--data-dir", str(data), "--artifacts", str(tmp_path / "labels.csv"),
            "--all-rows", "--out", str(tmp_path / "a.csv"), "--num-workers", "0", "--allow-missing-meta",
        ])  # fmt: skip
    error = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(error.splitlines()) == 1, error
    assert f"{names[0]}.jpg (line 1)" in error and f"{names[0]}.png (line {len(names) + 1})" in error
    assert not (tmp_path / "a.csv").exists()
