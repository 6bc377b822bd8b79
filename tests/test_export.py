"""export.py: tiny Lite0 melanoma checkpoints (late and concat fusion) and a detector to ONNX / TorchScript; the
exported files score like the checkpoints, through predict.py and by hand as the JSON describes, and the parity
check refuses a file that disagrees."""

from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pandas as pd
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import export  # noqa: E402
import multi_classification  # noqa: E402
import predict  # noqa: E402
import train  # noqa: E402
from melanoma_audit.checkpoints import load_checkpoint  # noqa: E402
from melanoma_audit.metadata import MetaEncoder  # noqa: E402

TOLERANCE = export.DEFAULT_TOLERANCE


def train_melanoma(data_dir, out_dir, name, *extra):
    """One epoch of Lite0 at 32 px from random weights (lesion features and late fusion by default there)."""
    train.main([
        "--save-name", name, "--data-dir", str(data_dir), "--image-size", "32", "--n-epochs", "1",
        "--enet-type", "efficientnet-lite0", "--no-pretrained", "--use-meta", "--batch-size", "16",
        "--num-workers", "0", "--n-folds", "3", "--no-baselines", "--no-tensorboard",
        "--model-dir", str(out_dir), "--log-dir", str(out_dir / "logs"), *extra,
    ])  # fmt: skip
    return out_dir / f"{name}_best.pth"


@pytest.fixture(scope="module")
def exported(synthetic_dir, tmp_path_factory) -> dict:
    """Each checkpoint and its export (the ONNX file, and TorchScript for the detector)."""
    out = tmp_path_factory.mktemp("export")
    late = train_melanoma(synthetic_dir, out, "late")  # metadata regression and lesion features in the graph
    concat_flags = ["--fusion", "concat", "--no-lesion-features", "--out-dim", "2"]
    concat = train_melanoma(synthetic_dir, out, "concat", *concat_flags)
    detector = out / "detector.pth"
    multi_classification.main([
        "--img_path", str(synthetic_dir / "train" / "train"), "--ann_path", str(synthetic_dir / "gans_biases.csv"),
        "--mode", "train", "--model_path", str(detector), "--epochs", "1", "--enet_type", "efficientnet-lite0",
        "--image_size", "32", "--no-pretrained", "--num_workers", "0", "--batch", "16", "--no-tensorboard",
    ])  # fmt: skip
    results = {}
    for name, checkpoint, fmt in (("late", late, "onnx"), ("concat", concat, "onnx"), ("detector", detector, "both")):
        results[name] = {"checkpoint": checkpoint, **export.main(["--model-path", str(checkpoint), "--format", fmt])}
    return results


@pytest.mark.parametrize("name", ["late", "concat"])
def test_exported_melanoma_model_scores_like_its_checkpoint(exported, synthetic_dir, tmp_path, name):
    run = exported[name]
    onnx_file = run["checkpoint"].with_suffix(".onnx")
    assert run["files"] == [onnx_file] and run["differences"][onnx_file.name] <= TOLERANCE
    spec = json.loads(run["spec"].read_text())
    checkpoint = load_checkpoint(run["checkpoint"], "melanoma")
    assert spec["fusion"] == name and spec["parity"]["tolerance"] == TOLERANCE
    assert spec["inputs"]["image"]["dtype"] == "uint8" and spec["inputs"]["image"]["shape"] == ["batch", 3, 32, 32]
    assert spec["inputs"]["image"]["normalisation_in_graph"]["mean"] == checkpoint["mean"]
    assert spec["inputs"]["meta"]["feature_names"] == checkpoint["meta_feature_names"]
    assert ("lesion_features" in spec["inputs"]) is (name == "late")
    assert [output["name"] for output in spec["outputs"]] == ["probability", "network_log_odds", "metadata_log_odds"]

    # predict.py end to end, with TTA and batches of 3 images (6 views): the same submission from either file
    # (the tiny training fold saw only some sites: the others are encoded as missing, on both paths)
    common = ["--data-dir", str(synthetic_dir), "--n-tta", "2", "--batch-size", "6", "--num-workers", "0"]
    common.append("--allow-missing-meta")
    from_checkpoint = predict.main([*common, "--model-path", str(run["checkpoint"]), "--out", str(tmp_path / "a.csv")])
    from_onnx = predict.main([*common, "--model-path", str(onnx_file), "--out", str(tmp_path / "b.csv")])
    assert from_onnx["image_name"].tolist() == from_checkpoint["image_name"].tolist()
    np.testing.assert_allclose(from_onnx["target"], from_checkpoint["target"], atol=TOLERANCE, rtol=0)
    written = pd.read_csv(tmp_path / "b.csv")
    np.testing.assert_allclose(written["target"], from_checkpoint["target"], atol=TOLERANCE, rtol=0)


def test_the_json_is_enough_to_feed_the_onnx_file_by_hand(exported, synthetic_dir, tmp_path):
    """What docs/export.md tells a user without this project's scoring code: OpenCV, the stored encoder and
    onnxruntime give predict.py's P(melanoma) (one view) for a model with metadata inside the network."""
    import onnxruntime

    run = exported["concat"]
    spec = json.loads(run["spec"].read_text())
    frame = pd.read_csv(synthetic_dir / "test.csv")
    frame["filepath"] = [str(synthetic_dir / "test" / "test" / f"{name}.jpg") for name in frame["image_name"]]
    size = spec["inputs"]["image"]["width"]
    images = np.stack([
        cv2.resize(cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB), (size, size), interpolation=cv2.INTER_LINEAR)
        for path in frame["filepath"]
    ]).transpose(0, 3, 1, 2)  # fmt: skip
    meta = MetaEncoder.from_state_dict(spec["inputs"]["meta"]["encoder"]).transform(frame)
    session = onnxruntime.InferenceSession(str(run["files"][0]), providers=["CPUExecutionProvider"])
    (probability,) = session.run(["probability"], {"image": np.ascontiguousarray(images), "meta": meta})
    reference = predict.main([
        "--data-dir", str(synthetic_dir), "--model-path", str(run["checkpoint"]), "--num-workers", "0",
        "--out", str(tmp_path / "p.csv"), "--allow-missing-meta",
    ])  # fmt: skip
    np.testing.assert_allclose(probability, reference["target"], atol=TOLERANCE, rtol=0)


def test_detector_exports_to_both_formats_with_its_heads_and_thresholds(exported):
    run = exported["detector"]
    checkpoint = load_checkpoint(run["checkpoint"], "artifact")
    names = [path.name for path in run["files"]]
    assert names == ["detector.onnx", "detector.torchscript.pt"]
    assert all(run["differences"][name] <= TOLERANCE for name in names)
    spec = json.loads(run["spec"].read_text())
    assert spec["kind"] == "artifact" and spec["heads"] == checkpoint["heads"]
    assert list(spec["thresholds"].values()) == pytest.approx(checkpoint["thresholds"])
    assert spec["files"] == {"onnx": "detector.onnx", "torchscript": "detector.torchscript.pt"}
    assert spec["outputs"][0]["shape"] == ["batch", len(checkpoint["heads"])]


def copy_export(run: dict, folder):
    """The checkpoint and its exported files in `folder`, to be tampered with."""
    folder.mkdir()
    for path in [run["checkpoint"], *run["files"], run["spec"]]:
        shutil.copy(path, folder / path.name)
    return folder / run["checkpoint"].name


def check_only_fails(checkpoint, capsys, *fragments):
    with pytest.raises(SystemExit) as stop:
        export.main(["--model-path", str(checkpoint), "--check-only"])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err


def test_parity_check_refuses_a_changed_weight_or_metadata_encoding(exported, tmp_path, capsys):
    import onnx
    from onnx import numpy_helper

    checkpoint = copy_export(exported["late"], tmp_path / "weight")
    export.main(["--model-path", str(checkpoint), "--check-only"])  # the copy as written passes
    onnx_file = checkpoint.with_suffix(".onnx")
    graph = onnx.load(str(onnx_file))
    bias = next(tensor for tensor in graph.graph.initializer if tensor.name.endswith("fc.bias"))
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + np.float32(0.01), bias.name))
    onnx.save(graph, str(onnx_file))
    check_only_fails(checkpoint, capsys, "late_best.onnx disagrees with", "tolerance 0.0001")

    # the JSON's metadata encoding is what predict.py feeds the graph with: a wrong one fails the check too
    checkpoint = copy_export(exported["concat"], tmp_path / "encoding")
    spec_file = checkpoint.with_suffix(".json")
    spec = json.loads(spec_file.read_text())
    spec["inputs"]["meta"]["encoder"]["age_fill"] += 30
    spec["inputs"]["meta"]["encoder"]["sites"].reverse()
    spec_file.write_text(json.dumps(spec))
    check_only_fails(checkpoint, capsys, "concat_best.onnx disagrees with")
    spec["inputs"]["meta"]["encoder"]["features"].remove("image_size")  # a vector one column short
    spec_file.write_text(json.dumps(spec))
    check_only_fails(checkpoint, capsys, "concat_best.onnx does not take the inputs its JSON describes")


def test_export_refuses_to_overwrite_and_predict_needs_the_json(exported, synthetic_dir, tmp_path, capsys):
    checkpoint = copy_export(exported["concat"], tmp_path / "copy")
    before = checkpoint.with_suffix(".onnx").read_bytes()
    check_only_fails_export = ["--model-path", str(checkpoint)]
    with pytest.raises(SystemExit) as stop:
        export.main(check_only_fails_export)
    assert stop.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert checkpoint.with_suffix(".onnx").read_bytes() == before

    checkpoint.with_suffix(".json").unlink()
    with pytest.raises(SystemExit) as stop:
        predict.main([
            "--data-dir", str(synthetic_dir), "--model-path", str(checkpoint.with_suffix(".onnx")),
            "--out", str(tmp_path / "p.csv"), "--num-workers", "0",
        ])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and "concat_best.json is missing beside" in err and len(err.splitlines()) == 1
