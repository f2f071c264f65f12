"""``itmrt export``: checkpoint + vocabulary -> a verified ONNX bundle folder, in four named stages.

1. **load** (:func:`load_model`): check the paths, load the reference model, its
   family spec and the vocabulary (which must fit the model's embedding);
2. **build** (:func:`build_stage`): the family builds every graph in memory;
   each passes TensorRT 10's op check;
3. **judge parity** (:func:`judge_parity`): ONNX Runtime runs the exact bytes
   that will be written against the PyTorch reference on sample inputs;
4. **publish** (:func:`publish_bundle`): everything is written into a hidden
   staging folder beside the target (``manifest.json`` last) and renamed into
   place. An export that fails or is killed never leaves a folder at the
   target path, and a leftover staging folder has no manifest: nothing that
   looks complete.

:func:`export_bundle` runs the four; :func:`export_model` runs 2-4 on a model
already in memory (a family defined outside itmrt, a model just trained).
"""

from __future__ import annotations

import dataclasses
import math
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from itmrt import __version__
from itmrt.bundle.folder import is_bundle
from itmrt.bundle.graph_entries import graph_entry
from itmrt.bundle.manifest import AxisRange, GraphEntry, Manifest, SourceCheckpoint, VocabEntry, write_manifest
from itmrt.bundle.names import (
    BATCH_CAPTIONS,
    BATCH_IMAGES,
    GRAPH_FILES,
    MANIFEST_NAME,
    MAX_LENGTH,
    NUM_REGIONS,
    VOCAB_FILE,
)
from itmrt.bundle.trt_ops import check_trt_compat
from itmrt.documents import not_a_file, sha256_file
from itmrt.errors import CheckpointError, ItmrtError, VocabularyError
from itmrt.export.sample_parity import ParityResult, check_parity, sample_inputs
from itmrt.families import BuiltGraphs, FamilySpec, GraphOptions, family_of, threshold_families
from itmrt.families.checkpoints import load_checkpoint
from itmrt.families.released import detect_format
from itmrt.limits import MAX_BATCH, MAX_REGIONS, MAX_TOKENS, check_count, check_flag, check_real
from itmrt.models.evaluate import check_vocabulary
from itmrt.publish import check_output_folder, publish_folder, staged_folder
from itmrt.text.vocab import Vocabulary

Log = Callable[[str], None]


@dataclass
class ExportOptions:
    """Knobs of an export; the defaults suit the released models (36 regions per image)."""

    threshold: float | None = None  # NAAF only: replaces the checkpoint's thres_safe
    opset: int = 17
    overwrite: bool = False
    max_batch: int = 128  # upper end of the batch axes' TensorRT profile
    max_length: int = 64  # upper end of the caption-length axis' profile
    num_regions: int = 36  # regions per image (fixed in the profile, symbolic in the graph)
    tolerance: float | None = None  # largest ORT-vs-PyTorch abs error accepted; None: the family's export config
    parity_batch_images: int = 12
    parity_batch_captions: int = 16
    parity_max_length: int = 12


@dataclass
class LoadedModel:
    """Stage 1's result: the reference model in eval mode, its family, its vocabulary and where it came from."""

    model: Any
    spec: FamilySpec
    vocabulary: Vocabulary
    vocab_path: Path
    source: SourceCheckpoint | None
    vocab_check: str = ""  # what could be checked of the vocabulary, in words (:func:`check_vocabulary`)


@dataclass
class BuiltBundle:
    """Stage 2's result: the graphs in memory and the exact bytes that will be written."""

    graphs: BuiltGraphs
    payloads: dict[str, bytes]


def _shape_ranges(options: ExportOptions) -> dict[str, AxisRange]:
    def axis(minimum: int, opt: int, maximum: int) -> AxisRange:
        return AxisRange(min=minimum, opt=min(opt, maximum), max=maximum)

    return {
        BATCH_IMAGES: axis(1, 32, options.max_batch),
        BATCH_CAPTIONS: axis(1, 32, options.max_batch),
        MAX_LENGTH: axis(1, 20, options.max_length),
        NUM_REGIONS: axis(options.num_regions, options.num_regions, options.num_regions),
    }


def _check_target(out: Path, overwrite: bool) -> None:
    """Refuse a target that exists and holds something, unless it is a bundle and ``overwrite`` is set."""
    check_output_folder(out, overwrite, "bundle", is_bundle)


def _versions() -> dict[str, str]:
    import onnxruntime

    return {
        "itmrt": __version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _validate_options(options: ExportOptions) -> ExportOptions:
    """``options`` checked, as a copy whose counts are Python ints (a NumPy integer is taken, but the manifest's
    JSON is not written from one) and whose ``overwrite`` is a bool ("no" would replace a bundle)."""
    check_flag(options.overwrite, "overwrite")
    counts = {"max_batch": check_count(options.max_batch, 1, MAX_BATCH, "--max-batch"),
              "max_length": check_count(options.max_length, 2, MAX_TOKENS, "--max-length"),
              "num_regions": check_count(options.num_regions, 1, MAX_REGIONS, "--num-regions")}
    if options.tolerance is not None:
        check_real(options.tolerance, 0.0, 1.0, "--tolerance (the parity tolerance)", low_open=True)
    if options.threshold is not None:
        check_real(options.threshold, -1.0, 1.0, "--threshold (a cosine-similarity threshold)")
    return dataclasses.replace(options, **counts)


# -- 1. load ----------------------------------------------------------------------------


def _check_sources(checkpoint: Path, vocab: Path) -> None:
    if checkpoint.is_dir():
        raise CheckpointError(
            f"checkpoint {checkpoint} is a folder; give the checkpoint file (*.pth.tar, *.safetensors)"
        )
    if not checkpoint.is_file():
        raise CheckpointError(f"checkpoint {checkpoint} {not_a_file(checkpoint)}")
    if vocab.is_dir():
        raise VocabularyError(f"vocabulary {vocab} is a folder; give the vocabulary JSON file")
    if not vocab.is_file():
        raise VocabularyError(f"vocabulary {vocab} {not_a_file(vocab)}")


def load_model(checkpoint: str | Path, vocab: str | Path) -> LoadedModel:
    """Stage 1: the checkpoint's reference model (eval mode), its family spec, and a vocabulary that fits it."""
    checkpoint, vocab = Path(checkpoint), Path(vocab)
    _check_sources(checkpoint, vocab)
    model = load_checkpoint(checkpoint).eval()
    vocabulary = Vocabulary.from_json(vocab)
    vocab_check = check_vocabulary(model, vocabulary, f"vocabulary {vocab}")
    source = SourceCheckpoint(path=str(checkpoint.resolve()), sha256=sha256_file(checkpoint),
                              format=detect_format(checkpoint))
    return LoadedModel(model, family_of(model), vocabulary, vocab, source, vocab_check)


# -- 2. build ----------------------------------------------------------------------------


def build_stage(loaded: LoadedModel, options: ExportOptions, say: Log) -> BuiltBundle:
    """Stage 2: the family's graphs, serialized, each through TensorRT 10's op check."""
    graph_options = GraphOptions(opset=options.opset, num_regions=options.num_regions, threshold=options.threshold)
    loaded.spec.check_graph_options(graph_options, threshold_families())
    built = loaded.spec.build_graphs(loaded.model, graph_options)
    problems = loaded.spec.export_config().check_components(list(built.models))
    if problems:
        raise ItmrtError(
            f"the {loaded.spec.name} family's graphs do not match its export config: {'; '.join(problems)}"
        )
    payloads = {name: proto.SerializeToString() for name, proto in built.models.items()}
    for name, proto in built.models.items():
        say(f"built {GRAPH_FILES[name]}: {len(proto.graph.node)} nodes, {len(payloads[name]) / 1e6:.1f} MB")
        check_trt_compat(proto, GRAPH_FILES[name]).raise_for_problems()
    say(f"TensorRT 10 op check: {len(built.models)} graphs pass")
    threshold = built.constants.threshold
    if threshold is not None:
        say(f"frozen threshold {threshold.value:.6g} ({threshold.source})")
    return BuiltBundle(built, payloads)


# -- 3. judge parity -------------------------------------------------------------------------


def parity_tolerance(loaded: LoadedModel, options: ExportOptions) -> float:
    """``--tolerance`` if given, else the family's own (its exporter config's)."""
    return options.tolerance if options.tolerance is not None else loaded.spec.export_config().parity_tolerance


def judge_parity(loaded: LoadedModel, built: BuiltBundle, options: ExportOptions, say: Log) -> ParityResult:
    """Stage 3: ONNX Runtime (CPU) against PyTorch on mixed-length sample captions; an error above tolerance."""
    vocabulary = loaded.vocabulary
    sample = sample_inputs(
        built.graphs.image_shape,
        options.parity_batch_images,
        options.parity_batch_captions,
        min(options.parity_max_length, options.max_length),
        loaded.model.text_encoder.vocab_size,
        (vocabulary.pad_id, vocabulary.start_id, vocabulary.end_id),
        nonnegative_images=loaded.spec.nonnegative_images,
    )
    parity = check_parity(loaded.model, built.payloads, sample, built.graphs.reference_scorer)
    say(
        "parity (ONNX Runtime CPU vs PyTorch), worst abs error: "
        + ", ".join(f"{name} {error:.2e}" for name, error in parity.max_abs_error.items())
        + f"; top-{parity.top_k} rankings {'identical' if parity.top_k_identical else 'DIFFER'}"
    )
    tolerance = parity_tolerance(loaded, options)
    if parity.comparison(tolerance).passed:
        return parity
    worst_name, worst = parity.worst()
    if not all(math.isfinite(error) for error in parity.max_abs_error.values()):
        bad = next(name for name, error in parity.max_abs_error.items() if not math.isfinite(error))
        raise ItmrtError(
            f"parity check failed: {bad} gives NaN or infinite values on the sample inputs (are the weights finite?); "
            "no bundle was written"
        )
    if not worst <= tolerance:
        raise ItmrtError(
            f"parity check failed: {worst_name} differs from PyTorch by {worst:.3g} > tolerance {tolerance:g}; "
            "no bundle was written"
        )
    if not parity.top_k_identical:
        raise ItmrtError(
            f"parity check failed: ONNX Runtime's top-{parity.top_k} "
            "rankings differ from PyTorch's; no bundle was written"
        )
    return parity


# -- 4. publish ---------------------------------------------------------------------------------


def _manifest(loaded: LoadedModel, built: BuiltBundle, graphs: dict[str, GraphEntry], files: dict[str, str],
              parity: ParityResult, options: ExportOptions, started: float) -> Manifest:
    vocabulary, constants = loaded.vocabulary, built.graphs.constants
    vocab_entry = VocabEntry(
        file=VOCAB_FILE, sha256=files[VOCAB_FILE], size=len(vocabulary), content_sha256=vocabulary.sha256,
        pad_id=vocabulary.pad_id, start_id=vocabulary.start_id, end_id=vocabulary.end_id, unk_id=vocabulary.unk_id,
    )
    manifest = Manifest(
        family=loaded.spec.name,
        dims=built.graphs.dims,
        opset=options.opset,
        threshold=constants.threshold,
        lambda_softmax=constants.lambda_softmax,
        intra_factor=constants.intra_factor,
        scorer_options=constants.options,
        graphs=graphs,
        vocab=vocab_entry,
        files=files,
        versions=_versions(),
        source_checkpoint=loaded.source,
        image_preprocessing=built.graphs.image_preprocessing,
        parity=parity.record(parity_tolerance(loaded, options)),
        deployment_tolerances=dict(loaded.spec.export_config().deployment_tolerances),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        export_seconds=round(time.perf_counter() - started, 3),
    )
    manifest.traits = loaded.spec.runtime_traits(manifest)  # what the runtime reads instead of the family's code
    return manifest


def publish_bundle(loaded: LoadedModel, built: BuiltBundle, parity: ParityResult, out: Path, options: ExportOptions,
                   started: float) -> Manifest:
    """Stage 4: write graphs, vocabulary and manifest (last) into a staging folder and rename it to ``out``."""
    with staged_folder(out) as staging:
        files: dict[str, str] = {}
        graphs: dict[str, GraphEntry] = {}
        ranges = _shape_ranges(options)
        for name, data in built.payloads.items():
            file = GRAPH_FILES[name]
            (staging / file).write_bytes(data)
            files[file] = sha256_file(staging / file)
            graphs[name] = graph_entry(built.graphs.models[name], file, files[file], ranges)
        shutil.copyfile(loaded.vocab_path, staging / VOCAB_FILE)
        files[VOCAB_FILE] = sha256_file(staging / VOCAB_FILE)
        manifest = _manifest(loaded, built, graphs, files, parity, options, started)
        write_manifest(staging, manifest)  # last: a folder without it is not a bundle
        _check_target(out, options.overwrite)  # again: something may have appeared there meanwhile
        publish_folder(staging, out, "replace" if options.overwrite else "refuse")
    return manifest


# -- the whole export ----------------------------------------------------------------------------


def export_model(loaded: LoadedModel, out: str | Path, options: ExportOptions | None = None,
                 log: Log | None = None, started: float | None = None) -> Manifest:
    """Stages 2-4 for a model already loaded: build, judge parity, publish to ``out``; return the manifest."""
    options = options or ExportOptions()
    say: Log = log or (lambda _message: None)
    started = time.perf_counter() if started is None else started
    out = Path(out)
    options = _validate_options(options)
    _check_target(out, options.overwrite)
    built = build_stage(loaded, options, say)
    parity = judge_parity(loaded, built, options, say)
    manifest = publish_bundle(loaded, built, parity, out, options, started)
    say(f"wrote {out} ({', '.join(sorted(manifest.files))}, {MANIFEST_NAME}) in {time.perf_counter() - started:.1f}s")
    return manifest


def export_bundle(
    checkpoint: str | Path,
    vocab: str | Path,
    out: str | Path,
    options: ExportOptions | None = None,
    log: Log | None = None,
) -> Manifest:
    """Export ``checkpoint`` (with its vocabulary ``vocab``) to the bundle folder ``out``; return the manifest.

    Raises :class:`ItmrtError` subclasses (one-line messages) for a missing or
    unreadable file, a vocabulary of the wrong size, a target folder that
    already holds something, a graph TensorRT would reject, or a parity error
    above the tolerance (``options.tolerance``, else the family's exporter config's).
    """
    options = options or ExportOptions()
    say: Log = log or (lambda _message: None)
    started = time.perf_counter()
    options = _validate_options(options)
    _check_sources(Path(checkpoint), Path(vocab))
    _check_target(Path(out), options.overwrite)  # before the (slow) load
    loaded = load_model(checkpoint, vocab)
    say(f"loaded {Path(checkpoint).name}: {loaded.spec.name}, vocabulary {len(loaded.vocabulary)} words "
        f"({time.perf_counter() - started:.1f}s)")
    say(loaded.vocab_check)
    return export_model(loaded, out, options, say, started)
