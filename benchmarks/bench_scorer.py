"""NAAF scoring throughput at the released sizes: the released one-caption-at-a-time loop vs the runtime.

Sizes: d = 1024, 36 regions per image, captions of 8 to 20 tokens, FP32 on the CPU.

(a) ``loop``: the released test-time scorer (``xattn_score_test``) step for
    step, written in PyTorch like the authors' code: for each caption, score it
    against all images at once; the attended region features (vhat, m x d per
    pair) are materialised.
(b) ``graph``: the runtime's tiled scorer (``itmrt.runtime.tiled.score_tiled``)
    over the exported NAAF scorer graph in ONNX Runtime, at several tile
    memory budgets.
(c) ``fused``: the runtime's fused CPU scorer (``itmrt.runtime.fused``, needs
    numba): one ONNX Runtime GEMM per tile and one numba pass over the
    similarity tile, at several tile budgets.
(d) ``GEMM alone``: only the fused scorer's similarity GEMMs, same tiles - the
    ceiling for any scorer that computes every similarity in float32.
(e) ``graph scorer INT8``: the scorer graph with its products in symmetric INT8
    Q/DQ (min-max calibrated on a few tiles), at the first ``--budgets`` size.

All are measured in one run on the same random (l2-normalised) embeddings with
the same thread count (``--threads`` sets torch, ONNX Runtime and numba), in
``--repeats`` interleaved rounds (each row keeps its best round); the table
gives pairs per second, the ratio to the loop, and the fraction of this CPU's
measured float32 matrix-multiply rate (the better of a tile-sized probe and the
fused tiles' own GEMMs) that the scorer's own FLOPs represent. Agreement of
every score matrix with the loop's is checked too.

    python benchmarks/bench_scorer.py --threads 2     # about 2 minutes on 2 cores
    python benchmarks/bench_scorer.py --threads 1 --images 400 --captions 200 --fused-budgets 8,16,32
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

D, REGIONS, MIN_LEN, MAX_LEN = 1024, 36, 8, 20
THRESHOLD, LAMBDA, INTRA = 0.0, 20.0, 5.0


def l2norm(x: np.ndarray) -> np.ndarray:
    return x / (np.sqrt((x * x).sum(-1, keepdims=True)) + 1e-8)


def make_data(n_images: int, n_captions: int, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    images = l2norm(np.abs(rng.standard_normal((n_images, REGIONS, D))).astype(np.float32)
                    + 0.1 * rng.standard_normal((n_images, REGIONS, D)).astype(np.float32))
    lengths = rng.integers(MIN_LEN, MAX_LEN + 1, size=n_captions)
    captions = [l2norm(rng.standard_normal((int(m), D)).astype(np.float32) + 0.5) for m in lengths]
    return images.astype(np.float32), captions


def released_loop_scores(images: np.ndarray, captions: list[np.ndarray], threshold: float = THRESHOLD,
                         lam: float = LAMBDA, intra_factor: float = INTRA, device: str = "cpu") -> np.ndarray:
    """The released test-time scorer's structure, step for step, in PyTorch (docs/models.md section 2).

    Per caption: the caption copied once per image (``repeat``), the similarity
    ``bmm``, a contiguous transposed copy of it for the relevance branch, the
    threshold subtracted through a tensor of ones, the intra-caption softmax
    computed once and repeated per image, the negative mask in float64 (the
    released code's ``.double()``), and the attended region features vhat
    materialised by a second ``bmm`` before the cosine. ``device``: where torch runs it
    (``benchmarks/gpu_acceptance.py`` times it on CUDA).
    """
    import torch

    imgs = torch.from_numpy(images).to(device)  # [Ni, n, d]
    n_img, n_reg = int(imgs.shape[0]), int(imgs.shape[1])
    columns = []
    with torch.no_grad():
        for cap in captions:
            m = int(cap.shape[0])
            one = torch.from_numpy(cap).to(device).unsqueeze(0)  # [1, m, d]
            words = one.repeat(n_img, 1, 1)  # [Ni, m, d]
            sims = torch.bmm(words, imgs.transpose(1, 2))  # [Ni, m, n]
            sims_by_region = sims.transpose(1, 2).contiguous()  # [Ni, n, m]
            rows = (sims - torch.ones_like(sims) * threshold).view(n_img * m, n_reg)
            row_max = rows.max(dim=1).values.unsqueeze(-1)  # [Ni * m, 1]
            # negative branch, mask from the intra-caption propagated row maxima
            intra = torch.softmax(torch.bmm(one, one.transpose(1, 2)).view(m, m) * intra_factor, dim=1)
            propagated = torch.bmm(intra.view(1, m, m).repeat(n_img, 1, 1), row_max.view(n_img, m, 1))
            negative = (row_max * propagated.view(n_img * m, 1).lt(0).double()).view(n_img, m)
            # positive branch on aggregated features: masked exp, L1-normalised, vhat materialised, cosine
            weights = torch.exp(rows.masked_fill(rows.le(0), -1e9) * lam)
            weights = weights / (weights.abs().sum(dim=1, keepdim=True) + 1e-8)
            vhat = torch.bmm(weights.view(n_img, m, n_reg), imgs)  # [Ni, m, d]
            aggregated = (words * vhat).sum(dim=2) / vhat.norm(2, dim=2).clamp(min=1e-8)
            # positive branch on relevance: LeakyReLU, l2-normalised over the words, softmax over regions
            clipped = torch.nn.functional.leaky_relu(sims_by_region, 0.1)
            clipped = clipped / (clipped.pow(2).sum(dim=2, keepdim=True).sqrt() + 1e-8)
            relevance_weights = torch.softmax(clipped.transpose(1, 2).contiguous().view(n_img * m, n_reg) * lam, dim=1)
            relevance = sims.mul(relevance_weights.view(n_img, m, n_reg)).sum(-1)
            columns.append((negative + aggregated + relevance).mean(dim=1, keepdim=True))
    return torch.cat(columns, 1).float().cpu().numpy()


def matmul_rate(threads: int = 0) -> Any:
    """A function measuring this CPU's float32 GEMM rate (same thread count) for one large GEMM of the
    scorer's kind - a tile's caption tokens x its images' regions, inner dimension d - as the better of
    torch's and ONNX Runtime's (MLAS), over about a second."""
    import torch

    from itmrt.runtime.fused import _gemm_session

    a = torch.randn(50 * 14, D)  # the shape of the fused scorer's 8 MB tiles
    b = torch.randn(50 * REGIONS, D)
    session = _gemm_session(threads)
    feeds = {"a": a.numpy(), "b": b.numpy()}

    def measure(seconds: float = 0.5) -> float:
        rates = []
        for run in (lambda: a @ b.T, lambda: session.run(None, feeds)):
            run()
            count, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds:
                run()
                count += 1
            rates.append(count * 2.0 * a.shape[0] * a.shape[1] * b.shape[0] / (time.perf_counter() - started))
        return max(rates)

    return measure


def scorer_flops_per_pair(lengths: np.ndarray) -> float:
    """FLOPs a pair needs: the similarity GEMM (2 m n d) plus w^T G w (2 m n^2); per-image Gram amortised away."""
    m = float(lengths.mean())
    return 2 * m * REGIONS * D + 2 * m * REGIONS * REGIONS


def gemm_only(fused: Any, images: np.ndarray, encoded: Any, bi: int, bc: int) -> None:
    """The fused scorer's similarity GEMMs over the same tiles, and nothing else."""
    offsets = encoded.offsets
    for c0 in range(0, len(encoded), bc):
        tokens = encoded.vectors[offsets[c0] : offsets[min(c0 + bc, len(encoded))]]
        for i0 in range(0, len(images), bi):
            block = images[i0 : i0 + bi]
            fused.similarities(block.reshape(-1, block.shape[-1]), tokens)


def int8_scorer(fp32_path: Path, images: np.ndarray, captions: list[np.ndarray]) -> Any:
    """The scorer graph with its products in symmetric INT8 Q/DQ (as ``itmrt calibrate`` makes it),
    calibrated with min-max ranges on a few tiles of the benchmark's own embeddings."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader

    from itmrt.precision.int8 import excluded_nodes, quantize_graph

    class Tiles(CalibrationDataReader):
        def __init__(self) -> None:
            feeds = []
            for start in range(0, 32, 8):
                block = captions[start : start + 8]
                width = max(len(c) for c in block)
                padded = np.zeros((len(block), width, D), dtype=np.float32)
                for k, cap in enumerate(block):
                    padded[k, : len(cap)] = cap
                feeds.append({"image_embeddings": images[start : start + 8], "caption_embeddings": padded,
                              "lengths": np.array([len(c) for c in block], dtype=np.int32)})
            self.feeds = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    model = onnx.load(str(fp32_path))
    exclude = [entry.node for entry in excluded_nodes(model)]
    ranges = fp32_path.with_suffix(".ranges.json")
    quantized, _ranges, _added = quantize_graph(model, "minmax", ranges, Tiles(), exclude)
    return quantized


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--captions", type=int, default=100)
    parser.add_argument("--budgets", default="8,32", help="graph scorer tile memory budgets in MB, comma-separated")
    parser.add_argument("--fused-budgets", default="4,8,16", help="fused scorer similarity-tile budgets in MB")
    parser.add_argument("--threads", type=int, default=0,
                        help="threads for torch, ONNX Runtime and numba (0: one per core); use 1 on a busy machine")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; each row reports its best")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from itmrt.families.naaf.graphs import naaf_scorer_graph
    from itmrt.runtime.backends import OrtBackend, SessionSettings
    from itmrt.runtime.encoders import CaptionEmbeddings
    from itmrt.runtime.tiled import score_tiled

    images, captions = make_data(args.images, args.captions)
    lengths = np.array([len(c) for c in captions], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    encoded = CaptionEmbeddings(np.concatenate(captions), lengths, offsets)
    pairs = args.images * args.captions
    print(f"NAAF scorer, d={D}, {REGIONS} regions, captions {MIN_LEN}-{MAX_LEN} tokens (mean {lengths.mean():.1f}); "
          f"{args.images} images x {args.captions} captions = {pairs} pairs; cpu cores {os.cpu_count()}, "
          f"torch threads {torch.get_num_threads()}")

    # Every implementation runs once per round, rounds interleaved, and the best round counts: on a
    # shared machine a slow spell then hits all rows alike instead of one, so the ratios stay honest.
    entries: list[tuple[str, Any]] = [
        ("released loop (torch, per caption)", lambda: released_loop_scores(images, captions))
    ]
    measure_peak, peak = matmul_rate(args.threads), 0.0
    tmp = tempfile.TemporaryDirectory()
    path = Path(tmp.name) / "scorer.onnx"
    path.write_bytes(naaf_scorer_graph(D, THRESHOLD, LAMBDA, INTRA, 17).SerializeToString())
    settings = SessionSettings(providers=["cpu"], intra_op_threads=args.threads)
    backend = OrtBackend(path, settings)
    for budget in [int(x) for x in args.budgets.split(",")]:
        entries.append((f"graph scorer (ORT), {budget} MB tiles",
                        lambda budget=budget: score_tiled(backend, images, encoded, top_k=10, keep_scores=True,
                                                          budget_bytes=budget << 20)))
    int8_path = Path(tmp.name) / "scorer.int8.onnx"
    int8_path.write_bytes(int8_scorer(path, images, captions).SerializeToString())
    int8_backend = OrtBackend(int8_path, settings)
    budget = int(args.budgets.split(",")[0])
    entries.append((f"graph scorer INT8 (ORT, Q/DQ), {budget} MB tiles",
                    lambda budget=budget: score_tiled(int8_backend, images, encoded, top_k=10, keep_scores=True,
                                                      budget_bytes=budget << 20)))
    from itmrt.runtime.fused import FusedNaafScorer, fused_available

    if not fused_available():
        print("numba is not installed: no fused rows (pip install 'itmrt[cpu]')")
    else:
        fused = FusedNaafScorer(THRESHOLD, LAMBDA, INTRA, threads=args.threads)
        fused.score_tiles(images[:2], encoded.take(np.arange(2)))  # compile / load the numba cache outside the timing
        for budget in [int(x) for x in args.fused_budgets.split(",")]:
            bi, bc = fused.tile_for(args.images, lengths, REGIONS, budget << 20)
            entries.append((f"fused scorer (GEMM + numba), {budget} MB tiles",
                            lambda budget=budget: fused.score_tiles(images, encoded, top_k=10, keep_scores=True,
                                                                    budget_bytes=budget << 20)))
            entries.append((f"  its similarity GEMMs alone ({bi}x{bc})", lambda bi=bi, bc=bc: gemm_only(fused, images,
                                                                                                        encoded, bi,
                                                                                                        bc)))
    best = [float("inf")] * len(entries)
    results: list[Any] = [None] * len(entries)
    for _ in range(args.repeats):
        peak = max(peak, measure_peak())  # the matmul rate too: its best round
        for k, (_name, fn) in enumerate(entries):
            started = time.perf_counter()
            results[k] = fn()
            best[k] = min(best[k], time.perf_counter() - started)
    tmp.cleanup()
    loop_seconds, loop_scores = best[0], results[0]
    worst, int8_error = 0.0, 0.0
    rows: list[tuple[str, float]] = []
    for (name, _fn), seconds, result in zip(entries, best, results):
        if hasattr(result, "scores"):
            error = float(np.abs(result.scores - loop_scores).max())
            if "INT8" in name:
                int8_error = error
            else:
                worst = max(worst, error)
            name = f"{name} ({result.tile_shape[0]}x{result.tile_shape[1]})"
        rows.append((name, seconds))
    flops = scorer_flops_per_pair(lengths)
    gemm_flops = 2 * float(lengths.mean()) * REGIONS * D
    # The similarity GEMMs over the tiles are a matmul rate of this CPU too; where they beat the probe, they count.
    peak = max([peak] + [pairs * gemm_flops / seconds for name, seconds in rows if "GEMMs alone" in name])
    print(f"matmul rate of this CPU (float32, best of torch / ORT MLAS on a tile-sized product and the tiles' "
          f"own GEMMs: {peak / 1e9:.0f} GFLOP/s); scorer needs {flops / 1e6:.2f} MFLOP/pair")
    print(f"{'implementation':58s} {'pairs/s':>10s} {'x loop':>7s} {'of GEMM peak':>12s}")
    for name, seconds in rows:
        rate = pairs / seconds
        print(f"{name:58s} {rate:10.0f} {loop_seconds / seconds:7.2f} "
              f"{rate * flops / peak:11.1%}")
    print(f"max |runtime - loop| score difference over all FP32 rows: {worst:.2e}; INT8 row: {int8_error:.2e}")


if __name__ == "__main__":
    main()
