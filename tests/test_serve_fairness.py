"""The fair, preemptible worker of `itmrt serve`: units, turns, admission by expected wait, who a caller is.

Real servers on 127.0.0.1 (a free port) over the small test NAAF; where a test needs the worker to be slow
enough to watch, its searcher is the runtime's own with a pause before each batch (:class:`Paced`): it still
scores every caption for real.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest

from itmrt.runtime import load
from itmrt.serve.batcher import BatchSettings
from itmrt.serve.client import ServiceClient
from itmrt.serve.fair import BatchCost, FairQueue
from itmrt.serve.http_app import caller_of
from itmrt.serve.searcher import RuntimeSearcher
from itmrt.serve.server import ServeOptions, Service

from runtime_helpers import make_bundle, random_captions
from serve_helpers import make_gallery, metric, running

INFER = "/v2/models/text_to_image/infer"


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("fairness")
    bundle = make_bundle(root / "model")[0]
    runtime = load(bundle, scorer="graph")
    gallery = make_gallery(bundle, root / "gallery")
    return {"bundle": bundle, "gallery": gallery, "runtime": runtime, "open": runtime.open_gallery(gallery)}


class Paced(RuntimeSearcher):
    """The runtime's searcher, pausing ``pause`` seconds before scoring each batch."""

    pause = 0.05

    def top_k(self, captions: Any, k: int) -> Any:
        time.sleep(self.pause)
        return super().top_k(captions, k)


def options(**batch: Any) -> ServeOptions:
    settings = {"max_batch_captions": 64, "max_delay_s": 0.0, **batch}
    return ServeOptions(port=0, configure_logging=False, scorer="graph", batch=BatchSettings(**settings),
                        caller_header="X-Caller")


def paced_service(model: dict[str, Any], **batch: Any) -> Service:
    return Service(None, options=options(**batch), searcher=lambda: Paced(model["runtime"], model["open"]))


def body(captions: list[str], top_k: int = 5) -> bytes:
    return json.dumps({"inputs": [{"name": "captions", "datatype": "BYTES", "shape": [len(captions)],
                                   "data": captions}], "parameters": {"top_k": top_k}}).encode()


def post(url: str, captions: list[str], caller: str, top_k: int = 5) -> tuple[httpx.Response, float]:
    """The response and the time.monotonic() it came back."""
    headers = {"Content-Type": "application/json", "X-Caller": caller}
    response = httpx.post(url + INFER, content=body(captions, top_k), headers=headers, timeout=120)
    return response, time.monotonic()


def indices(response: httpx.Response, rows: int) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.array(response.json()["outputs"][0]["data"]).reshape(rows, -1)


def scoring_started(service: Service, batches: float) -> None:
    deadline = time.monotonic() + 60
    while service.metrics.registry.get_sample_value("itmrt_batch_captions_count") <= batches:
        assert time.monotonic() < deadline, "the large request was never scored"
        time.sleep(0.005)


def test_a_request_split_in_units_answers_as_the_unsplit_one(model: dict[str, Any]) -> None:
    """The same 41 captions scored in units of 3 (14 batches) and whole: the same rows, the same scores (to float
    rounding: the scorer's matrix products round by batch shape, as they do for any batch), and the runtime's own
    answer."""
    captions = random_captions(41, seed=21, max_words=9)
    answers = {}
    for unit in (3, 64):
        with running(Service(model["gallery"], options=options(unit_captions=unit))) as live, \
                ServiceClient(live.url) as client:
            answers[unit] = client.search(captions, 6)
            page = client.request("GET", "/metrics")[2].decode()
            assert metric(page, "itmrt_batch_captions_count") == (14 if unit == 3 else 1)
    np.testing.assert_array_equal(answers[3].indices, answers[64].indices)
    np.testing.assert_allclose(answers[3].scores, answers[64].scores, rtol=0, atol=1e-6)
    want = model["runtime"].search_text_to_image(captions, model["open"], k=6)
    np.testing.assert_array_equal(answers[3].indices, want.indices)
    np.testing.assert_allclose(answers[3].scores, want.scores, atol=1e-6)


def test_a_one_caption_request_behind_a_256_caption_one_is_answered_before_it(model: dict[str, Any]) -> None:
    """Caller A's 256 captions (64 units of 4, 50 ms each at least) are being scored when caller B sends one
    caption: B's answer comes back after about one unit, long before A's; both answers are the runtime's.
    (--max-batch-captions 256: batches alone would score A's request in one go, B waiting for all of it.)"""
    heavy = random_captions(256, seed=22, max_words=8)
    light = random_captions(1, seed=23, max_words=8)
    with running(paced_service(model, max_batch_captions=256)) as live, ThreadPoolExecutor(2) as pool:
        before = live.metrics.registry.get_sample_value("itmrt_batch_captions_count")
        sent = time.monotonic()
        big = pool.submit(post, live.url, heavy, "A")
        scoring_started(live, before)
        small_sent = time.monotonic()
        small, small_done = post(live.url, light, "B")
        assert not big.done(), "the 256-caption request finished before the one-caption one"
        big_response, big_done = big.result(120)
    assert small_done - small_sent < 1.0 < big_done - sent  # about one unit against 64 units of >= 50 ms
    assert big_done > small_done
    runtime, gallery = model["runtime"], model["open"]
    np.testing.assert_array_equal(indices(small, 1), runtime.search_text_to_image(light, gallery, k=5).indices)
    np.testing.assert_array_equal(indices(big_response, 256),
                                  runtime.search_text_to_image(heavy, gallery, k=5).indices)


def test_a_caller_cannot_queue_its_own_work_in_front_and_its_refusals_are_held(model: dict[str, Any]) -> None:
    """With caller A's 256 captions being scored: caller B's single caption is answered while A's request still
    runs; A's next 250 captions pass its cap of queued captions (429 naming it); A's next single caption would
    wait behind A's own backlog, seconds over --max-wait-ms (429 saying so). A has work queued, so both refusals
    are held for Retry-After (1 s) before they are sent - a caller that ignores Retry-After cannot make the service
    refuse it thousands of times a second - and counted in itmrt_refusals_held_total."""
    heavy = random_captions(256, seed=24, max_words=8)
    with running(paced_service(model, max_caller_captions=300, max_wait_s=0.1)) as live, \
            ThreadPoolExecutor(1) as pool:
        before = live.metrics.registry.get_sample_value("itmrt_batch_captions_count")
        big = pool.submit(post, live.url, heavy, "A")
        scoring_started(live, before + 1)  # one unit measured: the worker knows what a batch costs
        other, _ = post(live.url, random_captions(1, seed=27), "B")
        assert other.status_code == 200 and not big.done()
        started = time.monotonic()
        capped, capped_at = post(live.url, random_captions(250, seed=25), "A")
        assert capped.status_code == 429 and "captions queued already" in capped.json()["error"]
        waiting, refused_at = post(live.url, random_captions(1, seed=26), "A")
        assert waiting.status_code == 429 and "would wait about" in waiting.json()["error"], waiting.text
        assert waiting.headers["retry-after"] == "1"
        assert capped_at - started >= 0.95 and refused_at - capped_at >= 0.95, "a refusal was not held"
        assert refused_at - started < 4.0
        assert big.result(120)[0].status_code == 200
        assert live.metrics.refused_wait._value.get() == 1
        assert live.metrics.refusals_held._value.get() == 2


def test_a_light_callers_request_is_batched_without_a_heavy_callers_backlog(model: dict[str, Any]) -> None:
    """While caller A has 24 one-caption requests queued (as 24 connections behind one proxy name), caller B's
    one caption goes next and in a batch of its own: three of A's requests would make B's batch four captions
    long (about twice as long to score). A's requests are batched four at a time (0.25 s a batch here); B is
    answered before A is done. (At 0.1 s a batch, B's request, delayed 0.3 s on a loaded machine, could find A
    down to its last unit, which the rule lets join a light batch: twice in a day's full-suite runs.)"""
    class Slower(Paced):
        pause = 0.25

    service = Service(None, options=options(max_wait_s=0.0), searcher=lambda: Slower(model["runtime"], model["open"]))
    with running(service) as live, ThreadPoolExecutor(24) as pool:
        def one_caption_batches() -> float:
            return live.metrics.registry.get_sample_value("itmrt_batch_captions_bucket", {"le": "1.0"})

        before = live.metrics.registry.get_sample_value("itmrt_batch_captions_count")
        heavy = [pool.submit(post, live.url, random_captions(1, seed=40 + n), "A") for n in range(24)]
        scoring_started(live, before + 1)
        # A's backlog is in the queue before B sends (on a loaded machine A's 24 connections arrive over time, and
        # a caller with one unit queued is light too: its unit may join B's batch by the rule under test)
        deadline = time.monotonic() + 60
        while live.metrics.registry.get_sample_value("itmrt_queue_depth") < 12:
            assert time.monotonic() < deadline, "A's requests never queued"
            time.sleep(0.002)
        ones = one_caption_batches()
        light, _ = post(live.url, random_captions(1, seed=32), "B")
        assert light.status_code == 200 and not all(future.done() for future in heavy)
        assert one_caption_batches() == ones + 1, "B's caption was batched with A's backlog"
        assert all(future.result(120)[0].status_code == 200 for future in heavy)


def test_many_connections_of_one_remote_address_are_one_caller() -> None:
    """Who a caller is: a named header where the operator trusts one; else a remote address (an IPv6 peer's
    /64); else, on loopback, the connection."""
    from starlette.requests import Request

    def request(host: str, port: int, headers: dict[str, str] | None = None) -> Request:
        raw = [(key.lower().encode(), value.encode()) for key, value in (headers or {}).items()]
        return Request({"type": "http", "client": (host, port), "headers": raw})

    assert caller_of(request("10.1.2.3", 5000)) == caller_of(request("10.1.2.3", 6000))
    assert caller_of(request("10.1.2.3", 5000)) != caller_of(request("10.1.2.4", 5000))
    assert caller_of(request("2001:db8::1", 5000)) == caller_of(request("2001:db8::ffff", 6000))
    assert caller_of(request("127.0.0.1", 5000)) != caller_of(request("127.0.0.1", 6000))
    assert caller_of(request("::1", 5000)) != caller_of(request("::1", 6000))
    named = {"X-Caller": "team-a"}
    assert caller_of(request("127.0.0.1", 5000, named), "X-Caller") == \
        caller_of(request("127.0.0.1", 6000, named), "X-Caller")
    assert caller_of(request("127.0.0.1", 5000, named)) != caller_of(request("127.0.0.1", 6000, named))


def test_fair_queue_counts_requests_and_captions_per_caller() -> None:
    class Unit:
        def __init__(self, captions: int, caller: str) -> None:
            self.captions, self.caller = ["c"] * captions, caller

    queue = FairQueue()
    for number in range(4):
        queue.push(Unit(4, "heavy"), first=number == 0)
    assert queue.requests == 1 and queue.queued_by("heavy") == 16 and len(queue) == 4
    assert queue.ahead("light", 1) == 0 and queue.ahead("heavy", 1) == 16
    queue.push(Unit(1, "light"))
    assert queue.pop().caller == "light" and queue.requests == 1
    queue.pop()
    assert queue.requests == 0 and queue.queued_by("heavy") == 12


def test_a_closed_loop_light_caller_goes_next_whatever_its_rate() -> None:
    """Twenty callers each queue a 20-caption request in units of 4; a light caller sends one caption, gets it
    answered, sends the next (closed loop) thirty times: each time it is next, though it has been served more
    captions than any heavy caller - shares are between callers with work waiting."""
    class Unit:
        def __init__(self, captions: int, caller: str) -> None:
            self.captions, self.caller = ["c"] * captions, caller

    queue = FairQueue()
    for number in range(20):
        for part in range(5):
            queue.push(Unit(4, f"heavy{number}"), first=part == 0)
    for _ in range(30):
        queue.pop()  # a heavy unit is scored meanwhile
        queue.push(Unit(1, "light"))
        assert queue.ahead("light", 1) == 1 and queue.pop().caller == "light"


def test_batch_cost_learns_a_fixed_part_and_a_part_per_caption() -> None:
    cost = BatchCost(weight=1.0)
    assert cost.seconds(10) == 0.0  # nothing measured: nothing refused
    cost.observe(1, 0.025)
    cost.observe(4, 0.055)
    assert cost.seconds(1) == pytest.approx(0.025) and cost.seconds(4) == pytest.approx(0.055)
    assert cost.queue_seconds(8, 4) == pytest.approx(0.110)


def test_a_deadline_shorter_than_the_expected_wait_is_refused_not_answered_late(model: dict[str, Any]) -> None:
    """A request whose own timeout is shorter than its expected wait is refused (429), not answered 504 after
    waiting; its caller has work queued, so the refusal is held for Retry-After (1 s), not longer."""
    heavy = random_captions(256, seed=28, max_words=8)
    with running(paced_service(model, max_wait_s=0.0)) as live, ThreadPoolExecutor(1) as pool:
        before = live.metrics.registry.get_sample_value("itmrt_batch_captions_count")
        big = pool.submit(post, live.url, heavy, "A")
        scoring_started(live, before + 1)
        document = json.loads(body(random_captions(1, seed=29)))
        document["parameters"]["timeout"] = 200_000  # 0.2 s
        started = time.monotonic()
        response = httpx.post(live.url + INFER, content=json.dumps(document),
                              headers={"Content-Type": "application/json", "X-Caller": "A"}, timeout=60)
        assert response.status_code == 429 and "its timeout" in response.json()["error"]
        assert 0.95 <= time.monotonic() - started < 3.0
        assert big.result(120)[0].status_code == 200


def test_threads_submitting_together_all_get_an_answer_or_a_refusal(model: dict[str, Any]) -> None:
    """Twenty-four callers at once against a worker paced to 100 ms a batch, with a 100 ms bound: each gets 200
    (the runtime's answer) or 429 at once; at least one of each."""
    captions = random_captions(1, seed=30)
    want = model["runtime"].search_text_to_image(captions, model["open"], k=5).indices

    class Slower(Paced):
        pause = 0.1

    service = Service(None, options=options(max_wait_s=0.1), searcher=lambda: Slower(model["runtime"], model["open"]))
    with running(service) as live, ThreadPoolExecutor(24) as pool:
        post(live.url, captions, "warm")  # one batch measured
        barrier = threading.Barrier(24)

        def one(number: int) -> tuple[int, float, Any]:
            barrier.wait()
            started = time.monotonic()
            response, done = post(live.url, captions, f"caller{number}")
            return response.status_code, done - started, response

        results = list(pool.map(one, range(24)))
        page = httpx.get(live.url + "/metrics").text
    statuses = [status for status, _s, _r in results]
    assert set(statuses) == {200, 429}, statuses
    for status, _seconds, response in results:
        if status == 200:
            np.testing.assert_array_equal(indices(response, 1), want)
        else:
            assert "would wait about" in response.json()["error"]
    # Refused at once: never queued, never scored - the worker scored the warm-up and the answered ones only.
    assert metric(page, "itmrt_refused_wait_total") == statuses.count(429)
    assert metric(page, "itmrt_refusals_held_total") == 0  # none had work queued: no refusal was held
    assert metric(page, "itmrt_batch_captions_sum") == 1 + statuses.count(200)


def test_a_refusal_closes_its_connection_so_a_pipeline_behind_it_is_not_read(model: dict[str, Any]) -> None:
    """A client pipelining requests it does not wait for (the fault benchmark's non-readers sent fifty each) had
    every one read, parsed and refused on the event loop, a thousand in a burst. A refusal (429) now closes its
    connection: one answer comes back, then the end of the stream, and the requests behind it are never counted."""
    import socket
    from urllib.parse import urlsplit

    heavy = random_captions(256, seed=31, max_words=8)
    with running(paced_service(model, max_caller_captions=300, max_wait_s=0.1)) as live, \
            ThreadPoolExecutor(1) as pool:
        before = live.metrics.registry.get_sample_value("itmrt_batch_captions_count")
        big = pool.submit(post, live.url, heavy, "A")
        scoring_started(live, before + 1)  # A's backlog is queued: A's next caption would wait seconds
        refused_before = live.metrics.refused_wait._value.get()
        one = body(random_captions(1, seed=32))
        request = (f"POST /v2/models/text_to_image/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Caller: A\r\n"
                   f"Content-Type: application/json\r\nContent-Length: {len(one)}\r\n\r\n").encode() + one
        address = urlsplit(live.url)
        with socket.create_connection((address.hostname, address.port), timeout=30) as connection:
            connection.sendall(request * 5)
            received = b""
            while chunk := connection.recv(65536):
                received += chunk
        assert received.startswith(b"HTTP/1.1 429") and received.count(b"HTTP/1.1 ") == 1, received[:300]
        assert b"connection: close" in received.lower()
        assert live.metrics.refused_wait._value.get() == refused_before + 1
        assert big.result(120)[0].status_code == 200
