"""The one backbone every method in this project uses: a 2D U-Net with optional FedOAP parts.

``FedOAPNet`` is built from named top-level modules, and those names are how algorithms declare
what is shared and what is personal (see :mod:`fedoap.models.partition`)::

    encoder         shared      U-Net contracting path, widths w .. w*2^(depth-1)
    bottleneck      B_q^k       pool + double conv to C = w*2^depth (the query stream; in a
                                plain U-Net simply "the bottleneck")
    query_proj      W_q^k       linear C -> C on bottleneck tokens          (attention only)
    kv_bottleneck   B_kv        pool + double conv, parallel to bottleneck  (cross only)
    attention       W_k,W_v,W_o + norm                                      (attention only)
    gate            g^k, per-channel scale on the attention's output, from 0  (optional)
    decoder         shared      U-Net expanding path
    adapter         A^k         residual spatial adapter at full resolution (optional)
    head            personal    1x1 conv to one logit

``attention`` selects the bottleneck block: ``"cross"`` is FedOAP's decoupled cross-attention,
``"self"`` is FedDP's bottleneck self-attention (keys/values from the query stream), ``"none"``
is the plain U-Net bottleneck that the other baselines use. Everything else is identical, so
methods differ only where their papers differ.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fedoap.config import Config
from fedoap.models.attention import AttentionGate, SharedKVAttention
from fedoap.models.blocks import Decoder, Down, Encoder, NormKind, SpatialAdapter

AttentionKind = Literal["none", "cross", "self"]

#: Initial foreground probability of the head (tumours cover a few % of an image).
FOREGROUND_PRIOR = 0.05


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C)."""
    return x.flatten(2).transpose(1, 2)


def from_tokens(t: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, H*W, C) -> (B, C, H, W)."""
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], h, w)


class FedOAPNet(nn.Module):
    def __init__(
        self,
        in_channels: int = 1,
        width: int = 16,
        depth: int = 4,
        heads: int = 4,
        norm: NormKind = "instance",
        attention: AttentionKind = "cross",
        use_adapter: bool = True,
        gate: bool = False,
    ) -> None:
        super().__init__()
        if attention not in ("none", "cross", "self"):
            raise ValueError(f"attention must be 'none', 'cross' or 'self', got {attention!r}")
        self.attention_kind: AttentionKind = attention
        self.depth = depth
        c_deep = width * 2 ** (depth - 1)
        c = width * 2**depth  # bottleneck channels = attention model dimension
        self.bottleneck_channels = c

        self.encoder = Encoder(in_channels, width, depth, norm)
        self.bottleneck = Down(c_deep, c, norm)
        if attention != "none":
            self.query_proj = nn.Linear(c, c)
            self.attention = SharedKVAttention(c, heads)
        self.gate = AttentionGate(c) if gate and attention != "none" else None
        if attention == "cross":
            self.kv_bottleneck = Down(c_deep, c, norm)
        self.decoder = Decoder(width, depth, norm)
        self.adapter: nn.Module = SpatialAdapter(width, norm) if use_adapter else nn.Identity()
        self.head = nn.Conv2d(width, 1, 1)
        # Start from the foreground prior (Lin et al., focal loss, 2017): with a zero bias every
        # pixel starts at p = 0.5 and the first hundreds of steps only learn "background".
        assert self.head.bias is not None
        nn.init.constant_(self.head.bias, math.log(FOREGROUND_PRIOR / (1 - FOREGROUND_PRIOR)))
        # Global K/V bank (M, C) in B_kv feature space, set by the FedOAP algorithm in bank mode.
        # Not in the state dict: it travels as its own payload ("kv.*"), not as a parameter.
        self.register_buffer("kv_bank", None, persistent=False)

    # ---------------------------------------------------------------------------------------

    def set_kv_bank(self, bank: torch.Tensor | None) -> None:
        if bank is not None and (bank.ndim != 2 or bank.shape[1] != self.bottleneck_channels):
            raise ValueError(
                f"kv bank must have shape (M, {self.bottleneck_channels}), got {tuple(bank.shape)}"
            )
        # On the model's device once, not copied in every forward pass.
        self.kv_bank = None if bank is None else bank.detach().float().to(self.head.weight.device)

    def kv_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-projection key/value tokens of images ``x``: (B, N, C). What bank summaries use."""
        f = self.encoder(x)[-1]
        branch = self.kv_bottleneck if self.attention_kind == "cross" else self.bottleneck
        return to_tokens(branch(f))

    def _attend(self, f: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        _, _, h, w = b.shape
        q_in = to_tokens(b)  # (B, N, C)
        kv_in = to_tokens(self.kv_bottleneck(f)) if self.attention_kind == "cross" else q_in
        if self.kv_bank is not None:
            bank = self.kv_bank.to(kv_in.dtype).unsqueeze(0).expand(kv_in.shape[0], -1, -1)
            kv_in = torch.cat([kv_in, bank], dim=1)  # (B, N + M, C)
        gate = self.gate.scale if self.gate is not None else None
        out = self.attention(self.query_proj(q_in), kv_in, residual=q_in, gate=gate)
        return from_tokens(out, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (B, in_channels, H, W) -> logits (B, 1, H, W)."""
        factor = 2**self.depth
        if x.ndim != 4 or x.shape[-1] % factor or x.shape[-2] % factor:
            raise ValueError(
                f"expected input (B, C, H, W) with H and W divisible by {factor}, "
                f"got {tuple(x.shape)}; resize or pad the images to a multiple of {factor}"
            )
        skips = self.encoder(x)
        b = self.bottleneck(skips[-1])
        if self.attention_kind != "none":
            b = self._attend(skips[-1], b)
        return self.head(self.adapter(self.decoder(b, skips)))

    # ---------------------------------------------------------------------------------------

    def flops_per_image(self, image_size: int, in_channels: int | None = None) -> int:
        """Forward FLOPs (multiply-add = 2) for one image, counted by torch's FlopCounterMode."""
        c = in_channels if in_channels is not None else self.encoder.stages[0][0].in_channels
        x = torch.zeros(1, c, image_size, image_size, device=self.head.weight.device)
        was_training = self.training
        self.eval()
        # ``forward``, not ``__call__``: a compiled module would count its compiled kernels.
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            self.forward(x)
        self.train(was_training)
        return int(counter.get_total_flops())


def build_net(cfg: Config, attention: AttentionKind, use_adapter: bool, gate: bool) -> FedOAPNet:
    """The network of a run's config (``model.*``, ``data.channels``) with a method's
    attention, adapter and gate, on the CPU, initialised from the run seed (the process's global
    RNG is left as it was). :func:`fedoap.training.device.place` puts it on the run's device."""
    m = cfg.model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return FedOAPNet(
            in_channels=cfg.data.channels,
            width=m.width,
            depth=m.depth,
            heads=m.heads,
            norm=m.norm,
            attention=attention,
            use_adapter=use_adapter,
            gate=gate,
        )
