"""The conformance corpus: archives, STAC items and STAC-GeoParquet files made at test time.

Every file here is produced by tools nobody on the team wrote — GDAL (through rasterio) for the
rasters, rio-stac and pystac for the items, stac-geoparquet, GeoPandas and rustac for the
catalogs — so tests/test_conformance.py can check Terrazzo against rio-tiler and rasterio on
input shaped like what users bring, not like what our own writers happen to produce.

- `archives`: the raster archives (codecs, layouts, dtypes, CRSs), described by static specs so
  test ids exist at collection time, built on demand.
- `items`: STAC items for those rasters, one schema variant per archive.
- `writers`: the four ways a STAC-GeoParquet file gets written.
"""
