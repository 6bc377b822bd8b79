"""Scoring with a model exported by export.py: the .onnx file (onnxruntime) or the TorchScript file, fed as the JSON
beside it says. predict.py scores with an .onnx file as with a checkpoint, so that an export can be checked end to
end on one's own data; export.py's parity check runs this same code.

The exported graph takes uint8 RGB images, NCHW, at the model's size (the normalisation is inside it); this module
decodes and resizes each file exactly as the checkpoint's own pipeline does (dataset.valid_transforms), encodes the
metadata with the encoder stored in the JSON, and computes the lesion features where the model reads them."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from dataset import EpochSampler, ImageDataset, Preprocessing, exported_input_transforms
from melanoma_audit.checkpoints import kind_of
from melanoma_audit.cli import ScoringRuntime, check_n_tta
from melanoma_audit.features import lesion_features
from melanoma_audit.inference import MelanomaPredictor, Predictor, dihedral, mean_probability_logit, meta_columns
from melanoma_audit.loops import make_loader
from melanoma_audit.metadata import MetaEncoder
from utils import UserError

SPEC_FORMAT = "melanoma-audit export 1"
FORMAT_SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
SPEC_SUFFIX = ".json"
IMAGE_INPUT, META_INPUT, LESION_INPUT = "image", "meta", "lesion_features"
# what the melanoma graph returns, in order; the detector's graph returns ARTIFACT_OUTPUTS
MELANOMA_OUTPUTS = ("probability", "network_log_odds", "metadata_log_odds")
ARTIFACT_OUTPUTS = ("probabilities", "logits")

Runner = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def export_base(path: str | Path) -> Path:
    """An exported file's path without its format suffix: <base>.onnx, <base>.torchscript.pt and <base>.json."""
    path = Path(path)
    for suffix in FORMAT_SUFFIXES.values():
        if path.name.endswith(suffix):
            return path.with_name(path.name[: -len(suffix)])
    return path


def is_exported(path: str | Path) -> bool:
    return any(str(path).endswith(suffix) for suffix in FORMAT_SUFFIXES.values())


def spec_path(path: str | Path) -> Path:
    """The JSON beside an exported file."""
    base = export_base(path)
    return base.with_name(base.name + SPEC_SUFFIX)


@dataclass
class ExportedModel:
    """An exported file ready to run, with what its JSON says about feeding it."""

    path: Path
    spec: dict
    run: Runner  # input name -> array, to output name -> array
    encoder: MetaEncoder | None
    info: dict = field(default_factory=dict)  # as LoadedModel.info: val_images, fold, epoch

    @property
    def kind(self) -> str:
        return self.spec["kind"]

    @property
    def image_size(self) -> int:
        return int(self.spec["inputs"][IMAGE_INPUT]["height"])

    @property
    def meta_columns(self) -> list[str]:
        return meta_columns(self.encoder)

    @property
    def uses_lesion_features(self) -> bool:
        return LESION_INPUT in self.spec["inputs"]

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing()  # export.py refuses models trained with any other


def onnx_runner(path: Path, device: torch.device) -> Runner:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the thread budget torch was given
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    try:
        session = onnxruntime.InferenceSession(str(path), options, providers=providers)
    except Exception as error:  # onnxruntime raises its own exception types, not OSError/ValueError subclasses
        raise UserError(f"{path} cannot be loaded by onnxruntime ({error}): export it again with export.py.") from None
    names = [output.name for output in session.get_outputs()]

    def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            return dict(zip(names, session.run(names, inputs), strict=True))
        except Exception as error:  # onnxruntime's own types: a name, shape or type its graph does not take
            first = str(error).strip().splitlines()[0]
            raise UserError(
                f"{path} does not take the inputs its JSON describes ({first}): export the model again with export.py."
            ) from None

    return run


def torchscript_runner(path: Path, device: torch.device, output_names: Sequence[str]) -> Runner:
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit is deprecated, still supported
            module = torch.jit.load(str(path), map_location=device)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise UserError(f"{path} is not a TorchScript file ({first}): export it again with export.py.") from None

    @torch.no_grad()
    def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = module(**{name: torch.from_numpy(array).to(device) for name, array in inputs.items()})
        return {name: tensor.cpu().numpy() for name, tensor in zip(output_names, outputs, strict=True)}

    return run


def load_exported_model(path: str | Path, device: torch.device | None = None) -> ExportedModel:
    """Loads an .onnx or .torchscript.pt file of export.py with the JSON beside it."""
    path, device = Path(path), device or torch.device("cpu")
    spec_file = spec_path(path)
    if not path.is_file():
        raise UserError(f"exported model {path} does not exist: check the path, or write it with export.py.")
    if not spec_file.is_file():
        raise UserError(
            f"{spec_file} is missing beside {path}: export.py writes both; keep the JSON next to the model file."
        )
    try:
        spec = json.loads(spec_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{spec_file} is not valid JSON ({error}): export the model again with export.py.") from None
    if not isinstance(spec, dict) or spec.get("format") != SPEC_FORMAT:
        raise UserError(f"{spec_file} was not written by export.py (no {SPEC_FORMAT!r} format): export again.")
    if path.name.endswith(FORMAT_SUFFIXES["onnx"]):
        run = onnx_runner(path, device)
    else:
        run = torchscript_runner(path, device, [output["name"] for output in spec["outputs"]])
    meta = spec["inputs"].get(META_INPUT)
    encoder = MetaEncoder.from_state_dict(meta["encoder"]) if meta else None
    info = {"val_images": spec.get("validation_images"), "fold": spec.get("fold"), "epoch": spec.get("epoch")}
    return ExportedModel(path, spec, run, encoder, info)


@dataclass
class ExportedPredictor(Predictor):
    """An exported melanoma model ready to score images under a runtime, as inference.MelanomaPredictor is for a
    checkpoint (its device, precision and channels-last are the checkpoint's; onnxruntime runs the graph as it is)."""

    loaded: ExportedModel

    def encode_metadata(self, frame: pd.DataFrame) -> None:
        return None  # the graph's metadata is encoded from each scored table with the JSON's encoder

    def probabilities(
        self, frame: pd.DataFrame, lesion: np.ndarray | None = None, meta: np.ndarray | None = None
    ) -> np.ndarray:
        runtime = self.runtime
        return exported_probabilities(
            self.loaded, frame, runtime.n_tta, runtime.batch_size, runtime.num_workers, runtime.progress, lesion
        )


def scoring_predictor(path: str | Path, runtime: ScoringRuntime) -> MelanomaPredictor | ExportedPredictor:
    """A melanoma model from a train.py checkpoint or from an exported file (export.py): what predict.py scores with."""
    if not is_exported(path):
        return MelanomaPredictor.from_checkpoint(path, runtime)
    exported = load_exported_model(path, runtime.device)
    if kind_of(exported.kind) != "melanoma":
        raise UserError(f"{path} is an exported artifact detector, not a melanoma model: pass a melanoma model.")
    return ExportedPredictor(exported, runtime)


# --------------------------------------------------------------------------- scoring


def image_batches(
    filepaths: Sequence[str], image_size: int, images_per_batch: int, num_workers: int, progress: bool | None
) -> Iterator[torch.Tensor]:
    """uint8 RGB NCHW batches of the files, in order, at the model's size."""
    dataset = ImageDataset(filepaths, exported_input_transforms(image_size))
    sampler = EpochSampler(len(dataset), shuffle=False, seed=0)
    loader = make_loader(dataset, sampler, images_per_batch, num_workers, torch.device("cpu"))
    disable = None if progress is None else not progress
    for batch in tqdm(loader, desc="predict", leave=False, disable=disable, dynamic_ncols=True):
        yield batch["image"]


def side_arrays(model: ExportedModel, frame: pd.DataFrame, lesion: np.ndarray | None) -> dict[str, np.ndarray]:
    """The graph's inputs beside the image, for every row of `frame`: the encoded metadata and the (unscaled)
    lesion features, where the model reads them."""
    arrays = {}
    if model.encoder is not None:
        arrays[META_INPUT] = model.encoder.transform(frame).astype(np.float32)
    if model.uses_lesion_features:
        values = lesion_features(list(frame["filepath"])) if lesion is None else lesion
        arrays[LESION_INPUT] = np.asarray(values, dtype=np.float32)
    return arrays


def exported_probabilities(
    model: ExportedModel,
    frame: pd.DataFrame,
    n_tta: int = 1,
    batch_size: int = 32,
    num_workers: int = 0,
    progress: bool | None = None,
    lesion: np.ndarray | None = None,
) -> np.ndarray:
    """P(melanoma) per row of `frame` (column filepath and the metadata columns), as
    inference.MelanomaPredictor computes it from the checkpoint: the network's probability averaged over the
    `n_tta` dihedral views, then the late-fusion metadata's log-odds added. The detector's rows: (images x heads)
    probabilities, no TTA. `batch_size` counts TTA views, as there."""
    check_n_tta(n_tta)
    artifact = kind_of(model.kind) == "artifact"
    n_tta = 1 if artifact else n_tta
    side = {} if artifact else side_arrays(model, frame, lesion)
    images_per_batch = max(1, batch_size // n_tta)
    results, start = [], 0
    for images in image_batches(list(frame["filepath"]), model.image_size, images_per_batch, num_workers, progress):
        n_images = len(images)
        views = torch.cat([dihedral(images, index) for index in range(n_tta)]).contiguous()
        inputs = {IMAGE_INPUT: views.numpy()}
        inputs |= {name: np.tile(array[start : start + n_images], (n_tta, 1)) for name, array in side.items()}
        outputs = model.run(inputs)
        start += n_images
        if artifact:
            results.append(outputs["probabilities"])
            continue
        network = torch.from_numpy(outputs["network_log_odds"]).view(n_tta, n_images)
        log_odds = mean_probability_logit(network).numpy() + outputs["metadata_log_odds"][:n_images]
        results.append(1.0 / (1.0 + np.exp(-log_odds)))
    return np.concatenate(results) if results else np.empty(0)
