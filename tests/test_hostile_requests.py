"""Requests an attacker would send, against a real server: each gets a 4xx that names the limit
or the fix, and the server keeps serving afterwards.

The first one found (issue 11) was a 4 KB GET with 2,000 nested parentheses in `filter`: the
Rust CQL2 parser overflowed its stack and the whole process died with SIGSEGV.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from pathlib import Path

import httpx
import morecantile
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Server, assert_clear_error

_T = morecantile.tms.get("WebMercatorQuad").tile(10.0, 45.12, 11)
TILE = f"/tiles/WebMercatorQuad/{_T.z}/{_T.x}/{_T.y}"  # two demo items overlap here
CHUNK = {"id": "a", "bbox": [0, 0, 1, 1], "width": 4, "height": 4}


def nested_text(depth: int) -> str:
    return "(" * depth + "id='x'" + ")" * depth


def nested_json_text(depth: int) -> str:
    """CQL2-JSON nested `depth` NOTs deep, built as text (json.dumps would itself recurse)."""
    leaf = '{"op":"=","args":[{"property":"id"},"x"]}'
    return '{"op":"not","args":[' * depth + leaf + "]}" * depth


def chunks_body(filter_json: str) -> bytes:
    head = json.dumps({"crs": "EPSG:4326", "chunks": [CHUNK]})[:-1]
    return f'{head}, "filter": {filter_json}}}'.encode()


def assert_alive(server: Server, http: httpx.Client) -> None:
    assert server.proc.poll() is None, server.output()[-3000:]
    assert http.get("/healthz").status_code == 200
    assert http.get(TILE).status_code == 200


@pytest.mark.parametrize("depth", [40, 200, 2_000])
@pytest.mark.parametrize("path", ["/items", TILE, "/tilejson.json"])
def test_deep_parentheses_in_a_get_are_a_400(server, http, depth: int, path: str) -> None:
    # raw parentheses, as the 4 KB reproduction sent them (they need no percent-encoding)
    response = http.get(f"{path}?filter-lang=cql2-text&filter={nested_text(depth)}")
    assert len(response.request.url.query) < 8192
    assert_clear_error(response, 400, "nested deeper than 32")
    assert_alive(server, http)


def test_a_query_past_the_size_limit_is_refused_before_parsing(server, http) -> None:
    response = http.get(f"/items?filter={nested_text(20_000)}")
    assert_clear_error(response, 414, "TERRAZZO_MAX_QUERY_BYTES")
    assert_alive(server, http)


@pytest.mark.parametrize("depth", [200, 20_000, 200_000])
def test_deep_text_and_json_filters_in_a_post_are_a_400(server, http, depth: int) -> None:
    text = http.post(
        "/chunks", json={"crs": "EPSG:4326", "chunks": [CHUNK], "filter": nested_text(depth)}
    )
    assert_clear_error(text, 400, "nested deeper than 32")
    as_json = http.post(
        "/chunks",
        content=chunks_body(nested_json_text(depth)),
        headers={"content-type": "application/json"},
    )
    assert as_json.status_code == 400, as_json.text
    assert "nested deeper than" in as_json.json()["detail"]
    assert_alive(server, http)


def test_deep_json_filter_in_a_get_is_a_400(server, http) -> None:
    get = http.get("/items", params={"filter": nested_json_text(40)})
    assert_clear_error(get, 400, "nested deeper than 32")
    assert_alive(server, http)


@pytest.mark.parametrize(
    "text, needle",
    [
        ("NOT " * 1500 + "id='x'", "NOT or +/- operators"),
        ("gsd = " + "-" * 5000 + "1", "NOT or +/- operators"),
        ("id IN (" + ",".join(["'a'"] * 2500) + ")", "more than 2000 terms"),
    ],
)
def test_wide_or_prefix_heavy_filters_are_a_400(server, http, text: str, needle: str) -> None:
    response = http.post("/chunks", json={"crs": "EPSG:4326", "chunks": [CHUNK], "filter": text})
    assert_clear_error(response, 400, needle)
    assert_alive(server, http)


@pytest.mark.parametrize(
    "text, needle",
    [
        ("id>5", "compares values of different types"),
        ("bbox='x'", "cannot be compared"),
        ("gsd BETWEEN 1 AND 'z'", "compares values of different types"),
        ("datetime > 5", "compares values of different types"),
        ("gsd LIKE 'a%'", "LIKE needs a text property"),
        ("datetime > 'not a date'", "is not a date or time"),
        ("id = TIMESTAMP('2024-01-01T00:00:00Z')", '{"property": "id"} is not a date'),
    ],
)
def test_type_mismatches_are_a_400_not_a_500(server, http, text: str, needle: str) -> None:
    for path in ("/items", TILE):
        assert_clear_error(http.get(path, params={"filter": text}), 400, needle)


def test_a_sane_filter_still_filters(http) -> None:
    everything = http.get("/items").json()
    none = http.get("/items", params={"filter": "id = 'no such item'"}).json()
    some = http.get("/items", params={"filter": "(gsd > 0 AND NOT (id = 'x')) OR gsd < -1"}).json()
    assert everything["numberMatched"] > 0
    assert none["numberMatched"] == 0
    assert some["numberMatched"] == everything["numberMatched"]


@pytest.mark.parametrize(
    "field, count, needle",
    [("ids", 1001, "ids: at most 1000"), ("collections", 101, "collections: at most 100")],
)
def test_lists_are_bounded(http, field: str, count: int, needle: str) -> None:
    body = {"crs": "EPSG:4326", "chunks": [CHUNK], field: [f"x{i}" for i in range(count)]}
    assert_clear_error(http.post("/chunks", json=body), 400, needle)


def test_assets_and_bands_are_bounded(http) -> None:
    body = {"crs": "EPSG:4326", "chunks": [CHUNK], "bidx": list(range(1, 300))}
    assert_clear_error(http.post("/chunks", json=body), 400, "bidx: at most 256")


# A bounded fuzz: random deep and wide CQL2 structures, text and JSON, GET and POST. Whatever
# hypothesis builds, the server answers below 500 and stays up.
def cql2_text() -> st.SearchStrategy[str]:
    leaf = st.sampled_from(["id='x'", "gsd > 1", "platform LIKE 'a%'", "gsd IS NULL", "x"])
    return st.recursive(
        leaf,
        lambda inner: st.one_of(
            inner.map(lambda t: f"({t})"),
            inner.map(lambda t: f"NOT {t}"),
            st.lists(inner, min_size=2, max_size=6).map(" AND ".join),
            st.lists(inner, min_size=2, max_size=6).map(" OR ".join),
            st.tuples(inner, st.integers(1, 3000)).map(lambda p: "(" * p[1] + p[0] + ")" * p[1]),
        ),
        max_leaves=40,
    )


def json_tree() -> st.SearchStrategy[object]:
    leaf = st.one_of(
        st.just({"op": "=", "args": [{"property": "id"}, "x"]}),
        st.integers(),
        st.text(max_size=5),
        st.none(),
    )
    return st.recursive(
        leaf,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4),
            st.dictionaries(st.sampled_from(["op", "args", "property", "x"]), inner, max_size=3),
            inner.map(lambda t: {"op": "not", "args": [t]}),
        ),
        max_leaves=60,
    )


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(text=cql2_text(), tree=json_tree(), depth=st.integers(0, 5000))
def test_fuzzed_filters_never_crash_the_server(server, http, text, tree, depth) -> None:
    codes = [
        http.get("/items", params={"filter": text[:6000]}).status_code,
        http.post(
            "/chunks", json={"crs": "EPSG:4326", "chunks": [CHUNK], "filter": text}
        ).status_code,
        http.post(
            "/chunks",
            content=chunks_body("[" * depth + json.dumps(tree) + "]" * depth),
            headers={"content-type": "application/json"},
        ).status_code,
    ]
    assert all(code < 500 for code in codes), (codes, server.output()[-2000:])
    assert server.proc.poll() is None


# -- the guard: bodies, heads, keys, caches ----------------------------------------------------


@pytest.fixture(scope="module")
def keyed(demo_catalog) -> Server:
    srv = Server(
        demo_catalog,
        env={"TERRAZZO_API_KEY": "s3cret", "TERRAZZO_BODY_TIMEOUT_S": "2"},
        args=("--header-timeout-s", "2", "--max-inflight", "4"),
    )
    yield srv
    srv.stop()


@pytest.mark.parametrize(
    "path", ["/docs/tilejson.json", "/map/../tilejson.json", "/healthzx", "/redoc/items"]
)
def test_open_paths_are_exact_not_prefixes(keyed, path: str) -> None:
    response = httpx.get(keyed.url + path, params={"filter": "id='x'"})
    assert response.status_code in (401, 404), response.text
    assert response.status_code != 200


def test_non_utf8_key_is_a_401_not_a_500(keyed) -> None:
    response = httpx.get(keyed.url + TILE, headers={"X-API-Key": b"\xff\xfe"})
    assert_clear_error(response, 401, "API key")


def test_tiles_behind_a_key_are_private_and_vary_on_it(keyed) -> None:
    response = httpx.get(keyed.url + TILE, headers={"X-API-Key": "s3cret"})
    assert response.status_code == 200
    assert response.headers["cache-control"].startswith("private")
    assert "X-API-Key" in response.headers["vary"]


def test_open_server_tiles_are_public(http) -> None:
    assert http.get(TILE).headers["cache-control"].startswith("public")


def test_non_json_posts_are_a_415(http) -> None:
    form = http.post("/chunks", data={"crs": "EPSG:4326"})
    assert_clear_error(form, 415, "Content-Type: application/json")
    bare = http.post("/chunks", content=b'{"crs": "EPSG:4326"}', headers={"content-type": ""})
    assert_clear_error(bare, 415, "Content-Type: application/json")


def test_an_over_limit_chunked_body_is_a_413(http) -> None:
    def body():
        for _ in range(10):
            yield b" " * 2**20  # 10 MiB, no Content-Length: sent chunked

    response = http.post("/chunks", content=body(), headers={"content-type": "application/json"})
    assert_clear_error(response, 413, "TERRAZZO_MAX_BODY_BYTES")


@pytest.mark.parametrize("dtype", ["V100000", "O", "i4,i4", "complex64", "S10", "bool"])
def test_output_dtypes_are_an_allow_list(http, dtype: str) -> None:
    body = {"crs": "EPSG:4326", "chunks": [CHUNK], "dtype": dtype}
    assert_clear_error(http.post("/chunks", json=body), 400, "is not one of")


def test_slow_bodies_time_out_and_do_not_hold_request_slots(keyed) -> None:
    """Eight clients trickling a POST body (more than max_inflight=4) get a 408 and never
    make a tile wait or 503 meanwhile."""
    socks = []
    for _ in range(8):
        s = socket.create_connection(("127.0.0.1", keyed.port))
        s.sendall(
            b"POST /chunks HTTP/1.1\r\nHost: x\r\nX-API-Key: s3cret\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
        )
        socks.append(s)
    try:
        for _ in range(3):
            tile = httpx.get(keyed.url + TILE, headers={"X-API-Key": "s3cret"}, timeout=10)
            assert tile.status_code == 200, tile.text
        time.sleep(2.5)  # past TERRAZZO_BODY_TIMEOUT_S
        for s in socks:
            s.settimeout(5)
            answer = s.recv(4096)
            assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    finally:
        for s in socks:
            s.close()


def test_a_slow_request_head_is_cut_off(keyed) -> None:
    s = socket.create_connection(("127.0.0.1", keyed.port))
    started = time.monotonic()
    closed_after = None
    try:
        s.sendall(b"GET /healthz HTTP/1.1\r\n")
        while time.monotonic() - started < 8:
            time.sleep(0.5)
            try:
                s.sendall(b"X-Slow: 1\r\n")  # a slowloris client: a header line at a time
            except OSError:
                closed_after = time.monotonic() - started
                break
    finally:
        s.close()
    assert closed_after is not None, "the server kept a trickling request head open"
    assert 1.5 < closed_after < 5  # TERRAZZO_HEADER_TIMEOUT_S=2
    assert httpx.get(keyed.url + "/healthz").status_code == 200


# -- /chunks memory: caps and clients that stop reading ---------------------------------------


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def stall_server(demo_catalog) -> Server:
    srv = Server(demo_catalog, env={"TERRAZZO_STREAM_STALL_TIMEOUT_S": "2"})
    yield srv
    srv.stop()


def _covering_bbox(url: str) -> list[float]:
    return httpx.get(url + "/items", params={"limit": 1}).json()["features"][0]["bbox"]


def test_a_chunk_over_the_output_cap_is_an_error_for_that_chunk_only(stall_server) -> None:
    box = _covering_bbox(stall_server.url)
    body = {
        "crs": "EPSG:4326",
        "chunks": [
            {"id": "huge", "bbox": box, "width": 4096, "height": 4096},
            {"id": "fine", "bbox": box, "width": 64, "height": 64},
        ],
        "group_by": "item",
        "dtype": "float64",
    }
    response = httpx.post(stall_server.url + "/chunks", json=body, timeout=60)
    assert response.status_code == 200
    text = response.content.decode("latin-1")
    assert '"id": "huge", "status": "error"' in text
    assert "TERRAZZO_MAX_CHUNK_MB" in text
    assert '"id": "fine", "status": "ok"' in text
    assert '"status": "end", "chunks": 2, "ok": 1, "empty": 0, "error": 1' in text


def test_a_client_that_stops_reading_is_cut_off_and_memory_returns(stall_server) -> None:
    box = _covering_bbox(stall_server.url)
    chunks = [{"id": f"c{i}", "bbox": box, "width": 1024, "height": 1024} for i in range(60)]
    payload = json.dumps({"crs": "EPSG:4326", "chunks": chunks}).encode()
    pid = stall_server.proc.pid
    before = _rss_mb(pid)
    s = socket.create_connection(("127.0.0.1", stall_server.port))  # and never reads
    s.sendall(
        b"POST /chunks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    peak = before
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and "read nothing" not in stall_server.output():
        peak = max(peak, _rss_mb(pid))
        time.sleep(0.2)
    assert "read nothing" in stall_server.output(), stall_server.output()[-2000:]
    # ~180 MiB of frames were asked for; what the server held stayed within a few chunks
    assert peak - before < 150, (before, peak)
    s.settimeout(10)
    received = b""
    with contextlib.suppress(OSError):
        while chunk := s.recv(1 << 20):
            received += chunk
    s.close()
    assert b'"status": "end"' not in received  # cut: the client can tell (no end frame)
    assert httpx.get(stall_server.url + "/healthz").status_code == 200
