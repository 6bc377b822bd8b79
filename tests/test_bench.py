import json

import bench


def bench_argv(data_dir, tmp_path, *extra):
    return [
        "--enet-type", "efficientnet-b0", "--image-size", "32", "--batch-size", "4", "--steps", "2", "--warmup", "1",
        "--data-images", "8", "--num-workers", "0", "--data-dir", str(data_dir), "--json", str(tmp_path / "b.json"),
        *extra,
    ]  # fmt: skip


def test_every_part_is_measured_and_written(synthetic_dir, tmp_path):
    result = bench.main(bench_argv(synthetic_dir, tmp_path))
    for key in ("model_train_img_s", "model_infer_img_s", "data_img_s_per_worker", "loop_train_img_s"):
        assert result[key] > 0, key
    assert result["loop_over_model"] == result["loop_train_img_s"] / result["model_train_img_s"]
    assert json.loads((tmp_path / "b.json").read_text()) == result


def test_compile_measures_the_compiled_training_step(synthetic_dir, tmp_path, eager_compile):
    result = bench.main(bench_argv(synthetic_dir, tmp_path, "--compile", "--only", "model,loop"))
    assert eager_compile == ["MelanomaNet", "MelanomaNet"] and result["compile"] is True
    assert result["model_train_img_s"] > 0 and result["loop_train_img_s"] > 0
