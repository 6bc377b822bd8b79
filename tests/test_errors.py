"""Every bad input a user can cause ends in one sentence naming the file or flag, exit code 2, no traceback,
and nothing already saved is touched (README, "Errors")."""

import errno
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

import evaluate
import multi_classification
import predict
import train
from melanoma_audit import engine
from melanoma_audit.checkpoints import load_checkpoint
from melanoma_audit.patients import make_folds
from utils import UserError


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
    real_epoch = engine.train_one_epoch

    def second_epoch_diverges(model, loader, optimizer, loss_fn, *rest, **kwargs):
        if kwargs["epoch"] == 2:
            finite_loss = loss_fn

            def loss_fn(logits, target):
                return finite_loss(logits, target) * float("nan")

        return real_epoch(model, loader, optimizer, loss_fn, *rest, **kwargs)

    monkeypatch.setattr(engine, "train_one_epoch", second_epoch_diverges)
    argv = seed_command(synthetic_dir, tmp_path, "--n-epochs", "2", "--batch-size", "8")
    fails_with(capsys, argv, "training loss became nan at epoch 2, batch 0")
    best = load_checkpoint(tmp_path / "weights" / "run_best.pth", "melanoma")
    weights = [tensor for tensor in best["state_dict"].values() if tensor.is_floating_point()]
    assert best["epoch"] == 1 and all(torch.isfinite(tensor).all() for tensor in weights)
    assert not (tmp_path / "weights" / "run_final.pth").exists()


def test_checkpoint_of_the_other_script_is_refused(synthetic_dir, tmp_path):
    train.main(seed_command(synthetic_dir, tmp_path))
    with pytest.raises(UserError, match="by train.py, not multi_classification.py: pass a checkpoint that multi_"):
        load_checkpoint(tmp_path / "weights" / "run_best.pth", "artifact")
    truncated = tmp_path / "weights" / "cut.pth"
    truncated.write_bytes((tmp_path / "weights" / "run_best.pth").read_bytes()[:1000])
    with pytest.raises(UserError, match="truncated or not a checkpoint"):
        load_checkpoint(truncated, "melanoma")


def test_sigkill_mid_epoch_then_resume_completes_the_run(synthetic_dir, tmp_path, capsys):
    """A real kill -9 in the middle of training: the resumed run finishes with every epoch logged once, intact
    checkpoints and no temporary file left."""
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
    (tmp_path / "weights" / ".run_last.pth.k1ll3d.tmp").write_bytes(b"half a checkpoint")  # as a kill mid-write

    capsys.readouterr()
    train.main([*argv, "--resume"])  # in this process: the kill needed another one, the resume does not
    assert "resuming run after epoch" in capsys.readouterr().out
    epochs = [int(line.split('"epoch":')[1].split(",")[0]) for line in metrics.read_text().splitlines()]
    assert epochs == [1, 2, 3]
    for suffix in ("best", "final", "last"):
        load_checkpoint(tmp_path / "weights" / f"run_{suffix}.pth", "melanoma")
    assert not list((tmp_path / "weights").glob(".*.tmp"))  # the resumed run cleared what the kill left


def test_image_names_that_are_paths_are_refused_before_anything_is_read(copy_of, tmp_path, capsys):
    frame = pd.read_csv(copy_of / "train.csv")
    shutil.copy(copy_of / "train" / "train" / f"{frame['image_name'][0]}.jpg", tmp_path / "outside.jpg")
    frame.loc[4, "image_name"] = "../../../outside"
    frame.to_csv(copy_of / "train.csv", index=False)
    fails_with(capsys, seed_command(copy_of, tmp_path), "train.csv line 6 has image_name '../../../outside'", "a path")
    assert not (tmp_path / "weights").exists()


def test_impossible_age_is_refused(copy_of, tmp_path, capsys):
    frame = pd.read_csv(copy_of / "train.csv")
    frame["age_approx"] = frame["age_approx"].astype(object)
    frame.loc[2, "age_approx"] = "inf"
    frame.to_csv(copy_of / "train.csv", index=False)
    fails_with(capsys, seed_command(copy_of, tmp_path, "--use-meta"), "line 4 has age_approx 'inf'", "0 to 120")


@pytest.mark.parametrize(
    ("flag", "message"),
    [("--n-epochs", "--n-epochs 0 must be at least 1"), ("--batch-size", "--batch-size 0 must be at least 1")],
)
def test_zero_epochs_or_batch_is_refused_by_both_trainers(synthetic_dir, tmp_path, capsys, flag, message):
    argv = seed_command(synthetic_dir, tmp_path)
    argv[argv.index(flag) + 1] = "0"
    fails_with(capsys, argv, message)
    detector_flag = flag  # the same flags in both trainers
    detector = [
        "--img_path", str(synthetic_dir / "train" / "train"), "--ann_path", str(synthetic_dir / "gans_biases.csv"),
        "--mode", "train", "--model_path", str(tmp_path / "detector.pth"), detector_flag, "0",
    ]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        multi_classification.main(detector)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert f"{detector_flag} 0 must be at least 1" in err
    assert not (tmp_path / "weights").exists() and not (tmp_path / "detector.pth").exists()


def test_training_folds_of_one_class_are_refused(copy_of, tmp_path, capsys):
    frame = pd.read_csv(copy_of / "train.csv", dtype={"patient_id": str})
    patient = frame["patient_id"].dropna().value_counts().index[0]
    frame["target"] = (frame["patient_id"] == patient).astype(int)  # every melanoma from one patient
    frame.to_csv(copy_of / "train.csv", index=False)
    fold = int(make_folds(frame, 3, 0)[frame["patient_id"] == patient][0])
    argv = seed_command(copy_of, tmp_path, "--fold", str(fold))
    fails_with(capsys, argv, f"the training images of fold {fold}", "hold only target 0")


def test_full_disk_during_a_checkpoint_write_keeps_the_earlier_ones(synthetic_dir, tmp_path, capsys, monkeypatch):
    real_save, calls = torch.save, []

    def disk_fills_up(payload, handle):
        calls.append(handle.name)
        if len(calls) > 2:  # epoch 1 wrote _best and _last
            handle.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(payload, handle)

    monkeypatch.setattr(torch, "save", disk_fills_up)
    err = fails_with(capsys, seed_command(synthetic_dir, tmp_path, "--n-epochs", "2"), "No space left on device")
    assert "could not write" in err and "weights/run_" in err
    monkeypatch.undo()
    for suffix in ("best", "last"):
        assert load_checkpoint(tmp_path / "weights" / f"run_{suffix}.pth", "melanoma")["epoch"] == 1
    assert not list((tmp_path / "weights").glob(".*.tmp"))


def test_pooled_out_of_fold_file_of_an_earlier_run_is_kept(synthetic_dir, tmp_path, capsys):
    pooled = tmp_path / "logs" / "oof_run.csv"
    pooled.parent.mkdir()
    pooled.write_text("image_name,fold,target,prob\nearlier,0,1,0.9\n")
    fails_with(capsys, seed_command(synthetic_dir, tmp_path, "--fold", "0,1"), "oof_run.csv already exists")
    assert pooled.read_text() == "image_name,fold,target,prob\nearlier,0,1,0.9\n"
    assert not (tmp_path / "weights" / "run_fold0_best.pth").exists()


@pytest.mark.parametrize(
    ("spec", "fragment"), [(",", "names no feature"), ("age,age", "repeats age"), ("age,height", "names 'height'")]
)
def test_meta_features_without_a_usable_list_are_one_sentence(synthetic_dir, tmp_path, capsys, spec, fragment):
    argv = seed_command(synthetic_dir, tmp_path, "--use-meta", "--meta-features", spec)
    fails_with(capsys, argv, f"--meta-features {spec!r} {fragment}", "sex,age,site,n_images,image_size")
    assert not (tmp_path / "weights").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--n-folds", "0"], "--n-folds 0 must be at least 2"),
        (["--fold", "0,0"], "--fold '0,0' names fold 0 twice"),
        (["--seed", "-1"], "--seed -1 must be 0 or more"),
        (["--fold-seed", "-1"], "--fold-seed -1 must be 0 or more"),
        (["--bn-momentum", "-1"], "--bn-momentum -1.0 must lie in [0, 1]"),
        (["--save-name", "a/b"], "--save-name 'a/b' is not a file name"),
    ],
)
def test_counts_seeds_and_names_that_used_to_run_or_trace_back(synthetic_dir, tmp_path, capsys, extra, message):
    """Each of these was a traceback (a negative seed), a misleading sentence (--n-folds 0 blamed --fold) or a run
    that should not have started (a negative BatchNorm momentum, a save name that is a path)."""
    argv = seed_command(synthetic_dir, tmp_path)
    position = argv.index(extra[0]) if extra[0] in argv else None
    if position is not None:
        del argv[position : position + 2]
    fails_with(capsys, [*argv, *extra], message)
    assert not (tmp_path / "weights").exists()


@pytest.mark.parametrize(
    ("script", "extra", "message"),
    [
        ("predict", ["--n-tta", "0"], "--n-tta 0 is outside 1..8"),
        ("predict", ["--num-workers", "-1"], "--num-workers -1 must be 0 or more"),
        ("evaluate", ["--n-bootstrap", "0"], "--n-bootstrap 0 must be at least 1"),
        ("evaluate", ["--seed", "-1"], "--seed -1 must be at least 0"),
        ("evaluate", ["--cam", "-1"], "--cam -1 must be at least 0"),
        ("evaluate", ["--batch-size", "0"], "--batch-size 0 must be at least 1"),
    ],
)
def test_scoring_counts_are_one_sentence(tmp_path, capsys, script, extra, message):
    if script == "predict":
        main, argv = (
            predict.main,
            ["--data-dir", str(tmp_path), "--model-path", "m.pth", "--out", str(tmp_path / "p.csv")],
        )
    else:
        main, argv = evaluate.main, ["--pred", str(tmp_path / "p.csv"), "--out-dir", str(tmp_path / "report")]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, *extra])
    error = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(error.splitlines()) == 1 and message in error, error
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "report").exists()
