"""Late fusion trains the network on the image alone: the image-only AUC it logs per epoch is exactly what the
image-only command scores, so one --use-meta run reports both (README results rely on this)."""

import json

import train


def command(data_dir, tmp_path, name, *extra):
    return [
        "--save-name", name, "--data-dir", str(data_dir), "--image-size", "32", "--n-epochs", "2",
        "--enet-type", "efficientnet-lite0", "--batch-size", "16", "--num-workers", "0", "--n-folds", "3",
        "--augment", "light", "--model-dir", str(tmp_path / "weights"), "--log-dir", str(tmp_path / "logs"), *extra,
    ]  # fmt: skip


def epochs(tmp_path, name):
    return [json.loads(line) for line in (tmp_path / "logs" / f"metrics_{name}.jsonl").read_text().splitlines()]


def test_late_fusion_logs_the_image_only_networks_auc(synthetic_dir, tmp_path):
    train.main(command(synthetic_dir, tmp_path, "image_only"))
    train.main(command(synthetic_dir, tmp_path, "late", "--use-meta", "--fusion", "late"))
    image_only, late = epochs(tmp_path, "image_only"), epochs(tmp_path, "late")
    assert [r["auc"] for r in image_only] == [r["image_auc"] for r in late]
    assert "image_auc" not in image_only[0]
    # the fused score is a different number: the metadata evidence moved it
    assert [r["auc"] for r in late] != [r["image_auc"] for r in late]
