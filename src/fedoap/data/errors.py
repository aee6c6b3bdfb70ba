"""The one exception type for bad input data. Messages name the file (and client) at fault."""

from fedoap.errors import FedoapError


class DataError(FedoapError, ValueError):
    """A data file is missing, unreadable or inconsistent."""
