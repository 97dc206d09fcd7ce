"""Errors that the command line reports as one line (exit status 2, no traceback)."""


class UserError(Exception):
    """Bad input from the user: the message says what is wrong and what to do."""


class UnsupportedArchitecture(UserError):
    """The model's ``config.model_type`` has no entry in :data:`shapprune.archs.ARCHITECTURES`."""


class OutOfMemory(UserError):
    """Out of memory even at one window per batch; the message names the options that reduce memory."""
