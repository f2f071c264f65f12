"""Bearer tokens: read from a file (never from the command line, where ``ps`` shows it), compared in constant time."""

from __future__ import annotations

import hmac
from pathlib import Path

from itmrt.documents import not_a_file, open_regular
from itmrt.errors import ItmrtError

MAX_TOKEN_BYTES = 4096


def read_token_file(path: str | Path) -> str:
    """The token in ``path``: its first line, surrounding whitespace stripped; one-line errors otherwise."""
    source = Path(path)
    if not source.is_file():
        raise ItmrtError(f"token file {source} {not_a_file(source, 'not found')}; write the token (one line) into a "
                         "file and pass its path")
    with open_regular(source) as handle:
        raw = handle.read(MAX_TOKEN_BYTES + 1)
    if len(raw) > MAX_TOKEN_BYTES:
        raise ItmrtError(f"token file {source} is over {MAX_TOKEN_BYTES} bytes; it should hold one line, the token")
    try:
        lines = raw.decode("utf-8").strip().splitlines()
    except UnicodeDecodeError:
        raise ItmrtError(f"token file {source} is not UTF-8 text; write the token as one line of text") from None
    token = lines[0].strip() if lines else ""
    if not token or not token.isprintable() or any(char.isspace() for char in token):
        raise ItmrtError(f"token file {source} holds no usable token (one line of printable characters without spaces)")
    return token


def token_file_exposure(path: str | Path) -> str | None:
    """A warning when the token file can be read by its group or by others, else None."""
    mode = Path(path).stat().st_mode
    if mode & 0o044:
        who = " and ".join(name for bit, name in ((0o040, "its group"), (0o004, "others")) if mode & bit)
        return (f"token file {path} can be read by {who} (mode "
                f"{mode & 0o777:03o}); make it private with `chmod 600 {path}`")
    return None


def authorized(header: str | None, token: str | None) -> bool:
    """Whether an ``Authorization`` header carries ``token`` (always, when no token is set)."""
    if token is None:
        return True
    if header is None:
        return False
    scheme, _, given = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("utf-8"), token.encode("utf-8"))
