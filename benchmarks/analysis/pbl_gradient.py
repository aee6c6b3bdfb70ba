"""How much the perturbed boundary loss changes the fine-tuning gradient, at several settings.

Loads one site's selected model from a finished run, takes a batch of its training images, and
compares the gradient of ``L_seg`` with that of ``L_PBL`` (one noise draw) over all parameters:
their cosine and the relative size of the difference. A zero-mean perturbation of the logits
changes the loss only through its curvature, so at the reference setting (s 0.1, lambda 0.1,
error region) the two gradients are nearly the same.

    python benchmarks/analysis/pbl_gradient.py RUN_DIR CLIENT
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from fedoap.api import load_client_model
from fedoap.data import prepare_clients
from fedoap.losses import PerturbedBoundaryLoss, SegLoss

SETTINGS = [  # (region, s, lambda)
    ("error", 0.1, 0.1),
    ("error", 1.0, 0.5),
    ("error_and_band", 1.0, 0.5),
    ("error_and_band", 4.0, 0.5),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("client")
    ap.add_argument("--images", type=int, default=32)
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg, model = load_client_model(args.run, args.client, torch.device("cpu"))
    data = next(c for c in prepare_clients(cfg.data) if c.name == args.client)
    x, y = data.train.x[: args.images], data.train.y[: args.images]
    seg = SegLoss()
    model.train()

    def grad(loss) -> torch.Tensor:  # type: ignore[no-untyped-def]
        model.zero_grad()
        loss(model(x)).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    g0 = grad(lambda z: seg(z, y))
    print("| region | s | lambda | cosine with L_seg's gradient | relative change |")
    print("|---|---|---|---|---|")
    for region, s, lam in SETTINGS:
        pbl = PerturbedBoundaryLoss(region, cfg.finetune.pbl.tau, s, lam, 2, seg)
        gen = torch.Generator().manual_seed(0)
        g = grad(lambda z, pbl=pbl, gen=gen: pbl(z, y, gen))
        cos = float(torch.nn.functional.cosine_similarity(g0, g, dim=0))
        rel = float((g - g0).norm() / g0.norm())
        print(f"| {region} | {s:g} | {lam:g} | {cos:.4f} | {100 * rel:.1f}% |")


if __name__ == "__main__":
    main()
