"""TensorBoard scalars of both trainers, read back from the event files with TensorBoard's own reader."""

from __future__ import annotations

import json
import sys

import pandas as pd
import pytest

import multi_classification as mc
import train
from melanoma_audit import engine
from melanoma_audit.tensorboard_log import TensorBoardLog, epoch_scalars

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def read_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag in a run folder as (step, value) pairs, as TensorBoard shows them (orphans purged)."""
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def melanoma_command(data_dir, tmp_path, *extra):
    return [
        "--save-name", "tb", "--data-dir", str(data_dir), "--image-size", "32", "--n-epochs", "2",
        "--enet-type", "efficientnet-b0", "--no-pretrained", "--no-lesion-features", "--batch-size", "16",
        "--num-workers", "0", "--n-folds", "3", "--model-dir", str(tmp_path / "weights"),
        "--log-dir", str(tmp_path / "logs"), *extra,
    ]  # fmt: skip


def detector_command(data_dir, model_path, *extra):
    return [
        "--img_path", str(data_dir / "train" / "train"), "--ann_path", str(data_dir / "gans_biases.csv"),
        "--mode", "train", "--model_path", str(model_path), "--epochs", "2", "--enet_type", "efficientnet-b0",
        "--image_size", "32", "--no-pretrained", "--num_workers", "0", "--batch", "16", *extra,
    ]  # fmt: skip


def assert_scalars_are_the_jsonl_history(log_dir, steps: list[int]) -> dict:
    """TensorBoard shows each epoch once, with the very numbers of the metrics file."""
    records = [json.loads(line) for line in (log_dir / "metrics_tb.jsonl").read_text().splitlines()]
    scalars = read_scalars(log_dir / "tb" / "tb")
    assert {"lr", "train_loss", "valid_loss", "auc", "sensitivity", "seconds"} <= set(scalars)
    for tag in ("lr", "train_loss", "valid_loss", "auc", "balanced_acc"):
        assert [step for step, _ in scalars[tag]] == steps
        assert [value for _, value in scalars[tag]] == pytest.approx([record[tag] for record in records], rel=1e-6)
    return scalars


@pytest.mark.parametrize("crash", ["training epoch 3", "tensorboard write of epoch 2"])
def test_resumed_run_shows_each_epoch_once(synthetic_dir, tmp_path, monkeypatch, crash):
    """Killed in epoch 3 (the events of epochs 1-2 are on disk), or between epoch 2's checkpoint and its events:
    the resumed run appends to the same folder, and TensorBoard shows the JSONL file's history, each epoch once."""
    real_epoch, real_write = engine.train_one_epoch, TensorBoardLog.write

    def crash_in_epoch_3(*args, **kwargs):
        if kwargs["epoch"] == 3:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    def crash_writing_epoch_2(self, history):
        if history[-1]["epoch"] == 2:
            raise KeyboardInterrupt
        real_write(self, history)

    if crash.startswith("training"):
        monkeypatch.setattr(engine, "train_one_epoch", crash_in_epoch_3)
    else:
        monkeypatch.setattr(TensorBoardLog, "write", crash_writing_epoch_2)
    command = melanoma_command(synthetic_dir, tmp_path, "--n-epochs", "3")
    with pytest.raises(KeyboardInterrupt):
        train.main(command)
    monkeypatch.undo()
    folder = tmp_path / "logs" / "tb" / "tb"
    assert [step for step, _ in read_scalars(folder)["auc"]] == ([1, 2] if crash.startswith("training") else [1])

    train.main([*command, "--resume"])
    assert len(list(folder.glob("events.out.tfevents.*"))) == 2  # appended beside the first part's file
    scalars = assert_scalars_are_the_jsonl_history(tmp_path / "logs", [1, 2, 3])
    assert scalars["lr"][0][1] < scalars["lr"][1][1]  # the warm-up epoch starts at a tenth of the rate


def test_detector_logs_each_head_under_its_name(tmp_path):
    from melanoma_audit.synthetic_dataset import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "data", n_train=36, n_test=4, image_size=64, seed=3)
    mc.main(detector_command(data, tmp_path / "models" / "det.pth"))
    history = pd.read_csv(tmp_path / "models" / "det_history.csv")
    scalars = read_scalars(tmp_path / "models" / "tb" / "det")
    heads = history["head"].unique().tolist()
    assert {"lr", "train_loss", "valid_loss"} | {f"auc/{head}" for head in heads} <= set(scalars)
    for head in heads:
        rows = history[history["head"] == head]
        assert [step for step, _ in scalars[f"f1/{head}"]] == [1, 2]
        assert [value for _, value in scalars[f"f1/{head}"]] == pytest.approx(rows["f1"].tolist(), rel=1e-6)
    assert [value for _, value in scalars["train_loss"]] == pytest.approx(
        history.groupby("epoch")["train_loss"].first().tolist(), rel=1e-6
    )


def test_no_tensorboard_writes_no_events_and_overwrite_clears_the_old_ones(synthetic_dir, tmp_path):
    command = melanoma_command(synthetic_dir, tmp_path, "--n-epochs", "1")
    train.main([*command, "--no-tensorboard"])
    assert not (tmp_path / "logs" / "tb").exists()
    train.main([*command, "--overwrite"])
    assert len(list((tmp_path / "logs" / "tb" / "tb").glob("events.out.tfevents.*"))) == 1
    train.main([*command, "--overwrite"])  # a new run replaces the old run's events: one file, one epoch
    assert len(list((tmp_path / "logs" / "tb" / "tb").glob("events.out.tfevents.*"))) == 1
    assert_scalars_are_the_jsonl_history(tmp_path / "logs", [1])  # (an uninterrupted run's scalars)


def test_tensorboard_asked_for_without_the_package_is_one_sentence(synthetic_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard now fails: as if not installed
    monkeypatch.setattr("melanoma_audit.tensorboard_log.tensorboard_installed", lambda: False)
    with pytest.raises(SystemExit) as stop:
        train.main(melanoma_command(synthetic_dir, tmp_path, "--tensorboard"))
    assert stop.value.code == 2 and "pip install tensorboard" in capsys.readouterr().err
    train.main(melanoma_command(synthetic_dir, tmp_path, "--n-epochs", "1"))  # unset: a notice, and no events
    assert "notice: the tensorboard package is not installed" in capsys.readouterr().out
    assert not (tmp_path / "logs" / "tb").exists()


def test_epoch_scalars_tag_head_rows_by_head_and_skip_identifiers():
    rows = [
        {"epoch": 3, "fold": 0, "lr": 0.1, "train_loss": 0.5, "head": "hair", "auc": 0.9, "ok": True, "time": "x"},
        {"epoch": 3, "fold": 0, "lr": 0.1, "train_loss": 0.5, "head": "ruler", "auc": 0.7, "ok": True, "time": "x"},
    ]
    assert epoch_scalars(rows) == {"lr": 0.1, "train_loss": 0.5, "auc/hair": 0.9, "auc/ruler": 0.7}
    assert epoch_scalars([{"epoch": 1, "lr": 0.2, "auc": float("nan")}])["lr"] == 0.2
