import math

import pandas as pd
import pytest

import demo


@pytest.mark.parametrize("bad_auc", [math.nan, 0.5])
def test_demo_check_fails_on_a_nan_or_chance_auc(monkeypatch, tmp_path, capsys, bad_auc):
    """The demo is a check: a model that scores every image alike (AUC NaN) must fail it like one at chance."""
    monkeypatch.setattr(demo, "make_synthetic_dataset", lambda *args, **kwargs: None)
    monkeypatch.setattr(demo.train, "main", lambda argv: {"mean_auc": bad_auc})
    table = pd.DataFrame({"head": ["hair_dense", "ruler_mark"], "auc": [0.99, 0.98]})
    monkeypatch.setattr(demo.multi_classification, "main", lambda argv: {"table": table})
    with pytest.raises(SystemExit) as stop:
        demo.main(["--out-dir", str(tmp_path)])
    assert stop.value.code == 2
    assert "did not learn enough" in capsys.readouterr().err


def test_demo_check_passes_when_every_model_learns(monkeypatch, tmp_path):
    monkeypatch.setattr(demo, "make_synthetic_dataset", lambda *args, **kwargs: None)
    monkeypatch.setattr(demo.train, "main", lambda argv: {"mean_auc": 0.9})
    table = pd.DataFrame({"head": ["hair_dense", "ruler_mark"], "auc": [0.99, 0.98]})
    monkeypatch.setattr(demo.multi_classification, "main", lambda argv: {"table": table})
    assert demo.main(["--out-dir", str(tmp_path)])["melanoma_auc"] == {"image_only": 0.9, "with_meta": 0.9}
