"""Galleries from embeddings encoded elsewhere (``itmrt index BUNDLE --embeddings EMB.npy``, ``rt.index(embeddings=)``).

The array must be what the bundle's image encoder would have written: float32
or float16; ``[N, regions, d]`` for a cross-attention bundle (``regions``
within the bundle's range, ``d`` its ``embed_size``) or ``[N, D]`` for a
global one; every value finite; and region vectors of unit length, as the
image encoder's l2norm leaves them (within ``NORM_TOLERANCE``: float16
rounding). Each problem is one line naming the first row that has it. The
array is read in blocks, so a memory-mapped file of any size is checked
without loading it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from itmrt.bundle.traits import bundle_traits
from itmrt.errors import DataError
from itmrt.runtime.encoders import CaptionEmbeddings

NORM_TOLERANCE = 1e-2
"""Largest ``| ||v|| - 1 |`` accepted for a region vector."""
CHECK_BLOCK = 4096
"""Images read per block while checking (at most)."""
CHECK_BLOCK_BYTES = 32 << 20
"""At most this much float32 per checked block (region galleries: about 200 images; cache-sized temporaries)."""


def check_given_embeddings(embeddings: Any, bundle: Any, source: str = "embeddings") -> np.ndarray:
    """``embeddings`` as an array the bundle's galleries hold, or a one-line :class:`DataError`."""
    if not isinstance(embeddings, np.ndarray):
        raise DataError(f"{source} must be a numpy array (or a .npy file), not {type(embeddings).__name__}")
    if embeddings.dtype not in (np.float32, np.float16):
        raise DataError(f"{source} holds {embeddings.dtype}; give float32 or float16 embeddings")
    dims = bundle.manifest.dims
    depth = int(dims["embed_size"])
    token_level = bundle_traits(bundle.manifest).token_level  # region vectors per image (NAAF, SCAN)
    if token_level:
        limits = bundle.shape_range("num_regions")
        low, high = (limits.min, limits.max) if limits else (1, 1 << 20)
        expected = f"[N, {low}, {depth}]" if low == high else f"[N, {low}..{high}, {depth}]"
        if embeddings.ndim != 3 or embeddings.shape[2] != depth or not low <= embeddings.shape[1] <= high:
            raise DataError(f"{source} has shape {tuple(embeddings.shape)}; bundle {bundle.path} embeds images as "
                            f"{expected} (images, regions, embed_size)")
    elif embeddings.ndim != 2 or embeddings.shape[1] != depth:
        raise DataError(f"{source} has shape {tuple(embeddings.shape)}; bundle {bundle.path} embeds images as "
                        f"[N, {depth}]")
    if embeddings.shape[0] == 0:
        raise DataError(f"{source} holds no images")
    rows = max(1, min(CHECK_BLOCK, CHECK_BLOCK_BYTES // (4 * int(np.prod(embeddings.shape[1:])))))
    for start in range(0, len(embeddings), rows):
        block = np.asarray(embeddings[start : start + rows], dtype=np.float32)
        if token_level:
            # one pass: a NaN or infinity makes its vector's squared norm non-finite (float16 or unit-scale
            # float32 values cannot overflow it), so the element-wise test runs only on a block that has one
            norms = np.sqrt(np.einsum("ird,ird->ir", block, block))
            if not np.isfinite(norms).all():
                _refuse_non_finite(block, start, source)
            off = np.abs(norms - 1).max(axis=-1) > NORM_TOLERANCE
            if off.any():
                row = start + int(np.argmax(off))
                raise DataError(f"{source}: image {row} has region vectors that are not of unit length (the image "
                                "encoder l2-normalises each region); normalise them first")
        else:
            _refuse_non_finite(block, start, source)
    return embeddings


def _refuse_non_finite(block: np.ndarray, start: int, source: str) -> None:
    bad = ~np.isfinite(block).reshape(len(block), -1).all(axis=1)
    if bad.any():
        raise DataError(f"{source}: image {start + int(np.argmax(bad))} holds NaN or infinite values")


def check_scored_embeddings(images: np.ndarray, bundle: Any) -> None:
    """Image embeddings given to :meth:`Runtime.rank` / :meth:`Runtime.score_images` as a plain array: a float
    dtype and the shape the bundle's scorer takes, or a one-line :class:`DataError`. Strings, booleans, integers
    and objects were cast to float32 and ranked, complex values lost their imaginary part with a warning, zero
    regions failed as ZeroDivisionError and a wrong depth or rank in ONNX Runtime. Only the shape and dtype are
    read (no pass over a large array): scores that come out NaN are refused where they are computed."""
    depth = int(bundle.manifest.dims["embed_size"])
    token_level = bundle_traits(bundle.manifest).token_level
    if not np.issubdtype(images.dtype, np.floating):
        raise DataError(f"image embeddings hold {images.dtype}; give float32 or float16 embeddings "
                        "(Runtime.encode_images makes them)")
    expected = f"[N, regions, {depth}]" if token_level else f"[N, {depth}]"
    if images.ndim != (3 if token_level else 2) or images.shape[-1] != depth or (token_level and images.shape[1] < 1):
        raise DataError(f"image embeddings have shape {tuple(images.shape)}; bundle {bundle.path} scores "
                        f"{expected} (Runtime.encode_images makes them)")


def check_scored_captions(captions: CaptionEmbeddings, bundle: Any) -> None:
    """Caption embeddings made by hand for another kind of bundle (one vector per caption for a cross-attention
    bundle failed in ONNX Runtime as a missing input) or of another size (a shortlist's matmul ValueError):
    a one-line :class:`DataError`."""
    depth = int(bundle.manifest.dims["embed_size"])
    token_level = bundle_traits(bundle.manifest).token_level
    if captions.token_level != token_level:
        want = "token embeddings with offsets" if token_level else "one vector per caption (no offsets)"
        raise DataError(f"caption embeddings: bundle {bundle.path} scores {want}; make them with this runtime's "
                        "encode_captions")
    if captions.vectors.shape[1] != depth:
        raise DataError(f"caption embeddings have {captions.vectors.shape[1]} values a vector; bundle {bundle.path} "
                        f"embeds {depth} (make them with this runtime's encode_captions)")
