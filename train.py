"""Train the melanoma classifier (EfficientNet, optional metadata branch) on a Kaggle-layout folder.

    python train.py --save-name efficientnetb2_256_20ep --data-dir ./melanoma_external_256/ --image-size 256 \
        --n-epochs 20 --enet-type efficientnet-b2 --CUDA_VISIBLE_DEVICES 0 [--use-meta]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from baselines import baseline_aucs
from dataset import (
    AUGMENTATIONS,
    META_FEATURES,
    EpochSampler,
    ImageDataset,
    MetaEncoder,
    make_folds,
    read_melanoma_table,
    train_transforms,
    valid_transforms,
)
from features import FeatureScaler, colour_statistics, lesion_features, side_inputs
from models import (
    ENET_TYPES,
    MelanomaNet,
    MetadataLogit,
    input_normalization,
    melanoma_logit,
    melanoma_probability,
)
from utils import (
    CHECKPOINT_FORMAT,
    UserError,
    WeightAverage,
    World,
    add_bn_refresh_flag,
    add_compile_flag,
    add_device_flags,
    average_buffers_over_world,
    batch_for_share,
    binary_metrics,
    bn_refresh_default,
    check_resume_compatible,
    claim_outputs,
    compile_for_training,
    default_num_workers,
    ensure_writable_dir,
    exit_on_user_error,
    gather_over_world,
    load_checkpoint,
    make_grad_scaler,
    make_loader,
    make_warmup_cosine,
    precision_name,
    predict_logits,
    refresh_batchnorm,
    resolve_precision,
    restore_training_state,
    safe_auc,
    save_checkpoint,
    seed_everything,
    set_visible_devices,
    setup_world,
    teardown_world,
    to_plain,
    train_one_epoch,
    training_state,
    write_csv_atomic,
    write_text_atomic,
)

PRETRAINED_LR = 3e-4
SCRATCH_LR = 1e-3
SCRATCH_EMA_DECAY = 0.98  # an average over the last ~50 steps, 1.5 epochs of the shared sample at batch 32
# what must match for --resume to continue a run (checkpoint keys, and arguments with their flags)
RESUME_KEYS = ("model", "use_meta", "fusion", "lesion_features", "image_size", "fold", "n_folds")
RESUME_FLAGS = {
    key: "--" + key.replace("_", "-")
    for key in ("n_epochs", "batch_size", "init_lr", "seed", "fold_seed", "enet_type", "data_dir", "ema_decay")
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--save-name", required=True, help="name of this run's checkpoints and logs")
    parser.add_argument("--data-dir", required=True, help="Kaggle-layout folder: train.csv, train/train/*.jpg")
    parser.add_argument("--image-size", type=int, default=256, help="training resolution in pixels")
    parser.add_argument("--n-epochs", type=int, default=15)
    parser.add_argument("--enet-type", default="efficientnet-b2", choices=ENET_TYPES)
    parser.add_argument("--use-meta", action="store_true", help="add the patient-metadata branch")
    parser.add_argument(
        "--meta-features",
        default=",".join(META_FEATURES),
        help=f"comma list of metadata features (default all: {','.join(META_FEATURES)})",
    )
    parser.add_argument("--n-meta-dim", default="512,128", help="sizes of the metadata branch's two layers")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--num-workers",
        type=int,
        default=default_num_workers(),
        help="data-loading processes (default: half the cores, at most 8)",
    )
    parser.add_argument(
        "--init-lr",
        type=float,
        default=None,
        help=f"peak learning rate (default {PRETRAINED_LR} with ImageNet weights, {SCRATCH_LR} with --no-pretrained)",
    )
    parser.add_argument(
        "--out-dim",
        type=int,
        default=1,
        choices=(1, 2),
        help="1: one sigmoid logit with BCE; 2: two-class softmax with cross-entropy",
    )
    parser.add_argument("--model-dir", default="./weights")
    parser.add_argument("--log-dir", default="./logs")
    parser.add_argument("--seed", type=int, default=0, help="initialisation, shuffling and augmentation")
    parser.add_argument(
        "--fold-seed",
        type=int,
        default=0,
        help="the patient-grouped fold split; kept apart from --seed so that runs with different seeds validate "
        "on the same folds (and their out-of-fold predictions can be averaged)",
    )
    parser.add_argument(
        "--augment",
        default=None,
        choices=AUGMENTATIONS,
        help="training augmentation strength (default: full with ImageNet weights, light with --no-pretrained)",
    )
    parser.add_argument("--n-folds", type=int, default=5)
    parser.add_argument("--fold", default="0", help="validation fold: an index, a comma list, or 'all'")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--pretrained-weights", default=None, help="local ImageNet state_dict for the backbone")
    weights.add_argument("--no-pretrained", action="store_true", help="start from random weights")
    add_bn_refresh_flag(parser)
    add_compile_flag(parser)
    parser.add_argument(
        "--baselines",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also fit the metadata logistic regression and image-statistics gradient boosting on each fold",
    )
    parser.add_argument(
        "--ema-decay",
        type=float,
        default=None,
        help="validate and save an exponential moving average of the weights with this decay per step, 0 for off "
        "(default 0.98 with --no-pretrained, 0 with ImageNet weights)",
    )
    parser.add_argument(
        "--fusion",
        default=None,
        choices=("concat", "late"),
        help="with --use-meta: concat (the 1st-place metadata branch inside the network) or late (an image network "
        "plus a metadata logistic regression, added in log-odds); default late with --no-pretrained, else concat",
    )
    parser.add_argument(
        "--lesion-features",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="feed hand-crafted ABCD-rule lesion features (colours, asymmetry, border, size) into the side branch "
        "next to the metadata (default: on with --no-pretrained, off with ImageNet weights)",
    )
    parser.add_argument(
        "--bad-images",
        default="fail",
        choices=("fail", "skip"),
        help="empty, truncated or non-image files: stop with their name (fail) or leave them out with a count (skip)",
    )
    parser.add_argument("--resume", action="store_true", help="continue from <model-dir>/<save-name>_last.pth")
    parser.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier run")
    add_device_flags(parser)
    args = parser.parse_args(argv)
    # from random weights the full 1st-place augmentation stops the network learning within a CPU-sized budget
    # (README, "Training from random weights"): lighter augmentation and a higher rate are the measured defaults
    if args.init_lr is None:
        args.init_lr = SCRATCH_LR if args.no_pretrained else PRETRAINED_LR
    if args.bn_refresh_batches is None:
        args.bn_refresh_batches = bn_refresh_default(args.no_pretrained)
    if args.augment is None:
        args.augment = "light" if args.no_pretrained else "full"
    if args.lesion_features is None:
        args.lesion_features = args.no_pretrained
    if args.fusion is None:
        args.fusion = "late" if args.no_pretrained else "concat"
    if args.ema_decay is None:
        args.ema_decay = SCRATCH_EMA_DECAY if args.no_pretrained else 0.0
    return args


# --------------------------------------------------------------------------- pieces


def parse_folds(spec: str, n_folds: int) -> list[int]:
    if spec == "all":
        return list(range(n_folds))
    try:
        folds = [int(part) for part in spec.split(",")]
    except ValueError:
        raise UserError(f"--fold {spec!r} is not a fold index: use e.g. 0, 0,1,2 or all.") from None
    bad = [fold for fold in folds if not 0 <= fold < n_folds]
    if bad:
        raise UserError(f"--fold {bad[0]} is outside 0..{n_folds - 1}: pick a fold below --n-folds {n_folds}.")
    return folds


def parse_meta_dims(spec: str) -> list[int]:
    try:
        dims = [int(part) for part in spec.split(",")]
    except ValueError:
        dims = []
    if len(dims) != 2 or min(dims) < 1:
        raise UserError(f"--n-meta-dim {spec!r} must be two positive sizes, e.g. 512,128.")
    return dims


def melanoma_loss(out_dim: int):
    if out_dim == 1:
        return lambda logits, target: F.binary_cross_entropy_with_logits(logits[:, 0], target)
    return lambda logits, target: F.cross_entropy(logits, target.long())


def run_paths(args: argparse.Namespace, run_name: str) -> dict[str, Path]:
    model_dir, log_dir = Path(args.model_dir), Path(args.log_dir)
    return {
        "best": model_dir / f"{run_name}_best.pth",
        "final": model_dir / f"{run_name}_final.pth",
        "last": model_dir / f"{run_name}_last.pth",
        "log": log_dir / f"log_{run_name}.txt",
        "metrics": log_dir / f"metrics_{run_name}.jsonl",
        "oof": log_dir / f"oof_{run_name}.csv",
    }


def pooled_oof_path(args: argparse.Namespace) -> Path:
    """The out-of-fold predictions of all folds of a multi-fold run."""
    return Path(args.log_dir) / f"oof_{args.save_name}.csv"


def log_line(record: dict) -> str:
    """The original trainer's log line (users parse it), with the extra metrics appended."""
    return (
        f"{record['time']} Fold {record['fold']}, Epoch {record['epoch']}, lr: {record['lr']:.7f}, "
        f"train loss: {record['train_loss']:.5f}, valid loss: {record['valid_loss']:.5f}, "
        f"acc: {record['acc']:.4f}, auc: {record['auc']:.6f}, balanced acc: {record['balanced_acc']:.4f}, "
        f"sensitivity: {record['sensitivity']:.4f}, specificity: {record['specificity']:.4f}."
    )


def write_history(paths: dict[str, Path], history: list[dict]) -> None:
    """Rewrites the log and the metrics file from the run's history: each epoch appears once, even after a
    resume, and an interrupted write never leaves half a file."""
    write_text_atomic(paths["log"], "".join(log_line(record) + "\n" for record in history))
    write_text_atomic(paths["metrics"], "".join(pd.Series(record).to_json() + "\n" for record in history))


# --------------------------------------------------------------------------- one fold


def train_fold(
    args: argparse.Namespace,
    frame: pd.DataFrame,
    fold: int,
    run_name: str,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    world: World,
    colour: np.ndarray | None = None,
    lesion: np.ndarray | None = None,
) -> tuple[pd.DataFrame, dict, nn.Module, float]:
    """Trains on every fold but `fold`, validates on `fold`; returns the out-of-fold predictions of the best
    epoch, the baselines' validation AUCs, the trained network and the last epoch's validation AUC (the best epoch
    is picked on this same fold, so its AUC is optimistic). Writes <run>_best/_final/_last.pth, the log,
    the metrics file and the OOF CSV (the main process only, in a distributed run). `colour` and `lesion` hold the
    colour statistics and lesion features of every row of `frame`, computed once per run, where it needs them."""
    paths = run_paths(args, run_name)
    train_rows = frame[frame["fold"] != fold].reset_index(drop=True)
    valid_rows = frame[frame["fold"] == fold].reset_index(drop=True)
    if valid_rows["target"].nunique() < 2:
        raise UserError(
            f"validation fold {fold} holds only target {valid_rows['target'].iloc[0]}: AUC is undefined there; "
            "use fewer --n-folds or add images of the other class."
        )
    if train_rows["target"].nunique() < 2:
        raise UserError(
            f"the training images of fold {fold} (every fold but {fold}) hold only target "
            f"{train_rows['target'].iloc[0]}: a classifier needs both; add images of the other class from other "
            "patients."
        )

    encoder = feature_scaler = None
    if args.use_meta:
        encoder = MetaEncoder([name for name in args.meta_features.split(",") if name]).fit(train_rows)
    in_fold = (frame["fold"] == fold).to_numpy()
    train_lesion = valid_lesion = None
    if lesion is not None:
        train_lesion, valid_lesion = lesion[~in_fold], lesion[in_fold]
        feature_scaler = FeatureScaler().fit(train_lesion)
    late_fusion = args.use_meta and args.fusion == "late"
    network_encoder = None if late_fusion else encoder
    train_meta = side_inputs(train_rows, network_encoder, feature_scaler, train_lesion)
    valid_meta = side_inputs(valid_rows, network_encoder, feature_scaler, valid_lesion)
    n_side = 0 if train_meta is None else train_meta.shape[1]
    meta_model, valid_evidence = None, None
    if late_fusion:
        meta_model = MetadataLogit().fit(encoder.transform(train_rows), train_rows["target"], seed=args.seed)
        valid_evidence = meta_model.evidence(encoder.transform(valid_rows))
        if world.is_main:
            alone = safe_auc(valid_rows["target"], valid_evidence)
            print(f"late fusion: metadata logistic regression on the training fold (alone {alone:.4f})", flush=True)

    baselines = {}
    if args.baselines and world.is_main:
        stats = {} if colour is None else {"train_stats": colour[~in_fold], "valid_stats": colour[in_fold]}
        baselines = baseline_aucs(train_rows, valid_rows, seed=args.seed, **stats)
        print("baselines on this fold: " + ", ".join(f"{k} {v:.4f}" for k, v in baselines.items()), flush=True)

    seed_everything(args.seed + fold)
    net = MelanomaNet(
        args.enet_type,
        out_dim=args.out_dim,
        n_meta_features=n_side,
        n_meta_dim=parse_meta_dims(args.n_meta_dim),
        pretrained=not args.no_pretrained,
        weights_path=args.pretrained_weights,
        bn_momentum=args.bn_momentum,
    ).to(device)
    if args.channels_last:
        net = net.to(memory_format=torch.channels_last)
    # DDP averages gradients over processes and keeps the weights identical; `net` is what gets saved, so a
    # checkpoint is the same whether trained on 1 or N processes
    model = (
        DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
        if world.distributed
        else net
    )
    model = compile_for_training(model, args.compile)
    weight_average = WeightAverage(net, args.ema_decay) if args.ema_decay > 0 else None
    # the network that is validated and saved: the weight average when there is one
    eval_net = weight_average.model if weight_average else net
    torch.manual_seed(args.seed + fold + 1000 * world.rank)  # dropout differs per rank, the initial weights do not

    mean, std = input_normalization(args.enet_type)
    train_set = ImageDataset(
        train_rows["filepath"],
        train_transforms(args.image_size, mean, std, strength=args.augment),
        train_meta,
        train_rows["target"],
        augment_seed=args.seed + fold,
    )
    valid_set = ImageDataset(
        valid_rows["filepath"], valid_transforms(args.image_size, mean, std), valid_meta, valid_rows["target"]
    )
    train_sampler = EpochSampler(len(train_set), True, args.seed + fold, world.rank, world.size)
    batch_size = batch_for_share(args.batch_size, len(train_set), world, "--batch-size")
    # drop_last keeps BatchNorm away from a final batch of one image
    train_loader = make_loader(
        train_set, train_sampler, batch_size, args.num_workers, device, drop_last=len(train_sampler) > batch_size
    )
    valid_loader = make_loader(
        valid_set,
        EpochSampler(len(valid_set), False, 0, world.rank, world.size),
        args.batch_size,
        args.num_workers,
        device,
    )

    optimizer = torch.optim.Adam(net.parameters(), lr=args.init_lr)
    scheduler = make_warmup_cosine(optimizer, args.n_epochs, len(train_loader))
    scaler = make_grad_scaler(device, amp_dtype)
    loss_fn = melanoma_loss(args.out_dim)

    config = {
        "format": CHECKPOINT_FORMAT,
        "kind": "melanoma",
        "model": {
            "enet_type": args.enet_type,
            "out_dim": args.out_dim,
            "n_meta_features": n_side,
            "n_meta_dim": parse_meta_dims(args.n_meta_dim),
        },
        "use_meta": bool(args.use_meta),
        "fusion": "late" if late_fusion else "concat",
        "meta_model": meta_model.state_dict() if meta_model else None,
        "meta_encoder": encoder.state_dict() if encoder else None,
        "meta_feature_names": encoder.feature_names if encoder else [],
        "lesion_features": feature_scaler.state_dict() if feature_scaler else None,
        "image_size": args.image_size,
        "mean": list(mean),
        "std": list(std),
        "fold": fold,
        "n_folds": args.n_folds,
        # fold membership is stored, never rebuilt: whatever later scores "held-out" rows reads them from here
        "val_images": valid_rows["image_name"].tolist(),
        "args": to_plain({key: value for key, value in vars(args).items() if key not in ("resume", "overwrite")}),
    }

    start_epoch, best_auc, history, best_oof = 1, -1.0, [], None
    if args.resume and paths["last"].is_file():
        state = load_checkpoint(paths["last"], "melanoma")
        check_resume_compatible(state, config, paths["last"], RESUME_KEYS, RESUME_FLAGS)
        restore_training_state(state, net, optimizer, scheduler, scaler)
        if weight_average:
            weight_average.model.load_state_dict(state["state_dict"])
        start_epoch, best_auc, history = state["epoch"] + 1, state["best_auc"], state["history"]
        best_oof = pd.DataFrame(state["best_oof"]) if state["best_oof"] else None
        if world.is_main:
            print(f"resuming {run_name} after epoch {state['epoch']} (best auc so far {best_auc:.4f})", flush=True)

    for epoch in range(start_epoch, args.n_epochs + 1):
        started = time.time()
        train_sampler.set_epoch(epoch)
        lr = optimizer.param_groups[0]["lr"]
        train_loss = train_one_epoch(
            model,
            train_loader,
            optimizer,
            loss_fn,
            device,
            amp_dtype,
            scaler,
            scheduler,
            channels_last=args.channels_last,
            epoch=epoch,
            progress=args.progress and world.is_main,
            world=world,
            weight_average=weight_average,
        )
        if args.bn_refresh_batches:
            refresh_batchnorm(eval_net, train_loader, device, amp_dtype, args.channels_last, args.bn_refresh_batches)
        average_buffers_over_world(eval_net, world)
        logits, targets = predict_logits(eval_net, valid_loader, device, amp_dtype, args.channels_last, args.progress)
        logits, targets = gather_over_world(logits, targets, len(valid_set), world, device)
        valid_loss = float(loss_fn(logits, targets))
        probs = melanoma_probability(logits, valid_evidence)
        metrics = binary_metrics(targets.numpy(), probs)
        if valid_evidence is not None:  # under late fusion, also what the image network scores on its own
            metrics["image_auc"] = safe_auc(targets.numpy(), melanoma_logit(logits))
        record = {
            "time": time.ctime(),
            "fold": fold,
            "epoch": epoch,
            "lr": lr,
            "train_loss": train_loss,
            "valid_loss": valid_loss,
            **metrics,
            **baselines,
            "seconds": round(time.time() - started, 2),
        }
        history.append(record)
        improved = metrics["auc"] > best_auc
        if improved:
            best_auc = metrics["auc"]
            best_oof = pd.DataFrame(
                {"image_name": valid_rows["image_name"], "fold": fold, "target": valid_rows["target"], "prob": probs}
            )
        if not world.is_main:
            continue
        print(log_line(record), flush=True)
        checkpoint = {**config, "epoch": epoch, "metrics": to_plain(metrics), "state_dict": eval_net.state_dict()}
        if improved:
            save_checkpoint(paths["best"], checkpoint)
            print(f"  best auc {metrics['auc']:.4f}: saved {paths['best']}", flush=True)
        save_checkpoint(
            paths["last"],
            {
                **checkpoint,
                **training_state(optimizer, scheduler, scaler),
                **({"training_weights": net.state_dict()} if weight_average else {}),
                "best_auc": best_auc,
                "history": to_plain(history),
                "best_oof": to_plain(best_oof.to_dict(orient="list")),
            },
        )
        write_history(paths, history)
        write_csv_atomic(best_oof, paths["oof"])
        if epoch == args.n_epochs:
            save_checkpoint(paths["final"], checkpoint)

    if best_oof is None:  # resumed a run that had already finished
        state = load_checkpoint(paths["last"], "melanoma")
        best_oof = pd.DataFrame(state["best_oof"])
        baselines = {key: value for key, value in state["history"][-1].items() if key.startswith("baseline_")}
    last_auc = float(history[-1]["auc"])
    if world.is_main:
        print(
            f"fold {fold}: best valid auc {best_auc:.4f} (epoch {max(history, key=lambda r: r['auc'])['epoch']}), "
            f"last epoch {last_auc:.4f}"
            + "".join(f" ({key} {value:.4f})" for key, value in baselines.items())
            + f"; checkpoints {paths['best']} and {paths['final']}, log {paths['log']}, metrics {paths['metrics']}, "
            f"out-of-fold predictions {paths['oof']}",
            flush=True,
        )
    return best_oof, baselines, eval_net, last_auc


def check_outputs_free(args: argparse.Namespace, run_names: list[str]) -> None:
    """Refuses to overwrite an earlier run's files unless asked to (--overwrite), or told to continue it."""
    for run_name in run_names:
        paths = run_paths(args, run_name)
        claim_outputs(list(paths.values()), paths["last"], args.resume, args.overwrite, "choose another --save-name")
    if len(run_names) > 1:  # the pooled predictions are rewritten when the folds are resumed
        last = run_paths(args, run_names[0])["last"]
        claim_outputs([pooled_oof_path(args)], last, args.resume, args.overwrite, "choose another --save-name")


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with exit_on_user_error():
        set_visible_devices(args.CUDA_VISIBLE_DEVICES)
        world, device = setup_world(args.device)
        try:
            return run(args, world, device)
        finally:
            teardown_world(world)


def run(args: argparse.Namespace, world: World, device: torch.device) -> dict:
    """Trains the requested folds; returns per-fold AUCs, their mean, the baselines and the trained networks."""
    if not world.distributed and args.CUDA_VISIBLE_DEVICES and "," in args.CUDA_VISIBLE_DEVICES:
        print(
            "notice: one process trains on the first listed GPU; to train on all of them start "
            "`torchrun --nproc_per_node N train.py ...`.",
            flush=True,
        )
    amp_dtype = resolve_precision(args.precision, device, args.image_size)
    if args.image_size < 32:
        raise UserError(f"--image-size {args.image_size} is below the 32 px minimum of EfficientNet: use 32 or more.")
    if not 0.0 <= args.ema_decay < 1.0:
        raise UserError(f"--ema-decay {args.ema_decay} must lie in [0, 1): e.g. 0.98, or 0 to turn the average off.")
    checks = [
        (args.n_epochs >= 1, f"--n-epochs {args.n_epochs} must be at least 1."),
        (args.batch_size >= 1, f"--batch-size {args.batch_size} must be at least 1."),
        (args.num_workers >= 0, f"--num-workers {args.num_workers} must be 0 or more."),
        (0 < args.init_lr < float("inf"), f"--init-lr {args.init_lr} must be a positive number, e.g. 3e-4."),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    folds = parse_folds(args.fold, args.n_folds)
    frame = read_melanoma_table(args.data_dir, "train", args.use_meta, require_target=True, bad_images=args.bad_images)
    frame["fold"] = make_folds(frame, args.n_folds, args.fold_seed)
    run_names = [args.save_name] if len(folds) == 1 else [f"{args.save_name}_fold{fold}" for fold in folds]
    if world.is_main:
        ensure_writable_dir(args.model_dir, "model folder (--model-dir)")
        ensure_writable_dir(args.log_dir, "log folder (--log-dir)")
        check_outputs_free(args, run_names)
    if world.distributed:
        dist.barrier()

    if world.is_main:
        print(
            f"{len(frame)} images ({int(frame['target'].sum())} melanoma), {args.n_folds} patient-grouped folds, "
            f"validating on fold(s) {folds}; {args.enet_type} at {args.image_size} px on {device}, "
            f"precision {precision_name(amp_dtype)}{', metadata branch' if args.use_meta else ''}"
            f"{', lesion features' if args.lesion_features else ''}",
            flush=True,
        )
    # image features once per run, not per fold: the baselines' colour statistics are also part of the lesion ones
    colour = lesion = None
    if args.lesion_features or (args.baselines and world.is_main):
        started = time.time()
        colour = colour_statistics(list(frame["filepath"]))
        if args.lesion_features:
            lesion = lesion_features(list(frame["filepath"]), colour)
            if world.is_main:
                print(f"lesion features of {len(frame)} images in {time.time() - started:.1f} s", flush=True)
    results = [
        train_fold(args, frame, fold, run_name, device, amp_dtype, world, colour, lesion)
        for fold, run_name in zip(folds, run_names, strict=True)
    ]
    oof_parts = [oof for oof, _, _, _ in results]
    oof = pd.concat(oof_parts, ignore_index=True)
    summary = {
        "folds": folds,
        "fold_auc": [binary_metrics(part["target"], part["prob"])["auc"] for part in oof_parts],
        "last_fold_auc": [last for _, _, _, last in results],
        "baselines": [baselines for _, baselines, _, _ in results],
        "models": [net for _, _, net, _ in results],
    }
    summary["mean_auc"] = float(np.mean(summary["fold_auc"]))
    summary["last_mean_auc"] = float(np.mean(summary["last_fold_auc"]))
    if len(folds) > 1 and world.is_main:
        oof_path = pooled_oof_path(args)
        write_csv_atomic(oof, oof_path)
        print(
            f"cross-validation: best-epoch auc per fold {[round(a, 4) for a in summary['fold_auc']]}, "
            f"mean {summary['mean_auc']:.4f} +- {np.std(summary['fold_auc']):.4f}; last-epoch auc per fold "
            f"{[round(a, 4) for a in summary['last_fold_auc']]}, mean {summary['last_mean_auc']:.4f} (the best epoch "
            f"is picked on the fold it is scored on: optimistic); pooled best-epoch predictions {oof_path}",
            flush=True,
        )
    return summary


if __name__ == "__main__":
    main()
