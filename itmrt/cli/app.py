"""The ``itmrt`` command line: a thin typer layer over the Python API.

Each command lives in its own module under ``itmrt/cli/`` and registers itself
on :data:`app`; heavy libraries (torch, onnx) are imported inside the command
functions so ``itmrt --help`` stays fast and torch-free commands never load it.
"""

from __future__ import annotations

import signal
import sys
from typing import Any

import typer

from itmrt import __version__
from itmrt.errors import ItmrtError

app = typer.Typer(
    name="itmrt",
    help=(
        "Take image-text matching models (NAAF, SCAN, CMPM/CMPC) from a PyTorch "
        "checkpoint to verified ONNX Runtime / TensorRT deployment."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain help (click's): square brackets in help texts stay text (rich markup ate "itmrt[ray]"), and flags are
    # shown as flags, without a "<bool>" type column.
    rich_markup_mode=None,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"itmrt {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """itmrt: export, build, infer, and report on image-text matching models."""


# Command modules register themselves on ``app`` when imported.
from itmrt.cli import commands  # noqa: E402,F401

_CLICK_ERROR: type[Exception] = next(cls for cls in typer.BadParameter.__mro__ if cls.__name__ == "ClickException")
"""click's base of command-line errors (typer bundles its own click; it exports only ``BadParameter``)."""


EXIT_INTERRUPTED = 130
"""The exit status of a command stopped by Ctrl-C (SIGINT), as shells report it: 128 + 2."""
INTERRUPTED = "interrupted (Ctrl-C)"
EXIT_TERMINATED = 143
"""The exit status of a command stopped by SIGTERM, as shells report it: 128 + 15."""


class Terminated(BaseException):
    """SIGTERM raised as an exception in the main thread, so that what a command was writing is cleaned up as
    on Ctrl-C (staging folders removed, locks released) instead of being left half-written by a sudden death.
    ``itmrt serve`` installs its own handlers while it serves (a graceful drain) and puts this one back after."""


def _raise_terminated(_signum: int, _frame: Any) -> None:
    raise Terminated()


def _catch_sigterm() -> tuple[bool, Any]:
    """Install the handler: whether it was installed, and the handler it replaced."""
    try:
        return True, signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # main() called from another thread than the main one: leave the signal as it is
        return False, None


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: user errors become one line on stderr and exit status 2.

    That holds for every kind: itmrt's own (:class:`ItmrtError`), a command
    line click refuses (an unknown option, a value outside its range), an
    operating-system error no write site turned into one (the path and the
    reason), memory a request could not get, and input nested too deeply to parse. Ctrl-C says so in
    one line and exits 130; SIGTERM likewise, exit 143, after the command's cleanup ran.
    """
    installed, previous = _catch_sigterm()
    try:
        try:
            code = app(args=argv, standalone_mode=False)
        except _CLICK_ERROR as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # a bare ``itmrt`` or group: its help, as click shows it
                exc.show()
                sys.exit(exc.exit_code)
            context = getattr(exc, "ctx", None)
            command = getattr(context, "command_path", None) or "itmrt"
            _fail(f"{exc.format_message().rstrip('.')} (see `{command} --help`)", exc.exit_code)
        except typer.Abort:
            _fail("aborted", 1)
        except ItmrtError as exc:
            _fail(str(exc))
        except OSError as exc:
            from itmrt.errors import os_error_message

            _fail(os_error_message(exc))
        except MemoryError:
            _fail("out of memory; lower --batch-size or --memory-mb, or use smaller inputs")
        except RecursionError:
            _fail("an input is nested too deeply to read")
        except KeyboardInterrupt:
            _fail(INTERRUPTED, EXIT_INTERRUPTED)
        except Terminated:
            _fail("terminated (SIGTERM)", EXIT_TERMINATED)
        if code == EXIT_INTERRUPTED:  # typer turns Ctrl-C inside a command into a silent exit status 130
            _fail(INTERRUPTED, EXIT_INTERRUPTED)
        sys.exit(code if isinstance(code, int) else 0)
    finally:  # a process that called main() (a test, an embedding program) gets its own handler back
        if installed:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _fail(message: str, code: int = 2) -> None:
    first = " ".join(message.split("\n")[0].split()) if message else "failed"
    typer.echo(f"error: {first}", err=True)
    sys.exit(code)
