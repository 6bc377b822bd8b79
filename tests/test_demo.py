import math

import pandas as pd
import pytest

import demo


@pytest.mark.parametrize("bad_auc", [math.nan, 0.5])
def test_demo_check_fails_on_a_nan_or_chance_auc(monkeypatch, tmp_path, capsys, bad_auc):
    """The demo is a check: a model that scores every image alike (AUC NaN) must fail it like one at chance."""
    monkeypatch.setattr(demo, "make_synthetic_dataset", lambda *args, **kwargs: None)
    monkeypatch.setattr(demo.train, "main", lambda argv: {"mean_auc": bad_auc, "image_mean_auc": bad_auc})
    table = pd.DataFrame({"head": ["hair_dense", "ruler_mark"], "auc": [0.99, 0.98]})
    monkeypatch.setattr(demo.multi_classification, "main", lambda argv: {"table": table})
    with pytest.raises(SystemExit) as stop:
        demo.main(["--out-dir", str(tmp_path)])
    assert stop.value.code == 2
    assert "did not learn enough" in capsys.readouterr().err


def test_demo_check_passes_when_every_model_learns(monkeypatch, tmp_path):
    monkeypatch.setattr(demo, "make_synthetic_dataset", lambda *args, **kwargs: None)
    monkeypatch.setattr(demo.train, "main", lambda argv: {"mean_auc": 0.9, "image_mean_auc": 0.9})
    table = pd.DataFrame({"head": ["hair_dense", "ruler_mark"], "auc": [0.99, 0.98]})
    monkeypatch.setattr(demo.multi_classification, "main", lambda argv: {"table": table})
    assert demo.main(["--out-dir", str(tmp_path)])["melanoma_auc"] == {"image_only": 0.9, "with_meta": 0.9}


def test_demo_refuses_a_folder_that_holds_other_files(monkeypatch, tmp_path, capsys):
    made = []
    monkeypatch.setattr(demo, "make_synthetic_dataset", lambda *args, **kwargs: made.append(kwargs))
    monkeypatch.setattr(demo.train, "main", lambda argv: {"mean_auc": 0.9, "image_mean_auc": 0.9})
    table = pd.DataFrame({"head": ["hair_dense"], "auc": [0.99]})
    monkeypatch.setattr(demo.multi_classification, "main", lambda argv: {"table": table})
    (tmp_path / "melanoma_external_256").mkdir()
    (tmp_path / "melanoma_external_256" / "test.csv").write_text("image_name\nISIC_1\n")
    with pytest.raises(SystemExit) as stop:
        demo.main(["--out-dir", str(tmp_path), "--overwrite"])
    assert stop.value.code == 2 and "not empty" in capsys.readouterr().err and not made
    # its own earlier folder: replaced only with --overwrite
    demo.main(["--out-dir", str(tmp_path / "demo")])
    with pytest.raises(SystemExit) as stop:
        demo.main(["--out-dir", str(tmp_path / "demo")])
    assert stop.value.code == 2 and "pass --overwrite" in capsys.readouterr().err and len(made) == 1
    demo.main(["--out-dir", str(tmp_path / "demo"), "--overwrite"])
    assert len(made) == 2 and made[-1]["overwrite"] is True
