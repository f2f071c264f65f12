"""The runtime's Python API: ``itmrt.runtime.load(bundle)`` and what it returns.

Example::

    import itmrt
    rt = itmrt.load("bundle/")                      # ONNX Runtime, fp32
    gallery = rt.index(features, "gallery/")        # image embeddings, once
    hits = rt.search_text_to_image(["a dog on grass"], gallery, k=5)
    hits.indices[0], hits.scores[0]                 # best images of caption 0

A CMPM bundle also takes image files (JPEG, PNG, WebP), preprocessed as its
manifest records: ``rt.index(list_image_files("photos/"), "gallery/")``; the
gallery keeps each image's path as its id (``gallery.ids``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from itmrt.bundle.folder import BundleInfo, read_bundle
from itmrt.bundle.names import (
    BATCH_CAPTIONS,
    BATCH_IMAGES,
    COMPONENTS,
    MAX_LENGTH,
    BackendName,
    Component,
    Precision,
    parse_choice,
    registered_family,
)
from itmrt.bundle.traits import RuntimeTraits, bundle_traits
from itmrt.errors import ItmrtError
from itmrt.limits import check_flag, check_top_k
from itmrt.runtime.backends import Backend, SessionSettings, open_backend
from itmrt.runtime.encoders import (
    CaptionEmbeddings,
    CaptionEncoder,
    ImageEncoder,
    check_caption_embeddings,
    check_caption_texts,
    check_image_input,
    default_warn,
)
from itmrt.runtime.fused import FusedNaafScorer, fused_available
from itmrt.runtime.gallery import EmbeddingsStore, Gallery, check_encoded_rows, read_gallery, write_gallery
from itmrt.runtime.given_embeddings import check_given_embeddings, check_scored_captions, check_scored_embeddings
from itmrt.runtime.gru_directions import DirectionsBackend
from itmrt.runtime.image_files import ImageBatches, ImageFiles, ImagePreprocessing
from itmrt.runtime.one_caption import FEW_CAPTIONS, ONE_CAPTION_SCORERS, OneCaptionScorer
from itmrt.runtime.options import RuntimeOptions, ScorerChoice, Warn, check_directions
from itmrt.runtime.sessions import CPU_PROVIDER
from itmrt.runtime.shortlist import ScoreRows, check_shortlist, image_global_vectors, shortlist_search
from itmrt.runtime.tiled import ScoreResult, TopK, check_finite_scores, score_tiled, top_k_of_matrix
from itmrt.text.vocab import Vocabulary


class Runtime:
    """A bundle's three graphs on one backend and precision, with encoders and a tiled scorer."""

    def __init__(self, bundle: BundleInfo, options: RuntimeOptions | None = None) -> None:
        options = options or RuntimeOptions()
        self.bundle, self.options = bundle, options
        self.backend_name, self.precision = options.backend, options.precision
        self.traits: RuntimeTraits = bundle_traits(bundle.manifest)  # the manifest's, never the family's code
        self.budget_bytes = options.budget_bytes
        self.warn: Warn = options.warn or default_warn
        self._gallery_vectors: dict[tuple[str, str], np.ndarray] = {}  # shortlist: global vectors per gallery
        settings = SessionSettings(providers=options.providers, intra_op_threads=options.threads, device=options.device,
                                   gpu_mem_limit_mb=options.gpu_mem_limit_mb)
        self.backends: dict[str, Backend] = {
            name: open_backend(bundle, name, options.backend, options.precision, settings) for name in COMPONENTS
        }
        self.fused = _fused_scorer(bundle, options.scorer, options.backend, options.precision,
                                   self.backends[Component.SCORER], settings)
        self.scorer_kind = "fused" if self.fused is not None else "graph"
        if self.fused is not None:
            self.fused.warn = self.warn  # a kernel cache that cannot be written is a warning, not a failure
        self.one_caption = _one_caption_scorer(bundle, options.scorer, options.backend, options.precision,
                                               self.backends[Component.SCORER], settings)
        self.vocab = Vocabulary.from_json(bundle.vocab_file())
        if len(self.vocab) != bundle.manifest.vocab.size:
            raise ItmrtError(
                f"bundle {bundle.path}: vocab.json has {len(self.vocab)} "
                f"words, the manifest says {bundle.manifest.vocab.size}"
            )
        self.batch_limit = _range_max(bundle, BATCH_IMAGES, options.backend, options.precision)
        self.caption_limit = _range_max(bundle, BATCH_CAPTIONS, options.backend, options.precision)
        self.max_length = self._token_limit(options)
        on_trt = options.backend == BackendName.TRT
        self.text_encoder = CaptionEncoder(
            self.backends[Component.TEXT_ENCODER], self.vocab, self.traits.token_level, self.max_length,
            options.on_long, options.batch_size, self.caption_limit if on_trt else None,
            self.traits.caption_buckets, options.warn,
            *_one_thread_text_encoder(self, bundle, settings),
        )
        self._image_input = bundle.graph_inputs(Component.IMAGE_ENCODER)[0]
        self.image_encoder = ImageEncoder(
            self.backends[Component.IMAGE_ENCODER], self._image_input.name, options.batch_size,
            self.batch_limit if on_trt else None,
        )

    def _token_limit(self, options: RuntimeOptions) -> int | None:
        """The caption token limit: the option, or the profile's maximum (which a TensorRT engine cannot exceed)."""
        profile_length = _range_max(self.bundle, MAX_LENGTH, options.backend, options.precision)
        requested = options.max_length
        if requested is not None and profile_length is not None and requested > profile_length \
                and options.backend == BackendName.TRT:
            raise ItmrtError(
                f"--max-length {requested} exceeds the engine profile's {profile_length}; use at most {profile_length}"
            )
        return requested if requested is not None else profile_length

    @property
    def family(self) -> object | None:
        """The family's spec where its code is loaded (registered by the PyTorch side), else None; the runtime
        itself reads only :attr:`traits`."""
        return registered_family(self.bundle.family)

    def close(self) -> None:
        """Free what the backends hold on the GPU (native TensorRT engines, their buffers and streams)."""
        if self.one_caption is not None:
            self.one_caption.close()
        if isinstance(self.text_encoder.small_backend, DirectionsBackend):
            self.text_encoder.small_backend.close()
        for backend in self.backends.values():
            close = getattr(backend, "close", None)
            if callable(close):
                close()

    def __enter__(self) -> Runtime:  # noqa: PYI034 - Python 3.10 has no typing.Self
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- encoding -----------------------------------------------------------

    @property
    def image_input_shape(self) -> list[int | str]:
        return list(self._image_input.shape)

    def check_images(self, features: np.ndarray, source: str = "image features") -> None:
        ranges = {axis: self.bundle.shape_range(axis) for axis in self.image_input_shape if isinstance(axis, str)}
        check_image_input(features, self.image_input_shape, ranges, source)

    def encode_images(self, features: np.ndarray, source: str = "image features") -> np.ndarray:
        """Region features ``[N, n, img_dim]`` (CMPM: images ``[N, 3, H, W]``) -> embeddings."""
        self.check_images(features, source)
        embeddings = self.image_encoder.encode(features, source=source)
        check_encoded_rows(embeddings, features)
        return embeddings

    @property
    def image_preprocessing(self) -> ImagePreprocessing:
        """How an image file becomes this bundle's image-encoder input (CMPM bundles; from the manifest)."""
        return ImagePreprocessing.from_manifest(self.bundle.manifest, str(self.bundle.path))

    def encode_image_files(
        self, files: ImageFiles, skip_bad_images: bool = False, out: np.ndarray | None = None
    ) -> tuple[np.ndarray, list[str]]:
        """Embeddings of image files (CMPM) and the ids of the images they are, in order.

        An unreadable file is a :class:`~itmrt.errors.DataError` naming it; with
        ``skip_bad_images`` it is left out with a warning (the ids say which
        remain). ``out``: an array of ``len(files)`` rows to fill from the top.
        """
        batches = ImageBatches(files, self.image_preprocessing, self.image_encoder.batch_size, skip_bad_images,
                               self.warn)
        ids: list[str] = []
        parts: list[np.ndarray] = []
        for batch_ids, pixels in batches:
            embeddings = self.image_encoder.encode(pixels)
            if out is not None:
                out[len(ids) : len(ids) + len(batch_ids)] = embeddings
            else:
                parts.append(embeddings)
            ids.extend(batch_ids)
        if batches.skipped:
            self.warn(f"skipped {len(batches.skipped)} of {len(files)} images that could not be read")
        return (out[: len(ids)] if out is not None else np.concatenate(parts)), ids

    def encode_captions(self, captions: Sequence[str]) -> CaptionEmbeddings:
        """Captions -> token embeddings (CMPM: caption embeddings) and lengths."""
        captions = check_caption_texts(captions)
        return self.text_encoder.encode(captions)

    def warmup(self) -> float:
        """Run every component once on tiny inputs and return the seconds it took.

        The first call of a session sizes ONNX Runtime's buffers, and the fused
        scorer's kernels compile (or load from numba's cache) on first use; a
        service calls this before it reports ready, so its first answer does
        not pay for either.
        """
        started = time.perf_counter()
        self._encode_directions_side_by_side()
        if self.one_caption is not None:  # NAAF's per-word steps compiled, outside the interpreter lock
            self.one_caption.load_kernels()
            self.one_caption.reranks_build_constants = True  # a warmed runtime serves many queries
        shape = []
        for axis in self.image_input_shape:
            if isinstance(axis, int):
                shape.append(axis)
            else:
                limits = self.bundle.shape_range(axis)
                shape.append(max(limits.min, min(2, limits.opt)) if limits else 1)
        features = np.random.default_rng(0).random(shape, dtype=np.float32)
        images = self.encode_images(features, source="warm-up images")
        captions = [self.vocab.sample_caption(2), self.vocab.sample_caption(5)]  # words it knows: no warning
        self.rank(images, self.encode_captions(captions), top_k=1)
        if self.fused is not None:  # few captions took the one-caption scorer: the fused kernels load here
            self.fused.warm_kernels()
        return time.perf_counter() - started

    def _encode_directions_side_by_side(self) -> None:
        """A warmed runtime (a service) encodes a few captions with its bi-GRU's two directions on two threads
        (:mod:`itmrt.runtime.gru_directions`; the same embeddings, bit for bit). Cutting the graph takes about
        0.5 s at the released sizes, which a one-caption ``itmrt infer`` does not pay: it keeps the one-thread
        session. Measured after a gallery scan, load about 2: 7.5 ms a caption against 9.2 ms on one thread."""
        encoder = self.text_encoder
        if encoder.small_backend is None or isinstance(encoder.small_backend, DirectionsBackend):
            return
        directions = DirectionsBackend.open(self.bundle.graph_file(Component.TEXT_ENCODER, self.precision))
        if directions is not None:
            encoder.small_backend = directions

    # -- scoring ------------------------------------------------------------

    def _image_embeddings(self, images: np.ndarray | Gallery) -> np.ndarray:
        if isinstance(images, Gallery):
            images.check_bundle(self.bundle)
            return images.embeddings
        if not isinstance(images, np.ndarray):
            raise ItmrtError(f"images must be image embeddings (a numpy array) or a Gallery, not "
                             f"{type(images).__name__}")
        check_scored_embeddings(images, self.bundle)
        return images

    def _check_captions(self, captions: object) -> CaptionEmbeddings:
        """Encoded captions whose parts agree (:func:`check_caption_embeddings`) and fit this bundle's scorer."""
        check_scored_captions(check_caption_embeddings(captions), self.bundle)
        assert isinstance(captions, CaptionEmbeddings)
        return captions

    def rank(
        self,
        images: np.ndarray | Gallery,
        captions: CaptionEmbeddings,
        top_k: int = 10,
        keep_scores: bool = False,
        progress: Callable[[int], None] | None = None,
        shortlist: int | None = None,
        directions: tuple[str, ...] = ("t2i", "i2t"),
    ) -> ScoreResult:
        """Tiled scoring of image embeddings (or a gallery) against encoded captions: top-k both ways.

        ``shortlist=K``: score only each query's K best candidates by a cheap
        global score (:mod:`itmrt.runtime.shortlist`), for galleries too large
        for full scoring; K must be at least ``top_k``. No full matrix then;
        only the ``directions`` asked are searched (the other's results are
        empty: no columns).
        A few captions (:data:`itmrt.runtime.one_caption.FEW_CAPTIONS`) are
        scored by the one-caption scorer where it applies (``one_caption``).
        """
        check_top_k(top_k)
        check_flag(keep_scores, "keep_scores")
        self._check_captions(captions)
        directions = check_directions(directions)
        if shortlist is not None and captions.token_level:
            if keep_scores:
                raise ItmrtError(
                    "a shortlist scores only candidate pairs, not the full matrix; drop --shortlist or --scores-out"
                )
            found = self._shortlisted(images, captions, top_k, shortlist, directions)
            t2i = found["t2i"] if "t2i" in found else TopK.none(len(captions))
            i2t = found["i2t"] if "i2t" in found else TopK.none(len(self._image_embeddings(images)))
            return ScoreResult(t2i, i2t, None, (0, 0), 0)
        if shortlist is not None:
            check_shortlist(shortlist, top_k)  # global models: full scoring is already one matrix product
        embeddings = self._image_embeddings(images)
        if self.one_caption is not None and self.one_caption.applies(captions):
            scores = self.score_images(images, captions)
            if progress:
                progress(len(captions))
            t2i, i2t = top_k_of_matrix(scores, top_k, "check the bundle with `itmrt check`")
            return ScoreResult(t2i, i2t, scores if keep_scores else None, (len(scores), len(captions)), 1)
        return self._rank_full(embeddings, captions, top_k, keep_scores, progress)

    def score_images(
        self, images: np.ndarray | Gallery, captions: CaptionEmbeddings, rows: np.ndarray | None = None
    ) -> np.ndarray:
        """Scores ``[N, C]`` of a few captions against ``images`` (a gallery or embeddings), or only against the
        images ``rows`` (a rerank's candidates, in that order) - the one-caption scorer's entry point.

        A gallery's per-image constants are computed once per gallery content and cached; plain arrays get
        them inside the call. Needs a NAAF or SCAN bundle at fp32 on ONNX Runtime's CPU provider
        (``one_caption`` is None otherwise).
        """
        self._check_captions(captions)
        if self.one_caption is None:
            raise ItmrtError("the one-caption scorer runs NAAF and SCAN bundles at fp32 on ONNX Runtime's CPU "
                             "provider, with scorer 'auto' or 'fused'")
        embeddings = self._image_embeddings(images)
        key = None
        if isinstance(images, Gallery):  # its content: the sha256 its manifest records (verified on open)
            entry = images.manifest.embeddings
            key = (str(images.path.resolve()), entry.sha256, entry.dtype, tuple(entry.shape))
        scores = self.one_caption.score(embeddings, captions, key, rows)
        check_finite_scores(scores, "the image and caption embeddings must be finite (encode_images and "
                                    "encode_captions make them so)")  # NaN in a plain array came out as NaN scores
        return scores

    def _rank_full(
        self,
        embeddings: np.ndarray,
        captions: CaptionEmbeddings,
        top_k: int,
        keep_scores: bool,
        progress: Callable[[int], None] | None = None,
    ) -> ScoreResult:
        if self.fused is not None and captions.token_level:
            return self.fused.score_tiles(
                embeddings, captions, top_k, keep_scores, self.budget_bytes, progress=progress
            )
        trt = self.backend_name == BackendName.TRT
        return score_tiled(
            self.backends[Component.SCORER], embeddings, captions, top_k, keep_scores, self.budget_bytes,
            max_images=self.batch_limit if trt else None, max_captions=self.caption_limit if trt else None,
            progress=progress,
        )

    def _score_matrix(self, embeddings: np.ndarray, captions: CaptionEmbeddings) -> np.ndarray:
        if self.one_caption is not None and self.one_caption.applies(captions):
            return self.one_caption.score(embeddings, captions)
        scores = self._rank_full(embeddings, captions, 1, True).scores
        assert scores is not None
        return scores

    def _shortlisted(
        self, images: np.ndarray | Gallery, captions: CaptionEmbeddings, k: int, shortlist: int,
        directions: tuple[str, ...]
    ) -> dict[str, TopK]:
        embeddings = self._image_embeddings(images)
        vectors = None
        score_rows = None
        if isinstance(images, Gallery):  # read-only memmap: its global vectors are computed once per gallery
            key = (str(images.path.resolve()), images.manifest.embeddings.sha256)
            vectors = self._gallery_vectors.get(key)
            if vectors is None:
                vectors = self._gallery_vectors[key] = image_global_vectors(embeddings)
            score_rows = self.rows_scorer(images)  # reranks read the candidates' cached per-image constants
        return shortlist_search(self._score_matrix, embeddings, captions, k, shortlist, directions, vectors,
                                score_rows)

    def rows_scorer(self, gallery: Gallery) -> ScoreRows | None:
        """What a rerank of ``gallery``'s candidates scores them with: ``score_rows(rows, captions)``, the
        one-caption scorer by their rows (:meth:`score_images`: the gallery's cached per-image constants), or None
        where it does not apply to those captions; None without a one-caption scorer."""
        scorer = self.one_caption
        if scorer is None:
            return None

        def score_rows(rows: np.ndarray, group: CaptionEmbeddings) -> np.ndarray | None:
            return self.score_images(gallery, group, rows) if scorer.applies(group) else None

        return score_rows

    def score(self, images: np.ndarray | Gallery, captions: CaptionEmbeddings) -> np.ndarray:
        """The full ``images x captions`` score matrix (float32)."""
        result = self.rank(images, captions, top_k=1, keep_scores=True)
        assert result.scores is not None
        return result.scores

    def search_text_to_image(
        self, captions: Sequence[str], images: np.ndarray | Gallery, k: int = 10, shortlist: int | None = None
    ) -> TopK:
        """For each caption, the ``k`` best images of ``images`` (embeddings or a gallery).

        ``shortlist=K``: rerank only each caption's K best images by the global score.
        """
        return self._search("t2i", images, captions, k, shortlist)

    def search_image_to_text(
        self, images: np.ndarray | Gallery, captions: Sequence[str], k: int = 10, shortlist: int | None = None
    ) -> TopK:
        """For each image (embeddings or a gallery), the ``k`` best of ``captions``.

        ``shortlist=K``: rerank only each image's K best captions by the global score.
        """
        return self._search("i2t", images, captions, k, shortlist)

    def _search(
        self, direction: str, images: np.ndarray | Gallery, captions: Sequence[str], k: int, shortlist: int | None
    ) -> TopK:
        """One direction of retrieval ("t2i" or "i2t"); a shortlist search computes only that direction."""
        check_top_k(k)
        encoded = self.encode_captions(captions)
        if shortlist is not None and encoded.token_level:
            return self._shortlisted(images, encoded, k, shortlist, (direction,))[direction]
        result = self.rank(images, encoded, k, shortlist=shortlist)
        return result.t2i if direction == "t2i" else result.i2t

    # -- galleries ----------------------------------------------------------

    def index(
        self,
        features: np.ndarray | ImageFiles | None = None,
        out: str | Path | None = None,
        overwrite: bool = False,
        source: str = "image features",
        skip_bad_images: bool = False,
        dtype: str = "float32",
        embeddings: np.ndarray | None = None,
        store: EmbeddingsStore | None = None,
    ) -> Gallery:
        """Encode ``features`` (or, for CMPM, image files) once into a gallery folder tied to this bundle.

        From image files the gallery keeps each image's id (``Gallery.ids``);
        ``skip_bad_images`` leaves unreadable files out instead of failing.
        ``dtype="float16"`` stores the embeddings at half the size (scoring
        upcasts them one tile at a time). Sharded galleries: :mod:`itmrt.scale`.
        ``embeddings``: image embeddings encoded elsewhere, stored as given instead of encoding ``features``
        (checked: :func:`itmrt.runtime.given_embeddings.check_given_embeddings`). ``store``: how the embeddings
        are kept if not as a ``.npy`` (:data:`itmrt.runtime.gallery.EmbeddingsStore`; a sharded writer's compact
        region storage).
        """
        if out is None:
            raise ItmrtError("index needs out: the gallery folder to create")
        check_flag(overwrite, "overwrite")  # "no" would be truthy: a gallery replaced that was not to be
        check_flag(skip_bad_images, "skip_bad_images")
        if embeddings is not None:
            if features is not None:
                raise ItmrtError("give image features or embeddings to index, not both")
            return self.store_embeddings(embeddings, out, overwrite, source, dtype, store=store)
        if features is None:
            raise ItmrtError("index needs image features (or image files), or embeddings=")
        details = {"backend": self.backend_name, "precision": self.precision, "source": source}
        if isinstance(features, ImageFiles):
            files, preprocessing = features, self.image_preprocessing
            blank = np.zeros((1, preprocessing.height, preprocessing.width, 3), dtype=np.uint8)
            dims = self.image_encoder.encode(preprocessing.model_input(blank)).shape[1:]

            def encode_files_into(array: np.ndarray) -> list[str]:
                ids = self.encode_image_files(files, skip_bad_images, array)[1]
                check_encoded_rows(array[: len(ids)])
                return ids

            return write_gallery(out, self.bundle, encode_files_into, (len(files), *dims),
                                 {**details, "source": files.source}, overwrite, dtype, store)
        self.check_images(features, source)
        first = self.image_encoder.encode(np.asarray(features[:1]))
        shape = (int(features.shape[0]), *first.shape[1:])

        def encode_into(array: np.ndarray) -> None:
            self.image_encoder.encode(features, out=array, source=source)
            check_encoded_rows(array, features)

        return write_gallery(out, self.bundle, encode_into, shape, details, overwrite, dtype, store)

    def store_embeddings(self, embeddings: np.ndarray, out: str | Path, overwrite: bool = False,
                         source: str = "embeddings", dtype: str = "float32", checked: bool = False,
                         store: EmbeddingsStore | None = None) -> Gallery:
        """A gallery of this bundle holding ``embeddings`` as given (checked first unless ``checked``)."""
        check_flag(overwrite, "overwrite")
        if not checked:
            check_given_embeddings(embeddings, self.bundle, source)

        def copy_into(array: np.ndarray, block: int = 4096) -> None:
            for start in range(0, len(embeddings), block):
                array[start : start + block] = embeddings[start : start + block]

        details = {"backend": None, "precision": None, "source": source}
        # kept another way than a .npy, and already in the stored dtype: no copy (they were checked above)
        as_stored = embeddings if store is not None and embeddings.dtype == np.dtype(dtype) and len(embeddings) \
            else None
        return write_gallery(out, self.bundle, copy_into, tuple(int(x) for x in embeddings.shape), details,
                             overwrite, dtype, store, given=as_stored)

    def open_gallery(self, path: str | Path) -> Gallery:
        """Open a gallery and check it was made with this bundle."""
        gallery = read_gallery(path)
        gallery.check_bundle(self.bundle)
        return gallery


def _fused_scorer(
    bundle: BundleInfo, scorer: ScorerChoice | str, backend: str, precision: str, graph: Backend,
    settings: SessionSettings | None,
) -> FusedNaafScorer | None:
    """The fused CPU scorer when ``scorer`` asks for it (or "auto" finds it applicable), else None (the graph)."""
    scorer = parse_choice(ScorerChoice, scorer, "scorer")
    if scorer == ScorerChoice.GRAPH:
        return None
    on_cpu = backend == BackendName.ORT and getattr(graph, "providers", [None])[0] == CPU_PROVIDER
    applicable = bundle_traits(bundle.manifest).fused_scorer and precision == Precision.FP32 and on_cpu
    if scorer == ScorerChoice.AUTO and not (applicable and fused_available()):
        return None
    if not applicable:
        raise ItmrtError(
            f"the fused scorer runs NAAF at fp32 on ONNX Runtime's CPU provider only (here: {bundle.family}, "
            f"{precision}, {backend}); use scorer='graph'"
        )
    threads = settings.intra_op_threads if settings else 0
    return FusedNaafScorer.from_graph(bundle.graph_file(Component.SCORER, Precision.FP32), threads)


def _one_caption_scorer(
    bundle: BundleInfo, scorer: ScorerChoice | str, backend: str, precision: str, graph: Backend,
    settings: SessionSettings | None,
) -> OneCaptionScorer | None:
    """The one-caption scorer for NAAF and SCAN bundles at fp32 on ONNX Runtime's CPU provider (scorer "auto" or
    "fused"; "graph" keeps every call on the scorer graph), else None."""
    scorer = parse_choice(ScorerChoice, scorer, "scorer")
    on_cpu = backend == BackendName.ORT and getattr(graph, "providers", [None])[0] == CPU_PROVIDER
    applicable = bundle_traits(bundle.manifest).scorer in ONE_CAPTION_SCORERS and precision == Precision.FP32 and on_cpu
    if scorer == ScorerChoice.GRAPH or not applicable:
        return None
    threads = settings.intra_op_threads if settings else 0
    return OneCaptionScorer.from_graph(bundle.graph_file(Component.SCORER, Precision.FP32), threads)


def _one_thread_text_encoder(
    runtime: Runtime, bundle: BundleInfo, settings: SessionSettings
) -> tuple[Backend | None, int]:
    """With the one-caption scorer: the text encoder again on one ONNX Runtime thread, for calls of a few captions.

    A caption's bi-GRU makes its intra-op threads meet at every token (30 times for 15 tokens); two threads
    spinning between those meetings also take the cores the scorer's workers need right after. Measured under
    load (benchmarks/bench_one_caption.py): one caption in 8.5-23 ms on one thread against 45-47 ms on two.
    Costs a second copy of the text encoder's weights (43 MB at the released sizes).
    """
    if runtime.one_caption is None or settings.intra_op_threads == 1:
        return None, 0
    one = replace(settings, intra_op_threads=1)
    backend = open_backend(bundle, Component.TEXT_ENCODER, runtime.backend_name, runtime.precision, one)
    return backend, FEW_CAPTIONS


def _range_max(
    bundle: BundleInfo, axis: str, backend: str = BackendName.ORT, precision: str = Precision.FP32
) -> int | None:
    """The largest size of ``axis`` the runtime may feed: the manifest's range, and for TensorRT engines the
    smallest maximum any of them was built for (a board preset or --shape may have narrowed it)."""
    limits = bundle.shape_range(axis)
    largest = limits.max if limits else None
    if backend == BackendName.TRT:
        records = [bundle.engine_record(component, precision) for component in COMPONENTS]
        built = [r.axis_ranges[axis].max for r in records if r is not None and axis in r.axis_ranges]
        if built:
            largest = min(built)
    return largest


def load(bundle: str | Path, options: RuntimeOptions | None = None, **keywords: Any) -> Runtime:
    """Open ``bundle`` for inference with ``options`` (:class:`~itmrt.runtime.options.RuntimeOptions`,
    the group of runtime options the CLI, the service and the reports build too), any of whose fields a
    keyword replaces: ``load(path, backend="trt", precision="fp16")``.

    ``backend``: "ort" or "trt"; ``precision``: fp32, fp16, int8.
    ``providers``: ONNX Runtime execution providers by name or alias
    (tensorrt, cuda, cpu); default: CUDA then CPU, those available (ONNX
    Runtime's TensorRT provider only when named; it then uses the bundle's
    shape ranges and caches). ``device``: the CUDA device (after
    ``CUDA_VISIBLE_DEVICES``); ``gpu_mem_limit_mb`` caps the CUDA provider's
    memory arena.
    ``max_length``: the caption token limit (default: the bundle's profile
    maximum); longer captions are truncated with a warning or refused
    (``on_long="refuse"``). ``budget_bytes``: the scorer's tile memory budget.
    ``scorer``: "graph" runs the bundle's scorer graph; "fused" the fused CPU
    scorer (NAAF, fp32, ORT on the CPU; needs numba: ``itmrt[cpu]``), one GEMM
    and one pass per tile, several times faster; "auto" takes "fused" where it
    applies and numba is installed, else "graph". ``warn``: where warnings go.
    """
    options = (options or RuntimeOptions()).replace(**keywords)
    return Runtime(read_bundle(bundle), options)
