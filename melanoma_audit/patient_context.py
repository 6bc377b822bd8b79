"""Patient context ("ugly duckling") features: how an image stands out among its patient's other images.

A dermatologist compares a lesion with the patient's other moles: the one unlike the rest is suspicious even when
it would look ordinary among moles in general. Per image: the z-score and the rank within its patient of a score
(the image models' logit) and of each lesion feature, the distance of its standardised lesion features from the
patient's mean, and the patient's number of images. They read no labels, so a patient's test images may inform
each other. An image that is its patient's only one (or has no patient_id) has no context: NaN, which the trees of
stacking.py send down a branch of their own.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from melanoma_audit.patients import images_per_patient, patient_groups


def has_patient_context(frame: pd.DataFrame) -> bool:
    """True when at least one patient has more than one image: without, the features are all NaN."""
    return bool((images_per_patient(frame) > 1).any())


def describe_context(frame: pd.DataFrame) -> str:
    """One line saying whether the features are used, and why not."""
    counts = pd.Series(patient_groups(frame)).value_counts()
    several = counts[counts > 1]
    if several.empty:
        return "patient context: off (no patient has more than one image; a row without patient_id is its own patient)"
    return (
        f"patient context: on ({len(several)} patients with 2-{several.max()} images, {int(several.sum())} of "
        f"{len(frame)} images)"
    )


def patient_context(
    frame: pd.DataFrame, scores: dict[str, np.ndarray], scaled_lesion: np.ndarray
) -> tuple[np.ndarray, list[str]]:
    """The context features of the rows of `frame` (patients from its patient_id), and their names.

    `scores`: name -> one value per row (e.g. the mean logit of the runs); `scaled_lesion`: lesion features per row,
    standardised (features.FeatureScaler) so that the distance weighs every feature alike."""
    columns = {name: np.asarray(values, dtype=float) for name, values in scores.items()}
    columns |= {f"lesion{index}": scaled_lesion[:, index] for index in range(scaled_lesion.shape[1])}
    values = pd.DataFrame(columns)
    groups = patient_groups(frame)
    grouped = values.groupby(groups, sort=False)
    mean = grouped.transform("mean")
    spread = np.sqrt(((values - mean) ** 2).groupby(groups, sort=False).transform("mean"))
    # a feature equal on all of a patient's images sets no image apart: z-score 0 rather than 0/0
    z_score = (values - mean).div(spread.where(spread > 0)).fillna(0.0)
    rank = grouped.rank(pct=True)
    lesion_columns = [name for name in values.columns if name.startswith("lesion")]
    deviation = values[lesion_columns] - mean[lesion_columns]
    distance = np.sqrt((deviation**2).mean(axis=1)).to_numpy()

    n_images = images_per_patient(frame)
    alone = n_images == 1
    features = np.column_stack([n_images, z_score.to_numpy(), rank.to_numpy(), distance])
    features[alone, 1:] = np.nan
    names = (
        ["patient_images"]
        + [f"patient_z_{name}" for name in values.columns]
        + [f"patient_rank_{name}" for name in values.columns]
        + ["patient_distance"]
    )
    return features.astype(np.float32), names
