"""Galleries beyond one machine: sharded galleries, a FAISS shortlist index per shard, search on Ray.

- :mod:`itmrt.scale.layout`: a sharded gallery on disk (one ``gallery.json``
  listing shard folders with their counts and sha256; each shard an ordinary
  gallery tied to the bundle) and reading it back.
- :mod:`itmrt.scale.writer`: writing one (``itmrt index --shard-images N``),
  appending shards, float16 storage.
- :mod:`itmrt.scale.index`: the per-shard FAISS index of the images' global
  vectors (flat = exact inner product, IVF, HNSW).
- :mod:`itmrt.scale.regions` / :mod:`itmrt.scale.region_files` / :mod:`itmrt.scale.region_search`: the
  region index of cross-attention galleries (``--shortlist-index regions``: centroids, region codes,
  inverted lists, compact storage) and searching it (docs/region-index.md).
- :mod:`itmrt.scale.audit`: a gallery's index against exhaustive scoring on a sample of captions.
- :mod:`itmrt.scale.shard`: searching one shard and merging shards' answers.
- :mod:`itmrt.scale.local` / :mod:`itmrt.scale.ray_search`: every shard in
  this process, or on Ray actors (``itmrt infer/serve GALLERY --ray ...``).
- :mod:`itmrt.scale.open_gallery`: :func:`open_shards` (``itmrt serve``'s searcher over it: :mod:`itmrt.serve.sharded`).

::

    from itmrt.scale import ShardingOptions, index_sharded, open_shards, RayOptions, SearchRequest
    rt = itmrt.load("bundle/")
    index_sharded(rt, features, "gallery/", ShardingOptions(shard_images=100_000, dtype="float16"))
    shards = open_shards("gallery/", ray=RayOptions(address="auto"))
    hits = shards.search(shards.runtime.encode_captions(["a dog on grass"]), SearchRequest(k=5, shortlist=100)).t2i
    shards.close()

faiss comes with ``pip install 'itmrt[scale]'``, Ray with ``'itmrt[ray]'``;
neither is imported until used.
"""

from __future__ import annotations

from itmrt.optional import lazy_exports

_EXPORTS = {
    "INDEX_KINDS": "itmrt.scale.index",
    "IndexSpec": "itmrt.scale.index",
    "ShardedGallery": "itmrt.scale.layout",
    "is_sharded_gallery": "itmrt.scale.layout",
    "read_sharded_gallery": "itmrt.scale.layout",
    "LocalShards": "itmrt.scale.local",
    "RayOptions": "itmrt.scale.ray_search",
    "RayShards": "itmrt.scale.ray_search",
    "open_shards": "itmrt.scale.open_gallery",
    "SearchRequest": "itmrt.scale.shard",
    "SearchResult": "itmrt.scale.shard",
    "ShardedWriter": "itmrt.scale.writer",
    "ShardingOptions": "itmrt.scale.writer",
    "index_sharded": "itmrt.scale.writer",
}
"""Public name -> the module that defines it; imported on first use (PEP 562), so importing the package is cheap."""

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
