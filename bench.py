"""Throughput benchmark: is training bound by the model, or by data loading and bookkeeping?

    python bench.py --enet-type efficientnet-b0 --image-size 128 --batch-size 32 --data-dir ../shared/data/isic2018

Measures (a) the bare model's train step (forward, backward, optimizer step) and inference on random tensors,
(b) the data pipeline alone (JPEG decode + augmentation, images/s in one process = per worker), (c) the end-to-end
training loop of train.py (same Dataset, DataLoader, train_one_epoch) on a data dir, and (d) peak memory. Prints a
table and writes JSON. The end-to-end figure over the bare step says how much the loop loses to its data.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import cv2
import torch

from dataset import EpochSampler, ImageDataset, MetaEncoder, read_melanoma_table, train_transforms
from models import ENET_TYPES, MelanomaNet
from train import melanoma_loss
from utils import (
    add_compile_flag,
    add_device_flags,
    autocast,
    compile_for_training,
    default_num_workers,
    exit_on_user_error,
    make_grad_scaler,
    make_loader,
    resolve_precision,
    select_device,
    train_one_epoch,
    write_text_atomic,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--enet-type", default="efficientnet-b0", choices=ENET_TYPES)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    add_device_flags(parser)
    add_compile_flag(parser)
    parser.add_argument("--use-meta", action="store_true")
    parser.add_argument("--data-dir", default=None, help="Kaggle-layout folder for the data and end-to-end parts")
    parser.add_argument("--num-workers", type=int, default=default_num_workers())
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement (after warm-up)")
    parser.add_argument(
        "--warmup", type=int, default=2, help="untimed model steps first (the loop warms up on one untimed epoch)"
    )
    parser.add_argument("--data-images", type=int, default=200, help="images for the data-pipeline measurement")
    parser.add_argument("--only", default="model,infer,data,loop", help="comma list of parts to run")
    parser.add_argument("--json", default=None, help="write the results here (default bench_results/<settings>.json)")
    return parser.parse_args(argv)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def build_model(args: argparse.Namespace, device: torch.device, n_meta: int) -> MelanomaNet:
    model = MelanomaNet(args.enet_type, n_meta_features=n_meta, pretrained=False).to(device)
    return model.to(memory_format=torch.channels_last) if args.channels_last else model


def bench_model_step(args, device, amp_dtype) -> float:
    """Train img/s of forward + backward + Adam step on random tensors: the ceiling for the training loop."""
    n_meta = 12 if args.use_meta else 0
    model = compile_for_training(build_model(args, device, n_meta).train(), args.compile)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    scaler = make_grad_scaler(device, amp_dtype)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    image = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    image = image.contiguous(memory_format=memory_format)
    meta = torch.randn(args.batch_size, n_meta, device=device) if n_meta else None
    target = torch.randint(0, 2, (args.batch_size,), device=device).float()
    loss_fn = melanoma_loss(1)
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            synchronize(device)
            started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, amp_dtype):
            logits = model(image, meta)
        loss = loss_fn(logits.float(), target)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        loss.item()  # the training loop reads the loss every step too
    synchronize(device)
    return args.steps * args.batch_size / (time.perf_counter() - started)


@torch.no_grad()
def bench_inference(args, device, amp_dtype) -> float:
    model = build_model(args, device, 12 if args.use_meta else 0).eval()
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    image = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    image = image.contiguous(memory_format=memory_format)
    meta = torch.randn(args.batch_size, 12, device=device) if args.use_meta else None
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            synchronize(device)
            started = time.perf_counter()
        with autocast(device, amp_dtype):
            model(image, meta).float().cpu()
    synchronize(device)
    return args.steps * args.batch_size / (time.perf_counter() - started)


def training_dataset(args, start: int = 0, stop: int | None = None) -> tuple[ImageDataset, int]:
    frame = read_melanoma_table(args.data_dir, "train", use_meta=args.use_meta, require_target=True)
    frame = frame.iloc[start:stop].reset_index(drop=True)
    meta = MetaEncoder().fit(frame).transform(frame) if args.use_meta else None
    dataset = ImageDataset(frame["filepath"], train_transforms(args.image_size), meta, frame["target"], augment_seed=0)
    return dataset, 0 if meta is None else meta.shape[1]


def bench_data_pipeline(args) -> float:
    """Decode + augment images/s in this one process: what each DataLoader worker delivers."""
    dataset, _ = training_dataset(args)
    cv2.setNumThreads(1)  # as make_loader sets it for the workers
    n_images = min(args.data_images, len(dataset))
    for index in range(min(10, n_images)):
        dataset[(0, index)]
    started = time.perf_counter()
    for index in range(n_images):
        dataset[(1, index)]
    return n_images / (time.perf_counter() - started)


def bench_training_loop(args, device, amp_dtype) -> float:
    """train.py's loop (DataLoader, workers, transfers, loss bookkeeping, scheduler) on real files.

    Like train.py, one loader with persistent workers serves every epoch: the first epoch over the images is the
    warm-up (worker start, first allocations), the second is timed, from the first batch request to the last step."""
    n_timed = args.steps * args.batch_size
    dataset, n_meta = training_dataset(args, 0, n_timed)
    if len(dataset) < n_timed:
        raise SystemExit(f"--data-dir has too few images for {args.steps} steps of {args.batch_size}: lower --steps")
    model = compile_for_training(build_model(args, device, n_meta), args.compile)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=100)
    scaler = make_grad_scaler(device, amp_dtype)
    loss_fn = melanoma_loss(1)
    sampler = EpochSampler(len(dataset), shuffle=True, seed=0)
    loader = make_loader(dataset, sampler, args.batch_size, args.num_workers, device, drop_last=True)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        synchronize(device)
        started = time.perf_counter()
        train_one_epoch(
            model, loader, optimizer, loss_fn, device, amp_dtype, scaler, scheduler, args.channels_last, progress=False
        )
        synchronize(device)
        elapsed = time.perf_counter() - started
    return n_timed / elapsed


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with exit_on_user_error():
        device = select_device(args.device)
        amp_dtype = resolve_precision(args.precision, device, args.image_size)
        parts = set(args.only.split(","))
        if args.data_dir is None:
            parts -= {"data", "loop"}
        result = {
            "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
            "torch_threads": torch.get_num_threads(),
            "enet_type": args.enet_type,
            "image_size": args.image_size,
            "batch_size": args.batch_size,
            "precision": str(amp_dtype or "fp32").replace("torch.", ""),
            "channels_last": args.channels_last,
            "compile": args.compile,
            "num_workers": args.num_workers,
        }
        if "model" in parts:
            result["model_train_img_s"] = bench_model_step(args, device, amp_dtype)
        if "infer" in parts:
            result["model_infer_img_s"] = bench_inference(args, device, amp_dtype)
        if "data" in parts:
            result["data_img_s_per_worker"] = bench_data_pipeline(args)
        if "loop" in parts:
            result["loop_train_img_s"] = bench_training_loop(args, device, amp_dtype)
            if "model_train_img_s" in result:
                result["loop_over_model"] = result["loop_train_img_s"] / result["model_train_img_s"]
        result["peak_memory_mb"] = peak_memory_mb(device)

        for key, value in result.items():
            print(f"{key:>24}  {value:.3f}" if isinstance(value, float) else f"{key:>24}  {value}")
        settings = f"{args.enet_type}_{args.image_size}px_bs{args.batch_size}_{result['precision']}"
        settings += "_cl" if args.channels_last else ""
        settings += "_compile" if args.compile else ""
        path = Path(args.json or f"bench_results/{device.type}_{settings}.json")
        write_text_atomic(path, json.dumps(result, indent=2) + "\n")
        print(f"written {path}")
        return result


if __name__ == "__main__":
    main()
