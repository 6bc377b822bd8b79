"""Bias audit of a melanoma model: how well it does on images with and without each artifact, and how its
predictions move when a synthetic artifact is pasted onto images that have none.

    python audit.py --model-path weights/r1_best.pth --data-dir ../shared/data/isic2018/ \
        --artifacts ../shared/data/isic2018/bias.csv --out audit_r1.csv
    python audit.py --model-path weights/r1_best.pth --images photos/ --meta-csv photos.csv \
        --artifacts annotations.csv      # labelled CSV (image_name, target, metadata) + images + artifact labels

--artifacts takes the output of `multi_classification.py --mode test` or any annotation file it reads (headerless
gans_biases.csv lines, or a header naming the artifact columns, first column the image name; `*_prob` columns
are ignored). With --data-dir, only the images of the train split that the model held out are audited: those
named in the checkpoint's val_images, exactly the rows of the run's out-of-fold file logs/oof_<run>.csv (the model
may have trained on the others). --all-rows audits every image, e.g. of a folder the model never saw; --images
audits exactly the images given.

One table, printed and written to --out as CSV (reproducible for a given --seed):

    artifact, test, images, melanoma, auc, sensitivity, specificity at --threshold, and for the counterfactual
    rows benign_to_malignant, malignant_to_benign (predictions that cross --threshold) and mean_shift (mean
    change of P(melanoma)).

test is `all` (every audited image), `with` / `without` (images labelled 1 / 0 for that artifact), or
`inserted <kind>`: the images without that artifact (the `without` row's images), each with a synthetic
black_frame, ruler or hair pasted on (drawn by synthetic_artifacts.py, as in the synthetic data, on a 256 px
canvas, seeded per image).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from dataset import square_image, valid_transforms
from melanoma_audit.annotations import read_artifact_annotations
from melanoma_audit.cli import (
    add_allow_missing_meta_flag,
    add_overwrite_flag,
    add_runtime_args,
    claim_file,
    scoring_runtime,
)
from melanoma_audit.features import lesion_features
from melanoma_audit.inference import LoadedModel, MelanomaPredictor, held_out_images
from melanoma_audit.metrics import binary_metrics
from melanoma_audit.result_files import AUDIT_COLUMNS as COLUMNS
from melanoma_audit.scoring_inputs import attach_metadata, frame_from_images, image_name, require_metadata
from melanoma_audit.synthetic_artifacts import HAIR_KINDS, draw_black_frame, draw_hair, draw_ruler
from melanoma_audit.tables import read_melanoma_table
from utils import UserError, exit_on_user_error, write_csv_atomic

# artifact kinds that can be pasted, and the label columns that mean "this image already has it"
INSERTIONS = {
    "black_frame": ("black_frame", "dark_corner"),
    "ruler": ("ruler_mark", "ruler"),
    "hair": ("hair", *HAIR_KINDS),
}
CANVAS = 256  # artifacts are drawn at the resolution of the Kaggle images and the synthetic data, then resized


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", required=True, help="melanoma checkpoint from train.py")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data-dir", help="Kaggle-layout folder with train.csv and train/train/*.jpg")
    source.add_argument("--images", help="folder of images, with --meta-csv holding image_name and target")
    parser.add_argument("--meta-csv", help="with --images: CSV of image_name, target (0/1) and the metadata")
    parser.add_argument("--artifacts", "--ann_path", required=True, help="artifact labels (see above)")
    parser.add_argument("--all-rows", action="store_true", help="audit every row, also the model's training rows")
    parser.add_argument(
        "--insert",
        default=",".join(INSERTIONS),
        help=f"comma list of artifacts to paste, from {','.join(INSERTIONS)} ('' for none)",
    )
    parser.add_argument("--threshold", type=float, default=0.5, help="decision threshold on P(melanoma)")
    parser.add_argument("--n-tta", type=int, default=1, help="dihedral test-time augmentations, 1..8")
    add_allow_missing_meta_flag(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of the pasted artifacts")
    parser.add_argument("--out", default="audit.csv", help="the table as CSV (default audit.csv)")
    add_overwrite_flag(parser, "an existing --out")
    add_runtime_args(parser)
    args = parser.parse_args(argv)
    if args.images and not args.meta_csv:
        parser.error("--images needs --meta-csv with image_name and target")
    return args


# --------------------------------------------------------------------------- pasting artifacts


def paste_artifact(image: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """A copy of a square RGB uint8 image with a synthetic artifact drawn on, as the synthetic data has them."""
    canvas = image.astype(np.float32)
    if kind == "black_frame":
        draw_black_frame(rng, canvas)
    elif kind == "ruler":
        draw_ruler(rng, canvas)
    elif kind == "hair":
        draw_hair(rng, canvas, "hair_medium")
    else:
        raise ValueError(f"unknown artifact {kind!r}")
    return np.clip(canvas + 0.5, 0, 255).astype(np.uint8)


class PasteThenTransform:
    """Makes the image square by the model's `resize_mode`, resizes it to a square canvas, pastes `kind` (None:
    nothing), then applies `then` (the model's own transform). Colour constancy, in `then`, comes after the paste:
    a real artifact is part of the image whose illuminant is estimated.

    Used as an ImageDataset transform: with the dataset's augment_seed, ImageDataset hands each image a generator
    seeded by (seed, index), so every image gets the same artifact on every run, with any number of workers."""

    def __init__(self, kind: str | None, canvas: int, then, resize_mode: str = "stretch") -> None:
        self.kind, self.canvas, self.then, self.resize_mode = kind, canvas, then, resize_mode
        self.rng: np.random.Generator | None = None

    def set_random_state(self, generator: np.random.Generator, py_random=None) -> None:
        self.rng = generator

    def __call__(self, *, image: np.ndarray) -> dict:
        image = square_image(image, self.resize_mode)
        if image.shape[:2] != (self.canvas, self.canvas):
            image = cv2.resize(image, (self.canvas, self.canvas), interpolation=cv2.INTER_AREA)
        if self.kind is not None:
            if self.rng is None:
                raise RuntimeError("PasteThenTransform needs an ImageDataset with augment_seed")
            image = paste_artifact(image, self.kind, self.rng)
        return self.then(image=image)


# --------------------------------------------------------------------------- inputs


def audited_rows(args: argparse.Namespace, loaded: LoadedModel) -> tuple[pd.DataFrame, Path, str]:
    """The labelled images to audit (image_name, filepath, target, metadata), their folder, and a description."""
    if args.images:
        frame = attach_metadata(frame_from_images([args.images]), args.meta_csv)
        if "target" not in frame.columns:
            raise UserError(f"{args.meta_csv} lacks the column target: the audit needs 0/1 melanoma labels.")
        target = pd.to_numeric(frame["target"], errors="coerce")
        if not target.isin([0, 1]).all():
            bad = frame["image_name"][~target.isin([0, 1])].iloc[0]
            raise UserError(f"{args.meta_csv} has no 0/1 target for image {bad}: label every image 0 or 1.")
        frame["target"] = target.astype(int)
        return frame, Path(args.images), f"{len(frame)} images of {args.images}"

    data_dir = Path(args.data_dir)
    frame = read_melanoma_table(data_dir, "train", use_meta=False, require_target=True)
    if args.all_rows:
        return frame, data_dir / "train" / "train", f"all {len(frame)} images of {data_dir} (--all-rows)"
    # the images the checkpoint lists as its validation fold, matched by name: a moved or copied data folder, or
    # one that shares images with the training folder, can then never pass training images off as held-out ones
    names = held_out_images(loaded, "pass --all-rows to audit every image")
    held_out = frame["image_name"].isin(names).to_numpy()
    if not held_out.any():
        raise UserError(
            f"{loaded.path} held out none of the images of {data_dir / 'train.csv'}: pass --all-rows to audit "
            "images it never trained on."
        )
    absent = len(names) - int(held_out.sum())
    described = (
        f"the {int(held_out.sum())} held-out images of fold {loaded.info['fold']} of {len(frame)} in {data_dir} "
        f"(the model may have trained on the rest; --all-rows for all)"
        f"{f'; {absent} of its validation images are not in train.csv' if absent else ''}"
    )
    frame = frame[held_out].reset_index(drop=True)
    return frame, data_dir / "train" / "train", described


def artifact_labels(path: str, image_dir: Path, names: pd.Series) -> tuple[pd.DataFrame, list[str]]:
    """The annotation file's 0/1 labels (NaN: not annotated) aligned with `names`."""
    annotations, heads, labels = read_artifact_annotations(path, image_dir)
    table = pd.DataFrame(labels, columns=heads)
    table.index = [image_name(name) for name in annotations["image_name"]]
    repeated = table.index.duplicated()
    if repeated.any():  # e.g. ISIC_1.jpg and ISIC_1.png: which of the two is the image of train.csv's row ISIC_1?
        second = int(np.flatnonzero(repeated)[0])
        first = int(np.flatnonzero(table.index == table.index[second])[0])
        raise UserError(
            f"{path} labels two files of image {table.index[second]}, {annotations['image_name'].iloc[first]} (line "
            f"{annotations['line'].iloc[first]}) and {annotations['image_name'].iloc[second]} (line "
            f"{annotations['line'].iloc[second]}): keep the line of the file the model scores."
        )
    aligned = table.reindex(names.tolist()).reset_index(drop=True)
    if aligned.isna().all(axis=None):
        raise UserError(f"{path} labels none of the audited images: pass the artifact labels of these images.")
    return aligned, heads


# --------------------------------------------------------------------------- the table


def metric_row(artifact: str, test: str, targets: np.ndarray, probs: np.ndarray, threshold: float) -> dict:
    metrics = binary_metrics(targets, probs, threshold) if len(targets) else {}
    return {
        "artifact": artifact,
        "test": test,
        "images": len(targets),
        "melanoma": int(np.sum(targets)),
        **{key: metrics.get(key, np.nan) for key in ("auc", "sensitivity", "specificity")},
    }


@dataclass
class PastedScoring:
    """Scores subsets of the audited rows with an artifact pasted on (or none). The lesion features and the
    metadata encoding are computed once for every audited row: the features from the files, so pasted artifacts do
    not reach them (docs/training.md), and the encoding over all rows, as a subset's own would recount each
    patient's images."""

    predictor: MelanomaPredictor
    frame: pd.DataFrame
    lesion: np.ndarray | None
    meta: np.ndarray | None

    @classmethod
    def of(cls, predictor: MelanomaPredictor, frame: pd.DataFrame) -> PastedScoring:
        loaded = predictor.loaded
        files = list(frame["filepath"])
        lesion = lesion_features(files, preprocessing=loaded.preprocessing) if loaded.feature_scaler else None
        return cls(predictor, frame, lesion, predictor.encode_metadata(frame))

    def probabilities(self, index: np.ndarray, kind: str | None, seed: int | None) -> np.ndarray:
        """P(melanoma) of the rows `index` with `kind` pasted (None: nothing), each image's artifact drawn from
        `seed`. Every image, also the reference, is resized to the same canvas, so only the artifact differs."""
        if not len(index):
            return np.zeros(0)
        loaded = self.predictor.loaded
        base_transform = valid_transforms(loaded.image_size, loaded.mean, loaded.std, loaded.preprocessing)
        canvas = max(CANVAS, loaded.image_size)
        return self.predictor.probabilities(
            self.frame.iloc[index].reset_index(drop=True),
            transform=PasteThenTransform(kind, canvas, base_transform, loaded.preprocessing.resize_mode),
            augment_seed=seed,
            lesion=None if self.lesion is None else self.lesion[index],
            meta=None if self.meta is None else self.meta[index],
        )


def inserted_row(
    args: argparse.Namespace,
    scoring: PastedScoring,
    base: np.ndarray,
    kind: str,
    artifact: str,
    without: np.ndarray,
) -> dict:
    """The counterfactual row: `kind` pasted onto the images labelled `without` the artifact, scored against their
    unedited scores `base` (the flips across the threshold and the mean shift)."""
    targets = scoring.frame["target"].to_numpy()
    index = np.flatnonzero(without)
    seed = args.seed * 1000 + list(INSERTIONS).index(kind)
    pasted = scoring.probabilities(index, kind, seed)
    before, after = base[index], pasted
    row = metric_row(artifact, f"inserted {kind}", targets[index], pasted, args.threshold)
    if not len(index):  # every audited image has the artifact already: nothing to paste it onto
        print(f"notice: no audited image is labelled without {artifact}: inserted {kind} is not measurable.")
        return row
    row["benign_to_malignant"] = int(np.sum((before < args.threshold) & (after >= args.threshold)))
    row["malignant_to_benign"] = int(np.sum((before >= args.threshold) & (after < args.threshold)))
    row["mean_shift"] = float(np.mean(after - before))
    return row


def run_audit(
    args: argparse.Namespace, predictor: MelanomaPredictor, frame: pd.DataFrame, labels: pd.DataFrame, heads: list[str]
) -> pd.DataFrame:
    """The audit table: overall, with / without each labelled artifact, and the pasted (counterfactual) rows."""
    scoring = PastedScoring.of(predictor, frame)
    targets = frame["target"].to_numpy()
    base = scoring.probabilities(np.arange(len(frame)), None, None)
    rows = [metric_row("(all)", "all", targets, base, args.threshold)]
    kinds = [kind for kind in args.insert.split(",") if kind]
    for head in heads:
        values = labels[head].to_numpy()
        for test, mask in (("with", values == 1), ("without", values == 0)):
            rows.append(metric_row(head, test, targets[mask], base[mask], args.threshold))
        for kind in kinds:
            related = [h for h in heads if h in INSERTIONS[kind]]
            if related and related[-1] == head:  # after the last label column of that artifact
                without = (labels[related] == 0).all(axis=1).to_numpy()
                rows.append(inserted_row(args, scoring, base, kind, "|".join(related), without))
    for kind in kinds:
        if not any(h in INSERTIONS[kind] for h in heads):  # no label says which images have it: paste onto all
            everything = np.ones(len(frame), dtype=bool)
            rows.append(inserted_row(args, scoring, base, kind, f"{kind} (unlabelled)", everything))
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    # counts stay integers, blank where they do not apply
    return table.astype({"benign_to_malignant": "Int64", "malignant_to_benign": "Int64"})


def format_table(table: pd.DataFrame) -> str:
    shown = table.copy()
    for column in ("benign_to_malignant", "malignant_to_benign"):
        shown[column] = shown[column].map(lambda v: "" if pd.isna(v) else str(int(v)))
    for column in ("auc", "sensitivity", "specificity"):
        shown[column] = shown[column].map(lambda v: "" if pd.isna(v) else f"{v:.3f}")
    shown["mean_shift"] = shown["mean_shift"].map(lambda v: "" if pd.isna(v) else f"{v:+.4f}")
    return shown.to_string(index=False)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    args = parse_args(argv)
    with exit_on_user_error():
        out = Path(args.out)
        claim_file(out, args.overwrite, example="audit.csv")
        unknown = [kind for kind in args.insert.split(",") if kind and kind not in INSERTIONS]
        if unknown:
            raise UserError(
                f"--insert {unknown[0]!r} is not an artifact I can paste: choose from {', '.join(INSERTIONS)}."
            )
        if args.seed < 0:
            raise UserError(f"--seed {args.seed} is negative: use 0 or more.")
        if not 0.0 <= args.threshold <= 1.0:
            raise UserError(f"--threshold {args.threshold} is outside 0..1: it applies to P(melanoma).")
        predictor = MelanomaPredictor.from_checkpoint(args.model_path, scoring_runtime(args))
        loaded = predictor.loaded
        frame, image_dir, described = audited_rows(args, loaded)
        source = args.meta_csv if args.images else f"the train CSV of {args.data_dir}"
        require_metadata(frame, [loaded], args.allow_missing_meta, source)
        labels, heads = artifact_labels(args.artifacts, image_dir, frame["image_name"])
        unlabelled = int(labels.isna().all(axis=1).sum())
        print(
            f"auditing {loaded.path} on {described}, {int(frame['target'].sum())} melanoma"
            f"{f'; {unlabelled} image(s) without artifact labels' if unlabelled else ''}; threshold {args.threshold}, "
            f"seed {args.seed}",
            flush=True,
        )
        table = run_audit(args, predictor, frame, labels, heads)
        write_csv_atomic(table, out)
        print(format_table(table), f"\nwrote {out}", sep="", flush=True)
        return table


if __name__ == "__main__":
    main()
