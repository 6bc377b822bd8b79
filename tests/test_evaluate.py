import json

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score, roc_curve

import evaluate
import train
from melanoma_audit.cam import grad_cam, select_cam_images
from melanoma_audit.report_metrics import bootstrap_auc, calibration, partial_auc_above_tpr, threshold_for_sensitivity
from models import MelanomaNet

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(synthetic_dir, tmp_path_factory):
    """One --use-meta train.py run (checkpoint, metrics log, out-of-fold CSV) at 64 px, one epoch."""
    out = tmp_path_factory.mktemp("evaluate_run")
    train.main([
        "--save-name", "r", "--data-dir", str(synthetic_dir), "--image-size", "64", "--n-epochs", "1",
        "--enet-type", "efficientnet-b0", "--no-pretrained", "--batch-size", "16", "--num-workers", "0",
        "--n-folds", "3", "--model-dir", str(out / "weights"), "--log-dir", str(out / "logs"), "--use-meta",
    ])  # fmt: skip
    return {"checkpoint": out / "weights" / "r_best.pth", "oof": out / "logs" / "oof_r.csv"}


def assert_png(path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and min(pixels.shape[:2]) > 100 and pixels.std() > 0  # a real picture, not blank


def test_report_from_out_of_fold_predictions_with_cams(run, synthetic_dir, tmp_path):
    report = tmp_path / "report"
    metrics = evaluate.main([
        "--oof", str(run["oof"]), "--out-dir", str(report), "--cam", "2", "--model-path", str(run["checkpoint"]),
        "--data-dir", str(synthetic_dir), "--n-bootstrap", "200", "--allow-missing-meta",
    ])  # fmt: skip
    oof = pd.read_csv(run["oof"])
    written = json.loads((report / "metrics.json").read_text())
    assert written["n_images"] == len(oof) and written["n_melanoma"] == int(oof["target"].sum())
    assert written["roc_auc"] == pytest.approx(roc_auc_score(oof["target"], oof["prob"]))
    assert written["roc_auc"] == pytest.approx(metrics["roc_auc"])
    for key in ("roc_auc_ci95", "pauc_above_80_tpr", "average_precision", "at_threshold", "at_90_sensitivity"):
        assert key in written
    assert written["at_90_sensitivity"]["sensitivity"] >= 0.9
    assert written["at_90_sensitivity"]["threshold_fitted_on"] == "the reported rows (in-sample, optimistic)"
    matrix = written["at_threshold"]["confusion_matrix"]
    assert sum(matrix.values()) == len(oof) and matrix["tp"] + matrix["fn"] == oof["target"].sum()
    # --data-dir's train.csv holds patient ids: the interval resamples patients, a row without one on its own
    patients = oof.merge(pd.read_csv(synthetic_dir / "train.csv"), on="image_name")["patient_id"]
    assert written["bootstrap_unit"] == "patient"
    assert written["n_bootstrap_units"] == patients.nunique() + patients.isna().sum() < len(oof)
    assert written["calibration"]["brier"] == pytest.approx(np.mean((oof["prob"] - oof["target"]) ** 2))
    assert sum(b["images"] for b in written["calibration"]["bins"]) == len(oof)
    # the training curves come from the metrics log found beside the OOF file
    for name in ("roc.png", "pr.png", "confusion_matrix.png", "reliability.png", "training_curves.png"):
        assert_png(report / name)
    correct = ((oof["prob"] >= 0.5).astype(int) == oof["target"]).sum()
    cams = sorted((report / "cam").glob("*.png"))
    assert len(cams) == min(2, correct) + min(2, len(oof) - correct)
    assert {path.name.split("_")[0] for path in cams} <= {"confident", "wrong"}
    for path in cams:
        assert_png(path)
    # report.html embeds every figure and overlay, and shows the checkpoint's configuration
    page = (report / "report.html").read_text()
    assert page.count('<img src="data:image/png;base64,') == 5 + len(cams)
    for cam in cams:
        assert f'alt="{cam.stem}"' in page
    assert "<td>enet_type</td><td><code>efficientnet-b0</code></td>" in page
    assert f"<td>checkpoint</td><td><code>{run['checkpoint']}</code></td>" in page


def test_scores_joined_with_a_labels_file(run, synthetic_dir, tmp_path, capsys):
    oof = pd.read_csv(run["oof"])
    submission = tmp_path / "submission.csv"
    oof[["image_name", "prob"]].rename(columns={"prob": "target"}).to_csv(submission, index=False)
    metrics = evaluate.main([
        "--pred", str(submission), "--labels", str(synthetic_dir / "train.csv"), "--out-dir", str(tmp_path / "r"),
        "--n-bootstrap", "50",
    ])  # fmt: skip
    assert metrics["roc_auc"] == pytest.approx(roc_auc_score(oof["target"], oof["prob"]))
    assert not (tmp_path / "r" / "training_curves.png").exists()  # no metrics log for a submission
    # without labels: one clear sentence, exit code 2
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--pred", str(submission), "--out-dir", str(tmp_path / "r2")])
    assert exit_info.value.code == 2 and "--labels" in capsys.readouterr().err


def write_predictions(path, targets, probs, names):
    pd.DataFrame({"image_name": names, "target": targets, "prob": probs}).to_csv(path, index=False)
    return str(path)


def test_threshold_fitted_on_other_rows(tmp_path, capsys):
    """--threshold-from: the 90 %-sensitivity threshold comes from the validation rows and is only applied to the
    reported ones, whose own sensitivity at it is then whatever it is."""
    rng = np.random.default_rng(3)
    targets = rng.integers(0, 2, 300)
    probs = np.clip(0.35 * targets + rng.random(300) * 0.65, 0, 1)
    names = [f"img{i}" for i in range(300)]
    fit = write_predictions(tmp_path / "val.csv", targets[:150], probs[:150], names[:150])  # an OOF file
    # the reported rows as predict.py writes them (target: the score), their labels apart, without val.csv's
    pd.DataFrame({"image_name": names[150:], "target": probs[150:]}).to_csv(tmp_path / "pred.csv", index=False)
    pd.DataFrame({"image_name": names[150:], "target": targets[150:]}).to_csv(tmp_path / "labels.csv", index=False)
    metrics = evaluate.main([
        "--pred", str(tmp_path / "pred.csv"), "--labels", str(tmp_path / "labels.csv"), "--threshold-from", fit,
        "--out-dir", str(tmp_path / "r"), "--n-bootstrap", "50",
    ])  # fmt: skip
    report = write_predictions(tmp_path / "test.csv", targets[150:], probs[150:], names[150:])
    point = metrics["at_90_sensitivity"]
    expected = threshold_for_sensitivity(targets[:150], probs[:150], 0.9)
    assert point["threshold"] == expected and point["threshold_fitted_on"] == fit
    assert expected != threshold_for_sensitivity(targets[150:], probs[150:], 0.9)  # in-sample would differ
    assert point["sensitivity"] == pytest.approx((probs[150:][targets[150:] == 1] >= expected).mean())
    assert metrics["n_images"] == 150 and metrics["bootstrap_unit"] == "image"
    assert f"fitted on {fit}" in capsys.readouterr().out
    # fitting on the reported rows again, or on logits, is refused in one sentence
    for pred, threshold_from, expected_error in (
        (report, report, "share 150 image(s)"),
        (report, write_predictions(tmp_path / "logits.csv", targets[:150], probs[:150] * 4 - 2, names[:150]), "0..1"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            evaluate.main(["--pred", pred, "--threshold-from", threshold_from, "--out-dir", str(tmp_path / "x")])
        error = capsys.readouterr().err
        assert exit_info.value.code == 2 and expected_error in error and len(error.strip().splitlines()) == 1


def test_bootstrap_resamples_patients_from_a_labels_column(tmp_path):
    """Ten images per patient, all alike: resampling images pretends there are ten times more independent cases
    than there are; resampling patients gives the wider, honest interval. No patient id: a patient of its own."""
    rng = np.random.default_rng(0)
    targets = np.repeat(rng.integers(0, 2, 40), 10)
    probs = np.repeat(rng.random(40), 10) * 0.6 + targets * 0.3
    patients = np.repeat([f"p{i}" for i in range(40)], 10)
    image_low, image_high = bootstrap_auc(targets, probs, 400, seed=0)
    patient_low, patient_high = bootstrap_auc(targets, probs, 400, seed=0, groups=patients)
    assert patient_high - patient_low > 2 * (image_high - image_low)

    names = [f"img{i}" for i in range(400)]
    labels = pd.DataFrame({"image_name": names, "target": targets, "patient_id": patients})
    labels.loc[:9, "patient_id"] = None  # patient p0's images lose their id: ten patients of one image each
    labels.to_csv(tmp_path / "labels.csv", index=False)
    pd.DataFrame({"image_name": names, "target": probs}).to_csv(tmp_path / "pred.csv", index=False)
    metrics = evaluate.main([
        "--pred", str(tmp_path / "pred.csv"), "--labels", str(tmp_path / "labels.csv"), "--out-dir",
        str(tmp_path / "r"), "--n-bootstrap", "400",
    ])  # fmt: skip
    assert metrics["bootstrap_unit"] == "patient" and metrics["n_bootstrap_units"] == 39 + 10
    low, high = metrics["roc_auc_ci95"]
    assert high - low > 1.5 * (image_high - image_low)


def test_a_full_report_folder_is_kept_without_overwrite(run, tmp_path, capsys):
    report = tmp_path / "report"
    report.mkdir()
    (report / "metrics.json").write_text("earlier")
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--oof", str(run["oof"]), "--out-dir", str(report)])
    assert exit_info.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert (report / "metrics.json").read_text() == "earlier"


def test_metric_helpers():
    targets = np.array([0, 0, 0, 1, 1, 1, 0, 1])
    perfect = targets * 0.5 + 0.25
    assert partial_auc_above_tpr(targets, perfect) == pytest.approx(0.2)
    assert partial_auc_above_tpr(targets, 1 - perfect) == pytest.approx(0.0)
    rng = np.random.default_rng(0)
    targets, probs = rng.integers(0, 2, 400), rng.random(400)
    # the area between the ROC curve and the line TPR = 0.8, integrated over FPR on a fine grid
    fpr, tpr, _ = roc_curve(targets, probs)
    grid = np.linspace(0, 1, 200_001)
    above = np.clip(np.interp(grid, fpr, tpr) - 0.8, 0, None)
    assert partial_auc_above_tpr(targets, probs) == pytest.approx(np.trapezoid(above, grid), abs=1e-4)
    threshold = threshold_for_sensitivity(targets, probs, 0.9)
    positives = probs[targets == 1]
    assert (positives >= threshold).mean() >= 0.9 > (positives > threshold).mean()
    low, high = bootstrap_auc(targets, probs, 300, seed=1)
    assert low < roc_auc_score(targets, probs) < high
    assert bootstrap_auc(targets, probs, 300, seed=1) == [low, high]


def test_calibration_by_hand():
    # bin [0.1, 0.2): four images at 0.1, one melanoma (0.25); bin [0.9, 1]: two at 0.9, both melanoma
    targets, probs = np.array([0, 0, 0, 1, 1, 1]), np.array([0.1, 0.1, 0.1, 0.1, 0.9, 0.9])
    result = calibration(targets, probs)
    assert result["ece"] == pytest.approx((4 * 0.15 + 2 * 0.1) / 6)
    assert result["brier"] == pytest.approx((3 * 0.01 + 0.81 + 2 * 0.01) / 6)
    assert [(b["mean_predicted"], b["fraction_melanoma"], b["images"]) for b in result["bins"]] == [
        pytest.approx((0.1, 0.25, 4)),
        pytest.approx((0.9, 1.0, 2)),
    ]
    calibrated = np.repeat([0.25, 0.75], 4)  # each bin's melanoma fraction equals its probability
    assert calibration(np.array([1, 0, 0, 0, 1, 1, 1, 0]), calibrated)["ece"] == pytest.approx(0.0)


def test_cam_selection_takes_confident_correct_and_most_wrong():
    frame = pd.DataFrame({
        "image_name": list("abcdef"), "target": [1, 0, 1, 0, 1, 0], "prob": [0.99, 0.02, 0.6, 0.9, 0.1, 0.4],
    })  # fmt: skip
    chosen = select_cam_images(frame, 0.5, 2)
    assert chosen[chosen["group"] == "confident"]["image_name"].tolist() == ["a", "b"]
    assert chosen[chosen["group"] == "wrong"]["image_name"].tolist() == ["d", "e"]
    assert chosen.set_index("image_name")["explain_melanoma"].to_dict() == {
        "a": True,
        "b": False,
        "d": True,
        "e": False,
    }


def test_grad_cam_maps_are_normalised_per_image():
    torch.manual_seed(0)
    model = MelanomaNet("efficientnet-b0", pretrained=False).eval()
    images = torch.randn(3, 3, 64, 64)
    cams = grad_cam(model, images, None, torch.tensor([True, False, True]))
    assert cams.shape == (3, 2, 2)  # the last conv block of b0 has stride 32
    peaks = cams.max(axis=(1, 2))
    assert cams.min() >= 0 and peaks.max() == pytest.approx(1.0)
    assert all(peak == pytest.approx(1.0) or peak == 0 for peak in peaks)  # scaled to 1, or nothing to show
    assert all(parameter.grad is None for parameter in model.parameters())  # the model is left untouched


def test_leftover_temp_files_of_a_killed_report_are_removed(run, tmp_path):
    """A report killed while writing leaves only .<file>.<random>.tmp files: the folder counts as empty (no
    --overwrite needed) and they are deleted; a file of someone else's is kept."""
    report = tmp_path / "report"
    report.mkdir()
    leftovers = [report / ".metrics.json.a1b2c3.tmp", report / ".roc.png.d4e5f6.tmp"]
    for path in leftovers:
        path.write_text("half written")
    evaluate.main(["--oof", str(run["oof"]), "--out-dir", str(report), "--n-bootstrap", "20"])
    assert not any(path.exists() for path in leftovers)
    assert (report / "metrics.json").is_file()

    (report / "cam").mkdir()
    cam_leftover, other = report / "cam" / ".wrong_01_SYN_1.png.g7h8i9.tmp", report / "cam" / ".notes.txt.j1k2.tmp"
    cam_leftover.write_text("half an overlay")
    other.write_text("not evaluate.py's")
    evaluate.main(["--oof", str(run["oof"]), "--out-dir", str(report), "--n-bootstrap", "20", "--overwrite"])
    assert not cam_leftover.exists() and other.exists()


def evaluate_fails(capsys, argv, *fragments):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([*map(str, argv), "--n-bootstrap", "20"])
    error = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(error.splitlines()) == 1 and "Traceback" not in error, error
    for fragment in fragments:
        assert fragment in error, error


def test_repeated_rows_blank_labels_and_rank_scores_are_refused(tmp_path, capsys):
    """A repeated melanoma row used to count twice (average precision 0.46 became 0.63 here); a blank target was
    reported as 'nan'; the ranks of predict.py --rank-average are no probabilities."""
    names = [f"img{i}" for i in range(8)]
    targets, probs = [1, 0, 0, 1, 0, 0, 1, 0], [0.2, 0.9, 0.8, 0.7, 0.1, 0.3, 0.4, 0.6]
    oof = pd.DataFrame({"image_name": names, "target": targets, "prob": probs})
    oof.to_csv(tmp_path / "oof.csv", index=False)
    repeated = pd.concat([oof, oof.iloc[[3]]])
    repeated.to_csv(tmp_path / "repeated.csv", index=False)
    evaluate_fails(capsys, ["--pred", tmp_path / "repeated.csv", "--out-dir", tmp_path / "r"], "lists image img3 twice")

    pd.DataFrame({"image_name": names, "target": probs}).to_csv(tmp_path / "scores.csv", index=False)
    repeated[["image_name", "target"]].to_csv(tmp_path / "labels.csv", index=False)
    command = ["--pred", tmp_path / "scores.csv", "--labels", tmp_path / "labels.csv", "--out-dir", tmp_path / "r"]
    evaluate_fails(capsys, command, "labels.csv lists image img3 twice")

    blank = oof.astype({"target": object})
    blank.loc[5, "target"] = None
    blank.to_csv(tmp_path / "blank.csv", index=False)
    evaluate_fails(
        capsys, ["--pred", tmp_path / "blank.csv", "--out-dir", tmp_path / "r"], "has no target for image img5"
    )

    pd.DataFrame({"image_name": names, "rank_score": probs}).to_csv(tmp_path / "ranks.csv", index=False)
    command = ["--pred", tmp_path / "ranks.csv", "--labels", tmp_path / "oof.csv", "--out-dir", tmp_path / "r"]
    evaluate_fails(capsys, command, "holds rank scores (predict.py --rank-average), not probabilities")
    assert not (tmp_path / "r").exists()
