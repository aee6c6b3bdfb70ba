"""Shared versus personal parameters, declared by module structure.

An algorithm says which *modules* are personal: top-level children of the network by name
(``"head"``, ``"adapter"``), or every module of a type (FedBN's norm layers). This file turns that
into the exact set of state-dict keys, by walking ``named_modules`` -- never by searching parameter
names for substrings such as ``"bn"``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from fedoap.basetypes import StateDict


def module_state_keys(model: nn.Module, module: nn.Module) -> list[str]:
    """State-dict keys owned by ``module`` (a descendant of ``model``), in model order."""
    prefix = None
    for name, m in model.named_modules():
        if m is module:
            prefix = f"{name}." if name else ""
            break
    if prefix is None:
        raise ValueError(f"{type(module).__name__} is not a submodule of the model")
    return [k for k in model.state_dict() if k.startswith(prefix)]


def keys_of_children(model: nn.Module, names: Iterable[str]) -> set[str]:
    """Keys of the named top-level children that exist on this model (absent ones are skipped,
    e.g. ``query_proj`` on a plain U-Net)."""
    children = dict(model.named_children())
    keys: set[str] = set()
    for name in names:
        if name in children:
            keys.update(module_state_keys(model, children[name]))
    return keys


def keys_of_type(model: nn.Module, types: tuple[type[nn.Module], ...]) -> set[str]:
    """Keys of every module that is an instance of ``types`` (its own params/buffers only)."""
    keys: set[str] = set()
    for name, m in model.named_modules():
        if isinstance(m, types):
            prefix = f"{name}." if name else ""
            keys.update(prefix + k for k in m.state_dict(keep_vars=True))
    return keys


@dataclass(frozen=True)
class Partition:
    """Disjoint, ordered key sets covering a model's state dict."""

    shared: tuple[str, ...]
    personal: tuple[str, ...]

    @classmethod
    def from_personal(cls, model: nn.Module, personal: set[str]) -> Partition:
        order = list(model.state_dict())
        unknown = personal - set(order)
        if unknown:
            raise ValueError(f"personal keys not in the model: {sorted(unknown)[:5]}")
        return cls(
            shared=tuple(k for k in order if k not in personal),
            personal=tuple(k for k in order if k in personal),
        )

    def split(self, state: StateDict) -> tuple[StateDict, StateDict]:
        return ({k: state[k] for k in self.shared}, {k: state[k] for k in self.personal})

    def count(self, model: nn.Module) -> dict[str, int]:
        """Number of *parameters* (not buffers) on each side."""
        params = dict(model.named_parameters())
        return {
            "shared": sum(params[k].numel() for k in self.shared if k in params),
            "personal": sum(params[k].numel() for k in self.personal if k in params),
        }


def sub(tensors: StateDict, prefix: str) -> StateDict:
    """Entries under ``prefix``, with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def prefixed(tensors: StateDict, prefix: str) -> StateDict:
    """The same entries with ``prefix`` prepended to every key."""
    return {prefix + k: v for k, v in tensors.items()}
