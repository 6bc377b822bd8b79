"""Property tests: whatever a CSV holds, reading it ends in a table or in the clear-error path, never a traceback."""

import string

import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from melanoma_audit.tables import read_melanoma_table
from utils import UserError

COLUMNS = ["image_name", "patient_id", "sex", "age_approx", "anatom_site_general_challenge", "target", "junk"]
cells = st.one_of(
    st.just(""),
    st.sampled_from(["a", "b", "0", "1", "2", "-1", "1.0", "nan", "male", "female", "torso", "45", "abc", '"', "x,y"]),
    st.text(alphabet=string.printable, max_size=6),
)


@st.composite
def csv_texts(draw):
    header = draw(st.lists(st.sampled_from(COLUMNS), min_size=0, max_size=7))
    rows = draw(st.lists(st.lists(cells, min_size=0, max_size=8), max_size=6))
    lines = [",".join(header)] + [",".join(row) for row in rows]
    return "\n".join(lines) + draw(st.sampled_from(["", "\n"]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=csv_texts(), use_meta=st.booleans())
def test_any_train_csv_is_read_or_refused_clearly(tmp_path_factory, text, use_meta):
    data_dir = tmp_path_factory.mktemp("csv")
    (data_dir / "train" / "train").mkdir(parents=True)
    for name in ("a", "b", "0", "1"):
        (data_dir / "train" / "train" / f"{name}.jpg").write_bytes(b"\xff\xd8 not decoded here \xff\xd9")
    (data_dir / "train.csv").write_text(text)
    try:
        frame = read_melanoma_table(data_dir, "train", use_meta=use_meta, require_target=True)
    except UserError as error:
        message = str(error)
        assert "\n" not in message and message.endswith(".")
        return
    # accepted: then it really is a usable table
    assert isinstance(frame, pd.DataFrame) and len(frame) > 0
    assert set(frame["target"]) <= {0, 1}
    assert frame["image_name"].is_unique
