import pytest

import multi_classification
import train


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        # b0-b7 with ImageNet weights: the 1st-place recipe
        (["--enet-type", "efficientnet-b2"], {"augment": "full", "fusion": "concat", "lesion_features": False}),
        # Lite with the ImageNet weights from pip: the measured offline recipe
        (["--enet-type", "efficientnet-lite0"], {"augment": "light", "fusion": "late", "lesion_features": False}),
        # random weights, whatever the backbone: the measured from-scratch recipe
        (
            ["--enet-type", "efficientnet-lite0", "--no-pretrained"],
            {"augment": "light", "fusion": "late", "lesion_features": True, "ema_decay": 0.98},
        ),
    ],
)
def test_defaults_follow_where_the_weights_start(weights, expected):
    config = train.parse_args(["--save-name", "x", "--data-dir", "d", *weights])
    assert {key: getattr(config, key) for key in expected} == expected


def test_an_explicit_flag_beats_the_table():
    config = train.parse_args(
        ["--save-name", "x", "--data-dir", "d", "--enet-type", "efficientnet-lite0", "--augment", "full"]
    )
    assert config.augment == "full" and config.fusion == "late"


def test_detector_lite_defaults_exist():
    config = multi_classification.parse_args(
        [
            "--img_path",
            "d",
            "--ann_path",
            "a.csv",
            "--mode",
            "train",
            "--model_path",
            "m.pth",
            "--enet_type",
            "efficientnet-lite0",
        ]
    )
    assert config.init_lr > 0 and config.bn_refresh_batches == 0
