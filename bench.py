"""Throughput benchmarks: is training bound by the model or by its data, and what does test-time augmentation cost?

    python bench.py --enet-type efficientnet-b0 --image-size 128 --batch-size 32 --data-dir ../shared/data/isic2018
    python bench.py --mode predict --image-size 128 --batch-size 32 --data-dir ../shared/data/isic2018

--mode train (the default) measures (a) the training loop's own step (loops.train_one_epoch: forward, backward,
optimizer step) on one random batch and inference on random tensors, (b) the data pipeline alone (JPEG decode +
augmentation: images/s in one process = per worker, or with --data-path gpu the device pipeline's images/s on the
device), (c) the end-to-end training loop of train.py (same loader, train_one_epoch) on a data dir, and (d) peak
memory. The end-to-end figure over the bare step says how much the loop loses to its data. --data-path picks where
(b) and (c) decode and augment, as in train.py.

--mode predict measures, interleaved (best of --repeats, after a warm-up of every shape):
  bare       the bare model's forward pass on random tensors of --batch-size images (no data loading)
  bare_x8    the same on 8 x --batch-size images: the size of one TTA-8 forward pass
  predict    predict.py's own path (inference.MelanomaPredictor.probabilities: JPEG decode, resize, normalise, loader,
             forward) on the first --n-images test images of --data-dir, with --n-tta 1 and with --n-tta 8
The target is TTA-8 >= 0.9 x bare / 8 (the eight views are batched into one forward pass and nothing else costs).
--model-path times a train.py checkpoint; without it a randomly initialised MelanomaNet of --enet-type at
--image-size (the speed is the same).

Both modes print a table and write it as JSON (--json; default bench_results/<device>_<settings>_<digest>.json,
the settings starting with predict_ in predict mode, the digest a short hash of every flag that shapes the figures:
steps, workers, threads, images, data folder, ...; the JSON lists them all under "settings"). An existing results
file is replaced only with --overwrite.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import time
from pathlib import Path

import cv2
import pandas as pd
import torch

from dataset import EpochSampler
from melanoma_audit import device_data as dd
from melanoma_audit.cli import (
    Runtime,
    ScoringRuntime,
    add_compile_flag,
    add_data_path_flag,
    add_device_flags,
    add_num_workers_flag,
    add_overwrite_flag,
)
from melanoma_audit.engine import compile_for_training
from melanoma_audit.image_files import MIN_IMAGE_SIZE
from melanoma_audit.inference import LoadedModel, MelanomaPredictor, load_melanoma_model
from melanoma_audit.loops import (
    Images,
    Preparation,
    device_pipeline,
    image_dataset,
    image_loader,
    melanoma_loss,
    train_one_epoch,
)
from melanoma_audit.metadata import MetaEncoder
from melanoma_audit.tables import read_melanoma_table
from melanoma_audit.throughput import (
    forward_throughput,
    peak_memory_mb,
    random_batch,
    synchronize,
    training_step_throughput,
)
from models import ENET_TYPES, MelanomaNet, input_normalization
from utils import (
    UserError,
    exit_on_user_error,
    refuse_folder,
    resolve_precision,
    select_device,
    write_text_atomic,
)

TTA_VIEWS = 8  # predict mode compares TTA-8 with the bare pass


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", default="train", choices=("train", "predict"), help="what to time (see above)")
    parser.add_argument("--enet-type", default="efficientnet-b0", choices=ENET_TYPES)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    add_device_flags(parser)
    add_compile_flag(parser)
    parser.add_argument("--use-meta", action="store_true", help="train mode: a metadata branch of 12 inputs")
    parser.add_argument(
        "--data-dir", default=None, help="Kaggle-layout folder: train mode's data and loop parts, predict mode's images"
    )
    add_num_workers_flag(parser)
    add_data_path_flag(parser, scope="train mode: ")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--steps", type=int, default=10, help="train mode: timed steps per measurement (after warm-up)")
    parser.add_argument(
        "--warmup", type=int, default=2, help="train mode: untimed model steps first (the loop warms up on one epoch)"
    )
    parser.add_argument("--data-images", type=int, default=200, help="train mode: images for the data pipeline")
    parser.add_argument("--only", default="model,infer,data,loop", help="train mode: comma list of parts to run")
    parser.add_argument("--model-path", help="predict mode: a train.py checkpoint (default: a random model)")
    parser.add_argument("--n-images", type=int, default=256, help="predict mode: test images per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="predict mode: rounds of measurements, best kept")
    parser.add_argument("--json", default=None, help="write the results here (default bench_results/<settings>.json)")
    add_overwrite_flag(parser, "an existing results file")
    return parser.parse_args(argv)


TRAIN_PARTS = ("model", "infer", "data", "loop")


def check_counts(args: argparse.Namespace) -> None:
    """Counts that would time nothing (a division by zero, an empty table) end in one sentence."""
    least = {"--steps": (args.steps, 1), "--warmup": (args.warmup, 0), "--batch-size": (args.batch_size, 1)}
    least |= {"--image-size": (args.image_size, MIN_IMAGE_SIZE), "--num-workers": (args.num_workers, 0)}
    least |= {"--data-images": (args.data_images, 1), "--n-images": (args.n_images, 1), "--repeats": (args.repeats, 1)}
    if args.threads is not None:
        least["--threads"] = (args.threads, 1)
    for flag, (value, minimum) in least.items():
        if value < minimum:
            raise UserError(f"{flag} {value} must be at least {minimum}.")
    parts = [part for part in args.only.split(",") if part]
    unknown = [part for part in parts if part not in TRAIN_PARTS]
    if unknown or not parts:
        named = unknown[0] if unknown else "no part"
        raise UserError(f"--only {args.only!r} names {named}: choose from {','.join(TRAIN_PARTS)}.")


def settings_of(args: argparse.Namespace) -> dict:
    """Every flag that shapes the figures (all but where they are written), the data folder as an absolute path."""
    settings = {key: value for key, value in vars(args).items() if key not in ("json", "overwrite", "progress")}
    for key in ("data_dir", "model_path"):
        if settings[key] is not None:
            settings[key] = str(Path(settings[key]).resolve())
    return settings


def build_model(args: argparse.Namespace, device: torch.device, n_meta: int) -> MelanomaNet:
    model = MelanomaNet(args.enet_type, n_meta_features=n_meta, pretrained=False).to(device)
    return model.to(memory_format=torch.channels_last) if args.channels_last else model


# --------------------------------------------------------------------------- train mode


def bench_model_step(args: argparse.Namespace, device: torch.device, amp_dtype: torch.dtype | None) -> float:
    """Train img/s of the training loop's own step on one random batch already on the device: the ceiling for the
    training loop."""
    n_meta = 12 if args.use_meta else 0
    model = compile_for_training(build_model(args, device, n_meta), args.compile)
    batch = random_batch(args.batch_size, args.image_size, n_meta, device, args.channels_last)
    return training_step_throughput(
        model, batch, melanoma_loss(1), args.steps, args.warmup, device, amp_dtype, args.channels_last
    )


def training_images(args: argparse.Namespace, n_images: int) -> Images:
    """The first `n_images` training rows of --data-dir, with their encoded metadata under --use-meta."""
    frame = read_melanoma_table(args.data_dir, "train", use_meta=args.use_meta, require_target=True)
    frame = frame.head(n_images).reset_index(drop=True)
    meta = MetaEncoder().fit(frame).transform(frame) if args.use_meta else None
    return Images(frame["filepath"].tolist(), meta, frame["target"].to_numpy())


def full_augmentation(args: argparse.Namespace) -> Preparation:
    """train.py's training images at --image-size with the full 1st-place augmentation."""
    mean, std = input_normalization(args.enet_type)
    return Preparation(args.image_size, mean, std, "full", seed=0)


def bench_data_pipeline(args: argparse.Namespace, device: torch.device, data_path: str) -> float:
    """Decode + augment images/s. On the CPU path in this one process: what each DataLoader worker delivers. On the
    device path the device pipeline's, batch by batch, from bytes read beforehand (the workers' part)."""
    images, prep = training_images(args, args.data_images), full_augmentation(args)
    n_images = len(images.filepaths)
    if data_path == "cpu":
        dataset = image_dataset(images, prep)
        cv2.setNumThreads(1)  # as make_loader sets it for the workers
        for index in range(min(10, n_images)):
            dataset[(0, index)]
        started = time.perf_counter()
        for index in range(n_images):
            dataset[(1, index)]
        return n_images / (time.perf_counter() - started)
    dataset = dd.ByteDataset(images.filepaths, images.side, images.targets)
    pipeline = device_pipeline(prep, device)
    items, size = [dataset[index] for index in range(n_images)], args.batch_size
    batches = [dd.collate_bytes(items[start : start + size]) for start in range(0, n_images, size)]
    pipeline(batches[0], 0, 0)  # warm-up: the first call sets up the decoder and kernels
    synchronize(device)
    started = time.perf_counter()
    for index, batch in enumerate(batches):
        pipeline(batch, 1, index)
    synchronize(device)
    return n_images / (time.perf_counter() - started)


def bench_training_loop(
    args: argparse.Namespace, device: torch.device, amp_dtype: torch.dtype | None, data_path: str
) -> float:
    """train.py's loop (loader, workers, transfers, loss bookkeeping, scheduler) on real files, on `data_path`.

    Like train.py, one loader with persistent workers serves every epoch: the first epoch over the images is the
    warm-up (worker start, first allocations), the second is timed, from the first batch request to the last step."""
    n_timed = args.steps * args.batch_size
    images = training_images(args, n_timed)
    if len(images.filepaths) < n_timed:
        raise UserError(
            f"{args.data_dir} has {len(images.filepaths)} training images, too few for --steps {args.steps} of "
            f"--batch-size {args.batch_size}: lower --steps or --batch-size."
        )
    n_meta = 0 if images.side is None else images.side.shape[1]
    model = compile_for_training(build_model(args, device, n_meta), args.compile)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=100)
    runtime = Runtime(device, amp_dtype, args.channels_last, progress=False)
    scaler = runtime.grad_scaler()
    loss_fn = melanoma_loss(1)
    sampler = EpochSampler(n_timed, shuffle=True, seed=0)
    loader = image_loader(
        images, full_augmentation(args), sampler, args.batch_size, args.num_workers, device, data_path, drop_last=True
    )
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        synchronize(device)
        started = time.perf_counter()
        train_one_epoch(model, loader, optimizer, loss_fn, runtime, scaler, scheduler)
        synchronize(device)
        elapsed = time.perf_counter() - started
    return n_timed / elapsed


def bench_training(args: argparse.Namespace, device: torch.device, amp_dtype: torch.dtype | None) -> dict:
    parts = {part for part in args.only.split(",") if part}
    if args.data_dir is None:
        parts -= {"data", "loop"}
    data_path = dd.resolve_data_path(args.data_path, device)
    result = {"data_path": data_path}
    if "model" in parts:
        result["model_train_img_s"] = bench_model_step(args, device, amp_dtype)
    if "infer" in parts:
        model = build_model(args, device, 12 if args.use_meta else 0).eval()
        batch = random_batch(args.batch_size, args.image_size, model.n_meta_features, device, args.channels_last)
        result["model_infer_img_s"] = forward_throughput(model, batch, args.steps, args.warmup, device, amp_dtype)
    if "data" in parts:
        data_key = "data_img_s_per_worker" if data_path == "cpu" else "data_img_s_on_device"
        result[data_key] = bench_data_pipeline(args, device, data_path)
    if "loop" in parts:
        result["loop_train_img_s"] = bench_training_loop(args, device, amp_dtype, data_path)
        if "model_train_img_s" in result:
            result["loop_over_model"] = result["loop_train_img_s"] / result["model_train_img_s"]
    return result


# --------------------------------------------------------------------------- predict mode


def model_to_predict(args: argparse.Namespace, device: torch.device) -> LoadedModel:
    """The checkpoint of --model-path, or a random image-only MelanomaNet fed as predict.py would feed it."""
    if args.model_path:
        return load_melanoma_model(args.model_path, device, args.channels_last)
    mean, std = (list(values) for values in input_normalization(args.enet_type))
    return LoadedModel(Path("(random)"), build_model(args, device, 0).eval(), args.image_size, mean, std, None)


def predict_throughput(
    loaded: LoadedModel,
    frame: pd.DataFrame,
    n_tta: int,
    args: argparse.Namespace,
    device: torch.device,
    amp_dtype: torch.dtype | None,
) -> float:
    synchronize(device)
    started = time.perf_counter()
    runtime = ScoringRuntime(
        device,
        amp_dtype,
        channels_last=args.channels_last,
        progress=False,
        n_tta=n_tta,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
    )
    MelanomaPredictor(loaded, runtime).probabilities(frame)
    synchronize(device)
    return len(frame) / (time.perf_counter() - started)


def bench_prediction(args: argparse.Namespace, device: torch.device, amp_dtype: torch.dtype | None) -> dict:
    """predict.py's path with TTA 1 and 8 against bare forward passes of one and of eight batches."""
    if args.data_dir is None:
        raise UserError("--mode predict needs --data-dir: a Kaggle-layout folder whose test.csv lists the images.")
    loaded = model_to_predict(args, device)
    frame = read_melanoma_table(args.data_dir, "test", use_meta=False, require_target=False)
    frame = frame.head(args.n_images).reset_index(drop=True)

    def bare(batch_size: int):
        steps = max(1, round(len(frame) / batch_size))  # as many images as one predict measurement

        def measure() -> float:
            model, size = loaded.model, loaded.image_size
            batch = random_batch(batch_size, size, model.n_meta_features, device, args.channels_last)
            return forward_throughput(model, batch, steps, 0, device, amp_dtype)

        return measure

    def predict(n_tta: int):
        return lambda: predict_throughput(loaded, frame, n_tta, args, device, amp_dtype)

    measures = {
        "bare_img_s": bare(args.batch_size),
        "bare_x8_img_s": bare(TTA_VIEWS * args.batch_size),
        "predict_tta1_img_s": predict(1),
        "predict_tta8_img_s": predict(TTA_VIEWS),
    }
    for measure in measures.values():  # warm-up: the first pass of every batch shape sets up its kernels
        measure()
    best = dict.fromkeys(measures, 0.0)
    for _ in range(args.repeats):  # interleaved, so that a busy moment hurts every figure alike
        for name, measure in measures.items():
            best[name] = max(best[name], measure())
    return {
        "model": str(loaded.path),
        "image_size": loaded.image_size,
        "n_images": len(frame),
        "repeats": args.repeats,
        **best,
        "tta8_vs_bare_over_8": best["predict_tta8_img_s"] / (best["bare_img_s"] / TTA_VIEWS),
        "tta8_vs_bare_x8_over_8": best["predict_tta8_img_s"] / (best["bare_x8_img_s"] / TTA_VIEWS),
    }


# --------------------------------------------------------------------------- main


def results_path(args: argparse.Namespace, device: torch.device, precision: str) -> Path:
    """--json, else a name of the main settings and a digest of every setting (settings_of): runs that differ in
    anything that shapes their figures never share a file."""
    if args.json:
        return Path(args.json)
    model = Path(args.model_path).stem if args.model_path else args.enet_type
    settings = "predict_" if args.mode == "predict" else ""
    # a checkpoint's own size is what predict mode times; the model's name stands for it
    settings += model if args.mode == "predict" and args.model_path else f"{model}_{args.image_size}px"
    settings += f"_bs{args.batch_size}_{precision}"
    settings += "_cl" if args.channels_last else ""
    settings += "_compile" if args.compile else ""
    settings += "_gpudata" if args.mode == "train" and dd.resolve_data_path(args.data_path, device) == "gpu" else ""
    digest = hashlib.sha256(json.dumps(settings_of(args), sort_keys=True).encode()).hexdigest()[:8]
    return Path(f"bench_results/{device.type}_{settings}_{digest}.json")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with exit_on_user_error():
        check_counts(args)
        if args.mode == "predict" and (args.use_meta or args.compile or args.data_path != "auto"):
            raise UserError(
                "--use-meta, --compile and --data-path apply to --mode train: predict mode times predict.py's own "
                "path with --model-path as is."
            )
        if args.threads:
            torch.set_num_threads(args.threads)
        device = select_device(args.device)
        # as the timed script resolves it: train.py by image size, predict.py without
        image_size = args.image_size if args.mode == "train" else None
        amp_dtype = resolve_precision(args.precision, device, image_size)
        precision = str(amp_dtype or "fp32").replace("torch.", "")
        path = results_path(args, device, precision)
        refuse_folder(path, "--json", "bench.json")
        if path.exists() and not args.overwrite:
            raise UserError(f"{path} already exists: pass --overwrite to replace it, or choose another --json.")
        result = {
            "mode": args.mode,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
            "torch_threads": torch.get_num_threads(),
            "enet_type": "(checkpoint)" if args.model_path else args.enet_type,
            "image_size": args.image_size,
            "batch_size": args.batch_size,
            "precision": precision,
            "channels_last": args.channels_last,
            "compile": args.compile,
            "num_workers": args.num_workers,
        }
        bench = bench_training if args.mode == "train" else bench_prediction
        result.update(bench(args, device, amp_dtype))
        result["peak_memory_mb"] = peak_memory_mb(device)

        for key, value in result.items():
            print(f"{key:>24}  {value:.3f}" if isinstance(value, float) else f"{key:>24}  {value}")
        result["settings"] = settings_of(args)
        write_text_atomic(path, json.dumps(result, indent=2) + "\n")
        print(f"written {path}")
        return result


if __name__ == "__main__":
    main()
