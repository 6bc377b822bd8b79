"""Two processes on the gloo backend (CPU), as `torchrun --nproc_per_node 2 train.py ...` starts them."""

import json
import math
import socket

import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp

from melanoma_audit.checkpoints import load_checkpoint


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_on_rank(rank: int, world_size: int, port: int, argv: list[str], out_dir: str, script: str = "train") -> None:
    import importlib
    import os

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size)
    )
    torch.set_num_threads(1)
    if script == "train":
        summary = importlib.import_module("train").main(argv)
        torch.save(summary["models"][0].state_dict(), f"{out_dir}/rank{rank}.pt")
    else:
        importlib.import_module(script).main(argv)


def train_recording_decodes(rank: int, world_size: int, port: int, argv: list[str], out_dir: str) -> None:
    """train_on_rank, writing the files of every batch this rank's device data path decoded, with the batch's
    augmentation strength, to decoded<rank>.txt."""
    from melanoma_audit import device_data

    decoded = []
    real_call = device_data.DevicePipeline.__call__

    def recording_call(pipeline, batch, *args):
        decoded.extend(f"{pipeline.strength} {path}" for path in batch["path"])
        return real_call(pipeline, batch, *args)

    device_data.DevicePipeline.__call__ = recording_call
    try:
        train_on_rank(rank, world_size, port, argv, out_dir)
    finally:
        device_data.DevicePipeline.__call__ = real_call
    with open(f"{out_dir}/decoded{rank}.txt", "w") as handle:
        handle.write("\n".join(decoded))


def run_jobs_on_rank(rank: int, world_size: int, jobs: list[tuple[int, list[str], str, str]]) -> None:
    """Each (port, argv, out_dir, script) in turn, each a run of its own process group."""
    for port, argv, out_dir, script in jobs:
        if script == "train":
            train_recording_decodes(rank, world_size, port, argv, out_dir)
        else:
            train_on_rank(rank, world_size, port, argv, out_dir, script)


def melanoma_argv(data_dir, out_dir, data_path: str, batch_size: str) -> list[str]:
    return [
        "--save-name", "ddp", "--data-dir", str(data_dir), "--image-size", "32", "--n-epochs", "1",
        "--enet-type", "efficientnet-b0", "--no-pretrained", "--batch-size", batch_size, "--num-workers", "0",
        "--n-folds", "3", "--device", "cpu", "--no-baselines", "--data-path", data_path,
        "--model-dir", str(out_dir / "weights"), "--log-dir", str(out_dir / "logs"),
    ]  # fmt: skip


def detector_argv(data_dir, model_path) -> list[str]:
    return [
        "--img_path", str(data_dir / "train" / "train"), "--ann_path", str(data_dir / "gans_biases.csv"),
        "--mode", "train", "--model_path", str(model_path), "--epochs", "1", "--batch", "8", "--image_size", "32",
        "--enet_type", "efficientnet-b0", "--no-pretrained", "--num_workers", "0", "--device", "cpu",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def two_process_runs(synthetic_dir, tmp_path_factory) -> dict:
    """Two processes (one start of each: Python and torch take seconds to start) run train.py on the cpu data path
    with a batch larger than each process's share (32 training images, 16 a process, --batch-size 24: drop_last
    used to leave each process no batch at all, and the run trained zero steps with a NaN loss), train.py on the
    device data path, and multi_classification.py; each run in its own folder."""
    folders = {name: tmp_path_factory.mktemp(f"ddp_{name}") for name in ("cpu", "gpu", "detector")}
    ports = set()
    while len(ports) < 3:
        ports.add(free_port())
    port_cpu, port_gpu, port_detector = sorted(ports)
    jobs = [
        (port_cpu, melanoma_argv(synthetic_dir, folders["cpu"], "cpu", "24"), str(folders["cpu"]), "train"),
        (port_gpu, melanoma_argv(synthetic_dir, folders["gpu"], "gpu", "8"), str(folders["gpu"]), "train"),
        (
            port_detector,
            detector_argv(synthetic_dir, folders["detector"] / "detector.pth"),
            str(folders["detector"]),
            "multi_classification",
        ),
    ]
    mp.spawn(run_jobs_on_rank, args=(2, jobs), nprocs=2, join=True)
    return folders


@pytest.mark.parametrize("data_path", ["cpu", "gpu"])
def test_two_process_run_writes_one_set_of_outputs_from_identical_weights(synthetic_dir, two_process_runs, data_path):
    out = two_process_runs[data_path]
    assert sorted(path.name for path in (out / "weights").iterdir()) == [
        "ddp_best.pth", "ddp_final.pth", "ddp_last.pth",
    ]  # fmt: skip
    assert len((out / "logs" / "log_ddp.txt").read_text().splitlines()) == 1
    record = json.loads((out / "logs" / "metrics_ddp.jsonl").read_text())
    assert math.isfinite(record["train_loss"])

    rank0, rank1 = (torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in (0, 1))
    for name, tensor in rank0.items():
        assert torch.equal(tensor, rank1[name]), f"{name} differs between ranks"
    saved = load_checkpoint(out / "weights" / "ddp_final.pth", "melanoma")["state_dict"]
    assert set(saved) == set(rank0) and all(torch.equal(saved[name], rank0[name]) for name in saved)

    # validation covered every row of the fold, not one rank's half
    import train
    from melanoma_audit.patients import make_folds
    from melanoma_audit.tables import read_melanoma_table

    frame = read_melanoma_table(synthetic_dir, "train", use_meta=False, require_target=True)
    fold_rows = frame["image_name"][make_folds(frame, 3, 0) == 0]
    oof = pd.read_csv(out / "logs" / "oof_ddp.csv")
    assert sorted(oof["image_name"]) == sorted(fold_rows)
    logged_auc = float((out / "logs" / "log_ddp.txt").read_text().split("auc: ")[1].split(",")[0])
    assert abs(train.binary_metrics(oof["target"], oof["prob"])["auc"] - logged_auc) < 1e-5

    # on the device path each rank decoded its own share: together the ranks cover each split, overlapping by at
    # most the one image EpochSampler repeats to even the shares out
    lines = [(out / f"decoded{rank}.txt").read_text().splitlines() for rank in (0, 1)]
    in_fold = make_folds(frame, 3, 0) == 0
    for strength, rows in (("light", ~in_fold), ("none", in_fold)):  # the training and the validation batches
        shares = [{line.partition(" ")[2] for line in rank if line.startswith(strength + " ")} for rank in lines]
        expected = set(frame["filepath"][rows]) if data_path == "gpu" else set()
        assert shares[0] | shares[1] == expected
        assert len(shares[0]) + len(shares[1]) <= len(expected) + 1


def test_two_process_artifact_detector_writes_one_model(two_process_runs):
    out = two_process_runs["detector"]
    checkpoint = load_checkpoint(out / "detector.pth", "artifact")
    assert not any(name.startswith("module.") for name in checkpoint["state_dict"])
    assert len(checkpoint["val_images"]) == len(set(checkpoint["val_images"])) > 0
    history = pd.read_csv(out / "detector_history.csv")
    assert history["epoch"].tolist() == [1] * len(checkpoint["heads"])  # one row per head, written once
