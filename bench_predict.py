"""Benchmark of prediction with test-time augmentation: is TTA-8 as cheap as eight bare forward passes?

    python bench_predict.py --data-dir ../shared/data/isic2018/ --image-size 128 --batch-size 32

Measures, in one process and interleaved (best of --repeats, after a warm-up of every shape):
  bare       the bare model's forward pass on random tensors of --batch-size images (no data loading)
  bare x8    the same on 8 x --batch-size images: the size of one TTA-8 forward pass
  predict    predict.py's own path (inference.predict_probabilities: JPEG decode, resize, normalise, loader,
             forward) on the first --n-images test images, with --n-tta 1 and with --n-tta 8
and prints images per second; the target is TTA-8 >= 0.9 x bare / 8 (the eight views are batched into one
forward pass and nothing else costs). --model-path scores a train.py checkpoint; without it a randomly
initialised MelanomaNet of --enet-type at --image-size is used (the speed is the same).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dataset import read_melanoma_table
from inference import LoadedModel, load_melanoma_model, predict_probabilities
from models import ENET_TYPES, MelanomaNet, input_normalization
from utils import add_device_flags, autocast, exit_on_user_error, resolve_precision, select_device, write_text_atomic


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/data/isic2018", help="Kaggle-layout folder with test.csv")
    parser.add_argument("--model-path", help="a train.py checkpoint (default: a random model)")
    parser.add_argument("--enet-type", default="efficientnet-b0", choices=ENET_TYPES)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--n-images", type=int, default=256, help="test images per predict measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-workers", type=int, default=0, help="data-loading processes of the predict path")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    add_device_flags(parser)
    parser.add_argument("--json", help="also write the figures to this JSON file")
    return parser.parse_args(argv)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def bare_throughput(loaded: LoadedModel, batch: int, n_images: int, device, amp_dtype, channels_last: bool) -> float:
    """Images per second of the model's forward pass alone, on random input already on the device."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    image = torch.randn(batch, 3, loaded.image_size, loaded.image_size, device=device)
    image = image.contiguous(memory_format=memory_format)
    n_side = loaded.model.n_meta_features
    meta = torch.zeros(batch, n_side, device=device) if n_side else None
    steps = max(1, round(n_images / batch))
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        with autocast(device, amp_dtype):
            loaded.model(image, meta)
    synchronize(device)
    return steps * batch / (time.perf_counter() - started)


def predict_throughput(loaded: LoadedModel, frame, n_tta: int, args, device, amp_dtype) -> float:
    synchronize(device)
    started = time.perf_counter()
    predict_probabilities(
        loaded,
        frame,
        device,
        amp_dtype,
        n_tta=n_tta,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        channels_last=args.channels_last,
        progress=False,
    )
    synchronize(device)
    return len(frame) / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with exit_on_user_error():
        if args.threads:
            torch.set_num_threads(args.threads)
        device = select_device(args.device)
        amp_dtype = resolve_precision(args.precision, device)
        if args.model_path:
            loaded = load_melanoma_model(args.model_path, device, args.channels_last)
        else:
            model = MelanomaNet(args.enet_type, pretrained=False).eval().to(device)
            if args.channels_last:
                model = model.to(memory_format=torch.channels_last)
            mean, std = (list(values) for values in input_normalization(args.enet_type))
            loaded = LoadedModel(Path("(random)"), model, args.image_size, mean, std, None)
        frame = read_melanoma_table(args.data_dir, "test", use_meta=False, require_target=False)
        frame = frame.head(args.n_images).reset_index(drop=True)

        measures = {
            "bare": lambda: bare_throughput(loaded, args.batch_size, len(frame), device, amp_dtype, args.channels_last),
            "bare_x8": lambda: bare_throughput(
                loaded, 8 * args.batch_size, len(frame), device, amp_dtype, args.channels_last
            ),
            "predict_tta1": lambda: predict_throughput(loaded, frame, 1, args, device, amp_dtype),
            "predict_tta8": lambda: predict_throughput(loaded, frame, 8, args, device, amp_dtype),
        }
        for measure in measures.values():  # warm-up: the first pass of every batch shape sets up its kernels
            measure()
        best = dict.fromkeys(measures, 0.0)
        for _ in range(args.repeats):  # interleaved, so that a busy moment hurts every figure alike
            for name, measure in measures.items():
                best[name] = max(best[name], measure())

        result = {
            "device": str(device),
            "threads": torch.get_num_threads(),
            "enet_type": args.enet_type if not args.model_path else "(checkpoint)",
            "model": str(loaded.path),
            "image_size": loaded.image_size,
            "batch_size": args.batch_size,
            "precision": str(amp_dtype or "fp32"),
            "channels_last": args.channels_last,
            "num_workers": args.num_workers,
            "n_images": len(frame),
            "img_per_s": {name: round(value, 2) for name, value in best.items()},
            "tta8_vs_bare_over_8": round(best["predict_tta8"] / (best["bare"] / 8), 3),
            "tta8_vs_bare_x8_over_8": round(best["predict_tta8"] / (best["bare_x8"] / 8), 3),
        }
        print(
            f"{loaded.path} at {loaded.image_size} px, batch {args.batch_size}, {result['precision']}, "
            f"channels_last {args.channels_last}, {result['threads']} threads, {args.num_workers} workers, "
            f"{len(frame)} images, best of {args.repeats}\n"
            f"  bare forward           {best['bare']:8.1f} img/s   (/8 = {best['bare'] / 8:.1f})\n"
            f"  bare forward, 8x batch {best['bare_x8']:8.1f} img/s   (/8 = {best['bare_x8'] / 8:.1f})\n"
            f"  predict, TTA 1         {best['predict_tta1']:8.1f} img/s\n"
            f"  predict, TTA 8         {best['predict_tta8']:8.1f} img/s   = {result['tta8_vs_bare_over_8']:.2f} x "
            f"bare/8, {result['tta8_vs_bare_x8_over_8']:.2f} x (bare 8x batch)/8  (target >= 0.90)",
            flush=True,
        )
        if args.json:
            write_text_atomic(args.json, json.dumps(result, indent=2) + "\n")
        return result


if __name__ == "__main__":
    main()
