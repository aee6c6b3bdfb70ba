"""The one exception type for bad input data. Messages name the file (and client) at fault."""


class DataError(ValueError):
    """A data file is missing, unreadable or inconsistent."""
