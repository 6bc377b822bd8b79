import math
import subprocess

import pandas as pd
import pytest

import demo
from melanoma_audit.checkpoints import CHECKPOINT_FORMAT, save_checkpoint


def fake_scripts(monkeypatch, melanoma_auc: float, head_auc: dict[str, float], calls: list | None = None):
    """Stands in for the scripts' processes: each writes the file a real run writes, with the given AUCs."""

    def run(command, check):
        script, argv = command[1], command[2:]
        if calls is not None:
            calls.append((script, argv))
        if script.endswith("train.py"):
            model_dir = argv[argv.index("--model-dir") + 1]
            name = argv[argv.index("--save-name") + 1]
            metrics = {"auc": melanoma_auc, "image_auc": melanoma_auc}
            save_checkpoint(
                f"{model_dir}/{name}_best.pth", {"format": CHECKPOINT_FORMAT, "kind": "melanoma", "metrics": metrics}
            )
        elif "val" in argv:
            table = pd.DataFrame({"head": list(head_auc), "auc": list(head_auc.values())})
            table.to_csv(argv[argv.index("--save_path") + 1], index=False)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(demo, "make_synthetic_dataset", lambda *args, **kwargs: None)
    monkeypatch.setattr(demo.subprocess, "run", run)


@pytest.mark.parametrize("bad_auc", [math.nan, 0.5])
def test_demo_check_fails_on_a_nan_or_chance_auc(monkeypatch, tmp_path, capsys, bad_auc):
    """The demo is a check: a model that scores every image alike (AUC NaN) must fail it like one at chance."""
    fake_scripts(monkeypatch, bad_auc, {"hair_dense": 0.99, "ruler_mark": 0.98})
    with pytest.raises(SystemExit) as stop:
        demo.main(["--out-dir", str(tmp_path)])
    assert stop.value.code == 2
    assert "did not learn enough" in capsys.readouterr().err


def test_demo_check_fails_on_one_weak_artifact_head(monkeypatch, tmp_path, capsys):
    fake_scripts(monkeypatch, 0.9, {"hair_dense": 0.99, "ruler_mark": 0.6})
    with pytest.raises(SystemExit) as stop:
        demo.main(["--out-dir", str(tmp_path)])
    assert stop.value.code == 2 and "artifact ruler_mark AUC 0.600" in capsys.readouterr().err


def test_demo_runs_the_readme_commands_and_reads_their_files(monkeypatch, tmp_path):
    calls = []
    fake_scripts(monkeypatch, 0.9, {"hair_dense": 0.99, "ruler_mark": 0.98}, calls)
    result = demo.main(["--out-dir", str(tmp_path)])
    assert result == {
        "melanoma_auc": {"image_only": 0.9, "with_meta": 0.9},
        "artifact_auc": {"hair_dense": 0.99, "ruler_mark": 0.98},
    }
    scripts = [
        (script.rsplit("/", 1)[-1], argv[argv.index("--mode") + 1] if "--mode" in argv else None)
        for script, argv in calls
    ]
    assert scripts == [("train.py", None), *(("multi_classification.py", mode) for mode in ("train", "val", "test"))]
    assert "--use-meta" in calls[0][1] and "--CUDA_VISIBLE_DEVICES" in calls[0][1]


def test_demo_stops_when_a_script_fails(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(demo, "make_synthetic_dataset", lambda *args, **kwargs: None)
    monkeypatch.setattr(demo.subprocess, "run", lambda command, check: subprocess.CompletedProcess(command, 2))
    with pytest.raises(SystemExit) as stop:
        demo.main(["--out-dir", str(tmp_path)])
    assert stop.value.code == 2 and "python train.py stopped with exit code 2" in capsys.readouterr().err


def test_demo_refuses_a_folder_that_holds_other_files(monkeypatch, tmp_path, capsys):
    made = []
    fake_scripts(monkeypatch, 0.9, {"hair_dense": 0.99})
    monkeypatch.setattr(demo, "make_synthetic_dataset", lambda *args, **kwargs: made.append(kwargs))
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
