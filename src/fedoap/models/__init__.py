"""Networks: the shared U-Net backbone with FedOAP's attention, adapter and head."""

from fedoap.models.net import FedOAPNet, from_tokens, to_tokens
from fedoap.models.partition import Partition, StateDict

__all__ = ["FedOAPNet", "Partition", "StateDict", "from_tokens", "to_tokens"]
