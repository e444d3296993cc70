"""Property-based tests: random tiles, bboxes, CRSs (poles, antimeridian) never crash the
planner, and no request in the OpenAPI schema makes the service answer 5xx."""

from __future__ import annotations

import math
from pathlib import Path

import httpx
import pytest
from affine import Affine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.plan import Grid, Header, Level, TileError, plan_asset, tile_grid
from tests.conftest import Server

TMS_IDS = [
    "WebMercatorQuad",
    "WGS1984Quad",
    "WorldCRS84Quad",
    "UTM31WGS84Quad",
    "UPSArcticWGS84Quad",
    "EuropeanETRS89_LAEAQuad",
]


def header(crs: str = "EPSG:32632") -> Header:
    levels = tuple(
        Level(
            Affine(30 * 2**i, 0, 300000, 0, -30 * 2**i, 5200000), 4096 >> i, 4096 >> i, 256, 256, ()
        )
        for i in range(4)
    )
    return Header(
        href="/x.tif", crs=crs, count=1, dtype="uint8", nodata=0, has_mask=False, levels=levels
    )


@settings(max_examples=150, deadline=None)
@given(
    tms=st.sampled_from(TMS_IDS),
    z=st.integers(-2, 30),
    x=st.integers(-5, 2**20),
    y=st.integers(-5, 2**20),
    size=st.sampled_from([1, 64, 256, 512]),
)
def test_any_tile_index_plans_or_says_why(tms: str, z: int, x: int, y: int, size: int) -> None:
    try:
        grid = tile_grid(tms, z, x, y, size)
    except TileError as exc:
        assert str(exc)
        return
    assert grid.width == size and all(math.isfinite(v) for v in grid.bounds)
    read = plan_asset("a", header(), grid, "nearest")
    if read is not None:
        col, row, w, h = read.window
        assert col >= 0 and row >= 0 and w > 0 and h > 0
        assert col + w <= 4096 >> read.level and row + h <= 4096 >> read.level
        dc, dr, dw, dh = read.dst_window
        assert dc >= 0 and dr >= 0 and dc + dw <= size and dr + dh <= size


lon = st.floats(-180, 180, allow_nan=False)
lat = st.floats(-90, 90, allow_nan=False)


@settings(max_examples=150, deadline=None)
@given(
    x0=lon,
    y0=lat,
    dx=st.floats(1e-6, 360),
    dy=st.floats(1e-6, 180),
    crs=st.sampled_from(["EPSG:32632", "EPSG:3857", "EPSG:4326", "EPSG:3413", "EPSG:32760"]),
    res=st.sampled_from(["nearest", "bilinear", "cubic", "average"]),
)
def test_random_lonlat_boxes_plan_without_crashing(x0, y0, dx, dy, crs, res) -> None:
    grid = Grid.from_bounds("EPSG:4326", (x0, y0, min(x0 + dx, 180), min(y0 + dy, 90)), 64, 64)
    if grid.bounds[2] <= grid.bounds[0] or grid.bounds[3] <= grid.bounds[1]:
        return
    read = plan_asset("a", header(crs), grid, res)
    if read is not None:
        assert read.window[2] > 0 and read.window[3] > 0


@pytest.fixture(scope="module")
def schema_server(demo_catalog: Path):
    server = Server(demo_catalog)
    yield server
    server.stop()


def test_openapi_fuzz_no_server_errors_nor_undocumented_answers(schema_server: Server) -> None:
    """schemathesis over every operation: no 5xx, and every status code and content type
    it meets is the one the OpenAPI document names for that operation."""
    import schemathesis
    from schemathesis.checks import content_type_conformance, status_code_conformance
    from schemathesis.core.failures import FailureGroup

    schema = schemathesis.openapi.from_url(f"{schema_server.url}/openapi.json")
    failures = []
    undocumented: set[tuple[str, int, str]] = set()
    calls: list[int] = []
    for operation in schema.get_all_operations():
        strategy = operation.ok().as_strategy()

        @settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
        @given(case=strategy)
        def check(case) -> None:
            response = case.call(base_url=schema_server.url, timeout=60)
            calls.append(response.status_code)
            if response.status_code >= 500 and response.status_code != 503:
                failures.append((case.operation.label, case.body, response.status_code))
            try:
                case.validate_response(
                    response, checks=[status_code_conformance, content_type_conformance]
                )
            except FailureGroup:
                kind = ",".join(response.headers.get("content-type", []))
                undocumented.add((case.operation.label, response.status_code, kind))

        check()
    assert len(calls) > 100 and any(code == 200 for code in calls)
    assert not failures, (failures[:5], schema_server.output()[-3000:])
    assert not undocumented, sorted(undocumented)


def test_openapi_document_is_valid_and_names_real_media_types(schema_server: Server) -> None:
    """The document a client generator reads: valid OpenAPI (openapi-spec-validator), tiles
    as images, WMTS as XML, every path template variable declared."""
    from openapi_spec_validator import validate

    spec = httpx.get(f"{schema_server.url}/openapi.json").json()
    validate(spec)
    tile = spec["paths"]["/tiles/{z}/{x}/{y}.{format}"]["get"]["responses"]
    assert {"image/png", "image/jpeg", "image/webp"} <= set(tile["200"]["content"])
    assert {"204", "400", "404", "502", "504", "503"} <= set(tile)
    wmts = spec["paths"]["/WMTSCapabilities.xml"]["get"]["responses"]["200"]["content"]
    assert "application/xml" in wmts and "image/png" in wmts
    assert "application/json" not in wmts
    for path in ("/healthz", "/readyz", "/metrics"):
        assert path in spec["paths"], path
