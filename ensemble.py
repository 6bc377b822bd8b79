"""Ensemble several train.py --fold all runs of the same split, with an honest out-of-fold score.

    python ensemble.py --runs weights/lite0_128 weights/scratch_b0 --data-dir ./melanoma_external_256/ \
        --method stack --n-tta 8 --out submission.csv
    python ensemble.py --combiner weights/ensemble_stack.json --images photos/ --meta-csv photos.csv --out probs.csv

Each run is <model-dir>/<save-name>: its fold checkpoints <save-name>_fold<k>_best.pth and its pooled out-of-fold
predictions <log-dir>/oof_<save-name>.csv. The runs must hold out the same images in the same folds (the same data,
--n-folds and --fold-seed). --method: mean (probability), rank (mean rank), weights (non-negative weights on the
logits, logistic regression) or stack (LightGBM on the logits, metadata, lesion features and patient context);
stacking.py says how each is fitted. --image-only: each run's network without the metadata it was late-fused with
(rescored on its held-out images), and a stack without sex, age, site or patient context. The AUC printed for the
ensemble is nested: each fold's images are scored by a combiner fitted on the other folds only, the same folds the
runs were validated on.

Writes <log-dir>/oof_<save-name>.csv (image_name,fold,target,prob, for evaluate.py; beside the first run's
out-of-fold file unless --log-dir), the combiner fitted on all out-of-fold rows as <model-dir>/<save-name>.json
(plain JSON), and, unless --oof-only, the submission image_name,target for <data-dir>/test.csv: every fold model
of a run with --n-tta views, averaged over the run's folds, then combined. --combiner scores new images (--images
with --meta-csv, or --data-dir's test.csv) with a saved combiner and the runs it names (--runs where they have
moved).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from melanoma_audit.checkpoints import load_checkpoint
from melanoma_audit.cli import (
    MAX_TTA,
    add_allow_missing_meta_flag,
    add_overwrite_flag,
    add_runtime_args,
    claim_file,
    scoring_runtime,
)
from melanoma_audit.features import lesion_features
from melanoma_audit.inference import LoadedModel, MelanomaPredictor, combine, expand_model_paths, held_out_images
from melanoma_audit.metrics import safe_auc
from melanoma_audit.patient_context import describe_context, has_patient_context
from melanoma_audit.scoring_inputs import attach_metadata, frame_from_images, require_metadata
from melanoma_audit.stacking import (
    METHODS,
    UNFITTED,
    StackInputs,
    StackOptions,
    fit_combiner,
    load_combiner,
    nested_oof,
    predict_combiner,
    save_combiner,
    top_features,
)
from melanoma_audit.tables import SITE_COLUMN, read_csv, read_melanoma_table
from utils import UserError, exit_on_user_error, write_csv_atomic

OOF_COLUMNS = ("image_name", "fold", "target", "prob")
STACK_META_COLUMNS = ("sex", "age_approx", SITE_COLUMN)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", help="<model-dir>/<save-name> of train.py --fold all runs")
    parser.add_argument("--method", choices=METHODS, default="stack", help="how the runs are combined (stack)")
    parser.add_argument("--data-dir", help="the Kaggle-layout folder the runs were trained on (train.csv, test.csv)")
    parser.add_argument(
        "--log-dir",
        help="folder of the runs' oof_<save-name>.csv and the ensemble's (default: the --log-dir the runs recorded)",
    )
    parser.add_argument("--save-name", help="name of the ensemble's files (default ensemble_<method>)")
    parser.add_argument("--model-dir", default="./weights", help="folder of the combiner file (./weights)")
    parser.add_argument("--oof-only", action="store_true", help="fit and score on the out-of-fold rows only, no test")
    parser.add_argument(
        "--image-only",
        action="store_true",
        help="the runs' networks without the metadata they were late-fused with, rescored on their held-out images "
        "with --n-tta views; a stack without sex, age, site or patient context",
    )
    parser.add_argument(
        "--stack-noise",
        type=float,
        default=StackOptions.noise,
        help=f"Gaussian noise on the stacked logits while fitting, in each logit's spread ({StackOptions.noise})",
    )
    parser.add_argument(
        "--stack-rounds", type=int, default=StackOptions.rounds, help=f"boosting rounds ({StackOptions.rounds})"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the stack's noise and trees")
    parser.add_argument("--combiner", help="a saved combiner (.json): score --images or --data-dir's test.csv with it")
    parser.add_argument("--images", nargs="+", help="with --combiner: image files and/or folders of images")
    parser.add_argument("--meta-csv", help="with --images: CSV of image_name, sex, age_approx, site, patient_id")
    add_allow_missing_meta_flag(parser)
    parser.add_argument("--n-tta", type=int, default=1, help=f"dihedral test-time augmentations, 1..{MAX_TTA}")
    parser.add_argument("--out", default="submission.csv", help="predictions CSV (default submission.csv)")
    add_overwrite_flag(parser, "the files of an earlier ensemble")
    add_runtime_args(parser)
    args = parser.parse_args(argv)
    if args.combiner is None and not (args.runs and args.data_dir):
        parser.error("fitting an ensemble needs --runs and --data-dir (or --combiner FILE to use a saved one)")
    if args.combiner is not None and bool(args.images) == bool(args.data_dir):
        parser.error("--combiner scores either --images or --data-dir's test.csv: give one of them")
    if args.meta_csv and not args.images:
        parser.error("--meta-csv goes with --images")
    if args.stack_noise < 0 or args.stack_rounds < 1 or args.batch_size < 1:
        parser.error("--stack-noise must be 0 or more, --stack-rounds and --batch-size at least 1")
    return args


# --------------------------------------------------------------------------- the runs


@dataclass
class Run:
    prefix: str
    checkpoints: list[Path]  # one per fold, in fold order
    oof: pd.DataFrame  # image_name, fold, target, prob
    oof_path: Path


def find_oof(prefix: str, config: dict, log_dir: str | None) -> Path:
    """The run's pooled out-of-fold file: in --log-dir, else in the --log-dir the run recorded, else ./logs."""
    name = f"oof_{Path(prefix).name}.csv"
    folders = [log_dir] if log_dir else list(dict.fromkeys([config.get("log_dir") or "./logs", "./logs"]))
    for folder in folders:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    raise UserError(
        f"no {name} in {' or '.join(folders)}: pass --log-dir with the folder train.py wrote the run's logs to."
    )


def load_run(prefix: str, log_dir: str | None) -> Run:
    """A --fold all run: its fold checkpoints and its out-of-fold file, checked against each other."""
    paths = expand_model_paths([prefix])
    infos = [load_checkpoint(path, "melanoma") for path in paths]
    n_folds = infos[0].get("n_folds") or 1
    folds = [info.get("fold") for info in infos]
    if None in folds or sorted(folds) != list(range(n_folds)) or n_folds < 2:
        raise UserError(
            f"{prefix} is not a run of all its folds ({len(paths)} checkpoint(s) of {n_folds} folds): ensemble runs "
            "trained with --fold all, whose out-of-fold predictions cover every image."
        )
    oof_path = find_oof(prefix, infos[0].get("config") or {}, log_dir)
    oof = read_csv(oof_path)
    missing = [column for column in OOF_COLUMNS if column not in oof.columns]
    if missing:
        raise UserError(f"{oof_path} lacks {', '.join(missing)}: use the oof_<save-name>.csv that train.py wrote.")
    for path, info in zip(paths, infos, strict=True):
        rows = set(oof.loc[oof["fold"] == info["fold"], "image_name"])
        if info.get("val_images") is None or set(info["val_images"]) != rows:
            raise UserError(
                f"{oof_path} does not list the images that {path} held out as fold {info['fold']}: the file is from "
                "another run of that name; retrain the run or pass the --log-dir of its own logs."
            )
    return Run(prefix, [paths[index] for index in np.argsort(folds)], oof, oof_path)


def check_same_split(runs: list[Run]) -> None:
    """Refuses runs that do not hold out the same images in the same folds with the same labels."""
    first = runs[0].oof.set_index("image_name")
    for run in runs[1:]:
        other = run.oof.set_index("image_name")
        if set(other.index) != set(first.index):
            count = len(set(other.index) ^ set(first.index))
            raise UserError(
                f"{run.oof_path} and {runs[0].oof_path} cover different images ({count} in one only): ensemble runs "
                "trained on the same --data-dir."
            )
        moved = other["fold"].reindex(first.index) != first["fold"]
        if moved.any():
            name = moved.index[moved][0]
            raise UserError(
                f"{run.prefix} validated image {name} in fold {other.loc[name, 'fold']}, {runs[0].prefix} in fold "
                f"{first.loc[name, 'fold']}: ensemble runs of one split (the same --n-folds and --fold-seed)."
            )
        if (other["target"].reindex(first.index) != first["target"]).any():
            raise UserError(f"{run.oof_path} and {runs[0].oof_path} disagree on targets: retrain on the same labels.")


def oof_inputs(runs: list[Run], data_dir: str, stack: bool) -> tuple[StackInputs, np.ndarray, np.ndarray]:
    """The pooled out-of-fold rows with their train.csv columns but the target (a combiner's features never hold
    it): the combiner's inputs, the targets and the folds."""
    train = read_melanoma_table(data_dir, "train", use_meta=False, require_target=True, bad_images="skip")
    rows = runs[0].oof[["image_name", "fold", "target"]]
    absent = sorted(set(rows["image_name"]) - set(train["image_name"]))
    if absent:
        raise UserError(
            f"{len(absent)} out-of-fold image(s) are not in the train CSV of {data_dir}, first {absent[0]}: pass the "
            "--data-dir the runs were trained on."
        )
    frame = rows[["image_name", "fold"]].merge(
        train.drop(columns=["target", "fold"], errors="ignore"), on="image_name", how="left", validate="one_to_one"
    )
    probs = np.column_stack([run.oof.set_index("image_name")["prob"].reindex(rows["image_name"]) for run in runs])
    lesion = lesion_features(list(frame["filepath"])) if stack else None
    return StackInputs(probs, frame, lesion), rows["target"].to_numpy(int), rows["fold"].to_numpy(int)


def without_metadata(loaded: LoadedModel) -> LoadedModel:
    """The model's network alone: under late fusion the network never saw the metadata (a logistic regression on
    it is added afterwards), so dropping that regression leaves the image-only model that was trained."""
    if loaded.encoder is not None and loaded.meta_model is None:
        raise UserError(
            f"{loaded.path} feeds the metadata into its network (--fusion concat), so it has no image-only score: "
            "drop --image-only, or ensemble runs trained without --use-meta or with --fusion late."
        )
    loaded.encoder, loaded.meta_model = None, None
    return loaded


def image_only_oof(runs: list[Run], frame: pd.DataFrame, args: argparse.Namespace) -> np.ndarray:
    """(images, runs): each fold model's network alone on the images it held out, with --n-tta views."""
    runtime = scoring_runtime(args)
    probs = np.full((len(frame), len(runs)), np.nan)
    for index, run in enumerate(runs):
        for path in run.checkpoints:
            predictor = MelanomaPredictor.from_checkpoint(path, runtime)
            loaded = without_metadata(predictor.loaded)
            rows = frame["image_name"].isin(held_out_images(loaded, "ensemble a cross-validated run")).to_numpy()
            probs[rows, index] = predictor.probabilities(frame[rows].reset_index(drop=True))
        print(f"  {run.prefix}: out-of-fold images rescored without metadata ({args.n_tta} TTA view(s))", flush=True)
    return probs


# --------------------------------------------------------------------------- scoring images


def require_stack_metadata(state: dict, frame: pd.DataFrame, allow_missing: bool, source: str) -> None:
    """The stack encodes sex, age and site when it was fitted with them: refuse images without, or encode missing."""
    absent = [column for column in STACK_META_COLUMNS if column not in frame.columns]
    if state["method"] != "stack" or state["meta_encoder"] is None or not absent:
        return
    if not allow_missing:
        raise UserError(
            f"the stacked combiner reads {', '.join(absent)} and {source} has none: give the metadata (--meta-csv), "
            "or --allow-missing-meta to encode it as missing."
        )
    for column in absent:
        frame[column] = np.nan


def score_images(
    record: dict, run_paths: dict[str, list[Path]], frame: pd.DataFrame, args: argparse.Namespace, source: str
) -> np.ndarray:
    """P(melanoma) of each row of `frame`: every run's fold models (TTA), the mean over a run's folds, combined.
    `run_paths`: each run's name and fold checkpoints."""
    runtime = scoring_runtime(args)
    state = record["combiner"]
    require_stack_metadata(state, frame, args.allow_missing_meta, source)
    models = [[MelanomaPredictor.from_checkpoint(path, runtime) for path in paths] for paths in run_paths.values()]
    if record.get("image_only"):
        for predictor in (predictor for run in models for predictor in run):
            without_metadata(predictor.loaded)
    loaded = [predictor.loaded for run in models for predictor in run]
    require_metadata(frame, loaded, args.allow_missing_meta, source)
    needs_lesion = state["method"] == "stack" or any(model.feature_scaler for model in loaded)
    lesion = lesion_features(list(frame["filepath"])) if needs_lesion else None
    print(f"{len(frame)} images, {len(models)} run(s), {args.n_tta} TTA view(s), on {runtime.device}", flush=True)
    probs = []
    for name, run in zip(run_paths, models, strict=True):
        probs.append(combine([predictor.probabilities(frame, lesion=lesion) for predictor in run]))
        print(f"  {name}: mean P(melanoma) {probs[-1].mean():.4f} over its {len(run)} fold models", flush=True)
    if state["method"] == "stack" and not record.get("image_only"):
        print(describe_context(frame) if state["context"] else "patient context: off (as when it was fitted)")
    return predict_combiner(state, StackInputs(np.column_stack(probs), frame, lesion))


def write_predictions(frame: pd.DataFrame, target: np.ndarray, out: Path, with_paths: bool) -> pd.DataFrame:
    result = pd.DataFrame({"image_name": frame["image_name"]})
    if with_paths:
        result["filepath"] = frame["filepath"]
    result["target"] = target
    write_csv_atomic(result, out)
    print(f"wrote {out}: {len(result)} rows, mean {np.mean(target):.4f}", flush=True)
    return result


def combiner_runs(record: dict, override: list[str] | None) -> dict[str, list[Path]]:
    """The fold checkpoints of the combiner's runs, as recorded, or of the runs given with --runs (same order)."""
    if override is None:
        runs = {name: [Path(path) for path in paths] for name, paths in record["runs"].items()}
        for path in (path for paths in runs.values() for path in paths):
            if not path.is_file():
                raise UserError(
                    f"the combiner's checkpoint {path} does not exist: pass --runs with where they are now."
                )
        return runs
    if len(override) != len(record["runs"]):
        raise UserError(
            f"--runs names {len(override)} run(s), the combiner was fitted on {len(record['runs'])}: give its runs in "
            f"its order ({', '.join(record['runs'])})."
        )
    return {prefix: expand_model_paths([prefix]) for prefix in override}


def score_with_combiner(args: argparse.Namespace) -> pd.DataFrame:
    out = Path(args.out)
    claim_file(out, args.overwrite)
    record = load_combiner(args.combiner)
    run_paths = combiner_runs(record, args.runs)
    if args.data_dir:
        frame = read_melanoma_table(args.data_dir, "test", use_meta=False, require_target=False)
        source = f"the test CSV of {args.data_dir}"
    else:
        frame = attach_metadata(frame_from_images(args.images), args.meta_csv)
        source = str(args.meta_csv or "the command line")
    return write_predictions(frame, score_images(record, run_paths, frame, args, source), out, not args.data_dir)


# --------------------------------------------------------------------------- fitting


def report(
    runs: list[Run], inputs: StackInputs, target: np.ndarray, folds: np.ndarray, oof: np.ndarray, method: str
) -> None:
    """The ensemble's out-of-fold AUC beside each run's, pooled and per fold."""

    def per_fold(scores: np.ndarray) -> str:
        return ", ".join(f"{safe_auc(target[folds == k], scores[folds == k]):.4f}" for k in np.unique(folds))

    how = "nothing fitted" if method in UNFITTED else "each fold scored by a combiner fitted on the other folds only"
    print(f"nested out-of-fold AUC ({how}):", flush=True)
    print(f"  ensemble ({method}): {safe_auc(target, oof):.4f} (folds {per_fold(oof)})", flush=True)
    for index, run in enumerate(runs):
        probs = inputs.probs[:, index]
        print(f"  {run.prefix} alone: {safe_auc(target, probs):.4f} (folds {per_fold(probs)})", flush=True)


def ensemble_outputs(args: argparse.Namespace, runs: list[Run]) -> tuple[Path, Path]:
    """The ensemble's out-of-fold file (beside the first run's) and combiner file, refused when they exist (without
    --overwrite), and so is --out."""
    name = args.save_name or f"ensemble_{args.method}"
    oof_out = runs[0].oof_path.parent / f"oof_{name}.csv"
    combiner_out = Path(args.model_dir) / f"{name}.json"
    for path in (oof_out, combiner_out):
        claim_file(path, args.overwrite, "choose another --save-name")
    if not args.oof_only:
        claim_file(Path(args.out), args.overwrite)
    return oof_out, combiner_out


def fit_ensemble(args: argparse.Namespace) -> dict:
    """Fits and scores the ensemble (nested), writes its out-of-fold file and combiner, then the submission."""
    runs = [load_run(prefix, args.log_dir) for prefix in args.runs]
    check_same_split(runs)
    oof_out, combiner_out = ensemble_outputs(args, runs)
    stack = args.method == "stack"
    inputs, target, folds = oof_inputs(runs, args.data_dir, stack)
    if args.image_only:
        inputs.probs = image_only_oof(runs, inputs.frame, args)
        print("image only: the stack reads no sex, age, site or patient context", flush=True)
    context = stack and not args.image_only and has_patient_context(inputs.frame)
    options = StackOptions(args.stack_noise, args.stack_rounds, args.seed, context, metadata=not args.image_only)
    if stack and not args.image_only:
        print(describe_context(inputs.frame), flush=True)
    print(f"{len(target)} out-of-fold images ({int(target.sum())} melanoma), {len(np.unique(folds))} folds", flush=True)

    oof = nested_oof(args.method, inputs, target, folds, options)
    report(runs, inputs, target, folds, oof, args.method)
    write_csv_atomic(inputs.frame[["image_name", "fold"]].assign(target=target, prob=oof), oof_out)
    state = fit_combiner(args.method, inputs, target, options)
    if args.method == "weights":
        print(
            f"weights on the runs' logits {np.round(state['weights'], 4).tolist()}, intercept {state['intercept']:.4f}"
        )
    if stack:
        print("stack, largest gain: " + ", ".join(f"{feature} {share:.2f}" for feature, share in top_features(state)))
    run_paths = {run.prefix: run.checkpoints for run in runs}
    record = {
        "runs": {name: [str(path) for path in paths] for name, paths in run_paths.items()},
        "image_only": args.image_only,
        "combiner": state,
    }
    save_combiner(combiner_out, record | {"nested_auc": safe_auc(target, oof)})
    print(f"wrote {oof_out} (nested out-of-fold predictions) and {combiner_out} (fitted on all of them)", flush=True)
    result = {"oof": oof, "run_probs": inputs.probs, "target": target, "record": record, "submission": None}
    if not args.oof_only:
        frame = read_melanoma_table(args.data_dir, "test", use_meta=False, require_target=False)
        scores = score_images(record, run_paths, frame, args, f"the test CSV of {args.data_dir}")
        result["submission"] = write_predictions(frame, scores, Path(args.out), with_paths=False)
    return result


def main(argv: list[str] | None = None) -> dict | pd.DataFrame:
    args = parse_args(argv)
    with exit_on_user_error():
        if args.combiner:
            return score_with_combiner(args)
        return fit_ensemble(args)


if __name__ == "__main__":
    main()
