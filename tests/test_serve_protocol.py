"""The KServe v2 protocol's edges against a real `reskd serve` on loopback: tensor shapes and nesting at the limits
of int64 and the parser, Content-Encoding, the binary-output flags, and an OpenAPI document that describes what the
server really answers. Every refusal is a 4xx with JSON {"error": ...} naming the problem, never a 500."""

from __future__ import annotations

import gzip
import json
import zlib

import pytest

from reskd.service.rest import kserve
from reskd.service.serving.errors import ServingError as ApiError

pytestmark = pytest.mark.server

INFER = "/v2/models/fashion-mnist/infer"
LIMIT = 300_000  # the server's body limit, compressed or not
REQUEST = {"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": [0.0] * 784}]}
BODY = json.dumps(REQUEST).encode()


@pytest.fixture(scope="module")
def server(small_limits_server):
    assert small_limits_server.env["RESKD_MAX_BODY_BYTES"] == str(LIMIT)
    return small_limits_server  # max_images=4, max_body_bytes=LIMIT (tests/conftest.py), shared


@pytest.fixture(scope="module")
def client(server):
    with server.client() as c:
        yield c


def tensor(shape, data=None, name="images", datatype="FP32", **parameters) -> dict:
    t = {"name": name, "datatype": datatype, "shape": shape}
    if parameters:
        t["parameters"] = parameters
    else:
        t["data"] = data
    return t


def as_json(*inputs, **extra) -> dict:
    return {"content": json.dumps({"inputs": list(inputs), **extra}).encode(),
            "headers": {"content-type": "application/json"}}


def as_binary(t: dict, blob: bytes) -> dict:
    head = json.dumps({"inputs": [t]}).encode()
    return {"content": head + blob, "headers": {"Inference-Header-Content-Length": str(len(head))}}


def nested(depth: int, leaf: str) -> str:
    return "[" * depth + leaf + "]" * depth


def raw(body: str | bytes, **headers) -> dict:
    return {"content": body.encode() if isinstance(body, str) else body,
            "headers": {"content-type": "application/json", **headers}}


HUGE = 2**32
CASES = [
    # (what, request kwargs, status, words in the message)
    ("a dimension beyond int64", as_json(tensor([2**70, 1, 28, 28], [0.0])), 400, "beyond int64"),
    ("a dimension of 2**63", as_json(tensor([2**63], [0.0])), 400, "beyond int64"),
    ("a dimension of thousands of digits", raw('{"inputs": [{"name": "images", "datatype": "FP32", "shape": [%s], '
                                               '"data": [0]}]}' % ("9" * 5000)), 400, "number"),
    ("an element count over int64 (JSON, no data)", as_json(tensor([HUGE, HUGE, 1, 1], [])), 400,
     "multiply to more than int64 can count"),
    ("an element count over int64 (binary, no data)", as_binary(tensor([HUGE, HUGE, 1, 1], binary_data_size=0), b""),
     400, "multiply to more than int64 can count"),
    ("an element count over int64 (BYTES, binary)",
     as_binary(tensor([HUGE, HUGE], name="image_bytes", datatype="BYTES", binary_data_size=4), b"\0" * 4), 400,
     "multiply to more than int64 can count"),
    ("an element count that wraps to 2**63 in int64", as_json(tensor([2**62, 2], [0.0])), 400,
     "multiply to more than int64 can count"),
    ("no elements, but the other dimensions multiply past int64", as_json(tensor([0, 2**62, 4], [])), 400,
     "multiply to more than int64 can count"),
    ("no elements, but more bytes than int64 can count (binary)",
     as_binary(tensor([0, 2**61, 2], binary_data_size=0), b""), 400, "needs more bytes than int64 can count"),
    ("more dimensions than an array can have", as_json(tensor([1] * 65, [0.0])), 400, "dimensions"),
    ("more dimensions than an array can have (binary)", as_binary(tensor([1] * 65, binary_data_size=4), b"\0" * 4),
     400, "dimensions"),
    ("JSON nested 100,000 levels deep", raw(nested(100_000, "")), 400, "nested too deeply"),
    ("'data' nested 100,000 levels deep",
     raw('{"inputs": [{"name": "images", "datatype": "FP32", "shape": [1], "data": %s}]}' % nested(100_000, "1")),
     400, "nested too deeply"),
    ("BYTES 'data' nested as deep as the parser goes",
     raw('{"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1], "data": %s}]}'
         % nested(980, '"aGk="')), 400, "nests deeper than shape [1]"),
    ("an integer of thousands of digits in 'data'",
     raw('{"inputs": [{"name": "images", "datatype": "FP32", "shape": [1], "data": [%s]}]}' % ("9" * 5000)), 400,
     "number"),
    ("threshold beyond a float", as_json(REQUEST["inputs"][0], parameters={"threshold": 10**400}), 422,
     "threshold"),
    ("Inference-Header-Content-Length of a non-ASCII digit",
     {"content": BODY, "headers": {"Inference-Header-Content-Length": b"\xb2"}}, 400,
     "Inference-Header-Content-Length"),
    ("Inference-Header-Content-Length of thousands of digits",
     {"content": BODY, "headers": {"Inference-Header-Content-Length": "9" * 5000}}, 400,
     "Inference-Header-Content-Length"),
    ("binary_data_size true", as_binary(tensor([1, 1, 28, 28], binary_data_size=True), b"\0"), 400,
     "binary_data_size must be a byte count"),
    # Content-Encoding
    ("bytes after the gzip member", raw(gzip.compress(BODY) + b"trailing", **{"content-encoding": "gzip"}), 400,
     "8 bytes after gzip member 1 are not a valid gzip member"),
    ("bytes after the deflate stream", raw(zlib.compress(BODY) + b"xx", **{"content-encoding": "deflate"}), 400,
     "2 bytes after the end of the deflate data"),
    ("truncated gzip", raw(gzip.compress(BODY)[:-20], **{"content-encoding": "gzip"}), 400,
     "gzip data is truncated"),
    ("truncated deflate", raw(zlib.compress(BODY)[:-20], **{"content-encoding": "deflate"}), 400,
     "deflate data is truncated"),
    ("gzip members over the limit together",
     raw(gzip.compress(b" " * (LIMIT // 2 + 1)) * 2, **{"content-encoding": "gzip"}), 413, "300,000 bytes"),
    ("unknown encoding", raw(BODY, **{"content-encoding": "br"}), 415, "'br'"),
    # binary_data_output and binary_data are JSON booleans
    ("binary_data_output 'false'", as_json(REQUEST["inputs"][0], parameters={"binary_data_output": "false"}), 400,
     "'binary_data_output' must be a JSON boolean"),
    ("binary_data_output 0", as_json(REQUEST["inputs"][0], parameters={"binary_data_output": 0}), 400,
     "'binary_data_output' must be a JSON boolean"),
    ("binary_data 'no'", as_json(REQUEST["inputs"][0], outputs=[{"name": "class_id",
                                                                  "parameters": {"binary_data": "no"}}]), 400,
     "'binary_data' of output 'class_id' must be a JSON boolean"),
]


@pytest.mark.parametrize("what,kwargs,status,words", CASES, ids=[c[0] for c in CASES])
def test_edge_input_gets_a_4xx_naming_the_problem(client, what, kwargs, status, words):
    r = client.post(INFER, **kwargs)
    assert r.status_code == status, r.text[:500]
    body = r.json()
    assert set(body) == {"error"} and words in body["error"], body
    assert len(r.text) < 2000, "the message must not echo the input at length"


def test_the_server_survives_the_edge_cases(server, client):
    since = len(server.output())  # the shared server's log from here on
    for what, kwargs, status, words in CASES:
        client.post(INFER, **kwargs)
    assert server.proc.poll() is None
    log = server.output()[since:]
    assert "Traceback" not in log and "unexpected error" not in log
    assert client.post(INFER, content=BODY).status_code == 200


@pytest.mark.parametrize("encoding,body", [
    ("gzip", gzip.compress(BODY[:50]) + gzip.compress(BODY[50:])),  # several members, decoded as one stream
    ("gzip", gzip.compress(BODY) + b"\0" * 16),  # padding zeros after a member, as gzip.decompress allows
    ("GZIP", gzip.compress(BODY)),  # encodings are case-insensitive
    ("x-gzip", gzip.compress(BODY)),
    ("Deflate", zlib.compress(BODY)),
    ("identity", BODY),
], ids=["two gzip members", "zero padding", "GZIP", "x-gzip", "Deflate", "identity"])
def test_content_encodings_are_decoded(client, encoding, body):
    r = client.post(INFER, content=body, headers={"content-encoding": encoding, "content-type": "application/json"})
    assert r.status_code == 200, r.text
    assert [o["name"] for o in r.json()["outputs"]] == ["logits", "probabilities", "class_id", "exit_stage", "flops",
                                                     "exit_reason"]


def test_an_encoding_with_surrounding_whitespace_is_decoded():
    # HTTP servers strip a header value's surrounding whitespace before the app sees it; this checks the app itself.
    assert kserve.decompress(gzip.compress(BODY), " gzip\t", LIMIT) == BODY
    assert kserve.decompress(BODY, " Identity ", LIMIT) == BODY
    assert kserve.decompress(b"", "gzip", LIMIT) == b""  # no member at all, as gzip.decompress has it
    with pytest.raises(ApiError) as err:
        kserve.decompress(gzip.compress(BODY)[:5], "gzip", LIMIT)
    assert err.value.status == 400 and "truncated" in err.value.message


@pytest.mark.parametrize("parameters,outputs,binary", [
    ({"binary_data_output": False}, None, False),
    ({"binary_data_output": True}, None, True),
    ({"binary_data_output": None}, None, False),  # null: as if absent
    ({"binary_data_output": True}, [{"name": "class_id", "parameters": {"binary_data": False}}], False),
    ({}, [{"name": "class_id", "parameters": {"binary_data": True}}], True),
])
def test_binary_output_flags_are_booleans(client, parameters, outputs, binary):
    request = {**REQUEST, "parameters": parameters} | ({"outputs": outputs} if outputs else {})
    r = client.post(INFER, json=request)
    assert r.status_code == 200, r.text
    assert ("inference-header-content-length" in r.headers) is binary
    assert r.headers["content-type"] == ("application/octet-stream" if binary else "application/json")


def _pointer(document: dict, ref: str):
    assert ref.startswith("#/"), ref
    node = document
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and part in node, f"{ref} does not resolve (no {part!r})"
        node = node[part]
    return node


def _refs(node):
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"]
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def test_every_reference_in_the_openapi_document_resolves(client):
    doc = client.get("/openapi.json").json()
    refs = set(_refs(doc))
    assert "#/components/schemas/TensorIn" in refs and "#/components/schemas/OutputRequest" in refs
    for ref in refs:
        _pointer(doc, ref)
    body = doc["paths"][INFER.replace("fashion-mnist", "{name}")]["post"]["requestBody"]["content"]
    request = _pointer(doc, body["application/json"]["schema"]["$ref"])
    tensor_in = _pointer(doc, request["properties"]["inputs"]["items"]["$ref"])
    assert "$defs" not in json.dumps(doc) and tensor_in["properties"]["shape"]["items"]["type"] == "integer"


def test_metrics_are_documented_as_prometheus_text(client):
    doc = client.get("/openapi.json").json()
    content = doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(content) == ["text/plain"], content
    r = client.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain") and "# TYPE reskd_requests_total counter" in r.text


def test_infer_responses_and_an_example_are_documented(client):
    doc = client.get("/openapi.json").json()
    for path in ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"):
        ok = doc["paths"][path]["post"]["responses"]["200"]
        assert set(ok["content"]) == {"application/json", "application/octet-stream"}, ok  # binary outputs
        assert "Inference-Header-Content-Length" in ok["headers"]
        assert _pointer(doc, ok["content"]["application/json"]["schema"]["$ref"])["required"] == [
            "model_name", "model_version", "outputs"]
    request = _pointer(doc, "#/components/schemas/InferRequest")
    r = client.post(INFER, json=request["examples"][0])
    assert r.status_code == 200, r.text
    assert [o["name"] for o in r.json()["outputs"]] == ["class_id", "exit_stage", "flops"]
