"""Generated and hostile requests: never a 500, never a traceback, always an OCI error body.

Requests go out as raw bytes (`rawhttp.send_raw`), so `..`, `%2e%2e`, NUL and backslashes reach
the server as written. Some inputs never reach the app: aiohttp's HTTP parser refuses them before
any handler runs, and `proxy.server.MirrorRequestHandler` answers them (400, 414, 431 or 501, an
OCI error body, no registry headers, at most a rate-limited warning line). Those are recorded,
and `test_requests_the_http_parser_rejects_never_reach_the_mirror` pins down which they are.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest
from harness.mirror import Mirror
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from faults.rawhttp import RawResponse, ThreadedMirror, build_request, send_raw
from faults.support import audit_cache, oci_error_code
from proxy.server.runner import MALFORMED_LINES_PER_WINDOW, MalformedRequestLog

REPOSITORY: Final = "team/app"
# Fixed bytes, not os.urandom: a failing example replays against the same content.
SENTINEL: Final = b"sentinel outside the cache: " + hashlib.sha256(b"sentinel").hexdigest().encode()
FUZZ: Final = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
# Every request the parser refused, with aiohttp's reason: reported by the last test.
PARSER_REJECTIONS: list[tuple[str, bytes]] = []


class Known:
    """The content the fake upstream holds, and the sentinel files the mirror must never read."""

    def __init__(self, mirror: ThreadedMirror) -> None:
        registry = mirror.upstream.registry
        self.blob = bytes(range(256)) * 19 + bytes(136)  # 5000 bytes, the same every run
        self.image = registry.add_image(REPOSITORY, "1.0", [self.blob])
        self.blob_digest = self.image.layer_digests[0]
        self.sentinels = [mirror.root / "secret.txt", mirror.cache_dir / "blobs" / "secret.txt"]
        self.sentinel_digest = "sha256:" + hashlib.sha256(SENTINEL).hexdigest()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ThreadedMirror, Known]]:
    with ThreadedMirror(tmp_path_factory.mktemp("abuse")) as mirror:
        known = Known(mirror)
        for sentinel in known.sentinels:
            sentinel.parent.mkdir(parents=True, exist_ok=True)
            sentinel.write_bytes(SENTINEL)
        yield mirror, known


# ----------------------------------------------------------------------------- strategies

TRAVERSAL: Final = [
    "..", ".", "%2e%2e", "%2E%2E", ".%2e", "%2f", "%2F", "..%2f..%2f", "%00", "%5c", "\\",
    "..\\..", "%252e%252e", "etc", "passwd", "secret.txt", "/etc/passwd", "//", "~root",
]  # fmt: skip
NAMES: Final = ["team", "app", "library", "a", "x-y", "a.b", "a__b", "ghcr.io", "fake"]
URL_TEXT: Final = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="?#"),
    max_size=20,
)
ANY_TEXT: Final = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=30
)


def digest_like() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(["sha256:", "sha512:", "md5:", "SHA256:", "sha256"]).flatmap(
            lambda algorithm: st.text(alphabet="0123456789abcdefABCDEFxyz%./", max_size=130).map(
                lambda encoded: algorithm + encoded
            )
        ),
        st.just("sha256:" + "0" * 64),
        URL_TEXT,
    )


@st.composite
def targets(draw: st.DrawFn, known: Known) -> str:
    prefix = draw(
        st.sampled_from(
            ["/v2/", "/v2/", "/v2/", "/v2", "/", "//v2/", "/v2//", "/healthz", "/metrics", "/x/"]
        )
    )
    segments = draw(
        st.lists(
            st.one_of(st.sampled_from(NAMES), st.sampled_from(TRAVERSAL), URL_TEXT, ANY_TEXT),
            max_size=4,
        )
    )
    # Now and then an oversized component: aiohttp reads request lines of up to 8190 bytes.
    segments.append("a" * draw(st.sampled_from([0, 0, 0, 0, 0, 255, 256, 4000, 8200, 20000])))
    endpoint = draw(
        st.one_of(
            st.builds(lambda r: f"manifests/{r}", st.one_of(URL_TEXT, digest_like())),
            st.just("manifests/1.0"),
            st.just(f"manifests/{known.image.manifest_digest}"),
            st.builds(lambda d: f"blobs/{d}", digest_like()),
            st.just(f"blobs/{known.blob_digest}"),
            st.just(f"blobs/{known.sentinel_digest}"),
            st.sampled_from(["tags/list", "blobs/uploads/", "blobs/uploads/x", "_catalog", ""]),
            st.builds(lambda d: f"referrers/{d}", digest_like()),
            URL_TEXT,
        )
    )
    path = prefix + "/".join([*segments, endpoint])
    query = draw(
        st.lists(
            st.tuples(st.sampled_from(["ns", "n", "last", "artifactType", "x", "ns"]), URL_TEXT),
            max_size=3,
        )
    )
    if query:
        path += "?" + "&".join(f"{key}={value}" for key, value in query)
    return path


METHODS: Final = st.sampled_from(
    ["GET", "GET", "GET", "HEAD", "PUT", "POST", "DELETE", "PATCH", "OPTIONS", "TRACE", "FOO"]
)


def header_values() -> st.SearchStrategy[str]:
    numbers = st.one_of(st.integers(0, 6000), st.integers(0, 10**25)).map(str)
    return st.one_of(
        st.builds(lambda a, b: f"bytes={a}-{b}", numbers | st.just(""), numbers | st.just("")),
        st.builds(lambda a, b: f"bytes={a}-{b},0-1", numbers, numbers),
        st.sampled_from(
            [
                "application/vnd.oci.image.manifest.v1+json",
                "application/vnd.oci.image.index.v1+json, */*",
                "*/*;q=0",
                "text/html",
                "",
                '"sha256:' + "0" * 64 + '"',
                "*",
            ]
        ),
        URL_TEXT,
        ANY_TEXT,
    )


HEADERS: Final = st.lists(
    st.tuples(
        st.sampled_from(["Range", "Accept", "If-None-Match", "Accept-Encoding", "X-Padding"]),
        header_values() | st.sampled_from([4000, 8190, 8200, 65536]).map(lambda n: "a" * n),
    ),
    max_size=3,
)


# ------------------------------------------------------------------------------ the checks


def check(
    served: tuple[ThreadedMirror, Known],
    method: str,
    target: str,
    headers: list[tuple[str, str]],
) -> RawResponse:
    """Send one request and check every rule that holds for any input whatsoever."""
    mirror, known = served
    request = build_request(method, target, headers)
    response = send_raw(mirror.port, request)
    assert SENTINEL not in response.body, f"{target!r} read a file outside the cache"
    assert b"Traceback" not in response.body
    assert response.status != 500, (target, response.body[:300])
    if not response.from_a_handler:
        # aiohttp's parser refused it before the app saw anything.
        assert response.status in (400, 414, 431, 501), response
        oci_error_code(response.body)
        PARSER_REJECTIONS.append((json.loads(response.body)["errors"][0]["message"], request))
    elif response.status >= 400 and method != "HEAD":
        oci_error_code(response.body)
    audit = audit_cache(mirror.cache_dir, junk=[known.sentinels[1]])
    assert audit.problems == []
    return response


def check_blob_body(response: RawResponse, blob: bytes) -> None:
    """A 200 is the whole blob and a 206 exactly the slice its Content-Range names."""
    if response.status == 200:
        assert response.body == blob
    elif response.status == 206:
        match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", response.headers["Content-Range"])
        assert match is not None
        start, end, size = map(int, match.groups())
        assert size == len(blob)
        assert response.body == blob[start : end + 1]
    elif response.status == 416:
        assert response.headers["Content-Range"] == f"bytes */{len(blob)}"


def nothing_traversal_went_upstream(mirror: ThreadedMirror) -> None:
    for recorded in list(mirror.upstream.registry.requests):
        parts = recorded.path.split("/")
        assert ".." not in parts, recorded.path
        assert "." not in parts, recorded.path
        assert "\\" not in recorded.path
        assert "\x00" not in recorded.path


# ------------------------------------------------------------------------------- the tests


@FUZZ
@given(data=st.data(), method=METHODS, headers=HEADERS)
def test_generated_requests_never_get_a_500_and_errors_are_always_oci_bodies(
    served: tuple[ThreadedMirror, Known],
    data: st.DataObject,
    method: str,
    headers: list[tuple[str, str]],
) -> None:
    target = data.draw(targets(served[1]))
    check(served, method, target, headers)
    nothing_traversal_went_upstream(served[0])


@FUZZ
@given(headers=HEADERS, method=st.sampled_from(["GET", "HEAD"]))
@example(headers=[("Range", "bytes=4999-")], method="GET")
@example(headers=[("Range", "bytes=-0")], method="GET")
@example(headers=[("Range", "bytes=0-99999999999999999999")], method="GET")
@example(headers=[("Range", "bytes=5000-")], method="GET")
def test_any_range_accept_or_etag_on_a_real_blob_gets_exact_bytes_or_an_oci_error(
    served: tuple[ThreadedMirror, Known], headers: list[tuple[str, str]], method: str
) -> None:
    _, known = served
    response = check(served, method, f"/v2/{REPOSITORY}/blobs/{known.blob_digest}", headers)
    if response.from_a_handler and method == "GET":
        assert response.status in (200, 206, 304, 416), response
        check_blob_body(response, known.blob)


TRAVERSALS: Final = [
    "/v2/../secret.txt",
    "/v2/../../secret.txt",
    "/v2/%2e%2e/%2e%2e/secret.txt",
    "/v2/%2e%2e%2f%2e%2e%2fsecret.txt/manifests/1.0",
    "/v2/team/..%2f..%2f..%2fsecret.txt/blobs/sha256:" + "0" * 64,
    "/v2/..%5c..%5csecret.txt/manifests/latest",
    "/v2/team/app/blobs/..%2f..%2fsecret.txt",
    "/v2/team/app/blobs/sha256:../../secret.txt",
    "/v2/team/app/blobs/sha256:%2e%2e%2f%2e%2e%2fsecret.txt",
    "/v2/team/app/manifests/..%2f..%2f..%2fsecret.txt",
    "/v2/team/app/manifests/sha256:..%2fsecret.txt",
    "/v2/blobs/sha256/../../secret.txt",
    "/v2/%00/manifests/latest",
    "/v2/team%00/manifests/latest",
    "/v2/team\\..\\..\\secret.txt/manifests/latest",
    "//v2/../../../../../../etc/passwd",
    "/v2/team/app/blobs/sha256:" + "a" * 64 + "/../../secret.txt",
    "/v2/team/app/tags/list?last=../../secret.txt&n=1",
    "/v2/team/app/manifests/1.0?ns=..%2f..%2fsecret.txt",
    "/healthz/../../secret.txt",
    "/metrics/%2e%2e/secret.txt",
]


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("target", TRAVERSALS)
def test_path_traversal_never_reads_or_writes_outside_the_cache(
    served: tuple[ThreadedMirror, Known], target: str, method: str
) -> None:
    mirror, known = served
    for base in ("", str(known.sentinels[0])):  # relative, and with an absolute path in it
        response = check(served, method, target.replace("secret.txt", base + "secret.txt"), [])
        if "tags/list?" in target:  # a query value is only ever passed on, re-encoded
            assert response.status == (200 if method == "GET" else 405)
        else:
            assert response.status in (400, 404), response
    nothing_traversal_went_upstream(mirror)
    for sentinel in known.sentinels:
        assert sentinel.read_bytes() == SENTINEL


HTTP_METHODS: Final = {
    "GET",
    "HEAD",
    "POST",
    "PUT",
    "DELETE",
    "CONNECT",
    "OPTIONS",
    "TRACE",
    "PATCH",
}
PARSER_LEVEL: Final = [
    ("NUL in the path", "GET", "/v2/a\x00b/manifests/1.0", [], 400),
    ("a raw non-ASCII byte in the path", "GET", "/v2/caf\u00e9/manifests/1.0", [], 400),
    ("a space in the path", "GET", "/v2/a b/manifests/1.0", [], 400),
    ("a request line over 8190 bytes", "GET", "/v2/" + "a" * 9000 + "/manifests/1.0", [], 414),
    ("a header over 8190 bytes", "GET", "/v2/", [("Accept", "a" * 9000)], 431),
    ("a header name over 8190 bytes", "GET", "/v2/", [("X" * 9000, "a")], 431),
    ("too many headers", "GET", "/v2/", [(f"X-{i}", "a") for i in range(200)], 431),
    ("a control character in a header", "GET", "/v2/", [("Range", "bytes=\x01-2")], 400),
    ("DEL in a header", "GET", "/v2/", [("Accept", "\x7f")], 400),
    ("a lower-case method", "get", "/v2/", [], 501),
    ("a method HTTP does not define", "FOO", "/v2/", [], 501),
    ("an asterisk target", "GET", "*", [], 400),
]


@pytest.mark.parametrize(
    ("method", "target", "headers", "status"),
    [pytest.param(m, t, h, s, id=name) for name, m, t, h, s in PARSER_LEVEL],
)
def test_requests_the_http_parser_rejects_never_reach_the_mirror(
    served: tuple[ThreadedMirror, Known],
    method: str,
    target: str,
    headers: list[tuple[str, str]],
    status: int,
) -> None:
    mirror, _ = served
    calls = mirror.upstream.registry.count()
    response = send_raw(mirror.port, build_request(method, target, headers))
    assert response.status == status
    assert not response.from_a_handler
    assert response.headers["Content-Type"] == "application/json"
    assert oci_error_code(response.body) == "UNSUPPORTED"
    assert mirror.upstream.registry.count() == calls


def test_the_parser_rejections_hypothesis_found_are_only_malformed_http(
    tmp_path: Path,
) -> None:
    """Runs after the generated tests in this module: every input aiohttp's parser refused
    carried a byte or a length HTTP/1.1 does not allow. The reasons go to a report file."""
    reasons: dict[str, int] = {}
    for reason, request in PARSER_REJECTIONS:
        reasons[reason] = reasons.get(reason, 0) + 1
        request_line, _, header_block = request.partition(b"\r\n")
        method, _, rest = request_line.partition(b" ")
        target = rest.rsplit(b" ", 1)[0]
        malformed = (
            any(byte < 0x21 or byte >= 0x7F for byte in target)
            or any((byte < 0x20 and byte not in b"\r\n\t") or byte >= 0x7F for byte in header_block)
            or len(request_line) > 8190
            or max(len(line) for line in header_block.split(b"\r\n")) > 8190
            or method.decode() not in HTTP_METHODS  # llhttp knows its methods by name
            or target == b"*"
        )
        assert malformed, f"the parser refused a well-formed request: {request[:300]!r} ({reason})"
    (tmp_path / "parser-rejections.json").write_text(json.dumps(reasons, indent=1))


def test_the_served_mirror_applies_its_header_limit_without_a_warning_per_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REGISTRY_PROXY_MAX_HEADER_SIZE", "16384")
    mirror = Mirror(tmp_path, "http://127.0.0.1:9", "--log-level", "info")
    mirror.start()
    try:
        for _ in range(3):
            assert send_raw(mirror.port, build_request("GET", "/v2/")).status == 200
        # Over aiohttp's default of 8190 but within the configured limit: the mirror answers.
        large = send_raw(mirror.port, build_request("GET", "/v2/", [("X-Large", "a" * 12_000)]))
    finally:
        mirror.stop()
    assert "Failed to create request handler" not in mirror.log_text()
    assert large.status == 200
    assert large.from_a_handler


# ------------------------------------------------------------------ malformed HTTP, served

TLS_CLIENT_HELLO: Final = bytes.fromhex("16030100a5010000a10303") + os.urandom(32)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_scan_of_malformed_requests_gets_fitting_statuses_and_a_bounded_quiet_log(
    tmp_path: Path, workers: str
) -> None:
    """Each parser-level rejection is answered with its status and an OCI body, and the served
    mirror logs no traceback and no error, at most a rate-limited number of warning lines; the
    TLS handshake skopeo and podman try first is not even a warning."""
    mirror = Mirror(tmp_path, "http://127.0.0.1:9", "--log-level", "info", "--workers", workers)
    mirror.start()
    rounds = 4
    try:
        for _ in range(rounds):
            for _name, method, target, headers, status in PARSER_LEVEL:
                response = send_raw(mirror.port, build_request(method, target, headers))
                assert response.status == status, (_name, response)
                assert oci_error_code(response.body) == "UNSUPPORTED"
            tls = send_raw(mirror.port, TLS_CLIENT_HELLO)
            assert tls.status == 400
        assert send_raw(mirror.port, build_request("GET", "/v2/")).status == 200
    finally:
        mirror.stop()
    log = mirror.log_text()
    assert "Traceback" not in log
    assert '"level": "error"' not in log
    warnings = [line for line in log.splitlines() if "malformed request" in line]
    assert all('"level": "warning"' in line for line in warnings)
    # Per worker process, at most one window's worth of lines for the whole scan.
    assert 0 < len(warnings) <= MALFORMED_LINES_PER_WINDOW * int(workers)
    assert len(PARSER_LEVEL) * rounds > MALFORMED_LINES_PER_WINDOW * int(workers)
    assert "TLS handshake" not in log


def test_malformed_request_lines_are_rate_limited_and_the_rest_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    limiter = MalformedRequestLog(limit=3, window=60.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="registry_proxy.http"):
        for _ in range(10):
            limiter.warn("10.0.0.9", 431, "request header too large")
        assert len(caplog.records) == 3
        assert limiter.suppressed == 7
        now[0] = 59.0
        limiter.warn("10.0.0.9", 400, "malformed HTTP request")
        assert len(caplog.records) == 3
        now[0] = 60.0  # a new window: the count of what went unlogged, then the line itself
        limiter.warn("10.0.0.9", 414, "request line too long")
    messages = [record.getMessage() for record in caplog.records]
    assert messages[3] == "8 more malformed requests were answered without a log line"
    assert messages[4] == "malformed request from 10.0.0.9 answered 414: request line too long"
    assert len(messages) == 5
