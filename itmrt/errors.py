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


def os_error_message(exc: OSError, doing: str | None = None) -> str:
    """One line for an operating-system error: what was being done, the path(s) and the reason.

    ``doing`` ("write results.jsonl", "read") is said first when given; the
    error's own file name is added unless ``doing`` already names it.
    """
    reason = exc.strerror or first_line(exc)
    paths = [str(name) for name in (exc.filename, exc.filename2) if name is not None]
    named = [path for path in paths if not doing or path not in doing]
    where = f" {' -> '.join(named)}" if named else ""
    action = f"cannot {doing}" if doing else "cannot access"
    hint = _OS_HINTS.get(exc.errno or 0, "")
    return f"{action}{where}: {reason}{hint}"


_OS_HINTS = {
    13: " (check the permissions of the path and its folder)",
    28: " (the disk is full: free some space)",
    30: " (a read-only file system: choose a path elsewhere)",
    122: " (the disk quota is used up)",
}


class GalleryChanged(ItmrtError):
    """A gallery file read while searching changed (size, times or inode, or a short read) after it was opened
    and verified: what it holds now was never checked. The service reports not ready until a good version is
    swapped in."""
