"""Client datasets: loading (npz, image folders, synthetic), validation, patient-level splits."""

from fedoap.data.dataset import ClientData, Split, prepare_clients
from fedoap.data.errors import DataError

__all__ = ["ClientData", "DataError", "Split", "prepare_clients"]
