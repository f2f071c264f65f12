"""What the hostile-input suite checks after every command: one line, the exit code, nothing read or
written outside the target, nothing the user had lost.

Reads and writes are watched twice, independently of the code under test:

- a ``sys.addaudithook`` hook records every path Python opens, renames,
  removes, creates, copies or lists while a command runs (numpy, onnx's Python
  side, itmrt itself); the paths are resolved afterwards, so a symlink inside a
  bundle that leads out is caught at its target;
- Linux ``inotify`` watches the sentinel folder ("outside") for any open, read
  or change, from any code in the process - ONNX Runtime and onnx's external-data
  loader open files from C++, which no audit hook sees.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import struct
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cli_helpers import CliResult, run_cli

_WRITE_EVENTS = {"os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.link", "os.symlink", "os.chmod",
                 "os.truncate", "shutil.rmtree", "shutil.copyfile", "tempfile.mkstemp", "tempfile.mkdtemp",
                 "os.utime", "os.chown"}
_READ_EVENTS = {"open", "os.listdir", "os.scandir", "shutil.copyfile"}
_RECORDING: list[list[tuple[str, str, bool]]] = []


_DIR_FD_ARG = {"os.remove": {0: 1}, "os.rmdir": {0: 1}, "os.mkdir": {0: 2}, "os.rename": {0: 2, 1: 3},
               "os.chmod": {0: 2}, "os.link": {0: 2, 1: 3}, "os.symlink": {1: 2}}
"""Where an event names the folder (as an open descriptor) its relative path is in: shutil.rmtree works so."""


def _paths(event: str, args: tuple) -> list[str]:
    found = []
    count = 2 if event in ("os.rename", "os.link", "os.symlink", "shutil.copyfile") else 1
    for position, value in enumerate(args[:count]):
        if not isinstance(value, (str, bytes, os.PathLike)):
            continue
        path = os.fsdecode(value)
        dir_fd_at = _DIR_FD_ARG.get(event, {}).get(position)
        dir_fd = args[dir_fd_at] if dir_fd_at is not None and dir_fd_at < len(args) else None
        if isinstance(dir_fd, int) and dir_fd >= 0 and not os.path.isabs(path):
            path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
        found.append(path)
    return found


def _is_write(event: str, args: tuple) -> bool:
    if event in _WRITE_EVENTS:
        return True
    if event != "open":
        return False
    mode, flags = (args[1] if len(args) > 1 else None), (args[2] if len(args) > 2 else 0)
    if isinstance(mode, str):
        return any(char in mode for char in "wax+")
    return bool(isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC))


_SOURCE_IS_READ = {"shutil.copyfile", "os.link"}
"""Two-path events whose first path is only read (``os.symlink``'s first is the link's text: not touched)."""


def _hook(event: str, args: tuple) -> None:
    if not _RECORDING or (event not in _READ_EVENTS and event not in _WRITE_EVENTS):
        return
    try:
        write = _is_write(event, args)
        for position, path in enumerate(_paths(event, args)):
            if event == "os.symlink" and position == 0:
                continue
            written = write and not (position == 0 and event in _SOURCE_IS_READ)
            _RECORDING[-1].append((event, os.path.abspath(path), written))
    except Exception:  # noqa: BLE001 - a hook must never break the code it watches
        pass


sys.addaudithook(_hook)  # once per process; it records only while a Watch is active


class Inotify:
    """Any open, read or change of the files in ``folders`` (not recursive), by any code of this process."""

    EVENTS = 0x1 | 0x2 | 0x4 | 0x8 | 0x20 | 0x40 | 0x80 | 0x100 | 0x200  # access, modify, attrib, write, open...

    def __init__(self, folders: list[Path]) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            pytest.skip("inotify is not available")
        self.names = {}
        for folder in folders:
            wd = libc.inotify_add_watch(self.fd, os.fsencode(folder), self.EVENTS)
            self.names[wd] = folder

    def events(self) -> list[str]:
        seen, data = [], b""
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            data += chunk
        offset = 0
        while offset + 16 <= len(data):
            wd, mask, _cookie, length = struct.unpack_from("iIII", data, offset)
            name = data[offset + 16 : offset + 16 + length].rstrip(b"\0").decode(errors="replace")
            seen.append(f"{self.names.get(wd)}/{name} (mask {mask:#x})")
            offset += 16 + length
        return seen

    def close(self) -> None:
        os.close(self.fd)


@dataclass
class Watched:
    """What one command did: its result and the paths it touched."""

    result: CliResult | None = None
    touched: list[tuple[str, str, bool]] = field(default_factory=list)
    native: list[str] = field(default_factory=list)


def _under(path: str, roots: list[Path]) -> bool:
    real = os.path.realpath(path)
    return any(real == str(root) or real.startswith(str(root) + os.sep) for root in roots)


def _cache_roots() -> list[Path]:
    roots = [Path(__file__).resolve().parents[1] / "itmrt" / "runtime" / "__pycache__",
             Path.home() / ".cache", Path("/dev")]
    for variable in ("NUMBA_CACHE_DIR", "ITMRT_VERIFIED_CACHE"):  # the kernels; files found as listed
        if os.environ.get(variable):
            roots.append(Path(os.environ[variable]))
    return [Path(os.path.realpath(root)) for root in roots]


@contextmanager
def watch(outside: Path, allowed: list[Path], temp_ok: bool = False) -> Iterator[Watched]:
    """Record a command; afterwards assert it opened nothing under ``outside`` (Python or native code) and
    wrote nowhere but under ``allowed`` (and caches; the temp folder where ``temp_ok``)."""
    notify = Inotify([outside, *[p for p in outside.rglob("*") if p.is_dir() and not p.is_symlink()]])
    done = Watched()
    _RECORDING.append(done.touched)
    try:
        yield done
    finally:
        _RECORDING.pop()
        done.native = notify.events()
        notify.close()
    roots = [Path(os.path.realpath(root)) for root in allowed] + _cache_roots()
    if temp_ok:
        roots.append(Path(os.path.realpath(tempfile.gettempdir())))
    outside_real = [Path(os.path.realpath(outside))]
    read_out = [f"{event} {path}" for event, path, _ in done.touched if _under(path, outside_real)]
    assert not read_out, f"touched outside the target: {read_out[:3]}"
    assert not done.native, f"native code touched outside the target: {done.native[:3]}"
    stray = [f"{event} {path}" for event, path, write in done.touched if write and not _under(path, roots)]
    assert not stray, f"wrote outside the target: {stray[:3]}"


def tree(folder: Path) -> dict[str, str]:
    """Every file (and symlink) under ``folder``: relative path -> sha256 (or the link's target)."""
    found = {}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).as_posix()
        if path.is_symlink():
            found[relative] = "-> " + os.readlink(path)
        elif path.is_file():
            found[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def assert_kept(before: dict[str, str], folder: Path, changed: tuple[str, ...] = ()) -> None:
    """Everything that was under ``folder`` is still there, unchanged (except names starting with ``changed``)."""
    after = tree(folder)
    lost = [name for name, digest in before.items()
            if not name.startswith(changed or ("\0",)) and after.get(name) != digest]
    assert not lost, f"lost or changed: {lost[:5]}"


def assert_one_line(result: CliResult, *expected: str, code: int = 2) -> str:
    """Exit ``code``, stderr one ``error:`` line holding every ``expected`` text, no traceback."""
    err = result.err
    assert result.code == code, (result.code, err)
    lines = [line for line in err.splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def hostile_run(capsys: pytest.CaptureFixture[str], case: Path, *args: object, temp_ok: bool = False,
                changed: tuple[str, ...] = ()) -> CliResult:
    """Run ``itmrt args`` on a case folder (``case/outside`` is the sentinel folder); checks the watch and that
    every file the case held before is still there (except names starting with ``changed``)."""
    before = tree(case)
    with watch(case / "outside", [case], temp_ok) as done:
        done.result = run_cli(capsys, *(str(arg) for arg in args))
    assert_kept(before, case, changed)
    assert done.result is not None
    return done.result


# -- the inputs every case starts from ---------------------------------------------------------------------


@dataclass
class Case:
    """One case's folder: a fresh copy of the bundle (and gallery), user files, and the sentinel folder."""

    folder: Path
    bundle: Path
    gallery: Path
    features: Path
    captions: Path
    outside: Path
    out: Path

    def manifest(self) -> dict:
        return json.loads((self.bundle / "manifest.json").read_text())

    def write_manifest(self, data: dict) -> None:
        (self.bundle / "manifest.json").write_text(json.dumps(data))

    def gallery_document(self) -> dict:
        return json.loads((self.gallery / "gallery.json").read_text())

    def write_gallery_document(self, data: dict) -> None:
        (self.gallery / "gallery.json").write_text(json.dumps(data))

    def infer(self, *extra: object) -> list[object]:
        return ["infer", self.bundle, "--captions", self.captions, "--images", self.features, "--out", self.out,
                *extra]


@dataclass
class World:
    """A small NAAF bundle, its checkpoint and vocabulary, features, captions and a gallery, made once."""

    root: Path
    bundle: Path
    checkpoint: Path
    vocab: Path
    features: Path
    captions: Path
    gallery: Path

    def case(self, folder: Path) -> Case:
        import shutil

        bundle, gallery, outside = folder / "bundle", folder / "gallery", folder / "outside"
        shutil.copytree(self.bundle, bundle)
        shutil.copytree(self.gallery, gallery)
        document = json.loads((gallery / "gallery.json").read_text())
        document["bundle"]["path"] = str(bundle.resolve())
        (gallery / "gallery.json").write_text(json.dumps(document))
        (outside / "other").mkdir(parents=True)
        for name in ("scorer.onnx", "vocab.json", "manifest.json"):
            shutil.copyfile(bundle / name, outside / name)
        shutil.copyfile(gallery / "image_embeddings.npy", outside / "other" / "image_embeddings.npy")
        shutil.copyfile(gallery / "gallery.json", outside / "other" / "gallery.json")
        (outside / "secret.txt").write_text("not for itmrt\n")
        (outside / "weights.bin").write_bytes(bytes(4096))
        shutil.copyfile(self.features, folder / "features.npy")
        shutil.copyfile(self.captions, folder / "captions.txt")
        return Case(folder, bundle, gallery, folder / "features.npy", folder / "captions.txt", outside,
                    folder / "results.jsonl")


def build_world(root: Path) -> World:
    import numpy as np

    from itmrt.runtime import load

    from runtime_helpers import make_bundle, random_captions, region_features

    bundle, checkpoint, vocab = make_bundle(root / "model")
    np.save(root / "features.npy", region_features(6, seed=1))
    (root / "captions.txt").write_text("\n".join(random_captions(4, seed=2)) + "\n")
    load(bundle, threads=1).index(np.load(root / "features.npy"), root / "gallery")
    return World(root, bundle, checkpoint, vocab, root / "features.npy", root / "captions.txt", root / "gallery")
