"""What one fold of train.py trains and validates on: its rows, the side inputs beside the images with each
encoding fitted on the fold's training rows, late fusion's metadata regression, and what its checkpoints keep to
rebuild the model from the file alone."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from melanoma_audit.checkpoints import rows_fingerprint
from melanoma_audit.config import MelanomaConfig
from melanoma_audit.features import FeatureScaler, side_inputs
from melanoma_audit.loops import Images
from melanoma_audit.metadata import MetaEncoder
from models import MetadataLogit, input_normalization
from utils import UserError


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


def fold_images(inputs: FoldInputs) -> tuple[Images, Images | None]:
    """The fold's training and validation rows as the loaders read them (no validation rows in a refit)."""
    train_rows, valid_rows = inputs.train_rows, inputs.valid_rows
    train = Images(train_rows["filepath"].tolist(), inputs.train_side, train_rows["target"].to_numpy())
    if valid_rows.empty:
        return train, None
    return train, Images(valid_rows["filepath"].tolist(), inputs.valid_side, valid_rows["target"].to_numpy())
