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


def first_line(exc: BaseException, limit: int = 300, skip: tuple[str, ...] = ()) -> str:
    """The first meaningful line of a library's exception, for a one-line message.

    Lines starting with one of ``skip`` (boilerplate a library prints before the
    point) are passed over; the exception's type name stands in for an empty message.
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(skip)] if skip else lines
    return (useful or lines or [type(exc).__name__])[0][:limit]
