"""Property tests (hypothesis): whatever bytes an image file holds, and whatever patients, targets and metadata a
table holds, the readers, the folds and the encodings either work or end in one clear UserError."""

import math

import cv2
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from melanoma_audit.features import FeatureScaler
from melanoma_audit.image_files import image_file_problem, read_image
from melanoma_audit.metadata import MetaEncoder
from melanoma_audit.patients import make_folds, patient_groups
from melanoma_audit.tables import read_melanoma_table
from utils import UserError

QUICK = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
_IMAGE = np.random.default_rng(0).integers(0, 255, (48, 40, 3), dtype=np.uint8)
JPEG = cv2.imencode(".jpg", _IMAGE)[1].tobytes()
PNG = cv2.imencode(".png", _IMAGE)[1].tobytes()


@st.composite
def damaged(draw, original: bytes) -> bytes:
    """A real file cut short, with bytes overwritten, and/or with bytes appended."""
    data = bytearray(original[: draw(st.integers(0, len(original)))])
    for _ in range(draw(st.integers(0, 4))):
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data) + draw(st.binary(max_size=80))


image_bytes = st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=300).map(lambda body: b"\xff\xd8" + body),
    st.binary(max_size=300).map(lambda body: b"\xff\xd8" + body + b"\xff\xd9"),
    st.binary(max_size=300).map(lambda body: PNG[:16] + body),
    damaged(JPEG),
    damaged(PNG),
)


def check_clear(error: UserError) -> None:
    message = str(error)
    assert "\n" not in message and message.endswith("."), message


@QUICK
@given(data=image_bytes, size=st.sampled_from([None, 32, 64, 256]))
def test_any_bytes_are_an_image_or_a_clear_error(tmp_path_factory, data, size):
    path = tmp_path_factory.mktemp("image") / "x.jpg"
    path.write_bytes(data)
    problem = image_file_problem(str(path))
    assert problem is None or isinstance(problem, str)
    try:
        image = read_image(str(path), size)
    except UserError as error:
        check_clear(error)
        return
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3 and min(image.shape[:2]) >= 32


@QUICK
@given(data=image_bytes)
def test_a_table_with_any_image_file_reads_or_skips_it(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("table")
    (folder / "train" / "train").mkdir(parents=True)
    (folder / "train" / "train" / "good.jpg").write_bytes(JPEG)
    (folder / "train" / "train" / "odd.jpg").write_bytes(data)
    (folder / "train.csv").write_text("image_name,target\ngood,0\nodd,1\n")
    frame = read_melanoma_table(folder, "train", use_meta=False, require_target=True, bad_images="skip")
    assert "good" in set(frame["image_name"])
    for path in frame["filepath"]:  # what was kept is loaded, or refused in one sentence naming the file
        try:
            read_image(path)
        except UserError as error:
            check_clear(error)
            assert path in str(error)


@st.composite
def patient_tables(draw) -> tuple[pd.DataFrame, bool]:
    """Rows of patients (some without an id: a patient each) and 0/1 targets; `pure` when every patient's images
    share one target."""
    n_patients = draw(st.integers(1, 12))
    pure = draw(st.booleans())
    patient_target = draw(st.lists(st.sampled_from([0, 1]), min_size=n_patients, max_size=n_patients))
    rows = []
    for patient in range(n_patients):
        for _ in range(draw(st.integers(1, 4))):
            target = patient_target[patient] if pure else draw(st.sampled_from([0, 1]))
            rows.append((f"p{patient}", target))
    for _ in range(draw(st.integers(0, 6))):
        rows.append((None, draw(st.sampled_from([0, 1]))))
    frame = pd.DataFrame(rows, columns=["patient_id", "target"])
    return frame.sample(frac=1, random_state=draw(st.integers(0, 99))).reset_index(drop=True), pure


@QUICK
@given(table=patient_tables(), n_folds=st.integers(2, 5), seed=st.integers(0, 10))
def test_folds_hold_each_patient_once_and_every_class_where_they_can(table, n_folds, seed):
    frame, pure = table
    groups = patient_groups(frame)
    try:
        folds = make_folds(frame, n_folds, seed)
    except UserError as error:
        check_clear(error)
        assert len(set(groups)) < n_folds or frame["target"].value_counts().max() < n_folds
        return
    assert set(folds) == set(range(n_folds))  # every fold holds images
    for group in set(groups):
        assert len(set(folds[groups == group])) == 1, f"patient {group} is in two folds"
    if pure:  # stratified: a class with a patient for every fold reaches every fold
        for target in (0, 1):
            if len(set(groups[frame["target"] == target])) >= n_folds:
                assert all((frame["target"][folds == fold] == target).any() for fold in range(n_folds))
    np.testing.assert_array_equal(folds, make_folds(frame, n_folds, seed))


anything = st.one_of(
    st.none(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(10**12), 10**12),
    st.text(max_size=8),
    st.sampled_from(["male", "female", " Male ", "NaN", "", "torso", "inf", "-1", "45", "1e308"]),
)


@st.composite
def metadata(draw) -> pd.DataFrame:
    n_rows = draw(st.integers(1, 8))
    column = st.lists(anything, min_size=n_rows, max_size=n_rows)
    return pd.DataFrame(
        {
            "patient_id": draw(st.lists(st.sampled_from(["p1", "p2", None]), min_size=n_rows, max_size=n_rows)),
            "sex": draw(column),
            "age_approx": draw(column),
            "anatom_site_general_challenge": draw(column),
        },
        dtype=object,
    )


@QUICK
@given(fitted_on=metadata(), applied_to=metadata())
def test_metadata_encoding_is_finite_for_any_values(fitted_on, applied_to):
    encoder = MetaEncoder(["sex", "age", "site", "n_images"]).fit(fitted_on)
    encoded = encoder.transform(applied_to)
    assert encoded.shape == (len(applied_to), encoder.n_features) and np.isfinite(encoded).all()
    assert math.isfinite(MetaEncoder.from_state_dict(encoder.state_dict()).age_fill)


feature_values = st.floats(allow_nan=True, allow_infinity=True, width=32)


@QUICK
@given(
    train=st.lists(st.lists(feature_values, min_size=3, max_size=3), min_size=1, max_size=6),
    new=st.lists(st.lists(feature_values, min_size=3, max_size=3), min_size=1, max_size=6),
)
def test_feature_scaler_never_emits_nan(train, new):
    scaler = FeatureScaler().fit(np.asarray(train, dtype=np.float32))
    with np.errstate(over="ignore", invalid="ignore"):  # extreme floats overflow on the way; the result is clipped
        scaled = FeatureScaler.from_state_dict(scaler.state_dict()).transform(np.asarray(new, dtype=np.float32))
    assert scaled.shape == (len(new), 3) and np.isfinite(scaled).all()


@pytest.mark.parametrize("cut", [0.3, 0.6, 0.9])
def test_a_truncated_jpeg_is_damaged(tmp_path, cut):
    path = tmp_path / "cut.jpg"
    path.write_bytes(JPEG[: int(len(JPEG) * cut)])
    assert image_file_problem(str(path)) == "truncated JPEG: no end-of-image marker"
