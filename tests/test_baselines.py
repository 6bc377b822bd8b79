from baselines import baseline_aucs
from features import colour_statistics
from patients import make_folds
from tables import read_melanoma_table


def test_baselines_fit_on_the_training_fold_and_score_the_validation_fold(synthetic_dir):
    frame = read_melanoma_table(synthetic_dir, "train", use_meta=True, require_target=True)
    folds = make_folds(frame, 3, 0)
    train_rows, valid_rows = frame[folds != 0].reset_index(drop=True), frame[folds == 0].reset_index(drop=True)
    result = baseline_aucs(train_rows, valid_rows)
    assert set(result) == {"baseline_meta_logreg_auc", "baseline_stats_meta_gbm_auc"}
    assert all(0.0 <= value <= 1.0 for value in result.values())
    # image-only rows (no metadata columns): only the image-statistics model
    image_only = baseline_aucs(train_rows[["filepath", "target"]], valid_rows[["filepath", "target"]])
    assert set(image_only) == {"baseline_stats_gbm_auc"}


def test_colour_statistics_see_the_lesion(synthetic_dir):
    frame = read_melanoma_table(synthetic_dir, "train", use_meta=False, require_target=True)
    stats = colour_statistics(list(frame["filepath"]))
    assert stats.shape[0] == len(frame) and stats.shape[1] > 30
    contrast = stats[:, -1]  # grey-level spread: synthetic melanomas are drawn larger, with black and blue patches
    assert contrast[frame["target"] == 1].mean() > contrast[frame["target"] == 0].mean()
