"""`itmrt serve` against hostile clients and live file faults: a real uvicorn server on 127.0.0.1 (a free port).

Each class of the service's threat model has a test here: client faults that
must be 4xx with one reason and no error in the log (deep JSON, huge integers,
a timeout past uint64, unknown keys, a client that leaves mid-body), browser
reachability (Host, Origin, CORS, Content-Type), transport deadlines (slow
headers, stalled bodies, clients that do not read, connection eviction, the
body budget), the answer cap, fair queueing, a gallery file truncated or
changed in place under the service, non-finite scores, hot swap under load, and
SIGTERM with unread answers (a subprocess server).
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from itmrt.runtime import load
from itmrt.serve.batcher import BatchSettings, FairQueue, Job
from itmrt.serve.client import ServiceClient, ServiceError
from itmrt.serve.http_app import HttpLimits
from itmrt.serve.searcher import RuntimeSearcher
from itmrt.serve.server import ServeOptions, Service

from runtime_helpers import make_bundle, random_captions, region_features
from serve_helpers import make_gallery, metric, running, start_server_process, wait_until_ready

REPO = Path(__file__).resolve().parents[1]
INFER = "/v2/models/text_to_image/infer"
JSON = {"Content-Type": "application/json"}
QUICK = HttpLimits(header_timeout_s=0.5, body_timeout_s=0.5, write_timeout_s=0.5, max_buffered_bytes=200_000,
                   max_answer=50)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("faults")
    bundle = make_bundle(root / "model")[0]
    runtime = load(bundle, scorer="graph")
    return {"root": root, "bundle": bundle, "gallery": make_gallery(bundle, root / "gallery"), "runtime": runtime}


def options(**extra: Any) -> ServeOptions:
    settings = {"port": 0, "configure_logging": False, "scorer": "graph", "limits": QUICK, "watch_s": 0.1,
                "batch": BatchSettings(max_batch_captions=64, max_delay_s=0.0)}
    return ServeOptions(**{**settings, **extra})


@pytest.fixture(scope="module")
def service(model: dict[str, Any]) -> Any:
    with running(Service(model["gallery"], options=options(max_connections=6))) as live:
        yield live


def body(captions: list[str], **parameters: Any) -> bytes:
    document: dict[str, Any] = {"inputs": [{"name": "captions", "datatype": "BYTES", "shape": [len(captions)],
                                            "data": captions}]}
    if parameters:
        document["parameters"] = parameters
    return json.dumps(document).encode()


def one_line(response: httpx.Response, status: int, words: str) -> None:
    assert response.status_code == status, response.text
    message = response.json()["error"]
    assert words in message and "\n" not in message and "/tmp" not in message, message


def raw(service: Service, data: bytes) -> socket.socket:
    sock = socket.create_connection((service.host, service.port), timeout=10)
    sock.sendall(data)
    return sock


def closed_within(sock: socket.socket, seconds: float) -> bytes:
    """What the server sent before it closed ``sock``; fails if it is still open after ``seconds``."""
    sock.settimeout(seconds)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except TimeoutError:
        pytest.fail(f"the connection was still open after {seconds} s")
    except ConnectionResetError:
        pass
    return received


# -- client faults ------------------------------------------------------------------------


def test_client_faults_are_4xx_counted_and_not_logged(service: Service, caplog: pytest.LogCaptureFixture) -> None:
    client = httpx.Client(base_url=service.url, headers=JSON, timeout=30)
    before = client.get("/metrics").text
    good = json.loads(body(["word1"]))
    cases = {
        # (quotes all along: a long run without one is refused from its start, test_a_body_no_request_can_be_...)
        "deep": (b'[""' + b',[""' * 40_000, "nested too deeply"),
        "digits": (b'{"inputs": [], "parameters": {"top_k": ' + b"9" * 5000 + b"}}", "too many digits"),
        "timeout": (body(["word1"], timeout=10**400), "timeout must be a positive integer"),
        "junk": (json.dumps({**good, "junk": "x" * 1000}).encode(), "unknown key 'junk'"),
        "tensor junk": (json.dumps({"inputs": [{**good["inputs"][0], "extra": 1}]}).encode(), "unknown key 'extra'"),
        "parameter junk": (body(["word1"], top_k=2, evil=True), "unknown key 'evil'"),
        "answer": (body(["word1"] * 6, top_k=10), "over the answer limit of 50 (--max-answer)"),
        "repeated key": (b'{"inputs": [], "inputs": ' + json.dumps(good["inputs"]).encode() + b"}",
                         "repeats the key 'inputs'"),
        "empty caption": (body(["word1", " \t "]), "caption 1 is empty"),
        # an output's binary_data "no" (or 1) answered in binary, and parameters [..] were ignored
        "output binary_data": (json.dumps({**good, "outputs": [{"name": "scores", "parameters": {"binary_data": "no"}}]}
                                          ).encode(), "binary_data of output 'scores' must be true or false, not 'no'"),
        "output parameters": (json.dumps({**good, "outputs": [{"name": "scores", "parameters": [True]}]}).encode(),
                              "the parameters of output 'scores' must be a JSON object"),
        # the input's parameters as a list or a string were ignored, and an output named twice answered once
        "input parameters": (json.dumps({"inputs": [{**good["inputs"][0], "parameters": ["binary_data_size", 9]}]}
                                        ).encode(), "the parameters of input 'captions' must be a JSON object"),
        "output twice": (json.dumps({**good, "outputs": [{"name": "scores"}, {"name": "scores", "parameters": {
            "binary_data": True}}]}).encode(), "output 'scores' is asked for twice"),
        # an empty list of outputs was answered with no outputs at all
        "no outputs": (json.dumps({**good, "outputs": []}).encode(), "'outputs' is empty; name the outputs"),
    }
    with caplog.at_level(logging.INFO, logger="itmrt"):
        for content, words in cases.values():
            one_line(client.post(INFER, content=content), 400, words)
        # A client that leaves mid-body: no answer to give, no error logged, counted as 499.
        partial = raw(service, b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                      b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"inputs\"")
        time.sleep(0.1)
        partial.close()
        deadline = time.monotonic() + 10
        while metric(client.get("/metrics").text, "itmrt_client_errors_total", 'status="499"') < 1:
            assert time.monotonic() < deadline, "the disconnect was never counted"
            time.sleep(0.05)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
    after = client.get("/metrics").text
    assert metric(after, "itmrt_client_errors_total", 'status="400"') - \
        metric(before, "itmrt_client_errors_total", 'status="400"') == len(cases)
    assert metric(after, "itmrt_client_errors_total", 'status="499"') - \
        metric(before, "itmrt_client_errors_total", 'status="499"') == 1
    assert metric(after, "itmrt_server_errors_total") == 0
    assert client.post(INFER, content=body(["word1"], top_k=3)).status_code == 200


def test_a_compressed_body_cut_short_or_followed_by_more_is_refused(service: Service) -> None:
    """A gzip body whose stream ended early (its trailer and checksum missing) was answered from what it held; one
    with more bytes after its stream's end was answered from the first stream, the rest dropped unseen."""
    whole = gzip.compress(body(["word1 word2"]))
    for content in (whole[:-8], whole + b"trailing", whole + gzip.compress(b"{}")):
        answer = httpx.post(service.url + INFER, content=content, headers={**JSON, "Content-Encoding": "gzip"})
        one_line(answer, 400, "not one whole gzip stream")
    long_method = httpx.request("X" * 3000, service.url + "/v2")
    one_line(long_method, 405, "no such endpoint: " + "X" * 20 + " /v2")
    assert len(long_method.text) < 200
    ok = httpx.post(service.url + INFER, content=whole, headers={**JSON, "Content-Encoding": "gzip"})
    assert ok.status_code == 200, ok.text


def test_a_client_cannot_fill_the_log(service: Service, caplog: pytest.LogCaptureFixture) -> None:
    """Malformed HTTP, an upgrade nobody speaks, captions of unknown words: each was one log line per request, so a
    client filled the log as fast as it sent. Now each kind is logged at most once a minute."""
    upgrade = (b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    with caplog.at_level(logging.INFO):
        for _ in range(15):
            assert closed_within(raw(service, b"GET / HTTP/1.1\r\nX Bad: 1\r\n\r\n"), 5).startswith(b"HTTP/1.1 400")
            sock = raw(service, upgrade)
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
            sock.close()
            answer = httpx.post(service.url + INFER, content=body(["nothing known here"]), headers=JSON, timeout=30)
            assert answer.status_code == 200
    lines = [record.getMessage() for record in caplog.records]
    for words in ("Invalid HTTP request", "Unsupported upgrade", "WebSocket library", "not in the vocabulary"):
        assert len([line for line in lines if words in line]) <= 1, lines


# -- browser safety -------------------------------------------------------------------------


def test_browser_requests_are_refused(service: Service) -> None:
    client = httpx.Client(base_url=service.url, timeout=30)
    good = body(["word1"])
    one_line(client.post(INFER, content=good, headers={**JSON, "Host": "evil.example"}), 403, "--allowed-hosts")
    one_line(client.get("/metrics", headers={"Host": "rebind.attacker.test:8000"}), 403, "Host")
    one_line(client.post(INFER, content=good, headers={**JSON, "Origin": "https://evil.example"}), 403,
             "--cors-origin")
    one_line(client.post(INFER, content=good, headers={"Content-Type": "text/plain"}), 415, "Content-Type")
    one_line(client.post(INFER, content=good), 415, "Content-Type")  # none, and nothing a page could not send
    assert client.options(INFER, headers={"Origin": "https://evil.example"}).status_code == 403
    response = client.post(INFER, content=good, headers=JSON)
    assert response.status_code == 200 and "access-control-allow-origin" not in response.headers
    # Probes answer whatever the Host (orchestrators probe by address); so do loopback names.
    assert client.get("/v2/health/ready", headers={"Host": "10.1.2.3:8000"}).status_code == 200
    assert client.post(INFER, content=good, headers={**JSON, "Host": f"localhost:{service.port}"}).status_code == 200
    assert client.post(INFER, content=good, headers={**JSON, "Host": f"[::1]:{service.port}"}).status_code == 200


def test_allowed_hosts_cors_origin_and_token_file_warning(model: dict[str, Any], tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    token = tmp_path / "token.txt"
    token.write_text("secret\n")
    token.chmod(0o644)
    origin = "https://app.example.com"
    settings = options(allowed_hosts=("search.example.com",), cors_origins=(origin,), token_file=token)
    with caplog.at_level(logging.WARNING, logger="itmrt"), running(Service(model["gallery"], options=settings)) as live:
        client = httpx.Client(base_url=live.url, timeout=30, headers={"Authorization": "Bearer secret"})
        headers = {**JSON, "Host": "search.example.com", "Origin": origin}
        answer = client.post(INFER, content=body(["word1"]), headers=headers)
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == origin
        preflight = client.options(INFER, headers={"Origin": origin, "Access-Control-Request-Method": "POST"})
        assert preflight.status_code == 204 and "Authorization" in preflight.headers["access-control-allow-headers"]
        assert client.post(INFER, content=body(["word1"]), headers={**JSON, "Host": "other.example.com"}
                           ).status_code == 403
        # A token forces a browser's preflight: tritonclient's requests carry no Content-Type and pass.
        assert client.post(INFER, content=body(["word1"])).status_code == 200
    warnings = [r.getMessage() for r in caplog.records]
    assert any("can be read by its group and others" in line and "chmod 600" in line for line in warnings)


# -- transport deadlines and limits ------------------------------------------------------------


def test_slow_headers_stalled_bodies_and_non_readers_are_cut_off(service: Service) -> None:
    before = httpx.get(service.url + "/metrics").text
    slow = raw(service, b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never finishes
    started = time.monotonic()
    assert closed_within(slow, 5) == b"" and time.monotonic() - started < 3
    stalled = raw(service, b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  b"Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n{")
    answer = closed_within(stalled, 5)
    assert answer.startswith(b"HTTP/1.1 408") and b"--body-timeout-s" in answer
    # A client that asks for a large answer and never reads it: cut off once the socket buffer fills.
    big = json.dumps({"inputs": [{"name": "captions", "datatype": "BYTES", "shape": [1], "data": ["word1"]}],
                      "id": "x" * 250}).encode()
    default = service.socket.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    service.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # accepted sockets inherit it
    try:
        reader = socket.create_connection((service.host, service.port))
    finally:
        service.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, default)
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    request = (b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               b"Content-Length: " + str(len(big)).encode() + b"\r\n\r\n" + big)
    threading.Thread(target=reader.sendall, args=(request * 400,), daemon=True).start()  # answers pile up unread
    deadline = time.monotonic() + 20
    while metric(httpx.get(service.url + "/metrics").text, "itmrt_connections_dropped_total",
                 'reason="write_timeout"') <= metric(before, "itmrt_connections_dropped_total",
                                                     'reason="write_timeout"'):
        assert time.monotonic() < deadline, "a client that never read was never cut off"
        time.sleep(0.1)
    reader.close()
    after = httpx.get(service.url + "/metrics").text

    assert metric(after, "itmrt_connections_dropped_total", 'reason="header_timeout"') >= 1
    assert metric(after, "itmrt_client_errors_total", 'status="408"') >= 1
    assert httpx.post(service.url + INFER, content=body(["word2"]), headers=JSON).status_code == 200


def test_a_client_that_does_not_read_gets_no_more_work_done(model: dict[str, Any]) -> None:
    """400 pipelined requests behind unread answers: once the socket buffer is full no more are scored (uvicorn
    waits to write the next answer; the transport does not even take the next request up), and the write
    deadline cuts the connection off."""
    settings = options(limits=HttpLimits(write_timeout_s=3.0))
    with running(Service(model["gallery"], options=settings)) as live:
        live.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        reader = socket.create_connection((live.host, live.port))
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        one = body(["word1 word2"] * 4, top_k=40)
        request = (b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                   b"\r\nContent-Length: " + str(len(one)).encode() + b"\r\n\r\n" + one)
        threading.Thread(target=reader.sendall, args=(request * 400,), daemon=True).start()
        wait_for(lambda: live.metrics.dropped.labels("write_timeout")._value.get() >= 1, 60)
        reader.close()
        answered = live.metrics.requests.labels("ok")._value.get()
    assert answered < 200, f"{answered} of 400 pipelined requests were scored for a client that read none"


def test_a_non_reader_with_the_default_socket_buffers_gets_one_answer_scored(model: dict[str, Any]) -> None:
    """The kernel's send buffer on loopback holds megabytes (dozens of large answers) before the process sees
    any backpressure; an answer the client leaves in the kernel's queue counts as unread all the same: the
    next pipelined request is not taken up, and the write deadline cuts the connection off."""
    settings = options(limits=HttpLimits(write_timeout_s=2.0))
    with running(Service(model["gallery"], options=settings)) as live:
        reader = socket.create_connection((live.host, live.port))
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        one = body([f"word{n % 7} word{n % 5}" for n in range(200)], top_k=40)  # an answer of about 150 KB
        request = (b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                   b"\r\nContent-Length: " + str(len(one)).encode() + b"\r\n\r\n" + one)
        reader.sendall(request * 30)
        wait_for(lambda: live.metrics.dropped.labels("write_timeout")._value.get() >= 1, 60)
        reader.close()
        answered = live.metrics.requests.labels("ok")._value.get()
    assert answered <= 2, f"{answered} of 30 pipelined requests were scored for a client that read none"


def test_slow_connections_are_evicted_for_real_clients(service: Service) -> None:
    """Six slow-header connections fill --max-connections 6; a real client still gets its answer."""
    slow = [raw(service, b"GET /v2 HTTP/1.1\r\nHost: 127.0.0.1\r\n") for _ in range(6)]
    time.sleep(0.05)
    for _ in range(3):
        with ServiceClient(service.url) as client:
            assert client.search(["word3"], 2).indices.shape == (1, 2)
    for sock in slow:
        sock.close()
    assert metric(httpx.get(service.url + "/metrics").text, "itmrt_connections_dropped_total",
                  'reason="evicted"') >= 1


def test_bodies_held_across_connections_are_capped(service: Service) -> None:
    """Two stalled bodies announcing 120 KB each: the second passes the 200 KB budget and is refused at once."""
    head = (b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 120000\r\n\r\n{")
    first = raw(service, head)
    time.sleep(0.1)
    second = raw(service, head)
    answer = closed_within(second, 5)
    assert answer.startswith(b"HTTP/1.1 503") and b"--max-buffered-mb" in answer
    first.close()
    second.close()


def test_at_most_two_large_bodies_are_read_at_once(service: Service) -> None:
    """Three connections announce 90 KB bodies (no real request is over 64 KB) and stall: two are read (and cut at
    the body deadline), the third is refused at once (503) without a byte of its body read; a real request is
    answered meanwhile."""
    head = (b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 90000\r\n\r\n{")
    first, second = raw(service, head), raw(service, head)
    time.sleep(0.1)
    started = time.monotonic()
    third = raw(service, head)
    answer = closed_within(third, 5)
    assert answer.startswith(b"HTTP/1.1 503") and b"bodies over 64 KB already" in answer
    assert time.monotonic() - started < 0.4  # before the others' 0.5 s body deadline
    reply = httpx.post(service.url + INFER, content=body(["word1 word2"], top_k=2), headers=JSON)
    assert reply.status_code == 200
    for sock in (first, second):
        assert closed_within(sock, 5).startswith(b"HTTP/1.1 408")
    third.close()


def test_a_body_no_request_can_be_is_refused_from_its_start_and_its_refusal_held(service: Service) -> None:
    """A body announcing 150 KB whose first 20 KB hold no quote (one caption of 20 KB: no caption within
    --max-caption-bytes is that long even escaped) is refused with 400 once those bytes are in - the rest never
    sent, nor read - and the refusal is held for Retry-After (1 s), so a sender of such bodies cannot make the
    service refuse them as fast as it sends. Real requests with the longest captions, escaped in JSON or raw in
    the binary extension, are answered (control characters, six bytes each escaped, are read and refused)."""
    from itmrt.serve import protocol

    held = service.metrics.refusals_held._value.get()
    head = (b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 150000\r\n\r\n" + b'{"inputs": [{"name": "captions", "datatype": "BYTES", '
            b'"shape": [1], "data": ["' + b"word " * 4000)
    started = time.monotonic()
    answer = closed_within(raw(service, head), 5)
    assert answer.startswith(b"HTTP/1.1 400") and b"without a quote" in answer, answer[:300]
    assert 0.95 <= time.monotonic() - started < 3.0
    assert service.metrics.refusals_held._value.get() == held + 1
    escaped = body(["\u0001" * 2048], top_k=2)  # json.dumps writes each as \u0001: 12 KB without a quote
    assert len(escaped) > 12_000
    answer = httpx.post(service.url + INFER, content=escaped, headers=JSON)  # read whole: refused for what it holds
    assert answer.status_code == 400 and "control character U+0001" in answer.json()["error"], answer.text
    escaped = body(["\u00e9" * 1024], top_k=2)  # the longest caption a request may hold, escaped: 6 KB
    assert httpx.post(service.url + INFER, content=escaped, headers=JSON).status_code == 200
    binary, headers = protocol.infer_request_body(["a" * 2000] * 10, 2, binary=True)  # 20 KB with no quote
    assert httpx.post(service.url + INFER, content=binary, headers=headers).status_code == 200


def test_fair_queue_serves_a_light_caller_before_a_heavy_backlog() -> None:
    queue = FairQueue()
    for number in range(5):
        queue.push(Job(["c"] * 64, 1, 0.0, caller="heavy"))
        assert number == 0 or len(queue) == number + 1
    queue.pop()  # the heavy caller's first batch is being scored
    queue.push(Job(["c"], 1, 0.0, caller="light"))
    assert queue.pop().caller == "light"
    assert [queue.pop().caller for _ in range(4)] == ["heavy"] * 4


def test_fair_queue_serves_a_one_caption_request_before_many_new_callers_large_ones() -> None:
    """Twenty callers (non-readers, say) each queue a 20-caption request; a well-behaved caller's one-caption
    request that comes after them is next, not twenty-first."""
    queue = FairQueue()
    for number in range(20):
        queue.push(Job(["c"] * 20, 1, 0.0, caller=f"heavy{number}"))
    queue.pop()  # one of them is being scored
    queue.push(Job(["c"], 1, 0.0, caller="light"))
    assert queue.pop().caller == "light"
    for _ in range(25):  # shares by captions: about twenty more captions of its own before the next large one
        queue.push(Job(["c"], 1, 0.0, caller="light"))
    served = [queue.pop().caller for _ in range(44)]
    assert served[:19] == ["light"] * 19 and served.count("light") == 25 and served[19] == "heavy1"


def test_the_client_reads_the_answer_a_server_gave_before_closing_mid_body() -> None:
    """A server refusing a body over its limit answers 413 and closes before reading the rest: the client's
    sending fails (broken pipe, reset), and `itmrt query` said "closed the connection ...; is `itmrt serve`
    still running?" (most of the time: a race) instead of the server's reason."""
    listener = socket.create_server(("127.0.0.1", 0))
    reason = b'{"error": "the request body is over the limit"}'

    def refuse_after_the_headers() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return  # closed: the test is over
            with connection:
                head = b""
                while b"\r\n\r\n" not in head and (chunk := connection.recv(65536)):
                    head += chunk
                connection.sendall(b"HTTP/1.1 413 Payload Too Large\r\nContent-Type: application/json\r\n"
                                   b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(reason), reason))

    threading.Thread(target=refuse_after_the_headers, daemon=True).start()
    try:
        with ServiceClient(f"http://127.0.0.1:{listener.getsockname()[1]}", timeout_s=10) as client:
            with pytest.raises(ServiceError, match="answered 413: the request body is over the limit"):
                client.search(["word1 " * (1 << 20)])
    finally:
        listener.close()


# -- the gallery under the service ------------------------------------------------------------------


def expected(model: dict[str, Any], gallery: Path, captions: list[str], k: int) -> Any:
    runtime = model["runtime"]
    return runtime.search_text_to_image(captions, runtime.open_gallery(gallery), k=k)


def wait_for(condition: Any, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_truncated_and_modified_gallery_files_change_nothing(model: dict[str, Any], tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    gallery = tmp_path / "gallery"
    shutil.copytree(model["gallery"], gallery)
    captions = random_captions(3, seed=5)
    want = expected(model, gallery, captions, 5)
    embeddings = gallery / "image_embeddings.npy"
    with caplog.at_level(logging.INFO, logger="itmrt"), running(Service(gallery, options=options())) as live, \
            ServiceClient(live.url) as client:
        np.testing.assert_array_equal(client.search(captions, 5).indices, want.indices)
        data = bytearray(embeddings.read_bytes())
        data[-4000:-3996] = np.float32(1e30).tobytes()  # in place: same inode
        with open(embeddings, "r+b") as handle:
            handle.write(data)
        wait_for(lambda: live.metrics.swaps.labels("refused")._value.get() >= 1)
        np.testing.assert_array_equal(client.search(captions, 5).indices, want.indices)
        os.truncate(embeddings, 1000)
        wait_for(lambda: live.metrics.swaps.labels("refused")._value.get() >= 2)
        hits = client.search(captions, 5)
        np.testing.assert_array_equal(hits.indices, want.indices)
        assert client.ready()
    refused = [r.getMessage() for r in caplog.records if "new version refused" in r.getMessage()]
    assert len(refused) >= 2 and all("\n" not in line for line in refused)
    assert any("does not match the sha256" in line for line in refused)


def test_a_version_with_a_fifo_is_refused_and_a_later_good_one_swapped_in(model: dict[str, Any], tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    """A new version whose embeddings are a pipe: opening it must not wait for a writer (which jammed every later
    swap and kept SIGTERM from ending the process); it is refused, and the next good version is served."""
    gallery = tmp_path / "gallery"
    shutil.copytree(model["gallery"], gallery)
    captions = random_captions(3, seed=5)
    want = expected(model, gallery, captions, 5)
    with caplog.at_level(logging.INFO, logger="itmrt"), running(Service(gallery, options=options())) as live, \
            ServiceClient(live.url) as client:
        np.testing.assert_array_equal(client.search(captions, 5).indices, want.indices)
        piped = tmp_path / "piped"
        shutil.copytree(model["gallery"], piped)
        (piped / "image_embeddings.npy").unlink()
        os.mkfifo(piped / "image_embeddings.npy")
        gallery.rename(tmp_path / "old")
        piped.rename(gallery)
        wait_for(lambda: live.metrics.swaps.labels("refused")._value.get() >= 1)
        np.testing.assert_array_equal(client.search(captions, 5).indices, want.indices)
        gallery.rename(tmp_path / "piped-out")
        shutil.copytree(model["gallery"], gallery)
        wait_for(lambda: live.metrics.swaps.labels("ok")._value.get() >= 1)
        np.testing.assert_array_equal(client.search(captions, 5).indices, want.indices)
    refused = [r.getMessage() for r in caplog.records if "new version refused" in r.getMessage()]
    assert refused and "not a regular file" in refused[0] and "\n" not in refused[0]


def test_non_finite_scores_mark_the_service_not_ready(model: dict[str, Any]) -> None:
    runtime = load(model["bundle"], scorer="graph")
    gallery = runtime.open_gallery(model["gallery"])
    broken = np.array(gallery.embeddings)
    broken[7, 0, 0] = np.nan
    gallery.embeddings = broken

    def searcher() -> RuntimeSearcher:
        return RuntimeSearcher(runtime, gallery)

    class LateBreak(RuntimeSearcher):
        def warmup(self) -> float:  # the warm-up does not see it: the NaN is in place only when serving
            return 0.0

    with running(Service(None, options=options(), searcher=lambda: LateBreak(runtime, gallery))) as live:
        response = httpx.post(live.url + INFER, content=body(["word1 word2"], top_k=3), headers=JSON)
        one_line(response, 503, "image 7")
        ready = httpx.get(live.url + "/v2/health/ready")
        assert ready.status_code == 503 and "NaN" in ready.json()["reason"]
    assert searcher().size == 40


def test_hot_swap_under_load_loses_nothing(model: dict[str, Any], tmp_path: Path) -> None:
    """Galleries swapped in turn (folder replaced six times, then a SIGHUP-equivalent reload) while four
    clients search: every answer is the exact answer of one whole version, ready all along."""
    versions = {}
    for number in range(3):
        folder = make_gallery(model["bundle"], tmp_path / f"v{number}", region_features(30 + number, seed=number))
        versions[json.loads((folder / "gallery.json").read_text())["embeddings"]["sha256"][:16]] = folder
    live_folder = tmp_path / "live"
    shutil.copytree(tmp_path / "v0", live_folder)
    captions = random_captions(2, seed=9)
    answers = {version: expected(model, folder, captions, 4).indices for version, folder in versions.items()}
    stop, failures, seen = threading.Event(), [], set()

    def client_loop() -> int:
        count = 0
        with httpx.Client(base_url=live.url, headers=JSON, timeout=30) as client:
            while not stop.is_set():
                reply = client.post(INFER, content=body(captions, top_k=4))
                ready = client.get("/v2/health/ready").status_code
                if reply.status_code != 200 or ready != 200:
                    failures.append((reply.status_code, ready, reply.text[:200]))
                    continue
                document = reply.json()
                version = document["parameters"]["gallery_sha256"]
                indices = np.array(document["outputs"][0]["data"]).reshape(2, 4)
                if not np.array_equal(indices, answers[version]):
                    failures.append(("wrong answer", version))
                seen.add(version)
                count += 1
        return count

    with running(Service(live_folder, options=options(watch_s=0.05))) as live, ThreadPoolExecutor(4) as pool:
        clients = [pool.submit(client_loop) for _ in range(4)]
        for swap in range(6):
            source = tmp_path / f"v{(swap + 1) % 3}"
            staging = tmp_path / f"staging{swap}"
            shutil.copytree(source, staging)
            old = tmp_path / f"old{swap}"
            os.rename(live_folder, old)
            os.rename(staging, live_folder)
            wait_for(lambda s=swap: live.metrics.swaps.labels("ok")._value.get() >= s + 1)
        reloaded = live.reloader.reload("SIGHUP").result(60)  # what the SIGHUP handler calls
        assert reloaded.error is None and reloaded.version in versions
        stop.set()
        answered = sum(future.result(60) for future in clients)
    assert not failures, failures[:5]
    assert answered > 20 and len(seen) == 3


def test_a_version_swapped_out_is_freed(model: dict[str, Any], tmp_path: Path) -> None:
    """Every version swapped out - the first one too - is gone once the next answers: nothing in the service keeps
    its gallery (its embeddings' copy) alive. The first version used to stay for the process's life, held by a
    local variable of the worker's loop (one gallery's worth of resident memory after any number of swaps)."""
    import gc
    import weakref

    live_folder = tmp_path / "live"
    shutil.copytree(model["gallery"], live_folder)
    make_gallery(model["bundle"], tmp_path / "new", region_features(33, seed=8))
    with running(Service(live_folder, options=options(watch_s=0))) as live, ServiceClient(live.url) as client:
        assert client.search(["word1"], 3).indices.max() < 40
        gone = []
        for swap in range(2):
            old = weakref.ref(live.batcher.searcher.gallery)  # type: ignore[union-attr]
            shutil.rmtree(live_folder)
            shutil.copytree(tmp_path / "new" if swap == 0 else model["gallery"], live_folder)
            assert live.reloader.reload("SIGHUP").result(60).error is None
            client.search(["word1"], 3)  # a batch on the new version
            client.search(["word1"], 3)
            gc.collect()
            gone.append(old() is None)
        assert gone == [True, True], "a version swapped out is still alive"


def test_sighup_swaps_in_the_gallery_written_in_place(model: dict[str, Any], tmp_path: Path) -> None:
    """--watch-s 0: only SIGHUP looks at the folder; a subprocess server."""
    live_folder = tmp_path / "live"
    shutil.copytree(model["gallery"], live_folder)
    new = make_gallery(model["bundle"], tmp_path / "new", region_features(33, seed=8))
    args = ["serve", str(live_folder), "--port", "0", "--scorer", "graph", "--watch-s", "0"]
    script = f"from itmrt.cli.app import main\nmain({args!r})\n"
    server = start_server_process(script)
    try:
        url = wait_until_ready(server)
        with ServiceClient(url) as client:
            assert client.search(["word1"], 3).indices.max() < 40
            for name in ("image_embeddings.npy", "gallery.json"):  # in place, the document last
                shutil.copyfile(new / name, live_folder / name)
            time.sleep(0.3)
            assert len(client.search(["word1"], 40).indices[0]) == 40  # not watched: still the old version
            server.send_signal(signal.SIGHUP)
            for line in server.stderr:  # type: ignore[union-attr]
                if "swapped in gallery" in line:
                    assert "SIGHUP" in line
                    break
            want = expected(model, new, ["word1"], 33)
            np.testing.assert_array_equal(client.search(["word1"], 33).indices, want.indices)
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_sigterm_with_unread_answers_exits_within_the_grace_period(model: dict[str, Any]) -> None:
    args = ["serve", str(model["gallery"]), "--port", "0", "--scorer", "graph", "--grace-s", "4",
            "--write-timeout-s", "30", "--max-answer", "100000"]
    script = f"from itmrt.cli.app import main\nmain({args!r})\n"
    server = start_server_process(script)
    sockets = []
    try:
        url = wait_until_ready(server)
        host, port = url.removeprefix("http://").split(":")
        request = body(["word1 word2"] * 40, top_k=40)
        head = (f"POST {INFER} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(request)}\r\n\r\n").encode()
        for _ in range(4):
            sock = socket.create_connection((host, int(port)))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall((head + request) * 200)  # answers pile up unread
            sockets.append(sock)
        time.sleep(1.0)
        signalled = time.monotonic()
        server.send_signal(signal.SIGTERM)
        server.wait(30)
        assert time.monotonic() - signalled < 4 + 2
    finally:
        for sock in sockets:
            sock.close()
        if server.poll() is None:
            server.kill()
            server.wait()


def test_swaps_follow_the_image_encoder_rule(model: dict[str, Any], tmp_path: Path) -> None:
    """A gallery re-indexed after its bundle's manifest grew keeps the loaded runtime; a gallery of another
    bundle loads that bundle (warmed up before its first answer); one whose bundle is gone is refused."""
    from itmrt.bundle.manifest import update_manifest

    bundle = tmp_path / "model"
    shutil.copytree(model["bundle"], bundle)
    other = make_bundle(tmp_path / "other", seed=3)[0]
    live_folder = make_gallery(bundle, tmp_path / "live")
    captions = random_captions(2, seed=11)
    with running(Service(live_folder, options=options(watch_s=0.05))) as live, ServiceClient(live.url) as client:
        first = live.batcher.searcher
        update_manifest(bundle, lambda manifest: setattr(manifest, "created", "engines were added here"))
        load(bundle, scorer="graph").index(region_features(25, seed=4), live_folder, overwrite=True)  # as index does
        wait_for(lambda: live.metrics.swaps.labels("ok")._value.get() >= 1)
        assert live.batcher.searcher.runtime is first.runtime and client.search(captions, 3).indices.shape == (2, 3)
        replace_folder(live_folder, make_gallery(other, tmp_path / "v2", region_features(22, seed=5)))
        wait_for(lambda: live.metrics.swaps.labels("ok")._value.get() >= 2)
        want = expected({"runtime": load(other, scorer="graph")}, live_folder, captions, 3)
        np.testing.assert_array_equal(client.search(captions, 3).indices, want.indices)
        gone = make_bundle(tmp_path / "gone", seed=4)[0]
        orphan = make_gallery(gone, tmp_path / "v3", region_features(20, seed=6))
        shutil.rmtree(gone)
        replace_folder(live_folder, orphan)
        wait_for(lambda: live.metrics.swaps.labels("refused")._value.get() >= 1)
        np.testing.assert_array_equal(client.search(captions, 3).indices, want.indices)


def test_a_new_bundle_warms_up_while_the_old_version_answers(model: dict[str, Any], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A gallery of another bundle: that bundle's runtime warms up on the reloader's thread, and the worker
    answers from the old version meanwhile. (Warmed on the worker between batches, every request waited for the
    whole warm-up: 20 s with the test bundle, 429/504 for a client with a deadline.) The real warm-up runs; it is
    only made to start 2 s late, so the window is wide enough to send a request into."""
    warming = threading.Event()
    warmup = RuntimeSearcher.warmup

    def late_warmup(self: RuntimeSearcher) -> float:
        if threading.current_thread().name == "itmrt-serve-reloader":
            warming.set()
            time.sleep(2.0)
        return warmup(self)

    monkeypatch.setattr(RuntimeSearcher, "warmup", late_warmup)
    other = make_bundle(tmp_path / "other", seed=3)[0]
    live_folder = make_gallery(model["bundle"], tmp_path / "live")
    captions = random_captions(2, seed=11)
    with running(Service(live_folder, options=options(watch_s=0.05))) as live, ServiceClient(live.url) as client:
        before = client.search(captions, 3)
        replace_folder(live_folder, make_gallery(other, tmp_path / "v2", region_features(22, seed=5)))
        assert warming.wait(30)
        started = time.monotonic()
        during = client.search(captions, 3)
        assert time.monotonic() - started < 1.0 and live.metrics.swaps.labels("ok")._value.get() == 0
        np.testing.assert_array_equal(during.indices, before.indices)
        wait_for(lambda: live.metrics.swaps.labels("ok")._value.get() >= 1)
        want = expected({"runtime": load(other, scorer="graph")}, live_folder, captions, 3)
        np.testing.assert_array_equal(client.search(captions, 3).indices, want.indices)


def test_a_new_bundle_that_fails_its_warm_up_is_refused_and_freed(model: dict[str, Any], tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A warm-up that fails (here made to, on the reloader's thread) refuses the version; the old one answers,
    and the runtime loaded for the new one is closed."""
    discarded: list[Any] = []
    discard = RuntimeSearcher.discard

    def failing_warmup(self: RuntimeSearcher) -> float:
        raise RuntimeError("no memory left for the new bundle")

    def recorded_discard(self: RuntimeSearcher) -> None:
        discarded.append(self.runtime)
        discard(self)

    live_folder = make_gallery(model["bundle"], tmp_path / "live")
    captions = random_captions(2, seed=11)
    with running(Service(live_folder, options=options(watch_s=0.05))) as live, ServiceClient(live.url) as client:
        before = client.search(captions, 3)
        monkeypatch.setattr(RuntimeSearcher, "warmup", failing_warmup)
        monkeypatch.setattr(RuntimeSearcher, "discard", recorded_discard)
        other = make_bundle(tmp_path / "other", seed=3)[0]
        replace_folder(live_folder, make_gallery(other, tmp_path / "v2", region_features(22, seed=5)))
        wait_for(lambda: live.metrics.swaps.labels("refused")._value.get() >= 1)
        np.testing.assert_array_equal(client.search(captions, 3).indices, before.indices)
        assert len(discarded) == 1 and discarded[0] is not live.batcher.searcher.runtime


def replace_folder(target: Path, new: Path) -> None:
    """Swap ``new`` in at ``target`` by renames, as ``itmrt index --overwrite`` publishes a gallery."""
    old = target.with_name(target.name + f".old{time.monotonic_ns()}")
    os.rename(target, old)
    os.rename(new, target)


def test_a_large_request_is_split_into_batches_and_joined(model: dict[str, Any]) -> None:
    """150 captions with --max-batch-captions 64: three batches, one answer equal to the runtime's alone."""
    captions = random_captions(150, seed=12, max_words=9)
    settings = options(limits=HttpLimits(), batch=BatchSettings(max_batch_captions=64, max_delay_s=0.0))
    with running(Service(model["gallery"], options=settings)) as live, ServiceClient(live.url) as client:
        hits = client.search(captions, 5)
        page = client.request("GET", "/metrics")[2].decode()
    want = expected(model, model["gallery"], captions, 5)
    np.testing.assert_array_equal(hits.indices, want.indices)
    np.testing.assert_allclose(hits.scores, want.scores, atol=1e-6)
    assert metric(page, "itmrt_batch_captions_count") >= 3 and metric(page, "itmrt_batch_captions_sum") >= 150


@pytest.mark.parametrize(("fields", "expected"), [
    ({"port": "80"}, "--port must be an integer from 0 to 65535, not '80'"),  # a TypeError in bind()
    ({"port": 70000}, "--port must be an integer from 0 to 65535, not 70000"),  # OverflowError from bind()
    ({"host": 5}, "--host must be an address"),  # "argument of type 'int' is not iterable"
    ({"shortlist": "3"}, "--shortlist must be an integer from 1 to"),  # a TypeError in a comparison
    ({"copy_shards_mb": "1"}, "--copy-shards-mb must be a finite number, not '1'"),  # reached the first opening
    ({"grace_s": "x"}, "--grace-s must be a finite number, not 'x'"),
    ({"watch_s": -1}, "--watch-s must be in [0, 3600], not -1"),  # polled without a pause
    ({"memory_mb": "x"}, "--memory-mb must be an integer from 1 to"),  # "unsupported operand type(s) for <<"
    ({"max_connections": 0}, "--max-connections must be an integer from 1 to"),  # every connection refused
    ({"ray": "auto"}, "ray must be an itmrt.scale.RayOptions"),  # reached the first opening of the shards
    ({"regions": {"bogus": 1}}, "regions must be a dict of the region index's search options"),  # a TypeError
    ({"regions": "nprobe=3"}, "regions must be a dict"),  # "argument after ** must be a mapping, not str"
])
def test_serve_options_of_the_wrong_type_or_range_are_one_line(fields: dict[str, Any], expected: str) -> None:
    """The Python API's ServeOptions bounded as the CLI's flags are, before a port is bound or a file read."""
    from itmrt.errors import ItmrtError

    with pytest.raises(ItmrtError) as caught:
        ServeOptions(**fields)
    assert str(caught.value).startswith(expected) and "\n" not in str(caught.value)


def test_serve_and_runtime_options_take_numpy_integers_as_ints() -> None:
    """A count read from an array (np.int64) was refused: "--shortlist must be an integer from 1 to 16777216, not
    np.int64(10)" (check_count took Python ints only, where the scale options and --threads take NumPy's)."""
    from itmrt.runtime.options import RuntimeOptions

    served = ServeOptions(shortlist=np.int64(10), port=np.uint16(8001), max_connections=np.int32(4),
                          memory_mb=np.int64(16))
    assert [type(value) for value in (served.shortlist, served.port, served.max_connections, served.memory_mb)] \
        == [int] * 4 and (served.shortlist, served.port, served.memory_mb) == (10, 8001, 16)
    runtime = RuntimeOptions(batch_size=np.int64(8), max_length=np.int32(20), device=np.int8(0))
    assert type(runtime.batch_size) is int and type(runtime.max_length) is int and runtime.gpu_mem_limit_mb is None
    from itmrt.errors import ItmrtError

    for wrong in ({"batch_size": None}, {"batch_size": 8.0}, {"device": True}, {"max_length": np.float64(20)}):
        with pytest.raises(ItmrtError, match="must be an integer from"):
            RuntimeOptions(**wrong)


def test_repository_load_and_unload_follow_the_model_control_mode_and_the_token(
        model: dict[str, Any], service: Service, tmp_path: Path) -> None:
    """--model-control poll (the default) refuses them with 403 and the reason; explicit answers them, and with a
    token file only with the token."""
    from itmrt.errors import ItmrtError
    from itmrt.runtime.options import RuntimeOptions

    for wrong in ({}, {"runtime": RuntimeOptions()}):  # the CLI passes its runtime group
        with pytest.raises(ItmrtError, match="--model-control must be one of none, poll, explicit"):
            ServeOptions(model_control="polling", **wrong)
    polled = httpx.Client(base_url=service.url, headers=JSON, timeout=30)
    for action in ("load", "unload"):
        one_line(polled.post(f"/v2/repository/models/text_to_image/{action}"), 403, "--model-control explicit")
    assert polled.get("/v2/health/ready").status_code == 200
    assert polled.post("/v2/repository/index").json()[0]["state"] == "READY"
    token = tmp_path / "token.txt"
    token.write_text("s3cret-token\n")
    token.chmod(0o600)
    with running(Service(model["gallery"], options=options(model_control="explicit", token_file=token))) as live:
        client = httpx.Client(base_url=live.url, headers=JSON, timeout=30)
        for action in ("load", "unload"):
            one_line(client.post(f"/v2/repository/models/text_to_image/{action}"), 401, "token")
            one_line(client.post(f"/v2/repository/models/text_to_image/{action}",
                                 headers={"Authorization": "Bearer wrong"}), 401, "token")
        assert client.get("/v2/health/ready").status_code == 200  # nothing was unloaded
        client.headers["Authorization"] = "Bearer s3cret-token"
        index = client.post("/v2/repository/index")
        assert index.status_code == 200 and index.json()[0]["state"] == "READY"
        assert client.post("/v2/repository/models/text_to_image/unload").json()["loaded"] is False
        one_line(client.post(INFER, content=body(["word1"])), 503, "unloaded")
        ready = client.get("/v2/health/ready")
        assert ready.status_code == 503 and "load" in ready.json()["reason"]
        assert client.post("/v2/repository/index").json()[0]["state"] == "UNAVAILABLE"
        loaded = client.post("/v2/repository/models/text_to_image/load")
        assert loaded.status_code == 200 and len(loaded.json()["gallery_sha256"]) == 16
        assert client.get("/v2/health/ready").status_code == 200
        assert client.post(INFER, content=body(["word1"])).status_code == 200
        one_line(client.post("/v2/repository/models/other/load"), 404, "unknown model")


def test_sigterm_exits_within_the_grace_period_with_the_worker_stuck(model: dict[str, Any]) -> None:
    """A request the worker never finishes (its search held): SIGTERM still ends the process within --grace-s."""
    script = f"""
import sys
sys.path.insert(0, {str(REPO / "tests")!r})
from serve_helpers import ControlledSearcher
from itmrt.serve.searcher import open_runtime_searcher
from itmrt.serve.server import ServeOptions, Service

def held():
    searcher = ControlledSearcher(open_runtime_searcher({str(model["bundle"])!r}, {str(model["gallery"])!r},
                                                        scorer="graph"))
    searcher.release.clear()
    return searcher

Service(None, options=ServeOptions(port=0, grace_s=3.0), searcher=held).run()
"""
    server = start_server_process(script)
    try:
        url = wait_until_ready(server)
        def held_request() -> None:
            try:
                httpx.post(url + INFER, content=body(["word1"]), headers=JSON, timeout=30)
            except httpx.HTTPError:
                pass  # the stopping server cuts it off: there is no answer to give

        threading.Thread(target=held_request, daemon=True).start()
        time.sleep(0.5)
        signalled = time.monotonic()
        server.send_signal(signal.SIGTERM)
        server.wait(30)
        assert time.monotonic() - signalled < 3.0 + 1.5
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
