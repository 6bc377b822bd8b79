"""A run's files mean what they say: --resume continues only the same run (settings, data, folds), and the folds of
a multi-fold run are one unit (one split, a pooled OOF file of every finished fold, no stale fold files)."""

import shutil

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

import multi_classification as mc
import predict
import train
from melanoma_audit import engine
from melanoma_audit.checkpoints import load_checkpoint, save_checkpoint
from melanoma_audit.inference import load_melanoma_model


def command(data_dir, out, *extra, name="run", epochs=2):
    """A tiny train.py run: b0 at 32 px from random weights, three folds, no baselines."""
    return [
        "--save-name", name, "--data-dir", str(data_dir), "--image-size", "32", "--n-epochs", str(epochs),
        "--enet-type", "efficientnet-b0", "--no-pretrained", "--batch-size", "16", "--num-workers", "0",
        "--n-folds", "3", "--no-baselines", "--model-dir", str(out / "weights"), "--log-dir", str(out / "logs"),
        *extra,
    ]  # fmt: skip


def interrupted(main, argv, epoch=2):
    """Runs `main(argv)` and kills it (KeyboardInterrupt) as it starts training epoch `epoch`."""
    real_epoch = engine.train_one_epoch

    def crash(*args, **kwargs):
        if kwargs["epoch"] == epoch:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine, "train_one_epoch", crash)
        with pytest.raises(KeyboardInterrupt):
            main(argv)


def refused(main, argv, capsys) -> str:
    """The one-line error of a refused start (exit code 2)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def killed_run(synthetic_dir, tmp_path_factory):
    """A --use-meta run (late fusion, light augmentation) killed after its first of two epochs."""
    out = tmp_path_factory.mktemp("killed")
    interrupted(train.main, command(synthetic_dir, out, "--use-meta", "--no-lesion-features"))
    return out


# --------------------------------------------------------------------------- the resume rule


@pytest.mark.parametrize(
    ("flag", "value", "old"),
    [
        ("--augment", "full", "light"),
        ("--bn-refresh-batches", "3", "10"),
        ("--bn-momentum", "0.05", "0.1"),
        ("--precision", "bf16", "auto"),
        ("--data-path", "gpu", "auto"),
        ("--meta-features", "sex,age", "site"),
    ],
)
def test_resume_refuses_a_changed_training_setting(synthetic_dir, killed_run, tmp_path, capsys, flag, value, old):
    out = tmp_path / "run"
    shutil.copytree(killed_run, out)
    last = out / "weights" / "run_last.pth"
    before = last.read_bytes()
    argv = command(synthetic_dir, out, "--use-meta", "--no-lesion-features", flag, value, "--resume")
    err = refused(train.main, argv, capsys)
    assert flag in err and value.split(",")[-1] in err and old in err and "--overwrite" in err
    assert last.read_bytes() == before and not (out / "weights" / "run_final.pth").exists()


def test_resume_continues_whatever_the_runtime_flags(synthetic_dir, killed_run, tmp_path):
    out = tmp_path / "elsewhere"  # another model and log folder: where the files live does not shape training
    shutil.copytree(killed_run, out)
    argv = command(synthetic_dir, out, "--use-meta", "--no-lesion-features", "--no-progress", "--no-channels-last")
    train.main([*argv, "--resume"])
    assert load_checkpoint(out / "weights" / "run_final.pth", "melanoma")["epoch"] == 2


def test_resume_refuses_other_data_or_other_folds(synthetic_dir, tmp_path, capsys, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(synthetic_dir, data)
    argv = command(data, tmp_path, "--no-lesion-features")
    interrupted(train.main, argv)
    last = tmp_path / "weights" / "run_last.pth"
    before = last.read_bytes()

    # the same rows, but the split code assigns the folds differently
    real_folds = train.make_folds
    monkeypatch.setattr(train, "make_folds", lambda *args: (real_folds(*args) + 1) % 3)
    err = refused(train.main, [*argv, "--resume"], capsys)
    assert "validation images" in err and "--overwrite" in err
    monkeypatch.setattr(train, "make_folds", real_folds)

    # three rows left out of train.csv: the folds would be redrawn over other images
    table = pd.read_csv(data / "train.csv")
    table.iloc[3:].to_csv(data / "train.csv", index=False)
    err = refused(train.main, [*argv, "--resume"], capsys)
    assert "data" in err and "train.csv" in err and "--overwrite" in err
    assert last.read_bytes() == before


def test_resume_with_nothing_to_resume_says_so(synthetic_dir, killed_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(killed_run, out)
    argv = command(synthetic_dir, out, "--use-meta", "--no-lesion-features", "--resume")
    argv[argv.index("--save-name") + 1] = "rnu"  # mistyped
    err = refused(train.main, argv, capsys)
    assert "rnu_last.pth" in err and "--resume" in err
    assert not list((out / "weights").glob("rnu*")) and not list((out / "logs").glob("*rnu*"))


def detector_argv(data_dir, model_path, *extra):
    argv = ["--img_path", str(data_dir / "train" / "train"), "--ann_path", str(data_dir / "gans_biases.csv")]
    argv += ["--mode", "train", "--model_path", str(model_path), "--epochs", "2", "--enet_type", "efficientnet-b0"]
    return [*argv, "--image_size", "32", "--no-pretrained", "--num_workers", "0", "--batch", "16", *extra]


def test_the_detector_resumes_by_the_same_rule(synthetic_dir, tmp_path, capsys):
    model = tmp_path / "detector.pth"
    interrupted(mc.main, detector_argv(synthetic_dir, model))
    err = refused(mc.main, detector_argv(synthetic_dir, model, "--bn-momentum", "0.05", "--resume"), capsys)
    assert "--bn-momentum" in err and "0.05" in err and "--overwrite" in err
    err = refused(mc.main, detector_argv(synthetic_dir, tmp_path / "detectr.pth", "--resume"), capsys)
    assert "detectr_last.pth" in err
    assert not (tmp_path / "detectr.pth").exists()
    mc.main(detector_argv(synthetic_dir, model, "--no-progress", "--resume"))
    assert load_checkpoint(tmp_path / "detector_last.pth", "artifact")["epoch"] == 2


# --------------------------------------------------------------------------- a multi-fold run is one unit


@pytest.fixture(scope="module")
def cv_run(synthetic_dir, tmp_path_factory):
    """A finished three-fold --fold all run of one epoch, and what train.main returned."""
    out = tmp_path_factory.mktemp("cv")
    summary = train.main(command(synthetic_dir, out, "--no-lesion-features", "--fold", "all", epochs=1))
    return out, summary


def test_the_mean_auc_is_the_mean_of_the_folds_out_of_fold_aucs(cv_run):
    out, summary = cv_run
    pooled = pd.read_csv(out / "logs" / "oof_run.csv")
    fold_auc = [roc_auc_score(rows["target"], rows["prob"]) for _, rows in pooled.groupby("fold")]
    assert summary["folds"] == [0, 1, 2] and summary["fold_auc"] == pytest.approx(fold_auc)
    assert summary["mean_auc"] == pytest.approx(np.mean(fold_auc))
    for fold, auc in enumerate(fold_auc):  # each fold's own OOF file says the same
        own = pd.read_csv(out / "logs" / f"oof_run_fold{fold}.csv")
        assert roc_auc_score(own["target"], own["prob"]) == pytest.approx(auc)


def test_resuming_some_folds_keeps_every_finished_fold_in_the_pooled_file(synthetic_dir, cv_run, tmp_path):
    out = tmp_path / "cv"
    shutil.copytree(cv_run[0], out)
    pooled = pd.read_csv(out / "logs" / "oof_run.csv")
    assert sorted(pooled["fold"].unique()) == [0, 1, 2]
    train.main(command(synthetic_dir, out, "--no-lesion-features", "--fold", "0,1", "--resume", epochs=1))
    again = pd.read_csv(out / "logs" / "oof_run.csv")
    order = ["fold", "image_name"]
    pd.testing.assert_frame_equal(
        again.sort_values(order).reset_index(drop=True), pooled.sort_values(order).reset_index(drop=True)
    )


def test_the_folds_of_a_save_name_are_claimed_together_and_pooled_from_one_split(
    synthetic_dir, cv_run, tmp_path, capsys
):
    out = tmp_path / "cv"
    shutil.copytree(cv_run[0], out)
    # a single-fold run of the same name would sit beside the folds that predict.py reads as the run
    pooled_file = out / "logs" / "oof_run.csv"
    pooled = pooled_file.read_bytes()
    pooled_file.unlink()  # (the pooled file alone is refused too: it is the single run's OOF file)
    err = refused(train.main, command(synthetic_dir, out, "--no-lesion-features", "--fold", "1", epochs=1), capsys)
    assert "run_fold" in err and "already exists" in err and not (out / "weights" / "run_best.pth").exists()

    fold2 = out / "weights" / "run_fold2_last.pth"
    save_checkpoint(fold2, {**load_checkpoint(fold2, "melanoma"), "data_sha256": "0" * 64})  # another split's fold
    pooled_file.write_bytes(pooled)
    argv = command(synthetic_dir, out, "--no-lesion-features", "--fold", "0,1", "--resume", epochs=1)
    err = refused(train.main, argv, capsys)
    assert "run_fold2_last.pth" in err and "split" in err
    assert (out / "logs" / "oof_run.csv").read_bytes() == pooled


def test_overwrite_removes_the_runs_other_folds_and_predict_refuses_mixed_folds(
    synthetic_dir, cv_run, tmp_path, capsys
):
    out = tmp_path / "cv"
    shutil.copytree(cv_run[0], out)
    weights = out / "weights"
    old_fold2 = weights / "run_fold2_best.pth"
    kept = tmp_path / "old_fold2_best.pth"
    shutil.copy(old_fold2, kept)
    two_folds = ["--no-lesion-features", "--fold", "all", "--n-folds", "2", "--overwrite"]
    train.main(command(synthetic_dir, out, *two_folds, epochs=1))
    assert not list(weights.glob("run_fold2_*")) and not list((out / "logs").glob("*run_fold2*"))
    assert sorted(pd.read_csv(out / "logs" / "oof_run.csv")["fold"].unique()) == [0, 1]

    def predict_argv(name):
        return ["--data-dir", str(synthetic_dir), "--model-path", str(weights / "run"), "--num-workers", "0",
                "--out", str(tmp_path / name)]  # fmt: skip

    predict.main(predict_argv("two.csv"))
    assert "2 model(s)" in capsys.readouterr().out

    shutil.copy(kept, old_fold2)  # what an --overwrite left behind before: a fold of the three-fold split
    err = refused(predict.main, predict_argv("mixed.csv"), capsys)
    assert "run_fold2_best.pth" in err and "split" in err
    shutil.copy(weights / "run_fold0_best.pth", old_fold2)  # fold 0 under another name
    err = refused(predict.main, predict_argv("repeated.csv"), capsys)
    assert "fold 0" in err and "run_fold2_best.pth" in err
    assert not (tmp_path / "mixed.csv").exists() and not (tmp_path / "repeated.csv").exists()


def test_a_fold_listed_twice_is_refused(synthetic_dir, tmp_path, capsys):
    err = refused(train.main, command(synthetic_dir, tmp_path, "--fold", "0,0", epochs=1), capsys)
    assert "--fold" in err and "0" in err
    assert not (tmp_path / "weights").exists() or not list((tmp_path / "weights").iterdir())


def test_a_kill_between_last_and_final_is_repaired_on_resume(synthetic_dir, tmp_path, monkeypatch):
    argv = command(synthetic_dir, tmp_path, "--no-lesion-features", epochs=1)
    real_save = engine.save_checkpoint

    def killed_before_final(path, checkpoint):
        if str(path).endswith("_final.pth"):
            raise KeyboardInterrupt
        real_save(path, checkpoint)

    monkeypatch.setattr(engine, "save_checkpoint", killed_before_final)
    with pytest.raises(KeyboardInterrupt):
        train.main(argv)
    monkeypatch.setattr(engine, "save_checkpoint", real_save)
    final = tmp_path / "weights" / "run_final.pth"
    assert not final.exists()
    train.main([*argv, "--resume"])
    saved, last = (load_checkpoint(tmp_path / "weights" / f"run_{kind}.pth", "melanoma") for kind in ("final", "last"))
    assert saved["epoch"] == 1 and "optimizer" not in saved and "history" not in saved
    assert all(np.array_equal(tensor, last["state_dict"][key]) for key, tensor in saved["state_dict"].items())
    load_melanoma_model(final, "cpu")
