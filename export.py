"""Export a melanoma checkpoint (train.py) or an artifact detector (multi_classification.py) to ONNX and/or
TorchScript, with a JSON beside it that says how to feed it, and check that the exported file scores like the
checkpoint.

    python export.py --model-path weights/lite0_128_fold0_best.pth          # weights/lite0_128_fold0_best.onnx + .json
    python export.py --model-path weights/artifacts.pth --format both --out exported/artifacts
    python export.py --model-path weights/lite0_128_fold0_best.pth --check-only   # check files exported earlier

The graph takes uint8 RGB images, NCHW, at the model's size (the normalisation is inside it), any batch size, and
for a --use-meta model the encoded metadata (and a model trained with lesion features their raw values); under
late fusion the metadata's logistic regression is inside the graph too, so its `probability` output is the
P(melanoma) that predict.py writes. The JSON holds the input size, the normalisation, the input and output names,
the metadata encoding (feature order and rules), and for the detector its heads and thresholds.

Before it finishes, the script scores a few synthetic images with the checkpoint (PyTorch) and with each exported
file (onnxruntime on the CPU, TorchScript), fed as the JSON says, and stops with exit code 2 when any probability
differs by more than --tolerance (the files just written are then removed). `predict.py --model-path X.onnx`
scores your own images with the exported file. Details: docs/export.md.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from dataset import Preprocessing
from melanoma_audit.checkpoints import kind_of, load_checkpoint
from melanoma_audit.cli import ScoringRuntime, add_overwrite_flag
from melanoma_audit.config import DEFAULTS
from melanoma_audit.detector_inference import ArtifactPredictor
from melanoma_audit.exported_graph import build_graph
from melanoma_audit.inference import MelanomaPredictor
from melanoma_audit.onnx_model import (
    ARTIFACT_OUTPUTS,
    FORMAT_SUFFIXES,
    IMAGE_INPUT,
    MELANOMA_OUTPUTS,
    SPEC_FORMAT,
    export_base,
    exported_probabilities,
    load_exported_model,
    spec_path,
)
from melanoma_audit.synthetic_dataset import make_synthetic_dataset
from melanoma_audit.tables import read_melanoma_table
from utils import UserError, atomic_path, ensure_writable_dir, exit_on_user_error, write_text_atomic

FORMATS = ("onnx", "torchscript", "both")
DEFAULT_TOLERANCE = 1e-4  # absolute, on probabilities
N_CHECK = 7  # check images, scored in batches of CHECK_BATCH: 3, 3 and 1, so the dynamic batch size is exercised
CHECK_BATCH = 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", required=True, help="a checkpoint of train.py or multi_classification.py")
    parser.add_argument(
        "--out",
        help="the exported files' path without suffix: <out>.onnx, <out>.torchscript.pt, <out>.json (default: the "
        "checkpoint's path without .pth)",
    )
    parser.add_argument("--format", default="onnx", choices=FORMATS, help="onnx (default), torchscript or both")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help=f"largest absolute difference in probability allowed between the checkpoint and an exported file "
        f"(default {DEFAULT_TOLERANCE:g})",
    )
    parser.add_argument("--check-only", action="store_true", help="export nothing: check the files at --out")
    add_overwrite_flag(parser, "files exported earlier")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- export


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def example_inputs(spec: dict) -> dict[str, torch.Tensor]:
    """Random inputs of the graph's shapes, batch 2 (one image would be a special case for the tracer)."""
    generator = torch.Generator().manual_seed(0)
    inputs = {}
    for name, entry in spec["inputs"].items():
        shape = [2, *entry["shape"][1:]]
        if entry["dtype"] == "uint8":
            inputs[name] = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
        else:
            inputs[name] = torch.rand(shape, generator=generator)
    return inputs


def export_onnx(graph: nn.Module, inputs: dict[str, torch.Tensor], output_names: list[str], path: Path) -> None:
    batch = torch.export.Dim("batch")
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        # every input shares the batch dimension, which the exporter reports as a warning; its progress lines
        # (stdout) say nothing a user acts on
        warnings.filterwarnings("ignore", "# The axis name")
        program = torch.onnx.export(
            graph,
            (inputs[IMAGE_INPUT],),
            kwargs={name: value for name, value in inputs.items() if name != IMAGE_INPUT},
            output_names=output_names,
            dynamic_shapes={name: {0: batch} for name in inputs},
            dynamo=True,
        )
    with atomic_path(path) as tmp:
        program.save(str(tmp), external_data=False)  # one self-contained file


def export_torchscript(graph: nn.Module, inputs: dict[str, torch.Tensor], path: Path) -> None:
    with warnings.catch_warnings(), atomic_path(path) as tmp:
        warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit is deprecated; users still ask for it
        torch.jit.save(torch.jit.trace(graph, example_kwarg_inputs=inputs), str(tmp))


# --------------------------------------------------------------------------- the parity check


def checkpoint_scores(model_path: Path, kind: str, frame: pd.DataFrame) -> np.ndarray:
    """The probabilities the checkpoint gives `frame`'s images, computed as predict.py (melanoma) or
    multi_classification.py --mode test (detector) computes them, on the CPU in fp32."""
    cpu = torch.device("cpu")
    if kind == "melanoma":
        runtime = ScoringRuntime(cpu, batch_size=len(frame))
        return MelanomaPredictor.from_checkpoint(model_path, runtime).probabilities(frame)
    # as multi_classification.py --mode test scores by default: channels-last, its --batch-size, one view
    runtime = ScoringRuntime(cpu, batch_size=DEFAULTS["artifact"]["any"]["batch_size"], channels_last=True)
    return ArtifactPredictor.from_checkpoint(model_path, runtime).probabilities(list(frame["filepath"]))


def parity_check(model_path: Path, kind: str, files: list[Path], tolerance: float) -> dict[str, float]:
    """The largest absolute difference in probability between the checkpoint and each exported file on N_CHECK
    synthetic images (with synthetic metadata: some of it missing); a UserError when one exceeds `tolerance`."""
    differences = {}
    with tempfile.TemporaryDirectory(prefix="export-check-") as folder:
        data = make_synthetic_dataset(folder, n_train=0, n_test=N_CHECK, image_size=256, seed=0)
        frame = read_melanoma_table(data, "test", use_meta=False, require_target=False)
        reference = checkpoint_scores(model_path, kind, frame)
        for path in files:
            scores = exported_probabilities(load_exported_model(path), frame, batch_size=CHECK_BATCH)
            differences[path.name] = float(np.max(np.abs(scores - reference)))
    for name, difference in differences.items():
        if not difference <= tolerance:  # NaN fails too
            raise UserError(
                f"the exported {name} disagrees with {model_path}: probabilities differ by up to {difference:.3g} "
                f"on {N_CHECK} check images, above the tolerance {tolerance:g}; do not use it (export it again, "
                "and report it if it persists)."
            )
    return differences


# --------------------------------------------------------------------------- main


def output_files(base: Path, fmt: str) -> dict[str, Path]:
    """format -> the exported file's path."""
    formats = ["onnx", "torchscript"] if fmt == "both" else [fmt]
    return {name: base.with_name(base.name + FORMAT_SUFFIXES[name]) for name in formats}


def listed_files(spec_file: Path) -> list[Path]:
    """The exported files a JSON lists, beside it."""
    try:
        listed = json.loads(spec_file.read_text()).get("files", {})
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise UserError(f"{spec_file} is not an export.py JSON: export the model again.") from None
    return [spec_file.with_name(name) for name in listed.values()]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with exit_on_user_error():
        model_path = Path(args.model_path)
        checkpoint = load_checkpoint(model_path, None)
        kind = kind_of(checkpoint["kind"])
        if Preprocessing.from_checkpoint(checkpoint) != Preprocessing():
            # the exported graph and its JSON describe a plain resize of the whole image, nothing before it
            raise UserError(
                f"{model_path} was trained with --color-constancy or --resize-mode other than none/stretch, which "
                "export.py does not write into the graph yet: export a model trained without them."
            )
        base = export_base(Path(args.out) if args.out else model_path.with_suffix(""))
        spec_file = spec_path(base)
        if not args.tolerance >= 0:
            raise UserError(f"--tolerance {args.tolerance} must be 0 or more, e.g. {DEFAULT_TOLERANCE:g}.")
        if args.check_only:
            return check_exported(model_path, kind, spec_file, args.tolerance)
        formats = output_files(base, args.format)
        files = list(formats.values())
        existing = [path for path in [*files, spec_file] if path.exists()]
        if existing and not args.overwrite:
            raise UserError(f"{existing[0]} already exists: pass --overwrite to replace it, or choose another --out.")
        ensure_writable_dir(base.parent, "folder of --out")
        differences = export_checked(checkpoint, model_path, formats, spec_file, args.tolerance)
        print(
            f"wrote {', '.join(map(str, files))} and {spec_file}; parity check passed: "
            f"{format_differences(differences)} (tolerance {args.tolerance:g})",
            flush=True,
        )
        return {"files": files, "spec": spec_file, "differences": differences}


def check_exported(model_path: Path, kind: str, spec_file: Path, tolerance: float) -> dict:
    """--check-only: the parity check of the files exported earlier that `spec_file` lists."""
    if not spec_file.is_file():
        raise UserError(f"{spec_file} does not exist: export the model first (drop --check-only) or fix --out.")
    files = listed_files(spec_file)
    missing = [path for path in files if not path.is_file()]
    if missing:
        raise UserError(f"{missing[0]} does not exist: export the model again or fix --out.")
    differences = parity_check(model_path, kind, files, tolerance)
    print(f"parity check passed: {format_differences(differences)} (tolerance {tolerance:g})")
    return {"files": files, "spec": spec_file, "differences": differences}


def export_checked(
    checkpoint: dict, model_path: Path, formats: dict[str, Path], spec_file: Path, tolerance: float
) -> dict[str, float]:
    """Writes the exported files and their JSON, then checks them against the checkpoint (parity_check) and adds
    the result to the JSON. Returns the check's differences; on any failure the files are removed again."""
    kind = kind_of(checkpoint["kind"])
    files = list(formats.values())
    graph, model_spec = build_graph(checkpoint, model_path)
    inputs = example_inputs(model_spec)
    output_names = list(ARTIFACT_OUTPUTS if kind == "artifact" else MELANOMA_OUTPUTS)
    spec = {
        "format": SPEC_FORMAT,
        **model_spec,
        "checkpoint": str(model_path),
        "checkpoint_sha256": file_sha256(model_path),
        "enet_type": checkpoint["model"]["enet_type"],
        "epoch": checkpoint.get("epoch"),
        "files": {name: path.name for name, path in formats.items()},
        "batch": "dynamic: the first axis of every input and output",
    }
    print(f"exporting {model_path} ({kind}, {spec['enet_type']}) to {', '.join(map(str, files))}", flush=True)
    try:
        if "onnx" in formats:
            export_onnx(graph, inputs, output_names, formats["onnx"])
        if "torchscript" in formats:
            export_torchscript(graph, inputs, formats["torchscript"])
        write_text_atomic(spec_file, json.dumps(spec, indent=2) + "\n")
        differences = parity_check(model_path, kind, files, tolerance)
    except BaseException:
        for path in [*files, spec_file]:  # never leave an unchecked export where predict.py would take it
            path.unlink(missing_ok=True)
        raise
    spec["parity"] = {
        "tolerance": tolerance,
        "max_abs_difference": differences,
        "check": f"{N_CHECK} synthetic images (synthetic.py, seed 0) with their metadata: the checkpoint in "
        "PyTorch (fp32, CPU) against each file (onnxruntime on the CPU; TorchScript)",
    }
    write_text_atomic(spec_file, json.dumps(spec, indent=2) + "\n")
    return differences


def format_differences(differences: dict[str, float]) -> str:
    return ", ".join(f"{name} max |difference| {value:.2g}" for name, value in differences.items())


if __name__ == "__main__":
    main()
