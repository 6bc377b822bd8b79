"""The artifact detector: annotation files, the masked loss and metrics, thresholds, and train / val / test
end to end on tiny synthetic images (efficientnet-b0, 32 px, random weights)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import multi_classification as mc  # noqa: E402
from melanoma_audit import (
    detector_training,  # noqa: E402
    engine,  # noqa: E402
)
from melanoma_audit.annotations import DEFAULT_ARTIFACT_HEADS, read_artifact_annotations  # noqa: E402
from melanoma_audit.checkpoints import load_checkpoint  # noqa: E402
from melanoma_audit.cli import claim_file  # noqa: E402
from melanoma_audit.metrics import best_f1_threshold, choose_thresholds, head_metrics  # noqa: E402
from melanoma_audit.synthetic_dataset import make_synthetic_dataset  # noqa: E402
from utils import UserError  # noqa: E402

ISIC2018 = Path(__file__).resolve().parents[2] / "shared" / "data" / "isic2018"
TINY = [
    "--enet_type",
    "efficientnet-b0",
    "--image_size",
    "32",
    "--no-pretrained",
    "--num_workers",
    "0",
    "--batch",
    "16",
]


def write_images(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        cv2.imwrite(str(folder / name), np.full((40, 40, 3), 128, dtype=np.uint8))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    """36 train images with the six drawn artifact heads, 11 test images (not a multiple of the batch size)."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), n_train=36, n_test=11, image_size=64, seed=3)


def train_argv(synthetic: Path, model_path: Path, epochs: int) -> list[str]:
    """The seed's train command on the synthetic images, shrunk to seconds."""
    argv = ["--img_path", str(synthetic / "train" / "train"), "--ann_path", str(synthetic / "gans_biases.csv")]
    return [*argv, "--mode", "train", "--model_path", str(model_path), "--epochs", str(epochs), *TINY]


@pytest.fixture(scope="module")
def trained(synthetic, tmp_path_factory) -> Path:
    """A detector trained for one epoch by the seed's train command."""
    model_path = tmp_path_factory.mktemp("model") / "detector.pth"
    mc.main(train_argv(synthetic, model_path, epochs=1))
    return model_path


# --------------------------------------------------------------------------- annotation files


def test_reads_the_original_headerless_form(tmp_path):
    write_images(tmp_path, ["a.jpg", "b.jpg"])
    (tmp_path / "ann.csv").write_text("a.jpg,1,0,0,1,0,0\nb.jpg,0,0,1,0,1,1\n")
    frame, heads, labels = read_artifact_annotations(tmp_path / "ann.csv", tmp_path)
    assert heads == list(DEFAULT_ARTIFACT_HEADS)
    assert frame["image_name"].tolist() == ["a.jpg", "b.jpg"]
    assert frame["filepath"].tolist() == [str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg")]
    np.testing.assert_array_equal(labels, [[1, 0, 0, 1, 0, 0], [0, 0, 1, 0, 1, 1]])


def test_reads_a_header_form_with_blanks_and_names_without_extension(tmp_path):
    write_images(tmp_path, ["a.jpg", "b.png"])
    (tmp_path / "ann.csv").write_text("image_name,dark_corner,ruler,ink\na,1,,0\nb,,0,1\n")
    frame, heads, labels = read_artifact_annotations(tmp_path / "ann.csv", tmp_path)
    assert heads == ["dark_corner", "ruler", "ink"]
    assert frame["filepath"].tolist() == [str(tmp_path / "a.jpg"), str(tmp_path / "b.png")]
    np.testing.assert_array_equal(labels, [[1, np.nan, 0], [np.nan, 0, 1]])


def test_a_headerless_file_may_start_with_a_row_of_blank_labels(tmp_path):
    write_images(tmp_path, ["a.jpg", "b.jpg"])
    (tmp_path / "ann.csv").write_text("a.jpg,,,,,,\nb.jpg,0,0,1,0,1,1\n")
    frame, heads, labels = read_artifact_annotations(tmp_path / "ann.csv", tmp_path)
    assert heads == list(DEFAULT_ARTIFACT_HEADS) and frame["image_name"].tolist() == ["a.jpg", "b.jpg"]
    assert np.isnan(labels[0]).all() and labels[1].tolist() == [0, 0, 1, 0, 1, 1]


def test_prob_columns_are_ignored_only_beside_their_head(tmp_path):
    write_images(tmp_path, ["a.jpg"])
    (tmp_path / "ann.csv").write_text("image_name,hair,hair_prob,ink_prob\na.jpg,1,0.93,0\n")
    _, heads, labels = read_artifact_annotations(tmp_path / "ann.csv", tmp_path)
    assert heads == ["hair", "ink_prob"]  # ink_prob has no `ink` beside it: it is a head of its own
    np.testing.assert_array_equal(labels, [[1, 0]])


@pytest.mark.skipif(not (ISIC2018 / "bias.csv").is_file(), reason="shared isic2018 data not present")
def test_reads_the_shared_isic2018_bias_file():
    frame, heads, labels = read_artifact_annotations(ISIC2018 / "bias.csv", ISIC2018 / "train" / "train")
    assert heads == ["dark_corner", "hair", "gel_border", "gel_bubble", "ruler", "ink", "patches"]
    assert labels.shape == (1600, 7) and not np.isnan(labels).any()
    assert frame["filepath"].str.endswith(".jpg").all()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "is empty"),
        ("a.jpg\nb.jpg\n", "line 1 has no label columns"),
        ("image_name,hair\n", "has a header but no rows"),
        ("a.jpg,1,0,0,0,0,0\nb.jpg,1,0,2,0,0,0\n", "line 2 has '2' for hair_medium"),
        ("image_name,hair,ruler\na,1,0\nb,yes,0\n", "line 3 has 'yes' for hair"),
        ("image_name,hair,ruler\na,1,0\nb,1\n", "line 3 has 2 values"),
        ("a.jpg,1,0,0\n", "line 1 has 3 labels without a header"),
        ("image_name,hair\na,1\nmissing,0\n", "line 3 names image missing"),
        ("image_name,hair\na,1\nb,0\na.jpg,0\n", "line 4 repeats image a.jpg of line 2"),
        ("image_name,hair,hair\na,1,0\n", "names head hair twice"),
        ("image_name,hair\n,1\n", "line 2 has no image name"),
        ("a.jpg,,,,,,\nb.jpg,1,0\n", "line 2 has 3 values"),  # the blank first row is a row, not a header
    ],
)
def test_bad_annotation_files_are_one_clear_error(tmp_path, content, message):
    write_images(tmp_path, ["a.jpg", "b.jpg"])
    (tmp_path / "ann.csv").write_text(content)
    with pytest.raises(UserError, match=message):
        read_artifact_annotations(tmp_path / "ann.csv", tmp_path)


CELLS = st.sampled_from(
    ["a.jpg", "a", "b.png", "c.jpg", "image_name", "hair", "hair_prob", "0", "1", "", "2", "nan", "-1", " 1"]
)
CSV_LIKE = st.lists(st.lists(CELLS, max_size=8), max_size=6).map(
    lambda rows: "".join(",".join(row) + "\n" for row in rows).encode()
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.one_of(CSV_LIKE, st.text(max_size=200).map(str.encode), st.binary(max_size=200)))
def test_any_annotation_file_parses_or_is_a_user_error(tmp_path, content):
    write_images(tmp_path, ["a.jpg", "b.png"])
    (tmp_path / "ann.csv").write_bytes(content)
    try:
        frame, heads, labels = read_artifact_annotations(tmp_path / "ann.csv", tmp_path)
    except UserError as error:
        assert "\n" not in str(error)
        return
    assert heads and labels.shape == (len(frame), len(heads)) and len(frame) > 0
    assert np.isin(labels[~np.isnan(labels)], [0, 1]).all()


def test_a_bad_annotation_file_exits_with_code_2_and_one_line(tmp_path, capsys):
    write_images(tmp_path, ["a.jpg"])
    (tmp_path / "ann.csv").write_text("a.jpg,1,0,0,0,0,x\n")
    argv = ["--img_path", str(tmp_path), "--ann_path", str(tmp_path / "ann.csv"), "--mode", "train"]
    with pytest.raises(SystemExit) as exit_info:
        mc.main([*argv, "--model_path", str(tmp_path / "m.pth"), *TINY])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "line 1 has 'x' for other" in error
    assert not (tmp_path / "m.pth").exists()


# --------------------------------------------------------------------------- loss, metrics, thresholds, split


def test_masked_bce_leaves_blank_labels_out_of_loss_and_gradient():
    logits = torch.randn(4, 3, requires_grad=True)
    targets = torch.tensor([[1, 0, np.nan], [np.nan, 1, 0], [0, np.nan, np.nan], [1, 1, 0]], dtype=torch.float32)
    loss = detector_training.masked_bce(logits, targets)
    annotated = ~torch.isnan(targets)
    expected = F.binary_cross_entropy_with_logits(logits[annotated], targets[annotated])
    assert torch.allclose(loss, expected)
    loss.backward()
    assert (logits.grad[~annotated] == 0).all() and (logits.grad[annotated] != 0).all()

    blank = detector_training.masked_bce(logits, torch.full((4, 3), float("nan")))
    assert blank.item() == 0.0


def test_head_metrics_leave_blank_labels_out():
    targets = np.array([1, 0, np.nan, 1, 0, np.nan, 0])
    probs = np.array([0.9, 0.2, 0.99, 0.4, 0.6, 0.01, 0.1])
    metrics = head_metrics(targets, probs, threshold=0.5)
    annotated = ~np.isnan(targets)
    assert metrics == head_metrics(targets[annotated], probs[annotated], threshold=0.5)
    assert metrics["support"] == 5 and metrics["positives"] == 2
    # at 0.5: predicted positive 0.9 (right) and 0.6 (wrong); 0.4 missed
    assert metrics["precision"] == 0.5 and metrics["recall"] == 0.5 and metrics["acc"] == 0.6
    assert metrics["auc"] == pytest.approx(5 / 6)


def test_best_f1_threshold_picks_the_max_f1_cutoff():
    # cut-offs 0.35 -> F1 0.8, 0.4 -> 0.5, 0.8 -> 0.67
    assert best_f1_threshold(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == 0.35
    assert best_f1_threshold(np.array([0, 0]), np.array([0.1, 0.4])) == 0.5


def test_split_is_seeded_disjoint_and_stratified():
    labels = np.array([[1, 0]] * 20 + [[0, np.nan]] * 20, dtype=float)
    train, val = detector_training.split_train_val(labels, 0.8, seed=1)
    assert len(val) == 8 and sorted(np.concatenate([train, val]).tolist()) == list(range(40))
    assert (val < 20).sum() == 4  # each label combination keeps its share
    again, _ = detector_training.split_train_val(labels, 0.8, seed=1)
    other, _ = detector_training.split_train_val(labels, 0.8, seed=2)
    np.testing.assert_array_equal(train, again)
    assert not np.array_equal(train, other)
    with pytest.raises(UserError, match="--ratio 0.99 leaves"):
        detector_training.split_train_val(labels, 0.99, seed=1)


def test_both_flag_spellings_and_the_original_defaults():
    underscore = mc.parse_args(["--img_path", "d", "--ann_path", "a", "--mode", "val", "--model_path", "m"])
    hyphen = mc.parse_args(["--img-path", "d", "--ann-path", "a", "--mode", "val", "--model-path", "m"])
    assert vars(underscore) == vars(hyphen)
    assert (underscore.ratio, underscore.init_lr, underscore.batch_size, underscore.enet_type) == (
        0.8,
        1e-4,
        16,
        "efficientnet-b2",
    )
    assert mc.parse_args(["--img_path", "d", "--mode", "test", "--model_path", "m", "--no-pretrained"]).init_lr == 1e-3


def test_bn_refresh_is_on_from_scratch_and_off_with_imagenet_weights():
    base = ["--img_path", "d", "--mode", "test", "--model_path", "m"]
    assert mc.parse_args([*base, "--no-pretrained"]).bn_refresh_batches == 10
    assert mc.parse_args(base).bn_refresh_batches == 0
    assert mc.parse_args([*base, "--bn_refresh_batches", "3"]).bn_refresh_batches == 3
    assert mc.parse_args([*base, "--bn-refresh-batches", "3"]).bn_refresh_batches == 3


def test_train_reestimates_batchnorm_before_each_validation(synthetic, tmp_path, monkeypatch):
    calls = []
    real_refresh = engine.refresh_batchnorm

    def spy(model, loader, runtime, max_batches):
        before = model.enet._bn1.running_mean.clone()
        real_refresh(model, loader, runtime, max_batches)
        calls.append((max_batches, not torch.equal(before, model.enet._bn1.running_mean)))

    monkeypatch.setattr(engine, "refresh_batchnorm", spy)
    mc.main([*train_argv(synthetic, tmp_path / "m.pth", epochs=2), "--bn_refresh_batches", "2"])
    assert calls == [(2, True), (2, True)]


# --------------------------------------------------------------------------- train, val, test


def test_train_keeps_heads_thresholds_normalisation_and_val_split(trained, synthetic, tmp_path):
    checkpoint = load_checkpoint(trained, "artifact")  # weights_only=True inside
    assert checkpoint["heads"] == list(DEFAULT_ARTIFACT_HEADS)
    # the stored thresholds are each head's max-F1 cut-off on the val split's probabilities (the model scores its
    # val images as it did when it chose them)
    frame, _, labels = read_artifact_annotations(synthetic / "gans_biases.csv", synthetic / "train" / "train")
    argv = ["--img_path", str(synthetic / "train" / "train"), "--mode", "test", "--model_path", str(trained)]
    scored = mc.main([*argv, "--num_workers", "0", "--save_path", str(tmp_path / "all.csv")])["annotations"]
    in_val = frame["image_name"].isin(checkpoint["val_images"]).to_numpy()
    probs = scored.set_index("image_name").loc[frame["image_name"][in_val], [f"{h}_prob" for h in checkpoint["heads"]]]
    assert checkpoint["thresholds"] == pytest.approx(choose_thresholds(labels[in_val], probs.to_numpy()), abs=1e-5)
    assert checkpoint["image_size"] == 32 and len(checkpoint["mean"]) == len(checkpoint["std"]) == 3
    assert len(checkpoint["val_images"]) == 36 - round(36 * 0.8)
    names = pd.read_csv(synthetic / "gans_biases.csv", header=None)[0]
    assert set(checkpoint["val_images"]) <= set(names)
    assert (trained.parent / "detector_last.pth").is_file() and (trained.parent / "detector_history.csv").is_file()


def test_val_scores_only_the_held_out_images_of_the_training_file(trained, synthetic):
    argv = ["--img_path", str(synthetic / "train" / "train"), "--ann_path", str(synthetic / "gans_biases.csv")]
    argv += ["--mode", "val", "--model_path", str(trained), "--num_workers", "0"]
    held_out = mc.main(argv)
    assert held_out["n_images"] == 7
    assert held_out["table"]["support"].tolist() == [7] * 6
    written = pd.read_csv(trained.parent / "detector_metrics.csv")
    assert written["head"].tolist() == list(DEFAULT_ARTIFACT_HEADS)
    assert set(written.columns) >= {"auc", "ap", "f1", "precision", "recall", "acc", "support"}
    assert written["thresholds_in_sample"].all()  # the stored thresholds were fitted on these very images
    assert mc.main([*argv, "--all", "--overwrite"])["n_images"] == 36


def test_a_detector_file_of_an_earlier_version_scores_as_it_did(trained, synthetic, tmp_path):
    """Detector files of earlier versions say "bias" where new ones say "artifact": they load and score alike."""
    checkpoint = torch.load(trained, weights_only=True)
    assert checkpoint["kind"] == "artifact"
    torch.save({**checkpoint, "kind": "bias"}, tmp_path / "old.pth")
    argv = ["--img_path", str(synthetic / "train" / "train"), "--mode", "test", "--num_workers", "0"]
    new = mc.main([*argv, "--model_path", str(trained), "--save_path", str(tmp_path / "new.csv")])
    old = mc.main([*argv, "--model_path", str(tmp_path / "old.pth"), "--save_path", str(tmp_path / "old.csv")])
    pd.testing.assert_frame_equal(old["annotations"], new["annotations"])


def val_fails(capsys, argv, *fragments):
    with pytest.raises(SystemExit) as exit_info:
        mc.main(argv)
    error = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(error.splitlines()) == 1 and "Traceback" not in error, error
    for fragment in fragments:
        assert fragment in error, error


def test_val_decides_held_out_rows_by_the_stored_names_whatever_the_bytes(trained, synthetic, tmp_path, capsys):
    """A CRLF copy of the training file was scored as if unseen (29 of its 36 rows training images); now the
    checkpoint's own lists decide, and the thresholds fitted on the val images are marked in-sample."""
    lines = (synthetic / "gans_biases.csv").read_text().splitlines()
    (tmp_path / "crlf.csv").write_bytes(("\r\n".join(lines) + "\r\n").encode())
    argv = ["--img_path", str(synthetic / "train" / "train"), "--mode", "val", "--model_path", str(trained)]
    argv += ["--num_workers", "0", "--save_path", str(tmp_path / "m.csv"), "--ann_path"]
    scored = mc.main([*argv, str(tmp_path / "crlf.csv")])
    assert scored["n_images"] == 7 and "holds 29 images" in capsys.readouterr().out
    assert pd.read_csv(tmp_path / "m.csv")["thresholds_in_sample"].all()
    # the metrics file follows the no-overwrite rule, the default one beside the model too
    val_fails(capsys, [*argv, str(tmp_path / "crlf.csv")], "m.csv already exists", "--overwrite")
    copy = tmp_path / "copy.pth"
    copy.write_bytes(trained.read_bytes())
    (tmp_path / "copy_metrics.csv").write_text("earlier\n")
    default = [*argv[:4], "--model_path", str(copy), "--num_workers", "0", "--ann_path", str(tmp_path / "crlf.csv")]
    val_fails(capsys, default, "copy_metrics.csv already exists")
    assert (tmp_path / "copy_metrics.csv").read_text() == "earlier\n"
    # one threshold of the user's own: nothing fitted on these images
    mc.main([*argv, str(tmp_path / "crlf.csv"), "--threshold", "0.5", "--overwrite"])
    assert not pd.read_csv(tmp_path / "m.csv")["thresholds_in_sample"].any()
    # a file of training images only, extensions dropped: nothing held out to score unless --all
    checkpoint = load_checkpoint(trained, "artifact")
    trained_on = pd.DataFrame({"image_name": [Path(name).stem for name in checkpoint["train_images"]], "hair_dense": 0})
    trained_on.to_csv(tmp_path / "seen.csv", index=False)
    val_fails(capsys, [*argv, str(tmp_path / "seen.csv"), "--overwrite"], "trained on every image", "--all")
    every = mc.main([*argv, str(tmp_path / "seen.csv"), "--overwrite", "--all"])
    assert every["n_images"] == 29 and "optimistic" in capsys.readouterr().out
    assert not pd.read_csv(tmp_path / "m.csv")["thresholds_in_sample"].any()  # no val image among them


def test_a_folder_for_an_output_file_is_refused(trained, synthetic, tmp_path, capsys):
    argv = ["--img_path", str(synthetic / "test" / "test"), "--mode", "test", "--num_workers", "0"]
    val_fails(capsys, [*argv, "--model_path", str(trained), "--save_path", str(tmp_path)], "--save_path", "is a folder")
    val_fails(capsys, [*argv, "--model_path", str(tmp_path)], f"--model_path {tmp_path} is a folder")


def test_save_path_is_guarded_as_every_output_and_named_in_each_refusal(trained, synthetic, tmp_path, capsys):
    argv = ["--img_path", str(synthetic / "test" / "test"), "--mode", "test", "--num_workers", "0"]
    argv += ["--model_path", str(trained)]
    save_path = tmp_path / "out" / "annotations.csv"
    save_path.parent.mkdir()
    leftover = save_path.parent / ".annotations.csv.a1b2c3.tmp"  # what a killed earlier write leaves
    leftover.write_text("partial")
    mc.main([*argv, "--save_path", str(save_path)])
    assert save_path.is_file() and not leftover.exists()
    val_fails(capsys, [*argv, "--save_path", str(save_path)], "already exists", "choose another --save_path")
    (tmp_path / "plain").write_text("a file")
    val_fails(capsys, [*argv, "--save_path", str(tmp_path / "plain" / "a.csv")], "folder of --save_path", "is a file")


def test_the_output_check_names_the_flag_it_is_given_and_keeps_the_out_wording(tmp_path):
    (tmp_path / "taken.csv").write_text("x")
    (tmp_path / "plain").write_text("a file")
    expected = {
        ("--out", tmp_path): f"--out {tmp_path} is a folder: name the file to write, e.g. {tmp_path / 'r.csv'}.",
        ("--out", tmp_path / "taken.csv"): "already exists: pass --overwrite to replace it, or choose another --out.",
        ("--out", tmp_path / "plain" / "a.csv"): f"the output folder {tmp_path / 'plain'} is a file",
        ("--save_path", tmp_path): f"--save_path {tmp_path} is a folder",
        ("--save_path", tmp_path / "taken.csv"): "or choose another --save_path.",
        ("--save_path", tmp_path / "plain" / "a.csv"): f"the folder of --save_path {tmp_path / 'plain'} is a file",
    }
    for (flag, path), message in expected.items():
        with pytest.raises(UserError) as error:
            claim_file(path, False, example="r.csv", flag=flag)
        assert message in str(error.value), (flag, path, str(error.value))
    claim_file(tmp_path / "taken.csv", True, flag="--save_path")  # --overwrite: replaced
    with pytest.raises(UserError, match="or choose another --save-name"):
        claim_file(tmp_path / "taken.csv", False, "choose another --save-name")


def test_test_mode_writes_one_row_per_image_and_reads_back(trained, synthetic, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for path in sorted((synthetic / "test" / "test").glob("*.jpg")):
        (images / path.name).write_bytes(path.read_bytes())
    cv2.imwrite(str(images / "extra.png"), cv2.imread(str(path)))
    (images / "notes.txt").write_text("not an image")
    save_path = tmp_path / "annotations.csv"
    argv = ["--img_path", str(images), "--mode", "test", "--model_path", str(trained), "--num_workers", "0"]
    result = mc.main([*argv, "--save_path", str(save_path), "--batch", "5"])  # 12 images: 5 + 5 + 2

    written = pd.read_csv(save_path)
    assert result["n_images"] == 12
    assert written["image_name"].tolist() == sorted(p.name for p in images.iterdir() if p.suffix != ".txt")
    heads = list(DEFAULT_ARTIFACT_HEADS)
    assert written.columns.tolist() == ["image_name", *heads, *[f"{head}_prob" for head in heads]]
    thresholds = load_checkpoint(trained, "artifact")["thresholds"]
    for head, threshold in zip(heads, thresholds, strict=True):
        np.testing.assert_array_equal(written[head], (written[f"{head}_prob"] >= threshold).astype(int))

    back = mc.main(
        [
            *argv[:3],
            "val",
            "--model_path",
            str(trained),
            "--ann_path",
            str(save_path),
            "--num_workers",
            "0",
            "--save_path",
            str(tmp_path / "back_metrics.csv"),
        ]
    )
    assert back["n_images"] == 12  # images the model never trained on: every row is scored
    assert not back["table"]["thresholds_in_sample"].any()  # its thresholds were fitted on other images

    everything = tmp_path / "everything.csv"
    mc.main([*argv, "--save_path", str(everything), "--threshold", "0"])
    assert (pd.read_csv(everything)[heads] == 1).all().all()


def test_test_mode_never_overwrites_an_existing_file(trained, synthetic, tmp_path, capsys):
    save_path = tmp_path / "mine.csv"
    save_path.write_text("image_name,hair\nx,1\n")
    argv = ["--img_path", str(synthetic / "test" / "test"), "--mode", "test", "--model_path", str(trained)]
    with pytest.raises(SystemExit) as exit_info:
        mc.main([*argv, "--save_path", str(save_path)])
    assert exit_info.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert save_path.read_text() == "image_name,hair\nx,1\n"


def test_an_undecodable_image_is_one_line_also_from_a_loader_worker(trained, synthetic, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for path in sorted((synthetic / "test" / "test").glob("*.jpg"))[:3]:
        (images / path.name).write_bytes(path.read_bytes())
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    argv = ["--img_path", str(images), "--mode", "test", "--model_path", str(trained), "--num_workers", "1"]
    with pytest.raises(SystemExit) as exit_info:
        mc.main([*argv, "--save_path", str(tmp_path / "out.csv")])
    error = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and error.count("\n") == 0
    assert error.startswith("error: image ") and "broken.jpg cannot be decoded" in error
    assert not (tmp_path / "out.csv").exists()


def test_val_refuses_a_file_with_other_heads_and_a_melanoma_checkpoint(trained, tmp_path, capsys):
    write_images(tmp_path, ["a.jpg"])
    (tmp_path / "ann.csv").write_text("image_name,dark_corner\na,1\n")
    argv = [
        "--img_path",
        str(tmp_path),
        "--ann_path",
        str(tmp_path / "ann.csv"),
        "--mode",
        "val",
        "--save_path",
        str(tmp_path / "m.csv"),
    ]
    with pytest.raises(SystemExit):
        mc.main([*argv, "--model_path", str(trained)])
    assert "detects hair_dense" in capsys.readouterr().err
    torch.save({"format": 1, "kind": "melanoma", "state_dict": {}}, tmp_path / "melanoma.pth")
    with pytest.raises(SystemExit):
        mc.main([*argv, "--model_path", str(tmp_path / "melanoma.pth")])
    assert "written by train.py" in capsys.readouterr().err


@contextlib.contextmanager
def storages_saved_as_cuda():
    """While active, torch.save records every CPU tensor as living on cuda:0, as a GPU-trained model does."""
    active = [True]

    def tagger(storage):
        return "cuda:0" if active[0] and storage.device.type == "cpu" else None

    torch.serialization.register_package(0, tagger, lambda storage, location: None)
    try:
        yield
    finally:
        active[0] = False  # the registry has no public unregister; an inactive tagger defers to the others


def test_a_model_saved_on_a_gpu_loads_on_the_cpu(trained, synthetic, tmp_path):
    checkpoint = load_checkpoint(trained, "artifact")
    gpu_model = tmp_path / "gpu.pth"
    with storages_saved_as_cuda():
        torch.save(checkpoint, gpu_model)
    if not torch.cuda.is_available():  # proves the file really asks for a GPU
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(gpu_model, weights_only=True)
    argv = ["--img_path", str(synthetic / "test" / "test"), "--mode", "test", "--device", "cpu"]
    argv += ["--num_workers", "0"]
    on_cpu = mc.main([*argv, "--model_path", str(gpu_model), "--save_path", str(tmp_path / "a.csv")])
    original = mc.main([*argv, "--model_path", str(trained), "--save_path", str(tmp_path / "b.csv")])
    pd.testing.assert_frame_equal(on_cpu["annotations"], original["annotations"])


@pytest.mark.parametrize("data_path", ["cpu", "gpu"])
def test_resume_ends_like_an_uninterrupted_run(synthetic, tmp_path, monkeypatch, device_pipeline_strengths, data_path):
    """The resumed run repeats the uninterrupted one bit for bit, on either data path."""

    def argv(model_path: Path) -> list[str]:
        return [*train_argv(synthetic, model_path, epochs=2), "--data-path", data_path]

    whole = mc.main(argv(tmp_path / "whole.pth"))
    # the gpu path: the detector's own augmentation for the training batches (and the BatchNorm refresh), none for
    # validation; the cpu path never goes through the device pipeline
    assert set(device_pipeline_strengths) == ({"artifact", "none"} if data_path == "gpu" else set())

    real_epoch = engine.train_one_epoch

    def crash_in_epoch_2(*args, **kwargs):
        if kwargs["epoch"] == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(engine, "train_one_epoch", crash_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        mc.main(argv(tmp_path / "cut.pth"))
    monkeypatch.setattr(engine, "train_one_epoch", real_epoch)
    with pytest.raises(SystemExit):  # the earlier run's files are kept unless told to resume or overwrite
        mc.main(argv(tmp_path / "cut.pth"))
    resumed = mc.main([*argv(tmp_path / "cut.pth"), "--resume"])

    assert resumed["best_epoch"] == whole["best_epoch"]
    pd.testing.assert_frame_equal(resumed["table"], whole["table"], check_exact=True)
    history = pd.read_csv(tmp_path / "cut_history.csv")
    assert history["epoch"].tolist() == [1] * 6 + [2] * 6
    pd.testing.assert_frame_equal(
        history.drop(columns="seconds"),
        pd.read_csv(tmp_path / "whole_history.csv").drop(columns="seconds"),
        check_exact=True,
    )


def test_compile_flag_compiles_the_detector_for_training_only(synthetic, tmp_path, eager_compile):
    mc.main([*train_argv(synthetic, tmp_path / "detector.pth", epochs=1), "--compile"])
    assert eager_compile == ["ArtifactNet"]
    state = load_checkpoint(tmp_path / "detector.pth", "artifact")["state_dict"]
    assert not any(key.startswith("_orig_mod") for key in state)


def test_device_data_path_scores_val_and_test(trained, synthetic, tmp_path, device_pipeline_strengths):
    # (training on the device data path, and its exact repeat: test_resume_ends_like_an_uninterrupted_run[gpu])
    argv = ["--img_path", str(synthetic / "train" / "train"), "--model_path", str(trained)]
    argv += ["--num_workers", "0", "--data-path", "gpu", "--save_path"]
    scored = mc.main(
        [*argv, str(tmp_path / "metrics.csv"), "--mode", "val", "--ann_path", str(synthetic / "gans_biases.csv")]
    )
    labelled = mc.main([*argv, str(tmp_path / "annotations.csv"), "--mode", "test"])
    assert scored["n_images"] == 7 and labelled["n_images"] == 36
    assert set(device_pipeline_strengths) == {"none"}
