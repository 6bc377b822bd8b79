"""Train, evaluate and apply the artifact detector ("biases" in the annotation file's name): one binary head per
artifact type.

    python multi_classification.py --img_path DIR --ann_path gans_biases.csv --mode train --model_path M.pth
    python multi_classification.py --img_path DIR --ann_path gans_biases.csv --mode val --model_path M.pth
    python multi_classification.py --img_path DIR --mode test --model_path M.pth --save_path annotations.csv
    python multi_classification.py --img_path DIR --mode test --model_path M1.pth M2.pth --n-tta 8 \
        --save_path annotations.csv

The heads come from the annotation file: the original headerless form
`image.jpg,hair_dense,hair_short,hair_medium,black_frame,ruler_mark,other`, or a CSV whose header names the heads
(first column the image, with or without extension). A blank cell means "not annotated": it is left out of that
head's loss and metrics.

Each head is one sigmoid logit trained with binary cross-entropy (averaged over the annotated cells of a batch):
artifacts are independent and may co-occur, and one logit per head is the multi-label form of a binary softmax.

train  splits the annotations into train and val (--ratio, seeded, stratified on the label combination where
       possible), keeps the epoch with the best mean val ROC AUC in --model_path together with its head names,
       image size, normalisation, the val image names and one threshold per head: the cut-off with the highest
       F1 on the val split (these numbers on the val split itself are therefore slightly optimistic). Also writes
       <model>_last.pth (resumable with --resume) and <model>_history.csv (per-head metrics of every epoch).
val    scores the images of --ann_path that the model did not train on, by name, whatever file they come from: the
       checkpoint lists its training and val images (--all scores every row). Per head: ROC AUC, average precision,
       F1, precision, recall, accuracy at the threshold, support, and thresholds_in_sample: true where the model's
       own thresholds were fitted on scored images (its val split), which makes F1, precision, recall and accuracy
       optimistic (--threshold sets one of your own). Printed, and written to --save_path (default
       <model>_metrics.csv; an existing file is replaced only with --overwrite).
test   labels every image in --img_path (jpg, jpeg, png, bmp; sorted by name) and writes --save_path (default
       <model>_annotations.csv): image_name,<head>,...,<head>_prob,... with 0/1 decisions at the stored thresholds
       (or --threshold) and the probabilities. The file reads back as --ann_path (the _prob columns are ignored).
val and test take --n-tta 1..8 (each head's probability averaged over the dihedral views of the image) and
several --model_path files with the same heads (each head's probability averaged over the models, the threshold
the mean of theirs; --save_path is then required). val on a file some of them were trained on scores only the
images that every one of those held out (their val splits differ with --seed).
The training flags (--n-epochs, --batch-size, --init-lr, ...) are train.py's; --epochs, --batch and --lr still work.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from melanoma_audit.annotations import PROB_SUFFIX, read_artifact_annotations
from melanoma_audit.cli import ScoringRuntime, claim_file, runtime_from_flags, training_runtime
from melanoma_audit.config import ArtifactConfig
from melanoma_audit.detector_inference import ArtifactEnsemble, ArtifactPredictor
from melanoma_audit.detector_training import run_train
from melanoma_audit.image_files import list_images
from melanoma_audit.metrics import format_table, mean_auc, metrics_table
from melanoma_audit.scoring_inputs import image_name
from melanoma_audit.trainer_flags import add_artifact_flags, parse_command_line
from utils import (
    UserError,
    exit_on_user_error,
    refuse_folder,
    resolve_precision,
    select_device,
    set_visible_devices,
    write_csv_atomic,
)


def parse_args(argv: list[str] | None = None) -> ArtifactConfig:
    return parse_command_line(__doc__, add_artifact_flags, ArtifactConfig, argv)


# --------------------------------------------------------------------------- pieces


def default_report(model_path: str | Path, report: str) -> Path:
    """Where val ("metrics") or test ("annotations") writes without --save_path: beside the first model."""
    model = Path(model_path)
    return model.with_name(f"{model.stem}_{report}.csv")


def load_predictor(path: str, config: ArtifactConfig, runtime: ScoringRuntime) -> ArtifactPredictor:
    """One --model_path, scored at its own image size (a notice where --image-size differs) and at the precision
    --precision resolves to for that size (auto picks bf16 on the CPU only from 192 px)."""
    predictor = ArtifactPredictor.from_checkpoint(path, runtime, config.data_path)
    if config.image_size is not None and config.image_size != predictor.image_size:
        print(
            f"notice: {predictor.path} was trained at {predictor.image_size} px; using that, not --image-size "
            f"{config.image_size}.",
            flush=True,
        )
    amp_dtype = resolve_precision(config.precision, runtime.device, predictor.image_size)
    return replace(predictor, runtime=replace(runtime, amp_dtype=amp_dtype))


def load_models(config: ArtifactConfig, device: torch.device) -> ArtifactEnsemble:
    """Every --model_path (load_predictor), several with the same heads, with a notice for each preprocessing flag
    given that the checkpoint overrides."""
    runtime = runtime_from_flags(config, device, None)  # the precision is each model's own (load_predictor)
    ensemble = ArtifactEnsemble([load_predictor(path, config, runtime) for path in config.model_paths])
    if len(ensemble.predictors) > 1 and config.save_path is None:
        raise UserError(
            "several --model_path files write no report beside one of them: name the output with --save_path."
        )
    for predictor in ensemble.predictors:
        for key, value in predictor.preprocessing.record().items():
            given = getattr(config, key)
            if given is not None and given != value:
                flag = "--" + key.replace("_", "-")
                print(f"notice: {predictor.path} was trained with {flag} {value}; using that, not {given}.", flush=True)
    return ensemble


def report_path(config: ArtifactConfig, report: str) -> Path:
    """--save_path, or the default report beside the first model, checked before any work: an earlier report is
    never replaced without --overwrite, nor is a folder taken for the file (cli.claim_file)."""
    save_path = Path(config.save_path) if config.save_path else default_report(config.model_path, report)
    claim_file(save_path, config.overwrite, example="report.csv", flag="--save_path")
    return save_path


def trained_images(checkpoint: dict, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Per row of an annotation frame: did the model train on that image, and is it one of its val images? By
    image name (without extension), from the names the checkpoint stores, never from the file's bytes or path: a
    copy with other line ends, or a file that mixes training images with new ones, is scored by what it holds. A
    checkpoint without train_images (written before they were stored) counts every image outside val_images as a
    training image when the file holds any of its val images, since then it holds the training annotations."""
    names = frame["image_name"].map(image_name)
    in_val = names.isin({image_name(name) for name in checkpoint["val_images"]}).to_numpy()
    if "train_images" in checkpoint:
        in_train = names.isin({image_name(name) for name in checkpoint["train_images"]}).to_numpy()
    else:
        in_train = ~in_val if in_val.any() else np.zeros(len(frame), dtype=bool)
    return in_train, in_val


# --------------------------------------------------------------------------- val and test


def describe_scoring(config: ArtifactConfig) -> str:
    models = "1 model" if len(config.model_paths) == 1 else f"the mean of {len(config.model_paths)} models"
    return f"{models}, {config.n_tta} TTA view(s)"


def threshold_source(config: ArtifactConfig) -> str:
    if config.threshold is not None:
        return "--threshold"
    if len(config.model_paths) == 1:
        return "of the model (max F1 on its val split)"
    return "the mean of the models' own (each max F1 on its val split)"


def held_out_rows(
    config: ArtifactConfig, checkpoints: list[dict], frame: pd.DataFrame, labels: np.ndarray
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """The rows val scores (those no model trained on, unless --all) with their labels, and which of them are the
    models' val images. With several models an image is held out only if no model trained on it."""
    memberships = [trained_images(c, frame) for c in checkpoints]
    in_train = np.logical_or.reduce([trained for trained, _ in memberships])
    in_val = np.logical_or.reduce([val for _, val in memberships])
    if in_train.any() and not config.all:
        if in_train.all():
            raise UserError(
                f"{config.model_path} trained on every image of {config.ann_path}: score images it did not train "
                "on, or pass --all to score these (optimistic numbers)."
            )
        print(
            f"{config.ann_path} holds {int(in_train.sum())} images {config.model_path} trained on: scoring the other "
            f"{int((~in_train).sum())} of {len(frame)} ({int(in_val.sum())} of them its val images; --all scores "
            "every row).",
            flush=True,
        )
        kept = ~in_train
        frame, labels, in_val = frame[kept].reset_index(drop=True), labels[kept], in_val[kept]
    elif in_train.any():
        print(
            f"scoring all {len(frame)} rows of {config.ann_path}, including the {int(in_train.sum())} images "
            f"{config.model_path} was trained on: these numbers are optimistic.",
            flush=True,
        )
    return frame, labels, in_val


def val_threshold_source(config: ArtifactConfig, in_sample: bool, n_in_val: int) -> str:
    """Where val's thresholds come from, and whether the thresholded metrics are in-sample."""
    if config.threshold is not None:
        return "--threshold"
    if in_sample:
        return (
            f"of the model, fitted on {n_in_val} of these images (its val split): F1, precision, recall and "
            "accuracy are in-sample, optimistic (--threshold sets your own)"
        )
    return "of the model (max F1 on its val split, none of these images)"


def run_val(config: ArtifactConfig, device: torch.device) -> dict:
    ensemble = load_models(config, device)
    model_heads = ensemble.heads
    save_path = report_path(config, "metrics")
    frame, heads, labels = read_artifact_annotations(config.ann_path, config.img_path)
    common = [head for head in model_heads if head in heads]
    if not common:
        raise UserError(
            f"{config.ann_path} has the heads {', '.join(heads)}, but {config.model_path} detects "
            f"{', '.join(model_heads)}: evaluate with an annotation file of the model's heads."
        )
    skipped = [head for head in model_heads if head not in heads]
    if skipped:
        print(f"notice: {config.ann_path} has no column for {', '.join(skipped)}; those heads are not scored.")
    labels = labels[:, [heads.index(head) for head in common]]
    frame, labels, in_val = held_out_rows(config, ensemble.checkpoints, frame, labels)
    probs = ensemble.probabilities(frame["filepath"].tolist(), desc=config.mode)
    probs = probs[:, [model_heads.index(head) for head in common]]
    table = metrics_table(common, labels, probs, ensemble.thresholds(common, config.threshold))
    # the stored thresholds maximise F1 on the val split: scored there, the thresholded numbers flatter the model
    in_sample = config.threshold is None and bool(in_val.any())
    table["thresholds_in_sample"] = in_sample
    write_csv_atomic(table, save_path)
    source = val_threshold_source(config, in_sample, int(in_val.sum()))
    print(
        f"{len(frame)} images, {describe_scoring(config)}, mean auc {mean_auc(table):.4f}, thresholds {source}:\n"
        f"{format_table(table)}\nwritten to {save_path}",
        flush=True,
    )
    return {"n_images": len(frame), "mean_auc": mean_auc(table), "table": table, "save_path": save_path}


def run_test(config: ArtifactConfig, device: torch.device) -> dict:
    ensemble = load_models(config, device)
    save_path = report_path(config, "annotations")
    files = list_images(config.img_path)
    heads = ensemble.heads
    probs = ensemble.probabilities([str(path) for path in files], desc=config.mode)
    if len(probs) != len(files):
        raise AssertionError(f"{len(probs)} predictions for {len(files)} images")
    thresholds = np.asarray(ensemble.thresholds(heads, config.threshold))
    # decided on the probabilities as written, so that <head> == (<head>_prob >= threshold) holds in the file
    probs = np.round(probs.astype(np.float64), 6)
    out = pd.DataFrame({"image_name": [path.name for path in files]})
    for i, head in enumerate(heads):
        out[head] = (probs[:, i] >= thresholds[i]).astype(int)
    for i, head in enumerate(heads):
        out[f"{head}{PROB_SUFFIX}"] = probs[:, i]
    write_csv_atomic(out, save_path)
    counts = ", ".join(f"{head} {int(out[head].sum())}" for head in heads)
    print(
        f"labelled {len(out)} images of {config.img_path} ({counts}; {describe_scoring(config)}, thresholds "
        f"{threshold_source(config)}): written to {save_path}",
        flush=True,
    )
    return {"n_images": len(out), "save_path": save_path, "annotations": out}


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    with exit_on_user_error():
        config = parse_args(argv)
        refuse_folder(config.model_path, "--model_path", "detector.pth")
        if config.mode == "train":
            with training_runtime(config) as runtime:
                return run_train(config, runtime)
        set_visible_devices(config.CUDA_VISIBLE_DEVICES)
        device = select_device(config.device)  # scoring is one process; torchrun is for training
        return {"val": run_val, "test": run_test}[config.mode](config, device)


if __name__ == "__main__":
    main()
