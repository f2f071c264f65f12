"""``itmrt export``: checkpoint + vocabulary -> a verified ONNX bundle folder.

Order of work: check the paths, load the model, build every graph in memory,
run the TensorRT op check and the ONNX Runtime parity check on the exact bytes
that will be written, then write everything into a hidden temporary folder
beside the target (``manifest.json`` last) and rename it into place. An export
that fails or is killed therefore never leaves a folder at the target path,
and a leftover temporary folder has no manifest: nothing that looks complete.
"""

from __future__ import annotations

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
from itmrt.data.images import PREPROCESSING_KEY, image_preprocessing_record
from itmrt.errors import CheckpointError, ItmrtError, VocabularyError
from itmrt.export import graphs_image, graphs_scorer, graphs_text
from itmrt.export.manifest import BUNDLE_KIND, MANIFEST_NAME, SCHEMA_VERSION, graph_entry, is_bundle, write_manifest
from itmrt.export.parity import check_parity, sample_inputs
from itmrt.export.trt_ops import check_trt_compat
from itmrt.io import check_output_folder, publish_folder, sha256_file, staged_folder
from itmrt.models.checkpoint import detect_format, load_checkpoint
from itmrt.models.cmpm import CMPMModel
from itmrt.models.matcher import CrossAttentionMatcher
from itmrt.models.naaf import NAAFScorer
from itmrt.text.vocab import Vocabulary

GRAPH_FILES = {"image_encoder": "image_encoder.onnx", "text_encoder": "text_encoder.onnx", "scorer": "scorer.onnx"}
VOCAB_FILE = "vocab.json"
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
    tolerance: float = 1e-4  # largest ORT-vs-PyTorch abs error an export accepts
    parity_batch_images: int = 12
    parity_batch_captions: int = 16
    parity_max_length: int = 12


@dataclass
class BuiltGraphs:
    """In-memory graphs plus what the manifest says about the model."""

    models: dict[str, onnx.ModelProto]
    family: str
    dims: dict[str, Any]
    constants: dict[str, Any]
    reference_scorer: torch.nn.Module | None
    image_shape: tuple[int, ...]


def _shape_ranges(options: ExportOptions) -> dict[str, dict[str, int]]:
    def axis(minimum: int, opt: int, maximum: int) -> dict[str, int]:
        return {"min": minimum, "opt": min(opt, maximum), "max": maximum}

    return {
        graphs_image.BATCH_IMAGES: axis(1, 32, options.max_batch),
        graphs_image.BATCH_CAPTIONS: axis(1, 32, options.max_batch),
        graphs_image.MAX_LENGTH: axis(1, 20, options.max_length),
        graphs_image.NUM_REGIONS: axis(options.num_regions, options.num_regions, options.num_regions),
    }


def _constant(value: float, initializer: str, **extra: Any) -> dict[str, Any]:
    return {"value": float(np.float32(value)), "initializer": initializer, **extra}


def build_graphs(model: CrossAttentionMatcher | CMPMModel, options: ExportOptions) -> BuiltGraphs:
    """Every graph of ``model``'s bundle, checked by ``onnx.checker`` and strict shape inference."""
    opset = options.opset
    if isinstance(model, CMPMModel):
        if options.threshold is not None:
            raise ItmrtError("--threshold applies to NAAF models only; this checkpoint is a CMPM model")
        models = {
            "image_encoder": graphs_image.cmpm_image_encoder_graph(model.image_encoder, model.image_size, opset),
            "text_encoder": graphs_text.cmpm_text_encoder_graph(model.text_encoder, opset),
            "scorer": graphs_scorer.cosine_scorer_graph(model.embed_size, opset),
        }
        dim_keys = ("vocab_size", "word_dim", "lstm_hidden", "embed_size", "width_mult", "image_size")
        dims = {key: model.config[key] for key in dim_keys}
        constants: dict[str, Any] = {
            "threshold": None,
            "lambda_softmax": None,
            "intra_factor": None,
            "scorer_options": {"score": "cosine", "max_over_padding": model.max_over_padding},
            PREPROCESSING_KEY: image_preprocessing_record(model.image_size),
        }
        return BuiltGraphs(models, "cmpm", dims, constants, None, (3, model.image_size, model.image_size))

    image_encoder, text_encoder = model.image_encoder, model.text_encoder
    dims = {
        "img_dim": image_encoder.img_dim,
        "embed_size": image_encoder.embed_size,
        "word_dim": text_encoder.word_dim,
        "vocab_size": text_encoder.vocab_size,
        "num_regions": options.num_regions,
        "num_layers": text_encoder.num_layers,
        "bidirectional": text_encoder.bidirectional,
    }
    models = {
        "image_encoder": graphs_image.region_image_encoder_graph(image_encoder, opset),
        "text_encoder": graphs_text.text_encoder_graph(text_encoder, opset),
    }
    scorer = model.scorer
    reference: torch.nn.Module
    if isinstance(scorer, NAAFScorer):
        checkpoint_threshold = float(model.opt.get("thres_safe", float(scorer.threshold)))
        if options.threshold is None:
            # The scorer's float32 buffer: exactly what PyTorch scores with.
            threshold, source = float(scorer.threshold), "checkpoint thres_safe"
        else:
            if not math.isfinite(options.threshold):
                raise ItmrtError(f"--threshold must be a finite number, not {options.threshold}")
            threshold, source = float(options.threshold), "--threshold override"
        lam, intra = float(scorer.lambda_softmax), float(scorer.intra_factor)
        models["scorer"] = graphs_scorer.naaf_scorer_graph(image_encoder.embed_size, threshold, lam, intra, opset)
        reference = NAAFScorer(threshold, lam, intra)
        constants = {
            "threshold": _constant(
                threshold, graphs_scorer.NAAF_THRESHOLD, source=source, checkpoint_value=checkpoint_threshold
            ),
            "lambda_softmax": _constant(lam, graphs_scorer.NAAF_LAMBDA),
            "intra_factor": _constant(intra, graphs_scorer.NAAF_INTRA_FACTOR),
            "scorer_options": {"propagate": True},
        }
    else:
        if options.threshold is not None:
            raise ItmrtError("--threshold applies to NAAF models only; this checkpoint is a SCAN model")
        models["scorer"] = graphs_scorer.scan_scorer_graph(
            image_encoder.embed_size,
            scorer.cross_attn,
            scorer.raw_feature_norm,
            scorer.agg_func,
            scorer.lambda_softmax,
            scorer.lambda_lse,
            opset,
        )
        reference = scorer
        constants = {
            "threshold": None,
            "lambda_softmax": _constant(scorer.lambda_softmax, graphs_scorer.SCAN_LAMBDA_SOFTMAX),
            "intra_factor": None,
            "scorer_options": {
                "cross_attn": scorer.cross_attn,
                "raw_feature_norm": scorer.raw_feature_norm,
                "agg_func": scorer.agg_func,
                "lambda_lse": float(np.float32(scorer.lambda_lse)),
            },
        }
    return BuiltGraphs(models, model.family, dims, constants, reference, (options.num_regions, image_encoder.img_dim))


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


def _validate_options(options: ExportOptions) -> None:
    if options.max_batch < 1 or options.max_length < 2 or options.num_regions < 1:
        raise ItmrtError("--max-batch and --num-regions must be at least 1 and --max-length at least 2")
    if options.tolerance <= 0:
        raise ItmrtError(f"the parity tolerance must be positive, not {options.tolerance}")


def export_bundle(
    checkpoint: str | Path,
    vocab: str | Path,
    out: str | Path,
    options: ExportOptions | None = None,
    log: Log | None = None,
) -> dict[str, Any]:
    """Export ``checkpoint`` (with its vocabulary ``vocab``) to the bundle folder ``out``; return the manifest.

    Raises :class:`ItmrtError` subclasses (one-line messages) for a missing or
    unreadable file, a vocabulary of the wrong size, a target folder that
    already holds something, a graph TensorRT would reject, or a parity error
    above ``options.tolerance``.
    """
    options = options or ExportOptions()
    say: Log = log or (lambda _message: None)
    started = time.perf_counter()
    checkpoint, vocab, out = Path(checkpoint), Path(vocab), Path(out)
    _validate_options(options)
    if not checkpoint.is_file():
        raise CheckpointError(f"checkpoint {checkpoint} does not exist")
    if not vocab.is_file():
        raise VocabularyError(f"vocabulary {vocab} does not exist")
    _check_target(out, options.overwrite)

    model = load_checkpoint(checkpoint).eval()
    vocabulary = Vocabulary.from_json(vocab)
    vocab_size = model.text_encoder.vocab_size
    if len(vocabulary) != vocab_size:
        raise VocabularyError(
            f"vocabulary {vocab} has {len(vocabulary)} words but the checkpoint's embedding has {vocab_size} rows; "
            "pass the vocabulary the model was trained with"
        )
    family = model.family if isinstance(model, CrossAttentionMatcher) else "cmpm"
    say(f"loaded {checkpoint.name}: {family}, vocabulary {len(vocabulary)} words ({time.perf_counter() - started:.1f}s)")

    built = build_graphs(model, options)
    payloads = {name: proto.SerializeToString() for name, proto in built.models.items()}
    for name, proto in built.models.items():
        say(f"built {GRAPH_FILES[name]}: {len(proto.graph.node)} nodes, {len(payloads[name]) / 1e6:.1f} MB")
        check_trt_compat(proto, GRAPH_FILES[name]).raise_for_problems()
    say(f"TensorRT 10 op check: {len(built.models)} graphs pass")
    if built.constants.get("threshold"):
        threshold = built.constants["threshold"]
        say(f"frozen threshold {threshold['value']:.6g} ({threshold['source']})")

    sample = sample_inputs(
        built.image_shape,
        options.parity_batch_images,
        options.parity_batch_captions,
        min(options.parity_max_length, options.max_length),
        vocab_size,
        (vocabulary.pad_id, vocabulary.start_id, vocabulary.end_id),
        nonnegative_images=built.family != "cmpm",
    )
    parity = check_parity(model, payloads, sample, built.reference_scorer)
    say(
        "parity (ONNX Runtime CPU vs PyTorch), worst abs error: "
        + ", ".join(f"{name} {error:.2e}" for name, error in parity.max_abs_error.items())
        + f"; top-{parity.top_k} rankings {'identical' if parity.top_k_identical else 'DIFFER'}"
    )
    worst_name, worst = parity.worst()
    if not all(math.isfinite(error) for error in parity.max_abs_error.values()):
        bad = next(name for name, error in parity.max_abs_error.items() if not math.isfinite(error))
        raise ItmrtError(
            f"parity check failed: {bad} gives NaN or infinite values on the sample inputs (are the weights finite?); "
            "no bundle was written"
        )
    if not worst <= options.tolerance:
        raise ItmrtError(
            f"parity check failed: {worst_name} differs from PyTorch by {worst:.3g} > tolerance {options.tolerance:g}; "
            "no bundle was written"
        )
    if not parity.top_k_identical:
        raise ItmrtError(f"parity check failed: ONNX Runtime's top-{parity.top_k} rankings differ from PyTorch's; no bundle was written")

    with staged_folder(out) as staging:
        files: dict[str, str] = {}
        graphs: dict[str, Any] = {}
        ranges = _shape_ranges(options)
        for name, data in payloads.items():
            file = GRAPH_FILES[name]
            (staging / file).write_bytes(data)
            files[file] = sha256_file(staging / file)
            graphs[name] = graph_entry(built.models[name], file, files[file], ranges)
        shutil.copyfile(vocab, staging / VOCAB_FILE)
        files[VOCAB_FILE] = sha256_file(staging / VOCAB_FILE)
        manifest: dict[str, Any] = {
            "kind": BUNDLE_KIND,
            "schema_version": SCHEMA_VERSION,
            "family": built.family,
            "dims": built.dims,
            "opset": options.opset,
            **built.constants,
            "graphs": graphs,
            "vocab": {
                "file": VOCAB_FILE,
                "sha256": files[VOCAB_FILE],
                "size": len(vocabulary),
                "content_sha256": vocabulary.sha256,
                "pad_id": vocabulary.pad_id,
                "start_id": vocabulary.start_id,
                "end_id": vocabulary.end_id,
                "unk_id": vocabulary.unk_id,
            },
            "files": files,
            "versions": _versions(),
            "source_checkpoint": {
                "path": str(checkpoint.resolve()),
                "sha256": sha256_file(checkpoint),
                "format": detect_format(checkpoint),
            },
            "parity": parity.as_dict(options.tolerance),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "export_seconds": round(time.perf_counter() - started, 3),
        }
        write_manifest(staging, manifest)  # last: a folder without it is not a bundle
        _check_target(out, options.overwrite)  # again: something may have appeared there meanwhile
        publish_folder(staging, out, "replace")
    say(f"wrote {out} ({', '.join(sorted(files))}, {MANIFEST_NAME}) in {time.perf_counter() - started:.1f}s")
    return manifest
