"""train.py --fold none: a refit on every row for --n-epochs, with no validation, and predict.py using it for test
images only (tiny b0 runs at 32 px, one epoch)."""

import contextlib
import io
import json

import numpy as np
import pandas as pd
import pytest
import torch

import predict
import train
from melanoma_audit.checkpoints import load_checkpoint


def refit_command(data_dir, out_dir, *extra):
    return [
        "--save-name", "refit", "--data-dir", str(data_dir), "--image-size", "32", "--n-epochs", "1",
        "--enet-type", "efficientnet-b0", "--no-pretrained", "--batch-size", "16", "--num-workers", "0",
        "--fold", "none", "--use-meta", "--model-dir", str(out_dir / "weights"), "--log-dir", str(out_dir / "logs"),
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def refit_run(synthetic_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("refit")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        summary = train.main(refit_command(synthetic_dir, out))  # with the baselines on, as by default
    return out, summary, printed.getvalue()


def test_refit_trains_on_every_row_and_writes_no_validation_outputs(synthetic_dir, refit_run):
    out, summary, printed = refit_run
    assert "a refit on every row, no validation fold" in printed
    assert "baselines on this fold" not in printed and "no baselines" in printed  # fitted per fold: skipped
    weights, logs = out / "weights", out / "logs"
    assert summary["refit"] is True and len(summary["models"]) == 1
    assert sorted(p.name for p in weights.iterdir()) == ["refit_final.pth", "refit_last.pth"]  # no _best.pth
    assert sorted(p.name for p in logs.iterdir()) == ["log_refit.txt", "metrics_refit.jsonl", "tb"]  # no oof_refit.csv

    checkpoint = load_checkpoint(weights / "refit_final.pth", "melanoma")
    assert checkpoint["refit"] is True and checkpoint["val_images"] == [] and checkpoint["fold"] is None
    assert checkpoint["meta_model"] is not None  # late fusion's regression is fitted on every row as well
    assert "metrics" not in checkpoint  # nothing was validated
    assert checkpoint["config"]["folds"] == []

    n_train = len(pd.read_csv(synthetic_dir / "train.csv"))
    log = (logs / "log_refit.txt").read_text().splitlines()
    assert log and f"Refit on all {n_train} images (no validation fold), Epoch 1" in log[0]
    assert "auc" not in log[0]
    record = json.loads((logs / "metrics_refit.jsonl").read_text())
    assert record["refit"] is True and record["n_images"] == n_train and "auc" not in record


def test_predict_scores_test_images_with_a_refit_prefix(synthetic_dir, refit_run, tmp_path, capsys):
    out, _, _ = refit_run
    prefix = out / "weights" / "refit"
    result = predict.main(
        ["--data-dir", str(synthetic_dir), "--model-path", str(prefix), "--out", str(tmp_path / "sub.csv")]
        + ["--num-workers", "0", "--n-tta", "2"]
    )
    assert "is a refit" in capsys.readouterr().out  # the default --which best fell back to the final checkpoint
    assert result["image_name"].tolist() == pd.read_csv(synthetic_dir / "test.csv")["image_name"].tolist()
    assert result["target"].between(0, 1).all()
    final = predict.main(
        ["--data-dir", str(synthetic_dir), "--model-path", str(prefix) + "_final.pth", "--n-tta", "2"]
        + ["--out", str(tmp_path / "final.csv"), "--num-workers", "0"]
    )
    np.testing.assert_allclose(final["target"], result["target"])


def test_predict_refuses_a_refit_for_the_training_split(synthetic_dir, refit_run, tmp_path, capsys):
    out, _, _ = refit_run
    target = tmp_path / "train_scores.csv"
    with pytest.raises(SystemExit) as exit_info:
        predict.main(
            ["--data-dir", str(synthetic_dir), "--split", "train", "--model-path", str(out / "weights" / "refit")]
            + ["--out", str(target), "--num-workers", "0"]
        )
    error = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and error.count("\n") == 0
    assert "is a refit on every training image" in error and "--fold none" in error
    assert not target.exists()


def test_overwriting_a_fold_run_with_a_refit_leaves_no_stale_best_checkpoint(synthetic_dir, tmp_path, capsys):
    command = refit_command(synthetic_dir, tmp_path)
    fold_run = [*command[: command.index("--fold")], "--fold", "0", "--n-folds", "3"]
    fold_run += command[command.index("--fold") + 2 :]
    train.main(fold_run)
    assert (tmp_path / "weights" / "refit_best.pth").is_file()
    with pytest.raises(SystemExit):  # an earlier run's files: refused without --overwrite or --resume
        train.main(command)
    with pytest.raises(SystemExit):  # and it cannot be resumed as a refit: another run
        train.main([*command, "--resume"])
    assert "was saved with --fold 0, this run has none" in capsys.readouterr().err
    train.main([*command, "--overwrite"])
    assert not (tmp_path / "weights" / "refit_best.pth").exists()
    assert not (tmp_path / "logs" / "oof_refit.csv").exists()
    assert torch.load(tmp_path / "weights" / "refit_final.pth", weights_only=True)["refit"] is True
