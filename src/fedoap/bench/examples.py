"""Predicted masks of a few test images per client, kept for the report's image grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedoap.config import load_config
from fedoap.fileio import atomic_writer


def save_examples(run_dir: Path, path: Path, per_client: int) -> None:
    """Predicted masks of a few fixed test images per client (for the report's image grid).

    Only masks and image names are stored, never images: the report reads the images from the
    data folder, which cannot be redistributed.
    """
    from fedoap.api import load_client_model
    from fedoap.data import prepare_clients
    from fedoap.training import predict_logits

    cfg = load_config(run_dir / "config.yaml")
    out: dict[str, np.ndarray] = {}
    for client in prepare_clients(cfg.data):
        idx = example_indices(client.test.y.numpy(), client.test.names, per_client)
        _, model = load_client_model(run_dir, client.name)
        x = client.test.x[idx].to(model.head.weight.device)
        pred = (predict_logits(model, x, cfg.train.precision) > 0).cpu()
        out[f"{client.name}/pred"] = pred[:, 0].numpy()
        out[f"{client.name}/names"] = client.test.names[idx].astype(str)
    with atomic_writer(path) as fh:
        np.savez_compressed(fh, **out)  # type: ignore[arg-type]


def example_indices(masks: np.ndarray, names: np.ndarray, k: int) -> np.ndarray:
    """k test images with lesions, spread over the range of lesion sizes (deterministic)."""
    area = masks.reshape(len(masks), -1).sum(1)
    cand = np.flatnonzero(area > 0)
    if len(cand) == 0:
        cand = np.arange(len(masks))
    order = cand[np.lexsort((names[cand], area[cand]))]
    pick = np.linspace(0, len(order) - 1, min(k, len(order))).round().astype(int)
    return order[pick]
