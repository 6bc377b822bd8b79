import cv2
import pytest
import torch

from utils import UserError, make_loader, set_visible_devices


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
    set_visible_devices("0")  # demo.py runs train.py twice in one process
    with pytest.raises(UserError, match="--CUDA_VISIBLE_DEVICES 1 was given after CUDA started on devices 0"):
        set_visible_devices("1")
