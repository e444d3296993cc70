"""Each kind of `--catalog` source serves the same items: one file written by stac-geoparquet,
a directory of hive partitions written by pyarrow's dataset writer, a glob over some of them,
and objects on an S3-compatible server (moto's, started here), replaced while served.

The reference is always the same items as one stac-geoparquet file: every other source must
give the same search results, and a real server over the S3 catalog the same tile pixels.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import morecantile
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import shapely
import stac_geoparquet.arrow
from moto.server import ThreadedMotoServer

from core import filters
from core.catalog import Catalog, SearchQuery, SourceError
from core.engine import Engine, ReadParams
from core.plan import tile_grid
from core.settings import Settings
from tests.conftest import Server

TMS = morecantile.tms.get("WebMercatorQuad")
BUCKET = "stac-archive"
KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


def write_arrow(items: list[dict[str, Any]], out: Path) -> Path:
    """stac-geoparquet's own writer, as a user publishing a catalog runs it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stac_geoparquet.arrow.to_parquet(stac_geoparquet.arrow.parse_stac_items_to_arrow(items), out)
    return out


@pytest.fixture(scope="module")
def items(demo_catalog: Path) -> list[dict[str, Any]]:
    """The demo's STAC items (real COGs in three UTM zones) in two collections, with
    absolute hrefs, so every copy of the catalog reads the same files wherever it lies."""
    out = []
    lines = (demo_catalog.parent / "items.ndjson").read_text().splitlines()
    for n, line in enumerate(lines):
        item = json.loads(line)
        item["collection"] = "north" if n % 2 else "south"
        for asset in item["assets"].values():
            asset["href"] = str((demo_catalog.parent / asset["href"]).resolve())
        out.append(item)
    return out


@pytest.fixture(scope="module")
def single(items: list[dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_arrow(items, tmp_path_factory.mktemp("single") / "items.parquet")


@pytest.fixture(scope="module")
def partitioned(single: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same items as `collection=…/year=…/` partitions, by pyarrow's dataset writer (the
    columns partitioned on live in the paths only)."""
    table = pq.read_table(single)
    year = pc.year(table.column("datetime"))
    table = table.append_column("year", year.cast(pa.int32()))
    root = tmp_path_factory.mktemp("parts")
    pq.write_to_dataset(table, root, partition_cols=["collection", "year"])
    assert not any(root.glob("*.parquet")), "partitions only"
    return root


def boxes(catalog: Catalog) -> list[tuple[float, float, float, float]]:
    """A 5x5 grid of boxes over the catalog's extent, and the whole extent."""
    minx, miny, maxx, maxy = catalog.summary()["bbox"]
    dx, dy = (maxx - minx) / 5, (maxy - miny) / 5
    grid = [
        (minx + i * dx, miny + j * dy, minx + (i + 1) * dx, miny + (j + 1) * dy)
        for i in range(5)
        for j in range(5)
    ]
    return [*grid, (minx, miny, maxx, maxy)]


def results(
    catalog: Catalog, reference: Catalog | None = None, **query: Any
) -> list[list[tuple[str, str | None, str]]]:
    """Per box of the reference's extent: the items found, in mosaic order, as (id,
    collection, an href)."""
    out = []
    for box in boxes(reference or catalog):
        found = catalog.search_sync(
            SearchQuery(bbox=box, intersects=shapely.box(*box), limit=200, **query)
        )
        out.append([(i.id, i.collection, sorted(i.assets.values())[0]) for i in found])
    return out


@pytest.mark.parametrize("in_memory", [True, False])
def test_a_directory_of_hive_partitions_searches_like_the_single_file(
    single: Path, partitioned: Path, in_memory: bool
) -> None:
    one = Catalog(single, threads=1, in_memory=in_memory)
    parts = Catalog(partitioned, threads=1, in_memory=in_memory)
    try:
        assert parts.describe()["parts"] >= 2 and parts.in_memory is in_memory
        assert parts.columns["collection"] == "VARCHAR" and "year" in parts.columns
        expected = results(one)
        assert sum(map(len, expected)) > 20
        assert results(parts, one) == expected
        assert results(parts, one, collections=("north",)) == results(one, collections=("north",))
        assert parts.summary()["items"] == one.summary()["items"]
        # a partition key is a column like any other: filters and sortby take it
        years = {i.datetime.year for i in one.search_sync(SearchQuery(limit=1000))}
        for year in years:
            tree = filters.parse({"op": "=", "args": [{"property": "year"}, year]})
            found = parts.search_sync(SearchQuery(filter=tree, limit=1000))
            assert found and {i.datetime.year for i in found} == {year}
    finally:
        one.close()
        parts.close()


def test_a_glob_serves_only_the_partitions_it_names(single: Path, partitioned: Path) -> None:
    one = Catalog(single, threads=1)
    north = Catalog(str(partitioned / "collection=north" / "**" / "*.parquet"), threads=1)
    try:
        assert north.parts and all("/collection=north/" in p.path for p in north.parts)
        assert north.summary()["items"] < one.summary()["items"]
        assert results(north, one) == results(one, collections=("north",))
    finally:
        one.close()
        north.close()


def test_a_source_with_nothing_to_serve_says_what_was_looked_for(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no parquet files"):
        Catalog(tmp_path / "empty")
    with pytest.raises(SourceError, match="no parquet files"):
        Catalog(str(tmp_path / "nothing-*.parquet"))
    with pytest.raises(FileNotFoundError, match="catalog not found"):
        Catalog(tmp_path / "missing.parquet")


def test_the_on_disk_snapshot_is_built_once_per_version(
    single: Path, tmp_path: Path, items: list[dict[str, Any]]
) -> None:
    path = write_arrow(items, tmp_path / "cat" / "items.parquet")
    first = Catalog(path, threads=1, in_memory=False, cache=tmp_path / "cache")
    built = first.snapshot_path
    assert built is not None and built.is_file()
    stamp = built.stat().st_mtime_ns
    first.close()
    again = Catalog(path, threads=1, in_memory=False, cache=tmp_path / "cache")
    try:
        assert again.snapshot_path == built and built.stat().st_mtime_ns == stamp  # not rebuilt
        assert again.summary()["items"] == len(items)
        write_arrow(items[:5], tmp_path / "cat" / "staged.parquet").replace(path)
        assert again.reload_if_replaced(every_s=0)
        assert again.summary()["items"] == 5 and again.snapshot_path != built
        assert built.exists(), "searches still running may read the version before"
        write_arrow(items[:3], tmp_path / "cat" / "staged.parquet").replace(path)
        assert again.reload_if_replaced(every_s=0) and again.summary()["items"] == 3
        assert not built.exists(), "the version before last is removed"
        assert len(list((tmp_path / "cache" / "snapshots").glob("*.duckdb"))) == 2
    finally:
        again.close()


# -- object stores --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3() -> Iterator[tuple[str, Any]]:
    """moto's S3 server on 127.0.0.1 and a client for it."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    client.create_bucket(Bucket=BUCKET)
    yield endpoint, client
    server.stop()


def s3_env(endpoint: str) -> dict[str, str]:
    return {
        **KEYS,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_REGION": "us-east-1",
        "AWS_ALLOW_HTTP": "true",
    }


@pytest.fixture
def aws(s3: tuple[str, Any], monkeypatch: pytest.MonkeyPatch) -> Any:
    for name, value in s3_env(s3[0]).items():
        monkeypatch.setenv(name, value)
    return s3[1]


def test_an_object_store_catalog_is_read_and_a_replaced_object_picked_up(
    aws: Any, single: Path, items: list[dict[str, Any]], tmp_path: Path
) -> None:
    aws.put_object(Bucket=BUCKET, Key="one/items.parquet", Body=single.read_bytes())
    local = Catalog(single, threads=1)
    remote = Catalog(f"s3://{BUCKET}/one/items.parquet", threads=1, cache=tmp_path / "cache")
    try:
        assert remote.local_root is None and remote.describe()["parts"] == 1
        assert results(remote, local) == results(local)
        version = remote.version
        assert not remote.reload_if_replaced(every_s=0), "unchanged: no rebuild"
        aws.put_object(Bucket=BUCKET, Key="one/items.parquet", Body=b"PAR1 half a file")
        assert not remote.reload_if_replaced(every_s=0), "a broken replacement is ignored"
        assert remote.summary()["items"] == len(items) and remote.version == version
        fewer = write_arrow(items[:4], tmp_path / "fewer.parquet")
        aws.put_object(Bucket=BUCKET, Key="one/items.parquet", Body=fewer.read_bytes())
        assert remote.reload_if_replaced(every_s=0)
        assert remote.summary()["items"] == 4 and remote.version != version
    finally:
        local.close()
        remote.close()


def test_an_object_store_prefix_of_partitions_searches_like_the_single_file(
    aws: Any, single: Path, partitioned: Path, tmp_path: Path
) -> None:
    for path in partitioned.rglob("*.parquet"):
        key = f"parts/{path.relative_to(partitioned).as_posix()}"
        aws.put_object(Bucket=BUCKET, Key=key, Body=path.read_bytes())
    local = Catalog(single, threads=1)
    remote = Catalog(f"s3://{BUCKET}/parts/", threads=1, cache=tmp_path / "cache")
    north = Catalog(
        f"s3://{BUCKET}/parts/collection=north/*/*.parquet", threads=1, cache=tmp_path / "c2"
    )
    try:
        assert results(remote, local) == results(local)
        assert "year" in remote.columns
        assert results(north, local) == results(local, collections=("north",))
    finally:
        for c in (local, remote, north):
            c.close()


def s3_items(items: list[dict[str, Any]], client: Any) -> list[dict[str, Any]]:
    """The items with their COGs uploaded to the bucket and s3:// hrefs."""
    out = []
    for item in items:
        item = json.loads(json.dumps(item))
        for asset in item["assets"].values():
            key = "cogs/" + Path(asset["href"]).name
            client.put_object(Bucket=BUCKET, Key=key, Body=Path(asset["href"]).read_bytes())
            asset["href"] = f"s3://{BUCKET}/{key}"
        out.append(item)
    return out


async def test_a_server_over_an_s3_catalog_serves_tiles_and_takes_a_new_catalog_live(
    s3: tuple[str, Any],
    items: list[dict[str, Any]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    endpoint, client = s3
    remote_items = s3_items(items, client)
    whole = write_arrow(remote_items, tmp_path / "whole.parquet")
    client.put_object(Bucket=BUCKET, Key="live/items.parquet", Body=whole.read_bytes())
    env = {**s3_env(endpoint), "TERRAZZO_CATALOG_REFRESH_S": "0.5"}
    for name, value in s3_env(endpoint).items():
        monkeypatch.setenv(name, value)
    # the reference: the same items as a local file, read in this process (same COGs on S3)
    engine = Engine(Settings(catalog=whole, compute_workers=1))
    server = Server(f"s3://{BUCKET}/live/items.parquet", env=env)  # type: ignore[arg-type]
    try:
        minx, miny, maxx, maxy = engine.catalog.summary()["bbox"]
        tile = TMS.tile((minx + maxx) / 2, (miny + maxy) / 2, 11)
        got = httpx.get(f"{server.url}/tiles/{tile.z}/{tile.x}/{tile.y}.npy", timeout=60)
        assert got.status_code == 200, got.text
        assert int(got.headers["X-Terrazzo-Items"]) >= 1
        want = await engine.read(
            tile_grid("WebMercatorQuad", tile.z, tile.x, tile.y), SearchQuery(), ReadParams()
        )
        array = np.load(io.BytesIO(got.content))  # the data bands, then the mask band
        assert want.valid.any()
        assert np.array_equal(array[:-1], want.data)
        assert np.array_equal(array[-1] > 0, want.valid)
        assert httpx.get(f"{server.url}/info").json()["items"] == len(items)
        # a new catalog object at the same key is served without a restart
        under = [
            i
            for i in remote_items
            if shapely.box(*i["bbox"]).intersects(shapely.box(*TMS.bounds(tile)))
        ]
        keep = [i for i in remote_items if i not in under[:1]]
        client.put_object(
            Bucket=BUCKET,
            Key="live/items.parquet",
            Body=write_arrow(keep, tmp_path / "keep.parquet").read_bytes(),
        )
        deadline = time.monotonic() + 30
        while httpx.get(f"{server.url}/info").json()["items"] != len(keep):
            assert time.monotonic() < deadline, "the replaced catalog was not taken"
            time.sleep(0.3)
        again = httpx.get(
            f"{server.url}/tiles/{tile.z}/{tile.x}/{tile.y}.npy",
            params={"skipcovered": "false", "exitwhenfull": "false"},
            timeout=60,
        )
        assert again.status_code in (200, 204)
        assert again.headers["ETag"] != got.headers["ETag"], "a new catalog, new ETags"
    finally:
        output = server.stop()
        await engine.fetcher.stores.aclose()
        engine.close()
    assert "Traceback" not in output, output[-3000:]
