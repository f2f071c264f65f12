"""What the sharded-gallery tests share: a small model, its images in one gallery and in 3 shards, captions."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from itmrt.errors import ItmrtError
from itmrt.runtime import load
from itmrt.scale import SearchRequest, ShardingOptions, index_sharded, open_shards

from cli_helpers import run_cli
from runtime_helpers import make_bundle, random_captions, region_features

N_IMAGES = 50


def quiet(_message: str) -> None:
    pass


def scale_setup(root: Path, seed: int, captions: int) -> dict[str, Any]:
    """A small NAAF bundle; ``N_IMAGES`` images as one gallery (``plain``) and as shards of 17 (``sharded``);
    the images' features and the captions as files too (for the CLI)."""
    bundle = make_bundle(root / "model")[0]
    runtime = load(bundle, threads=1, warn=quiet)
    features = region_features(N_IMAGES, seed=seed)
    np.save(root / "features.npy", features)
    texts = random_captions(captions, seed=seed + 1, max_words=10)
    (root / "captions.txt").write_text("\n".join(texts) + "\n")
    plain = runtime.index(features, root / "plain")
    index_sharded(runtime, features, root / "sharded", ShardingOptions(shard_images=17))
    return {"root": root, "bundle": bundle, "runtime": runtime, "features": features, "captions": texts,
            "encoded": runtime.encode_captions(texts), "plain": plain, "sharded": root / "sharded"}


def tampered_file_is_refused(gallery: Path, member: str, at: int = -1, bit: int = 1) -> None:
    """Flip ``bit`` of byte ``at`` of the gallery's file ``member``: opening the gallery is refused in one line
    naming that file's sha256 mismatch."""
    path = gallery / member
    data = bytearray(path.read_bytes())
    data[at] ^= bit
    path.write_bytes(bytes(data))
    with pytest.raises(ItmrtError, match=rf"{re.escape(path.name)} does not match the sha256") as caught:
        open_shards(gallery, threads=1, warn=quiet)
    assert "\n" not in str(caught.value)


def same_top_k(a: Any, b: Any, atol: float = 0.0) -> None:
    """Two top-k results: the same indices, and identical scores (within ``atol`` where given: a warmed
    runtime, as `serve`'s, takes NAAF's per-word steps in a compiled kernel that rounds differently)."""
    np.testing.assert_array_equal(a.indices, b.indices)
    if atol:
        np.testing.assert_allclose(a.scores, b.scores, rtol=0, atol=atol)
    else:
        np.testing.assert_array_equal(a.scores, b.scores)


def infer_answers_as_the_api(capsys: Any, gallery: Path, captions: list[str], name: str, k: int, shortlist: int,
                             rescore: int) -> Path:
    """``itmrt infer`` over the sharded ``gallery`` with ``--top-k``, ``--shortlist`` and ``--rescore`` gives the
    images the API's search gives; the captions' file (``name``.txt beside the gallery), for later commands."""
    listed = gallery.parent / f"{name}.txt"
    listed.write_text("\n".join(captions) + "\n")
    shards = open_shards(gallery, threads=1, warn=quiet)
    request = SearchRequest(k=k, shortlist=shortlist, rescore=rescore)
    want = shards.search(shards.runtime.encode_captions(captions), request).t2i
    out = gallery.parent / f"{name}.jsonl"
    result = run_cli(capsys, "infer", str(gallery), "--captions", str(listed), "--top-k", str(k),
                     "--shortlist", str(shortlist), "--rescore", str(rescore), "--out", str(out), "--overwrite")
    assert result.code == 0, result.err
    lines = [json.loads(line) for line in out.read_text().splitlines() if '"caption"' in line]
    np.testing.assert_array_equal(np.array([line["images"] for line in lines[: len(captions)]]), want.indices)
    return listed
