"""User-facing errors.

Anything a user can cause (a wrong path, a file in the wrong format, mismatched
dimensions) is raised as :class:`ItmrtError` with a one-line message that says
what was wrong and, where possible, what to do. The CLI prints it and exits
with status 2 instead of showing a traceback.
"""


class ItmrtError(Exception):
    """An error caused by the user's input; its message is shown as one line."""


class CheckpointError(ItmrtError):
    """A checkpoint that cannot be loaded safely or does not match the model."""


class DataError(ItmrtError):
    """A dataset folder or file that is missing or malformed."""


class VocabularyError(ItmrtError):
    """A vocabulary file that is missing or malformed."""
