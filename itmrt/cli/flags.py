"""The options several commands share, each declared once: the same flag, default and help everywhere.

Choices are str enums (:class:`~itmrt.bundle.names.BackendName`,
:class:`~itmrt.bundle.names.Precision`, :class:`~itmrt.runtime.options.ScorerChoice`,
:class:`~itmrt.runtime.options.OnLong`, :class:`~itmrt.precision.CalibrationMethod`):
the command receives a member, ``--help`` lists the choices, and anything else is
refused while the command line is parsed, before any work, with the one-line
``error: unknown precision 'int4'; choose one of fp32, fp16, int8`` (exit status 2).

The runtime's flags are one group (:func:`runtime_group`): a command declares a parameter ``runtime``
and receives one :class:`~itmrt.runtime.options.RuntimeOptions`, the object ``itmrt.load()``, the
service and the reports take.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from typing import Any, TypeVar

import typer

from itmrt import limits
from itmrt.bundle.names import BackendName, Precision, parse_choice
from itmrt.cli.groups import Flag, OptionGroup, select_flags
from itmrt.precision import DEFAULT_METHOD, CalibrationMethod
from itmrt.publish import OutputOptions
from itmrt.runtime.options import Direction, OnLong, RuntimeOptions, ScorerChoice

ChoiceT = TypeVar("ChoiceT", bound=Enum)


def _choice(choices: type[ChoiceT], default: Any, flag: str, what: str, help_text: str) -> Any:
    """An option whose value is a member of ``choices``; ``--help`` shows ``[a|b|c]``."""
    def parse(value: str) -> ChoiceT:
        return parse_choice(choices, value, what)

    metavar = "[" + "|".join(str(member.value) for member in choices) + "]"
    return typer.Option(default, flag, parser=parse, metavar=metavar, help=help_text)


def overwrite(what: str) -> Any:
    """``--overwrite``: replace ``what`` (an existing bundle, gallery, report, files...)."""
    return typer.Option(False, "--overwrite", help=f"Replace {what}.")


def progress() -> Any:
    return typer.Option(True, "--progress/--no-progress", help="Show progress bars on stderr (only on a terminal).")


def batch_size(default: int, what: str, minimum: int = 1) -> Any:
    return typer.Option(default, "--batch-size", min=minimum, max=limits.MAX_BATCH, help=what)


def _threads(value: int) -> int:
    return limits.check_threads(value)


def threads() -> Any:
    return typer.Option(0, "--threads", callback=_threads, help=(
        f"ONNX Runtime intra-op threads (0: one per core; at most {limits.THREADS_PER_CORE} per core)."))


def finite(flag: str, low: float, high: float, low_open: bool = False) -> Any:
    """A callback that refuses a float option outside ``low``..``high`` or not finite (click's ranges let NaN by)."""
    def check(value: float | None) -> float | None:
        return None if value is None else limits.check_real(value, low, high, flag, low_open)

    return check


def providers() -> Any:
    return typer.Option(
        None, "--providers",
        help="ONNX Runtime providers, comma-separated (tensorrt,cuda,cpu); default: the available ones in that order.",
    )


def parse_providers(text: str | None) -> list[str] | None:
    """``"cuda, cpu"`` -> ``["cuda", "cpu"]``; None or empty: the runtime's default order."""
    names = [name.strip() for name in (text or "").split(",") if name.strip()]
    return names or None


def backend() -> Any:
    return _choice(BackendName, BackendName.ORT, "--backend", "backend",
                   "ONNX Runtime (ort) or native TensorRT engines (trt).")


def precision(default: Precision = Precision.FP32, help_text: str = "The bundle must hold that variant.") -> Any:
    return _choice(Precision, default, "--precision", "precision", help_text)


def scorer(default: ScorerChoice | None = None) -> Any:
    return _choice(ScorerChoice, default, "--scorer", "scorer",
                   "The runtime's scorer: the bundle's scorer graph, the fused CPU scorer, or auto (fused where it "
                   "applies)" + ("" if default is not None else "; default: the runtime's") + ".")


def on_long(default: OnLong = OnLong.TRUNCATE, help_text: str = "truncate (with a warning) or refuse") -> Any:
    return _choice(OnLong, default, "--on-long", "--on-long", f"Captions over the token limit: {help_text}.")


def direction() -> Any:
    return _choice(Direction, Direction.BOTH, "--direction", "--direction", (
        "Which queries to answer: both (each caption's best images and each image's best captions), t2i (each "
        "caption's best images: a search of the images; on a large gallery the i2t half alone is a line per "
        "image) or i2t."))


def max_length() -> Any:
    return typer.Option(None, "--max-length", min=2, max=limits.MAX_TOKENS,
                        help="Caption token limit (default: the bundle's profile maximum).")


def memory_mb() -> Any:
    return typer.Option(32, "--memory-mb", min=1, max=limits.MAX_MEMORY_MB,
                        help="Memory budget of one scoring tile, in MB.")


def device(help_text: str = "The CUDA device the runtime uses (numbered after CUDA_VISIBLE_DEVICES): ONNX Runtime's "
                                "CUDA and TensorRT providers and the native TensorRT engines.") -> Any:
    return typer.Option(0, "--device", min=0, max=255, help=help_text)


def gpu_mem_limit_mb() -> Any:
    return typer.Option(None, "--gpu-mem-limit-mb", min=1, max=1 << 24,
                        help="Cap of ONNX Runtime's CUDA memory arena, in MB (default: no cap).")


RUNTIME_FLAGS: dict[str, Flag] = {
    "backend": Flag(BackendName, backend),
    "precision": Flag(Precision, precision),
    "providers": Flag(str | None, providers),
    "threads": Flag(int, threads),
    "scorer": Flag(ScorerChoice, lambda: scorer(ScorerChoice.AUTO)),
    "max_length": Flag(int | None, max_length),
    "on_long": Flag(OnLong, on_long),
    "batch_size": Flag(int, lambda: batch_size(128, "Images / captions per encoder batch.")),
    "memory_mb": Flag(int, memory_mb),
    "device": Flag(int, device),
    "gpu_mem_limit_mb": Flag(int | None, gpu_mem_limit_mb),
}
"""The runtime's flags (:class:`~itmrt.runtime.options.RuntimeOptions`), each declared once; a command takes
those that apply to it (``--memory-mb`` sets ``budget_bytes``; ``--providers`` is comma-separated)."""


def runtime_options(**flags: Any) -> RuntimeOptions:
    """The :class:`~itmrt.runtime.options.RuntimeOptions` of the runtime flags given (the others: its defaults)."""
    if "providers" in flags:
        flags["providers"] = parse_providers(flags["providers"])
    if "memory_mb" in flags:
        flags["budget_bytes"] = flags.pop("memory_mb") << 20
    return RuntimeOptions(**flags)


def runtime_group(*names: str, **declared: Any) -> OptionGroup:
    """The group of the runtime flags ``names`` (in that order) for a command's parameter ``runtime``, which
    receives their :class:`~itmrt.runtime.options.RuntimeOptions`. ``declared``: a flag's own typer option
    where the command's default or help differs (``on_long=on_long(OnLong.REFUSE, ...)``)."""
    return OptionGroup("runtime", select_flags(RUNTIME_FLAGS, names, declared), runtime_options)


def calibration_method() -> Any:
    return _choice(CalibrationMethod, DEFAULT_METHOD, "--method", "calibration method",
                   "INT8 range estimation: percentile (the central 99.999% of values), entropy (KL, TensorRT-style) or "
                   "minmax. Measured on the shipped models, entropy clips too much: NAAF rsum -1.9, CMPM -153.")


def plots() -> Any:
    return typer.Option(True, "--plots/--no-plots", help="Write PNG plots (needs matplotlib).")


def report_folder(what: str) -> Any:
    return typer.Option(..., "--report", help=f"Output folder: {what}.")


def _region_flag(flag: str, minimum: int, help_text: str) -> Callable[[], Any]:
    return lambda: typer.Option(None, flag, min=minimum, max=limits.MAX_COUNT, help=f"Region index: {help_text}")


REGION_FLAGS: dict[str, Flag] = {
    "nprobe": Flag(int | None, _region_flag("--nprobe", 1, "centroids probed per caption token (default: what "
                                                          "each shard records).")),
    "exact_pass": Flag(int | None, _region_flag("--exact-pass", 0, "images per shard scored exactly, at least K "
                                                                   "(default: recorded, or 500 on a poor fit).")),
    "union": Flag(int | None, _region_flag("--union", 0, "images per shard added from the global vectors "
                                                         "(default: recorded, or 500 on a poor fit).")),
    "refine": Flag(int | None, _region_flag("--refine", 0, "images per shard re-estimated from all their regions' "
                                                           "centroids (default: recorded, 1024, at most 2048 per "
                                                           "query split over the shards, at least 256 each); on a "
                                                           "shard with a fine sketch, the scan's best estimated "
                                                           "again from it (default 2000 for 50,000 images, in "
                                                           "proportion, at least 1000).")),
    "prefilter": Flag(int | None, _region_flag("--prefilter", 0, "probed images per shard estimated, by their "
                                                                 "summed centroid scores (0: all; default 2048).")),
    "rescore": Flag(int | None, _region_flag("--rescore", 0, "images per shard re-estimated from their stored "
                                                             "regions (compact: centroid plus residual levels) "
                                                             "before K are kept (0: none; default on compact storage: "
                                                             "1024 per query split over the shards, at least 64 "
                                                             "each; with --budget 512, at least 24 each; exact: "
                                                             "0; a sketched shard: 1000, or with a fine sketch 200, "
                                                             "in proportion above 50,000 images).")),
    "budget": Flag(int | None, _region_flag("--budget", 1, "images reranked over all shards together, the best by "
                                                           "estimate (default: K per shard; text to image only).")),
}
"""How a sharded gallery's region index is searched (:class:`itmrt.scale.SearchRequest`'s fields of the same
names), each declared once; unset flags leave each shard's recorded or default value."""


def region_group(*names: str) -> OptionGroup:
    """The group of the region-index flags ``names`` (default: all) for a command's parameter ``regions``, which
    receives a dict of the flags given (to pass to :class:`itmrt.scale.SearchRequest`)."""
    chosen = names or tuple(REGION_FLAGS)
    return OptionGroup("regions", select_flags(REGION_FLAGS, chosen, {}),
                       lambda **flags: {name: value for name, value in flags.items() if value is not None})


OUTPUT_FLAGS: dict[str, Flag] = {
    "overwrite": Flag(bool, lambda: overwrite("existing output files")),
    "progress": Flag(bool, progress),
    "plots": Flag(bool, plots),
}
"""The output flags (:class:`itmrt.publish.OutputOptions`), each declared once."""


def output_group(*names: str, **declared: Any) -> OptionGroup:
    """The group of the output flags ``names`` for a command's parameter ``outputs``, which receives their
    :class:`itmrt.publish.OutputOptions` (``overwrite=overwrite("a report already in --report")``: its own help)."""
    return OptionGroup("outputs", select_flags(OUTPUT_FLAGS, names, declared), lambda **flags: OutputOptions(**flags))


__all__ = [
    "BackendName",
    "CalibrationMethod",
    "OUTPUT_FLAGS",
    "OnLong",
    "OutputOptions",
    "Precision",
    "REGION_FLAGS",
    "RUNTIME_FLAGS",
    "RuntimeOptions",
    "ScorerChoice",
    "backend",
    "batch_size",
    "calibration_method",
    "device",
    "finite",
    "gpu_mem_limit_mb",
    "max_length",
    "memory_mb",
    "on_long",
    "output_group",
    "overwrite",
    "parse_providers",
    "plots",
    "precision",
    "progress",
    "providers",
    "region_group",
    "report_folder",
    "runtime_group",
    "runtime_options",
    "scorer",
    "threads",
]


def image_inputs(runtime: Any, images: Any) -> Any:
    """What ``--images`` names for ``runtime``'s bundle: a features ``.npy`` (memory-mapped) or image files.

    Anything but a ``.npy`` is image files (a folder, or a text file listing paths), which only a bundle
    that takes images reads; for any other the error names the path before a line of the list is read.
    """
    from itmrt.errors import ItmrtError
    from itmrt.runtime.gallery import load_features
    from itmrt.runtime.image_files import is_image_listing, list_image_files

    if not is_image_listing(images):
        return load_features(images)
    try:
        runtime.image_preprocessing  # noqa: B018 - refuses a bundle that takes region features
    except ItmrtError as exc:
        raise ItmrtError(f"--images {images} is not a .npy features file, and {exc}") from None
    return list_image_files(images)
