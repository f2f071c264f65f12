"""`itmrt serve` / `itmrt query`: a real uvicorn server on 127.0.0.1 (a free port) over small models' galleries.

Answers are checked against ``Runtime.search_text_to_image`` alone and batched
with other requests (NAAF, and CMPM with the released max over padding), with
our client, httpx, curl-like raw requests and tritonclient; every error status,
a full queue, a deadline, a failing request inside a batch, SIGTERM with
requests in flight (a subprocess server), and oversized requests.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from itmrt.errors import ItmrtError
from itmrt.runtime import load
from itmrt.serve.batcher import BatchSettings
from itmrt.serve.client import ServiceClient
from itmrt.serve.protocol import HEADER_LENGTH, infer_request_body, pack_bytes
from itmrt.serve.searcher import open_runtime_searcher
from itmrt.serve.server import ServeOptions, Service, bind_socket

from cli_helpers import run_cli
from runtime_helpers import make_bundle, make_cmpm_bundle, random_captions
from serve_helpers import ControlledSearcher, make_gallery, metric, running, start_server_process, wait_until_ready

REPO = Path(__file__).resolve().parents[1]
INFER = "/v2/models/text_to_image/infer"
TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def naaf(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("serve")
    bundle = make_bundle(root / "model")[0]
    gallery = make_gallery(bundle, root / "gallery")
    (root / "token.txt").write_text(TOKEN + "\n")
    runtime = load(bundle, scorer="graph")
    return {
        "root": root,
        "bundle": bundle,
        "gallery": gallery,
        "runtime": runtime,
        "open": runtime.open_gallery(gallery),
    }


@pytest.fixture(scope="module")
def service(naaf: dict[str, Any]) -> Any:
    """NAAF behind a token, with a 300 ms batching window (idle or not) so concurrent requests share batches."""
    options = ServeOptions(
        port=0,
        configure_logging=False,
        scorer="graph",
        token_file=naaf["root"] / "token.txt",
        batch=BatchSettings(max_batch_captions=64, max_delay_s=0.3, wait_when_idle=True),
    )
    with running(Service(naaf["gallery"], options=options)) as live:
        yield live


def expected(naaf: dict[str, Any], captions: list[str], k: int) -> Any:
    return naaf["runtime"].search_text_to_image(captions, naaf["open"], k=k)


def http(service: Service, token: str | None = TOKEN) -> httpx.Client:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.Client(base_url=service.url, headers=headers, timeout=60)


def check_error(response: httpx.Response, status: int, words: str) -> None:
    assert response.status_code == status, response.text
    message = response.json()["error"]
    assert words in message and "\n" not in message, message


# -- answers ------------------------------------------------------------------------


def test_answers_equal_the_runtime_alone_and_batched(naaf: dict[str, Any], service: Service) -> None:
    requests = [
        (random_captions(n, seed=40 + n, max_words=10), k)
        for n, k in ((1, 1), (3, 5), (2, 10), (5, 3), (1, 40), (4, 7))
    ]
    with ServiceClient(service.url, TOKEN) as client:
        alone = [client.search(captions, k) for captions, k in requests[:2]]
    before = http(service).get("/metrics").text
    barrier = threading.Barrier(len(requests))

    def send(job: tuple[list[str], int]) -> Any:
        with ServiceClient(service.url, TOKEN, binary=job[1] % 2 == 0) as client:
            barrier.wait()
            return client.search(*job)

    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(send, requests))
    after = http(service).get("/metrics").text
    for (captions, k), hits in zip(requests[:2] + requests, alone + together, strict=True):
        want = expected(naaf, captions, k)
        assert hits.indices.shape == (len(captions), k) and hits.indices.dtype == np.int64
        np.testing.assert_array_equal(hits.indices, want.indices)
        np.testing.assert_allclose(hits.scores, want.scores, atol=1e-6)
    batches = metric(after, "itmrt_batch_requests_count") - metric(before, "itmrt_batch_requests_count")
    parts = metric(after, "itmrt_batch_requests_sum") - metric(before, "itmrt_batch_requests_sum")
    # units of --unit-captions: a request of more captions is scored in parts, each counted as a request
    assert parts >= len(requests) and 1 <= batches < parts, "the concurrent requests were never batched together"
    # Requests of more than --unit-captions are scored in parts, each counted as one of its batch's requests.
    unit = service.batcher.unit
    parts = sum(-(-len(captions) // unit) for captions, _k in requests)
    assert parts > len(requests)
    assert metric(after, "itmrt_batch_requests_sum") - metric(before, "itmrt_batch_requests_sum") == parts


def test_an_idle_worker_answers_at_once_and_batches_what_queues_while_busy(naaf: dict[str, Any]) -> None:
    """A 60 s batching window: a lone request that finds the worker idle is dispatched at once (it would wait the
    whole window before); requests that queue while the worker is busy are still batched together (a full batch
    of four: it does not wait for more), and every answer equals the runtime's alone."""
    searchers: list[ControlledSearcher] = []

    def controlled() -> ControlledSearcher:
        searchers.append(ControlledSearcher(open_runtime_searcher(naaf["bundle"], naaf["gallery"])))
        return searchers[-1]

    window = 60.0
    options = ServeOptions(port=0, configure_logging=False, batch=BatchSettings(max_batch_captions=4,
                                                                                max_delay_s=window))
    lone = random_captions(1, seed=70, max_words=8)
    requests = [random_captions(1, seed=71 + n, max_words=8) for n in range(4)]
    with running(Service(None, options=options, searcher=controlled)) as live, ThreadPoolExecutor(6) as pool:
        started = time.monotonic()
        alone = ServiceClient(live.url).search(lone, 3)
        assert time.monotonic() - started < window / 2, "a lone request waited for the batching window"
        searchers[0].release.clear()  # hold the next batch while four more requests queue behind it
        searchers[0].scoring.clear()  # (set by the warm-up and the lone request)
        held = pool.submit(ServiceClient(live.url).search, lone, 3)
        assert searchers[0].scoring.wait(30)
        answers = [pool.submit(ServiceClient(live.url).search, captions, 3) for captions in requests]
        deadline = time.monotonic() + 60
        while live.metrics.registry.get_sample_value("itmrt_queue_depth") < len(requests):
            assert time.monotonic() < deadline, "the four requests never queued behind the held batch"
            time.sleep(0.01)
        searchers[0].release.set()
        results = [held.result(60)] + [answer.result(window / 2) for answer in answers]
        page = ServiceClient(live.url).request("GET", "/metrics")[2].decode()
        assert live.batcher.last_batch_requests == len(requests)  # the four that queued went as one batch
    assert metric(page, "itmrt_batch_requests_count") == 3  # lone, held, the four (the warm-up is not a batch)
    for captions, hits in zip([lone, lone, *requests], [alone, *results], strict=True):
        want = expected(naaf, captions, 3)
        np.testing.assert_array_equal(hits.indices, want.indices)
        np.testing.assert_allclose(hits.scores, want.scores, atol=1e-6)


def test_released_cmpm_answers_do_not_depend_on_the_batch(tmp_path: Path) -> None:
    """Requests whose longest captions differ are held back until all are queued, then batched together."""
    bundle = make_cmpm_bundle(tmp_path, max_over_padding=True)
    images = np.random.default_rng(3).standard_normal((24, 3, 32, 32)).astype(np.float32)
    gallery = make_gallery(bundle, tmp_path / "gallery", images)
    runtime = load(bundle)
    reference = runtime.open_gallery(gallery)
    requests = [
        random_captions(n, seed=60 + n, min_words=words, max_words=words + 2)
        for n, words in ((2, 1), (3, 6), (1, 9), (2, 3))
    ]
    # The max over padding at work: a caption padded to a longer caption's length embeds differently.
    short_alone = runtime.encode_captions(requests[0]).vectors
    short_padded = runtime.encode_captions(requests[0] + requests[2]).vectors[:2]
    assert np.abs(short_alone - short_padded).max() > 1e-4
    searchers: list[ControlledSearcher] = []

    def controlled() -> ControlledSearcher:
        searchers.append(ControlledSearcher(open_runtime_searcher(bundle, gallery)))
        return searchers[-1]

    options = ServeOptions(port=0, configure_logging=False, batch=BatchSettings(max_batch_captions=64, max_delay_s=0.0))
    with running(Service(None, options=options, searcher=controlled)) as live, ThreadPoolExecutor(5) as pool:
        searchers[0].release.clear()
        held = pool.submit(ServiceClient(live.url).search, ["word1 word2"], 3)
        assert searchers[0].scoring.wait(30)
        # Queued one by one, the largest first: a batch takes no request larger than its first (the arrival order
        # of concurrent submissions would decide otherwise whether the four share a batch).
        answers: list[Any] = [None] * len(requests)
        deadline = time.monotonic() + 60
        for number in sorted(range(len(requests)), key=lambda n: -len(requests[n])):
            answers[number] = pool.submit(ServiceClient(live.url).search, requests[number], 4)
            queued = sum(answer is not None for answer in answers)
            while live.metrics.registry.get_sample_value("itmrt_queue_depth") < queued:  # behind the held batch
                assert time.monotonic() < deadline, "the requests never queued behind the held batch"
                time.sleep(0.01)
        searchers[0].release.set()
        held.result(60)
        results = [answer.result(60) for answer in answers]
        page = ServiceClient(live.url).request("GET", "/metrics")[2].decode()
    assert (
        metric(page, "itmrt_batch_requests_bucket", 'le="4.0"')
        - metric(page, "itmrt_batch_requests_bucket", 'le="2.0"')
        == 1
    )
    for captions, hits in zip(requests, results, strict=True):
        want = runtime.search_text_to_image(captions, reference, k=4)
        np.testing.assert_array_equal(hits.indices, want.indices)
        np.testing.assert_allclose(hits.scores, want.scores, atol=1e-6)


def test_tritonclient_binary_and_json(naaf: dict[str, Any], service: Service) -> None:
    import tritonclient.http as triton

    captions = random_captions(3, seed=80)
    want = expected(naaf, captions, 4)

    def auth() -> dict[str, str]:  # a new dict per call: tritonclient adds its own headers to the one it is given
        return {"Authorization": f"Bearer {TOKEN}"}

    client = triton.InferenceServerClient(service.url.removeprefix("http://"))
    try:
        assert client.is_server_live() and client.is_server_ready(headers=auth())
        assert client.is_model_ready("text_to_image", headers=auth())
        assert [o["name"] for o in client.get_model_metadata("text_to_image", headers=auth())["outputs"]] == [
            "indices",
            "scores",
        ]
        for binary in (True, False):
            tensor = triton.InferInput("captions", [len(captions)], "BYTES")
            tensor.set_data_from_numpy(np.array([c.encode() for c in captions], dtype=object), binary_data=binary)
            outputs = [triton.InferRequestedOutput(name, binary_data=binary) for name in ("indices", "scores")]
            result = client.infer("text_to_image", [tensor], outputs=outputs, parameters={"top_k": 4}, headers=auth())
            np.testing.assert_array_equal(result.as_numpy("indices"), want.indices)
            np.testing.assert_allclose(result.as_numpy("scores"), want.scores, atol=1e-6)
        # tritonclient's defaults: binary input, no outputs named (all of them, in binary)
        tensor = triton.InferInput("captions", [len(captions)], "BYTES")
        tensor.set_data_from_numpy(np.array([c.encode() for c in captions], dtype=object))
        result = client.infer("text_to_image", [tensor], headers=auth())
        np.testing.assert_array_equal(result.as_numpy("indices"), expected(naaf, captions, 10).indices)
        with pytest.raises(Exception, match="unknown model"):
            client.infer("image_to_text", [tensor], headers=auth())
    finally:
        client.close()


# -- errors -------------------------------------------------------------------------


def test_every_error_status(naaf: dict[str, Any], service: Service) -> None:
    client = http(service)
    good = json.dumps({"inputs": [{"name": "captions", "datatype": "BYTES", "shape": [1], "data": ["word1"]}]})
    before = client.get("/metrics").text
    assert http(service, None).get("/v2/health/live").status_code == 200  # probes need no token
    assert http(service, None).get("/v2/health/ready").status_code == 200
    check_error(http(service, None).post(INFER, content=good), 401, "token")
    check_error(http(service, "wrong").post(INFER, content=good), 401, "token")
    check_error(http(service, None).get("/metrics"), 401, "token")
    check_error(client.post("/v2/models/nope/infer", content=good), 404, "unknown model")
    check_error(client.post("/v2/models/text_to_image/versions/2/infer", content=good), 404, "no version")
    check_error(client.get("/v3/anything"), 404, "no such endpoint")
    bad = {
        "empty": ({"inputs": [{"name": "captions", "datatype": "BYTES", "shape": [0], "data": []}]}, "empty"),
        "datatype": ({"inputs": [{"name": "captions", "datatype": "INT64", "shape": [1], "data": [3]}]}, "datatype"),
        "shape": ({"inputs": [{"name": "captions", "datatype": "BYTES", "shape": [1, 1], "data": ["a"]}]}, "shape"),
        "count": ({"inputs": [{"name": "captions", "datatype": "BYTES", "shape": [2], "data": ["a"]}]}, "holds 1"),
        "input": ({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a"]}]}, "unknown"),
        "top_k 0": ({**json.loads(good), "parameters": {"top_k": 0}}, "top_k"),
        "top_k big": ({**json.loads(good), "parameters": {"top_k": 41}}, "top_k"),
        "top_k text": ({**json.loads(good), "parameters": {"top_k": "5"}}, "top_k"),
        "tokens": (
            {"inputs": [{"name": "captions", "datatype": "BYTES", "shape": [1], "data": [" ".join(["word3"] * 11)]}]},
            "13 tokens",
        ),
        "NUL": ({"inputs": [{"name": "captions", "datatype": "BYTES", "shape": [2], "data": ["word1", "a\x00b"]}]},
                "caption 1 holds the control character U+0000; send plain text"),  # was ranked as an unknown word
        "escape": ({"inputs": [{"name": "captions", "datatype": "BYTES", "shape": [1], "data": ["\x1b[2J word1"]}]},
                   "caption 0 holds the control character U+001B"),
    }
    for body, words in bad.values():
        check_error(client.post(INFER, content=json.dumps(body)), 400, words)
    check_error(client.post(INFER, content=b"{not json"), 400, "not valid JSON")
    raw = pack_bytes([b"word1", b"\xff\xfe word2"])
    header = json.dumps(
        {
            "inputs": [
                {"name": "captions", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": len(raw)}}
            ]
        }
    )
    check_error(
        client.post(INFER, content=header.encode() + raw, headers={HEADER_LENGTH: str(len(header))}),
        400,
        "caption 1 is not valid UTF-8",
    )
    check_error(client.post(INFER, content=b" " * (5 << 20)), 413, "over the limit")
    check_error(
        client.post(INFER, content=gzip.compress(b" " * (5 << 20)), headers={"Content-Encoding": "gzip"}),
        413,
        "over the limit",
    )
    check_error(client.post(INFER, content=good, headers={"Content-Encoding": "br"}), 415, "Content-Encoding")
    zipped = client.post(INFER, content=gzip.compress(good.encode()), headers={"Content-Encoding": "gzip"})
    assert zipped.status_code == 200 and zipped.json()["outputs"][0]["shape"] == [1, 10]
    after = client.get("/metrics").text
    counts = {
        outcome: metric(after, "itmrt_requests_total", f'outcome="{outcome}"')
        - metric(before, "itmrt_requests_total", f'outcome="{outcome}"')
        for outcome in ("ok", "bad_request", "unauthorized", "not_found", "too_large")
    }
    assert counts == {"ok": 1, "bad_request": len(bad) + 2, "unauthorized": 2, "not_found": 2, "too_large": 2}


def test_huge_requests_are_refused_without_harm(naaf: dict[str, Any], service: Service) -> None:
    client = http(service)
    long_caption = " ".join(["word5"] * 500)  # 3 KB (one of 60 KB is refused from its start: test_serve_faults)
    check_error(client.post(INFER, content=infer_request_body([long_caption], 3)[0]), 400, "over the limit of 2048")
    many = [f"word{i % 40} word{i % 7}" for i in range(20_000)]
    for binary in (False, True):
        body, headers = infer_request_body(many, 3, binary)
        check_error(client.post(INFER, content=body, headers=headers), 400, "20000 captions in one request")
        body, headers = infer_request_body(many * 5, 3, binary)  # over --max-body-mb 1: refused before reading
        check_error(client.post(INFER, content=body, headers=headers), 413, "over the limit")
    captions = random_captions(2, seed=90)
    with ServiceClient(service.url, TOKEN) as ours:
        np.testing.assert_array_equal(ours.search(captions, 3).indices, expected(naaf, captions, 3).indices)


def test_not_ready_queue_full_deadline_and_a_failing_request(naaf: dict[str, Any]) -> None:
    opened, searchers = threading.Event(), []
    poison = naaf["runtime"].vocab.encode("word45")[1]

    def controlled() -> ControlledSearcher:
        assert opened.wait(60)
        searchers.append(
            ControlledSearcher(open_runtime_searcher(naaf["bundle"], naaf["gallery"], scorer="graph"), poison)
        )
        return searchers[-1]

    def post(captions: list[str], **parameters: Any) -> httpx.Response:
        body = {
            "inputs": [{"name": "captions", "datatype": "BYTES", "shape": [len(captions)], "data": captions}],
            "parameters": {"top_k": 2, **parameters},
        }
        return client.post(INFER, content=json.dumps(body))

    options = ServeOptions(
        port=0, configure_logging=False, batch=BatchSettings(max_batch_captions=64, max_delay_s=0.0, max_queue=3)
    )
    service = Service(None, options=options, searcher=controlled)
    with running(service, wait_ready=False), http(service, None) as client, ThreadPoolExecutor(5) as pool:
        assert client.get("/v2/health/live").status_code == 200  # the probes answer while the gallery loads
        assert client.get("/v2/health/ready").status_code == 503
        check_error(post(["word1"]), 503, "loading")
        opened.set()
        assert service.batcher.ready.wait(60)
        searcher = searchers[0]
        searcher.release.clear()
        held = pool.submit(post, ["word1"])
        assert searcher.scoring.wait(30)
        queued = [
            pool.submit(post, ["word1 word45"]),
            pool.submit(post, ["word2"]),
            pool.submit(post, ["word3"], timeout=300_000),
        ]
        while service.metrics.registry.get_sample_value("itmrt_queue_depth") < 3:
            time.sleep(0.01)
        check_error(post(["word4"]), 429, "queue")
        check_error(queued[2].result(30), 504, "deadline")  # its own 0.3 s timeout passed in the queue
        searcher.release.set()
        assert held.result(30).status_code == 200
        # The poisoned request and "word2" were batched together; the model fails on the first only.
        failed, answered = queued[0].result(30), queued[1].result(30)
        check_error(failed, 500, "the service failed on this request (failure #")
        assert "the poisoned caption" not in failed.text  # internals stay in the log
        assert answered.status_code == 200 and answered.json()["outputs"][0]["shape"] == [1, 2]
        assert client.get("/v2/health/ready").status_code == 200


def test_a_gallery_that_fails_to_load_stops_the_service() -> None:
    def broken() -> Any:
        raise ItmrtError("this gallery cannot be opened")

    service = Service(None, options=ServeOptions(port=0, configure_logging=False), searcher=broken)
    with pytest.raises(ItmrtError, match="the service stopped: this gallery cannot be opened"):
        service.run()


# -- the command line -----------------------------------------------------------------


def test_query_prints_infer_jsonl(
    naaf: dict[str, Any], service: Service, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    captions = random_captions(5, seed=100)
    (tmp_path / "caps.txt").write_text("\n".join(captions) + "\n")
    token = ["--token-file", str(naaf["root"] / "token.txt")]
    result = run_cli(
        capsys, "query", service.url, "--captions", str(tmp_path / "caps.txt"), "--top-k", "3", "--batch", "2", *token
    )
    assert result.code == 0, result.err
    rows = [json.loads(line) for line in result.out.splitlines()]
    want = expected(naaf, captions, 3)
    assert [row["index"] for row in rows] == list(range(5)) and [row["caption"] for row in rows] == captions
    assert [row["images"] for row in rows] == want.indices.tolist()
    np.testing.assert_allclose([row["scores"] for row in rows], want.scores, atol=1e-6)
    result = run_cli(
        capsys,
        "query",
        service.url,
        "--captions",
        str(tmp_path / "caps.txt"),
        "--out",
        str(tmp_path / "r.jsonl"),
        *token,
    )
    assert result.code == 0 and len((tmp_path / "r.jsonl").read_text().splitlines()) == 5
    result = run_cli(capsys, "query", service.url, "--captions", str(tmp_path / "caps.txt"))
    assert result.code == 2 and "answered 401" in result.err and result.err.count("\n") == 1


def test_ids_where_the_gallery_names_its_images(naaf: dict[str, Any]) -> None:
    names = [f"images/{i:03d}.jpg" for i in range(40)]

    def named() -> Any:
        from itmrt.serve.searcher import RuntimeSearcher

        runtime = load(naaf["bundle"], scorer="graph")
        return RuntimeSearcher(runtime, runtime.open_gallery(naaf["gallery"]), ids=names)

    captions = random_captions(2, seed=110)
    with running(Service(None, options=ServeOptions(port=0, configure_logging=False), searcher=named)) as live:
        for binary in (False, True):
            hits = ServiceClient(live.url, binary=binary).search(captions, 3)
            assert hits.ids is not None and hits.ids.tolist() == [[names[i] for i in row] for row in hits.indices]


def test_serve_errors_are_one_line(naaf: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = [
        (["serve", str(naaf["bundle"])], "pass --gallery"),
        (["serve", str(tmp_path / "missing")], "does not exist"),
        (["serve", str(naaf["gallery"]), "--token-file", str(tmp_path / "none.txt")], "token file"),
        (["serve", str(naaf["gallery"]), "--scorer", "fast"], "unknown scorer"),
    ]
    busy = bind_socket("127.0.0.1", 0)
    cases.append((["serve", str(naaf["gallery"]), "--port", str(busy.getsockname()[1])], "cannot listen"))
    with busy:
        for args, words in cases:
            result = run_cli(capsys, *args)
            assert result.code == 2 and words in result.err and result.err.count("\n") == 1, (args, result.err)


def test_serve_without_the_serve_extra_says_what_to_install(naaf: dict[str, Any]) -> None:
    script = (
        "import sys; sys.modules['starlette'] = sys.modules['uvicorn'] = None\n"
        f"from itmrt.cli.app import main\nmain(['serve', {str(naaf['gallery'])!r}])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 2 and "pip install 'itmrt[serve]'" in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1


def test_sigterm_answers_requests_in_flight_and_exits_zero(naaf: dict[str, Any], tmp_path: Path) -> None:
    """A subprocess server; SIGTERM while queued requests wait: every one is answered, exit status 0."""
    from runtime_helpers import region_features

    gallery = make_gallery(naaf["bundle"], tmp_path / "big", region_features(500, seed=5))
    args = ["serve", str(gallery), "--port", "0", "--scorer", "graph"]
    args += ["--max-batch-captions", "32", "--max-delay-ms", "0"]
    # torch-free, as on an edge board: the service never imports it
    script = f"import sys; sys.modules['torch'] = None\nfrom itmrt.cli.app import main\nmain({args!r})\n"
    server = start_server_process(script)
    try:
        url = wait_until_ready(server)
        captions = [random_captions(32, seed=120 + i) for i in range(8)]

        def search(caps: list[str]) -> tuple[Any, float]:
            hits = ServiceClient(url).search(caps, 5)
            return hits, time.monotonic()

        with ThreadPoolExecutor(len(captions)) as pool:
            futures = [pool.submit(search, caps) for caps in captions]
            wait(futures, return_when=FIRST_COMPLETED)  # one batch answered, seven more queued or being scored
            signalled = time.monotonic()
            server.send_signal(signal.SIGTERM)
            finished = [future.result(120) for future in futures]
        assert server.wait(120) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert all(hits.indices.shape == (32, 5) for hits, _ in finished)
    assert sum(at > signalled for _, at in finished) >= 1, "no request was still in flight at SIGTERM"
    runtime = load(naaf["bundle"], scorer="graph")
    want = runtime.search_text_to_image(captions[-1], runtime.open_gallery(gallery), k=5)
    np.testing.assert_array_equal(finished[-1][0].indices, want.indices)
    with pytest.raises(ItmrtError, match="cannot reach"):
        ServiceClient(url).search(["word1"])


# -- the protocol codec -------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    # Captions with at least one non-blank character and no control character: a blank one is refused
    # (tests/test_serve_faults.py), and one holding a control character (test_every_error_status).
    st.lists(st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=30).filter(str.strip), min_size=1,
             max_size=12),
    st.integers(1, 40),
    st.booleans(),
)
def test_request_and_response_round_trip(captions: list[str], k: int, binary: bool) -> None:
    from itmrt.serve.protocol import RequestLimits, infer_response, parse_infer_request, parse_infer_response

    body, headers = infer_request_body(captions, k, binary)
    request = parse_infer_request(body, headers.get(HEADER_LENGTH), RequestLimits(max_top_k=40, has_ids=True))
    assert request.captions == captions and request.top_k == k
    assert request.outputs == {"indices": binary, "scores": binary, "ids": binary}
    rng = np.random.default_rng(k)
    indices = rng.integers(0, 40, size=(len(captions), k))
    scores = rng.standard_normal((len(captions), k)).astype(np.float32)
    ids = [f"images/{i}.jpg" for i in range(40)]
    reply, reply_headers = infer_response(request, indices, scores, ids)
    tensors = parse_infer_response(reply, reply_headers.get(HEADER_LENGTH))
    np.testing.assert_array_equal(tensors["indices"], indices)
    np.testing.assert_array_equal(tensors["scores"], scores)
    assert tensors["ids"].tolist() == [[ids[i] for i in row] for row in indices]


def test_the_listening_socket_lets_asyncio_turn_nagle_off() -> None:
    """asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP; without it every kept-alive
    response waited ~40 ms for a delayed ACK."""
    import socket

    with bind_socket("127.0.0.1", 0) as listener, socket.create_connection(listener.getsockname()[:2]):
        accepted, _ = listener.accept()
        with accepted:
            assert accepted.proto == socket.IPPROTO_TCP
