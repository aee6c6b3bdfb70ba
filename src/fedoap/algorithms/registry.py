"""The registry of federated methods: ``method=<name>`` in a config selects one."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedoap.registry import Registry

if TYPE_CHECKING:
    from fedoap.algorithms.base import Algorithm

ALGORITHMS: Registry[type[Algorithm]] = Registry("method")
