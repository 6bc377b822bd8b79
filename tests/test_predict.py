import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import predict
import train
from melanoma_audit.cli import ScoringRuntime
from melanoma_audit.inference import MelanomaPredictor, TTAModel, combine, dihedral, expand_model_paths
from melanoma_audit.scoring_inputs import attach_metadata, frame_from_images
from utils import UserError


def train_tiny(data_dir, out_dir, name, *extra, weights=("--enet-type", "efficientnet-b0", "--no-pretrained")):
    """A one-epoch efficientnet-b0 at 32 px from random weights: seconds, and a real train.py checkpoint."""
    train.main([
        "--save-name", name, "--data-dir", str(data_dir), "--image-size", "32", "--n-epochs", "1",
        *weights, "--batch-size", "16", "--num-workers", "0",
        "--n-folds", "3", "--model-dir", str(out_dir / "weights"), "--log-dir", str(out_dir / "logs"), *extra,
    ])  # fmt: skip
    return out_dir / "weights" / f"{name}_best.pth"


@pytest.fixture(scope="module")
def checkpoints(synthetic_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("predict_runs")
    return {
        "plain": train_tiny(synthetic_dir, out, "plain"),
        "meta": train_tiny(synthetic_dir, out, "meta", "--use-meta"),
        # ImageNet weights from the installed Lite0 package, metadata inside the network
        "lite": train_tiny(
            synthetic_dir,
            out,
            "lite",
            "--use-meta",
            "--fusion",
            "concat",
            weights=("--enet-type", "efficientnet-lite0"),
        ),
        # validates on another fold than the others: an ensemble whose members held out different images
        "fold1": train_tiny(synthetic_dir, out, "fold1", "--fold", "1"),
    }


def run_predict(tmp_path, *args):
    out = tmp_path / "out.csv"
    result = predict.main([*map(str, args), "--out", str(out), "--num-workers", "0"])
    written = pd.read_csv(out)
    pd.testing.assert_frame_equal(written, result.reset_index(drop=True), check_dtype=False)
    return result


def test_submission_has_exactly_the_test_images_with_tta8_and_ensemble(synthetic_dir, checkpoints, tmp_path):
    test_names = pd.read_csv(synthetic_dir / "test.csv")["image_name"].tolist()
    # test.csv holds sites (head/neck) that the meta model's training fold did not: encoded as missing, with a notice
    command = ["--data-dir", synthetic_dir, "--n-tta", 8, "--allow-missing-meta", "--model-path"]
    singles = []
    for name in ("plain", "meta"):
        result = run_predict(tmp_path / name, *command, checkpoints[name])
        assert result["image_name"].tolist() == test_names and list(result.columns) == ["image_name", "target"]
        assert result["target"].between(0, 1).all()
        singles.append(result["target"])
    assert not np.allclose(singles[0], singles[1])
    ensemble = run_predict(tmp_path / "mean", *command, checkpoints["plain"], checkpoints["meta"])
    assert ensemble["image_name"].tolist() == test_names
    assert ensemble["target"].between(0, 1).all()
    np.testing.assert_allclose(ensemble["target"], (singles[0] + singles[1]) / 2, rtol=1e-6)
    ranked = run_predict(tmp_path / "rank", *command, checkpoints["plain"], checkpoints["meta"], "--rank-average")
    expected = (singles[0].rank(pct=True) + singles[1].rank(pct=True)) / 2
    assert list(ranked.columns) == ["image_name", "rank_score"]  # ranks are never written as probabilities
    np.testing.assert_allclose(ranked["rank_score"], expected)


def test_rank_average_of_a_single_model_is_refused(synthetic_dir, checkpoints, tmp_path, capsys):
    out = tmp_path / "ranks.csv"
    command = ["--data-dir", str(synthetic_dir), "--model-path", str(checkpoints["plain"]), "--out", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        predict.main([*command, "--rank-average"])
    error = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(error.splitlines()) == 1
    assert "--rank-average ensembles two or more models" in error and not out.exists()


def test_combine_mean_and_rank():
    a, b = np.array([0.1, 0.9, 0.5]), np.array([0.3, 0.7, 0.2])
    np.testing.assert_allclose(combine([a, b]), [0.2, 0.8, 0.35])
    np.testing.assert_allclose(combine([a, b], rank_average=True), [(1 / 3 + 2 / 3) / 2, 1.0, (2 / 3 + 1 / 3) / 2])
    # NaN: a row the model did not score, left out of that row's mean and of the model's ranks
    a, b = np.array([0.1, np.nan, 0.5]), np.array([0.3, 0.7, np.nan])
    np.testing.assert_allclose(combine([a, b]), [0.2, 0.7, 0.5])
    np.testing.assert_allclose(combine([a, b], rank_average=True), [0.5, 1.0, 1.0])


def test_folder_of_images_with_metadata_from_csv_and_flags(synthetic_dir, checkpoints, tmp_path):
    folder = synthetic_dir / "test" / "test"
    expected = sorted(path.stem for path in folder.glob("*.jpg"))
    from_csv = run_predict(
        tmp_path / "csv", "--images", folder, "--meta-csv", synthetic_dir / "test.csv", "--model-path",
        checkpoints["meta"], "--allow-missing-meta",
    )  # fmt: skip
    assert from_csv["image_name"].tolist() == expected
    assert list(from_csv.columns) == ["image_name", "filepath", "target"]
    single = run_predict(
        tmp_path / "flags", "--images", folder / f"{expected[0]}.jpg", "--sex", "male", "--age", 70, "--site", "torso",
        "--model-path", checkpoints["meta"],
    )  # fmt: skip
    assert single["image_name"].tolist() == expected[:1] and single["target"].between(0, 1).all()


def test_meta_model_refuses_without_metadata_unless_asked(synthetic_dir, checkpoints, tmp_path, capsys):
    out = tmp_path / "probs.csv"
    command = [
        "--images", str(synthetic_dir / "test" / "test"), "--model-path", str(checkpoints["meta"]), "--out", str(out),
        "--num-workers", "0",
    ]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        predict.main(command)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "--use-meta" in error and "--allow-missing-meta" in error and "Traceback" not in error
    assert not out.exists()
    # only some of the flags is still refused: the missing ones are named
    with pytest.raises(SystemExit):
        predict.main([*command, "--age", "50"])
    error = capsys.readouterr().err
    assert "sex" in error and "age_approx" not in error.split("has no")[1]
    result = predict.main([*command, "--allow-missing-meta"])
    assert len(result) == 12 and result["target"].between(0, 1).all()
    # an image-only model needs no metadata at all
    plain = predict.main([*command[:3], str(checkpoints["plain"]), "--out", str(tmp_path / "p.csv")])
    assert len(plain) == 12


def test_existing_output_is_kept_without_overwrite(synthetic_dir, checkpoints, tmp_path, capsys):
    out = tmp_path / "submission.csv"
    out.write_text("keep me\n")
    command = ["--data-dir", str(synthetic_dir), "--model-path", str(checkpoints["plain"]), "--out", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        predict.main(command)
    assert exit_info.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert out.read_text() == "keep me\n"
    predict.main([*command, "--overwrite", "--num-workers", "0"])
    assert len(pd.read_csv(out)) == 12


def test_which_picks_the_runs_other_checkpoint(synthetic_dir, checkpoints, tmp_path, capsys):
    run = checkpoints["plain"].parent / "plain"
    run_predict(tmp_path, "--data-dir", synthetic_dir, "--model-path", run, "--which", "final")
    assert "plain_final.pth" in capsys.readouterr().out


def test_missing_checkpoint_is_one_clear_error(synthetic_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        predict.main(
            ["--data-dir", str(synthetic_dir), "--model-path", str(tmp_path / "nope"), "--out", str(tmp_path / "x.csv")]
        )
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "nope" in error and len(error.strip().splitlines()) == 1


def test_run_prefix_expands_to_its_folds_in_order(checkpoints, tmp_path):
    for fold in (0, 1, 2, 10):
        shutil.copy(checkpoints["plain"], tmp_path / f"cv_fold{fold}_best.pth")
    (tmp_path / "cv_fold1_final.pth").touch()
    paths = expand_model_paths([str(tmp_path / "cv")])
    assert [path.name for path in paths] == [f"cv_fold{k}_best.pth" for k in (0, 1, 2, 10)]
    assert expand_model_paths([str(checkpoints["plain"].parent / "plain")]) == [checkpoints["plain"]]
    with pytest.raises(UserError):
        expand_model_paths([str(tmp_path / "other")])


# --------------------------------------------------------------------------- test-time augmentation


def test_dihedral_gives_the_eight_distinct_symmetries():
    image = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    views = [dihedral(image, index) for index in range(8)]
    assert torch.equal(views[0], image)
    assert len({tuple(view.flatten().tolist()) for view in views}) == 8
    # each is a symmetry of the square: the set of pixels of every channel is unchanged
    for view in views:
        assert torch.equal(view.flatten(2).sort().values, image.flatten(2).sort().values)


class CornerModel(nn.Module):
    """A deliberately orientation-sensitive model: its logit is the mean of the top-left quadrant."""

    def forward(self, image, meta=None):
        return image[:, :, : image.shape[2] // 2, : image.shape[3] // 2].mean(dim=(1, 2, 3))[:, None]


def test_tta_averages_probabilities_over_the_first_n_views():
    image = torch.randn(3, 3, 8, 8)
    for n_tta in (1, 2, 5, 8):
        expected = torch.stack([torch.sigmoid(CornerModel()(dihedral(image, i))) for i in range(n_tta)]).mean(0)
        got = torch.sigmoid(TTAModel(CornerModel(), n_tta)(image))
        torch.testing.assert_close(got, expected)
    with pytest.raises(UserError):
        TTAModel(CornerModel(), 9)


class SmallConvNet(nn.Module):
    """A random conv net small enough for a unit test, and like any CNN not invariant to flips."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2), nn.AdaptiveAvgPool2d(2),
            nn.Flatten(), nn.Linear(16, 1),
        )  # fmt: skip

    def forward(self, image, meta=None):
        return self.layers(image)


def test_tta8_makes_a_network_invariant_to_flips_and_transposes():
    torch.manual_seed(0)
    model = SmallConvNet().eval()
    image = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        bare = [torch.sigmoid(model(dihedral(image, i))) for i in range(8)]
        tta = [torch.sigmoid(TTAModel(model, 8)(dihedral(image, i))) for i in range(8)]
    assert not torch.allclose(bare[0], bare[1], atol=1e-4)  # the bare network does see the flip
    for other in tta[1:]:
        torch.testing.assert_close(other, tta[0])


@pytest.mark.parametrize("name", ["plain", "meta", "lite"])
def test_prediction_reproduces_the_validation_scores(synthetic_dir, checkpoints, tmp_path, name):
    """--no-pretrained runs feed lesion features into the side branch and (with --use-meta) add a metadata
    logistic regression in log-odds; Lite models read their input on another scale: predict.py must rebuild all
    of it exactly as training did, or its scores drift from the ones the run validated."""
    checkpoint = torch.load(checkpoints[name], weights_only=True)
    if name == "lite":
        assert checkpoint["mean"] == [0.5] * 3 and checkpoint["std"] == [0.5] * 3
        assert checkpoint["fusion"] == "concat" and checkpoint["meta_model"] is None
        assert checkpoint["model"]["n_meta_features"] == len(checkpoint["meta_feature_names"])
    else:
        assert checkpoint["mean"] == [0.485, 0.456, 0.406]
        assert checkpoint["lesion_features"] is not None
        assert checkpoint["model"]["n_meta_features"] == len(checkpoint["lesion_features"]["mean"])
        assert checkpoint["fusion"] == ("late" if name == "meta" else "concat")
        assert (checkpoint["meta_model"] is not None) is (name == "meta")
    oof = pd.read_csv(checkpoints[name].parent.parent / "logs" / f"oof_{name}.csv")
    # fold 0 holds sites its training folds did not (head/neck, palms/soles): validation encoded them as missing
    command = [
        "--data-dir",
        synthetic_dir,
        "--split",
        "train",
        "--allow-missing-meta",
        "--model-path",
        checkpoints[name],
    ]
    result = run_predict(tmp_path, *command)
    assert sorted(result["image_name"]) == sorted(oof["image_name"])  # the held-out images, no training image
    assert (result["n_models"] == 1).all()
    merged = oof.merge(result, on="image_name")
    np.testing.assert_allclose(merged["target_y"], merged["prob"], atol=1e-5)


def test_train_split_scores_each_image_only_with_models_that_held_it_out(synthetic_dir, checkpoints, tmp_path, capsys):
    """plain and meta validated on fold 0, fold1 on fold 1: a fold-0 image gets the mean of plain and meta, a
    fold-1 image fold1's score alone, and the fold-2 images, which every model trained on, are dropped."""
    command = ["--data-dir", synthetic_dir, "--split", "train", "--allow-missing-meta", "--model-path"]
    singles = {
        name: run_predict(tmp_path / name, *command, checkpoints[name]).set_index("image_name")["target"]
        for name in ("plain", "meta", "fold1")
    }
    assert not set(singles["plain"].index) & set(singles["fold1"].index)
    capsys.readouterr()
    ensemble = run_predict(tmp_path / "all", *command, checkpoints["plain"], checkpoints["meta"], checkpoints["fold1"])
    n_train = len(pd.read_csv(synthetic_dir / "train.csv"))
    kept = len(singles["plain"]) + len(singles["fold1"])
    assert len(ensemble) == kept and f"dropped {n_train - kept} of {n_train}" in capsys.readouterr().out
    ensemble = ensemble.set_index("image_name")
    fold0, fold1 = singles["plain"].index, singles["fold1"].index
    np.testing.assert_allclose(ensemble.loc[fold0, "target"], (singles["plain"] + singles["meta"]) / 2, rtol=1e-6)
    np.testing.assert_allclose(ensemble.loc[fold1, "target"], singles["fold1"], rtol=1e-6)
    assert (ensemble.loc[fold0, "n_models"] == 2).all() and (ensemble.loc[fold1, "n_models"] == 1).all()


def test_train_split_needs_the_stored_validation_images(synthetic_dir, checkpoints, tmp_path, capsys):
    state = torch.load(checkpoints["plain"], weights_only=True)
    del state["val_images"]
    torch.save(state, tmp_path / "old_best.pth")
    out = tmp_path / "x.csv"
    command = ["--data-dir", str(synthetic_dir), "--split", "train", "--out", str(out), "--model-path"]
    with pytest.raises(SystemExit) as exit_info:
        predict.main([*command, str(tmp_path / "old_best.pth")])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "retrain" in error and len(error.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("age", ["inf", "-1", "121", "nan"])
def test_impossible_ages_are_refused_from_flags_and_csv(synthetic_dir, checkpoints, tmp_path, capsys, age):
    """The rule of the data folder's CSV reader: ages are numbers from 0 to 120, or nothing (in a CSV "nan" is
    pandas' word for nothing, on the command line a mistake)."""
    image = synthetic_dir / "test" / "test" / f"{pd.read_csv(synthetic_dir / 'test.csv')['image_name'][0]}.jpg"
    meta_csv = tmp_path / "meta.csv"
    pd.DataFrame({"image_name": [image.stem], "sex": ["male"], "age_approx": [age], "site": ["torso"]}).to_csv(
        meta_csv, index=False
    )
    base = ["--images", str(image), "--model-path", str(checkpoints["meta"]), "--out", str(tmp_path / "p.csv")]
    sources = [["--sex", "male", "--age", age, "--site", "torso"]] + [["--meta-csv", str(meta_csv)]] * (age != "nan")
    for source in sources:
        with pytest.raises(SystemExit) as exit_info:
            predict.main([*base, *source])
        error = capsys.readouterr().err
        assert exit_info.value.code == 2 and len(error.strip().splitlines()) == 1
        assert "ages must be numbers from 0 to 120" in error
    assert not (tmp_path / "p.csv").exists()


def test_leftover_temp_files_of_the_output_are_removed(synthetic_dir, checkpoints, tmp_path):
    """A killed run leaves .<out>.<random>.tmp beside the output (atomic writes): the next run deletes it, and
    only it."""
    leftover, other = tmp_path / ".out.csv.k3j9x.tmp", tmp_path / ".other.csv.k3j9x.tmp"
    leftover.write_text("half a submission")
    other.write_text("someone else's")
    result = run_predict(tmp_path, "--data-dir", synthetic_dir, "--model-path", checkpoints["plain"])
    assert len(result) == 12 and not leftover.exists() and other.exists()


def one_image_with_metadata(synthetic_dir, tmp_path, **columns):
    """The first test image, and a --meta-csv for it with the given columns."""
    name = pd.read_csv(synthetic_dir / "test.csv")["image_name"][0]
    tmp_path.mkdir(parents=True, exist_ok=True)
    meta_csv = tmp_path / "meta.csv"
    pd.DataFrame({"image_name": [name], **{key: [value] for key, value in columns.items()}}).to_csv(
        meta_csv, index=False
    )
    return synthetic_dir / "test" / "test" / f"{name}.jpg", meta_csv


def predict_or_fail(capsys, argv):
    """predict.main's result and its stdout, or None and the one-line error of a refusal."""
    try:
        result = predict.main([*map(str, argv), "--num-workers", "0"])
    except SystemExit as exit_info:
        error = capsys.readouterr().err.strip()
        assert exit_info.code == 2 and len(error.splitlines()) == 1 and "Traceback" not in error, error
        return None, error
    return result, capsys.readouterr().out


def test_sites_match_in_any_case_and_an_unknown_site_is_never_a_silent_guess(
    synthetic_dir, checkpoints, tmp_path, capsys
):
    """--site Torso is the site torso; --site banana used to score as if no site were given, without a word."""
    image, _ = one_image_with_metadata(synthetic_dir, tmp_path)
    base = ["--images", image, "--sex", "male", "--age", 70, "--model-path", checkpoints["meta"]]
    scores = {}
    for name, extra in {
        "torso": ["--site", "torso"],
        "Torso": ["--site", " Torso"],
        "missing": ["--allow-missing-meta"],
        "banana": ["--site", "banana", "--allow-missing-meta"],
    }.items():
        result, out = predict_or_fail(capsys, [*base, *extra, "--out", tmp_path / f"{name}.csv"])
        scores[name] = result["target"].iloc[0]
        if name == "banana":
            assert "notice: --site 'banana' is not a value" in out and "encoded as missing" in out
            assert "torso" in out.split("it knows")[1]
    assert scores["Torso"] == scores["torso"] and scores["banana"] == scores["missing"]
    assert scores["torso"] != scores["missing"]
    _, error = predict_or_fail(capsys, [*base, "--site", "banana", "--out", tmp_path / "refused.csv"])
    assert "--site 'banana' is not a value" in error and "torso" in error and "--allow-missing-meta" in error
    assert not (tmp_path / "refused.csv").exists()


def test_sex_spellings_map_to_male_and_female_and_numbers_are_refused(synthetic_dir, checkpoints, tmp_path, capsys):
    """M/F in any case are male/female; 1 and 0 mean opposite things in different data sets and are refused
    (they used to be encoded as unknown for every row)."""
    scores = {}
    for sex in ("male", "M", "m", "Male", "female", "F", ""):
        image, meta_csv = one_image_with_metadata(
            synthetic_dir, tmp_path / f"s{sex}", sex=sex, age_approx=70, anatom_site_general_challenge="torso"
        )
        result, _ = predict_or_fail(
            capsys, ["--images", image, "--meta-csv", meta_csv, "--model-path", checkpoints["meta"], "--out",
                     tmp_path / f"s{sex}" / "p.csv"],
        )  # fmt: skip
        scores[sex] = result["target"].iloc[0]
    assert scores["male"] == scores["M"] == scores["m"] == scores["Male"]
    assert scores["female"] == scores["F"] and len({scores["male"], scores["female"], scores[""]}) == 3
    flagged, _ = predict_or_fail(
        capsys, ["--images", image, "--sex", "F", "--age", 70, "--site", "torso", "--model-path", checkpoints["meta"],
                 "--out", tmp_path / "flag.csv"],
    )  # fmt: skip
    assert flagged["target"].iloc[0] == scores["female"]
    image, meta_csv = one_image_with_metadata(
        synthetic_dir, tmp_path, sex=1, age_approx=70, anatom_site_general_challenge="torso"
    )
    _, error = predict_or_fail(
        capsys, ["--images", image, "--meta-csv", meta_csv, "--model-path", checkpoints["meta"], "--out",
                 tmp_path / "one.csv"],
    )  # fmt: skip
    assert f"{meta_csv} gives sex '1'" in error and "male, female" in error and "--allow-missing-meta" in error


def test_a_folder_as_the_output_file_is_refused_before_any_work(synthetic_dir, checkpoints, tmp_path, capsys):
    command = ["--data-dir", synthetic_dir, "--model-path", checkpoints["plain"], "--out", tmp_path, "--overwrite"]
    _, error = predict_or_fail(capsys, command)
    assert f"--out {tmp_path} is a folder" in error


def test_predictor_scores_do_not_depend_on_how_the_views_are_batched(synthetic_dir, checkpoints):
    """batch_size counts the TTA views of a forward pass: one image per pass (8 views) and many images per pass
    must give each image the same score, its metadata and lesion features still on its own row."""
    frame = attach_metadata(frame_from_images([synthetic_dir / "test" / "test"]), synthetic_dir / "test.csv")
    frame = frame.head(20)
    scores = [
        MelanomaPredictor.from_checkpoint(
            checkpoints["meta"], ScoringRuntime(torch.device("cpu"), n_tta=8, batch_size=size)
        ).probabilities(frame)
        for size in (8, 64)
    ]
    assert len(np.unique(np.round(scores[0], 4))) > 1  # the images get different scores: rows could be swapped
    np.testing.assert_allclose(scores[0], scores[1], atol=1e-5)
