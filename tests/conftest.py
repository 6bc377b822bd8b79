"""Shared fixtures: a tiny synthetic data set in the Kaggle layout, and the real sample when present."""

import os
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# OpenMP threads that spin while waiting starve every other process on a small machine (10x slower tests when
# two run at once); passive waiting costs nothing measurable here
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import sklearn.ensemble  # noqa: E402, F401  (loads scikit-learn's own OpenMP runtime, limited below)
import torch  # noqa: E402
from threadpoolctl import ThreadpoolController  # noqa: E402

from melanoma_audit.synthetic_dataset import make_synthetic_dataset  # noqa: E402


def limit_scikit_learn_openmp() -> None:
    """scikit-learn's gradient boosting runs thousands of tiny OpenMP regions, and under the passive wait each one
    costs a wake-up: 4-20x slower on two threads than on one, for the same fit. Its OpenMP runtime gets one thread
    (torch's keeps two); where scikit-learn shares torch's runtime, nothing matches and nothing changes."""
    for library in ThreadpoolController().lib_controllers:
        if library.user_api == "openmp" and "scikit_learn" in library.filepath:
            library.set_num_threads(1)


torch.set_num_threads(min(2, torch.get_num_threads()))
limit_scikit_learn_openmp()

REAL_DATA = Path(os.environ.get("ISIC_SAMPLE_DIR", Path(__file__).resolve().parents[2] / "shared/data/isic2018"))


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    """48 training and 12 test images at 64 px: enough for every code path, seconds to train on."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), n_train=48, n_test=12, image_size=64, seed=0)


@pytest.fixture()
def real_data_dir() -> Path:
    if not (REAL_DATA / "train.csv").is_file():
        pytest.skip(f"the real sample {REAL_DATA} is not on this machine")
    return REAL_DATA


@pytest.fixture()
def eager_compile(monkeypatch):
    """torch.compile through the real TorchDynamo wrapper, with the eager backend: seconds instead of minutes."""
    compiled = []
    real_compile = torch.compile

    def compile_eagerly(model, **options):
        compiled.append(type(model).__name__)
        return real_compile(model, backend="eager")

    monkeypatch.setattr(torch, "compile", compile_eagerly)
    return compiled


@pytest.fixture()
def device_pipeline_strengths(monkeypatch):
    """The augmentation strength of every batch that went through the device data path (device_data)."""
    from melanoma_audit import device_data

    strengths = []
    real_call = device_data.DevicePipeline.__call__

    def recording_call(pipeline, batch, *args, **kwargs):
        strengths.append(pipeline.strength)
        return real_call(pipeline, batch, *args, **kwargs)

    monkeypatch.setattr(device_data.DevicePipeline, "__call__", recording_call)
    return strengths
