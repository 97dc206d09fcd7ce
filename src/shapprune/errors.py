"""Errors that the command line reports as one line (exit status 2, no traceback)."""


class UserError(Exception):
    """Bad input from the user: the message says what is wrong and what to do."""


class UnsupportedArchitecture(UserError):
    """The model's ``config.model_type`` has no entry in :data:`shapprune.models.archs.ARCHITECTURES`."""


#: the flags that reduce memory, named in every out-of-memory message
MEMORY_FLAGS = "--seqlen, --batch-size, --device-map auto or --dtype bfloat16/float16"


class OutOfMemory(UserError):
    """Out of memory even at batch size 1: the message names the flags that reduce memory."""

    def __init__(self, detail: str = ""):
        where = f" ({detail})" if detail else ""
        super().__init__(f"out of memory even at batch size 1{where}; reduce memory with a shorter --seqlen, "
                         "--batch-size 1, --device-map auto (spread over GPUs/CPU) or --dtype bfloat16/float16")


class StoreLocked(UserError):
    """The evaluation store stayed locked by another process for longer than the timeout."""


def is_out_of_memory(exc: BaseException) -> bool:
    """``torch.OutOfMemoryError`` or a backend's "out of memory" RuntimeError (checked without importing torch)."""
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()
