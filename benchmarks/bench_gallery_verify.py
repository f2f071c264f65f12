"""What verifying a gallery's embeddings costs when it is opened: a 1 GB gallery.

    python benchmarks/bench_gallery_verify.py [--gigabytes 1.0] [--rounds 3] [--work DIR]

A gallery is verified when it is opened (``itmrt.runtime.gallery.read_gallery``):
one streamed pass over ``image_embeddings.npy`` that hashes it against the sha256
in ``gallery.json`` and checks every value is finite. This script writes a gallery
document and a float32 embeddings file of ``--gigabytes`` (images x 36 regions x
1024, random values) once, then times, in one process and interleaved round by
round (best round each):

- ``open, not verified``: ``read_gallery(..., verify=False)`` - the memory map alone;
- ``open, verified (first time)``: ``read_gallery`` with the process's record of
  verified files cleared - the cost every new process pays once per gallery file;
- ``open, verified again``: ``read_gallery`` a second time in the same process
  (the file's size, mtime, ctime and inode unchanged: not hashed again);
- ``sha256 alone`` and ``finite check alone`` over the same bytes, to say which
  half of the pass costs what.

The page cache is warm after the first round (the file was just written), so
the figures are the CPU's cost of the pass, not the disk's; a cold read adds the
disk's read time of the file to the first open, verified or not, once a search
touches every row.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from itmrt.bundle.gallery_manifest import EmbeddingsEntry, GalleryBundle, GalleryManifest, gallery_manifest_text
from itmrt.data.npy import read_npy_header
from itmrt.runtime import gallery as gallery_module

REGIONS, DIM = 36, 1024


def write_gallery(folder: Path, gigabytes: float) -> Path:
    """A gallery folder whose embeddings file holds about ``gigabytes`` GB of float32 (written in blocks)."""
    rows = max(1, int(gigabytes * 1e9 / (REGIONS * DIM * 4)))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / gallery_module.EMBEDDINGS_FILE
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, REGIONS, DIM))
    rng = np.random.default_rng(0)
    for start in range(0, rows, 256):
        array[start : start + 256] = rng.standard_normal((min(256, rows - start), REGIONS, DIM), dtype=np.float32)
    array.flush()
    del array
    digest = sha256_of(path)
    manifest = GalleryManifest(
        bundle=GalleryBundle(path=str(folder / "bundle"), manifest_sha256="0" * 64, family="naaf"),
        embeddings=EmbeddingsEntry(file=gallery_module.EMBEDDINGS_FILE, sha256=digest, shape=[rows, REGIONS, DIM],
                                   dtype="float32"),
        created="bench_gallery_verify",
    )
    (folder / gallery_module.GALLERY_MANIFEST).write_text(gallery_manifest_text(manifest))
    return path


def sha256_of(path: Path, chunk_size: int = 4 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def finite_only(path: Path, chunk_size: int = 4 << 20) -> bool:
    offset = read_npy_header(path, "gallery embeddings").data_offset
    finite = True
    with open(path, "rb") as handle:
        handle.seek(offset)
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            finite &= bool(np.isfinite(np.frombuffer(chunk, dtype=np.float32)).all())
    return finite


def timed(step) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gigabytes", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=None, help="folder for the gallery (a temporary one if not given)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="itmrt-gallery-verify-"))
    try:
        folder = work / "gallery"
        path = write_gallery(folder, args.gigabytes)

        def first_open() -> None:
            gallery_module._VERIFIED.clear()
            gallery_module.read_gallery(folder)

        steps = {
            "open, not verified": lambda: gallery_module.read_gallery(folder, verify=False),
            "open, verified (first time)": first_open,
            "open, verified again": lambda: gallery_module.read_gallery(folder),
            "sha256 alone": lambda: sha256_of(path),
            "finite check alone": lambda: finite_only(path),
        }
        best = {name: float("inf") for name in steps}
        for _ in range(args.rounds):
            for name, step in steps.items():
                best[name] = min(best[name], timed(step))
        size = path.stat().st_size
        print(f"gallery embeddings: {size / 1e9:.2f} GB ({path}); best of {args.rounds} interleaved rounds")
        print(f"| {'step':<30} | {'seconds':>8} | {'GB/s':>6} |")
        print(f"|{'-' * 32}|{'-' * 10}|{'-' * 8}|")
        for name, seconds in best.items():
            rate = size / 1e9 / seconds if seconds > 1e-6 else float("inf")
            print(f"| {name:<30} | {seconds:8.3f} | {rate:6.2f} |")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
