"""Score images with one or more melanoma models from train.py: test-time augmentation and ensembles.

Kaggle test set of a data folder (test.csv, test/test/*.jpg) to a submission (image_name,target):

    python predict.py --data-dir ./melanoma_external_256/ --model-path weights/r1_best.pth --n-tta 8 \
        --out submission.csv

Several checkpoints, or a run's prefix (weights/r1 takes weights/r1_best.pth, or all folds
weights/r1_fold<k>_best.pth of a --fold all run), are ensembled by their mean probability (--rank-average: by
their mean rank). Any images (files or folders) to a CSV image_name,filepath,target, with the metadata of
--use-meta models from a CSV or from flags:

    python predict.py --images photos/ --meta-csv photos.csv --model-path weights/r1 weights/r2 --out probs.csv
    python predict.py --images lesion.jpg --sex male --age 55 --site torso --model-path weights/meta_best.pth

`target` is always P(melanoma) in [0, 1]. --rank-average (two or more models) writes the column `rank_score`
instead: each model's ranks scaled to (0, 1], averaged; it orders images but is no probability (rename the column
to target for a Kaggle submission). A model exported by export.py scores the same way, with onnxruntime
(--model-path weights/r1_best.onnx, the JSON beside it): the same submission within the export's parity
tolerance, a check of the exported file on your own images.

--split train scores the data folder's train.csv honestly: each image only with the models that held it out
(its name is in the checkpoint's val_images, so the model never trained on it), e.g. every image with the one
fold model of a --fold all run that validated on it. Images that every model trained on are dropped (their
count is printed); a column n_models says how many models scored each image. A refit (train.py --fold none)
trained on every image and is refused there; for test images its prefix takes its _final.pth.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from melanoma_audit.cli import (
    MAX_TTA,
    add_allow_missing_meta_flag,
    add_overwrite_flag,
    add_runtime_args,
    claim_file,
    scoring_runtime,
)
from melanoma_audit.features import lesion_features
from melanoma_audit.inference import LoadedModel, Predictor, combine, held_out_images, load_melanoma_models
from melanoma_audit.onnx_model import scoring_predictor
from melanoma_audit.scoring_inputs import attach_metadata, frame_from_images, require_metadata
from melanoma_audit.tables import AGE_RULE, MAX_AGE, SEX_SPELLINGS, SITE_COLUMN, read_melanoma_table
from utils import (
    UserError,
    exit_on_user_error,
    write_csv_atomic,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model-path",
        nargs="+",
        required=True,
        help="checkpoint(s) from train.py, <model-dir>/<save-name> of a run (all its folds), or .onnx files from "
        "export.py (with the JSON beside each)",
    )
    parser.add_argument(
        "--which",
        default="best",
        choices=("best", "final", "last"),
        help="checkpoint of a run (a refit, train.py --fold none, has no best: its final is taken)",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data-dir", help="Kaggle-layout folder: predicts <data-dir>/test.csv")
    source.add_argument("--images", nargs="+", help="image files and/or folders of images")
    parser.add_argument(
        "--split",
        default="test",
        choices=("test", "train"),
        help="with --data-dir: which CSV; train scores each image only with the models that held it out",
    )
    parser.add_argument("--meta-csv", help="with --images: CSV of image_name, sex, age_approx, site (, patient_id)")
    parser.add_argument(
        "--sex", type=sex_flag, help="with --images: the same sex for every image, male or female (M/F also do)"
    )
    parser.add_argument("--age", type=float, help="with --images: the same age for every image")
    parser.add_argument("--site", help="with --images: the same anatomical site for every image, e.g. torso")
    add_allow_missing_meta_flag(parser)
    parser.add_argument("--n-tta", type=int, default=1, help=f"dihedral test-time augmentations, 1..{MAX_TTA}")
    parser.add_argument(
        "--rank-average",
        action="store_true",
        help="ensemble two or more models by mean rank instead of probability (column rank_score, not target)",
    )
    parser.add_argument("--out", default="submission.csv", help="output CSV (default submission.csv)")
    add_overwrite_flag(parser, "an existing --out")
    add_runtime_args(parser)
    args = parser.parse_args(argv)
    if args.data_dir and (args.meta_csv or args.sex or args.age is not None or args.site):
        parser.error("--meta-csv, --sex, --age and --site go with --images; --data-dir reads its own test.csv")
    return args


def sex_flag(text: str) -> str:
    """--sex in any of the spellings the metadata encoding reads (SEX_SPELLINGS), as its canonical value."""
    sex = SEX_SPELLINGS.get(text.strip().lower())
    if sex is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a sex: use male or female (M/F also do), or leave --sex out when it is not known"
        )
    return sex


def held_out_rows(frame: pd.DataFrame, models: list[LoadedModel], source: str) -> tuple[pd.DataFrame, np.ndarray]:
    """The rows of a training CSV that at least one model held out, and a (model, row) mask of the models that
    held each out: a model scores only images it did not train on. Rows every model trained on are dropped."""
    fix = "score images you choose with --images and --meta-csv"
    held_out = np.stack([frame["image_name"].isin(held_out_images(m, fix)).to_numpy() for m in models])
    kept = held_out.any(axis=0)
    if not kept.any():
        raise UserError(
            f"no model held out any image of {source}: --split train scores only images a model did not train "
            "on; score other images with --images and --meta-csv."
        )
    if not kept.all():
        print(f"--split train: dropped {int((~kept).sum())} of {len(frame)} images every model trained on", flush=True)
    return frame[kept].reset_index(drop=True), held_out[:, kept]


def scored_images(args: argparse.Namespace, models: list[LoadedModel]) -> tuple[pd.DataFrame, np.ndarray | None]:
    """The rows to score (image_name, filepath, metadata) with the metadata the models need, and with --split train
    the (model, row) mask of which models may score each row (held_out_rows), else None."""
    if args.data_dir:
        frame = read_melanoma_table(args.data_dir, args.split, use_meta=False, require_target=False)
        source = f"the {args.split} CSV of {args.data_dir}"
    else:
        values = {"sex": args.sex, "age_approx": args.age, SITE_COLUMN: args.site}
        frame = attach_metadata(frame_from_images(args.images), args.meta_csv, values)
        source = str(args.meta_csv) if args.meta_csv else "the command line"
    held_out = None
    if args.data_dir and args.split == "train":
        frame, held_out = held_out_rows(frame, models, source)
    flags = {"sex": ("--sex", args.sex), SITE_COLUMN: ("--site", args.site)}
    given = {column: flag for column, (flag, value) in flags.items() if value is not None}
    require_metadata(frame, models, args.allow_missing_meta, source, given)
    return frame, held_out


def model_probabilities(
    predictors: list[Predictor], frame: pd.DataFrame, held_out: np.ndarray | None
) -> list[np.ndarray]:
    """Each predictor's P(melanoma) per row of `frame`; NaN where `held_out` says it may not score the row."""
    # models that read lesion features under the same preprocessing read the same ones: compute them once
    lesion = {
        preprocessing: lesion_features(list(frame["filepath"]), preprocessing=preprocessing)
        for preprocessing in dict.fromkeys(p.preprocessing for p in predictors if p.uses_lesion_features)
    }
    probabilities = []
    for index, predictor in enumerate(predictors):
        rows = held_out[index] if held_out is not None else np.ones(len(frame), dtype=bool)
        probs = np.full(len(frame), np.nan)  # NaN: not scored by this model, left out of the row's mean
        if rows.any():
            # over every row: a patient's images are counted in full (an exported model encodes its own)
            meta = predictor.encode_metadata(frame)
            probs[rows] = predictor.probabilities(
                frame[rows].reset_index(drop=True),
                lesion=lesion[predictor.preprocessing][rows] if predictor.uses_lesion_features else None,
                meta=None if meta is None else meta[rows],
            )
            scope = f" on the {int(rows.sum())} images it held out" if held_out is not None else ""
            print(f"  {predictor.path}: mean P(melanoma) {np.nanmean(probs):.4f}{scope}", flush=True)
        else:
            print(f"  {predictor.path}: held out none of these images, not used", flush=True)
        probabilities.append(probs)
    return probabilities


def write_result(
    args: argparse.Namespace, frame: pd.DataFrame, score: np.ndarray, held_out: np.ndarray | None, out: Path
) -> pd.DataFrame:
    """Writes the predictions CSV (image_name, filepath with --images, target or rank_score, n_models with
    --split train) and prints its summary."""
    result = pd.DataFrame({"image_name": frame["image_name"]})
    if not args.data_dir:
        result["filepath"] = frame["filepath"]
    result["rank_score" if args.rank_average else "target"] = score
    if held_out is not None:
        result["n_models"] = held_out.sum(axis=0)
    write_csv_atomic(result, out)
    if args.rank_average:  # ranks say nothing about a threshold of 0.5
        summary = "column rank_score: mean ranks in (0, 1], not probabilities"
    else:
        summary = f"{int(np.sum(score >= 0.5))} at or above 0.5, mean {score.mean():.4f}"
    print(f"wrote {out}: {len(result)} rows, {summary}", flush=True)
    return result


def main(argv: list[str] | None = None) -> pd.DataFrame:
    args = parse_args(argv)
    with exit_on_user_error():
        out = Path(args.out)
        claim_file(out, args.overwrite)
        if args.age is not None and not 0 <= args.age <= MAX_AGE:  # also refuses nan
            raise UserError(f"--age {args.age:g} is not an age: {AGE_RULE}; leave --age out when it is unknown.")
        runtime = scoring_runtime(args)
        # a run prefix's fold checkpoints must be one run: one split, each fold once (check_one_split)
        predictors = load_melanoma_models(args.model_path, args.which, runtime, scoring_predictor)
        if args.rank_average and len(predictors) < 2:
            raise UserError(
                f"--rank-average ensembles two or more models, --model-path gives {len(predictors)}: leave it out "
                "to write the model's P(melanoma)."
            )
        frame, held_out = scored_images(args, [predictor.loaded for predictor in predictors])
        print(
            f"{len(frame)} images, {len(predictors)} model(s), {args.n_tta} TTA view(s) each, on {runtime.device}"
            f"{', rank average' if args.rank_average else ''}",
            flush=True,
        )
        score = combine(model_probabilities(predictors, frame, held_out), args.rank_average)
        return write_result(args, frame, score, held_out, out)


if __name__ == "__main__":
    main()
