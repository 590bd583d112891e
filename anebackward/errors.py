"""Exceptions raised by anebackward (besides TypeError / ValueError)."""


class AnebackwardError(RuntimeError):
    """A C kernel reported an error that the Python checks did not catch."""


class AneUnavailableError(RuntimeError):
    """The Apple Neural Engine was asked for where it cannot be used."""


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt or of the wrong size."""


class Bf16UnavailableError(RuntimeError):
    """precision='bf16' was asked for, but oneDNN (the [bf16] extra) is not installed."""
