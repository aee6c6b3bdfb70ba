"""Bottleneck attention: FedOAP's decoupled cross-attention (DCA) and FedDP's self-attention.

FedOAP (arXiv 2511.18847), for client k with bottleneck tokens ``q_in = B_q^k(f)`` and
``kv_in = B_kv(f)`` (both (B, N, C), N = h*w bottleneck positions)::

    Q = W_q^k q_in          (personal projection, lives outside this module)
    K = W_k kv_in,  V = W_v kv_in          (shared)
    h = Norm(W_o softmax(Q K^T / sqrt(d)) V + q_in)            (W_o, Norm shared)

with ``num_heads`` heads of size d = C / heads. In ``bank`` K/V mode the keys and values are
computed from the image's own tokens concatenated with a global bank of M summary tokens,
``kv_in' = [kv_in ; bank]`` of shape (B, N + M, C).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SharedKVAttention(nn.Module):
    """The shared half of DCA: K, V and O projections and the output norm."""

    def __init__(self, channels: int, heads: int) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"heads={heads} must divide channels={channels}")
        self.heads = heads
        self.k_proj = nn.Linear(channels, channels)
        self.v_proj = nn.Linear(channels, channels)
        self.o_proj = nn.Linear(channels, channels)
        self.norm = nn.LayerNorm(channels)

    def forward(
        self,
        q: torch.Tensor,
        kv_in: torch.Tensor,
        residual: torch.Tensor,
        gate: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``q``: projected queries (B, N, C); ``kv_in``: (B, L, C); ``residual``: (B, N, C);
        ``gate``: (C,) scale on the attention's output before the residual (None: 1)."""
        b, n, c = q.shape
        h = self.heads
        # (B, L, C) -> (B, heads, L, d)
        k = self.k_proj(kv_in).view(b, -1, h, c // h).transpose(1, 2)
        v = self.v_proj(kv_in).view(b, -1, h, c // h).transpose(1, 2)
        qh = q.view(b, n, h, c // h).transpose(1, 2)  # (B, heads, N, d)
        out = F.scaled_dot_product_attention(qh, k, v)  # softmax(QK^T/sqrt(d)) V
        out = self.o_proj(out.transpose(1, 2).reshape(b, n, c))  # (B, N, C)
        if gate is not None:
            out = out * gate
        return self.norm(out + residual)


class AttentionGate(nn.Module):
    """A per-channel scale on the attention's contribution, initialised at zero:
    ``h = Norm(g * W_o attn + q_in)`` (ReZero, Bachlechner et al. 2021; LayerScale, Touvron et
    al. 2021). A site starts from its own query stream alone and opens the gate as far as the
    shared keys and values help it; a gate that stays shut leaves a plain U-Net bottleneck."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(channels))
