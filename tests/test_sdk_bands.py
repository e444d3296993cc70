"""Bands and time the way odc-stac and stackstac name them, and the same pixels as odc-stac's
own load on the same items and the same grid (the reference, run here, not numbers kept)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import odc.stac
import pystac
import pytest
from odc.geo.geobox import GeoBox
from terrazzo import Client

from core.chunks import group_key
from core.plan import ItemRead
from tests.conftest import Server, utm_area

READ = {"crs": "EPSG:32632", "resolution": 30, "progress": False}
TWO_DATES = {"lon": 9.35, "lat": 45.05}  # a 2024-06-01 and a 2024-09-01 strip overlap here


def test_bands_are_named_and_split_into_a_dataset(server: Server) -> None:
    bbox = utm_area(128, 30, lon=7.0)
    with Client(server.url) as client:
        visual = client.read(bbox, assets=["visual"], **READ)
        green = client.read(bbox, bands=["visual.2"], **READ)
        by_bidx = client.read(bbox, assets=["visual"], bidx=[2], **READ)
        both = client.read(bbox, bands=["visual", "dem"], dtype="float32", **READ)
        with pytest.raises(ValueError, match="one asset at a time"):
            client.read(bbox, bands=["visual.1", "dem"], **READ)
    assert list(visual.band.values) == ["visual.1", "visual.2", "visual.3"]
    assert list(green.band.values) == ["visual.2"]
    np.testing.assert_array_equal(green.values, by_bidx.values)
    np.testing.assert_array_equal(green.values[:, 0], visual.values[:, 1])
    assert list(both.band.values) == ["visual.1", "visual.2", "visual.3", "dem"]
    ds = visual.to_dataset(dim="band")
    assert set(ds.data_vars) == {"visual.1", "visual.2", "visual.3"}


def test_one_layer_per_datetime_by_default_with_item_ids(server: Server) -> None:
    bbox = utm_area(128, 30, **TWO_DATES)
    with Client(server.url) as client:
        layers = client.read(bbox, assets=["visual"], **READ)
        mosaic = client.read(bbox, assets=["visual"], groupby=None, **READ)
        solar = client.read(bbox, assets=["visual"], groupby="solar_day", **READ)
        lazy = client.open(bbox, assets=["visual"], chunks={"x": 64, "y": 64, "time": 1}, **READ)
    assert layers.sizes["time"] == 2 and mosaic.sizes["time"] == 1
    assert [str(t)[:16] for t in layers.time.values] == ["2024-06-01T10:30", "2024-09-01T10:30"]
    assert all(layers.id.values) and "2024-09-01" in layers.id.values[1]
    assert [str(t)[:10] for t in solar.time.values] == ["2024-06-01", "2024-09-01"]
    assert lazy.data.chunksize == (1, 3, 64, 64)
    np.testing.assert_array_equal(lazy.compute().values, layers.values)
    np.testing.assert_array_equal(list(lazy.id.values), list(layers.id.values))


def test_solar_day_follows_the_sun_not_utc() -> None:
    late = ItemRead(item_id="a", datetime="2024-06-01T23:30:00+00:00", reads=(), lon=30.0)
    west = ItemRead(item_id="b", datetime="2024-06-01T02:00:00+00:00", reads=(), lon=-120.0)
    assert group_key(late, "day") == "2024-06-01" and group_key(late, "solar_day") == "2024-06-02"
    assert group_key(west, "solar_day") == "2024-05-31"
    assert group_key(late, "time") == group_key(late, "datetime")
    assert group_key(late, "id") == group_key(late, "item")


def _items(catalog: Path) -> list[pystac.Item]:
    """The demo's items as pystac Items with absolute hrefs (what odc-stac is given)."""
    items = []
    for line in (catalog.parent / "items.ndjson").read_text().splitlines():
        item = json.loads(line)
        for asset in item["assets"].values():
            asset["href"] = str(catalog.parent / asset["href"])
        items.append(pystac.Item.from_dict(item))
    return items


@pytest.mark.parametrize(
    ("lon", "crs"),
    [(6.76, "EPSG:32632"), (5.2, "EPSG:32632"), (6.76, "EPSG:3857")],
    ids=["native", "zone-31-into-32", "web-mercator"],
)
def test_same_pixels_as_odc_stac_on_the_same_grid(
    server: Server, demo_catalog: Path, lon: float, crs: str
) -> None:
    """One item's interior (no mosaic order to differ on), nearest: Terrazzo's read and
    odc.stac.load agree on the grid exactly and on >= 99.5% of the pixels both have."""
    res = 30 if crs != "EPSG:3857" else 40
    bbox = utm_area(200, res, lon=lon, lat=45.0, crs=crs)
    with Client(server.url) as client:
        ours = client.read(bbox, crs=crs, resolution=res, assets=["visual"], progress=False)
    box = GeoBox.from_bbox(bbox, crs, resolution=res)
    bands = [str(b) for b in ours.band.values]  # odc-stac's names too: visual.1, visual.2, ...
    theirs = odc.stac.load(_items(demo_catalog), bands=bands, geobox=box, resampling="nearest")
    np.testing.assert_allclose(ours.x.values, theirs.x.values, rtol=0, atol=1e-6)
    np.testing.assert_allclose(ours.y.values, theirs.y.values, rtol=0, atol=1e-6)
    # odc-stac also keeps a layer for an item whose bbox (not footprint) meets the area
    layer = list(theirs.time.values.astype("datetime64[s]")).index(
        ours.time.values[0].astype("datetime64[s]")
    )
    reference = np.stack([theirs[b].values[layer] for b in bands])  # (band, y, x)
    mine = ours.values[0]
    both = (mine != 0).any(axis=0) & (reference != 0).any(axis=0)
    assert both.mean() > 0.9, "the area is inside the item"
    agree = (mine == reference).all(axis=0)[both].mean()
    assert agree >= 0.995, f"{agree:.4f} of valid pixels agree"
