import json
import math
import pickle

import pandas as pd
import pytest
import torch

import train
from melanoma_audit import engine
from melanoma_audit.checkpoints import load_checkpoint
from melanoma_audit.engine import weight_average
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
def test_seed_commands_train_end_to_end(synthetic_dir, tmp_path, use_meta):
    summary = train.main(seed_command(synthetic_dir, tmp_path, *(["--use-meta"] if use_meta else [])))
    assert 0.0 <= summary["mean_auc"] <= 1.0
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
    assert oof["prob"].between(0, 1).all() and set(oof["target"]) == {0, 1}

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


def test_concat_fusion_puts_the_metadata_into_the_network(synthetic_dir, tmp_path):
    train.main(seed_command(synthetic_dir, tmp_path, "--use-meta", "--fusion", "concat"))
    checkpoint = load_checkpoint(tmp_path / "weights" / "efficientnetb2_256_20ep_best.pth", "melanoma")
    n_meta, n_lesion = len(checkpoint["meta_feature_names"]), len(checkpoint["lesion_features"]["mean"])
    assert checkpoint["fusion"] == "concat" and checkpoint["meta_model"] is None
    assert checkpoint["model"]["n_meta_features"] == n_meta + n_lesion
    assert train.parse_args(["--save-name", "x", "--data-dir", "d"]).fusion == "concat"


def test_lesion_features_can_be_turned_off(synthetic_dir, tmp_path):
    train.main(seed_command(synthetic_dir, tmp_path, "--no-lesion-features"))
    checkpoint = load_checkpoint(tmp_path / "weights" / "efficientnetb2_256_20ep_best.pth", "melanoma")
    assert checkpoint["lesion_features"] is None and checkpoint["model"]["n_meta_features"] == 0
    assert train.parse_args(["--save-name", "x", "--data-dir", "d"]).lesion_features is False
    assert train.parse_args(["--save-name", "x", "--data-dir", "d", "--no-pretrained"]).lesion_features is True


def test_existing_run_is_refused_then_resumed(synthetic_dir, tmp_path, capsys):
    command = seed_command(synthetic_dir, tmp_path)
    train.main(command)
    with pytest.raises(SystemExit) as exit_info:
        train.main(command)
    assert exit_info.value.code == 2
    assert "--overwrite" in capsys.readouterr().err
    best = (tmp_path / "weights" / "efficientnetb2_256_20ep_best.pth").read_bytes()
    assert load_checkpoint(tmp_path / "weights" / "efficientnetb2_256_20ep_best.pth", "melanoma")
    # --resume with more epochs continues the same run: the log gains exactly one line per new epoch
    command[command.index("--n-epochs") + 1] = "2"
    with pytest.raises(SystemExit):  # n_epochs differs from the saved run: refused, nothing touched
        train.main([*command, "--resume"])
    assert (tmp_path / "weights" / "efficientnetb2_256_20ep_best.pth").read_bytes() == best


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


@pytest.mark.parametrize("data_path", ["cpu", "gpu"])
def test_interrupted_run_resumes_to_the_same_result(synthetic_dir, tmp_path, monkeypatch, data_path):
    uninterrupted = train.main(seed_command(synthetic_dir, tmp_path / "a", "--n-epochs", "2", "--data-path", data_path))

    real_epoch = engine.train_one_epoch
    calls = []

    def crash_in_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    command = seed_command(synthetic_dir, tmp_path / "b", "--n-epochs", "2", "--data-path", data_path)
    monkeypatch.setattr(engine, "train_one_epoch", crash_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train.main(command)
    monkeypatch.setattr(engine, "train_one_epoch", real_epoch)
    assert not (tmp_path / "b" / "weights" / "efficientnetb2_256_20ep_final.pth").exists()
    resumed = train.main([*command, "--resume"])

    assert resumed["mean_auc"] == pytest.approx(uninterrupted["mean_auc"], abs=1e-6)
    lines = [
        (tmp_path / run / "logs" / "metrics_efficientnetb2_256_20ep.jsonl").read_text().splitlines() for run in "ab"
    ]
    assert len(lines[1]) == 2  # each epoch once
    for record_a, record_b in zip(*(map(json.loads, run) for run in lines), strict=True):
        for key in ("train_loss", "valid_loss", "auc"):
            assert record_b[key] == pytest.approx(record_a[key], abs=1e-6)
    final = [
        torch.load(tmp_path / run / "weights" / "efficientnetb2_256_20ep_final.pth", weights_only=True) for run in "ab"
    ]
    for name, tensor in final[0]["state_dict"].items():
        assert torch.allclose(tensor.float(), final[1]["state_dict"][name].float(), atol=1e-6), name


def test_weight_average_is_what_gets_validated_and_saved(synthetic_dir, tmp_path):
    source = torch.nn.Linear(2, 1)
    average = weight_average(source, decay=0.9)
    start = average.module.weight.clone()
    with torch.no_grad():
        source.weight.add_(1.0)
    average.update_parameters(source)
    torch.testing.assert_close(average.module.weight, 0.9 * start + 0.1 * source.weight)

    assert train.parse_args(["--save-name", "x", "--data-dir", "d", "--no-pretrained"]).ema_decay == 0.98
    assert train.parse_args(["--save-name", "x", "--data-dir", "d"]).ema_decay == 0.0
    train.main(seed_command(synthetic_dir, tmp_path))
    last = load_checkpoint(tmp_path / "weights" / "efficientnetb2_256_20ep_last.pth", "melanoma")
    best = load_checkpoint(tmp_path / "weights" / "efficientnetb2_256_20ep_best.pth", "melanoma")
    weight = "enet._conv_stem.weight"
    assert not torch.equal(last["training_weights"][weight], last["state_dict"][weight])
    torch.testing.assert_close(best["state_dict"][weight], last["state_dict"][weight])


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
    fast = ["--no-baselines", "--no-lesion-features", "--overwrite"]
    train.main(seed_command(synthetic_dir, tmp_path, *fast))
    assert eager_compile == []
    train.main(seed_command(synthetic_dir, tmp_path, *fast, "--compile"))
    assert eager_compile == ["MelanomaNet"]
    checkpoint = load_checkpoint(tmp_path / "weights" / "efficientnetb2_256_20ep_best.pth", "melanoma")
    assert not any(key.startswith("_orig_mod") for key in checkpoint["state_dict"])
    MelanomaNet(**checkpoint["model"], pretrained=False).load_state_dict(checkpoint["state_dict"])


def test_device_data_path_trains_validates_and_repeats_exactly(synthetic_dir, tmp_path, device_pipeline_strengths):
    def history(run: str, *extra: str) -> list[dict]:
        train.main(seed_command(synthetic_dir, tmp_path / run, "--n-epochs", "2", "--no-baselines", *extra))
        lines = (tmp_path / run / "logs" / "metrics_efficientnetb2_256_20ep.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        return [{key: value for key, value in record.items() if key not in ("time", "seconds")} for record in records]

    history("auto")  # auto on the CPU: the albumentations workers
    assert device_pipeline_strengths == []
    first = history("a", "--data-path", "gpu")
    # the training batches augmented ("light", the default with --no-pretrained, also for the BatchNorm refresh), the
    # validation batches decoded on the device too
    assert set(device_pipeline_strengths) == {"light", "none"}
    assert history("b", "--data-path", "gpu") == first
    weights = [
        torch.load(tmp_path / run / "weights" / "efficientnetb2_256_20ep_final.pth", weights_only=True)["state_dict"]
        for run in "ab"
    ]
    assert all(torch.equal(tensor, weights[1][name]) for name, tensor in weights[0].items())
