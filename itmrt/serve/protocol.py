"""The Open Inference Protocol (KServe / Triton v2, HTTP/REST) for the ``text_to_image`` model.

One request carries one input, ``captions`` (BYTES, shape ``[N]``), and the
request parameter ``top_k``; the answer holds ``indices`` (INT64 ``[N, k]``,
gallery rows), ``scores`` (FP32 ``[N, k]``) and, where the gallery names its
images, ``ids`` (BYTES ``[N, k]``).

Tensor data travels as JSON (``"data": [...]``) or, with Triton's binary tensor
data extension, as raw bytes after the JSON header: the header's length is in
the ``Inference-Header-Content-Length`` HTTP header, each binary tensor says its
size in ``parameters.binary_data_size``, tensors follow in input (or output)
order, and a BYTES element is a 4-byte little-endian length and its bytes.
tritonclient sends and asks for binary data by default.

The same functions encode requests and decode answers for :mod:`itmrt.serve.client`.
Every malformed request raises :class:`ProtocolError` with the HTTP status and
a one-line message.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from itmrt.text.tokenize import control_character

MODEL_NAME = "text_to_image"
MODEL_VERSION = "1"
CAPTIONS = "captions"
INDICES, SCORES, IDS = "indices", "scores", "ids"
OUTPUT_TYPES = {INDICES: ("INT64", "<i8"), SCORES: ("FP32", "<f4"), IDS: ("BYTES", None)}
HEADER_LENGTH = "Inference-Header-Content-Length"
DEFAULT_TOP_K = 10


class ProtocolError(Exception):
    """A request the service refuses: an HTTP status and a one-line message for ``{"error": ...}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def bad_request(message: str) -> ProtocolError:
    return ProtocolError(400, message)


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask: captions per request, bytes per caption, the largest ``top_k``."""

    max_captions: int = 256
    max_caption_bytes: int = 2048
    max_top_k: int = 1000
    has_ids: bool = False
    max_answer: int = 10_000
    """Results in one answer at most (captions x top_k): what a small request may make the service write."""
    top_k_bound: str = "the gallery's size"
    """What ``max_top_k`` is (a sharded service's ``--budget`` can be smaller than its gallery)."""


@dataclass
class InferRequest:
    """A decoded ``text_to_image`` request."""

    captions: list[str]
    top_k: int
    request_id: str | None = None
    outputs: dict[str, bool] = field(default_factory=dict)  # output name -> send as binary data
    timeout_s: float | None = None  # the request's own deadline (Triton's ``timeout`` parameter, microseconds)


# -- BYTES tensors ------------------------------------------------------------


def pack_bytes(items: Sequence[bytes]) -> bytes:
    """BYTES elements in the binary extension's layout: each a uint32 little-endian length, then its bytes."""
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def unpack_bytes(raw: bytes, count: int, what: str) -> list[bytes]:
    """``count`` BYTES elements from ``raw``, which must hold exactly them."""
    items, offset = [], 0
    for index in range(count):
        if offset + 4 > len(raw):
            raise bad_request(f"{what}: binary data ends before element {index} of {count}")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise bad_request(f"{what}: element {index} says {size} bytes but the binary data ends sooner")
        items.append(raw[offset : offset + size])
        offset += size
    if offset != len(raw):
        raise bad_request(f"{what}: {len(raw) - offset} bytes of binary data after the {count} elements of its shape")
    return items


# -- requests -------------------------------------------------------------------


def split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """The JSON header (a dict) and the binary data after it."""
    binary = b""
    if header_length is not None:
        try:
            size = int(header_length)
        except ValueError:
            raise bad_request(f"{HEADER_LENGTH} must be an integer, not {header_length[:40]!r}") from None
        if not 0 <= size <= len(body):
            raise bad_request(f"{HEADER_LENGTH} is {size} but the body has {len(body)} bytes")
        body, binary = body[:size], body[size:]
    document = _parse_json(body)
    if not isinstance(document, dict):
        raise bad_request("the request must be a JSON object with an 'inputs' list")
    return document, binary


class DuplicateKey(ValueError):
    """A JSON object that names one key twice (parsers disagree on which value wins)."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _object_without_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document = dict(pairs)
    if len(document) != len(pairs):
        seen: set[str] = set()
        for key, _value in pairs:
            if key in seen:
                raise DuplicateKey(key)
            seen.add(key)
    return document


def _parse_json(body: bytes) -> Any:
    """The JSON document of ``body``; whatever is wrong with it (bad UTF-8 or syntax, nesting deeper than
    Python's recursion allows, an integer of thousands of digits) is a 400 naming the problem."""
    try:
        return json.loads(body.decode("utf-8"), object_pairs_hook=_object_without_repeats)
    except DuplicateKey as exc:
        raise bad_request(f"the request's JSON repeats the key {show(exc.key)} in one object; send each key once") \
            from None
    except UnicodeDecodeError:
        raise bad_request("the request's JSON is not valid UTF-8") from None
    except json.JSONDecodeError as exc:
        raise bad_request(f"the request is not valid JSON ({exc.msg} at byte {exc.pos})") from None
    except RecursionError:
        raise bad_request("the request's JSON is nested too deeply; send the flat protocol document") from None
    except ValueError:  # int() over Python's digit limit (sys.get_int_max_str_digits)
        raise bad_request("the request's JSON holds a number with too many digits") from None


def show(value: Any, limit: int = 40) -> str:
    """``repr(value)`` cut to ``limit`` characters, for messages that quote what a client sent."""
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**limit else f"a {len(str(value))}-digit number"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_keys(found: Any, allowed: tuple[str, ...], where: str) -> None:
    """Refuse keys the protocol does not define here, naming the first (junk is not carried along)."""
    if isinstance(found, dict):
        unknown = [key for key in found if key not in allowed]
        if unknown:
            raise bad_request(f"unknown key {show(unknown[0])} in {where}; it takes {', '.join(allowed)}")


DOCUMENT_KEYS = ("id", "parameters", "inputs", "outputs")
INPUT_KEYS = ("name", "shape", "datatype", "parameters", "data")
INPUT_PARAMETERS = ("binary_data_size",)
REQUEST_PARAMETERS = ("top_k", "binary_data_output", "timeout")
OUTPUT_KEYS = ("name", "parameters")
OUTPUT_PARAMETERS = ("binary_data",)
MAX_TIMEOUT_US = (1 << 63) - 1
"""Triton's ``timeout`` parameter is a uint64 of microseconds; a larger one is refused, not overflowed."""


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _caption_input(document: dict[str, Any], limits: RequestLimits) -> tuple[dict[str, Any], int]:
    """The one ``captions`` input tensor and its length N, checked against the model's metadata."""
    inputs = document.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise bad_request(f"the request has no 'inputs'; send one input named {CAPTIONS!r} (BYTES, shape [N])")
    names = [item.get("name") if isinstance(item, dict) else None for item in inputs]
    unknown = [name for name in names if name != CAPTIONS]
    if unknown or len(inputs) != 1:
        raise bad_request(
            f"unknown or repeated input {show((unknown or names)[0])}; "
            f"this model takes one input, {CAPTIONS!r} (BYTES, shape [N])"
        )
    tensor = inputs[0]
    check_keys(tensor, INPUT_KEYS, f"input {CAPTIONS!r}")
    if not isinstance(tensor.get("parameters") or {}, dict):  # a list or a string was ignored, binary_data_size too
        raise bad_request(f"the parameters of input {CAPTIONS!r} must be a JSON object")
    check_keys(tensor.get("parameters"), INPUT_PARAMETERS, f"the parameters of input {CAPTIONS!r}")
    if tensor.get("datatype") != "BYTES":
        raise bad_request(
            f"input {CAPTIONS!r} has datatype {show(tensor.get('datatype'))}; send BYTES (UTF-8 captions)"
        )
    shape = tensor.get("shape")
    if not isinstance(shape, list) or len(shape) != 1 or not _integer(shape[0]) or shape[0] < 0:
        raise bad_request(f"input {CAPTIONS!r} has shape {show(shape)}; send shape [N], one caption per element")
    count = int(shape[0])
    if count == 0:
        raise bad_request("the caption list is empty; send at least one caption")
    if count > limits.max_captions:
        raise bad_request(
            f"{show(count)} captions in one request, over the limit of {limits.max_captions}; "
            "split them into several requests"
        )
    return tensor, count


def _caption_bytes(tensor: dict[str, Any], count: int, binary: bytes) -> list[bytes]:
    """The captions as bytes, from the binary data or the JSON ``data`` list."""
    parameters = tensor.get("parameters") or {}
    size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
    if size is not None:
        if not _integer(size) or size != len(binary):
            raise bad_request(
                f"input {CAPTIONS!r} says binary_data_size {show(size)} but {len(binary)} bytes follow the JSON header"
            )
        return unpack_bytes(binary, count, f"input {CAPTIONS!r}")
    if binary:
        raise bad_request(
            f"{len(binary)} bytes of binary data follow the JSON header but no input declares binary_data_size"
        )
    data = tensor.get("data")
    if isinstance(data, list) and len(data) == 1 and isinstance(data[0], list):
        data = data[0]  # a nested [[...]] for shape [N]
    if not isinstance(data, list) or len(data) != count:
        have = len(data) if isinstance(data, list) else type(data).__name__
        raise bad_request(f"input {CAPTIONS!r} has shape [{count}] but its data holds {have} elements")
    if not all(isinstance(item, str) for item in data):
        raise bad_request(f"input {CAPTIONS!r}: every element of 'data' must be a string (a caption)")
    try:
        return [item.encode("utf-8") for item in data]
    except UnicodeEncodeError:
        raise bad_request(f"input {CAPTIONS!r} holds a string that is not valid Unicode (a lone surrogate)") from None


def _decode_captions(raw: list[bytes], limits: RequestLimits) -> list[str]:
    captions = []
    for index, item in enumerate(raw):
        if len(item) > limits.max_caption_bytes:
            raise bad_request(
                f"caption {index} is {len(item)} bytes long, over the limit of {limits.max_caption_bytes}; shorten it"
            )
        try:
            caption = item.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise bad_request(f"caption {index} is not valid UTF-8 (byte {exc.start}); send UTF-8 text") from None
        if not caption.strip():  # no word at all: any ranking of it would be noise answered as if it meant something
            raise bad_request(f"caption {index} is empty; send at least one word")
        control = control_character(caption)
        if control is not None:  # as a captions file's line and encode_captions refuse it
            raise bad_request(f"caption {index} holds the control character {control}; send plain text")
        captions.append(caption)
    return captions


def _request_parameters(document: dict[str, Any], limits: RequestLimits) -> tuple[int, bool, float | None]:
    """``top_k``, ``binary_data_output`` and the request's own timeout from its parameters."""
    parameters = document.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise bad_request("'parameters' must be a JSON object")
    check_keys(parameters, REQUEST_PARAMETERS, "the request's parameters")
    top_k = parameters.get("top_k", min(DEFAULT_TOP_K, limits.max_top_k))
    if not _integer(top_k) or not 1 <= top_k <= limits.max_top_k:
        raise bad_request(f"top_k must be an integer from 1 to {limits.max_top_k} ({limits.top_k_bound}), "
                          f"not {show(top_k)}")
    binary = parameters.get("binary_data_output", False)
    if not isinstance(binary, bool):
        raise bad_request("binary_data_output must be true or false")
    timeout = parameters.get("timeout")
    if timeout is not None and (not _integer(timeout) or not 0 < timeout <= MAX_TIMEOUT_US):
        raise bad_request(f"timeout must be a positive integer of microseconds below 2^63, not {show(timeout)}")
    return int(top_k), binary, (timeout / 1e6 if timeout else None)


def _requested_outputs(document: dict[str, Any], binary_default: bool, limits: RequestLimits) -> dict[str, bool]:
    available = [INDICES, SCORES] + ([IDS] if limits.has_ids else [])
    requested = document.get("outputs")
    if requested is None:
        return {name: binary_default for name in available}
    if not isinstance(requested, list):
        raise bad_request("'outputs' must be a list of {\"name\": ...} objects")
    if not requested:
        raise bad_request(f"'outputs' is empty; name the outputs you want ({', '.join(available)}) or leave it out "
                          "for all of them")
    outputs: dict[str, bool] = {}
    for item in requested:
        name = item.get("name") if isinstance(item, dict) else None
        if name not in available:
            raise bad_request(f"unknown output {show(name)}; this model gives {', '.join(available)}")
        if name in outputs:  # the answer has one tensor of each name: which binary_data would it follow?
            raise bad_request(f"output {name!r} is asked for twice; name each output once")
        check_keys(item, OUTPUT_KEYS, f"output {name!r}")
        parameters = item.get("parameters", {})
        if not isinstance(parameters, dict):
            raise bad_request(f"the parameters of output {name!r} must be a JSON object")
        check_keys(parameters, OUTPUT_PARAMETERS, f"the parameters of output {name!r}")
        binary = parameters.get("binary_data", binary_default)
        if not isinstance(binary, bool):
            raise bad_request(f"binary_data of output {name!r} must be true or false, not {show(binary)}")
        outputs[name] = binary
    return outputs


def parse_infer_request(body: bytes, header_length: str | None, limits: RequestLimits) -> InferRequest:
    """Decode and check a ``text_to_image`` inference request (JSON or binary tensor data)."""
    document, binary = split_body(body, header_length)
    check_keys(document, DOCUMENT_KEYS, "the request")
    tensor, count = _caption_input(document, limits)
    captions = _decode_captions(_caption_bytes(tensor, count, binary), limits)
    top_k, binary_default, timeout_s = _request_parameters(document, limits)
    if len(captions) * top_k > limits.max_answer:
        raise bad_request(
            f"{len(captions)} captions x top_k {top_k} = {len(captions) * top_k} results, over the answer limit of "
            f"{limits.max_answer} (--max-answer); ask for fewer captions or a smaller top_k"
        )
    request_id = document.get("id")
    if request_id is not None and (not isinstance(request_id, str) or len(request_id) > 256):
        raise bad_request("'id' must be a string of at most 256 characters")
    return InferRequest(captions, top_k, request_id, _requested_outputs(document, binary_default, limits), timeout_s)


def infer_request_body(
    captions: Sequence[str], top_k: int | None = None, binary: bool = False
) -> tuple[bytes, dict[str, str]]:
    """A request body (and the headers it needs) for ``captions``: JSON data, or binary data both ways."""
    encoded = [caption.encode("utf-8") for caption in captions]
    tensor: dict[str, Any] = {"name": CAPTIONS, "datatype": "BYTES", "shape": [len(encoded)]}
    document: dict[str, Any] = {"inputs": [tensor]}
    parameters: dict[str, Any] = {} if top_k is None else {"top_k": int(top_k)}
    if not binary:
        tensor["data"] = list(captions)
        if parameters:
            document["parameters"] = parameters
        return json.dumps(document).encode("utf-8"), {"Content-Type": "application/json"}
    raw = pack_bytes(encoded)
    tensor["parameters"] = {"binary_data_size": len(raw)}
    document["parameters"] = {**parameters, "binary_data_output": True}
    header = json.dumps(document).encode("utf-8")
    return header + raw, {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(header))}


# -- responses --------------------------------------------------------------------


def _output_payload(name: str, values: np.ndarray | list[list[str]]) -> tuple[str, list[int], Any, bytes]:
    """(datatype, shape, JSON data, binary data) of one output tensor."""
    datatype, dtype = OUTPUT_TYPES[name]
    if dtype is None:  # BYTES: ids
        rows = [[str(item) for item in row] for row in values]
        shape = [len(rows), len(rows[0]) if rows else 0]
        flat = [item for row in rows for item in row]
        return datatype, shape, flat, pack_bytes([item.encode("utf-8") for item in flat])
    array = np.ascontiguousarray(values, dtype=dtype)
    return datatype, list(array.shape), array.reshape(-1).tolist(), array.tobytes()


def infer_response(
    request: InferRequest, indices: np.ndarray, scores: np.ndarray, ids: Sequence[str] | None = None,
    version: str | None = None,
) -> tuple[bytes, dict[str, str]]:
    """The response body and headers for ``request``'s results (binary data where it asked for it);
    ``version`` (the sha256 of the gallery's embeddings that answered) goes in the response's parameters."""
    tensors: dict[str, np.ndarray | list[list[str]]] = {INDICES: indices, SCORES: scores}
    if ids is not None:
        tensors[IDS] = [[ids[int(i)] if i >= 0 else "" for i in row] for row in indices]
    outputs, binary_parts = [], []
    for name, binary in request.outputs.items():
        datatype, shape, data, raw = _output_payload(name, tensors[name])
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
        if binary:
            entry["parameters"] = {"binary_data_size": len(raw)}
            binary_parts.append(raw)
        else:
            entry["data"] = data
        outputs.append(entry)
    document: dict[str, Any] = {"model_name": MODEL_NAME, "model_version": MODEL_VERSION, "outputs": outputs}
    if request.request_id is not None:
        document["id"] = request.request_id
    if version is not None:
        document["parameters"] = {"gallery_sha256": version}
    header = json.dumps(document).encode("utf-8")
    if not binary_parts:
        return header, {"Content-Type": "application/json"}
    return header + b"".join(binary_parts), {
        "Content-Type": "application/octet-stream",
        HEADER_LENGTH: str(len(header)),
    }


def parse_infer_response(body: bytes, header_length: str | None) -> dict[str, np.ndarray]:
    """The output tensors of an inference response (JSON or binary data) as numpy arrays."""
    document, binary = split_body(body, header_length)
    arrays, offset = {}, 0
    for output in document.get("outputs") or []:
        name, datatype, shape = output["name"], output["datatype"], output["shape"]
        size = (output.get("parameters") or {}).get("binary_data_size")
        if datatype == "BYTES":
            count = int(np.prod(shape))
            if size is not None:
                items = [item.decode("utf-8") for item in unpack_bytes(binary[offset : offset + size], count, name)]
            else:
                items = list(output["data"])
            arrays[name] = np.array(items, dtype=object).reshape(shape)
        else:
            dtype = {"INT64": "<i8", "FP32": "<f4"}[datatype]
            if size is not None:
                arrays[name] = np.frombuffer(binary[offset : offset + size], dtype=dtype).reshape(shape)
            else:
                arrays[name] = np.array(output["data"], dtype=dtype).reshape(shape)
        offset += size or 0
    return arrays
