"""Compare models on the same images: each file's ROC AUC with DeLong's 95 % interval, and each pair of recipes'
AUC difference with a paired bootstrap interval over patients and DeLong's paired test.

    python compare.py logs/oof_lite0_128.csv logs/oof_b0_64.csv --data-dir ./melanoma_external_256/
    python compare.py --recipe lite0 logs/oof_lite0_s0.csv logs/oof_lite0_s1.csv \\
        --recipe b0 logs/oof_b0_s0.csv logs/oof_b0_s1.csv --data-dir ./melanoma_external_256/ --out compare.json
    python compare.py lite0=sub_s0.csv,sub_s1.csv b0=sub_b0.csv --labels test_labels.csv

A file is train.py's out-of-fold CSV (image_name, fold, target, prob) or any CSV with image_name and a score:
`prob` beside a 0/1 `target`, or a predict.py output whose `target` is the score, with the labels from --labels
(image_name, target). Every file must hold the same images, each once, with the same labels. A recipe is one or
more files of the same training recipe (e.g. seeds): it gets the mean and spread (SD, min-max) of its files'
AUCs, and recipes are compared on their files' averaged predictions (the mean probability per image). A file
given alone is a recipe of one, named after the file.

DeLong's interval and test treat images as independent; the bootstrap interval of a difference resamples
patients (all images of a patient together: a patient_id column of the files, or of --labels for files that take
their labels from it, else of --data-dir's train.csv; a row without one is a patient of its own), so it also
holds when patients have many images.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.stats

from melanoma_audit.cli import add_overwrite_flag, claim_file
from melanoma_audit.metrics import format_table
from melanoma_audit.patients import patient_groups
from melanoma_audit.report_metrics import group_bootstrap, json_ready, percentile_interval, weighted_auc
from melanoma_audit.result_files import attach_patients, read_metadata, read_predictions
from melanoma_audit.tables import read_csv
from utils import UserError, exit_on_user_error, write_text_atomic

Z_95 = float(scipy.stats.norm.ppf(0.975))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "files",
        nargs="*",
        metavar="FILE|NAME=FILE,FILE",
        help="a prediction file (a recipe of its own), or a recipe's name and its files",
    )
    parser.add_argument(
        "--recipe",
        nargs="+",
        action="append",
        default=[],
        metavar=("NAME", "FILE"),
        help="a recipe's name and its prediction files (e.g. one per seed); once per recipe, after any plain "
        "FILE (it takes every value up to the next flag)",
    )
    parser.add_argument("--labels", help="CSV with image_name and 0/1 target, for files without a prob column")
    parser.add_argument("--data-dir", help="Kaggle-layout folder whose train.csv holds the patient ids")
    parser.add_argument(
        "--n-bootstrap",
        type=int,
        default=1000,
        help="resamples (of patients where known) for the difference intervals (default 1000)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    parser.add_argument("--out", help="JSON file of every number printed")
    add_overwrite_flag(parser, "an existing --out")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- DeLong


def delong_placements(targets: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The AUC of each row of `scores` (classifiers x images) and DeLong's structural components: V10, for each
    classifier and positive, the share of negatives it outscores (ties count half); V01, for each negative, the
    share of positives that outscore it. The fast form of Sun & Xu (2014): midranks instead of all m x n pairs,
    O(n log n). Hand-written: scikit-learn has no DeLong, and scipy only the midranks (rankdata)."""
    scores = np.atleast_2d(np.asarray(scores, dtype=float))
    positive = np.asarray(targets) == 1
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    pos, neg = scores[:, positive], scores[:, ~positive]
    rank_all = scipy.stats.rankdata(np.concatenate([pos, neg], axis=1), axis=1)  # midranks: ties share the mean
    rank_pos, rank_neg = scipy.stats.rankdata(pos, axis=1), scipy.stats.rankdata(neg, axis=1)
    # a positive's rank among all, less its rank among the positives, counts the negatives below it (ties half)
    v10 = (rank_all[:, :n_pos] - rank_pos) / n_neg
    v01 = 1.0 - (rank_all[:, n_pos:] - rank_neg) / n_pos
    return v10.mean(axis=1), v10, v01


def delong_covariance(targets: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The AUCs of the classifiers (rows of `scores`) and their covariance matrix, S10 / m + S01 / n."""
    aucs, v10, v01 = delong_placements(targets, scores)
    s10, s01 = np.atleast_2d(np.cov(v10)), np.atleast_2d(np.cov(v01))
    return aucs, s10 / v10.shape[1] + s01 / v01.shape[1]


def delong_interval(auc: float, variance: float) -> list[float]:
    """The normal 95 % interval of an AUC from DeLong's variance, within [0, 1]."""
    half = Z_95 * np.sqrt(max(variance, 0.0))
    return [float(max(0.0, auc - half)), float(min(1.0, auc + half))]


def delong_test(targets: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray) -> dict[str, float]:
    """DeLong's paired test of AUC(a) = AUC(b) on the same images: the difference, z and the two-sided p-value
    (1 when the two score the images identically)."""
    aucs, cov = delong_covariance(targets, np.stack([scores_a, scores_b]))
    difference = float(aucs[0] - aucs[1])
    variance = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    if variance <= 0:
        return {"difference": difference, "z": 0.0 if difference == 0 else np.inf, "p": float(difference == 0)}
    z = difference / np.sqrt(variance)
    return {"difference": difference, "z": float(z), "p": float(2 * scipy.stats.norm.sf(abs(z)))}


def bootstrap_difference(
    targets: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray, n: int, seed: int, groups: np.ndarray | None
) -> list[float]:
    """Percentile 95 % interval of AUC(a) - AUC(b), both on the same resamples of the patients (paired)."""

    def difference(weight: np.ndarray) -> float:
        return weighted_auc(targets, scores_a, weight) - weighted_auc(targets, scores_b, weight)

    return percentile_interval(group_bootstrap(difference, len(targets), n, seed, groups))


# --------------------------------------------------------------------------- inputs


@dataclass
class Recipe:
    name: str
    paths: list[Path]


def parse_recipes(args: argparse.Namespace) -> list[Recipe]:
    """The recipes of --recipe NAME FILE... and of the positional FILE or NAME=FILE,FILE values, in the given
    order (the --recipe ones first)."""
    recipes = []
    for values in args.recipe:
        if len(values) < 2:
            raise UserError(f"--recipe {values[0]} names no file: give --recipe NAME FILE [FILE ...].")
        recipes.append(Recipe(values[0], [Path(value) for value in values[1:]]))
    for spec in args.files:
        if Path(spec).is_file() or "=" not in spec:
            recipes.append(Recipe(Path(spec).stem, [Path(spec)]))
            continue
        name, files = spec.split("=", 1)
        paths = [Path(file) for file in files.split(",") if file]
        if not name or not paths:
            raise UserError(f"{spec!r} is neither a file nor NAME=FILE[,FILE...]: check the file name.")
        recipes.append(Recipe(name, paths))
    if not recipes:
        raise UserError("no prediction file given: pass the files, NAME=FILE,FILE or --recipe NAME FILE.")
    names = [recipe.name for recipe in recipes]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise UserError(f"two recipes are named {repeated[0]}: name them apart with NAME=FILE or --recipe NAME FILE.")
    return recipes


def read_aligned(paths: list[Path], labels_path: Path | None) -> tuple[pd.DataFrame, np.ndarray]:
    """The first file's images (image_name, target, patient_id where known) and every file's scores (files x
    images) in that order, after checking that all files hold the same images, each once, with the same labels."""
    if labels_path is not None and labels_path.is_file():
        names = read_csv(labels_path).get("image_name", pd.Series(dtype=str))
        if names.duplicated().any():
            raise UserError(
                f"{labels_path} lists image {names[names.duplicated()].iloc[0]} twice: keep one label each."
            )
    reference, scores = None, []
    for path in paths:
        frame = read_predictions(path, labels_path, "the file list")
        repeated = frame["image_name"][frame["image_name"].duplicated()]
        if not repeated.empty:
            raise UserError(f"{path} lists image {repeated.iloc[0]} twice: keep one prediction per image.")
        frame = frame.set_index("image_name")
        if reference is None:
            reference = frame
        else:
            first = paths[0]
            extra, missing = frame.index.difference(reference.index), reference.index.difference(frame.index)
            if len(extra) or len(missing):
                example = extra[0] if len(extra) else missing[0]
                raise UserError(
                    f"{path} and {first} do not hold the same images ({len(extra)} only in {path.name}, "
                    f"{len(missing)} only in {first.name}, e.g. {example}): compare predictions of the same images."
                )
            frame = frame.loc[reference.index]
            differ = frame["target"] != reference["target"]
            if differ.any():
                name = differ.index[differ][0]
                raise UserError(
                    f"{path} gives image {name} target {frame.loc[name, 'target']}, {first} gives "
                    f"{reference.loc[name, 'target']}: compare predictions against the same labels."
                )
        if "patient_id" in frame.columns and "patient_id" not in reference.columns:
            reference = reference.assign(patient_id=frame["patient_id"])
        scores.append(frame["prob"].to_numpy())
    rows = reference.reset_index()[["image_name", "target", *(["patient_id"] if "patient_id" in reference else [])]]
    return rows, np.stack(scores)


# --------------------------------------------------------------------------- the comparison


def compare(
    recipes: list[Recipe], rows: pd.DataFrame, scores: np.ndarray, n_bootstrap: int, seed: int
) -> dict[str, object]:
    """Every number of the comparison. `scores` holds one row per file, the recipes' files in order."""
    targets = rows["target"].to_numpy()
    by_patient = "patient_id" in rows.columns and rows["patient_id"].notna().any()
    groups = patient_groups(rows) if by_patient else None
    aucs, cov = delong_covariance(targets, scores)
    summary, averaged, start = [], [], 0
    for recipe in recipes:
        members = range(start, start + len(recipe.paths))
        start += len(recipe.paths)
        mean_scores = scores[list(members)].mean(axis=0)  # the seeds' mean probability per image
        averaged.append(mean_scores)
        file_aucs = aucs[list(members)]
        ensemble_auc, ensemble_var = delong_covariance(targets, mean_scores)
        summary.append(
            {
                "name": recipe.name,
                "files": [
                    {"path": str(path), "auc": float(aucs[i]), "ci95_delong": delong_interval(aucs[i], cov[i, i])}
                    for path, i in zip(recipe.paths, members, strict=True)
                ],
                "mean_auc": float(file_aucs.mean()),
                "sd_auc": float(file_aucs.std(ddof=1)) if len(file_aucs) > 1 else float("nan"),
                "min_auc": float(file_aucs.min()),
                "max_auc": float(file_aucs.max()),
                "averaged_auc": float(ensemble_auc[0]),
                "averaged_ci95_delong": delong_interval(ensemble_auc[0], ensemble_var[0, 0]),
            }
        )
    comparisons = []
    for (i, a), (j, b) in combinations(enumerate(recipes), 2):
        test = delong_test(targets, averaged[i], averaged[j])
        comparisons.append(
            {
                "a": a.name,
                "b": b.name,
                "auc_difference": test["difference"],
                "ci95_bootstrap": bootstrap_difference(targets, averaged[i], averaged[j], n_bootstrap, seed, groups),
                "delong_z": test["z"],
                "delong_p": test["p"],
            }
        )
    return {
        "n_images": len(rows),
        "n_melanoma": int(targets.sum()),
        "bootstrap_unit": "patient" if by_patient else "image",
        "n_bootstrap_units": len(set(groups)) if by_patient else len(rows),
        "n_bootstrap": n_bootstrap,
        "seed": seed,
        "recipes": summary,
        "comparisons": comparisons,
    }


def interval(values: list[float]) -> str:
    return "-" if any(np.isnan(values)) else f"{values[0]:.4f}-{values[1]:.4f}"


def p_value(p: float) -> str:
    return f"{p:.4f}" if p >= 1e-4 else f"{p:.1e}"


def report(result: dict) -> str:
    """The comparison as tables to read."""
    files = pd.DataFrame(
        [
            {"recipe": r["name"], "file": f["path"], "auc": f["auc"], "95% CI (DeLong)": interval(f["ci95_delong"])}
            for r in result["recipes"]
            for f in r["files"]
        ]
    )
    lines = [
        f"{result['n_images']} images ({result['n_melanoma']} melanoma); bootstrap over "
        f"{result['n_bootstrap_units']} {result['bootstrap_unit']}s, {result['n_bootstrap']} resamples, seed "
        f"{result['seed']}",
        "",
        "each file:",
        format_table(files),
    ]
    if any(len(r["files"]) > 1 for r in result["recipes"]):
        recipes = pd.DataFrame(
            [
                {
                    "recipe": r["name"],
                    "files": len(r["files"]),
                    "mean auc": r["mean_auc"],
                    "sd": r["sd_auc"],
                    "min-max": f"{r['min_auc']:.4f}-{r['max_auc']:.4f}",
                    "auc of mean prediction": r["averaged_auc"],
                    "95% CI (DeLong)": interval(r["averaged_ci95_delong"]),
                }
                for r in result["recipes"]
            ]
        )
        lines += ["", "each recipe (its files' AUCs; and the AUC of their mean probability per image):"]
        lines.append(format_table(recipes))
    if result["comparisons"]:
        pairs = pd.DataFrame(
            [
                {
                    "a": c["a"],
                    "b": c["b"],
                    "auc a - b": f"{c['auc_difference']:+.4f}",
                    f"95% CI ({result['bootstrap_unit']} bootstrap)": interval(c["ci95_bootstrap"]),
                    "DeLong p": p_value(c["delong_p"]),
                }
                for c in result["comparisons"]
            ]
        )
        lines += ["", "each pair of recipes (on the mean prediction of each recipe's files):", format_table(pairs)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with exit_on_user_error():
        if args.n_bootstrap < 1:
            raise UserError(f"--n-bootstrap {args.n_bootstrap} must be at least 1.")
        out = Path(args.out) if args.out else None
        if out is not None:
            claim_file(out, args.overwrite)
        recipes = parse_recipes(args)
        paths = [path for recipe in recipes for path in recipe.paths]
        rows, scores = read_aligned(paths, Path(args.labels) if args.labels else None)
        train_csv = Path(args.data_dir) / "train.csv" if args.data_dir else None
        if "patient_id" not in rows.columns and train_csv is not None and train_csv.is_file():
            rows = attach_patients(rows, read_metadata(train_csv))
        result = compare(recipes, rows, scores, args.n_bootstrap, args.seed)
        print(report(result), flush=True)
        if out is not None:
            write_text_atomic(out, json.dumps(json_ready(result), indent=2) + "\n")
            print(f"wrote {out}", flush=True)
        return result


if __name__ == "__main__":
    main()
