import errno
import os

import cv2
import pandas as pd
import pytest
import torch

from dataset import EpochSampler
from melanoma_audit.checkpoints import save_checkpoint
from melanoma_audit.cli import claim_run_files
from melanoma_audit.distributed import World, batch_for_share
from melanoma_audit.loops import make_loader
from utils import UserError, atomic_path, set_visible_devices, temp_files_of, write_csv_atomic


class OpenCVThreads(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> int:
        return cv2.getNumThreads()


def test_loader_workers_run_opencv_on_one_thread():
    threads_before = cv2.getNumThreads()
    cv2.setNumThreads(4)  # what a forked worker would inherit on a 4-core machine
    try:
        sampler = torch.utils.data.SequentialSampler(range(2))
        loader = make_loader(OpenCVThreads(), sampler, 2, 1, torch.device("cpu"))
        assert next(iter(loader)).tolist() == [1, 1]
    finally:
        cv2.setNumThreads(threads_before)


def test_visible_devices_may_be_repeated_but_not_changed_after_cuda_started(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    set_visible_devices("0")  # tests call train.main several times in one process
    with pytest.raises(UserError, match="--CUDA_VISIBLE_DEVICES 1 was given after CUDA started on devices 0"):
        set_visible_devices("1")


def full_disk(*_, **__):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_keeps_the_earlier_file_and_names_it(tmp_path, monkeypatch):
    checkpoint, table = tmp_path / "run_best.pth", tmp_path / "oof.csv"
    save_checkpoint(checkpoint, {"epoch": 1, "weights": torch.ones(3)})
    write_csv_atomic(pd.DataFrame({"prob": [0.5]}), table)

    def half_written(payload, handle):
        handle.write(b"half a checkpoint")
        full_disk()

    monkeypatch.setattr(torch, "save", half_written)
    with pytest.raises(UserError, match=r"could not write .*run_best\.pth \(No space left on device\): free space"):
        save_checkpoint(checkpoint, {"epoch": 2, "weights": torch.zeros(3)})
    monkeypatch.setattr(pd.DataFrame, "to_csv", full_disk)
    with pytest.raises(UserError, match=r"oof\.csv \(No space left on device\)"):
        write_csv_atomic(pd.DataFrame({"prob": [0.9]}), table)
    with pytest.raises(UserError, match=r"log\.txt \(No space left on device\)"), atomic_path(tmp_path / "log.txt"):
        full_disk()
    monkeypatch.undo()

    assert torch.load(checkpoint, weights_only=True)["epoch"] == 1
    assert pd.read_csv(table)["prob"].tolist() == [0.5]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["oof.csv", "run_best.pth"]  # no temporary file left


def test_claiming_outputs_removes_what_a_killed_write_left(tmp_path):
    best = tmp_path / "run_best.pth"
    with atomic_path(best) as tmp:
        tmp.write_bytes(b"finished")
        leftover = tmp.with_name(tmp.name.replace(".tmp", "x.tmp"))
        leftover.write_bytes(b"half")  # what kill -9 in mid-write leaves: .run_best.pth.<random>.tmp
    other = tmp_path / ".other_best.pth.abc123.tmp"
    other.write_bytes(b"another run's")
    assert temp_files_of(best) == [leftover]
    claim_run_files([best], tmp_path / "run_last.pth", resume=False, overwrite=True, alternative="x")
    assert not leftover.exists() and not best.exists() and other.exists()


class EpochKeys(torch.utils.data.Dataset):
    def __getitem__(self, key: tuple[int, int]) -> int:
        return key[1]


def test_batch_for_share_gives_every_rank_a_step(capsys):
    assert batch_for_share(16, 40, World(), "--batch-size") == 16
    assert batch_for_share(64, 40, World(), "--batch-size") == 40
    assert "--batch-size 64 is more than the 40 training images there are" in capsys.readouterr().out
    for rank in range(4):
        world = World(rank=rank, size=4)
        batch = batch_for_share(64, 30, world, "--batch")
        sampler = EpochSampler(30, shuffle=True, seed=0, rank=rank, world_size=4)
        loader = make_loader(EpochKeys(), sampler, batch, 0, torch.device("cpu"), drop_last=len(sampler) > batch)
        assert batch == 8 and [len(indices) for indices in loader] == [8]
    assert capsys.readouterr().out.count("each of the 4 processes has") == 1  # rank 0 alone says so
