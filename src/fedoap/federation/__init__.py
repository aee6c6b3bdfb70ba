"""Runtimes that drive the algorithm objects: the in-process runner (default)."""

from fedoap.federation.runner import Runner, sample_clients

__all__ = ["Runner", "sample_clients"]
