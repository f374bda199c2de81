"""Schema fuzzing: schemathesis runs every operation of the server's own OpenAPI document against a real
`reskd serve` on loopback (its examples, coverage, fuzzing and stateful phases), and the server must never answer
5xx, nor a status, content type, header or body its document does not describe.

Deterministic (a fixed number of cases per operation, derandomized) and bounded to well under a minute here. Path
parameters are mostly drawn from the served model names and versions, so the fuzzed bodies reach past the 404s
into parsing and inference."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest


pytestmark = pytest.mark.server

# Server errors and conformance of every response to the document, plus the method checks (405 with Allow for
# the methods a path lacks). Left out: positive_data_acceptance, since the binary bodies (an image for /v1, Triton
# binary tensors for /v2) are documented as bytes, and random bytes are rightly refused; negative_data_rejection,
# since the server takes what the KServe protocol tolerates beyond the document (extra fields, a null flag as
# absent), which is leniency, not a defect.
CHECKS = ["not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_headers_conformance", "response_schema_conformance", "unsupported_method",
          "allow_header_conformance", "missing_required_header"]

CONFIG = """
workers = 1
color = false
request-timeout = 30
# too_slow measures the machine, not the API: on a busy CI runner it would fail a correct server.
suppress-health-check = ["too_slow"]
# These say the document (or this file) is wrong: a $ref that leads nowhere, a response body that cannot be checked,
# a dictionary value the parameter's schema refuses.
warnings = {{ fail-on = ["unresolvable_reference", "missing_deserializer", "dictionary_mismatch"] }}

[generation]
max-examples = {max_examples}
deterministic = true
database = "none"

[cache]
enabled = false

[checks]
enabled = false
{checks}

[dictionaries.models]
values = ["fashion-mnist", "fashion-mnist-teacher"]

[dictionaries.versions]
values = ["1"]

[parameters]
"path.name" = {{ dictionary = "models", probability = 0.9 }}
"path.version" = {{ dictionary = "versions", probability = 0.9 }}
# The served versions were calibrated before curves were stored: "default" is their only operating point, and any
# other id is rightly a 422 (tests/test_serve_errors.py), which would make the document look wrong to the fuzzer.
"query.operating_point" = "default"
"""


def test_the_openapi_document_holds_under_schema_fuzzing(tmp_path, small_limits_server):
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG.format(max_examples=30, checks="\n".join(f"{c}.enabled = true" for c in CHECKS)))
    # max_images=4 and a small body limit put the 413 paths within reach of small generated requests (the
    # session's shared server, tests/conftest.py: its log from here on is this test's).
    server = small_limits_server
    since = len(server.output())
    start = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run",
                          f"{server.url}/openapi.json"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    took = time.monotonic() - start
    log = server.output()[since:]
    assert server.proc.poll() is None
    report = run.stdout[-12_000:] + run.stderr[-3_000:]
    assert run.returncode == 0, report
    assert "passed" in run.stdout, report
    if "No issues found" not in run.stdout:
        # One kind of warning is expected, for these operations only: "mostly rejected generated data". Load and
        # unload answer 400 under the default RESKD_MODEL_CONTROL=none (tests/test_serve_model_control.py runs them
        # for real); the stateful phase follows links from the repository index (name, version) into the
        # versioned infer operation with generated bodies, mostly (rightly) refused, as its binary form is
        # documented as bytes (see CHECKS).
        warnings = run.stdout.split(" WARNINGS ")[1].split(" SUMMARY ")[0]
        kinds = re.findall(r"^\s*(\S[^:\n]*):", warnings, re.M)
        assert kinds == ["Schema validation mismatch"], report
        assert set(re.findall(r"^\s+- (\S+ \S+)$", warnings, re.M)) <= {
            "POST /v2/models/{name}/versions/{version}/infer", "POST /v2/repository/models/{name}/load",
            "POST /v2/repository/models/{name}/unload"}, report
    assert "Traceback" not in log and "unexpected error" not in log, log[-5_000:]
    print(f"schemathesis: {took:.1f} s\n{report[-1_500:]}")
