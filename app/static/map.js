/* Terrazzo map viewer.
 *
 * The mosaic is a MapLibre raster source built from /tilejson.json with the current
 * parameters (so the tile URLs are the server's own template); item outlines come from
 * /items?bbox=<view>; clicking asks /point/{lon},{lat} for every covering item's pixel values.
 * Tiles are fetched through a MapLibre protocol ("terrazzo://"), so the page reads each tile's
 * X-Terrazzo-Truncated / X-Terrazzo-Errors headers: incomplete tiles in view are outlined (red
 * dashed and hatched: items left out by a search limit; orange: an item could not be read) and
 * counted in #tile-status. Complete tiles are never marked.
 * Plain script, no build step: MapLibre is vendored under static/vendor/.
 * Every URL is relative to the page, so the viewer also works under a proxy's path prefix.
 */
"use strict";

const state = {
  map: null,
  tilejson: null,
  assets: {}, // asset name -> item_assets entry (type, roles, raster:bands…)
  dates: [],
  ranges: {}, // "asset|datetime|collection" -> [lo, hi] sampled from a tile
  idle: false,
  tileUrls: [],
  pointSeq: 0,
  lastPoint: null,
  // tiles of the current parameters whose response said they are incomplete:
  // "z/x/y" -> {z, x, y, url, truncated, errors}; cleared when the parameters change
  tileMarks: new Map(),
  tileGen: 0, // bumped by every parameter change; late responses of older ones are dropped
  tileZoom: null, // the zoom of the tiles MapLibre draws now (null: below the minzoom)
  incomplete: [], // the marks drawn (in view, at tileZoom), for the status line and the tests
};
window.terrazzo = state; // for the console and the browser tests

const $ = (id) => document.getElementById(id);

// A service started with TERRAZZO_API_KEY wants the key on every data request: open the page
// as /map#key=KEY (a fragment is never sent to a server nor logged); it is kept for the tab.
const hashKey = new URLSearchParams(location.hash.slice(1)).get("key");
if (hashKey) sessionStorage.setItem("terrazzo-key", hashKey);
const apiKey = sessionStorage.getItem("terrazzo-key");
const keyHeaders = apiKey ? { "X-API-Key": apiKey } : {};
const authFetch = (url) => fetch(url, { headers: keyHeaders });
const api = (path, params) => {
  const url = new URL(path, document.baseURI);
  if (params && [...params].length) url.search = params.toString();
  return url.toString();
};

function setStatus(text, error = false) {
  const status = $("status");
  status.textContent = text;
  status.classList.toggle("error", error);
}

async function getJSON(url) {
  const response = await authFetch(url);
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    /* not JSON */
  }
  if (!response.ok) {
    if (response.status === 401) throw new Error("this service needs an API key: open /map#key=YOUR_KEY");
    throw new Error((body && body.detail) || `${response.status} ${response.statusText}`);
  }
  return body;
}

/* -- parameters ------------------------------------------------------------------------- */

function searchParams() {
  // what selects and reads items: shared by tiles, /items and /point
  const params = new URLSearchParams();
  if ($("collection").value) params.set("collections", $("collection").value);
  if ($("date").value) params.set("datetime", $("date").value);
  if ($("asset").value) params.set("assets", $("asset").value);
  return params;
}

function tileParams() {
  const params = searchParams();
  params.set("method", $("method").value);
  const rescale = $("rescale").value.trim();
  if (rescale) params.set("rescale", rescale);
  if ($("colormap").value) params.set("colormap_name", $("colormap").value);
  return params;
}

function assetInfo(name) {
  const bands = (state.assets[name] || {})["raster:bands"] || [];
  const first = bands[0] || {};
  return { bands: bands.length || null, dtype: first.data_type || null, stats: first.statistics };
}

const fmt = (v) => (Number.isInteger(v) ? String(v) : String(Number(v.toPrecision(5))));

/* -- a value range for non-8-bit assets, from the statistics or one sampled tile -------- */

function lngLatToTile(lng, lat, z) {
  const n = 2 ** z;
  const rad = (Math.max(-85, Math.min(85, lat)) * Math.PI) / 180;
  const x = Math.floor(((lng + 180) / 360) * n);
  const y = Math.floor(((1 - Math.log(Math.tan(rad) + 1 / Math.cos(rad)) / Math.PI) / 2) * n);
  const clamp = (v) => Math.max(0, Math.min(n - 1, v));
  return [clamp(x), clamp(y)];
}

function parseNpy(buffer) {
  // NumPy .npy v1-3: magic, version, header length, a Python-dict header, then the data
  const bytes = new Uint8Array(buffer);
  const view = new DataView(buffer);
  const major = bytes[6];
  const headerLength = major === 1 ? view.getUint16(8, true) : view.getUint32(8, true);
  const start = major === 1 ? 10 : 12;
  const header = new TextDecoder().decode(bytes.subarray(start, start + headerLength));
  const descr = /'descr':\s*'([^']+)'/.exec(header)[1];
  const shape = /'shape':\s*\(([^)]*)\)/.exec(header)[1].split(",").filter((s) => s.trim()).map(Number);
  const kinds = {
    "|u1": Uint8Array, "|i1": Int8Array, "<u2": Uint16Array, "<i2": Int16Array,
    "<u4": Uint32Array, "<i4": Int32Array, "<f4": Float32Array, "<f8": Float64Array,
  };
  const Kind = kinds[descr];
  if (!Kind) return null;
  const count = shape.reduce((a, b) => a * b, 1);
  const offset = start + headerLength; // a multiple of 64: aligned for typed arrays
  return { data: new Kind(buffer.slice(offset, offset + count * Kind.BYTES_PER_ELEMENT)), shape };
}

function validRange(array) {
  // 2nd..98th percentile of the valid pixels of every band (the last band is the mask)
  const [bands, height, width] = array.shape;
  const n = height * width;
  const mask = array.data.subarray((bands - 1) * n);
  const step = Math.max(1, Math.floor(n / 20000));
  const values = [];
  for (let b = 0; b < bands - 1; b++) {
    for (let i = 0; i < n; i += step) {
      const v = array.data[b * n + i];
      if (mask[i] > 0 && Number.isFinite(v)) values.push(v);
    }
  }
  if (values.length < 16) return null;
  values.sort((a, b) => a - b);
  const lo = values[Math.floor(values.length * 0.02)];
  const hi = values[Math.floor(values.length * 0.98)];
  return hi > lo ? [lo, hi] : [lo, lo + 1];
}

async function sampleRange(asset) {
  const info = assetInfo(asset);
  if (info.stats && Number.isFinite(info.stats.minimum) && Number.isFinite(info.stats.maximum)) {
    return [info.stats.minimum, info.stats.maximum];
  }
  const key = `${asset}|${$("date").value}|${$("collection").value}`;
  if (state.ranges[key]) return state.ranges[key];
  const tj = state.tilejson;
  const places = [];
  if (state.map) {
    const c = state.map.getCenter();
    const z = Math.max(tj.minzoom, Math.min(tj.maxzoom, Math.floor(state.map.getZoom())));
    places.push([c.lng, c.lat, z]);
  }
  places.push([tj.center[0], tj.center[1], tj.minzoom]);
  for (const [lng, lat, z] of places) {
    const [x, y] = lngLatToTile(lng, lat, z);
    const params = searchParams();
    params.set("assets", asset);
    try {
      const response = await authFetch(api(`tiles/WebMercatorQuad/${z}/${x}/${y}.npy`, params));
      if (response.status !== 200) continue;
      const array = parseNpy(await response.arrayBuffer());
      const range = array && validRange(array);
      if (range) return (state.ranges[key] = range);
    } catch (_) {
      /* try the next place */
    }
  }
  return null;
}

async function applyDefaults() {
  // a rescale (and a colormap for one band) the chosen asset and method need to render
  const asset = $("asset").value;
  const method = $("method").value;
  const info = assetInfo(asset);
  const eightBit = !info.dtype || info.dtype === "uint8" || info.dtype === "int8";
  let rescale = "";
  if (method === "count") {
    rescale = `0,${Math.max(2, 2 * state.dates.length)}`;
  } else if (!eightBit) {
    const range = await sampleRange(asset);
    if (!range) {
      setStatus(`No pixels of ${asset} here to guess a rescale from: type one (min,max).`, true);
    } else if (method === "stdev") {
      rescale = `0,${fmt((range[1] - range[0]) / 4)}`;
    } else {
      rescale = `${fmt(range[0])},${fmt(range[1])}`;
    }
  } else if (method === "stdev") {
    rescale = "0,64";
  }
  $("rescale").value = rescale;
  let colormap = "";
  if (info.bands === 1 && rescale) {
    colormap = /dem|dtm|dsm|elev|height/i.test(asset) ? "terrain" : "viridis";
  }
  $("colormap").value = colormap;
}

/* -- incomplete tiles: read each tile's headers ---------------------------------------- */

const PROTOCOL = "terrazzo";
const TILE_PATH = /\/tiles\/WebMercatorQuad\/(\d+)\/(\d+)\/(\d+)(?:[.@?]|$)/;
const LIMIT_WORDS = {
  items_limit: "item limit reached",
  scan_limit: "candidate limit reached",
  time_limit: "search time limit reached",
};

async function fetchTile(params, abortController) {
  // MapLibre (v4+) protocol: an async function returning {data}; errors look like its own
  const url = params.url.slice(PROTOCOL.length + 3);
  const gen = state.tileGen;
  const response = await fetch(url, { headers: keyHeaders, signal: abortController.signal });
  const data = await response.arrayBuffer();
  if (gen === state.tileGen) noteTile(url, response.headers);
  if (!response.ok) {
    const error = new Error(`AJAXError: ${response.statusText} (${response.status}): ${url}`);
    Object.assign(error, { status: response.status, statusText: response.statusText, url });
    error.body = new Blob([data]);
    throw error;
  }
  return {
    data,
    cacheControl: response.headers.get("Cache-Control"),
    expires: response.headers.get("Expires"),
  };
}

function noteTile(url, headers) {
  const match = TILE_PATH.exec(new URL(url).pathname);
  if (!match) return;
  const [z, x, y] = match.slice(1).map(Number);
  const key = `${z}/${x}/${y}`;
  const truncated = headers.get("X-Terrazzo-Truncated");
  const errors = headers.get("X-Terrazzo-Errors");
  if (truncated || errors) state.tileMarks.set(key, { key, z, x, y, url, truncated, errors });
  else state.tileMarks.delete(key);
  refreshMarks();
}

function tileBounds(z, x, y) {
  const n = 2 ** z;
  const lon = (i) => (i / n) * 360 - 180;
  const lat = (j) => (Math.atan(Math.sinh(Math.PI * (1 - (2 * j) / n))) * 180) / Math.PI;
  return [lon(x), lat(y + 1), lon(x + 1), lat(y)];
}

function coveringZoom() {
  // MapLibre's for a raster source of 256 px tiles, unpitched: round(zoom + 1), overzoomed
  // past the source's maxzoom, nothing below its minzoom
  const tj = state.tilejson;
  if (!state.map || !tj) return null;
  const z = Math.min(tj.maxzoom, Math.max(0, Math.round(state.map.getZoom() + 1)));
  return z < tj.minzoom ? null : z;
}

function marksInView() {
  // the marked tiles MapLibre shows now: at its covering zoom, inside the view
  state.tileZoom = coveringZoom();
  if (state.tileZoom === null) return [];
  const z = state.tileZoom;
  const b = state.map.getBounds();
  const [x0, y0] = lngLatToTile(Math.max(-180, b.getWest()), b.getNorth(), z);
  const [x1, y1] = lngLatToTile(Math.min(180, b.getEast()), b.getSouth(), z);
  const wide = b.getEast() - b.getWest() >= 360;
  return [...state.tileMarks.values()]
    .filter((m) => m.z === z && (wide || (m.x >= x0 && m.x <= x1)) && m.y >= y0 && m.y <= y1)
    .sort((a, b) => a.key.localeCompare(b.key));
}

let marksTimer = null;
function refreshMarks() {
  clearTimeout(marksTimer);
  marksTimer = setTimeout(drawMarks, 50);
}

function drawMarks() {
  const source = state.map && state.map.getSource("incomplete");
  if (!source) return;
  const marks = marksInView();
  state.incomplete = marks.map((m) => m.key);
  source.setData({
    type: "FeatureCollection",
    features: marks.map((m) => {
      const [w, s, e, n] = tileBounds(m.z, m.x, m.y);
      return {
        type: "Feature",
        geometry: { type: "Polygon", coordinates: [[[w, s], [e, s], [e, n], [w, n], [w, s]]] },
        properties: {
          key: m.key,
          kind: m.truncated ? "truncated" : "errors",
          truncated: m.truncated || "",
          errors: m.errors || "",
        },
      };
    }),
  });
  showTileStatus(marks);
}

function reasonText(why) {
  const kind = (why || "").split(":")[0].trim();
  return LIMIT_WORDS[kind] || why || "items left out";
}

function showTileStatus(marks) {
  const lines = [];
  const truncated = marks.filter((m) => m.truncated);
  const failed = marks.filter((m) => m.errors);
  const plural = (n) => `${n} tile${n === 1 ? "" : "s"}`;
  if (truncated.length) {
    const reasons = [...new Set(truncated.map((m) => reasonText(m.truncated)))].join(", ");
    lines.push(`${plural(truncated.length)} incomplete: ${reasons} — zoom in or narrow the filter`);
  }
  if (failed.length) {
    lines.push(`${plural(failed.length)} with items that could not be read: ${failed[0].errors}`);
  }
  const tj = state.tilejson;
  if (tj && state.map && coveringZoom() === null) {
    lines.push(`No tiles below zoom ${tj.minzoom} (the TileJSON minzoom): zoom in to see the mosaic`);
  }
  const status = $("tile-status");
  status.textContent = lines.join("\n");
  status.title = [...truncated.map((m) => `${m.key}: ${m.truncated}`), ...failed.map((m) => `${m.key}: ${m.errors}`)].join("\n");
  status.hidden = !lines.length;
}

function hatchImage() {
  // a light diagonal hatch for incomplete tiles (an image, so no sprite is needed)
  const size = 16;
  const data = new Uint8Array(size * size * 4);
  for (let y = 0; y < size; y++) {
    for (let x = 0; x < size; x++) {
      if ((x + y) % 8 < 2) data.set([215, 38, 61, 90], (y * size + x) * 4);
    }
  }
  return { width: size, height: size, data };
}

function addMarkLayers(map) {
  map.addImage("terrazzo-hatch", hatchImage());
  map.addSource("incomplete", { type: "geojson", data: { type: "FeatureCollection", features: [] } });
  map.addLayer({
    id: "incomplete-hatch", type: "fill", source: "incomplete",
    filter: ["==", ["get", "kind"], "truncated"],
    paint: { "fill-pattern": "terrazzo-hatch" },
  });
  map.addLayer({
    id: "incomplete-outline", type: "line", source: "incomplete",
    paint: {
      "line-color": ["match", ["get", "kind"], "truncated", "#d7263d", "#f08c00"],
      "line-width": 2.5,
      "line-dasharray": [3, 2],
    },
  });
}

/* -- the map ---------------------------------------------------------------------------- */

function viewBbox() {
  const b = state.map.getBounds();
  const clamp = (v, lim) => Math.max(-lim, Math.min(lim, v));
  let west = clamp(b.getWest(), 180);
  let east = clamp(b.getEast(), 180);
  if (b.getEast() - b.getWest() >= 360 || west > east) [west, east] = [-180, 180];
  return [west, clamp(b.getSouth(), 90), east, clamp(b.getNorth(), 90)].map((v) => v.toFixed(5));
}

let footprintTimer = null;
function refreshFootprints() {
  clearTimeout(footprintTimer);
  footprintTimer = setTimeout(async () => {
    const source = state.map.getSource("footprints");
    if (!source) return;
    if (!$("footprints").checked) {
      source.setData({ type: "FeatureCollection", features: [] });
      return;
    }
    const params = searchParams();
    params.delete("assets");
    params.set("bbox", viewBbox().join(","));
    params.set("limit", "2000");
    try {
      const body = await getJSON(api("items", params));
      for (const f of body.features) f.properties.id = f.id; // for filters and highlights
      source.setData(body);
      state.itemsInView = body.numberMatched;
      const shown = body.numberReturned < body.numberMatched ? ` (${body.numberReturned} drawn)` : "";
      state.footprintStatus = `${body.numberMatched} items in view${shown}`;
      showReadyStatus();
    } catch (err) {
      setStatus(`footprints: ${err.message}`, true);
    }
  }, 150);
}

function showReadyStatus() {
  if (!state.tilejson || !state.map) return;
  const z = state.map.getZoom().toFixed(1);
  const native = state.map.getZoom() > state.tilejson.maxzoom + 0.5 ? " (past native, upsampled)" : "";
  setStatus(`${state.footprintStatus || ""} · zoom ${z}${native}`);
}

async function update() {
  // any control changed: validate through /tilejson.json, then point the source at it
  const params = tileParams();
  history.replaceState(null, "", `?${params}`);
  const url = api("tilejson.json", params);
  $("tilejson-link").href = url;
  $("wmts-link").href = api("WMTSCapabilities.xml", params);
  try {
    state.tilejson = await getJSON(url);
  } catch (err) {
    setStatus(err.message, true);
    return;
  }
  state.idle = false;
  state.tileGen += 1; // the marks were for the old parameters
  state.tileMarks.clear();
  drawMarks();
  state.map.getSource("mosaic").setUrl(url);
  refreshFootprints();
}

function renderInspect(body) {
  const panel = $("inspect");
  panel.replaceChildren();
  const [lon, lat] = body.coordinates;
  const title = document.createElement("p");
  title.textContent = `${lat.toFixed(5)}, ${lon.toFixed(5)}`;
  title.className = "where";
  panel.append(title);
  if (!body.items.length) {
    const none = document.createElement("p");
    none.className = "hint";
    none.textContent = "No item covers this point with these filters.";
    panel.append(none);
    return;
  }
  for (const [rank, item] of body.items.entries()) {
    const head = document.createElement("p");
    head.className = "item";
    head.textContent = `${rank + 1}. ${item.id}`;
    const when = document.createElement("span");
    when.className = "when";
    when.textContent = [item.datetime, item.collection].filter(Boolean).join(" · ");
    head.append(when);
    panel.append(head);
    if (item.error) {
      const error = document.createElement("p");
      error.className = "error";
      error.textContent = item.error;
      panel.append(error);
      continue;
    }
    const table = document.createElement("table");
    for (const [asset, read] of Object.entries(item.assets || {})) {
      read.values.forEach((value, i) => {
        const row = table.insertRow();
        row.insertCell().textContent = `${asset} ${(read.band_names || [])[i] || `b${i + 1}`}`;
        const cell = row.insertCell();
        cell.className = "value";
        cell.textContent = value === null ? "no data" : fmt(value);
        if (value !== null) cell.dataset.value = String(value);
      });
    }
    panel.append(table);
  }
}

async function inspect(lngLat) {
  const { lng, lat } = lngLat.wrap();
  state.marker.setLngLat([lng, lat]).addTo(state.map);
  const seq = ++state.pointSeq;
  $("inspect").replaceChildren(Object.assign(document.createElement("p"), {
    className: "hint", textContent: "reading pixels…",
  }));
  try {
    const body = await getJSON(api(`point/${lng.toFixed(6)},${lat.toFixed(6)}`, searchParams()));
    if (seq !== state.pointSeq) return;
    state.lastPoint = body;
    renderInspect(body);
    const ids = body.items.map((i) => i.id);
    state.map.setFilter("footprints-hit", ["in", ["get", "id"], ["literal", ids]]);
  } catch (err) {
    if (seq !== state.pointSeq) return;
    $("inspect").replaceChildren(Object.assign(document.createElement("p"), {
      className: "error", textContent: `point: ${err.message}`,
    }));
  }
}

function createMap(bounds) {
  maplibregl.addProtocol(PROTOCOL, fetchTile);
  const map = new maplibregl.Map({
    container: "map",
    style: {
      version: 8,
      sources: {},
      layers: [{ id: "background", type: "background", paint: { "background-color": "#dde3e8" } }],
    },
    bounds,
    fitBoundsOptions: { padding: 24 },
    attributionControl: false,
    transformRequest: (url, type) => {
      if (type !== "Tile") return { url, headers: keyHeaders };
      state.tileUrls.push(url);
      return { url: `${PROTOCOL}://${url}` }; // fetchTile reads its headers
    },
  });
  state.map = map;
  state.marker = new maplibregl.Marker({ color: "#d7263d" });
  map.addControl(new maplibregl.NavigationControl({ showCompass: false }), "top-right");
  map.addControl(new maplibregl.ScaleControl(), "bottom-right");
  map.on("load", () => {
    map.addSource("mosaic", { type: "raster", url: api("tilejson.json", tileParams()), tileSize: 256 });
    map.addLayer({ id: "mosaic", type: "raster", source: "mosaic", paint: { "raster-fade-duration": 0 } });
    map.addSource("footprints", { type: "geojson", data: { type: "FeatureCollection", features: [] } });
    map.addLayer({
      id: "footprints", type: "line", source: "footprints",
      paint: { "line-color": "#1f3b73", "line-width": 1, "line-opacity": 0.7 },
    });
    map.addLayer({
      id: "footprints-hit", type: "line", source: "footprints",
      filter: ["in", ["get", "id"], ["literal", []]],
      paint: { "line-color": "#d7263d", "line-width": 2.5 },
    });
    addMarkLayers(map);
    refreshFootprints();
  });
  map.on("moveend", refreshFootprints);
  map.on("moveend", refreshMarks);
  map.on("idle", () => {
    state.idle = true;
    drawMarks();
    showReadyStatus();
  });
  map.on("dataloading", (e) => {
    if (e.sourceId === "mosaic") state.idle = false;
  });
  map.on("error", async (e) => {
    if (e.sourceId !== "mosaic" || !e.error) return;
    let detail = e.error.message;
    try {
      detail = JSON.parse(await e.error.body.text()).detail || detail;
    } catch (_) {
      /* keep the message */
    }
    setStatus(`tile: ${detail}`, true);
  });
  map.on("click", (e) => inspect(e.lngLat));
}

function fillSelect(select, values, selected) {
  for (const value of values) {
    const option = document.createElement("option");
    option.value = option.textContent = value;
    select.append(option);
  }
  if (selected !== undefined && values.includes(selected)) select.value = selected;
}

async function init() {
  const [catalog, info] = await Promise.all([getJSON(api("collections")), getJSON(api("info"))]);
  const collections = catalog.collections;
  const wanted = new URLSearchParams(location.search);
  for (const c of collections) Object.assign(state.assets, c.item_assets);
  state.dates = [...new Set(collections.flatMap((c) => c.dates))].sort().reverse();
  fillSelect($("collection"), collections.map((c) => c.id).filter((id) => id !== null), wanted.get("collections"));
  fillSelect($("date"), state.dates, wanted.get("datetime"));
  const names = Object.keys(state.assets);
  fillSelect($("asset"), names, wanted.get("assets") || (info.default_assets || [])[0] || names[0]);
  if (wanted.get("method")) $("method").value = wanted.get("method");
  const ids = collections.map((c) => c.id);
  if (collections.length < 2 && ids[0] !== undefined) $("collection").closest("label").style.display = "none";

  state.tilejson = await getJSON(api("tilejson.json", searchParams()));
  if (wanted.has("rescale") || wanted.has("colormap_name")) {
    $("rescale").value = wanted.get("rescale") || "";
    $("colormap").value = wanted.get("colormap_name") || "";
  } else {
    await applyDefaults();
  }
  const [west, south, east, north] = info.bbox || state.tilejson.bounds;
  createMap([[west, south], [east, north]]);

  $("asset").addEventListener("change", async () => { await applyDefaults(); update(); });
  $("method").addEventListener("change", async () => { await applyDefaults(); update(); });
  for (const id of ["date", "collection"]) $(id).addEventListener("change", update);
  for (const id of ["rescale", "colormap"]) $(id).addEventListener("change", update);
  $("footprints").addEventListener("change", refreshFootprints);
}

init().catch((err) => setStatus(`could not load the catalog: ${err.message}`, true));
