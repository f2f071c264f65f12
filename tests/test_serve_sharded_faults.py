"""A sharded gallery's files changed under a running ``itmrt serve`` (real servers on 127.0.0.1).

Memory-mapped shards (over ``--copy-shards-mb``): a shard file modified in place
or truncated is refused before it is read - 503 with the reason, not ready,
one log line - and the process lives on (a truncated mapping read would end it
by SIGBUS). Shards copied into memory: nothing done to the files changes an answer.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from itmrt.runtime import load
from itmrt.scale import SearchRequest, ShardingOptions, index_sharded, open_shards
from itmrt.serve.client import ServiceClient
from itmrt.serve.server import ServeOptions, Service

from runtime_helpers import make_bundle, random_captions, region_features
from scale_helpers import quiet
from serve_helpers import running, start_server_process, wait_until_ready

pytest.importorskip("faiss")

REPO = Path(__file__).resolve().parents[1]
INFER = "/v2/models/text_to_image/infer"
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("sharded-faults")
    bundle = make_bundle(root / "model")[0]
    runtime = load(bundle, threads=1, scorer="graph", warn=quiet)
    index_sharded(runtime, region_features(36, seed=3), root / "sharded", ShardingOptions(shard_images=12))
    return {"root": root, "bundle": bundle, "gallery": root / "sharded", "captions": random_captions(3, seed=4)}


def _expected(gallery: Path, captions: list[str], k: int) -> Any:
    shards = open_shards(gallery, threads=1, scorer="graph", warn=quiet)
    return shards.search(shards.runtime.encode_captions(captions), SearchRequest(k=k)).t2i


def _infer(url: str, captions: list[str]) -> httpx.Response:
    document = {"inputs": [{"name": "captions", "datatype": "BYTES", "shape": [len(captions)], "data": captions}],
                "parameters": {"top_k": 5}}
    return httpx.post(url + INFER, content=json.dumps(document), headers=JSON, timeout=30)


def _refused(response: httpx.Response, *words: str) -> str:
    assert response.status_code == 503, response.text
    message = str(response.json().get("error") or response.json().get("reason"))
    assert "\n" not in message and str(REPO) not in message and "/tmp" not in message, message
    for word in words:
        assert word in message, message
    return message


def test_mapped_shards_changed_while_serving_are_refused_and_the_process_lives(made: dict[str, Any],
                                                                               tmp_path: Path) -> None:
    gallery = tmp_path / "sharded"
    shutil.copytree(made["gallery"], gallery)
    captions = made["captions"]
    want = _expected(gallery, captions, 5)
    args = ["serve", str(gallery), "--port", "0", "--scorer", "graph", "--threads", "1", "--copy-shards-mb", "0"]
    script = f"from itmrt.cli.app import main\nmain({args!r})\n"
    server = start_server_process(script)
    lines: list[str] = []
    try:
        url = wait_until_ready(server, lines)
        assert any("read from its files (over --copy-shards-mb 0)" in line for line in lines), "".join(lines)
        reader = threading.Thread(target=lambda: lines.extend(server.stderr), daemon=True)  # type: ignore[arg-type]
        reader.start()
        with ServiceClient(url) as client:
            np.testing.assert_array_equal(client.search(captions, 5).indices, want.indices)
        embeddings = gallery / "shard-00001" / "image_embeddings.npy"
        data = bytearray(embeddings.read_bytes())
        data[-64:-60] = np.float32(1e30).tobytes()  # in place, same size and inode: only the times tell
        with open(embeddings, "r+b") as handle:
            handle.write(data)
        # The request is the first to see it (no probe before): refused before the shard is read.
        _refused(_infer(url, captions), "shard shard-00001: image_embeddings.npy changed", "modified in place")
        ready = httpx.get(url + "/v2/health/ready", timeout=10)
        _refused(ready, "shard-00001")
        os.truncate(gallery / "shard-00002" / "image_embeddings.npy", 1000)  # would be SIGBUS if read
        _refused(_infer(url, captions), "shard-00001")
        assert httpx.get(url + "/v2/health/live", timeout=10).status_code == 200
        assert server.poll() is None  # alive
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0
        reader.join(10)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    logged = [line for line in lines if "not ready:" in line]
    assert len(logged) == 1 and "image_embeddings.npy changed" in logged[0], "".join(lines)
    assert "Traceback" not in "".join(lines) and "Bus error" not in "".join(lines)


def test_a_truncated_shard_under_a_fresh_check_is_refused_too(made: dict[str, Any], tmp_path: Path) -> None:
    """Truncation first (not an in-place write): the probe reports it before any request, with its size. Global
    vectors are read into memory when a shard opens: a change to their file reaches nothing."""
    gallery = tmp_path / "sharded"
    shutil.copytree(made["gallery"], gallery)
    options = ServeOptions(port=0, configure_logging=False, threads=1, scorer="graph", copy_shards_mb=0)
    with running(Service(gallery, options=options)) as live:
        os.truncate(gallery / "shard-00000" / "global_vectors.npy", 200)
        assert httpx.get(live.url + "/v2/health/ready", timeout=10).status_code == 200
        os.truncate(gallery / "shard-00000" / "image_embeddings.npy", 200)
        ready = httpx.get(live.url + "/v2/health/ready", timeout=10)
        _refused(ready, "shard shard-00000: image_embeddings.npy changed", "bytes")
        _refused(_infer(live.url, made["captions"]), "image_embeddings.npy")


def test_shards_copied_into_memory_answer_the_same_whatever_happens_to_their_files(made: dict[str, Any],
                                                                                    tmp_path: Path) -> None:
    gallery = tmp_path / "sharded"
    shutil.copytree(made["gallery"], gallery)
    captions = made["captions"]
    want = _expected(gallery, captions, 5)
    options = ServeOptions(port=0, configure_logging=False, threads=1, scorer="graph")  # default budget: copied
    with running(Service(gallery, options=options)) as live, ServiceClient(live.url) as client:
        np.testing.assert_array_equal(client.search(captions, 5).indices, want.indices)
        for shard in ("shard-00000", "shard-00001", "shard-00002"):
            os.truncate(gallery / shard / "image_embeddings.npy", 100)
            os.truncate(gallery / shard / "global_vectors.npy", 100)
        hits = client.search(captions, 5)
        np.testing.assert_array_equal(hits.indices, want.indices)
        np.testing.assert_array_equal(hits.scores, want.scores)
        assert client.ready()
