import cv2
import numpy as np
import pandas as pd
import pytest

from melanoma_audit.features import DERMOSCOPIC_COLOURS, FeatureScaler, colour_statistics, lesion_features, side_inputs
from melanoma_audit.metadata import MetaEncoder
from melanoma_audit.tables import read_melanoma_table


def disc_image(path, radius: int, colour, size: int = 128) -> str:
    image = np.full((size, size, 3), (225, 185, 165), dtype=np.uint8)
    cv2.circle(image, (size // 2, size // 2), radius, colour, -1)
    cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    return str(path)


def test_lesion_features_measure_size_colour_and_symmetry(tmp_path):
    small = disc_image(tmp_path / "small.png", 15, (120, 75, 50))
    large = disc_image(tmp_path / "large.png", 40, (120, 75, 50))
    black = disc_image(tmp_path / "black.png", 40, (30, 25, 25))
    features = lesion_features([small, large, black])
    assert features.shape[0] == 3 and np.isfinite(features).all()
    n_colours = len(DERMOSCOPIC_COLOURS)
    shares = features[:, :n_colours]
    np.testing.assert_allclose(shares.sum(axis=1), 1.0, atol=1e-6)
    black_index = list(DERMOSCOPIC_COLOURS).index("black")
    assert shares[2, black_index] > 0.9 and shares[1, black_index] < 0.1
    area_column = n_colours + 2 + 3 * 4  # shares, two colour counts, Lab mean/std/contrast and 3 percentiles
    assert features[1, area_column] == pytest.approx(np.pi * 40**2 / 128**2, rel=0.1)
    assert features[0, area_column] < features[1, area_column]
    asymmetry = features[:, area_column + 4 : area_column + 6]
    assert (asymmetry < 0.1).all()  # a disc is symmetric about both axes


def test_lesion_features_separate_the_synthetic_classes(synthetic_dir):
    frame = read_melanoma_table(synthetic_dir, "train", use_meta=False, require_target=True)
    features = lesion_features(list(frame["filepath"]))
    assert np.isfinite(features).all()
    area = features[:, len(DERMOSCOPIC_COLOURS) + 14]
    # synthetic melanomas are drawn larger
    assert area[frame["target"] == 1].mean() > area[frame["target"] == 0].mean()


def test_scaler_round_trip_and_side_inputs_order(synthetic_dir):
    frame = read_melanoma_table(synthetic_dir, "train", use_meta=True, require_target=True)
    features = lesion_features(list(frame["filepath"]))
    scaler = FeatureScaler().fit(features[:30])
    scaled = scaler.transform(features[:30])
    np.testing.assert_allclose(scaled.mean(axis=0), 0.0, atol=1e-4)
    restored = FeatureScaler.from_state_dict(scaler.state_dict())
    np.testing.assert_array_equal(restored.transform(features), scaler.transform(features))
    encoder = MetaEncoder(["sex", "age", "site"]).fit(frame)
    both = side_inputs(frame, encoder, scaler)
    np.testing.assert_allclose(both[:, : encoder.n_features], encoder.transform(frame))
    np.testing.assert_allclose(both[:, encoder.n_features :], scaler.transform(features), atol=1e-6)
    assert side_inputs(frame, None, None) is None
    assert side_inputs(pd.DataFrame({"filepath": frame["filepath"]}), None, scaler).shape == features.shape


def test_uniform_images_get_finite_flagged_features_filled_with_the_training_median(tmp_path):
    discs = [disc_image(tmp_path / f"disc{radius}.png", radius, (120, 75, 50)) for radius in (15, 25, 35)]
    uniform = []
    for value in (0, 255):  # all black (Otsu takes the whole image as lesion), all white (nothing dark)
        cv2.imwrite(str(tmp_path / f"uniform{value}.png"), np.full((64, 64, 3), value, np.uint8))
        uniform.append(str(tmp_path / f"uniform{value}.png"))
    features = lesion_features(discs + uniform)
    n_abcd = features.shape[1] - colour_statistics(uniform[:1]).shape[1] - 1
    assert features[:, -1].tolist() == [0, 0, 0, 1, 1]  # lesion_unmeasurable
    assert np.isfinite(features[:3]).all() and np.isnan(features[3:, :n_abcd]).all()
    assert np.isfinite(features[:, n_abcd:]).all()  # colour moments are defined for any image

    scaler = FeatureScaler().fit(features)
    scaled = scaler.transform(features)
    assert np.isfinite(scaled).all()
    median = np.median(features[:3, :n_abcd], axis=0)
    expected = np.clip((median - scaler.mean[:n_abcd]) / scaler.std[:n_abcd], -6, 6)
    np.testing.assert_allclose(scaled[3, :n_abcd], expected, atol=1e-4)
    restored = FeatureScaler.from_state_dict(scaler.state_dict())
    np.testing.assert_array_equal(restored.transform(features), scaled)

    only_unmeasurable = FeatureScaler().fit(features[3:])  # a training fold where nothing could be measured
    assert np.isfinite(only_unmeasurable.transform(features)).all()


def test_a_scaler_stored_before_the_flag_column_still_reads_the_features(tmp_path):
    discs = [disc_image(tmp_path / f"disc{radius}.png", radius, (120, 75, 50)) for radius in (15, 25, 35)]
    cv2.imwrite(str(tmp_path / "black.png"), np.zeros((64, 64, 3), np.uint8))
    features = lesion_features([*discs, str(tmp_path / "black.png")])
    old = features[:3, :-1]
    legacy = FeatureScaler.from_state_dict({"mean": old.mean(0).tolist(), "std": (old.std(0) + 1e-6).tolist()})
    scaled = legacy.transform(features)
    assert scaled.shape == (4, features.shape[1] - 1) and np.isfinite(scaled).all()
    np.testing.assert_allclose(scaled[:3], np.clip((old - old.mean(0)) / (old.std(0) + 1e-6), -6, 6), atol=1e-5)
    assert legacy.state_dict()["fill"] is None
