"""ensemble.py, stacking.py and patient_context.py: honest nested scores, refused splits, the combiners, the patient
context on synthetic patients whose melanoma is the odd one out, and a saved combiner that scores as in-process."""

import json

import numpy as np
import pandas as pd
import pytest
from scipy.special import expit

import ensemble
import train
from melanoma_audit import stacking
from melanoma_audit.features import FeatureScaler, lesion_features
from melanoma_audit.inference import LoadedModel
from melanoma_audit.metadata import MetaEncoder
from melanoma_audit.metrics import safe_auc
from melanoma_audit.patient_context import describe_context, has_patient_context, patient_context
from melanoma_audit.stacking import StackInputs, StackOptions, fit_combiner, nested_oof, predict_combiner
from melanoma_audit.synthetic_dataset import make_synthetic_dataset
from utils import UserError


@pytest.fixture(scope="module")
def odd_dir(tmp_path_factory):
    """60 training images at 32 px of patients with several lesions, at most one melanoma each."""
    out = tmp_path_factory.mktemp("odd")
    return make_synthetic_dataset(
        out, n_train=60, n_test=12, image_size=32, seed=0, malignant_fraction=0.6, odd_one_out=True
    )


@pytest.fixture(scope="module")
def runs(odd_dir, tmp_path_factory):
    """Three tiny --fold all runs (2 folds, 1 epoch, 32 px): a, b (with metadata) on one split, c on another."""
    out = tmp_path_factory.mktemp("runs")
    for name, extra in (("a", []), ("b", ["--use-meta"]), ("c", ["--fold-seed", "1"])):
        train.main([
            "--save-name", name, "--data-dir", str(odd_dir), "--image-size", "32", "--n-epochs", "1",
            "--enet-type", "efficientnet-b0", "--no-pretrained", "--batch-size", "16", "--num-workers", "0",
            "--n-folds", "2", "--fold", "all", "--no-baselines",
            "--model-dir", str(out / "weights"), "--log-dir", str(out / "logs"), *extra,
        ])  # fmt: skip
    return out


def fake_inputs(n_rows=120, n_runs=2, n_folds=3, seed=0):
    """Random out-of-fold rows: patients of 1-3 images, folds grouped by patient, labels, probabilities, features."""
    rng = np.random.default_rng(seed)
    patient = np.sort(rng.integers(0, n_rows // 2, n_rows))
    frame = pd.DataFrame({"image_name": [f"img{i}" for i in range(n_rows)], "patient_id": [f"p{p}" for p in patient]})
    folds = patient % n_folds
    target = rng.integers(0, 2, n_rows)
    probs = np.clip(0.5 + 0.2 * (target[:, None] - 0.5) + 0.2 * rng.standard_normal((n_rows, n_runs)), 0.01, 0.99)
    lesion = rng.standard_normal((n_rows, 6)).astype(np.float32)
    return StackInputs(probs, frame, lesion), target, folds


def test_nested_fit_never_sees_the_rows_of_the_fold_it_scores():
    inputs, target, folds = fake_inputs()
    seen = []

    def recording_fit(method, rows, labels, options):
        seen.append(set(rows.frame["image_name"]))
        return fit_combiner(method, rows, labels, options)

    for method in ("weights", "stack"):
        seen.clear()
        oof = nested_oof(method, inputs, target, folds, StackOptions(rounds=20, context=True), fit=recording_fit)
        assert len(seen) == 3 and np.isfinite(oof).all()
        for fold, trained_on in zip(np.unique(folds), seen, strict=True):
            assert trained_on == set(inputs.frame["image_name"][folds != fold])


def test_nested_score_of_a_stack_on_noise_is_chance_where_the_in_sample_score_is_not():
    """Labels unrelated to every feature: trees fitted on the rows they score look skilled, the nested score not."""
    inputs, _, folds = fake_inputs(n_rows=300)
    target = np.random.default_rng(1).integers(0, 2, len(folds))
    options = StackOptions(context=True)
    in_sample = safe_auc(target, predict_combiner(fit_combiner("stack", inputs, target, options), inputs))
    nested = safe_auc(target, nested_oof("stack", inputs, target, folds, options))
    assert in_sample > 0.75
    assert abs(nested - 0.5) < 0.1


def test_mean_rank_and_weights_combine_as_documented():
    rng = np.random.default_rng(0)
    evidence, contrary = rng.standard_normal((2, 4000))
    target = (rng.random(4000) < expit(evidence - 0.5 * contrary)).astype(int)
    # run 0 is twice as confident as its evidence; run 1 carries other evidence, but the wrong way round
    probs = np.column_stack([expit(2 * evidence), expit(contrary)])
    inputs = StackInputs(probs, pd.DataFrame(index=range(4000)))
    options = StackOptions()
    np.testing.assert_allclose(predict_combiner(fit_combiner("mean", inputs, target, options), inputs), probs.mean(1))
    ranks = pd.DataFrame(probs).rank(pct=True).mean(axis=1)
    np.testing.assert_allclose(predict_combiner(fit_combiner("rank", inputs, target, options), inputs), ranks)
    state = fit_combiner("weights", inputs, target, options)
    assert state["weights"][1] == 0.0  # non-negative: the contrary run is left out, not turned round
    assert 0.35 < state["weights"][0] < 0.55  # undoes the doubled confidence
    combined = predict_combiner(state, inputs)
    assert ((combined > 0) & (combined < 1)).all()
    assert safe_auc(target, combined) == pytest.approx(safe_auc(target, probs[:, 0]))


def test_patient_context_finds_the_odd_one_out_melanoma(tmp_path):
    # 400 images: ~25 patients with one melanoma among 3-6 images (seeds 0-5 gave 47-63 % found, chance 24-27 %)
    data = make_synthetic_dataset(tmp_path, n_train=400, n_test=0, image_size=32, seed=0, odd_one_out=True)
    frame = pd.read_csv(data / "train.csv", dtype={"patient_id": str})
    lesion = lesion_features([str(data / "train" / "train" / f"{name}.jpg") for name in frame["image_name"]])
    scaled = FeatureScaler().fit(lesion).transform(lesion)[:, :-1]
    features, names = patient_context(frame, {"logit": np.zeros(len(frame))}, scaled)
    distance = features[:, names.index("patient_distance")]
    hits, chance = [], []
    for _, rows in frame.groupby("patient_id"):
        if len(rows) >= 3 and rows["target"].sum() == 1:
            hits.append(rows["target"].to_numpy()[np.argmax(distance[rows.index])] == 1)
            chance.append(1 / len(rows))
    assert len(hits) >= 15
    # the image farthest from its patient's mean is the melanoma far more often than a random pick would be
    assert np.mean(hits) > 1.5 * np.mean(chance)


def test_patient_context_is_off_without_patients_of_several_images():
    frame = pd.DataFrame({"patient_id": [None, None, "p1"], "image_name": ["a", "b", "c"]})
    assert not has_patient_context(frame) and "off" in describe_context(frame)
    features, names = patient_context(frame, {"logit": np.array([0.1, 0.2, 0.3])}, np.ones((3, 2)))
    assert (features[:, 0] == 1).all() and np.isnan(features[:, 1:]).all()
    frame.loc[1, "patient_id"] = "p1"
    assert has_patient_context(frame) and "on" in describe_context(frame)


def test_runs_of_different_splits_or_stale_logs_are_refused(runs, odd_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    command = ["--data-dir", str(odd_dir), "--oof-only"]
    with pytest.raises(SystemExit) as exit_info:
        ensemble.main([*command, "--runs", str(runs / "weights" / "a"), str(runs / "weights" / "c")])
    assert exit_info.value.code == 2 and "one split" in capsys.readouterr().err
    # run a's out-of-fold file with its folds swapped: it no longer matches the checkpoints' held-out images
    oof = pd.read_csv(runs / "logs" / "oof_a.csv")
    oof.assign(fold=1 - oof["fold"]).to_csv(tmp_path / "oof_a.csv", index=False)
    with pytest.raises(SystemExit) as exit_info:
        ensemble.main([*command, "--log-dir", str(tmp_path), "--runs", str(runs / "weights" / "a")])
    assert exit_info.value.code == 2 and "does not list the images" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # one fold of a run is not a run
        ensemble.main([*command, "--runs", str(runs / "weights" / "a_fold0_best.pth")])
    assert exit_info.value.code == 2 and "not a run of all its folds" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["mean", "rank", "weights"])
def test_oof_file_of_each_method(runs, odd_dir, tmp_path, monkeypatch, method):
    monkeypatch.chdir(tmp_path)  # the runs' logs are found through their checkpoints; the combiner goes to ./weights
    prefixes = [str(runs / "weights" / name) for name in ("a", "b")]
    result = ensemble.main(["--runs", *prefixes, "--data-dir", str(odd_dir), "--method", method, "--oof-only"])
    written = pd.read_csv(runs / "logs" / f"oof_ensemble_{method}.csv")  # beside the runs' own
    assert list(written.columns) == ["image_name", "fold", "target", "prob"]
    first = pd.read_csv(runs / "logs" / "oof_a.csv")
    assert written[["image_name", "fold", "target"]].equals(first[["image_name", "fold", "target"]])
    np.testing.assert_allclose(written["prob"], result["oof"])
    if method == "mean":
        second = pd.read_csv(runs / "logs" / "oof_b.csv").set_index("image_name").loc[first["image_name"]]
        np.testing.assert_allclose(written["prob"], (first["prob"].to_numpy() + second["prob"].to_numpy()) / 2)
    assert json.loads((tmp_path / "weights" / f"ensemble_{method}.json").read_text())["combiner"]["method"] == method


def test_saved_stack_scores_new_images_as_in_process(runs, odd_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    prefixes = [str(runs / "weights" / name) for name in ("a", "b")]
    command = ["--runs", *prefixes, "--data-dir", str(odd_dir), "--method", "stack", "--n-tta", "2"]
    command += ["--num-workers", "0", "--stack-rounds", "50", "--allow-missing-meta"]  # tiny folds miss some sites
    fitted = ensemble.main([*command, "--out", "submission.csv"])
    printed = capsys.readouterr().out
    assert "patient context: on" in printed and "ensemble (stack)" in printed
    submission = pd.read_csv("submission.csv")
    assert submission["image_name"].tolist() == pd.read_csv(odd_dir / "test.csv")["image_name"].tolist()
    pd.testing.assert_frame_equal(submission, fitted["submission"])
    record = json.loads((tmp_path / "weights" / "ensemble_stack.json").read_text())
    assert isinstance(record["combiner"]["booster"], str)  # LightGBM's text dump, no pickle

    scored = ensemble.main([
        "--combiner", "weights/ensemble_stack.json", "--images", str(odd_dir / "test" / "test"),
        "--meta-csv", str(odd_dir / "test.csv"), "--n-tta", "2", "--num-workers", "0", "--out", "probs.csv",
        "--allow-missing-meta",
    ])  # fmt: skip
    merged = submission.merge(scored, on="image_name", suffixes=("_fitted", "_saved"))
    assert len(merged) == len(submission)
    np.testing.assert_allclose(merged["target_saved"], merged["target_fitted"], rtol=1e-6, atol=1e-9)
    with pytest.raises(SystemExit) as exit_info:  # nothing is replaced unasked
        ensemble.main([*command, "--out", "submission.csv"])
    assert exit_info.value.code == 2 and "--overwrite" in capsys.readouterr().err


def test_stack_state_is_plain_json():
    inputs, target, _ = fake_inputs()
    state = stacking.fit_stack(inputs, target, StackOptions(rounds=10, context=True))
    loaded = json.loads(json.dumps(state))
    np.testing.assert_array_equal(predict_combiner(loaded, inputs), predict_combiner(state, inputs))


def test_image_only_rescores_the_networks_without_their_metadata(runs, odd_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prefixes = [str(runs / "weights" / name) for name in ("a", "b")]  # a without metadata, b late-fused with it
    command = ["--runs", *prefixes, "--data-dir", str(odd_dir), "--image-only", "--num-workers", "0"]
    fitted = ensemble.main([*command, "--method", "mean", "--save-name", "img", "--out", "submission.csv"])
    order = pd.read_csv(runs / "logs" / "oof_a.csv")["image_name"]
    alone_a, alone_b = fitted["run_probs"].T
    # a never read metadata: its fold models on their held-out images give train.py's own out-of-fold predictions
    np.testing.assert_allclose(alone_a, pd.read_csv(runs / "logs" / "oof_a.csv")["prob"], rtol=1e-4, atol=1e-6)
    fused_b = pd.read_csv(runs / "logs" / "oof_b.csv").set_index("image_name").loc[order, "prob"].to_numpy()
    assert not np.isnan(alone_b).any() and np.abs(alone_b - fused_b).max() > 1e-3  # the regression's share is gone
    np.testing.assert_allclose(fitted["oof"], (alone_a + alone_b) / 2)
    assert json.loads((tmp_path / "weights" / "img.json").read_text())["image_only"] is True
    # the saved combiner scores images that come without any metadata, and as in-process
    scored = ensemble.main([
        "--combiner", "weights/img.json", "--images", str(odd_dir / "test" / "test"), "--num-workers", "0",
        "--out", "probs.csv",
    ])  # fmt: skip
    merged = fitted["submission"].merge(scored, on="image_name", suffixes=("_fitted", "_saved"))
    np.testing.assert_allclose(merged["target_saved"], merged["target_fitted"], rtol=1e-6, atol=1e-9)


def test_image_only_refuses_a_network_that_reads_the_metadata(tmp_path):
    encoder = MetaEncoder(["sex", "age"]).fit(pd.DataFrame({"sex": ["male", "female"], "age_approx": [30.0, 60.0]}))
    concat = LoadedModel(tmp_path / "concat.pth", None, 32, [0.5] * 3, [0.5] * 3, encoder)  # no late-fusion regression
    with pytest.raises(UserError, match="feeds the metadata into its network"):
        ensemble.without_metadata(concat)
