"""Synthetic dermoscopy-like data in the Kaggle "melanoma-external-malignant-256" layout.

    python synthetic.py OUT_DIR [--n-train 400] [--n-test 100] [--image-size 256] [--seed 0] [--odd-one-out]

writes OUT_DIR/train.csv, test.csv, train/train/*.jpg, test/test/*.jpg, gans_biases.csv and synthetic.json: what
they hold and how they are drawn is synthetic_dataset.py's docstring. OUT_DIR must be new or empty, or hold an
earlier synthetic data set (replaced with --overwrite, which deletes only the files it lists).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

from melanoma_audit.cli import add_overwrite_flag
from melanoma_audit.synthetic_dataset import make_synthetic_dataset
from utils import exit_on_user_error


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the command line: OUT_DIR [--n-train N] [--n-test N] [--image-size PX] [--seed S] [--odd-one-out]."""
    parser = argparse.ArgumentParser(description=(__doc__ or "Synthetic dermoscopy data.").splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="folder for the CSVs and images")
    parser.add_argument("--n-train", type=int, metavar="N", default=400, help="train images (400)")
    parser.add_argument("--n-test", type=int, metavar="N", default=100, help="test images (100)")
    parser.add_argument("--image-size", type=int, metavar="PX", default=256, help="image side (256)")
    parser.add_argument("--seed", type=int, metavar="S", default=0, help="random seed (0)")
    add_overwrite_flag(parser, "an earlier synthetic data set in OUT_DIR")
    parser.add_argument(
        "--odd-one-out", action="store_true", help="patients whose lesions look alike, but for one melanoma"
    )
    args = parser.parse_args(argv)
    if args.n_train < 0 or args.n_test < 0:
        parser.error("--n-train and --n-test must be >= 0")
    if args.image_size < 16:
        parser.error("--image-size must be at least 16")
    if args.seed < 0:
        parser.error("--seed must be >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: generates the data set and prints a one-line summary."""
    args = parse_args(argv)
    start = time.perf_counter()
    with exit_on_user_error():
        out = make_synthetic_dataset(
            args.out_dir,
            n_train=args.n_train,
            n_test=args.n_test,
            image_size=args.image_size,
            seed=args.seed,
            overwrite=args.overwrite,
            odd_one_out=args.odd_one_out,
        )
    print(
        f"wrote {args.n_train} train + {args.n_test} test images ({args.image_size} px) to {out} "
        f"in {time.perf_counter() - start:.1f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
