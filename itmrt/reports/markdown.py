"""``report.md``: the tables of a report, for a pull request or a README."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from itmrt.reports.bench import STAGES


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _num(value: Any, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def environment_lines(env: dict[str, Any]) -> list[str]:
    cpu = env["cpu"]
    features = ", ".join(name for name, present in cpu["features"].items() if present) or "none of those probed"
    gpus = "; ".join(f"{g['name']} (driver {g['driver']})" for g in env["gpus"]) or "none"
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    return [
        f"- CPU: {cpu['model']} ({cpu['usable_cpus']} usable of {cpu['logical_cpus']} logical CPUs); features: "
        f"{features}",
        f"- GPU: {gpus}",
        f"- OS: {env['os']}; threads: ONNX Runtime intra-op {env['threads']['onnxruntime_intra_op'] or 'automatic'}",
        f"- versions: {versions}",
    ]


def not_run_lines(variants: Sequence[dict[str, Any]]) -> list[str]:
    return [f"- {v['name']}: {v['status'].replace('_', ' ')}: {v['reason']}" for v in variants if v["status"] != "ok"]


def parity_markdown(report: dict[str, Any]) -> str:
    ref, data = report["reference"], report["data"]
    measured = [v for v in report["variants"] if v["status"] == "ok"]
    verdict = "PASS" if report["passed"] else "FAIL"
    out = [
        f"# Parity report: {report['bundle']['family']} bundle `{report['bundle']['path']}` - {verdict}",
        "",
        f"Reference: {ref['against']}; data: `{data['path']}` split {data['split']}, {data['images']} images, "
        f"{data['captions']} captions ({data['truncated_captions']} truncated to the bundle's token limit).",
        f"Command: `{report['command']}`",
        "",
        "## Retrieval",
        "",
    ]
    k = report["settings"]["top_k"]
    overlap = f"top{k}_overlap"
    rows = [["reference", "-"]
            + [_num(ref["recall"][k], ".1f")
               for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")]
            + ["-"] * 4]
    for v in measured:
        r, d = v["recall"], v["recall_delta"]
        rows.append([v["name"], "pass" if v["passed"] else "FAIL"]
                    + [_num(r[k], ".1f")
                       for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")]
                    + [f"{d['rsum']:+.2f}",
                       f"{v['retrieval']['i2t']['top1_agreement']:.3f} / {v['retrieval']['t2i']['top1_agreement']:.3f}",
                       f"{v['retrieval']['i2t'][overlap]:.3f} / {v['retrieval']['t2i'][overlap]:.3f}",
                       f"{v['retrieval']['i2t']['spearman_mean']:.4f} / {v['retrieval']['t2i']['spearman_mean']:.4f}"])
    out.append(table(["variant", "verdict", "i2t R@1", "R@5", "R@10", "t2i R@1", "R@5", "R@10", "rsum", "rsum delta",
                      "strict top-1 agree (i2t/t2i)", f"top-{k} overlap", "Spearman"], rows))
    out += [""] + [
        f"- {v['name']} ran " + ", ".join(f"{k}: `{f}`" for k, f in v["graph_files"].items()) for v in measured
    ]
    out += ["", "## Tensors (each graph fed the reference's inputs; end to end: the variant's own pipeline)", ""]
    rows = []
    for v in measured:
        for graph, e in v["tensors"].items():
            rows.append([v["name"], graph, _num(e["max_abs"]), _num(e["mean_abs"]), _num(e["max_rel"]),
                         f"{e['cosine']:.7f}", str(tuple(e["worst_index"])), e["nonfinite"]])
    out.append(table(["variant", "graph", "max abs", "mean abs", "max rel", "cosine", "worst at", "non-finite"], rows))
    tied = [v for v in measured if v.get("threshold_ties")]
    if tied:
        band = tied[0]["threshold_ties"]["band"]
        out += ["", f"Pairs at NAAF's threshold (a reference similarity within {band:g} of it: either side of the mask "
                "is a correct float32 result, so these are judged by the decision flip rates, not the score "
                "tolerance):",
                ""]
        out.append(table(["variant", "pairs at the threshold (among the largest errors)", "max abs error, other pairs"],
                         [[v["name"],
                           f"{v['threshold_ties']['tie_pairs']} of {v['threshold_ties']['pairs_examined']} examined",
                           _num(v["threshold_ties"]["max_abs_off_threshold"])] for v in tied]))
    flips = [v for v in measured if v.get("decisions")]
    if flips:
        d0 = flips[0]["decisions"]
        out += ["", "## NAAF branch decisions that flip against the reference "
                f"({d0['captions']} captions x {d0['images']} images, threshold {d0['threshold']:.4f})", ""]
        out.append(table(["variant", "region decisions (s - t > 0)", "flipped", "word decisions (q < 0)", "flipped"],
                         [[v["name"], v["decisions"]["region_decisions"], f"{v['decisions']['region_flip_rate']:.2e}",
                           v["decisions"]["word_decisions"],
                           f"{v['decisions']['word_flip_rate']:.2e}"] for v in flips]))
    overridden = f", overridden: {report['tolerance_overrides']}" if report["tolerance_overrides"] else ""
    out += ["", "## Checks (tolerances: defaults per precision" + overridden + ")", ""]
    rows = [[v["name"], c["name"], f"{c['op']} {c['limit']:g}", _num(c["value"], ".4g"),
             "pass" if c["passed"] else "FAIL"]
            for v in measured for c in v["checks"]]
    out.append(table(["variant", "check", "limit", "measured", "result"], rows))
    skipped = not_run_lines(report["variants"])
    if skipped:
        out += ["", "## Not run", ""] + skipped
    out += ["", "## Environment", ""] + environment_lines(report["environment"])
    return "\n".join(out) + "\n"


def bench_markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    out = [
        f"# Latency report: {report['bundle']['family']} bundle `{report['bundle']['path']}`",
        "",
        f"Synthetic inputs; gallery of {s['images']} images; {s['warmup']} warm-up and {s['repeats']} timed calls per "
        f"row; top-{s['top_k']}. Latency per call in ms; throughput from the mean.",
        f"Command: `{report['command']}`",
        "",
    ]
    for v in report["variants"]:
        if v["status"] != "ok":
            continue
        out += [f"## {v['name']} (peak RSS {v['rss_peak_bytes'] / 2**20:.0f} MiB)", ""]
        rows = []
        for r in sorted(v["results"], key=lambda r: (STAGES.index(r["stage"]), r["batch_size"])):
            lat, tp = r["latency_ms"], r["throughput"]
            items = f"{tp['images_per_s']:.0f} img/s" if "images_per_s" in tp else f"{tp['captions_per_s']:.0f} cap/s"
            rows.append([r["stage"], r["batch_size"]]
                        + [f"{lat[k]:.3f}" for k in ("min", "mean", "p50", "p90", "p99", "max")]
                        + [items, f"{tp['pairs_per_s']:.3g}" if "pairs_per_s" in tp else "-",
                           f"{r['traced_peak_bytes'] / 2**20:.1f}"])
        out.append(table(["stage", "batch", "min", "mean", "p50", "p90", "p99", "max", "throughput", "pairs/s",
                          "numpy peak MiB"], rows))
        out.append("")
    skipped = not_run_lines(report["variants"])
    if skipped:
        out += ["## Not run", ""] + skipped + [""]
    out += ["## Environment", ""] + environment_lines(report["environment"])
    return "\n".join(out) + "\n"
