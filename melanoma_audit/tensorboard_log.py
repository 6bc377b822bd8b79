"""TensorBoard scalars of every epoch, written from a run's history: the history file (JSON lines or CSV) stays
the record, the event files are a view of it for `tensorboard --logdir`. The tag of a number is its name in the
history; where an epoch has one history row per head (the artifact detector), a head's numbers are tagged
<name>/<head> and the epoch's own (learning rate, losses, seconds) appear once."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

from utils import UserError

# the numbers an epoch has once, whatever its rows: the engine's own (engine.Epoch)
EPOCH_NUMBERS = ("lr", "train_loss", "valid_loss", "seconds")
IDENTIFIERS = ("epoch", "fold")  # name the row, not a curve


def tensorboard_installed() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def check_tensorboard_request(requested: bool | None) -> None:
    """--tensorboard given explicitly needs the package; left unset it is on where the package is installed."""
    if requested and not tensorboard_installed():
        raise UserError(
            "--tensorboard needs the tensorboard package: pip install tensorboard (or pip install -r "
            "requirements.txt), or pass --no-tensorboard."
        )


def epoch_scalars(records: Sequence[dict]) -> dict[str, float]:
    """One epoch's history rows as tag -> value."""
    scalars: dict[str, float] = {}
    for record in records:
        head = record.get("head")
        for name, value in record.items():
            if name in IDENTIFIERS or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            tag = name if head is None or name in EPOCH_NUMBERS else f"{name}/{head}"
            scalars[tag] = float(value)
    return scalars


class TensorBoardLog:
    """The event files of one run in `folder`, step = epoch number. Opened at the first write, so that a run that
    stops before its first checkpoint leaves no folder behind. The first write of a process replays the whole
    history after a purge marker at step 1: the events of an earlier process (a resumed run's first part, or an
    epoch it wrote after its last checkpoint) are then superseded, and every epoch appears once."""

    def __init__(self, folder: Path | None, requested: bool | None) -> None:
        """`requested` is --tensorboard's value (None: unset); config.RunConfig refused True without the package."""
        self.folder = folder if requested is not False else None
        if self.folder is not None and not tensorboard_installed():
            print(
                "notice: the tensorboard package is not installed, so this run writes no TensorBoard logs "
                "(pip install tensorboard; --no-tensorboard silences this).",
                flush=True,
            )
            self.folder = None
        self.writer = None
        self.last_epoch = 0  # the last epoch written by this process

    def write(self, history: Sequence[dict]) -> None:
        """Adds the epochs of `history` not written yet by this process."""
        if self.folder is None:
            return
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when it is used

            self.writer = SummaryWriter(str(self.folder), purge_step=1)
        epochs: dict[int, list[dict]] = {}
        for record in history:
            epochs.setdefault(int(record["epoch"]), []).append(record)
        for epoch, records in epochs.items():
            if epoch > self.last_epoch:
                for tag, value in epoch_scalars(records).items():
                    self.writer.add_scalar(tag, value, global_step=epoch)
                self.last_epoch = epoch
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
