import json
import math
import pickle
from pathlib import Path

import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

import train
from melanoma_audit import engine
from melanoma_audit.checkpoints import load_checkpoint
from melanoma_audit.engine import weight_average
from melanoma_audit.patients import make_folds
from melanoma_audit.tables import read_melanoma_table
from models import MelanomaNet
from utils import UserError


def seed_command(data_dir, tmp_path, *extra):
    """The README's seed command, shrunk to seconds: tiny images, b0, one epoch, random weights."""
    return [
        "--save-name", "efficientnetb2_256_20ep", "--data-dir", str(data_dir), "--image-size", "32",
        "--n-epochs", "1", "--enet-type", "efficientnet-b0", "--CUDA_VISIBLE_DEVICES", "0",
        "--no-pretrained", "--batch-size", "16", "--num-workers", "0", "--n-folds", "3",
        "--model-dir", str(tmp_path / "weights"), "--log-dir", str(tmp_path / "logs"), *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("use_meta", [False, True])
def test_seed_commands_train_end_to_end(synthetic_dir, tmp_path, capsys, use_meta):
    command = seed_command(synthetic_dir, tmp_path, *(["--use-meta"] if use_meta else []))
    summary = train.main(command)
    weights, logs = tmp_path / "weights", tmp_path / "logs"
    for suffix in ("best", "final", "last"):
        assert (weights / f"efficientnetb2_256_20ep_{suffix}.pth").is_file()
    log = (logs / "log_efficientnetb2_256_20ep.txt").read_text().splitlines()
    assert len(log) == 1 and "Fold 0, Epoch 1, lr: " in log[0] and ", auc: " in log[0]
    record = json.loads((logs / "metrics_efficientnetb2_256_20ep.jsonl").read_text())
    assert {"train_loss", "valid_loss", "acc", "auc", "balanced_acc", "sensitivity", "specificity"} <= set(record)
    # late fusion: the image network's own AUC at the best epoch (demo.py checks it); none without a metadata model
    if use_meta:
        assert summary["image_mean_auc"] == pytest.approx(record["image_auc"])
    else:
        assert "image_auc" not in record and math.isnan(summary["image_mean_auc"])
    oof = pd.read_csv(logs / "oof_efficientnetb2_256_20ep.csv")
    # exactly fold 0's images, with their labels
    frame = read_melanoma_table(synthetic_dir, "train", use_meta=False, require_target=True)
    fold_rows = frame[make_folds(frame, 3, 0) == 0].set_index("image_name")["target"]
    assert oof.set_index("image_name")["target"].sort_index().equals(fold_rows.sort_index())
    # the one fold's AUC, as the out-of-fold file gives it and as the metrics line logged it
    assert summary["fold_auc"] == [pytest.approx(roc_auc_score(oof["target"], oof["prob"]))]
    assert summary["mean_auc"] == summary["fold_auc"][0] == pytest.approx(record["auc"])

    # the checkpoint alone rebuilds the model and its input encoding, and loads without pickle
    checkpoint = load_checkpoint(weights / "efficientnetb2_256_20ep_best.pth", "melanoma")
    torch.load(weights / "efficientnetb2_256_20ep_best.pth", weights_only=True)
    assert checkpoint["image_size"] == 32 and checkpoint["use_meta"] is use_meta
    assert (checkpoint["meta_encoder"] is not None) is use_meta
    model = MelanomaNet(**checkpoint["model"], pretrained=False)
    model.load_state_dict(checkpoint["state_dict"])
    # --no-pretrained feeds the lesion features into the side branch; its metadata goes to the late-fusion
    # logistic regression, not into the network
    assert checkpoint["model"]["n_meta_features"] == len(checkpoint["lesion_features"]["mean"])
    assert checkpoint["fusion"] == ("late" if use_meta else "concat")
    assert (checkpoint["meta_model"] is not None) is use_meta

    # the weight average (on from scratch) is what gets validated and saved; the raw weights go on training
    last = load_checkpoint(weights / "efficientnetb2_256_20ep_last.pth", "melanoma")
    weight = "enet._conv_stem.weight"
    assert not torch.equal(last["training_weights"][weight], last["state_dict"][weight])
    torch.testing.assert_close(checkpoint["state_dict"][weight], last["state_dict"][weight])

    # the same command again is refused; --resume with more epochs than the saved run too, nothing touched
    best = (weights / "efficientnetb2_256_20ep_best.pth").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        train.main(command)
    assert exit_info.value.code == 2 and "--overwrite" in capsys.readouterr().err
    command[command.index("--n-epochs") + 1] = "2"
    with pytest.raises(SystemExit):  # n_epochs differs from the saved run
        train.main([*command, "--resume"])
    assert (weights / "efficientnetb2_256_20ep_best.pth").read_bytes() == best


def test_concat_fusion_puts_the_metadata_into_the_network(synthetic_dir, tmp_path):
    train.main(seed_command(synthetic_dir, tmp_path, "--use-meta", "--fusion", "concat"))
    checkpoint = load_checkpoint(tmp_path / "weights" / "efficientnetb2_256_20ep_best.pth", "melanoma")
    n_meta, n_lesion = len(checkpoint["meta_feature_names"]), len(checkpoint["lesion_features"]["mean"])
    assert checkpoint["fusion"] == "concat" and checkpoint["meta_model"] is None
    assert checkpoint["model"]["n_meta_features"] == n_meta + n_lesion
    assert train.parse_args(["--save-name", "x", "--data-dir", "d"]).fusion == "concat"


def test_lesion_features_are_on_from_scratch_only():
    assert train.parse_args(["--save-name", "x", "--data-dir", "d"]).lesion_features is False
    assert train.parse_args(["--save-name", "x", "--data-dir", "d", "--no-pretrained"]).lesion_features is True


def test_bad_inputs_end_in_one_sentence_and_exit_code_2(synthetic_dir, tmp_path, capsys):
    def fails_with(argv, *fragments):
        with pytest.raises(SystemExit) as exit_info:
            train.main(argv)
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2
        assert len(err.splitlines()) == 1 and "Traceback" not in err
        for fragment in fragments:
            assert fragment in err

    fails_with(seed_command(tmp_path / "nowhere", tmp_path), "nowhere", "--data-dir")

    broken = tmp_path / "broken"
    (broken / "train" / "train").mkdir(parents=True)
    frame = pd.read_csv(synthetic_dir / "train.csv")
    frame.drop(columns=["target"]).to_csv(broken / "train.csv", index=False)
    fails_with(seed_command(broken, tmp_path), "train.csv", "target")

    frame.to_csv(broken / "train.csv", index=False)
    for name in frame["image_name"][1:]:
        (broken / "train" / "train" / f"{name}.jpg").write_bytes(
            (synthetic_dir / "train" / "train" / f"{name}.jpg").read_bytes()
        )
    fails_with(seed_command(broken, tmp_path), f"{frame['image_name'][0]}.jpg", "missing")

    fails_with(seed_command(synthetic_dir, tmp_path, "--fold", "3"), "--fold 3")
    if not torch.cuda.is_available():
        fails_with(seed_command(synthetic_dir, tmp_path, "--device", "cuda"), "--device cuda")


def test_pickled_checkpoint_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as handle:
        pickle.dump({"format": 1, "kind": "melanoma", "payload": object()}, handle)
    with pytest.raises(UserError, match="pickle"):
        load_checkpoint(path, "melanoma")


def test_weight_average_follows_the_training_weights_at_its_decay():
    source = torch.nn.Linear(2, 1)
    average = weight_average(source, decay=0.9)
    start = average.module.weight.clone()
    with torch.no_grad():
        source.weight.add_(1.0)
    average.update_parameters(source)
    torch.testing.assert_close(average.module.weight, 0.9 * start + 0.1 * source.weight)

    assert train.parse_args(["--save-name", "x", "--data-dir", "d", "--no-pretrained"]).ema_decay == 0.98
    assert train.parse_args(["--save-name", "x", "--data-dir", "d"]).ema_decay == 0.0


def test_seed_varies_the_network_but_not_the_folds_unless_fold_seed_says_so(synthetic_dir, tmp_path):
    def validation_rows(name, *extra):
        fast = ["--no-baselines", "--no-lesion-features", "--save-name", name]
        train.main(seed_command(synthetic_dir, tmp_path, *fast, *extra))
        oof = pd.read_csv(tmp_path / "logs" / f"oof_{name}.csv")
        return set(oof["image_name"]), oof.set_index("image_name")["prob"]

    rows_0, probs_0 = validation_rows("seed0")
    rows_1, probs_1 = validation_rows("seed1", "--seed", "1")
    assert rows_1 == rows_0 and not probs_1.loc[probs_0.index].equals(probs_0)
    rows_other_split, _ = validation_rows("split1", "--fold-seed", "1")
    assert rows_other_split != rows_0


def test_compile_trains_the_compiled_module_and_saves_plain_weights(synthetic_dir, tmp_path, eager_compile):
    # (without --compile nothing is compiled: test_device_data_path_trains_validates_and_resumes_exactly)
    train.main(seed_command(synthetic_dir, tmp_path, "--no-baselines", "--no-lesion-features", "--compile"))
    assert eager_compile == ["MelanomaNet"]
    checkpoint = load_checkpoint(tmp_path / "weights" / "efficientnetb2_256_20ep_best.pth", "melanoma")
    assert not any(key.startswith("_orig_mod") for key in checkpoint["state_dict"])
    MelanomaNet(**checkpoint["model"], pretrained=False).load_state_dict(checkpoint["state_dict"])
    # --no-lesion-features: no side branch at all (no metadata either)
    assert checkpoint["lesion_features"] is None and checkpoint["model"]["n_meta_features"] == 0


def interrupted_then_resumed(command: list[str], monkeypatch) -> dict:
    """Runs train.py's `command`, killed (KeyboardInterrupt) as it starts its second epoch, then with --resume."""
    real_epoch = engine.train_one_epoch
    calls = []

    def crash_in_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(engine, "train_one_epoch", crash_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train.main(command)
    monkeypatch.setattr(engine, "train_one_epoch", real_epoch)
    weights = Path(command[command.index("--model-dir") + 1])
    assert not (weights / "efficientnetb2_256_20ep_final.pth").exists()
    return train.main([*command, "--resume"])


def test_device_data_path_trains_validates_and_resumes_exactly(
    synthetic_dir, tmp_path, monkeypatch, device_pipeline_strengths, eager_compile
):
    """On either data path a run killed in its second epoch and resumed ends as the uninterrupted run did; the
    device path's bit for bit."""

    def history(run: str) -> list[dict]:
        lines = (tmp_path / run / "logs" / "metrics_efficientnetb2_256_20ep.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        return [{key: value for key, value in record.items() if key not in ("time", "seconds")} for record in records]

    def final_weights(run: str) -> dict:
        return torch.load(tmp_path / run / "weights" / "efficientnetb2_256_20ep_final.pth", weights_only=True)[
            "state_dict"
        ]

    def command(run: str, *extra: str) -> list[str]:
        return seed_command(synthetic_dir, tmp_path / run, "--n-epochs", "2", *extra)

    uninterrupted = train.main(command("auto"))  # auto on the CPU: the albumentations workers (with baselines)
    assert device_pipeline_strengths == [] and eager_compile == []  # and nothing compiled without --compile
    resumed = interrupted_then_resumed(command("cpu", "--data-path", "cpu"), monkeypatch)
    assert resumed["mean_auc"] == pytest.approx(uninterrupted["mean_auc"], abs=1e-6)
    assert len(history("cpu")) == 2  # each epoch once
    for record_a, record_b in zip(history("auto"), history("cpu"), strict=True):
        for key in ("train_loss", "valid_loss", "auc"):
            assert record_b[key] == pytest.approx(record_a[key], abs=1e-6)
    reference, weights = final_weights("auto"), final_weights("cpu")
    for name, tensor in reference.items():
        assert torch.allclose(tensor.float(), weights[name].float(), atol=1e-6), name

    train.main(command("a", "--data-path", "gpu", "--no-baselines"))
    # the training batches augmented ("light", the default with --no-pretrained, also for the BatchNorm refresh), the
    # validation batches decoded on the device too
    assert set(device_pipeline_strengths) == {"light", "none"}
    interrupted_then_resumed(command("b", "--data-path", "gpu", "--no-baselines"), monkeypatch)
    assert history("b") == history("a")
    reference, weights = final_weights("a"), final_weights("b")
    assert all(torch.equal(tensor, weights[name]) for name, tensor in reference.items())
