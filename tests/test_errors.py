"""Every bad input a user can cause ends in one sentence naming the file or flag, exit code 2, no traceback,
and nothing already saved is touched (README, "Errors")."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

import train
from utils import UserError, load_checkpoint


def seed_command(data_dir, tmp_path, *extra):
    return [
        "--save-name", "run", "--data-dir", str(data_dir), "--image-size", "32", "--n-epochs", "1",
        "--enet-type", "efficientnet-b0", "--no-pretrained", "--batch-size", "16", "--num-workers", "0",
        "--n-folds", "3", "--no-baselines", "--model-dir", str(tmp_path / "weights"),
        "--log-dir", str(tmp_path / "logs"), *extra,
    ]  # fmt: skip


def fails_with(capsys, argv, *fragments):
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


@pytest.fixture()
def copy_of(synthetic_dir, tmp_path):
    """A private copy of the synthetic data set that a test may damage."""
    target = tmp_path / "data"
    shutil.copytree(synthetic_dir, target)
    return target


def test_missing_csv_and_image_folder(copy_of, tmp_path, capsys):
    shutil.rmtree(copy_of / "train")
    fails_with(capsys, seed_command(copy_of, tmp_path), "train/train", "does not exist")
    (copy_of / "train.csv").unlink()
    fails_with(capsys, seed_command(copy_of, tmp_path), "no train.csv or train_concat.csv")


def test_empty_and_header_only_csv(copy_of, tmp_path, capsys):
    (copy_of / "train.csv").write_text("")
    fails_with(capsys, seed_command(copy_of, tmp_path), "train.csv is empty")
    (copy_of / "train.csv").write_text("image_name,target\n")
    fails_with(capsys, seed_command(copy_of, tmp_path), "train.csv has a header but no rows")


def test_bad_target_and_age(copy_of, tmp_path, capsys):
    frame = pd.read_csv(copy_of / "train.csv")
    frame.loc[3, "target"] = 2
    frame.to_csv(copy_of / "train.csv", index=False)
    fails_with(capsys, seed_command(copy_of, tmp_path), "line 5 has target", "0 or 1")
    frame.loc[3, "target"] = 1
    frame["age_approx"] = frame["age_approx"].astype(object)
    frame.loc[4, "age_approx"] = "forty"
    frame.to_csv(copy_of / "train.csv", index=False)
    fails_with(capsys, seed_command(copy_of, tmp_path, "--use-meta"), "line 6 has age_approx 'forty'")


def test_truncated_jpeg_fails_or_is_skipped_with_a_count(copy_of, tmp_path, capsys):
    name = pd.read_csv(copy_of / "train.csv")["image_name"][0]
    path = copy_of / "train" / "train" / f"{name}.jpg"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    fails_with(capsys, seed_command(copy_of, tmp_path), f"{name}.jpg", "truncated JPEG", "--bad-images skip")
    train.main(seed_command(copy_of, tmp_path, "--bad-images", "skip"))
    assert "left out 1 damaged image(s)" in capsys.readouterr().out
    assert name not in set(pd.read_csv(tmp_path / "logs" / "oof_run.csv")["image_name"])


def test_tiny_image_is_named_even_from_a_worker_process(copy_of, tmp_path, capsys):
    name = pd.read_csv(copy_of / "train.csv")["image_name"][0]
    cv2.imwrite(str(copy_of / "train" / "train" / f"{name}.jpg"), np.zeros((16, 16, 3), np.uint8))
    argv = seed_command(copy_of, tmp_path)
    argv[argv.index("--num-workers") + 1] = "1"
    fails_with(capsys, argv, f"{name}.jpg", "16x16 px", "32 px minimum")


def test_fold_errors(copy_of, tmp_path, capsys):
    fails_with(capsys, seed_command(copy_of, tmp_path, "--fold", "7"), "--fold 7 is outside 0..2")
    frame = pd.read_csv(copy_of / "train.csv")
    frame["target"] = 0
    frame.loc[0, "target"] = 1
    frame.to_csv(copy_of / "train.csv", index=False)
    fails_with(capsys, seed_command(copy_of, tmp_path, "--fold", "2"), "validation fold 2 holds only target 0")


def test_bad_ema_decay(synthetic_dir, tmp_path, capsys):
    argv = seed_command(synthetic_dir, tmp_path, "--ema-decay", "1.5")
    fails_with(capsys, argv, "--ema-decay 1.5 must lie in [0, 1)")


def test_unwritable_output_folder(synthetic_dir, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    argv = seed_command(synthetic_dir, tmp_path)
    argv[argv.index("--model-dir") + 1] = str(blocker / "weights")
    fails_with(capsys, argv, "cannot write to the model folder", "a_file/weights")


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(synthetic_dir, tmp_path, capsys, monkeypatch):
    real_epoch = train.train_one_epoch

    def second_epoch_diverges(model, loader, optimizer, loss_fn, *rest, **kwargs):
        if kwargs["epoch"] == 2:
            finite_loss = loss_fn

            def loss_fn(logits, target):
                return finite_loss(logits, target) * float("nan")

        return real_epoch(model, loader, optimizer, loss_fn, *rest, **kwargs)

    monkeypatch.setattr(train, "train_one_epoch", second_epoch_diverges)
    argv = seed_command(synthetic_dir, tmp_path, "--n-epochs", "2", "--batch-size", "8")
    fails_with(capsys, argv, "training loss became nan at epoch 2, batch 0")
    best = load_checkpoint(tmp_path / "weights" / "run_best.pth", "melanoma")
    weights = [tensor for tensor in best["state_dict"].values() if tensor.is_floating_point()]
    assert best["epoch"] == 1 and all(torch.isfinite(tensor).all() for tensor in weights)
    assert not (tmp_path / "weights" / "run_final.pth").exists()


def test_checkpoint_of_the_other_script_is_refused(synthetic_dir, tmp_path):
    train.main(seed_command(synthetic_dir, tmp_path))
    with pytest.raises(UserError, match="written by train.py, not multi_classification.py"):
        load_checkpoint(tmp_path / "weights" / "run_best.pth", "bias")
    truncated = tmp_path / "weights" / "cut.pth"
    truncated.write_bytes((tmp_path / "weights" / "run_best.pth").read_bytes()[:1000])
    with pytest.raises(UserError, match="truncated or not a checkpoint"):
        load_checkpoint(truncated, "melanoma")


def test_sigkill_mid_epoch_then_resume_completes_the_run(synthetic_dir, tmp_path):
    """A real kill -9 in the middle of training: the resumed run finishes with every epoch logged once and
    intact checkpoints."""
    argv = seed_command(synthetic_dir, tmp_path, "--n-epochs", "3", "--batch-size", "4", "--image-size", "64")
    script = Path(train.__file__)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    metrics = tmp_path / "logs" / "metrics_run.jsonl"
    process = subprocess.Popen([sys.executable, str(script), *argv], env=env, stdout=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 1:
            break
        time.sleep(0.05)
    time.sleep(0.5)  # into the second epoch
    assert process.poll() is None, "the run ended before it could be killed: make it longer"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "weights" / "run_final.pth").exists()

    result = subprocess.run([sys.executable, str(script), *argv, "--resume"], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "resuming run after epoch" in result.stdout
    epochs = [int(line.split('"epoch":')[1].split(",")[0]) for line in metrics.read_text().splitlines()]
    assert epochs == [1, 2, 3]
    for suffix in ("best", "final", "last"):
        load_checkpoint(tmp_path / "weights" / f"run_{suffix}.pth", "melanoma")
