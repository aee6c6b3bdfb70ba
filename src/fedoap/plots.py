"""Plots of a run folder (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fedoap.fileio import save_figure  # noqa: E402


def plot_curves(rows: list[dict[str, Any]], out_dir: Path, title: str) -> list[Path]:
    """Validation Dice and training loss per client against round (fine-tuning epochs continue
    the round axis, after a dashed line) of the method's models."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # The method's own models; a safeguard's local-only model has its rows in metrics.csv.
    rows = [r for r in rows if r["stage"] in ("federated", "finetune")]
    clients = list(dict.fromkeys(r["client"] for r in rows))
    last_fed = max((r["round"] for r in rows if r["stage"] == "federated"), default=0)
    paths = []
    for key, label, fname in (
        ("val_dice", "validation Dice", "val_dice.png"),
        ("train_loss", "training loss", "train_loss.png"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        for c in clients:
            pts = [
                (r["round"], r[key]) for r in rows if r["client"] == c and r.get(key) is not None
            ]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker="o", ms=3, label=c)
        if any(r["stage"] == "finetune" for r in rows):
            ax.axvline(last_fed + 0.5, ls="--", c="gray", lw=0.8)
            ax.text(last_fed + 0.6, ax.get_ylim()[1], "fine-tune", va="top", fontsize=8, c="gray")
        ax.set_xlabel("round")
        ax.set_ylabel(label)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / fname
        save_figure(fig, path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
