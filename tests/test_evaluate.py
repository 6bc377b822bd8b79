import json

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

import evaluate
import train
from evaluate import bootstrap_auc, grad_cam, partial_auc_above_tpr, select_cam_images, threshold_for_sensitivity
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
        "--data-dir", str(synthetic_dir), "--n-bootstrap", "200",
    ])  # fmt: skip
    oof = pd.read_csv(run["oof"])
    written = json.loads((report / "metrics.json").read_text())
    assert written["n_images"] == len(oof) and written["n_melanoma"] == int(oof["target"].sum())
    assert written["roc_auc"] == pytest.approx(roc_auc_score(oof["target"], oof["prob"]))
    assert written["roc_auc"] == pytest.approx(metrics["roc_auc"])
    for key in ("roc_auc_ci95", "pauc_above_80_tpr", "average_precision", "at_threshold", "at_90_sensitivity"):
        assert key in written
    assert written["at_90_sensitivity"]["sensitivity"] >= 0.9
    matrix = written["at_threshold"]["confusion_matrix"]
    assert sum(matrix.values()) == len(oof) and matrix["tp"] + matrix["fn"] == oof["target"].sum()
    # the training curves come from the metrics log found beside the OOF file
    for name in ("roc.png", "pr.png", "confusion_matrix.png", "training_curves.png"):
        assert_png(report / name)
    correct = ((oof["prob"] >= 0.5).astype(int) == oof["target"]).sum()
    cams = sorted((report / "cam").glob("*.png"))
    assert len(cams) == min(2, correct) + min(2, len(oof) - correct)
    assert {path.name.split("_")[0] for path in cams} <= {"confident", "wrong"}
    for path in cams:
        assert_png(path)


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
    # McClish-standardised sklearn partial AUC of the swapped problem, turned back into the raw area
    standardised = roc_auc_score(1 - targets, -probs, max_fpr=0.2)
    assert partial_auc_above_tpr(targets, probs) == pytest.approx(0.02 + (2 * standardised - 1) * 0.18)
    threshold = threshold_for_sensitivity(targets, probs, 0.9)
    positives = probs[targets == 1]
    assert (positives >= threshold).mean() >= 0.9 > (positives > threshold).mean()
    low, high = bootstrap_auc(targets, probs, 300, seed=1)
    assert low < roc_auc_score(targets, probs) < high
    assert bootstrap_auc(targets, probs, 300, seed=1) == [low, high]


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
