"""Train the melanoma classifier (EfficientNet, optional metadata branch) on a Kaggle-layout folder.

    python train.py --save-name efficientnetb2_256_20ep --data-dir ./melanoma_external_256/ --image-size 256 \
        --n-epochs 20 --enet-type efficientnet-b2 --CUDA_VISIBLE_DEVICES 0 [--use-meta]

--fold none refits on every row for --n-epochs (the count cross-validation chose): nothing is validated, so it
writes <save-name>_final.pth and _last.pth but no _best.pth, no out-of-fold predictions and no baselines.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from baselines import baseline_aucs
from checkpoints import (
    claim_outputs,
    describe_split,
    fold_split,
    load_checkpoint,
    require_resumable,
    rows_fingerprint,
)
from config import MelanomaConfig
from device_data import resolve_data_path
from distributed import World
from engine import Epoch, RunOutputs, Scored, Task, fit, training_world
from features import FeatureScaler, colour_statistics, lesion_features, side_inputs
from loops import Images, Preparation, melanoma_loss
from metrics import binary_metrics, safe_auc
from models import MelanomaNet, MetadataLogit, input_normalization, melanoma_logit, melanoma_probability
from tables import MetaEncoder, find_train_csv, make_folds, read_melanoma_table
from trainer_flags import add_melanoma_flags, parse_command_line
from utils import (
    UserError,
    ensure_writable_dir,
    exit_on_user_error,
    precision_name,
    seed_everything,
    to_plain,
    write_csv_atomic,
)


def parse_args(argv: list[str] | None = None) -> MelanomaConfig:
    return parse_command_line(__doc__, add_melanoma_flags, MelanomaConfig, argv)


# --------------------------------------------------------------------------- pieces


def run_paths(config: MelanomaConfig, run_name: str) -> RunOutputs:
    """Every file a run (one fold, or the single run) writes; its out-of-fold predictions are the "oof" frame."""
    model_dir, log_dir = Path(config.model_dir), Path(config.log_dir)
    return RunOutputs(
        best=model_dir / f"{run_name}_best.pth",
        final=model_dir / f"{run_name}_final.pth",
        last=model_dir / f"{run_name}_last.pth",
        log=log_dir / f"log_{run_name}.txt",
        history=log_dir / f"metrics_{run_name}.jsonl",
        frames={"oof": log_dir / f"oof_{run_name}.csv"},
        tensorboard=log_dir / "tb" / run_name,
    )


def pooled_oof_path(config: MelanomaConfig) -> Path:
    """The out-of-fold predictions of all folds of a multi-fold run."""
    return Path(config.log_dir) / f"oof_{config.save_name}.csv"


def data_fingerprint(frame: pd.DataFrame) -> str:
    """What a run's checkpoints keep of the rows it read (their names and targets), to tell the same data later."""
    return rows_fingerprint(zip(frame["image_name"], frame["target"].astype(int), strict=True))


def earlier_fold_runs(config: MelanomaConfig) -> list[str]:
    """The fold runs (<save-name>_fold<k>) of which a file lies in the model or log folder."""
    pattern = re.compile(re.escape(config.save_name) + r"_fold\d+")
    found = set()
    for folder in {Path(config.model_dir), Path(config.log_dir)}:
        for path in folder.iterdir() if folder.is_dir() else []:
            for match in pattern.finditer(path.name):
                if path in run_paths(config, match.group(0)).files():
                    found.add(match.group(0))
    return sorted(found)


def log_line(record: dict) -> str:
    """The original trainer's log line (users parse it), with the extra metrics appended."""
    return (
        f"{record['time']} Fold {record['fold']}, Epoch {record['epoch']}, lr: {record['lr']:.7f}, "
        f"train loss: {record['train_loss']:.5f}, valid loss: {record['valid_loss']:.5f}, "
        f"acc: {record['acc']:.4f}, auc: {record['auc']:.6f}, balanced acc: {record['balanced_acc']:.4f}, "
        f"sensitivity: {record['sensitivity']:.4f}, specificity: {record['specificity']:.4f}."
    )


def refit_log_line(record: dict) -> str:
    """A refit's log line: the original line's training half, and why the validation half is missing."""
    return (
        f"{record['time']} Refit on all {record['n_images']} images (no validation fold), Epoch {record['epoch']}, "
        f"lr: {record['lr']:.7f}, train loss: {record['train_loss']:.5f}."
    )


def score_refit_epoch(epoch: Epoch, n_images: int) -> Scored:
    """A refit's epoch: nothing was held out, so no metric and no score (no best epoch)."""
    record = {
        "time": time.ctime(),
        "fold": None,
        "refit": True,
        "epoch": epoch.number,
        "lr": epoch.lr,
        "train_loss": epoch.train_loss,
        "n_images": n_images,
        "seconds": epoch.seconds,
    }
    return Scored(float("nan"), refit_log_line(record), [record], {})


def score_epoch(
    epoch: Epoch, fold: int, valid_rows: pd.DataFrame, evidence: np.ndarray | None, baselines: dict
) -> Scored:
    """One epoch's melanoma metrics (at a threshold of 0.5), its log line, and its out-of-fold predictions."""
    targets = epoch.targets.numpy()
    probs = melanoma_probability(epoch.logits, evidence)
    metrics = binary_metrics(targets, probs)
    if evidence is not None:  # under late fusion, also what the image network scores on its own
        metrics["image_auc"] = safe_auc(targets, melanoma_logit(epoch.logits))
    record = {
        "time": time.ctime(),
        "fold": fold,
        "epoch": epoch.number,
        "lr": epoch.lr,
        "train_loss": epoch.train_loss,
        "valid_loss": epoch.valid_loss,
        **metrics,
        **baselines,
        "seconds": epoch.seconds,
    }
    oof = pd.DataFrame(
        {"image_name": valid_rows["image_name"], "fold": fold, "target": valid_rows["target"], "prob": probs}
    )
    return Scored(metrics["auc"], log_line(record), [record], {"metrics": to_plain(metrics)}, {"oof": oof})


# --------------------------------------------------------------------------- one fold


@dataclass
class FoldInputs:
    """A fold's rows and what the network reads beside the images, each encoding fitted on the training rows."""

    train_rows: pd.DataFrame
    valid_rows: pd.DataFrame
    train_side: np.ndarray | None  # side inputs: the encoded metadata and the scaled lesion features
    valid_side: np.ndarray | None
    encoder: MetaEncoder | None
    scaler: FeatureScaler | None
    meta_model: MetadataLogit | None  # late fusion's metadata regression
    evidence: np.ndarray | None  # what it adds to each validation row's log-odds


def fold_inputs(config: MelanomaConfig, frame: pd.DataFrame, fold: int | None, lesion: np.ndarray | None) -> FoldInputs:
    """The rows of validation fold `fold` and of the others; fold None (a refit) trains on every row and
    validates on none."""
    in_fold = np.zeros(len(frame), dtype=bool) if fold is None else (frame["fold"] == fold).to_numpy()
    train_rows, valid_rows = frame[~in_fold].reset_index(drop=True), frame[in_fold].reset_index(drop=True)
    if fold is None and train_rows["target"].nunique() < 2:
        raise UserError(
            f"the training images hold only target {train_rows['target'].iloc[0]}: a classifier needs both; add "
            "images of the other class."
        )
    if fold is not None and valid_rows["target"].nunique() < 2:
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
    encoder = MetaEncoder(list(config.meta_features)).fit(train_rows) if config.use_meta else None
    scaler = train_lesion = valid_lesion = None
    if lesion is not None:
        train_lesion, valid_lesion = lesion[~in_fold], lesion[in_fold]
        scaler = FeatureScaler().fit(train_lesion)
    network_encoder = None if config.late_fusion else encoder
    train_side = side_inputs(train_rows, network_encoder, scaler, train_lesion)
    valid_side = None if fold is None else side_inputs(valid_rows, network_encoder, scaler, valid_lesion)
    meta_model = evidence = None
    if config.late_fusion:
        meta_model = MetadataLogit().fit(encoder.transform(train_rows), train_rows["target"], seed=config.seed)
        if fold is not None:
            evidence = meta_model.evidence(encoder.transform(valid_rows))
    return FoldInputs(train_rows, valid_rows, train_side, valid_side, encoder, scaler, meta_model, evidence)


def fold_checkpoint(
    config: MelanomaConfig, inputs: FoldInputs, fold: int | None, n_side: int, data_sha256: str
) -> dict:
    """What every checkpoint of the fold holds to rebuild the model and its input encoding from the file alone, and
    what ties it to its data and its split (checkpoints.fold_split: n_folds, the fold seed, data_sha256)."""
    mean, std = input_normalization(config.enet_type)
    encoder = inputs.encoder
    return {
        "model": {
            "enet_type": config.enet_type,
            "out_dim": config.out_dim,
            "n_meta_features": n_side,
            "n_meta_dim": list(config.n_meta_dim),
        },
        "use_meta": config.use_meta,
        "fusion": "late" if config.late_fusion else "concat",
        "meta_model": inputs.meta_model.state_dict() if inputs.meta_model else None,
        "meta_encoder": encoder.state_dict() if encoder else None,
        "meta_feature_names": encoder.feature_names if encoder else [],
        "lesion_features": inputs.scaler.state_dict() if inputs.scaler else None,
        "image_size": config.image_size,
        "mean": list(mean),
        "std": list(std),
        **config.preprocessing.record(),
        "fold": fold,
        "n_folds": None if fold is None else config.n_folds,
        # trained on every row (--fold none): it held out no image, so nothing can be scored as unseen by it
        "refit": fold is None,
        # fold membership is stored, never rebuilt: whatever later scores "held-out" rows reads them from here
        "val_images": inputs.valid_rows["image_name"].tolist(),
        "val_sha256": rows_fingerprint((name,) for name in inputs.valid_rows["image_name"]),
        "data_sha256": data_sha256,
    }


def fold_baselines(
    config: MelanomaConfig, frame: pd.DataFrame, fold: int, inputs: FoldInputs, colour: np.ndarray | None
) -> dict:
    """What the network is compared with on this fold, printed: late fusion's metadata regression on its own, and
    the baselines' validation AUCs (returned). First, the validation values the encoding has no column for."""
    for column, value, rows in inputs.encoder.unrecognised(inputs.valid_rows) if inputs.encoder else []:
        print(
            f"notice: {int(rows.sum())} validation image(s) of fold {fold} have {column} {value!r}, which no training "
            "image of the fold has: encoded as missing (predict.py and audit.py will ask for --allow-missing-meta).",
            flush=True,
        )
    if inputs.evidence is not None:
        alone = safe_auc(inputs.valid_rows["target"], inputs.evidence)
        print(f"late fusion: metadata logistic regression on the training fold (alone {alone:.4f})", flush=True)
    if not config.baselines:
        return {}
    in_fold = (frame["fold"] == fold).to_numpy()
    stats = {} if colour is None else {"train_stats": colour[~in_fold], "valid_stats": colour[in_fold]}
    baselines = baseline_aucs(inputs.train_rows, inputs.valid_rows, seed=config.seed, **stats)
    print("baselines on this fold: " + ", ".join(f"{k} {v:.4f}" for k, v in baselines.items()), flush=True)
    return baselines


def fold_images(inputs: FoldInputs) -> tuple[Images, Images | None]:
    """The fold's training and validation rows as the loaders read them (no validation rows in a refit)."""
    train_rows, valid_rows = inputs.train_rows, inputs.valid_rows
    train = Images(train_rows["filepath"].tolist(), inputs.train_side, train_rows["target"].to_numpy())
    if valid_rows.empty:
        return train, None
    return train, Images(valid_rows["filepath"].tolist(), inputs.valid_side, valid_rows["target"].to_numpy())


def train_fold(
    config: MelanomaConfig,
    frame: pd.DataFrame,
    fold: int | None,
    run_name: str,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    world: World,
    data_sha256: str,
    colour: np.ndarray | None = None,
    lesion: np.ndarray | None = None,
) -> dict:
    """Trains on every fold but `fold`, validates on `fold`; returns the out-of-fold predictions of the best
    epoch, the baselines' validation AUCs, the trained network and the last epoch's validation AUC (the best epoch
    is picked on this same fold, so its AUC is optimistic). Writes <run>_best/_final/_last.pth, the log,
    the metrics file and the OOF CSV (the main process only, in a distributed run). `data_sha256` fingerprints
    `frame` (data_fingerprint); `colour` and `lesion` hold the colour statistics and lesion features of every row of
    `frame`, computed once per run, where it needs them. Fold None is a refit on every row: no validation, no
    baselines, no best checkpoint and no OOF predictions (their entries are None and NaN)."""
    refit = fold is None
    inputs = fold_inputs(config, frame, fold, lesion)
    baselines = fold_baselines(config, frame, fold, inputs, colour) if world.is_main and not refit else {}
    n_side = 0 if inputs.train_side is None else inputs.train_side.shape[1]
    offset = 0 if refit else fold  # of the seeds: each fold its own
    seed_everything(config.seed + offset)
    net = MelanomaNet(
        config.enet_type,
        out_dim=config.out_dim,
        n_meta_features=n_side,
        n_meta_dim=list(config.n_meta_dim),
        pretrained=config.pretrained,
        weights_path=config.pretrained_weights,
        bn_momentum=config.bn_momentum,
    )
    torch.manual_seed(config.seed + offset + 1000 * world.rank)  # dropout differs per rank, the initial weights do not
    train_images, valid_images = fold_images(inputs)
    mean, std = input_normalization(config.enet_type)
    outputs = run_paths(config, run_name)
    if refit:
        score = functools.partial(score_refit_epoch, n_images=len(inputs.train_rows))
        outputs = dataclasses.replace(outputs, best=None, frames={})
    else:
        score = functools.partial(
            score_epoch, fold=fold, valid_rows=inputs.valid_rows, evidence=inputs.evidence, baselines=baselines
        )
    task = Task(
        kind="melanoma",
        name=run_name,
        net=net,
        train_images=train_images,
        valid_images=valid_images,
        preparation=Preparation(
            config.image_size, mean, std, config.augment, seed=config.seed + offset, preprocessing=config.preprocessing
        ),
        shuffle_seed=config.seed + offset,
        loss_fn=melanoma_loss(config.out_dim),
        score=score,
        checkpoint=fold_checkpoint(config, inputs, fold, n_side, data_sha256),
        outputs=outputs,
        log_line=refit_log_line if refit else log_line,
        data_name=str(find_train_csv(Path(config.data_dir))),
    )
    fitted = fit(task, config, world, device, amp_dtype)
    if refit:
        if world.is_main:
            print(
                f"refit: {config.n_epochs} epochs on all {len(inputs.train_rows)} images, nothing validated (no best "
                f"epoch, no out-of-fold predictions, no baselines); checkpoints {outputs.final} and {outputs.last}, "
                f"log {outputs.log}, metrics {outputs.history}",
                flush=True,
            )
        return {"oof": None, "baselines": {}, "net": fitted.net, "last_auc": float("nan"), "image_auc": float("nan")}
    history = fitted.progress.history
    last_auc = float(history[-1]["auc"])
    # under late fusion, the image network's own AUC at the best epoch (the network saved); NaN otherwise
    best_record = next(record for record in history if record["epoch"] == fitted.progress.best_epoch)
    image_auc = float(best_record.get("image_auc", float("nan")))
    if world.is_main:
        print(
            f"fold {fold}: best valid auc {fitted.progress.best_score:.4f} (epoch {fitted.progress.best_epoch}), "
            f"last epoch {last_auc:.4f}"
            + "".join(f" ({key} {value:.4f})" for key, value in baselines.items())
            + f"; checkpoints {outputs.best} and {outputs.final}, log {outputs.log}, metrics {outputs.history}, "
            f"out-of-fold predictions {outputs.frames['oof']}",
            flush=True,
        )
    return {
        "oof": fitted.progress.best["oof"],
        "baselines": baselines,
        "net": fitted.net,
        "last_auc": last_auc,
        "image_auc": image_auc,
    }


def check_outputs_free(config: MelanomaConfig, run_names: list[str]) -> None:
    """Refuses to overwrite an earlier run's files unless asked to (--overwrite), or told to continue it (--resume,
    which needs one of its _last.pth). The files of a --save-name are one unit: the single run's, those of every
    fold an earlier start trained, and the pooled predictions; --overwrite removes them all."""
    lasts = [run_paths(config, run_name).last for run_name in run_names]
    require_resumable(lasts, config.resume, "--save-name")
    names = dict.fromkeys([config.save_name, *run_names, *earlier_fold_runs(config)])
    files = dict.fromkeys(
        [*(path for name in names for path in run_paths(config, name).files()), pooled_oof_path(config)]
    )
    last = next((path for path in lasts if path.is_file()), lasts[0])
    claim_outputs(list(files), last, config.resume, config.overwrite, "choose another --save-name")


def fold_states(config: MelanomaConfig, data_sha256: str) -> list[dict]:
    """The _last.pth of every fold of the run that has one, this start's and earlier ones'; each must share this
    run's split (n_folds, fold seed, data fingerprint)."""
    split = {"n_folds": config.n_folds, "fold_seed": config.fold_seed, "data_sha256": data_sha256}
    states = []
    for fold in range(config.n_folds):
        last = run_paths(config, f"{config.save_name}_fold{fold}").last
        if not last.is_file():
            continue
        state = load_checkpoint(last, "melanoma")
        if fold_split(state) != split:
            raise UserError(
                f"{last} belongs to another fold split ({describe_split(fold_split(state))}) than this run: retrain "
                "the whole run with --overwrite, or choose another --save-name."
            )
        states.append(state)
    return states


def pooled_oof(config: MelanomaConfig, data_sha256: str) -> pd.DataFrame:
    """The best-epoch out-of-fold predictions of every finished fold of the run, read from their _last.pth:
    continuing some of the folds never drops the others; an unfinished fold joins once it has finished."""
    states = fold_states(config, data_sha256)
    finished = [state for state in states if state["epoch"] == state["config"]["n_epochs"]]
    return pd.concat([pd.DataFrame(state["best"]["oof"]) for state in finished], ignore_index=True)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    with exit_on_user_error():
        config = parse_args(argv)
        with training_world(config) as (world, device, amp_dtype):
            return run(config, world, device, amp_dtype)


def run(config: MelanomaConfig, world: World, device: torch.device, amp_dtype: torch.dtype | None) -> dict:
    """Trains the requested folds; returns per-fold AUCs, their mean, the baselines and the trained networks."""
    if not world.distributed and config.CUDA_VISIBLE_DEVICES and "," in config.CUDA_VISIBLE_DEVICES:
        print(
            "notice: one process trains on the first listed GPU; to train on all of them start "
            "`torchrun --nproc_per_node N train.py ...`.",
            flush=True,
        )
    folds = list(config.folds)
    frame = read_melanoma_table(
        config.data_dir, "train", config.use_meta, require_target=True, bad_images=config.bad_images
    )
    if not config.refit:  # a refit trains on every row: it needs no folds
        frame["fold"] = make_folds(frame, config.n_folds, config.fold_seed)
    data_sha256 = data_fingerprint(frame)
    run_names = [config.save_name] if len(folds) <= 1 else [f"{config.save_name}_fold{fold}" for fold in folds]
    if world.is_main:
        ensure_writable_dir(config.model_dir, "model folder (--model-dir)")
        ensure_writable_dir(config.log_dir, "log folder (--log-dir)")
        check_outputs_free(config, run_names)
        if config.resume and len(folds) > 1:
            fold_states(config, data_sha256)  # a fold of another split is refused before any training
    if world.distributed:
        dist.barrier()

    if world.is_main:
        split = (
            "a refit on every row, no validation fold"
            if config.refit
            else f"{config.n_folds} patient-grouped folds, validating on fold(s) {folds}"
        )
        print(
            f"{len(frame)} images ({int(frame['target'].sum())} melanoma), {split}; {config.enet_type} at "
            f"{config.image_size} px on {device}, "
            f"precision {precision_name(amp_dtype)}, data path {resolve_data_path(config.data_path, device)}"
            f"{', metadata branch' if config.use_meta else ''}"
            f"{', lesion features' if config.lesion_features else ''}"
            f"{', Shades of Gray colour constancy' if config.color_constancy != 'none' else ''}"
            f"{f', {config.resize_mode} to square' if config.resize_mode != 'stretch' else ''}",
            flush=True,
        )
    # image features once per run, not per fold: the baselines' colour statistics are also part of the lesion ones
    colour = lesion = None
    if config.lesion_features or (config.baselines and world.is_main and not config.refit):
        started = time.time()
        colour = colour_statistics(list(frame["filepath"]), preprocessing=config.preprocessing)
        if config.lesion_features:
            lesion = lesion_features(list(frame["filepath"]), colour, config.preprocessing)
            if world.is_main:
                print(f"lesion features of {len(frame)} images in {time.time() - started:.1f} s", flush=True)
    if config.refit:
        result = train_fold(
            config, frame, None, config.save_name, device, amp_dtype, world, data_sha256, colour, lesion
        )
        return {"refit": True, "folds": [], "models": [result["net"]]}
    results = [
        train_fold(config, frame, fold, run_name, device, amp_dtype, world, data_sha256, colour, lesion)
        for fold, run_name in zip(folds, run_names, strict=True)
    ]
    summary = {
        "folds": folds,
        "fold_auc": [binary_metrics(result["oof"]["target"], result["oof"]["prob"])["auc"] for result in results],
        "last_fold_auc": [result["last_auc"] for result in results],
        "image_fold_auc": [result["image_auc"] for result in results],
        "baselines": [result["baselines"] for result in results],
        "models": [result["net"] for result in results],
    }
    summary["mean_auc"] = float(np.mean(summary["fold_auc"]))
    summary["last_mean_auc"] = float(np.mean(summary["last_fold_auc"]))
    summary["image_mean_auc"] = float(np.mean(summary["image_fold_auc"]))
    if len(folds) > 1 and world.is_main:
        oof_path = pooled_oof_path(config)
        pooled = pooled_oof(config, data_sha256)
        write_csv_atomic(pooled, oof_path)
        print(
            f"cross-validation: best-epoch auc per fold {[round(a, 4) for a in summary['fold_auc']]}, "
            f"mean {summary['mean_auc']:.4f} +- {np.std(summary['fold_auc']):.4f}; last-epoch auc per fold "
            f"{[round(a, 4) for a in summary['last_fold_auc']]}, mean {summary['last_mean_auc']:.4f} (the best epoch "
            f"is picked on the fold it is scored on: optimistic); pooled best-epoch predictions of the finished "
            f"folds {sorted(pooled['fold'].unique().tolist())}: {oof_path}",
            flush=True,
        )
    return summary


if __name__ == "__main__":
    main()
