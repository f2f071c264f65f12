"""One command for a GPU machine: doctor, engines, parity, latency and Flickr30K-sized scoring, one report.

    python benchmarks/gpu_acceptance.py --out gpu_report            # under 10 minutes on one data-centre GPU
    python benchmarks/gpu_acceptance.py --out gpu_report --quick    # small data, NAAF only, graph scorer (CI, on a CPU)

Steps, each recorded as ``ok``, ``skipped`` (with the reason: no TensorRT, no
onnxruntime-gpu, no CUDA) or ``failed`` (with the error) - a step that cannot
run never stops the others:

1. ``doctor``: what the machine has (``itmrt doctor``).
2. For the shipped NAAF (and CMPM unless ``--quick``): synthetic data, export,
   then fp32/fp16/int8 precision graphs (``itmrt build``) and, as GPU-bound
   steps, the TensorRT engines (device memory, layer summary).
3. Parity (``itmrt parity``) of every ORT and TensorRT variant against PyTorch
   and against ONNX Runtime fp32 on the CPU; CMPM: identity recall and score
   error against ONNX Runtime fp32 on the CPU.
4. Latency (``itmrt bench``) of every variant; TensorRT stages carry their GPU
   time from CUDA events. ONNX Runtime uses its CUDA provider where this
   onnxruntime has it (a GPU-bound step says whether it did).
5. What TF32 does to the shipped NAAF's scores, emulated on the CPU.
6. The PyTorch reference scorers, released loop and batched, on CUDA with CUDA
   events at Flickr30K test size (1,000 x 5,000 at released sizes), with TF32
   on and off, and the batched scorer's peak memory against its tile budget;
   on a machine without CUDA, the same code on the CPU at a small size (and the
   CUDA step skipped). Needs PyTorch only (CUDA build for the CUDA step).

The report folder holds ``report.json``, ``report.md`` and the parity and bench
sub-reports. Exit status 0 unless a step failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

STATUSES = ("ok", "skipped", "failed")
PRECISIONS = ("fp32", "fp16", "int8")
QUICK_NAAF_DATA = {"test": 40, "dev": 32}
QUICK_REFERENCE = (8, 16)  # images x captions of the CPU run of the PyTorch reference


class Skip(Exception):
    """A step that cannot run on this machine; the message says why."""


@dataclass
class Step:
    name: str
    status: str
    seconds: float
    gpu_bound: bool
    reason: str | None = None
    result: Any = None
    headline: str = ""  # the result in one line, for report.md


@dataclass
class Run:
    """The steps so far; :meth:`step` runs one and records what became of it."""

    log: Callable[[str], None]
    work: Path  # data and bundles
    steps: list[Step] = field(default_factory=list)

    def step(
        self,
        name: str,
        action: Callable[[], Any],
        gpu_bound: bool = False,
        headline: Callable[[Any], str] | None = None,
    ) -> Any:
        started = time.perf_counter()
        status, reason, result, line = "ok", None, None, ""
        try:
            result = action()
            line = headline(result) if headline else _headline(result)
        except Skip as exc:
            status, reason = "skipped", str(exc)
        except Exception as exc:  # noqa: BLE001 - a failed step is recorded and the run goes on
            from itmrt.errors import first_line

            status, reason = "failed", f"{type(exc).__name__}: {first_line(exc)}"
            self.log(traceback.format_exc())
        seconds = time.perf_counter() - started
        self.steps.append(Step(name, status, seconds, gpu_bound, reason, result, line))
        self.log(f"{name}: {status}{f' ({reason})' if reason else ''} [{seconds:.1f}s]")
        return result if status == "ok" else None


# -- the machine ------------------------------------------------------------------------------------------


def doctor() -> dict[str, Any]:
    from itmrt.reports.doctor import diagnose

    return diagnose().as_dict()


def cuda_torch() -> Any:
    """torch, if it sees a CUDA GPU; else :class:`Skip`."""
    try:
        import torch
    except ImportError:
        raise Skip("torch is not installed") from None
    if not torch.cuda.is_available():
        raise Skip("torch sees no CUDA GPU (torch.cuda.is_available() is False)")
    return torch


# -- bundles -------------------------------------------------------------------------------------------------


def naaf_data(work: Path, quick: bool) -> Path:
    from itmrt.synthetic.region_features import make_synthetic_dataset
    from itmrt.train.recipes import SMALL_REGION_DATA, make_region_data

    if not quick:
        return make_region_data(work / "naaf-data")
    seed, img_dim = SMALL_REGION_DATA["seed"], SMALL_REGION_DATA["img_dim"]
    return make_synthetic_dataset(work / "naaf-data", dict(QUICK_NAAF_DATA), seed=seed, img_dim=img_dim)


def export_shipped(name: str, vocab: Path, bundle: Path) -> dict[str, Any]:
    from itmrt.demo import shipped_model
    from itmrt.export.bundle import ExportOptions, export_bundle

    checkpoint = shipped_model(name)
    if checkpoint is None:
        raise Skip(f"this install has no shipped model {name} (itmrt/assets)")
    export_bundle(checkpoint, vocab, bundle, ExportOptions())
    manifest = json.loads((bundle / "manifest.json").read_text())
    return {"bundle": str(bundle), "family": manifest["family"], "export_parity": manifest.get("parity")}


def build_precision(bundle: Path, precision: str, data: Path, split: str, quick: bool) -> dict[str, Any]:
    """Precision graphs (anywhere) and TensorRT engines (where TensorRT and a GPU are)."""
    from itmrt.build.orchestration import build_bundle
    from itmrt.engine.build import EngineOptions
    from itmrt.precision.precision_graphs import PrecisionOptions

    options = PrecisionOptions(calib_data=data, split=split, samples=32 if quick else 256, progress=False)
    outcome = build_bundle(bundle, precision, options, EngineOptions(), log=lambda _message: None)
    graphs = (outcome.manifest.get("precisions", {}).get(precision) or {}).get("graphs", {})
    summary = {
        graph: {
            "islands": [f"{i['node']} [{i['reason']}]" for i in entry.get("islands", [])],
            "max_abs_error": entry.get("max_abs_error"),
            "qdq_pairs": entry.get("qdq_pairs"),
        }
        for graph, entry in graphs.items()
    }
    engines = outcome.manifest.get("engines", {}).get(precision, {}) if outcome.engines_built else {}
    return {
        "graphs": summary,
        "engines_built": outcome.engines_built,
        "no_engine_reason": outcome.no_engine_reason,
        "engines": {graph: _engine_summary(entry) for graph, entry in engines.items()},
    }


def _engine_summary(entry: dict[str, Any]) -> dict[str, Any]:
    layers = (entry.get("layer_info") or {}).get("summary") or {}
    return {
        key: entry.get(key)
        for key in (
            "file",
            "tensorrt_version",
            "gpu_name",
            "device_memory_bytes",
            "largest_intermediate_bytes",
            "workspace_mb",
            "os",
            "arch",
            "unified_memory",
            "dla_core",
            "layer_devices",
        )
    } | {
        "unfused_qdq": len(layers.get("unfused_qdq", [])),
        "int8_layers": layers.get("int8_layers"),
        "matmuls_int8": [m["int8"] for m in layers.get("matmuls", [])],
    }


def engines_step(built: dict[str, Any] | None) -> dict[str, Any]:
    if built is None:
        raise Skip("the precision graphs were not built")
    if not built["engines_built"]:
        raise Skip(str(built["no_engine_reason"]))
    return built["engines"]


# -- parity and latency -------------------------------------------------------------------------------------


def variants(backend_names: tuple[str, ...] = ("ort", "trt")) -> list[Any]:
    from itmrt.reports.runtime_variants import Variant

    return [Variant(backend, precision) for backend in backend_names for precision in PRECISIONS]


def naaf_parity(bundle: Path, data: Path, out: Path, against: str, quick: bool) -> dict[str, Any]:
    from itmrt.reports.parity_report import ParityOptions, run_parity, write_parity

    reference_providers = ["cpu"] if against.startswith("ort") else None
    options = ParityOptions(
        split="test",
        against=against,
        variants=variants(),
        reference_providers=reference_providers,
        decision_images=20 if quick else 100,
        scorer="graph" if quick else None,
    )
    run = run_parity(bundle, data, options, command=[sys.executable, *sys.argv])
    write_parity(run, out, plots=False)
    entries = {}
    for entry in run.report["variants"]:
        figures = {"status": entry["status"], "reason": entry.get("reason")}
        if entry["status"] == "ok":
            figures.update(
                passed=entry["passed"],
                rsum_delta=entry["recall_delta"]["rsum"],
                score_max_abs=entry["tensors"]["end_to_end"]["max_abs"],
            )
        entries[entry["name"]] = figures
    return {"against": run.report["reference"], "variants": entries, "report": out.name}


def cmpm_parity(bundle: Path, data: Path) -> dict[str, Any]:
    """Identity recall and score error of each CMPM variant against ONNX Runtime fp32 on the CPU."""
    from itmrt.data.images import ImageCaptionSplit, preprocess_images
    from itmrt.metrics.recall import identity_recall_table
    from itmrt.reports.runtime_variants import open_variant

    split = ImageCaptionSplit.open(data, "test")
    pixels = preprocess_images(np.asarray(split.images))
    reference, reason = open_variant(bundle, variants(("ort",))[0], providers=["cpu"])
    if reference is None:
        raise RuntimeError(f"cannot open ort:fp32 on the CPU: {reason}")
    expected = reference.score(reference.encode_images(pixels), reference.encode_captions(split.captions))
    result: dict[str, Any] = {"reference": "ort:fp32 (CPU)", "variants": {}}
    for variant in variants():
        runtime, reason = open_variant(bundle, variant)
        if runtime is None:
            result["variants"][variant.name] = {"status": "not_run", "reason": reason}
            continue
        scores = runtime.score(runtime.encode_images(pixels), runtime.encode_captions(split.captions))
        table = identity_recall_table(scores, split.image_labels, split.caption_labels)
        result["variants"][variant.name] = {
            "status": "ok",
            "rsum": table["rsum"],
            "score_max_abs": float(np.abs(scores - expected).max()),
        }
    return result


def bench(bundle: Path, out: Path, quick: bool) -> dict[str, Any]:
    from itmrt.reports.bench import BenchOptions, run_bench, write_bench

    options = BenchOptions(
        variants=variants(),
        batch_sizes=(1, 8) if quick else (1, 8, 32, 128),
        warmup=1 if quick else 3,
        repeats=3 if quick else 20,
        images=16 if quick else 64,
        scorer="graph" if quick else None,
    )
    report = run_bench(bundle, options, command=[sys.executable, *sys.argv])
    write_bench(report, out, plots=False)
    entries = {}
    for entry in report["variants"]:
        figures: dict[str, Any] = {"status": entry["status"], "reason": entry.get("reason")}
        for result in entry.get("results", []):
            if result["stage"] == "end_to_end":
                figures[f"end_to_end_p50_ms_batch_{result['batch_size']}"] = result["latency_ms"]["p50"]
            if "gpu_ms_mean" in result and result["stage"] == "score":
                figures[f"score_gpu_ms_batch_{result['batch_size']}"] = result["gpu_ms_mean"]
        entries[entry["name"]] = figures
    return {"variants": entries, "report": out.name}


def ort_cuda(bundle: Path) -> dict[str, Any]:
    """Whether the ONNX Runtime variants ran on its CUDA provider."""
    import onnxruntime

    from itmrt.runtime import load

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        raise Skip(
            f"this onnxruntime ({onnxruntime.__version__}) has no CUDAExecutionProvider (pip install onnxruntime-gpu)"
        )
    runtime = load(bundle)
    return {name: list(getattr(backend, "providers", [])) for name, backend in runtime.backends.items()}


def tf32_emulated(bundle: Path, data: Path, quick: bool) -> dict[str, Any]:
    """The shipped NAAF's test-split scores with every float32 product's inputs rounded to TF32, against fp32."""
    import onnx

    from itmrt.data.precomp import PrecompSplit
    from itmrt.precision.tf32 import tf32_emulation_graph, tf32_session
    from itmrt.runtime import load

    split = PrecompSplit.open(data, "test")
    count = min(split.num_images, 40 if quick else split.num_images)
    features = np.ascontiguousarray(split.images[:count], dtype=np.float32)
    captions = list(split.captions[: count * split.captions_per_image])
    runtime = load(bundle, scorer="graph", providers=["cpu"])
    exact = runtime.score(runtime.encode_images(features), runtime.encode_captions(captions))
    products = {}
    for name, backend in runtime.backends.items():
        model = onnx.load(str(runtime.bundle.graph_file(name)))
        products[name] = tf32_emulation_graph(model)[1]
        backend.session = tf32_session(model)  # type: ignore[attr-defined]
    rounded = runtime.score(runtime.encode_images(features), runtime.encode_captions(captions))
    diff = np.abs(rounded.astype(np.float64) - exact.astype(np.float64))
    return {
        "pairs": int(diff.size),
        "max_abs": float(diff.max()),
        "pairs_over_1e-4": int(np.count_nonzero(diff > 1e-4)),
        "emulated_products": products,
        "not_emulated": "the GRU's internal products (one ONNX GRU node)",
    }


def torch_reference(device: str) -> dict[str, Any]:
    """The PyTorch reference scorers: Flickr30K size on CUDA, or a reduced size on the CPU."""
    from gpu_reference import FLICKR_TEST, time_reference

    if device == "cuda":
        return time_reference(cuda_torch(), "cuda", *FLICKR_TEST, budget_bytes=512 << 20)
    import torch

    return time_reference(torch, "cpu", *QUICK_REFERENCE, budget_bytes=16 << 20)


# -- the run -------------------------------------------------------------------------------------------------


def prepare(
    run: Run, family: str, make_data: Callable[[], Path], shipped: str, split: str, quick: bool
) -> tuple[Path, Path] | None:
    """Data, export, and the precision graphs (and engines) of one shipped model; its bundle and data."""
    data = run.step(f"{family}: synthetic data", make_data, headline=str)
    if data is None:
        return None
    bundle = run.work / family
    if run.step(f"{family}: export", lambda: export_shipped(shipped, data / "vocab.json", bundle)) is None:
        return None
    for precision in PRECISIONS:
        built = run.step(
            f"{family}: {precision} graphs", lambda p=precision: build_precision(bundle, p, data, split, quick)
        )
        run.step(f"{family}: {precision} TensorRT engines", lambda b=built: engines_step(b), gpu_bound=True)
    return bundle, data


def tensorrt_steps(run: Run, family: str, label: str, result: dict[str, Any] | None) -> None:
    """One GPU-bound step per TensorRT variant of a parity or latency result: ran, or why not."""
    for name, entry in ((result or {}).get("variants") or {}).items():
        if name.startswith("trt:"):
            run.step(f"{family}: {label} {name}", lambda e=entry: _variant_ran(e), gpu_bound=True)


def _variant_ran(entry: dict[str, Any]) -> dict[str, Any]:
    if entry["status"] != "ok":
        raise Skip(str(entry.get("reason")))
    return entry


def _skip(reason: str) -> None:
    raise Skip(reason)


def run_naaf(run: Run, out: Path, quick: bool) -> None:
    prepared = prepare(run, "naaf", lambda: naaf_data(run.work, quick), "naaf_small.pth.tar", "dev", quick)
    if prepared is None:
        return
    bundle, data = prepared
    torch_parity = run.step(
        "naaf: parity against PyTorch", lambda: naaf_parity(bundle, data, out / "naaf_parity_torch", "torch", quick)
    )
    run.step(
        "naaf: parity against ONNX Runtime fp32 (CPU)",
        lambda: naaf_parity(bundle, data, out / "naaf_parity_ort_cpu", "ort:fp32", quick),
    )
    latency = run.step("naaf: latency", lambda: bench(bundle, out / "naaf_bench", quick))
    tensorrt_steps(run, "naaf", "parity", torch_parity)
    tensorrt_steps(run, "naaf", "latency", latency)
    run.step("naaf: ONNX Runtime on CUDA", lambda: ort_cuda(bundle), gpu_bound=True)
    run.step(
        "naaf: TF32 emulated (CPU)",
        lambda: tf32_emulated(bundle, data, quick),
        headline=lambda r: (
            f"{r['pairs_over_1e-4']} of {r['pairs']} pairs move by more than 1e-4, at most {r['max_abs']:.1e}"
        ),
    )


def run_cmpm(run: Run, out: Path, quick: bool) -> None:
    if quick:
        run.step("cmpm: bundle", lambda: _skip("--quick runs NAAF only"))
        return
    from itmrt.train.recipes import make_image_data

    prepared = prepare(
        run, "cmpm", lambda: make_image_data(run.work / "cmpm-data"), "cmpm_small.safetensors", "train", quick
    )
    if prepared is None:
        return
    bundle, data = prepared
    parity = run.step("cmpm: parity against ONNX Runtime fp32 (CPU)", lambda: cmpm_parity(bundle, data))
    latency = run.step("cmpm: latency", lambda: bench(bundle, out / "cmpm_bench", quick))
    tensorrt_steps(run, "cmpm", "parity", parity)
    tensorrt_steps(run, "cmpm", "latency", latency)


def run_all(out: Path, work: Path, quick: bool, log: Callable[[str], None]) -> Run:
    run = Run(log, work)
    run.step("doctor", doctor, headline=_doctor_line)
    run_naaf(run, out, quick)
    run_cmpm(run, out, quick)
    on_cuda = run.step(
        "PyTorch reference on CUDA, Flickr30K size (1000 x 5000)", lambda: torch_reference("cuda"), gpu_bound=True
    )
    if on_cuda is None:
        size = " x ".join(str(n) for n in QUICK_REFERENCE)
        run.step(f"PyTorch reference on the CPU ({size}, reduced)", lambda: torch_reference("cpu"))
    return run


# -- the report ----------------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def report_document(run: Run, quick: bool, seconds: float) -> dict[str, Any]:
    from datetime import datetime, timezone

    from itmrt.reports.environment import environment

    return {
        "kind": "itmrt-gpu-acceptance",
        "schema_version": 1,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "quick": quick,
        "seconds": seconds,
        "environment": environment(),
        "summary": {status: sum(1 for s in run.steps if s.status == status) for status in STATUSES},
        "steps": [asdict(step) for step in run.steps],
    }


def _doctor_line(report: dict[str, Any]) -> str:
    gpus = ", ".join(g["name"] for g in report["gpus"]) or "no GPU"
    return (
        f"{gpus}; TensorRT {report['tensorrt'] or 'not installed'}; pycuda {report['pycuda'] or 'not installed'}; "
        f"onnxruntime providers {', '.join(report['ort_providers'])}"
    )


def _variants_line(variants: dict[str, Any]) -> str:
    parts = []
    for name, entry in variants.items():
        if entry.get("status") != "ok":
            parts.append(f"{name} not run")
        elif "score_max_abs" in entry:
            verdict = {True: "pass ", False: "FAIL "}.get(entry.get("passed"), "")
            parts.append(f"{name} {verdict}(max err {entry['score_max_abs']:.1e})")
        else:
            parts.append(f"{name} ok")
    return "; ".join(parts)


def _headline(result: Any) -> str:
    """A one-line account of a step's result for report.md."""
    if isinstance(result, dict) and isinstance(result.get("variants"), dict):
        return _variants_line(result["variants"])
    if isinstance(result, dict) and "loop" in result and "batched" in result:
        text = (
            f"{result['device']} ({result['timing']}): loop {result['loop']['pairs_per_s']:,.0f} pairs/s, batched "
            f"{result['batched']['pairs_per_s']:,.0f} pairs/s ({result['batched']['speed_up_over_loop']:.1f}x)"
        )
        memory = result.get("memory")
        if memory:
            text += (
                f"; batched peak {memory['peak_bytes'] / 2**20:.1f} MiB for a {memory['budget_bytes'] / 2**20:.0f} MiB "
                f"budget ({memory['peak_over_budget']:.2f}x)"
            )
        if "batched_tf32" in result:
            tf32 = result["batched_tf32"]
            text += f"; TF32: {tf32['pairs_per_s']:,.0f} pairs/s, scores change by up to {tf32['max_abs']:.1e}"
        return text
    if isinstance(result, dict) and "graphs" in result:
        islands = sum(len(g["islands"]) for g in result["graphs"].values())
        errors = [g["max_abs_error"] for g in result["graphs"].values() if g.get("max_abs_error") is not None]
        worst = f", largest graph error {max(errors):.1e}" if errors else ""
        return (
            f"{len(result['graphs'])} graph(s), {islands} FP32 island(s){worst}"
            if result["graphs"]
            else "the export's graphs"
        )
    if isinstance(result, dict) and "export_parity" in result:
        errors = (result["export_parity"] or {}).get("max_abs_error") or {}
        worst = max(errors.values(), default=float("nan"))
        return (
            f"{result['family']} bundle; ONNX Runtime (CPU) vs PyTorch at export: "
            f"max abs error {worst:.1e} over {len(errors)} checks"
        )
    return json.dumps(result, default=_jsonable)[:160]


def report_markdown(doc: dict[str, Any]) -> str:
    gpus = ", ".join(g.get("name", "?") for g in doc["environment"].get("gpus") or []) or "none"
    versions = doc["environment"].get("versions") or {}
    lines = [
        "# itmrt GPU acceptance run",
        "",
        f"- created {doc['created']}, {doc['seconds']:.0f} s{' (--quick)' if doc['quick'] else ''}: `{doc['command']}`",
        (
            f"- GPUs: {gpus}; TensorRT: {versions.get('tensorrt') or 'not installed'}; "
            f"onnxruntime providers: {', '.join(doc['environment'].get('onnxruntime_providers') or [])}"
        ),
        f"- steps: {', '.join(f'{n} {k}' for k, n in doc['summary'].items())}",
        "",
        "| step | status | seconds | result (or why not) |",
        "|---|---|---|---|",
    ]
    for step in doc["steps"]:
        headline = (
            (step["headline"] if step["status"] == "ok" else str(step["reason"])).replace("|", "/").replace("\n", " ")
        )
        lines.append(
            f"| {step['name']}{' (GPU)' if step['gpu_bound'] else ''} | {step['status']} "
            f"| {step['seconds']:.1f} | {headline} |"
        )
    return "\n".join(lines) + "\n"


def _is_acceptance_report(folder: Path) -> bool:
    try:
        return json.loads((folder / "report.json").read_text())["kind"] == "itmrt-gpu-acceptance"
    except (OSError, ValueError, KeyError, TypeError):
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="report folder (report.json, report.md, sub-reports)")
    parser.add_argument("--quick", action="store_true", help="small data and sizes, NAAF only")
    parser.add_argument(
        "--work", type=Path, default=None, help="keep data and bundles here (default: a temporary folder)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a report already in --out")
    args = parser.parse_args(argv)

    from itmrt.errors import ItmrtError
    from itmrt.publish import check_output_folder, publish_folder, staged_folder

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        check_output_folder(args.out, args.overwrite, "GPU acceptance report", _is_acceptance_report)
    except ItmrtError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="itmrt-gpu-acceptance-") as scratch, staged_folder(args.out) as staging:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        run = run_all(staging, work, args.quick, log)
        doc = report_document(run, args.quick, time.perf_counter() - started)
        (staging / "report.json").write_text(json.dumps(doc, indent=2, default=_jsonable) + "\n")
        (staging / "report.md").write_text(report_markdown(doc))
        publish_folder(staging, args.out, "replace" if args.overwrite else "refuse")
    log(f"report written to {args.out}/report.json and report.md: {doc['summary']}")
    return 1 if doc["summary"]["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
