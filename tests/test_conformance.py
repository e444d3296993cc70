"""The conformance corpus: Terrazzo against the reference implementation, on input made by
tools nobody on the team wrote.

Rasters come from GDAL (tests.corpus.archives), items from rio-stac and pystac
(tests.corpus.items), catalogs from stac-geoparquet's arrow writer, its GeoPandas path, rustac
and `terrazzo index` (tests.corpus.writers). Every check goes through a real `terrazzo serve`
(one per catalog file, shared by the checks of that file) and is parametrized by
writer × archive, so a failure names the exact row:

- tiles at the archive's native zoom and two coarser ones against rio-tiler (`Reader.tile` per
  item, `mosaic_reader` with the `first` method, newest first — Terrazzo's default order —,
  nearest): at least 99.9% of the pixels valid in both are equal, and the masks agree except
  within two pixels of a mask edge, where the two warpers' sub-pixel footprints may legitimately
  differ;
- /point against rasterio's own pixel at that lon/lat, item by item;
- a POST /chunks read against `rasterio.warp.reproject` of the same file onto the same grid.

JPEG archives are compared within ±3 of GDAL's decode: JPEG fixes the bitstream, not the
decoder's output — libjpeg-turbo's IDCT and its "fancy" chroma upsampling are not the only
valid choices, and a conforming decoder may round differently by a grey level or two.

The last test reads the README's "What Terrazzo reads" table and fails unless every row of it
has a corpus case that ran in this session and passed every check, so the table cannot claim
more than the corpus proves.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import morecantile
import numpy as np
import pytest
import rasterio
from pyproj import Transformer
from rasterio.enums import ColorInterp, Resampling
from rasterio.transform import from_bounds
from rasterio.warp import reproject
from rio_tiler.errors import TileOutsideBounds
from rio_tiler.io import Reader
from rio_tiler.models import ImageData
from rio_tiler.mosaic import mosaic_reader
from rio_tiler.mosaic.methods import FirstMethod
from terrazzo.framing import parse_frames

from tests.conftest import Server
from tests.corpus.archives import BY_NAME, POINTS, PROBE, SPECS, Archive, ArchiveSpec, build
from tests.corpus.items import stac_items
from tests.corpus.writers import WRITERS, write, write_one

TMS = morecantile.tms.get("WebMercatorQuad")
EQUAL_SHARE = 0.999  # of the pixels valid on both sides
JPEG_TOLERANCE = 3  # grey levels, see the module docstring
EDGE_PX = 2
README = Path(__file__).resolve().parents[1] / "README.md"
CASES = [pytest.param(w, s.name, id=f"{w}-{s.name}") for w in WRITERS for s in SPECS]
STEPS = pytest.mark.parametrize("step", [0, 1, 2], ids=["native", "native-1", "native-2"])
# (check, writer, archive) -> passed; filled as the checks run, read by the README test.
OUTCOMES: dict[tuple[str, str, str], bool] = {}


@dataclass
class Corpus:
    """The archives, their items, every writer's catalogs, and a server per catalog file."""

    root: Path
    archives: dict[str, Archive]
    items: dict[str, list[dict[str, Any]]]
    catalogs: dict[str, dict[str, Path] | Exception] = field(default_factory=dict)
    servers: dict[Path, Server] = field(default_factory=dict)
    refused: dict[Path, str] = field(default_factory=dict)  # files the server would not start on
    references: dict[tuple, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def server(self, writer: str, archive: str) -> Server:
        """The running server of the file holding `archive` as `writer` wrote it (started on
        first use); the writer's own error when it could not write the file."""
        catalogs = self.catalogs[writer]
        if isinstance(catalogs, Exception):
            raise AssertionError(f"{writer} could not write the corpus: {catalogs}")
        path = catalogs[archive]
        if path in self.refused:
            raise AssertionError(f"terrazzo serve refused {path.name}: {self.refused[path]}")
        if path not in self.servers:
            try:
                self.servers[path] = Server(path)
            except RuntimeError as exc:  # once per file, not once per check
                self.refused[path] = str(exc)[-2000:]
                raise
        return self.servers[path]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Corpus]:
    root = tmp_path_factory.mktemp("corpus")
    archives = {spec.name: build(spec, root / "archives") for spec in SPECS}
    found = Corpus(root, archives, {name: stac_items(a) for name, a in archives.items()})
    for writer in WRITERS:
        try:
            found.catalogs[writer] = write(writer, found.items, root)
        except Exception as exc:  # reported by every row of this writer
            found.catalogs[writer] = exc
    yield found
    for server in found.servers.values():
        server.stop()


def native_zoom(spec: ArchiveSpec) -> int:
    """The coarsest zoom whose pixel is no larger than the archive's finest pixel."""
    lat = math.radians(spec.center[1])
    return math.ceil(math.log2(2 * math.pi * 6378137 / 256 * math.cos(lat) / spec.res_m))


def near_edges(mask: np.ndarray, radius: int = EDGE_PX) -> np.ndarray:
    """Pixels within `radius` of a change in `mask`."""
    padded = np.pad(mask, radius, mode="edge")
    h, w = mask.shape
    grown = np.zeros_like(mask)
    shrunk = np.ones_like(mask)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            window = padded[dy : dy + h, dx : dx + w]
            grown |= window
            shrunk &= window
    return grown & ~shrunk


def compare(
    ours: np.ndarray,
    our_valid: np.ndarray,
    theirs: np.ndarray,
    their_valid: np.ndarray,
    *,
    lossy: bool,
    what: str,
    min_valid: int = 500,
) -> None:
    """Fail with the figures unless the two reads agree (see the module docstring)."""
    assert ours.shape == theirs.shape, f"{what}: shape {ours.shape}, reference {theirs.shape}"
    assert ours.dtype == theirs.dtype, f"{what}: dtype {ours.dtype}, reference {theirs.dtype}"
    differs = our_valid != their_valid
    far = differs & ~near_edges(their_valid)
    both = our_valid & their_valid
    assert both.sum() >= min_valid, f"{what}: only {both.sum()} pixels valid on both sides"
    diff = np.abs(ours.astype("float64") - theirs.astype("float64"))[:, both]
    tolerance = JPEG_TOLERANCE if lossy else 0
    equal = (diff <= tolerance).all(axis=0).mean()
    figures = (
        f"{what}: {equal:.4%} of {both.sum()} valid pixels equal"
        f"{f' within ±{tolerance}' if tolerance else ''} (max |diff| {diff.max():g}); "
        f"masks differ at {differs.sum()} px, {far.sum()} of them away from edges "
        f"(ours {our_valid.sum()} valid, reference {their_valid.sum()})"
    )
    assert not far.any(), figures
    assert equal >= EQUAL_SHARE, figures


def rio_tiler_tile(corpus: Corpus, archive: str, asset: str, tile: morecantile.Tile):
    """rio-tiler's mosaic of the archive's items (newest first, `first`, nearest); cached
    across writers, who all serve the same files."""
    key = (archive, asset, tile.z, tile.x, tile.y)
    if key not in corpus.references:
        hrefs = [str(i.assets[asset]) for i in corpus.archives[archive].newest_first()]

        def read(href: str, x: int, y: int, z: int, **kwargs: Any) -> ImageData:
            with Reader(href) as src:
                return src.tile(x, y, z, **kwargs)

        img, _ = mosaic_reader(
            hrefs,
            read,
            tile.x,
            tile.y,
            tile.z,
            pixel_selection=FirstMethod(),
            threads=0,
            allowed_exceptions=(TileOutsideBounds,),
            resampling_method="nearest",
            reproject_method="nearest",
        )
        corpus.references[key] = (img.data, ~np.ma.getmaskarray(img.array).all(axis=0))
    return corpus.references[key]


@STEPS
@pytest.mark.parametrize(("writer", "archive"), CASES)
def test_tile_matches_rio_tiler(corpus: Corpus, writer: str, archive: str, step: int) -> None:
    check = f"tile-{step}"
    OUTCOMES[(check, writer, archive)] = False
    spec = BY_NAME[archive]
    server = corpus.server(writer, archive)
    tile = TMS.tile(*corpus.archives[archive].lonlat_at(*PROBE), native_zoom(spec) - step)
    for asset in spec.assets:
        r = httpx.get(
            f"{server.url}/tiles/WebMercatorQuad/{tile.z}/{tile.x}/{tile.y}.npy",
            params={"assets": asset.key, "collections": archive, "resampling": "nearest"},
            timeout=60,
        )
        assert r.status_code == 200, f"{asset.key}: {r.status_code} {r.text[:500]}"
        assert "X-Terrazzo-Errors" not in r.headers, r.headers["X-Terrazzo-Errors"]
        ours = np.load(io.BytesIO(r.content))
        theirs, their_valid = rio_tiler_tile(corpus, archive, asset.key, tile)
        compare(
            ours[:-1],
            ours[-1] == 255,
            theirs,
            their_valid,
            lossy=spec.lossy,
            what=f"{asset.key} z{tile.z}/{tile.x}/{tile.y}",
        )
    OUTCOMES[(check, writer, archive)] = True


def colour_bands(ds: rasterio.DatasetReader) -> list[int]:
    """The bands that carry data: GDAL makes an alpha band the dataset's mask (rio-tiler and
    TiTiler return the other bands), so it is validity, not a value."""
    return [i + 1 for i, c in enumerate(ds.colorinterp) if c != ColorInterp.alpha]


def rasterio_pixel(path: Path, lon: float, lat: float) -> list[float | None] | None:
    """The file's own pixel at lon/lat (None per band where masked); None when outside."""
    with rasterio.open(path) as ds:
        x, y = Transformer.from_crs("EPSG:4326", ds.crs, always_xy=True).transform(lon, lat)
        row, col = ds.index(x, y)
        if not (0 <= row < ds.height and 0 <= col < ds.width):
            return None
        window = ((row, row + 1), (col, col + 1))
        values = ds.read(colour_bands(ds), window=window)[:, 0, 0]
        valid = ds.dataset_mask(window=window)[0, 0] > 0
    return [float(v) if valid else None for v in values]


@pytest.mark.parametrize(("writer", "archive"), CASES)
def test_point_matches_rasterio(corpus: Corpus, writer: str, archive: str) -> None:
    OUTCOMES[("point", writer, archive)] = False
    spec = BY_NAME[archive]
    found = corpus.archives[archive]
    server = corpus.server(writer, archive)
    for fx, fy in POINTS:
        lon, lat = found.lonlat_at(fx, fy)
        for asset in spec.assets:
            want = {
                item.id: pixel
                for item in found.newest_first()
                if (pixel := rasterio_pixel(item.assets[asset.key], lon, lat)) is not None
            }
            r = httpx.get(
                f"{server.url}/point/{lon},{lat}",
                params={"assets": asset.key, "collections": archive},
                timeout=60,
            )
            assert r.status_code == 200, f"{asset.key}: {r.status_code} {r.text[:500]}"
            got = r.json()["items"]
            where = f"{asset.key} at ({lon:.6f}, {lat:.6f})"
            assert [i["id"] for i in got] == list(want), f"{where}: items {got}"
            for item in got:
                assert "error" not in item, f"{where}: {item['id']}: {item['error']}"
                values = item["assets"][asset.key]["values"]
                tolerance = JPEG_TOLERANCE if spec.lossy else 0
                assert values == pytest.approx(want[item["id"]], abs=tolerance), (
                    f"{where}: {item['id']} {values}, rasterio {want[item['id']]}"
                )
    OUTCOMES[("point", writer, archive)] = True


def chunk_grid(found: Archive, size: int = 128) -> tuple[str, list[float]]:
    """A grid in another CRS than the top item's (lon/lat for projected items, else the UTM
    zone), centred on the probe, at about the data's resolution."""
    spec = found.spec
    lon, lat = found.lonlat_at(*PROBE)
    if found.items[-1].crs == "EPSG:4326":
        crs = f"EPSG:{32600 + int((lon + 180) // 6) + 1}"
        rx = ry = spec.res_m
    else:
        crs = "EPSG:4326"
        ry = spec.res_m / 111_320.0
        rx = ry / math.cos(math.radians(lat))
    cx, cy = Transformer.from_crs("EPSG:4326", crs, always_xy=True).transform(lon, lat)
    half_x, half_y = size / 2 * rx, size / 2 * ry
    return crs, [cx - half_x, cy - half_y, cx + half_x, cy + half_y]


def rasterio_reproject(
    path: Path, crs: str, bbox: list[float], size: int
) -> tuple[np.ndarray, np.ndarray]:
    """The file warped by GDAL (nearest) onto the grid, and its dataset mask warped alike."""
    transform = from_bounds(*bbox, size, size)
    with rasterio.open(path) as ds:
        bands = colour_bands(ds)
        data = np.zeros((len(bands), size, size), dtype=ds.dtypes[0])
        for out, band in zip(data, bands, strict=True):
            reproject(
                rasterio.band(ds, band),
                out,
                dst_transform=transform,
                dst_crs=crs,
                resampling=Resampling.nearest,
            )
        mask = np.zeros((size, size), dtype=np.uint8)
        reproject(
            ds.dataset_mask(),
            mask,
            src_transform=ds.transform,
            src_crs=ds.crs,
            dst_transform=transform,
            dst_crs=crs,
            resampling=Resampling.nearest,
        )
    return data, mask > 0


@pytest.mark.parametrize(("writer", "archive"), CASES)
def test_chunks_match_rasterio_reproject(corpus: Corpus, writer: str, archive: str) -> None:
    OUTCOMES[("chunks", writer, archive)] = False
    spec = BY_NAME[archive]
    found = corpus.archives[archive]
    top = found.items[-1]
    server = corpus.server(writer, archive)
    crs, bbox = chunk_grid(found)
    for asset in spec.assets:
        size = 128 // asset.factor
        body = {
            "crs": crs,
            "chunks": [{"id": "c", "bbox": bbox, "width": size, "height": size}],
            "assets": [asset.key],
            "ids": [top.id],
            "collections": [archive],
        }
        r = httpx.post(f"{server.url}/chunks", json=body, timeout=60)
        assert r.status_code == 200, f"{asset.key}: {r.status_code} {r.text[:500]}"
        frames = parse_frames(r.content)
        assert frames[-1].status == "end"
        (chunk,) = frames[:-1]
        assert chunk.status == "ok", f"{asset.key}: {chunk.status} {chunk.header}"
        assert chunk.header["transform"] == pytest.approx(list(from_bounds(*bbox, size, size))[:6])
        data, valid = rasterio_reproject(top.assets[asset.key], crs, bbox, size)
        compare(
            chunk.data[0],
            chunk.mask[0],
            data,
            valid,
            lossy=spec.lossy,
            what=f"{asset.key} {crs} chunk",
        )
    OUTCOMES[("chunks", writer, archive)] = True


def test_terrazzo_index_writes_the_whole_corpus_in_one_file(corpus: Corpus) -> None:
    """Users index whatever their NDJSON holds: every archive's items, schemas mixed, in one
    catalog (the per-group files above exist because rustac cannot; `terrazzo index` must)."""
    items = [i for group in corpus.items.values() for i in group]
    out = write_one("terrazzo-index", items, corpus.root / "terrazzo-index-mixed.parquet")
    server = Server(out)
    try:
        info = httpx.get(f"{server.url}/info", timeout=30).json()
    finally:
        server.stop()
    assert info["items"] == len(items)


def readme_rows() -> list[str]:
    """The corpus tags of the README's "What Terrazzo reads" table (its last column)."""
    text = README.read_text()
    start = text.index("## What Terrazzo reads")
    end = text.find("\n## ", start + 1)
    section = text[start : end if end != -1 else None]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    tags = []
    for line in rows[2:]:  # after the header and the --- line
        cells = [c.strip() for c in line.strip("|").split("|")]
        found = re.fullmatch(r"`([a-z]+:[A-Za-z0-9.-]+)`", cells[-1])
        assert found, f"README row without a corpus tag in its last column: {line}"
        tags.append(found.group(1))
    return tags


def case_tags(writer: str, archive: str) -> set[str]:
    """What one writer × archive case proves when it passes."""
    spec = BY_NAME[archive]
    validity = set()
    for asset in spec.assets:
        if asset.alpha:
            validity.add("validity:alpha")
        elif asset.mask:
            validity.add("validity:mask")
        elif asset.nodata is not None and math.isnan(asset.nodata):
            validity.add("validity:nan")
        elif asset.nodata is not None:
            validity.add("validity:nodata")
        if asset.scale is not None:
            validity.add("validity:scale-offset")
    timing = {"time:null-datetime"} if spec.timeless else set()
    return {f"writer:{writer}", *spec.tags, *validity, *timing}


def test_readme_table_claims_only_what_the_corpus_proved() -> None:
    """Runs last: every README row needs a corpus case carrying its tag that ran in this
    session and passed all its checks (three tile zooms, point, chunks)."""
    tags = readme_rows()
    assert len(tags) >= 20, "the table lists writers, schema variants, codecs and layouts"
    checks = ["tile-0", "tile-1", "tile-2", "point", "chunks"]
    unproven = []
    for tag in tags:
        cases = {(w, a) for (_, w, a) in OUTCOMES if tag in case_tags(w, a)}
        if not cases:
            unproven.append(f"{tag}: no corpus case ran (run the whole module)")
        elif not any(all(OUTCOMES.get((k, *case)) for k in checks) for case in cases):
            failed = ", ".join(sorted(f"{w}-{a}" for w, a in cases))
            unproven.append(f"{tag}: every case failed a check ({failed})")
    assert not unproven, "README claims more than the corpus proved:\n" + "\n".join(unproven)
