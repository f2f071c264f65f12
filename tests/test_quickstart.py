"""docs/quickstart.md's five commands, run as written (in a temp folder, each in a fresh process).

The one change: the service's port is a free one instead of 8000, in both the serve and the query line.
"""

from __future__ import annotations

import json
import re
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "docs" / "quickstart.md"
ITMRT = Path(sys.executable).parent / "itmrt"  # the console script of the interpreter running the tests


def quickstart_commands() -> list[str]:
    """The lines of the page's first bash block."""
    block = re.search(r"```bash\n(.*?)```", QUICKSTART.read_text(encoding="utf-8"), re.S)
    assert block is not None, "docs/quickstart.md has no bash block"
    return [line.strip() for line in block.group(1).splitlines() if line.strip()]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _argv(line: str, port: int) -> list[str]:
    words = shlex.split(line.replace("8000", str(port)).removesuffix("&"))
    assert words[0] == "itmrt", line
    return [str(ITMRT), *words[1:]]


def test_the_page_has_five_itmrt_commands_and_one_runs_in_the_background() -> None:
    commands = quickstart_commands()
    assert len(commands) == 5 and all(line.startswith("itmrt ") for line in commands)
    assert [line.endswith("&") for line in commands] == [False, False, False, True, False]


@pytest.mark.slow
def test_the_quickstart_runs_from_a_checkpoint_to_a_served_gallery(tmp_path: Path) -> None:
    pytest.importorskip("uvicorn")
    (tmp_path / "itmrt").mkdir()
    (tmp_path / "itmrt" / "assets").symlink_to(REPO / "itmrt" / "assets")  # the page's paths are the repository's
    port = _free_port()
    service = None
    try:
        for line in quickstart_commands():
            if line.endswith("&"):
                service = subprocess.Popen(_argv(line, port), cwd=tmp_path, stdout=subprocess.PIPE,
                                           stderr=subprocess.STDOUT, text=True)
                continue
            done = subprocess.run(_argv(line, port), cwd=tmp_path, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, (line, done.stderr[-2000:])
        answers = [json.loads(text) for text in done.stdout.splitlines()]
    finally:
        if service is not None:
            service.send_signal(signal.SIGTERM)
            log = service.communicate(timeout=60)[0]
    assert service is not None and service.returncode == 0, log[-2000:]
    captions = (tmp_path / "data" / "test_caps.txt").read_text(encoding="utf-8").splitlines()
    assert [a["caption"] for a in answers] == captions
    assert all(len(a["images"]) == 3 and a["scores"] == sorted(a["scores"], reverse=True) for a in answers)
    # The service answers with the trained model: most captions find their own image (5 captions an image).
    own_first = sum(a["images"][0] == a["index"] // 5 for a in answers)
    assert own_first > 0.5 * len(answers)
