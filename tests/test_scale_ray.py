"""Distributed search on a local Ray cluster (2 CPUs, one per module): a gallery of 3 shards on Ray actors gives
exactly the single-process top-k - through the Python API, ``itmrt infer --ray`` (a separate process joining
the cluster) and ``itmrt serve --ray`` - and a killed actor is restarted, or named in the error.

The cluster is shut down when the module ends, and the test checks that none of its processes is left.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from itmrt.errors import ItmrtError
from itmrt.scale import (
    IndexSpec,
    RayOptions,
    SearchRequest,
    ShardingOptions,
    index_sharded,
    open_shards,
)
from itmrt.serve.client import ServiceClient
from itmrt.serve.server import ServeOptions, Service

from scale_helpers import N_IMAGES, quiet, same_top_k, scale_setup
from serve_helpers import running

ray = pytest.importorskip("ray")
pytest.importorskip("faiss")
pytest.importorskip("numba", reason="exact comparisons: the fused scorer's scores do not depend on the tiling")

REPO = Path(__file__).resolve().parents[1]
BOTH = ("t2i", "i2t")
RAY = RayOptions(address="auto", cpus=0.5, timeout_s=240)  # 3 actors x 0.5 CPU fit the 2-CPU cluster


def ray_processes() -> list[int]:
    """Pids of this process's descendants that are Ray's (raylet, gcs_server, workers), from /proc."""
    children: dict[int, list[int]] = {}
    names: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            names[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            continue  # a zombie has ended
        children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry.name))
    found, todo = [], [os.getpid()]
    while todo:
        for child in children.get(todo.pop(), []):
            todo.append(child)
            if any(word in names.get(child, "") for word in ("raylet", "gcs_server", "ray::", "ray/")):
                found.append(child)
    return found


@pytest.fixture(scope="module")
def cluster() -> Any:
    if ray.is_initialized():
        pytest.skip("this process is connected to Ray already")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        deadline = time.monotonic() + 30
        while ray_processes() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not ray_processes(), "Ray processes were left running"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, cluster: str) -> dict[str, Any]:
    return {**scale_setup(tmp_path_factory.mktemp("ray"), seed=41, captions=19), "address": cluster}


def test_three_shards_on_ray_give_the_single_process_top_k(setup: dict[str, Any]) -> None:
    runtime, encoded = setup["runtime"], setup["encoded"]
    reference = runtime.rank(setup["plain"], encoded, top_k=7, keep_scores=True)
    local = open_shards(setup["sharded"], threads=1, warn=quiet)
    shards = open_shards(setup["sharded"], ray=RAY, threads=1, warn=quiet)
    try:
        assert [worker["shards"] for worker in shards.workers] == [["shard-00000"], ["shard-00001"], ["shard-00002"]]
        assert len({worker["pid"] for worker in shards.workers} | {os.getpid()}) == 4
        got = shards.search(encoded, SearchRequest(k=7, directions=BOTH, keep_scores=True))
        same_top_k(got.t2i, reference.t2i)
        same_top_k(got.i2t, reference.i2t)
        np.testing.assert_array_equal(got.scores, reference.scores)
        for shortlist in (7, 10):  # each shard's FAISS shortlist and rerank: as the same shards in one process
            request = SearchRequest(k=7, shortlist=shortlist, directions=BOTH)
            on_ray, alone = shards.search(encoded, request), local.search(encoded, request)
            same_top_k(on_ray.t2i, alone.t2i)
            same_top_k(on_ray.i2t, alone.i2t)
    finally:
        shards.close()
    assert ray.is_initialized(), "closing the shards must leave the caller's Ray connection alone"


def test_a_region_index_gallery_on_ray_gives_the_local_answer(setup: dict[str, Any]) -> None:
    runtime, encoded = setup["runtime"], setup["encoded"]
    gallery = setup["root"] / "regions"
    index_sharded(runtime, setup["features"], gallery, ShardingOptions(17, None, IndexSpec("regions")))
    local = open_shards(gallery, threads=1, warn=quiet)
    shards = open_shards(gallery, ray=RAY, threads=1, warn=quiet)
    try:
        for request in (SearchRequest(k=5, shortlist=8, nprobe=2, directions=BOTH),
                        SearchRequest(k=5, shortlist=N_IMAGES, nprobe=10**6)):
            on_ray, alone = shards.search(encoded, request), local.search(encoded, request)
            same_top_k(on_ray.t2i, alone.t2i)
            if "i2t" in request.directions:
                same_top_k(on_ray.i2t, alone.i2t)
            assert set(on_ray.stage_seconds) == {"candidates", "rerank"}
        same_top_k(on_ray.t2i, runtime.rank(setup["plain"], encoded, top_k=5).t2i)
        for request in (SearchRequest(k=5, shortlist=8, nprobe=2, budget=20),  # the pool chosen over the actors
                        SearchRequest(k=5, shortlist=8, nprobe=10**6, budget=N_IMAGES, refine=0)):
            on_ray, alone = shards.search(encoded, request), local.search(encoded, request)
            same_top_k(on_ray.t2i, alone.t2i)
            assert on_ray.pairs == alone.pairs and set(on_ray.stage_seconds) == {"candidates", "rerank"}
        same_top_k(on_ray.t2i, runtime.rank(setup["plain"], encoded, top_k=5).t2i, atol=1e-6)  # all: exhaustive
    finally:
        shards.close()


def test_a_sketched_region_gallery_on_ray_gives_the_local_answer(setup: dict[str, Any]) -> None:
    runtime, encoded = setup["runtime"], setup["encoded"]
    gallery = setup["root"] / "sketched"
    spec = IndexSpec("regions", region_sketch="256:128")  # sketches on every shard, whatever its fit
    index_sharded(runtime, setup["features"], gallery, ShardingOptions(17, None, spec))
    local = open_shards(gallery, threads=1, warn=quiet)
    assert all(s.regions is not None and s.regions.sketch is not None and s.regions.sketch.fine_bits == 128
               for s in local.shards)
    shards = open_shards(gallery, ray=RAY, threads=1, warn=quiet)
    try:
        for request in (SearchRequest(k=4, shortlist=4, refine=9, rescore=6),  # scan, fine sketch, re-estimate
                        SearchRequest(k=5, shortlist=6),
                        SearchRequest(k=4, shortlist=4, refine=9, budget=10)):
            on_ray, alone = shards.search(encoded, request), local.search(encoded, request)
            same_top_k(on_ray.t2i, alone.t2i)
            assert on_ray.pairs == alone.pairs
    finally:
        shards.close()


def test_a_killed_actor_is_restarted_or_named_never_a_partial_answer(setup: dict[str, Any]) -> None:
    runtime, encoded = setup["runtime"], setup["encoded"]
    reference = runtime.rank(setup["plain"], encoded, top_k=5).t2i
    options = RayOptions(address="auto", workers=2, cpus=0.5, retries=1, timeout_s=240)
    shards = open_shards(setup["sharded"], ray=options, threads=1, warn=quiet)
    try:
        assert [worker["shards"] for worker in shards.workers] == [["shard-00000", "shard-00001"], ["shard-00002"]]
        killed = shards.workers[1]["pid"]
        ray.kill(shards.actors[1])
        assert_actor_ends(shards.actors[1])  # lost before the search starts
        same_top_k(shards.search(encoded, SearchRequest(k=5)).t2i, reference)  # restarted and asked again
        assert shards.workers[1]["pid"] != killed
        shards.options = RayOptions(address="auto", workers=2, cpus=0.5, retries=0, timeout_s=240)
        ray.kill(shards.actors[0])
        assert_actor_ends(shards.actors[0])
        with pytest.raises(ItmrtError, match=r"shards shard-00000, shard-00001 \(images 0\.\.33\) lost"):
            shards.search(encoded, SearchRequest(k=5))
    finally:
        shards.close()


def test_asking_for_more_cpus_than_the_cluster_has_is_a_one_line_error(setup: dict[str, Any]) -> None:
    with pytest.raises(ItmrtError, match="3 Ray workers x 1 CPU need 3 CPUs; the cluster has 2"):
        open_shards(setup["sharded"], ray=RayOptions(address="auto", cpus=1.0), threads=1, warn=quiet)


def test_cli_infer_with_ray_from_another_process(setup: dict[str, Any]) -> None:
    """``itmrt infer GALLERY --ray ADDRESS`` as a user runs it: a new process joins the cluster, starts one actor
    per shard, and writes the lines ``itmrt infer`` writes for the same images in one gallery."""
    root = setup["root"]
    plain, on_ray = root / "plain.jsonl", root / "ray.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    common = ["--captions", str(root / "captions.txt"), "--top-k", "6", "--no-progress"]
    subprocess.run([sys.executable, "-m", "itmrt", "infer", str(root / "plain"), *common, "--out", str(plain)],
                   check=True, env=env, capture_output=True, timeout=300)
    done = subprocess.run(
        [sys.executable, "-m", "itmrt", "infer", str(setup["sharded"]), *common, "--out", str(on_ray),
         "--ray", setup["address"], "--ray-cpus", "0.5"],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "3 shards in Ray actors, full scoring" in done.stdout
    assert on_ray.read_text() == plain.read_text()
    assert len(on_ray.read_text().splitlines()) == len(setup["captions"]) + N_IMAGES


def test_serve_with_ray_answers_as_the_runtime(setup: dict[str, Any]) -> None:
    runtime, captions = setup["runtime"], setup["captions"][:4]
    options = ServeOptions(port=0, configure_logging=False, threads=1, ray=RAY)
    service = Service(setup["sharded"], options=options)
    with running(service):
        searcher = service.batcher.searcher
        actors = list(searcher.shards.actors)
        assert len(actors) == 3
        with ServiceClient(service.url) as client:
            hits = client.search(captions, 6)
    want = runtime.search_text_to_image(captions, setup["plain"], k=6)
    # the actors' runtimes are warmed (NAAF's per-word steps in the compiled kernel), this one is not
    same_top_k(hits, want, atol=1e-6)
    assert searcher.shards.actors == []  # the stopped service ended its actors
    for actor in actors:
        assert_actor_ends(actor)


def test_a_truncated_shard_under_ray_actors_is_not_ready_then_a_reload_recovers(setup: dict[str, Any],
                                                                                 tmp_path: Path) -> None:
    """An actor's shard file truncated under a serving process: 503 naming the shard, not ready (not a 500);
    the file restored and the gallery reloaded (what SIGHUP does): fresh actors answer, the old ones end."""
    import shutil

    gallery = tmp_path / "sharded"
    shutil.copytree(setup["sharded"], gallery)
    captions = setup["captions"][:2]
    # A swap starts the new version's actors before the old ones end: the cluster needs room for both.
    ray_options = RayOptions(address="auto", cpus=0.25, timeout_s=120)
    service = Service(gallery, options=ServeOptions(port=0, configure_logging=False, threads=1, ray=ray_options))
    with running(service), ServiceClient(service.url) as client:
        first = client.search(captions, 5)
        old_actors = list(service.batcher.searcher.shards.actors)
        target = gallery / "shard-00001" / "image_embeddings.npy"
        original = target.read_bytes()
        os.truncate(target, 256)
        document = {"inputs": [{"name": "captions", "datatype": "BYTES", "shape": [2], "data": captions}]}
        status, _headers, answer = client.request("POST", "/v2/models/text_to_image/infer",
                                                  json.dumps(document).encode(), {"Content-Type": "application/json"})
        assert status == 503, answer
        assert b"shard-00001" in answer and b"image_embeddings.npy" in answer and b"/tmp" not in answer
        assert not client.ready()
        staged = target.with_name("restored.tmp")
        staged.write_bytes(original)
        os.replace(staged, target)
        outcome = service.reloader.reload("SIGHUP").result(180)
        assert outcome.error is None, outcome.error
        assert client.ready()
        again = client.search(captions, 5)
    np.testing.assert_array_equal(again.indices, first.indices)
    for actor in old_actors:
        assert_actor_ends(actor)


def assert_actor_ends(actor: Any, within_s: float = 60.0) -> None:
    """The actor is gone within ``within_s``: ray.kill is asynchronous, so a call sent at once may still be
    answered by the dying worker; later calls must fail."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            ray.get(actor.describe.remote(), timeout=within_s)
        except ray.exceptions.RayActorError:
            return
        assert time.monotonic() < deadline, f"a killed actor still answers after {within_s:.0f} s"
        time.sleep(0.5)


def test_ray_options_are_checked_before_anything_starts(setup: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(ItmrtError, match="--ray-workers must be an integer from 1 to"):
        RayOptions(workers=0).check()
    # a string or NaN failed in a comparison (TypeError) or reached Ray; NumPy's numbers are numbers
    for wrong, expected in ((RayOptions(workers="2"), "--ray-workers must be an integer"),  # type: ignore[arg-type]
                            (RayOptions(retries=1.5), "--ray-retries must be an integer"),  # type: ignore[arg-type]
                            (RayOptions(cpus="1"), "--ray-cpus must be a finite number"),  # type: ignore[arg-type]
                            (RayOptions(timeout_s=float("nan")), "--ray-timeout-s must be a finite number"),
                            (RayOptions(address=None), "--ray needs an address")):  # type: ignore[arg-type]
        with pytest.raises(ItmrtError, match=expected):
            wrong.check()
    RayOptions(workers=np.int64(2), cpus=np.float32(0.5)).check()
    with pytest.raises(ItmrtError, match="sharded gallery"):
        Service(setup["plain"].path, options=ServeOptions(port=0, ray=RAY))
    document = json.loads((setup["sharded"] / "gallery.json").read_text())
    assert document["kind"] == "itmrt-sharded-gallery"
