"""Checkpoints are data, not instructions: a network is rebuilt from whitelisted, type-checked settings only, and
nothing in a checkpoint names a file that is then opened."""

import pytest
import torch
from efficientnet_pytorch import EfficientNet

import models
import predict
from dataset import Preprocessing
from melanoma_audit.checkpoints import CHECKPOINT_FORMAT, save_checkpoint
from melanoma_audit.inference import load_melanoma_model
from models import ArtifactNet, MelanomaNet, model_from_checkpoint
from utils import UserError


def melanoma_checkpoint(**model) -> dict:
    net = MelanomaNet("efficientnet-b0", pretrained=False)
    return {
        "format": CHECKPOINT_FORMAT,
        "kind": "melanoma",
        "model": {
            "enet_type": "efficientnet-b0",
            "out_dim": 1,
            "n_meta_features": 0,
            "n_meta_dim": [512, 128],
            **model,
        },
        "state_dict": net.state_dict(),
        "use_meta": False,
        "meta_encoder": None,
        "image_size": 32,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
    }


def test_a_checkpoint_cannot_make_predict_open_a_file(synthetic_dir, tmp_path, monkeypatch, capsys):
    bait = tmp_path / "imagenet.pth"  # a file that would load as backbone weights
    torch.save(EfficientNet.from_name("efficientnet-b0").state_dict(), bait)
    crafted = tmp_path / "crafted.pth"
    save_checkpoint(crafted, melanoma_checkpoint(weights_path=str(bait)))
    opened = []
    real_load = models.load_backbone_weights
    monkeypatch.setattr(models, "load_backbone_weights", lambda *args: (opened.append(args), real_load(*args)))
    with pytest.raises(SystemExit) as exit_info:
        predict.main(["--data-dir", str(synthetic_dir), "--model-path", str(crafted), "--out", str(tmp_path / "p.csv")])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert str(crafted) in err and "weights_path" in err and "--pretrained-weights" not in err
    assert opened == [] and not (tmp_path / "p.csv").exists()


@pytest.mark.parametrize(
    ("kind", "model"),
    [
        ("melanoma", {"n_meta_dim": [8, 4, 2]}),
        ("melanoma", {"enet_type": 7}),
        ("melanoma", {"out_dim": "1"}),
        ("melanoma", {"n_meta_features": True}),
        ("melanoma", {"bn_momentum": 0.5}),
        ("melanoma", {"pretrained": True}),
        ("artifact", {"heads": "ab"}),
        ("artifact", {"dropout": 2.0}),
        ("artifact", {"enet_type": "efficientnet-b9"}),
    ],
)
def test_a_bad_model_setting_is_one_sentence_naming_the_file(kind, model):
    if kind == "melanoma":
        checkpoint = melanoma_checkpoint(**model)
    else:
        net = ArtifactNet("efficientnet-b0", ["hair", "ruler"], pretrained=False)
        base = {"enet_type": "efficientnet-b0", "heads": ["hair", "ruler"]}
        checkpoint = {"kind": "artifact", "model": {**base, **model}, "state_dict": net.state_dict()}
    with pytest.raises(UserError) as error:
        model_from_checkpoint(checkpoint, "weights/crafted.pth")
    message = str(error.value)
    assert "weights/crafted.pth" in message and len(message.splitlines()) == 1
    assert "--" not in message  # no flag the user never gave
    assert next(iter(model)) in message


def test_good_checkpoints_of_both_kinds_still_rebuild():
    rebuilt = model_from_checkpoint(melanoma_checkpoint(), "m.pth")
    assert isinstance(rebuilt, MelanomaNet) and not rebuilt.training
    net = ArtifactNet("efficientnet-b0", ["hair", "ruler"], pretrained=False)
    config = {"enet_type": "efficientnet-b0", "heads": ["hair", "ruler"]}
    rebuilt = model_from_checkpoint({"kind": "artifact", "model": config, "state_dict": net.state_dict()}, "a.pth")
    assert rebuilt.head_names == ["hair", "ruler"]


@pytest.mark.parametrize(
    ("key", "value"),
    [("color_constancy", ["shades-of-gray"]), ("minkowski_p", "6"), ("minkowski_p", 0.5), ("resize_mode", "fit")],
)
def test_a_bad_preprocessing_setting_names_the_file_not_a_flag(tmp_path, key, value):
    crafted = tmp_path / "crafted.pth"
    save_checkpoint(crafted, {**melanoma_checkpoint(), key: value})
    with pytest.raises(UserError) as error:
        load_melanoma_model(crafted, torch.device("cpu"))
    message = str(error.value)
    assert str(crafted) in message and key in message and len(message.splitlines()) == 1
    assert "--" not in message  # not --color-constancy / --minkowski-p / --resize-mode: the user gave none


def test_a_checkpoint_without_fingerprints_still_loads_for_prediction(tmp_path):
    old = tmp_path / "old.pth"  # written before data_sha256 / val_sha256 / Preprocessing
    save_checkpoint(old, {**melanoma_checkpoint(), "fold": 0, "n_folds": 5, "val_images": ["a"]})
    loaded = load_melanoma_model(old, torch.device("cpu"))
    assert loaded.info["data_sha256"] is None and loaded.preprocessing == Preprocessing()
