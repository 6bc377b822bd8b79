"""preprocessing: what the network side needs of the image pipeline, without the augmentation library."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_building_a_network_does_not_load_the_augmentation_library():
    """models.py takes ImageNet's mean and std from preprocessing, which must stay free of albumentations (the
    issue's one-way dependencies: a network is built, exported or scored without the training augmentations)."""
    code = "import sys, models; print(sorted(name for name in sys.modules if name.split('.')[0] == 'albumentations'))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
