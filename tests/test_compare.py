"""compare.py: DeLong's AUC variance and paired test against a hand-computed example, the paired bootstrap over
patients, the checks on the files, recipes of several seeds, and the outputs."""

import json

import numpy as np
import pandas as pd
import pytest
import scipy.stats
from sklearn.metrics import roc_auc_score

import compare
from melanoma_audit.report_metrics import group_bootstrap

# 3 melanomas and 4 others; one positive ties a negative at 0.4
TARGETS = np.array([1, 1, 1, 0, 0, 0, 0])
SCORES_A = np.array([0.9, 0.6, 0.4, 0.7, 0.4, 0.3, 0.1])
SCORES_B = np.array([0.8, 0.3, 0.5, 0.2, 0.6, 0.1, 0.4])


def placements_by_definition(targets, scores):
    """DeLong's structural components from their definition, over all m x n pairs: psi(x, y) = 1 if x > y, 1/2 if
    x == y, else 0; V10 averages psi over the negatives for each positive, V01 over the positives per negative."""
    positives, negatives = scores[targets == 1], scores[targets == 0]

    def psi(x, y):
        return 1.0 if x > y else 0.5 if x == y else 0.0

    v10 = [sum(psi(x, y) for y in negatives) / len(negatives) for x in positives]
    v01 = [sum(psi(x, y) for x in positives) / len(positives) for y in negatives]
    return np.array(v10), np.array(v01)


def test_delong_matches_the_hand_computed_example():
    v10, v01 = placements_by_definition(TARGETS, SCORES_A)
    # by hand: 0.9 beats all four negatives, 0.6 three of them, 0.4 two and ties one
    np.testing.assert_allclose(v10, [1, 3 / 4, 5 / 8])
    # 0.7 is beaten by one positive, 0.4 by two and tied by one, 0.3 and 0.1 by all three
    np.testing.assert_allclose(v01, [1 / 3, 5 / 6, 1, 1])
    # AUC = mean V10 = mean V01 = 19/24; variance var(V10)/m + var(V01)/n = 7/576 + 43/1728 = 1/27
    auc, fast_v10, fast_v01 = compare.delong_placements(TARGETS, SCORES_A)
    np.testing.assert_allclose(fast_v10[0], v10)
    np.testing.assert_allclose(fast_v01[0], v01)
    assert auc[0] == pytest.approx(19 / 24) == roc_auc_score(TARGETS, SCORES_A)
    aucs, cov = compare.delong_covariance(TARGETS, SCORES_A)
    assert cov[0, 0] == pytest.approx(1 / 27)
    low, high = compare.delong_interval(aucs[0], cov[0, 0])
    assert (low, high) == pytest.approx((19 / 24 - 1.959964 / 27**0.5, 1.0), abs=1e-6)  # clipped at 1


def test_delong_paired_test_matches_the_definition():
    a10, a01 = placements_by_definition(TARGETS, SCORES_A)
    b10, b01 = placements_by_definition(TARGETS, SCORES_B)
    covariance = np.cov([a10, b10]) / 3 + np.cov([a01, b01]) / 4
    difference = a10.mean() - b10.mean()
    z = difference / np.sqrt(covariance[0, 0] + covariance[1, 1] - 2 * covariance[0, 1])
    test = compare.delong_test(TARGETS, SCORES_A, SCORES_B)
    assert test["difference"] == pytest.approx(roc_auc_score(TARGETS, SCORES_A) - roc_auc_score(TARGETS, SCORES_B))
    assert test["z"] == pytest.approx(z)
    assert test["p"] == pytest.approx(2 * scipy.stats.norm.sf(abs(z)))
    assert compare.delong_test(TARGETS, SCORES_A, SCORES_A)["p"] == 1.0


def test_fast_delong_auc_equals_sklearn_on_random_data_with_ties():
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 2, 300)
    scores = np.round(rng.random((3, 300)) + targets * 0.2, 2)  # rounded: many ties
    aucs, cov = compare.delong_covariance(targets, scores)
    np.testing.assert_allclose(aucs, [roc_auc_score(targets, s) for s in scores])
    for row, s in enumerate(scores):
        v10, v01 = placements_by_definition(targets, s)
        assert cov[row, row] == pytest.approx(v10.var(ddof=1) / len(v10) + v01.var(ddof=1) / len(v01))


def test_the_bootstrap_draws_the_rows_of_a_patient_together():
    groups = np.array(["p1", "p1", "p2", "p3", "p3", "p3", "p4", "p5"])
    weights = []
    group_bootstrap(lambda weight: weights.append(weight.copy()) or 0.0, len(groups), 200, seed=0, groups=groups)
    weights = np.array(weights)
    assert len(weights) == 200
    for patient in np.unique(groups):
        rows = weights[:, groups == patient]
        assert (rows == rows[:, :1]).all()  # a patient's rows move together
    assert not (weights[:, 0] == weights[:, 2]).all()  # different patients are drawn independently
    patients_per_resample = np.array([[w[groups == p][0] for p in np.unique(groups)] for w in weights])
    assert (patients_per_resample.sum(axis=1) == 5).all()  # five patients drawn each time, not eight rows


# --------------------------------------------------------------------------- the command


def write_oof(path, names, targets, probs):
    pd.DataFrame({"image_name": names, "fold": 0, "target": targets, "prob": probs}).to_csv(path, index=False)
    return path


@pytest.fixture()
def predictions(tmp_path):
    """Two recipes of two seeds each on 120 images of 60 patients (two images each), and the data folder that
    holds the patient ids."""
    rng = np.random.default_rng(1)
    n = 120
    names = [f"IMG_{i:03d}" for i in range(n)]
    targets = np.repeat(rng.integers(0, 2, n // 2), 2)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    patients = [f"P{i // 2}" for i in range(n)]
    pd.DataFrame({"image_name": names, "patient_id": patients, "target": targets}).to_csv(
        data_dir / "train.csv", index=False
    )
    files = {}
    for recipe, strength in (("good", 1.5), ("weak", 0.5)):
        for seed in range(2):
            logit = strength * (2 * targets - 1) + rng.normal(0, 1, n)
            files[recipe, seed] = write_oof(
                tmp_path / f"oof_{recipe}_s{seed}.csv", names, targets, 1 / (1 + np.exp(-logit))
            )
    return {"names": names, "targets": targets, "files": files, "data_dir": data_dir}


def test_recipes_of_several_seeds_are_summarised_and_compared(predictions, tmp_path, capsys):
    files = predictions["files"]
    out = tmp_path / "compare.json"
    result = compare.main(
        [f"weak={files['weak', 0]},{files['weak', 1]}", "--recipe", "good", str(files["good", 0])]
        + [str(files["good", 1]), "--data-dir", str(predictions["data_dir"]), "--n-bootstrap", "300"]
        + ["--out", str(out)]
    )
    printed = capsys.readouterr().out
    assert result["bootstrap_unit"] == "patient" and result["n_bootstrap_units"] == 60
    good, weak = result["recipes"]
    assert [good["name"], weak["name"]] == ["good", "weak"]  # --recipe first, then the positional ones
    targets = predictions["targets"]
    aucs = [roc_auc_score(targets, pd.read_csv(files["good", s])["prob"]) for s in range(2)]
    assert [f["auc"] for f in good["files"]] == pytest.approx(aucs)
    assert good["mean_auc"] == pytest.approx(np.mean(aucs))
    assert good["sd_auc"] == pytest.approx(np.std(aucs, ddof=1))
    assert (good["min_auc"], good["max_auc"]) == pytest.approx((min(aucs), max(aucs)))
    mean_good = (pd.read_csv(files["good", 0])["prob"] + pd.read_csv(files["good", 1])["prob"]) / 2
    mean_weak = (pd.read_csv(files["weak", 0])["prob"] + pd.read_csv(files["weak", 1])["prob"]) / 2
    assert good["averaged_auc"] == pytest.approx(roc_auc_score(targets, mean_good))
    (pair,) = result["comparisons"]
    assert (pair["a"], pair["b"]) == ("good", "weak")
    assert pair["auc_difference"] == pytest.approx(
        roc_auc_score(targets, mean_good) - roc_auc_score(targets, mean_weak)
    )
    assert pair["delong_p"] == pytest.approx(compare.delong_test(targets, mean_good, mean_weak)["p"])
    low, high = pair["ci95_bootstrap"]
    assert low < pair["auc_difference"] < high
    assert json.loads(out.read_text())["comparisons"][0]["a"] == "good"
    assert "each recipe" in printed and "patient bootstrap" in printed and "good" in printed

    with pytest.raises(SystemExit) as exit_info:  # the JSON is not replaced without --overwrite
        compare.main([str(files["good", 0]), "--out", str(out)])
    assert exit_info.value.code == 2 and "--overwrite" in capsys.readouterr().err


def test_the_difference_interval_resamples_patients_not_rows(predictions, tmp_path):
    """Each patient's two images carry the same target and scores: resampling patients gives exactly the interval
    of one image per patient (a patient drawn k times weighs k either way), resampling rows a narrower one."""
    files, targets, names = predictions["files"], predictions["targets"], predictions["names"]
    twins = {}
    for recipe in ("good", "weak"):
        probs = pd.read_csv(files[recipe, 0])["prob"].to_numpy()[::2]
        twins[recipe, "two"] = write_oof(tmp_path / f"two_{recipe}.csv", names, targets, np.repeat(probs, 2))
        twins[recipe, "one"] = write_oof(tmp_path / f"one_{recipe}.csv", names[::2], targets[::2], probs)

    def interval(kind, *extra):
        command = [str(twins["good", kind]), str(twins["weak", kind]), "--n-bootstrap", "300", *extra]
        return compare.main(command)["comparisons"][0]["ci95_bootstrap"]

    by_patient = interval("two", "--data-dir", str(predictions["data_dir"]))
    one_each = interval("one")
    by_row = interval("two")
    assert by_patient == pytest.approx(one_each)
    assert by_row[1] - by_row[0] < 0.9 * (by_patient[1] - by_patient[0])


def test_rows_without_a_patient_id_are_patients_of_their_own(predictions, tmp_path):
    table = pd.read_csv(predictions["data_dir"] / "train.csv")
    table.loc[:59, "patient_id"] = np.nan  # 60 rows of their own, and 30 patients of two images
    table.to_csv(predictions["data_dir"] / "train.csv", index=False)
    files = predictions["files"]
    result = compare.main(
        [str(files["good", 0]), str(files["weak", 0]), "--data-dir", str(predictions["data_dir"])]
        + ["--n-bootstrap", "20"]
    )
    assert result["bootstrap_unit"] == "patient" and result["n_bootstrap_units"] == 60 + 30


def test_files_must_hold_the_same_images_once_with_the_same_labels(predictions, tmp_path, capsys):
    files, names, targets = predictions["files"], predictions["names"], predictions["targets"]
    probs = pd.read_csv(files["good", 0])["prob"].to_numpy()
    fewer = write_oof(tmp_path / "fewer.csv", names[1:], targets[1:], probs[1:])
    relabelled = write_oof(
        tmp_path / "relabelled.csv", names, np.where(np.arange(120) == 5, 1 - targets, targets), probs
    )
    twice = write_oof(tmp_path / "twice.csv", [*names, names[0]], [*targets, targets[0]], [*probs, probs[0]])

    def fails_with(argv, fragment):
        with pytest.raises(SystemExit) as exit_info:
            compare.main([*map(str, argv), "--n-bootstrap", "10"])
        error = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and error.count("\n") == 0 and fragment in error, error

    fails_with([files["good", 0], fewer], "do not hold the same images (0 only in fewer.csv, 1 only in")
    fails_with([files["good", 0], relabelled], "gives image IMG_005 target")
    fails_with([files["good", 0], twice], "lists image IMG_000 twice")
    fails_with([files["good", 0], files["good", 0]], "two recipes are named oof_good_s0")
    fails_with(["--recipe", "alone"], "names no file")
    fails_with([tmp_path / "missing.csv"], "does not exist")


def test_predict_outputs_are_read_with_a_labels_file(predictions, tmp_path):
    """predict.py writes image_name,target with target the score: the labels come from --labels."""
    files, names, targets = predictions["files"], predictions["names"], predictions["targets"]
    labels = pd.DataFrame({"image_name": names, "target": targets})
    labels.to_csv(tmp_path / "labels.csv", index=False)
    scored = []
    for recipe in ("good", "weak"):
        probs = pd.read_csv(files[recipe, 0])["prob"]
        path = tmp_path / f"sub_{recipe}.csv"
        pd.DataFrame({"image_name": names, "target": probs}).iloc[::-1].to_csv(path, index=False)  # another order
        scored.append(str(path))
    result = compare.main([*scored, "--labels", str(tmp_path / "labels.csv"), "--n-bootstrap", "20"])
    oof = compare.main([str(files["good", 0]), str(files["weak", 0]), "--n-bootstrap", "20"])
    assert result["recipes"][0]["files"][0]["auc"] == pytest.approx(oof["recipes"][0]["files"][0]["auc"])
    assert result["comparisons"][0]["delong_p"] == pytest.approx(oof["comparisons"][0]["delong_p"])
    assert result["bootstrap_unit"] == "image"
