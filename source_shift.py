"""How well two image sources can be told apart from simple image statistics: a "source classifier", gradient
boosting on the colour and shape statistics of the trivial baseline (features.colour_statistics) plus each image's
Shades of Gray illuminant, cross-validated, its out-of-fold ROC AUC with a bootstrap 95 % interval over images.

    python source_shift.py --a ../shared/data/isic2018/train/train --b ../shared/data/ham10000-dev/train/train
    python source_shift.py --a my_training_data/ --b new_clinic_images/ --color-constancy shades-of-gray

0.5: the statistics cannot tell the sources apart; near 1: every image gives its source away, and a model trained
on A meets at B images unlike its training images: measure it there before trusting it. With --color-constancy
the statistics are taken after that correction, showing how much of the difference it removes. The file size and
the pixel dimensions are left out (the network never sees them); a difference in the share of melanoma between
the sources shows up here too, through the lesions' colours.

Each source is a folder of images, or a Kaggle-layout data folder (its train.csv and train/train).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.model_selection import StratifiedKFold, cross_val_predict

from dataset import Preprocessing
from melanoma_audit.color import COLOR_CONSTANCY, DEFAULT_MINKOWSKI_P, illuminant
from melanoma_audit.features import STATS_SIZE, colour_statistics
from melanoma_audit.image_files import list_images, read_image
from melanoma_audit.metrics import safe_auc
from melanoma_audit.report_metrics import bootstrap_auc
from melanoma_audit.tables import read_melanoma_table
from utils import UserError, exit_on_user_error


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", required=True, help="first source: a folder of images or a Kaggle-layout folder")
    parser.add_argument("--b", required=True, help="second source, the same")
    parser.add_argument("--color-constancy", choices=COLOR_CONSTANCY, default="none", help="correct first")
    parser.add_argument("--minkowski-p", type=float, default=DEFAULT_MINKOWSKI_P, help="of Shades of Gray")
    parser.add_argument("--n-folds", type=int, default=5, help="cross-validation folds (default 5)")
    parser.add_argument("--n-bootstrap", type=int, default=1000, help="resamples for the AUC interval")
    parser.add_argument("--seed", type=int, default=0, help="folds, boosting and bootstrap")
    return parser.parse_args(argv)


def source_images(spec: str) -> list[str]:
    """The image files of a source: a Kaggle-layout folder's train split, else every image in the folder."""
    folder = Path(spec)
    if (folder / "train" / "train").is_dir():
        return read_melanoma_table(folder, "train", use_meta=False, require_target=False)["filepath"].tolist()
    try:
        return [str(path) for path in list_images(folder)]
    except UserError:
        raise UserError(
            f"source {folder} is not a folder of images (.jpg, .jpeg, .png, .bmp) nor a Kaggle-layout folder: check "
            "--a and --b."
        ) from None


def illuminants(filepaths: list[str], p: float) -> np.ndarray:
    """Each image's illuminant chromaticity as taken: the Shades of Gray estimate over its sum (r, g, b)."""
    lights = [illuminant(read_image(path, STATS_SIZE), p) for path in filepaths]
    return np.asarray([light / max(light.sum(), 1e-6) for light in lights], dtype=np.float32)


def source_auc(features: np.ndarray, source: np.ndarray, n_folds: int, n_bootstrap: int, seed: int) -> dict:
    """Out-of-fold AUC of gradient boosting telling source 1 from source 0, with its 95 % bootstrap interval.
    Leaves hold at least 20 images as scikit-learn's default, fewer on small sets: there a tree with 20-image
    leaves cannot split at all and would call any two sources indistinguishable."""
    n_train = len(source) * (n_folds - 1) // n_folds
    boosting = HistGradientBoostingClassifier(
        max_iter=200,
        learning_rate=0.05,
        max_leaf_nodes=15,
        min_samples_leaf=int(np.clip(n_train // 20, 2, 20)),
        l2_regularization=1.0,
        random_state=seed,
    )
    folds = StratifiedKFold(n_folds, shuffle=True, random_state=seed)
    probs = cross_val_predict(boosting, features, source, cv=folds, method="predict_proba")[:, 1]
    low, high = bootstrap_auc(source, probs, n_bootstrap, seed)
    return {"auc": safe_auc(source, probs), "low": low, "high": high}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with exit_on_user_error():
        preprocessing = Preprocessing(args.color_constancy, args.minkowski_p)
        sources = [source_images(args.a), source_images(args.b)]
        smaller = min(len(files) for files in sources)
        if not 2 <= args.n_folds <= smaller:
            raise UserError(
                f"--n-folds {args.n_folds} needs 2 or more folds and at least as many images in each source (the "
                f"smaller has {smaller}): lower --n-folds or add images."
            )
        stats = np.concatenate([colour_statistics(files, preprocessing=preprocessing) for files in sources])
        lights = [illuminants(files, args.minkowski_p) for files in sources]
        # after colour constancy every image's illuminant is grey: nothing left to tell the sources apart by
        features = stats if args.color_constancy != "none" else np.concatenate([stats, np.concatenate(lights)], 1)
        source = np.repeat([0, 1], [len(files) for files in sources])
        result = source_auc(features, source, args.n_folds, args.n_bootstrap, args.seed)
        light_a, light_b = ("(" + ", ".join(f"{v:.3f}" for v in part.mean(0)) + ")" for part in lights)
        corrected = ", after Shades of Gray" if args.color_constancy != "none" else ""
        print(
            f"source classifier AUC {result['auc']:.3f} (95% CI {result['low']:.3f}-{result['high']:.3f}) telling "
            f"{len(sources[1])} images of {args.b} from {len(sources[0])} of {args.a}{corrected}, {args.n_folds}-fold "
            "cross-validated (0.5: indistinguishable, 1: every image gives its source away); mean illuminant "
            f"chromaticity (r, g, b) as taken {light_a} in A, {light_b} in B",
            flush=True,
        )
        return {**result, "n_a": len(sources[0]), "n_b": len(sources[1])}


if __name__ == "__main__":
    main()
