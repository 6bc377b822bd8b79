"""Combiners of several train.py runs, fitted on their out-of-fold predictions, and their honest (nested) score.

- mean: the mean probability; rank: the mean of each run's ranks scaled to (0, 1] (inference.combine). Neither
  learns anything from the labels.
- weights: non-negative weights on the runs' logits and an intercept, fitted by logistic regression.
- stack: a second stage of small gradient-boosted trees (LightGBM) on the runs' logits, the metadata (sex, age,
  site, encoded as baselines.py does), the lesion features and colour statistics (features.lesion_features) and,
  where patients have several images, the patient context (patient_context.py). While fitting, Gaussian noise is
  added to the logits, the ISIC 2024 winners' guard against trusting out-of-fold logits more than a test image's.

A combiner fitted on the same rows it is scored on is optimistic: nested_oof predicts each fold's rows with a
combiner fitted on the other folds' rows only (the runs' folds, grouped by patient). A fitted combiner is a dict of
plain values (the trees as LightGBM's text dump), saved as JSON: loading one never runs code.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightgbm
import numpy as np
import pandas as pd
from scipy.optimize import minimize
from scipy.special import expit, logit

from melanoma_audit.baselines import BASELINE_META_FEATURES, has_baseline_metadata
from melanoma_audit.features import FeatureScaler
from melanoma_audit.inference import combine
from melanoma_audit.metadata import MetaEncoder
from melanoma_audit.patient_context import patient_context
from utils import UserError, write_text_atomic

METHODS = ("mean", "rank", "weights", "stack")
UNFITTED = ("mean", "rank")  # learn nothing from the labels
COMBINER_KIND = "melanoma-ensemble"
COMBINER_FORMAT = 1
PROBABILITY_FLOOR = 1e-6  # a saturated probability would be an infinite logit


@dataclass
class StackInputs:
    """What a combiner reads about a set of images."""

    probs: np.ndarray  # (images, runs): each run's P(melanoma)
    frame: pd.DataFrame  # the images' rows: patient_id and metadata (read by the stack)
    lesion: np.ndarray | None = None  # features.lesion_features of the images (the stack needs them)

    def rows(self, mask: np.ndarray) -> StackInputs:
        lesion = None if self.lesion is None else self.lesion[mask]
        return StackInputs(self.probs[mask], self.frame[mask].reset_index(drop=True), lesion)


@dataclass(frozen=True)
class StackOptions:
    noise: float = 0.3  # the noise on the logits while fitting, in units of each logit's spread over the rows
    rounds: int = 200  # boosting rounds
    seed: int = 0
    context: bool = False  # use the patient context features
    metadata: bool = True  # use sex, age and site where the rows have them


def run_logits(probs: np.ndarray) -> np.ndarray:
    return logit(np.clip(probs, PROBABILITY_FLOOR, 1 - PROBABILITY_FLOOR))


# --------------------------------------------------------------------------- weights


def fit_weights(logits: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, float]:
    """Non-negative weights and an intercept for the runs' logits, minimising the log loss (logistic regression).

    Log loss rather than a smooth surrogate of the AUC: the AUC ignores scale, so it fits only the weights' ratio
    and leaves the output uncalibrated, while the log loss is convex in the weights (L-BFGS-B finds its one optimum)
    and its output is a probability. Bounded at zero (scikit-learn's LogisticRegression has no such bound): a
    negative weight bets that one run's errors cancel another's, which a few hundred positives cannot establish."""
    target = np.asarray(target, dtype=float)
    n_runs = logits.shape[1]

    def loss(params: np.ndarray) -> tuple[float, np.ndarray]:
        z = logits @ params[:-1] + params[-1]
        residual = (expit(z) - target) / len(z)
        return float(np.mean(np.logaddexp(0.0, z) - target * z)), np.append(logits.T @ residual, residual.sum())

    start = np.append(np.full(n_runs, 1.0 / n_runs), 0.0)
    bounds = [(0.0, None)] * n_runs + [(None, None)]
    result = minimize(loss, start, jac=True, method="L-BFGS-B", bounds=bounds)
    return result.x[:-1], float(result.x[-1])


# --------------------------------------------------------------------------- stack


def stack_params(n_rows: int, seed: int) -> dict:
    """Trees of depth 2 with a few dozen images a leaf, column and row subsampling and a strong L2 penalty: the
    real sample has 1600 rows (317 melanoma), so the second stage must stay far simpler than the first."""
    return {
        "objective": "binary",
        "learning_rate": 0.05,
        "num_leaves": 4,
        "max_depth": 2,
        "min_data_in_leaf": max(5, n_rows // 50),
        "feature_fraction": 0.5,
        "bagging_fraction": 0.8,
        "bagging_freq": 1,
        "lambda_l2": 10.0,
        "verbose": -1,
        "num_threads": 1,
        "deterministic": True,
        "force_col_wise": True,
        "seed": seed,
    }


def stack_features(state: dict, inputs: StackInputs) -> tuple[np.ndarray, list[str]]:
    """The second stage's input and the names of its columns: the runs' logits, the metadata, the lesion features
    and the patient context (from the mean logit and the lesion features without their unmeasurable flag)."""
    if inputs.lesion is None:
        raise ValueError("the stack reads lesion features: StackInputs.lesion is None")
    logits = run_logits(inputs.probs)
    parts, names = [logits], [f"logit_run{index}" for index in range(logits.shape[1])]
    if state["meta_encoder"] is not None:
        encoder = MetaEncoder.from_state_dict(state["meta_encoder"])
        parts.append(encoder.transform(inputs.frame))
        names += encoder.feature_names
    parts.append(inputs.lesion)  # unscaled: trees need no scaling and route NaN (unmeasurable) themselves
    names += [f"lesion{index}" for index in range(inputs.lesion.shape[1])]
    if state["context"]:
        scaled = FeatureScaler.from_state_dict(state["lesion_scaler"]).transform(inputs.lesion)
        context, context_names = patient_context(inputs.frame, {"logit": logits.mean(axis=1)}, scaled[:, :-1])
        parts.append(context)
        names += context_names
    names = [re.sub(r"[^0-9A-Za-z_]", "_", name) for name in names]  # LightGBM refuses JSON's special characters
    return np.concatenate(parts, axis=1).astype(np.float64), names


def fit_stack(inputs: StackInputs, target: np.ndarray, options: StackOptions) -> dict:
    with_metadata = options.metadata and has_baseline_metadata(inputs.frame)
    encoder = MetaEncoder(BASELINE_META_FEATURES).fit(inputs.frame) if with_metadata else None
    state = {
        "method": "stack",
        "meta_encoder": encoder.state_dict() if encoder else None,
        "lesion_scaler": FeatureScaler().fit(inputs.lesion).state_dict(),
        "context": options.context,
    }
    features, names = stack_features(state, inputs)
    n_runs = inputs.probs.shape[1]
    rng = np.random.default_rng(options.seed)
    spread = features[:, :n_runs].std(axis=0)
    features[:, :n_runs] += rng.normal(size=(len(features), n_runs)) * options.noise * spread
    dataset = lightgbm.Dataset(features, label=np.asarray(target), feature_name=names)
    booster = lightgbm.train(stack_params(len(features), options.seed), dataset, num_boost_round=options.rounds)
    return state | {"feature_names": names, "booster": booster.model_to_string()}


# --------------------------------------------------------------------------- any method


def fit_combiner(method: str, inputs: StackInputs, target: np.ndarray, options: StackOptions) -> dict:
    """A combiner fitted on these rows (nothing is fitted for mean and rank), as plain values."""
    if method in UNFITTED:
        return {"method": method}
    if method == "weights":
        weights, intercept = fit_weights(run_logits(inputs.probs), target)
        return {"method": method, "weights": weights.tolist(), "intercept": intercept}
    return fit_stack(inputs, target, options)


def predict_combiner(state: dict, inputs: StackInputs) -> np.ndarray:
    """P(melanoma) of each image (for rank, a rank score in (0, 1] over these images)."""
    method = state["method"]
    if method in UNFITTED:
        return combine(list(inputs.probs.T), rank_average=method == "rank")
    if method == "weights":
        return expit(run_logits(inputs.probs) @ np.asarray(state["weights"]) + state["intercept"])
    booster = lightgbm.Booster(model_str=state["booster"])
    return booster.predict(stack_features(state, inputs)[0])


def nested_oof(
    method: str,
    inputs: StackInputs,
    target: np.ndarray,
    folds: np.ndarray,
    options: StackOptions,
    fit: Callable[[str, StackInputs, np.ndarray, StackOptions], dict] = fit_combiner,
) -> np.ndarray:
    """Each fold's rows predicted by a combiner fitted on the other folds' rows only: the combiner's own
    out-of-fold predictions, whose AUC is an honest estimate (the runs' folds are grouped by patient, so are these)."""
    if method in UNFITTED:  # nothing learnt from labels: all rows at once, ranks over all rows as the runs' pooled AUC
        return predict_combiner(fit(method, inputs, target, options), inputs)
    prediction = np.full(len(target), np.nan)
    for fold in np.unique(folds):
        held_out = folds == fold
        state = fit(method, inputs.rows(~held_out), target[~held_out], options)
        prediction[held_out] = predict_combiner(state, inputs.rows(held_out))
    return prediction


def top_features(state: dict, count: int = 5) -> list[tuple[str, float]]:
    """The stack's features with the largest share of the trees' total gain."""
    booster = lightgbm.Booster(model_str=state["booster"])
    gain = booster.feature_importance("gain")
    share = gain / max(gain.sum(), 1e-12)
    order = np.argsort(-share)[:count]
    return [(state["feature_names"][index], float(share[index])) for index in order if share[index] > 0]


# --------------------------------------------------------------------------- files


def save_combiner(path: str | Path, record: dict) -> None:
    """Writes a combiner record (the fitted "combiner" and what scoring needs beside it) as JSON, atomically."""
    write_text_atomic(path, json.dumps({"kind": COMBINER_KIND, "format": COMBINER_FORMAT, **record}, indent=1))


def load_combiner(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"combiner {path} does not exist: check --combiner (ensemble.py writes <model-dir>/<name>.json)."
        )
    try:
        record = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"combiner {path} is not readable JSON ({error}): use a file written by ensemble.py.") from None
    if not isinstance(record, dict) or record.get("kind") != COMBINER_KIND:
        raise UserError(
            f"{path} is not an ensemble.py combiner (no kind {COMBINER_KIND!r}): pass one ensemble.py wrote."
        )
    if record.get("format") != COMBINER_FORMAT:
        raise UserError(
            f"combiner {path} has format {record.get('format')}, this version reads {COMBINER_FORMAT}: refit it with "
            "this version's ensemble.py."
        )
    return record
