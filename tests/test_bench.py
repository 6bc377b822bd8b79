import json

import pytest

import bench


def bench_argv(data_dir, tmp_path, *extra):
    return [
        "--enet-type", "efficientnet-b0", "--image-size", "32", "--batch-size", "4", "--steps", "2", "--warmup", "1",
        "--data-images", "8", "--num-workers", "0", "--data-dir", str(data_dir), "--json", str(tmp_path / "b.json"),
        "--overwrite", *extra,
    ]  # fmt: skip


def test_every_part_is_measured_and_written(synthetic_dir, tmp_path):
    result = bench.main(bench_argv(synthetic_dir, tmp_path))
    for key in ("model_train_img_s", "model_infer_img_s", "data_img_s_per_worker", "loop_train_img_s"):
        assert result[key] > 0, key
    assert result["loop_over_model"] == result["loop_train_img_s"] / result["model_train_img_s"]
    assert json.loads((tmp_path / "b.json").read_text()) == result


def test_device_data_path_times_the_device_pipeline_and_the_loop_through_it(
    synthetic_dir, tmp_path, device_pipeline_strengths
):
    result = bench.main(bench_argv(synthetic_dir, tmp_path, "--data-path", "gpu", "--only", "data,loop"))
    assert result["data_path"] == "gpu" and "data_img_s_per_worker" not in result
    assert result["data_img_s_on_device"] > 0 and result["loop_train_img_s"] > 0
    # the data part's 8 images in batches of 4, then the loop's two epochs of 2 steps, all augmented in full
    assert device_pipeline_strengths == ["full"] * (1 + 2 + 2 * 2)
    assert (
        bench.main(bench_argv(synthetic_dir, tmp_path, "--only", "data", "--overwrite"))["data_path"] == "cpu"
    )  # auto, no CUDA
    assert len(device_pipeline_strengths) == 7


def test_compile_measures_the_compiled_training_step(synthetic_dir, tmp_path, eager_compile):
    result = bench.main(bench_argv(synthetic_dir, tmp_path, "--compile", "--only", "model,loop", "--overwrite"))
    assert eager_compile == ["MelanomaNet", "MelanomaNet"] and result["compile"] is True
    assert result["model_train_img_s"] > 0 and result["loop_train_img_s"] > 0


def test_predict_mode_times_tta_against_the_bare_forward_pass(synthetic_dir, tmp_path, monkeypatch):
    n_tta = []
    real_probabilities = bench.MelanomaPredictor.probabilities

    def probabilities(predictor, *args, **kwargs):
        n_tta.append(predictor.runtime.n_tta)
        return real_probabilities(predictor, *args, **kwargs)

    monkeypatch.setattr(bench.MelanomaPredictor, "probabilities", probabilities)
    result = bench.main([
        "--mode", "predict", "--enet-type", "efficientnet-b0", "--image-size", "32", "--batch-size", "8",
        "--n-images", "6", "--repeats", "2", "--num-workers", "0", "--data-dir", str(synthetic_dir),
        "--json", str(tmp_path / "p.json"),
    ])  # fmt: skip
    for key in ("bare_img_s", "bare_x8_img_s", "predict_tta1_img_s", "predict_tta8_img_s"):
        assert result[key] > 0, key
    assert result["tta8_vs_bare_over_8"] == result["predict_tta8_img_s"] / (result["bare_img_s"] / 8)
    assert result["model"] == "(random)" and result["n_images"] == 6
    assert n_tta == [1, 8] * 3  # predict.py's own path, TTA 1 and 8: a warm-up round, then the two timed ones
    assert json.loads((tmp_path / "p.json").read_text()) == result


def test_predict_mode_needs_the_test_images(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--mode", "predict", "--json", str(tmp_path / "p.json")])
    assert exit_info.value.code == 2 and "--data-dir" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "value", "least"),
    [("--steps", 0, 1), ("--repeats", 0, 1), ("--batch-size", 0, 1), ("--n-images", 0, 1), ("--warmup", -1, 0),
     ("--data-images", 0, 1), ("--threads", 0, 1), ("--num-workers", -1, 0), ("--image-size", 0, 32)],
)  # fmt: skip
def test_counts_that_time_nothing_are_one_sentence(tmp_path, capsys, flag, value, least):
    with pytest.raises(SystemExit) as exit_info:
        bench.main([flag, str(value), "--json", str(tmp_path / "b.json")])
    error = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and error == f"error: {flag} {value} must be at least {least}."
    assert not (tmp_path / "b.json").exists()


def test_results_are_named_by_every_setting_and_never_overwritten(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    quick = ["--only", "infer", "--image-size", "32", "--batch-size", "2", "--warmup", "0", "--num-workers", "0"]
    bench.main([*quick, "--steps", "1"])
    bench.main([*quick, "--steps", "2"])
    written = sorted((tmp_path / "bench_results").glob("*.json"))
    assert len(written) == 2  # the run of 2 steps used to replace the run of 1
    assert sorted(json.loads(path.read_text())["settings"]["steps"] for path in written) == [1, 2]
    with pytest.raises(SystemExit) as exit_info:
        bench.main([*quick, "--steps", "1"])
    assert exit_info.value.code == 2 and "--overwrite" in capsys.readouterr().err
    bench.main([*quick, "--steps", "1", "--overwrite"])
    assert len(list((tmp_path / "bench_results").glob("*.json"))) == 2
