"""What a run shows while it trains: one record per epoch, ``log.jsonl`` and ``progress.png``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from autoseg import atomic


@dataclass(frozen=True)
class EpochRecord:
    epoch: int
    train_loss: float
    val_loss: float
    pseudo_dice: tuple[float | None, ...]  # per foreground class; None where the class never occurred
    mean_pseudo_dice: float | None
    ema_pseudo_dice: float | None  # the moving average that picks checkpoint_best
    lr: float
    epoch_seconds: float
    new_best: bool

    def line(self) -> str:
        def fmt(v: float | None) -> str:
            return "n/a" if v is None else f"{v:.4f}"

        per_class = " ".join(fmt(d) for d in self.pseudo_dice)
        best = "  new best" if self.new_best else ""
        return (
            f"epoch {self.epoch}: train loss {self.train_loss:.4f}, val loss {self.val_loss:.4f},"
            f" pseudo Dice [{per_class}] mean {fmt(self.mean_pseudo_dice)} (avg {fmt(self.ema_pseudo_dice)}),"
            f" lr {self.lr:.2e}, {self.epoch_seconds:.1f} s{best}"
        )


def moving_average(previous: float | None, new: float | None, momentum: float) -> float | None:
    """nnU-Net's EMA of the pseudo Dice: ``momentum · old + (1 − momentum) · new``; the first value starts it."""
    if new is None:
        return previous
    if previous is None:
        return new
    return momentum * previous + (1 - momentum) * new


def write_log(path: Path, records: Sequence[EpochRecord]) -> None:
    atomic.write_text(path, "".join(json.dumps(asdict(r)) + "\n" for r in records))


def read_log(records: Sequence[dict[str, object]]) -> list[EpochRecord]:
    out = []
    for r in records:
        values = dict(r)
        values["pseudo_dice"] = tuple(values["pseudo_dice"])  # type: ignore[arg-type]
        out.append(EpochRecord(**values))  # type: ignore[arg-type]
    return out


def plot_progress(path: Path, records: Sequence[EpochRecord]) -> None:
    """Losses with the pseudo Dice and its average, epoch times, and the learning rate."""
    if not records:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r.epoch for r in records]
    fig, axes = plt.subplots(3, 1, figsize=(10, 11), sharex=True)
    ax = axes[0]
    ax.plot(epochs, [r.train_loss for r in records], color="tab:blue", label="train loss")
    ax.plot(epochs, [r.val_loss for r in records], color="tab:red", label="val loss")
    ax.set_ylabel("loss")
    dice_ax = ax.twinx()
    dice_ax.plot(epochs, [r.mean_pseudo_dice for r in records], color="tab:green", ls=":", label="pseudo Dice")
    dice_ax.plot(epochs, [r.ema_pseudo_dice for r in records], color="tab:green", label="pseudo Dice (avg)")
    dice_ax.set_ylabel("pseudo Dice")
    lines = ax.get_legend_handles_labels()
    dice_lines = dice_ax.get_legend_handles_labels()
    ax.legend(lines[0] + dice_lines[0], lines[1] + dice_lines[1], loc="upper left")
    axes[1].plot(epochs, [r.epoch_seconds for r in records], color="tab:purple")
    axes[1].set_ylabel("epoch time (s)")
    axes[2].plot(epochs, [r.lr for r in records], color="tab:orange")
    axes[2].set_ylabel("learning rate")
    axes[2].set_xlabel("epoch")
    fig.tight_layout()
    atomic.write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=80), suffix=".png")
    plt.close(fig)
