"""Grad-CAM overlays for evaluate.py: where in the image a melanoma model found the evidence for the score it gave,
for its most confident correct and its most wrong predictions. The maps come from captum's LayerGradCam on the
backbone's last conv block."""

from __future__ import annotations

from pathlib import Path

import cv2
import matplotlib
import numpy as np
import pandas as pd
import torch
from captum.attr import LayerGradCam
from matplotlib.figure import Figure

from melanoma_audit.image_files import read_image
from melanoma_audit.inference import LoadedModel, make_dataset
from melanoma_audit.report_plots import save_figure
from utils import UserError

CAM_GROUPS = ("confident", "wrong")  # the overlays' file name prefixes, as select_cam_images groups them


def grad_cam(
    model: torch.nn.Module, image: torch.Tensor, side: torch.Tensor | None, explain_melanoma: torch.Tensor
) -> np.ndarray:
    """Grad-CAM on the output of the backbone's last conv block (_conv_head + _bn1): the activations weighted by
    the spatial mean of their gradients, summed over channels, ReLU, scaled to [0, 1] per image. explain_melanoma
    (bool per image) picks the class whose score is explained: melanoma, or benign (the negated melanoma score)."""

    def class_scores(image: torch.Tensor, side: torch.Tensor | None) -> torch.Tensor:
        logits = model(image, side).float()
        # one melanoma logit: benign's score is its negation, so both classes are explained by a column index
        return torch.cat([-logits, logits], dim=1) if logits.shape[1] == 1 else logits

    model.eval()
    with torch.enable_grad():  # evaluate.py may run under no_grad; Grad-CAM needs the backward pass
        cam = LayerGradCam(class_scores, model.enet._bn1).attribute(
            image, target=explain_melanoma.long(), additional_forward_args=(side,), relu_attributions=True
        )
    cam = cam[:, 0].detach().float()
    peak = cam.flatten(1).max(dim=1).values[:, None, None]
    cam = torch.where(peak > 0, cam / torch.where(peak > 0, peak, 1.0), 0.0)  # gradients can be tiny: no epsilon
    return cam.cpu().numpy()


def overlay(image: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """Heat map (jet) over the image, both RGB uint8 at the image's size; the colour is laid on in proportion to
    the heat, so that the regions that did not matter keep their own look."""
    heat = cv2.resize(cam.astype(np.float32), (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)
    colored = matplotlib.colormaps["jet"](heat)[..., :3] * 255
    weight = 0.6 * heat[..., None]
    return ((1 - weight) * image + weight * colored).clip(0, 255).astype(np.uint8)


def select_cam_images(frame: pd.DataFrame, threshold: float, n: int) -> pd.DataFrame:
    """The n most confident correct and the n most wrong predictions, with a group and rank."""
    predicted = (frame["prob"] >= threshold).astype(int)
    correct = predicted == frame["target"]
    confidence = np.maximum(frame["prob"], 1 - frame["prob"])
    error = (frame["target"] - frame["prob"]).abs()
    confident = frame[correct].assign(key=confidence[correct]).nlargest(n, "key").assign(group="confident")
    wrong = frame[~correct].assign(key=error[~correct]).nlargest(n, "key").assign(group="wrong")
    chosen = pd.concat([confident, wrong], ignore_index=True)
    chosen["rank"] = chosen.groupby("group").cumcount() + 1
    chosen["explain_melanoma"] = chosen["prob"] >= threshold
    return chosen.drop(columns="key")


def write_cams(
    loaded: LoadedModel, chosen: pd.DataFrame, table: pd.DataFrame, cam_dir: Path, device: torch.device
) -> list[Path]:
    """Grad-CAM overlays (image | overlay) for the chosen rows; `table` is the data folder's CSV (filepath and
    metadata), encoded as a whole as in training."""
    table = table.set_index("image_name", drop=False)
    absent = [name for name in chosen["image_name"] if name not in table.index]
    if absent:
        raise UserError(f"image {absent[0]} of the predictions is not in the --data-dir CSV: pass the right folder.")
    dataset = make_dataset(loaded, table)
    side = -(-loaded.image_size // 32)  # the last conv block has a stride of 32 (padded: rounded up)
    if side < 4:
        print(
            f"notice: at {loaded.image_size} px the last conv map is {side}x{side}: the heat maps can only point at "
            "coarse regions (train at 128 px or more for finer ones).",
            flush=True,
        )
    position = {name: i for i, name in enumerate(table["image_name"])}
    for stale in [path for group in CAM_GROUPS for path in cam_dir.glob(f"{group}_*.png")]:  # of the report replaced
        stale.unlink()
    written = []
    for row in chosen.itertuples(index=False):
        item = dataset[position[row.image_name]]
        side = item["side"][None].to(device) if "side" in item else None
        explain = torch.tensor([bool(row.explain_melanoma)], device=device)
        cam = grad_cam(loaded.model, item["image"][None].to(device), side, explain)[0]
        # the picture the network was shown, before its resize: the heat map's square is this one
        image = loaded.preprocessing.apply(read_image(table.loc[row.image_name, "filepath"]))
        figure = Figure(figsize=(7, 3.8))  # no pyplot: nothing global to close
        axes = figure.subplots(1, 2)
        axes[0].imshow(image)
        axes[1].imshow(overlay(image, cam))
        for axis in axes:
            axis.axis("off")
        explained = "melanoma" if row.explain_melanoma else "benign"
        figure.suptitle(
            f"{row.image_name}  P(melanoma) {row.prob:.3f}  label {'melanoma' if row.target else 'benign'}\n"
            f"{row.group} #{row.rank}: Grad-CAM of the '{explained}' score",
            fontsize=9,
        )
        path = cam_dir / f"{row.group}_{row.rank:02d}_{row.image_name}.png"
        save_figure(figure, path)
        written.append(path)
    return written
