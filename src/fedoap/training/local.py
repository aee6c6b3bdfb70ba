"""A site's local trainer: plain epochs, or DP-SGD under ``privacy.dp``, with the run's batch
size, precision and augmentation. Every method trains through it, so a method never needs to
know whether its site trains under differential privacy."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from fedoap.config import Config, ConfigError
from fedoap.data.dataset import Split
from fedoap.privacy import SiteDP, dp_units, plan_site
from fedoap.training.engine import LossFn, train_epochs


class LocalTrainer:
    """Local training for every site of a run. ``planned_epochs`` is every epoch a site may
    train in the run (what a DP-SGD budget is planned over; :func:`fedoap.privacy.planned_epochs`).
    """

    def __init__(self, cfg: Config, planned_epochs: int) -> None:
        self.cfg = cfg
        self.planned_epochs = planned_epochs
        self._site_dp: dict[tuple[str, int], SiteDP] = {}

    def site_dp(self, client: str, case_ids: np.ndarray) -> SiteDP:
        """The DP-SGD parameters of a client whose training images belong to ``case_ids``
        (``privacy.dp``), fixed for the run: planned over every epoch it may train, for its
        images or its cases (``privacy.dp.unit``; fedoap.privacy)."""
        key = (client, dp_units(self.cfg, case_ids))
        if key not in self._site_dp:
            self._site_dp[key] = plan_site(self.cfg, client, key[1], self.planned_epochs)
        return self._site_dp[key]

    def optimizer(
        self, params: list[nn.Parameter], state: dict[str, Any] | None, lr: float | None = None
    ) -> torch.optim.Optimizer:
        """AdamW over ``params``, resuming ``state`` (a CPU state dict) where given.

        On CUDA it is the fused implementation: one kernel for all parameters instead of a
        few per tensor (small models are launch-bound), with the same update rule."""
        t = self.cfg.train
        fused = bool(params) and params[0].is_cuda
        opt = torch.optim.AdamW(params, lr=lr or t.lr, weight_decay=t.weight_decay, fused=fused)
        if state is not None:
            opt.load_state_dict(state)
            match_layout(opt)
        return opt

    def train(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        split: Split,
        epochs: int,
        loss_fn: LossFn,
        gen: torch.Generator,
        client: str,
        progress: Callable[[int], None] | None = None,
        penalty: Callable[[], torch.Tensor] | None = None,
    ) -> float:
        """``epochs`` of local training; returns the mean training loss.

        Parameters outside the optimiser are frozen for the call (no gradient is computed for
        them), so head-only or body-only phases cost what they should.
        """
        t = self.cfg.train
        common = (model, optimizer, split, epochs, loss_fn, gen)
        with only_these_train(model, optimizer):
            if not self.cfg.privacy.dp.enabled:
                return train_epochs(
                    *common,
                    t.batch_size,
                    t.precision,
                    augment=self.cfg.data.augment,
                    penalty=penalty,
                    progress=progress,
                )
            from fedoap.training.dp import dp_train_epochs

            if penalty is not None:  # methods that support DP train without one
                raise ConfigError(f"privacy.dp: method {self.cfg.method} trains with a penalty")
            return dp_train_epochs(
                *common,
                self.site_dp(client, split.case_ids),
                t.precision,
                augment=self.cfg.data.augment,
                progress=progress,
            )


def match_layout(opt: torch.optim.Optimizer) -> None:
    """Give loaded optimiser moments their parameter's memory format (channels_last weights get
    channels_last moments), as a fresh optimiser would have them."""
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p, {})
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and v.shape == p.shape and v.stride() != p.stride():
                    st[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)


@contextlib.contextmanager
def only_these_train(model: nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Temporarily set ``requires_grad=False`` on parameters the optimiser does not update."""
    in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
    frozen = [p for p in model.parameters() if id(p) not in in_opt and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)
