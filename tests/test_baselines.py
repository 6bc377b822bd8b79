import pytest

from melanoma_audit.baselines import baseline_aucs
from melanoma_audit.features import colour_statistics
from melanoma_audit.patients import make_folds
from melanoma_audit.synthetic_dataset import make_synthetic_dataset
from melanoma_audit.tables import read_melanoma_table


@pytest.fixture(scope="module")
def fold_rows(tmp_path_factory):
    """240 images at 32 px, fold 0 of 3: enough rows for the trivial models to learn the synthetic signal."""
    data_dir = make_synthetic_dataset(tmp_path_factory.mktemp("baselines"), n_train=240, n_test=1, image_size=32)
    frame = read_melanoma_table(data_dir, "train", use_meta=True, require_target=True)
    folds = make_folds(frame, 3, 0)
    return frame[folds != 0].reset_index(drop=True), frame[folds == 0].reset_index(drop=True)


def test_baselines_learn_the_metadata_and_the_colour_signal(fold_rows):
    train_rows, valid_rows = fold_rows
    result = baseline_aucs(train_rows, valid_rows)
    assert set(result) == {"baseline_meta_logreg_auc", "baseline_stats_meta_gbm_auc"}
    assert result["baseline_meta_logreg_auc"] > 0.75 and result["baseline_stats_meta_gbm_auc"] > 0.75
    # image-only rows (no metadata columns): only the image-statistics model, which still sees the lesion colour
    image_only = baseline_aucs(train_rows[["filepath", "target"]], valid_rows[["filepath", "target"]])
    assert set(image_only) == {"baseline_stats_gbm_auc"} and image_only["baseline_stats_gbm_auc"] > 0.6


def test_baselines_never_see_the_validation_labels(fold_rows):
    """Fitted on the training fold only: flipping the validation labels mirrors each AUC around 0.5."""
    train_rows, valid_rows = fold_rows
    flipped = valid_rows.assign(target=1 - valid_rows["target"])
    before, after = baseline_aucs(train_rows, valid_rows), baseline_aucs(train_rows, flipped)
    for name, auc in before.items():
        assert after[name] == pytest.approx(1 - auc)


def test_colour_statistics_see_the_lesion(synthetic_dir):
    frame = read_melanoma_table(synthetic_dir, "train", use_meta=False, require_target=True)
    stats = colour_statistics(list(frame["filepath"]))
    assert stats.shape[0] == len(frame) and stats.shape[1] > 30
    contrast = stats[:, -1]  # grey-level spread: synthetic melanomas are drawn larger, with black and blue patches
    assert contrast[frame["target"] == 1].mean() > contrast[frame["target"] == 0].mean()
