"""Train, evaluate and apply the artifact ("bias") detector: one binary head per artifact type.

    python multi_classification.py --img_path DIR --ann_path gans_biases.csv --mode train --model_path M.pth
    python multi_classification.py --img_path DIR --ann_path gans_biases.csv --mode val --model_path M.pth
    python multi_classification.py --img_path DIR --mode test --model_path M.pth --save_path annotations.csv

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
val    scores the images of --ann_path; when that is the file the model was trained on, only its held-out val
       images (--all scores every row). Per head: ROC AUC, average precision, F1, precision, recall, accuracy at the
       threshold, support. Printed, and written to --save_path (default <model>_metrics.csv).
test   labels every image in --img_path (jpg, jpeg, png, bmp; sorted by name) and writes --save_path (default
       <model>_annotations.csv): image_name,<head>,...,<head>_prob,... with 0/1 decisions at the stored thresholds
       (or --threshold) and the probabilities. The file reads back as --ann_path (the _prob columns are ignored).
"""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.model_selection import train_test_split
from torch.nn.parallel import DistributedDataParallel

from dataset import (
    MIN_IMAGE_SIZE,
    PROB_SUFFIX,
    EpochSampler,
    ImageDataset,
    bias_train_transforms,
    list_images,
    read_bias_annotations,
    valid_transforms,
)
from models import ENET_TYPES, BiasNet, input_normalization, model_from_checkpoint
from utils import (
    CHECKPOINT_FORMAT,
    UserError,
    World,
    add_bn_refresh_flag,
    add_compile_flag,
    add_device_flags,
    average_buffers_over_world,
    batch_for_share,
    best_f1_threshold,
    bn_refresh_default,
    check_resume_compatible,
    claim_outputs,
    compile_for_training,
    default_num_workers,
    ensure_writable_dir,
    exit_on_user_error,
    gather_over_world,
    head_metrics,
    load_checkpoint,
    make_grad_scaler,
    make_loader,
    make_warmup_cosine,
    precision_name,
    predict_logits,
    refresh_batchnorm,
    resolve_precision,
    restore_training_state,
    save_checkpoint,
    seed_everything,
    select_device,
    set_visible_devices,
    setup_world,
    teardown_world,
    to_plain,
    train_one_epoch,
    training_state,
    write_csv_atomic,
)

PRETRAINED_LR = 1e-4
SCRATCH_LR = 1e-3
DEFAULT_IMAGE_SIZE = 256
METRIC_COLUMNS = ("auc", "ap", "f1", "precision", "recall", "acc", "threshold", "support", "positives")
# what must match for --resume to continue a run (checkpoint keys, and arguments with their flags)
RESUME_KEYS = ("model", "image_size", "ann_sha256", "val_images")
RESUME_FLAGS = {key: f"--{key}" for key in ("epochs", "batch", "lr", "seed", "ratio", "img_path")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--img_path", "--img-path", dest="img_path", required=True, help="folder of the images")
    parser.add_argument(
        "--ann_path", "--ann-path", dest="ann_path", default=None, help="annotation file (train and val modes)"
    )
    parser.add_argument("--mode", required=True, choices=("train", "val", "test"))
    parser.add_argument(
        "--model_path",
        "--model-path",
        dest="model_path",
        required=True,
        help="model file: written by train, read by val/test",
    )
    parser.add_argument(
        "--save_path",
        "--save-path",
        dest="save_path",
        default=None,
        help="test: annotation CSV to write (default <model>_annotations.csv); val: metrics CSV (default "
        "<model>_metrics.csv)",
    )
    parser.add_argument("--epochs", "--n-epochs", dest="epochs", type=int, default=10)
    parser.add_argument("--batch", "--batch-size", dest="batch", type=int, default=16, help="images per batch")
    parser.add_argument(
        "--lr",
        "--init-lr",
        dest="lr",
        type=float,
        default=None,
        help=f"peak learning rate (default {PRETRAINED_LR} with ImageNet weights, {SCRATCH_LR} with --no-pretrained)",
    )
    parser.add_argument(
        "--num_workers",
        "--num-workers",
        dest="num_workers",
        type=int,
        default=default_num_workers(),
        help="data-loading processes (default: half the cores, at most 8)",
    )
    parser.add_argument("--ratio", type=float, default=0.8, help="share of the annotated images used for training")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--image_size",
        "--image-size",
        dest="image_size",
        type=int,
        default=None,
        help=f"training resolution (default {DEFAULT_IMAGE_SIZE}); val and test use the model's own",
    )
    parser.add_argument("--enet_type", "--enet-type", dest="enet_type", default="efficientnet-b2", choices=ENET_TYPES)
    parser.add_argument(
        "--threshold", type=float, default=None, help="one cut-off for every head, instead of the model's own"
    )
    parser.add_argument("--all", action="store_true", help="val: score every row, also the training images")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument(
        "--pretrained-weights",
        "--pretrained_weights",
        dest="pretrained_weights",
        default=None,
        help="local ImageNet state_dict for the backbone",
    )
    weights.add_argument(
        "--no-pretrained",
        "--no_pretrained",
        dest="no_pretrained",
        action="store_true",
        help="start from random weights",
    )
    parser.add_argument("--resume", action="store_true", help="train: continue from <model>_last.pth")
    parser.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier run")
    add_bn_refresh_flag(parser, underscore_aliases=True)
    add_compile_flag(parser)
    add_device_flags(parser, underscore_aliases=True)
    args = parser.parse_args(argv)
    if args.lr is None:
        args.lr = SCRATCH_LR if args.no_pretrained else PRETRAINED_LR
    if args.bn_refresh_batches is None:
        args.bn_refresh_batches = bn_refresh_default(args.no_pretrained)
    return args


def check_args(args: argparse.Namespace) -> None:
    if args.mode in ("train", "val") and args.ann_path is None:
        raise UserError(f"--mode {args.mode} needs --ann_path, the annotation file of the images in --img_path.")
    checks = [
        (args.epochs >= 1, f"--epochs {args.epochs} must be at least 1."),
        (args.batch >= 1, f"--batch {args.batch} must be at least 1."),
        (args.lr > 0, f"--lr {args.lr} must be positive."),
        (args.num_workers >= 0, f"--num_workers {args.num_workers} must be 0 or more."),
        (0 < args.ratio < 1, f"--ratio {args.ratio} must lie between 0 and 1 (e.g. 0.8: 80 % train, 20 % val)."),
        (
            args.image_size is None or args.image_size >= MIN_IMAGE_SIZE,
            f"--image_size {args.image_size} is below the {MIN_IMAGE_SIZE} px minimum of EfficientNet: use "
            f"{MIN_IMAGE_SIZE} or more.",
        ),
        (
            args.threshold is None or 0 <= args.threshold <= 1,
            f"--threshold {args.threshold} is not a probability: use a value from 0 to 1.",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)


# --------------------------------------------------------------------------- pieces


def masked_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy averaged over the annotated cells; NaN targets (blank = not annotated) add nothing,
    neither loss nor gradient. A batch without any annotated cell gives 0."""
    annotated = ~torch.isnan(targets)
    if not annotated.any():
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits[annotated], targets[annotated].to(logits.dtype))


def split_train_val(labels: np.ndarray, ratio: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of the rows into train and val indices: stratified on the full label combination (blanks
    included) where every combination can be split, else on "has any artifact", else plain random."""
    n_rows = len(labels)
    n_val = n_rows - int(round(n_rows * ratio))
    if n_val < 1 or n_val >= n_rows:
        raise UserError(
            f"--ratio {ratio} leaves {n_rows - n_val} training and {n_val} validation images of {n_rows}: both "
            "need at least one; annotate more images or change --ratio."
        )
    combination = np.array(["".join("-" if np.isnan(v) else str(int(v)) for v in row) for row in labels])
    any_artifact = np.array([str(int((row == 1).any())) for row in labels])
    for keys in (combination, any_artifact, None):
        if keys is not None:
            values, counts = np.unique(keys, return_counts=True)
            keys = np.where(np.isin(keys, values[counts < 2]), "rare", keys)
        try:
            train_index, val_index = train_test_split(
                np.arange(n_rows), test_size=n_val, random_state=seed, shuffle=True, stratify=keys
            )
        except ValueError:  # a class with one member, or more classes than val rows
            continue
        return np.sort(train_index), np.sort(val_index)
    raise AssertionError("an unstratified split cannot fail")


def choose_thresholds(targets: np.ndarray, probs: np.ndarray) -> list[float]:
    """Per head, the cut-off with the highest F1 on these (annotated) rows."""
    thresholds = []
    for head in range(targets.shape[1]):
        annotated = ~np.isnan(targets[:, head])
        thresholds.append(best_f1_threshold(targets[annotated, head], probs[annotated, head]))
    return thresholds


def metrics_table(heads: list[str], targets: np.ndarray, probs: np.ndarray, thresholds: list[float]) -> pd.DataFrame:
    """One row per head (blank targets left out), columns METRIC_COLUMNS."""
    rows = [{"head": head, **head_metrics(targets[:, i], probs[:, i], thresholds[i])} for i, head in enumerate(heads)]
    return pd.DataFrame(rows, columns=["head", *METRIC_COLUMNS])


def mean_auc(table: pd.DataFrame) -> float:
    """Mean ROC AUC over the heads where it is defined; NaN when it is defined for none."""
    aucs = table["auc"].dropna()
    return float(aucs.mean()) if len(aucs) else float("nan")


def format_table(table: pd.DataFrame) -> str:
    return table.to_string(index=False, float_format=lambda value: f"{value:.4f}", na_rep="-")


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def output_paths(model_path: str | Path) -> dict[str, Path]:
    model = Path(model_path)
    return {
        "model": model,
        "last": model.with_name(f"{model.stem}_last.pth"),
        "history": model.with_name(f"{model.stem}_history.csv"),
        "metrics": model.with_name(f"{model.stem}_metrics.csv"),
        "annotations": model.with_name(f"{model.stem}_annotations.csv"),
    }


def predict_probs(
    model: torch.nn.Module,
    filepaths: list[str],
    checkpoint: dict,
    args: argparse.Namespace,
    device: torch.device,
    amp_dtype: torch.dtype | None,
) -> np.ndarray:
    """Sigmoid probabilities (images x heads) at the model's own image size and normalisation, in file order."""
    dataset = ImageDataset(filepaths, valid_transforms(checkpoint["image_size"], checkpoint["mean"], checkpoint["std"]))
    sampler = EpochSampler(len(dataset), shuffle=False, seed=0)
    loader = make_loader(dataset, sampler, args.batch, args.num_workers, device)
    logits, _ = predict_logits(model, loader, device, amp_dtype, args.channels_last, args.progress, desc=args.mode)
    return torch.sigmoid(logits).numpy()


def load_model(args: argparse.Namespace, device: torch.device) -> tuple[torch.nn.Module, dict]:
    checkpoint = load_checkpoint(args.model_path, "bias")
    model = model_from_checkpoint(checkpoint, args.model_path).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.image_size is not None and args.image_size != checkpoint["image_size"]:
        print(
            f"notice: {args.model_path} was trained at {checkpoint['image_size']} px; using that, not --image_size "
            f"{args.image_size}.",
            flush=True,
        )
    return model, checkpoint


def thresholds_for(checkpoint: dict, args: argparse.Namespace, heads: list[str]) -> list[float]:
    """--threshold for every head, else the per-head cut-offs stored in the model."""
    if args.threshold is not None:
        return [args.threshold] * len(heads)
    stored = dict(zip(checkpoint["heads"], checkpoint["thresholds"], strict=True))
    return [stored[head] for head in heads]


def claim_report(path: Path, explicit: bool, overwrite: bool) -> None:
    """A file the user named is never replaced without --overwrite; the defaults beside the model are reports of
    that model and are rewritten."""
    if explicit and path.exists() and not overwrite:
        raise UserError(f"{path} already exists: pass --overwrite to replace it, or choose another --save_path.")


# --------------------------------------------------------------------------- train


def run_train(
    args: argparse.Namespace, device: torch.device, amp_dtype: torch.dtype | None, world: World | None = None
) -> dict:
    """Trains the detector; under torchrun as DistributedDataParallel, rank 0 alone writing (as train.py)."""
    world = world or World()
    image_size = args.image_size or DEFAULT_IMAGE_SIZE
    frame, heads, labels = read_bias_annotations(args.ann_path, args.img_path)
    train_index, val_index = split_train_val(labels, args.ratio, args.seed)
    paths = output_paths(args.model_path)
    if world.is_main:
        ensure_writable_dir(paths["model"].parent, "model folder (--model_path)")
        claim_outputs(
            [paths["model"], paths["last"], paths["history"]],
            paths["last"],
            args.resume,
            args.overwrite,
            "choose another --model_path",
        )
    if world.distributed:
        dist.barrier()
    log = print if world.is_main else (lambda *_, **__: None)
    for i, head in enumerate(heads):
        column = labels[train_index, i]
        if not (column == 1).any() or not (column == 0).any():
            log(f"notice: head {head} has only one class among the training images: it cannot learn.", flush=True)
    log(
        f"{len(frame)} annotated images, heads {', '.join(heads)}; {len(train_index)} train / {len(val_index)} val; "
        f"{args.enet_type} at {image_size} px on {device}, precision {precision_name(amp_dtype)}, lr {args.lr}",
        flush=True,
    )

    seed_everything(args.seed)
    net = BiasNet(
        args.enet_type,
        heads,
        pretrained=not args.no_pretrained,
        weights_path=args.pretrained_weights,
        bn_momentum=args.bn_momentum,
    )
    net = net.to(device)
    if args.channels_last:
        net = net.to(memory_format=torch.channels_last)
    model = (
        DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
        if world.distributed
        else net
    )
    model = compile_for_training(model, args.compile)
    mean, std = input_normalization(args.enet_type)
    train_set = ImageDataset(
        frame["filepath"].iloc[train_index],
        bias_train_transforms(image_size, mean, std),
        targets=labels[train_index],
        augment_seed=args.seed,
    )
    val_set = ImageDataset(
        frame["filepath"].iloc[val_index], valid_transforms(image_size, mean, std), targets=labels[val_index]
    )
    train_sampler = EpochSampler(len(train_set), True, args.seed, world.rank, world.size)
    batch_size = batch_for_share(args.batch, len(train_set), world, "--batch")
    # drop_last keeps BatchNorm away from a final batch of one image
    train_loader = make_loader(
        train_set, train_sampler, batch_size, args.num_workers, device, drop_last=len(train_sampler) > batch_size
    )
    val_loader = make_loader(
        val_set, EpochSampler(len(val_set), False, 0, world.rank, world.size), args.batch, args.num_workers, device
    )
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)
    scheduler = make_warmup_cosine(optimizer, args.epochs, len(train_loader))
    scaler = make_grad_scaler(device, amp_dtype)

    config = {
        "format": CHECKPOINT_FORMAT,
        "kind": "bias",
        "model": {"enet_type": args.enet_type, "heads": list(heads)},
        "heads": list(heads),
        "image_size": image_size,
        "mean": list(mean),
        "std": list(std),
        "loss": "sigmoid + binary cross-entropy per head, blank labels masked",
        "threshold_rule": "max F1 on the val split",
        "ann_path": str(Path(args.ann_path).resolve()),
        "ann_sha256": file_sha256(args.ann_path),
        "val_images": frame["image_name"].iloc[val_index].tolist(),
        "args": to_plain({key: value for key, value in vars(args).items() if key not in ("resume", "overwrite")}),
    }

    start_epoch, best_score, best_epoch, best_table, history = 1, None, 0, None, []
    if args.resume and paths["last"].is_file():
        state = load_checkpoint(paths["last"], "bias")
        check_resume_compatible(state, config, paths["last"], RESUME_KEYS, RESUME_FLAGS)
        restore_training_state(state, net, optimizer, scheduler, scaler)
        start_epoch, best_score, best_epoch = state["epoch"] + 1, state["best_score"], state["best_epoch"]
        best_table, history = pd.DataFrame(state["best_table"]), state["history"]
        log(f"resuming {paths['last']} after epoch {state['epoch']} (best epoch {best_epoch})", flush=True)

    for epoch in range(start_epoch, args.epochs + 1):
        started = time.time()
        train_sampler.set_epoch(epoch)
        lr = optimizer.param_groups[0]["lr"]
        train_loss = train_one_epoch(
            model,
            train_loader,
            optimizer,
            masked_bce,
            device,
            amp_dtype,
            scaler,
            scheduler,
            channels_last=args.channels_last,
            epoch=epoch,
            progress=args.progress and world.is_main,
            world=world,
        )
        if args.bn_refresh_batches:
            refresh_batchnorm(net, train_loader, device, amp_dtype, args.channels_last, args.bn_refresh_batches)
        average_buffers_over_world(net, world)
        logits, targets = predict_logits(net, val_loader, device, amp_dtype, args.channels_last, args.progress)
        logits, targets = gather_over_world(logits, targets, len(val_set), world, device)
        valid_loss = float(masked_bce(logits, targets))
        probs, targets = torch.sigmoid(logits).numpy(), targets.numpy()
        thresholds = choose_thresholds(targets, probs)
        table = metrics_table(heads, targets, probs, thresholds)
        score = mean_auc(table)
        seconds = round(time.time() - started, 2)
        log(
            f"epoch {epoch}/{args.epochs}, lr {lr:.7f}, train loss {train_loss:.5f}, valid loss {valid_loss:.5f}, "
            f"mean val auc {score:.4f}, {seconds} s\n{format_table(table)}",
            flush=True,
        )
        history += [
            {"epoch": epoch, "lr": lr, "train_loss": train_loss, "valid_loss": valid_loss, "seconds": seconds, **row}
            for row in table.to_dict(orient="records")
        ]

        checkpoint = {
            **config,
            "epoch": epoch,
            "thresholds": thresholds,
            "metrics": to_plain(table.to_dict(orient="list")),
            "state_dict": net.state_dict(),
        }
        comparable = -1.0 if np.isnan(score) else score  # no head with both classes in val: keep the first epoch
        improved = best_score is None or comparable > best_score
        if improved:
            best_score, best_epoch, best_table = comparable, epoch, table
        if not world.is_main:
            continue
        if improved:
            save_checkpoint(paths["model"], checkpoint)
            print(f"  best mean val auc {score:.4f}: saved {paths['model']}", flush=True)
        save_checkpoint(
            paths["last"],
            {
                **checkpoint,
                **training_state(optimizer, scheduler, scaler),
                "best_score": best_score,
                "best_epoch": best_epoch,
                "best_table": to_plain(best_table.to_dict(orient="list")),
                "history": to_plain(history),
            },
        )
        write_csv_atomic(pd.DataFrame(history), paths["history"])

    log(
        f"best epoch {best_epoch} (mean val auc {mean_auc(best_table):.4f}), thresholds chosen on the val split:\n"
        f"{format_table(best_table)}\nmodel {paths['model']}, resumable state {paths['last']}, "
        f"per-epoch metrics {paths['history']}",
        flush=True,
    )
    return {"best_epoch": best_epoch, "mean_auc": mean_auc(best_table), "table": best_table, "paths": paths}


# --------------------------------------------------------------------------- val


def run_val(args: argparse.Namespace, device: torch.device, amp_dtype: torch.dtype | None) -> dict:
    model, checkpoint = load_model(args, device)
    paths = output_paths(args.model_path)
    save_path = Path(args.save_path) if args.save_path else paths["metrics"]
    claim_report(save_path, args.save_path is not None, args.overwrite)
    frame, heads, labels = read_bias_annotations(args.ann_path, args.img_path)
    common = [head for head in checkpoint["heads"] if head in heads]
    if not common:
        raise UserError(
            f"{args.ann_path} has the heads {', '.join(heads)}, but {args.model_path} detects "
            f"{', '.join(checkpoint['heads'])}: evaluate with an annotation file of the model's heads."
        )
    skipped = [head for head in checkpoint["heads"] if head not in heads]
    if skipped:
        print(f"notice: {args.ann_path} has no column for {', '.join(skipped)}; those heads are not scored.")
    labels = labels[:, [heads.index(head) for head in common]]

    # the training file, also after a label was fixed in it (same path) or as a copy elsewhere (same bytes)
    trained_on = checkpoint["ann_sha256"] == file_sha256(args.ann_path) or checkpoint["ann_path"] == str(
        Path(args.ann_path).resolve()
    )
    if trained_on and not args.all:
        held_out = frame["image_name"].isin(set(checkpoint["val_images"])).to_numpy()
        if not held_out.any():
            raise UserError(
                f"none of the val images stored in {args.model_path} is in {args.ann_path}: pass --all to score "
                "every row."
            )
        print(
            f"{args.ann_path} is the file {args.model_path} was trained on: scoring only its {int(held_out.sum())} "
            f"held-out val images of {len(frame)} (--all scores every row).",
            flush=True,
        )
        frame, labels = frame[held_out].reset_index(drop=True), labels[held_out]
    elif trained_on:
        print(
            f"scoring all {len(frame)} rows of {args.ann_path}, including the images {args.model_path} was trained "
            "on: these numbers are optimistic.",
            flush=True,
        )

    probs = predict_probs(model, frame["filepath"].tolist(), checkpoint, args, device, amp_dtype)
    probs = probs[:, [checkpoint["heads"].index(head) for head in common]]
    table = metrics_table(common, labels, probs, thresholds_for(checkpoint, args, common))
    ensure_writable_dir(save_path.parent, "folder of --save_path")
    write_csv_atomic(table, save_path)
    print(
        f"{len(frame)} images, mean auc {mean_auc(table):.4f}, thresholds "
        f"{'--threshold' if args.threshold is not None else 'of the model (max F1 on its val split)'}:\n"
        f"{format_table(table)}\nwritten to {save_path}",
        flush=True,
    )
    return {"n_images": len(frame), "mean_auc": mean_auc(table), "table": table, "save_path": save_path}


# --------------------------------------------------------------------------- test


def run_test(args: argparse.Namespace, device: torch.device, amp_dtype: torch.dtype | None) -> dict:
    model, checkpoint = load_model(args, device)
    save_path = Path(args.save_path) if args.save_path else output_paths(args.model_path)["annotations"]
    if save_path.exists() and not args.overwrite:
        raise UserError(f"{save_path} already exists: pass --overwrite to replace it, or choose another --save_path.")
    files = list_images(args.img_path)
    ensure_writable_dir(save_path.parent, "folder of --save_path")
    heads = checkpoint["heads"]
    probs = predict_probs(model, [str(path) for path in files], checkpoint, args, device, amp_dtype)
    if len(probs) != len(files):
        raise AssertionError(f"{len(probs)} predictions for {len(files)} images")
    thresholds = np.asarray(thresholds_for(checkpoint, args, heads))
    # decided on the probabilities as written, so that <head> == (<head>_prob >= threshold) holds in the file
    probs = np.round(probs.astype(np.float64), 6)
    out = pd.DataFrame({"image_name": [path.name for path in files]})
    for i, head in enumerate(heads):
        out[head] = (probs[:, i] >= thresholds[i]).astype(int)
    for i, head in enumerate(heads):
        out[f"{head}{PROB_SUFFIX}"] = probs[:, i]
    write_csv_atomic(out, save_path)
    counts = ", ".join(f"{head} {int(out[head].sum())}" for head in heads)
    print(f"labelled {len(out)} images of {args.img_path} ({counts}): written to {save_path}", flush=True)
    return {"n_images": len(out), "save_path": save_path, "annotations": out}


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with exit_on_user_error():
        check_args(args)
        set_visible_devices(args.CUDA_VISIBLE_DEVICES)
        if args.mode != "train":  # scoring is one process; torchrun is for training
            device = select_device(args.device)
            amp_dtype = resolve_precision(args.precision, device, args.image_size)
            return {"val": run_val, "test": run_test}[args.mode](args, device, amp_dtype)
        world, device = setup_world(args.device)
        try:
            amp_dtype = resolve_precision(args.precision, device, args.image_size or DEFAULT_IMAGE_SIZE)
            return run_train(args, device, amp_dtype, world)
        finally:
            teardown_world(world)


if __name__ == "__main__":
    main()
