/* Terrazzo map viewer.
 *
 * The mosaic is a MapLibre raster source over this service's tile route, with the zoom range
 * and bounds of /tilejson.json for the current parameters (asked first: a combination the
 * server refuses is reported with its own message instead of a blank map).
 * The view (center, zoom, collections, datetime, assets, bidx, method, rescale, colormap_name)
 * lives in the URL's fragment: a shared link reopens the same view, and editing the fragment
 * or going back/forward changes the view. The parameter names are the tile route's own.
 * Item outlines come from /items?bbox=<view>; clicking asks /point/{lon},{lat} for every
 * covering item's pixel values. Tiles are fetched through a MapLibre protocol ("terrazzo://"),
 * so the page reads each tile's status and headers: a failing tile's JSON `detail` is shown
 * over the map; incomplete tiles in view are outlined (red dashed and hatched: items left out
 * by a search limit; orange: an item could not be read) and counted in #tile-status.
 * The legend draws the colormap from /map/colormaps/{name} (rio-tiler's table, as the tiles
 * use it) with the rescale range as labels; for method=count it says what the values count.
 * A float or 16-bit asset gets a default rescale: from the catalog's raster:bands statistics
 * when it has them, else the 2nd-98th percentile of one .npy tile of the view.
 * Plain script, no build step: MapLibre is vendored under static/vendor/.
 * Every URL is relative to the page (no leading "/"), so the viewer also works under a
 * proxy's path prefix.
 */
"use strict";

const state = {
  map: null,
  tilejson: null,
  assets: {}, // asset name -> item_assets entry (type, roles, raster:bands…)
  dates: [],
  ranges: {}, // "asset|datetime|collection" -> [lo, hi] sampled from a tile
  colormapNames: [], // what colormap_name accepts (/map/colormaps)
  colormaps: {}, // name -> 256 colours, fetched for the legend
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
  tileErrors: [], // failed tiles of the current parameters: {url, status, detail}
  sourceParams: null, // the tile query the mosaic source was built with
  hash: null, // the fragment this page wrote last (a different one was edited by the user)
  autoBidx: false, // bidx was set by the page (count of a multi-band asset), not the user
};
window.terrazzo = state; // for the console and the browser tests

const $ = (id) => document.getElementById(id);

// A service started with TERRAZZO_API_KEY wants the key on every data request: open the page
// as /map#key=KEY (a fragment is never sent to a server nor logged); it is kept for the tab
// and taken out of the fragment, so a shared view link never carries it.
let keyHeaders = {};
function takeKey() {
  const key = new URLSearchParams(location.hash.slice(1)).get("key");
  if (key) sessionStorage.setItem("terrazzo-key", key);
  const stored = sessionStorage.getItem("terrazzo-key");
  keyHeaders = stored ? { "X-API-Key": stored } : {};
  return Boolean(key);
}
takeKey();
const authFetch = (url) => fetch(url, { headers: keyHeaders });
const api = (path, params) => {
  // `path` is relative ("tilejson.json"): resolved against the page, prefix included
  const url = new URL(path, document.baseURI);
  if (params && [...params].length) url.search = params.toString();
  return url.toString();
};

function setStatus(text, error = false) {
  const status = $("status");
  status.textContent = text;
  status.classList.toggle("error", error);
}

function showMessage(text) {
  // errors over the map: visible with the controls collapsed (a phone), cleared by a change
  const box = $("message");
  box.textContent = text || "";
  box.hidden = !text;
}

async function errorDetail(response) {
  // the server's JSON {"detail": ...}, else the status line
  let body = null;
  try {
    body = await response.clone().json();
  } catch (_) {
    /* not JSON (a proxy's error page) */
  }
  if (response.status === 401) return "this service needs an API key: open map#key=YOUR_KEY";
  const detail = body && body.detail;
  if (typeof detail === "string") return detail;
  if (detail) return JSON.stringify(detail);
  return `${response.status} ${response.statusText}`.trim();
}

async function getJSON(url) {
  const response = await authFetch(url);
  if (!response.ok) {
    const error = new Error(await errorDetail(response));
    error.status = response.status;
    throw error;
  }
  return response.json();
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
  if ($("bidx").value) params.set("bidx", $("bidx").value);
  params.set("method", $("method").value);
  const rescale = $("rescale").value.trim();
  if (rescale) params.set("rescale", rescale);
  if ($("colormap").value) params.set("colormap_name", $("colormap").value);
  return params;
}

function assetInfo(name) {
  const bands = (state.assets[name] || {})["raster:bands"] || [];
  const first = bands[0] || {};
  return {
    bands: bands.length || null,
    names: bands.map((b, i) => b.name || b.common_name || b.description || `band ${i + 1}`),
    dtype: first.data_type || null,
    stats: first.statistics,
  };
}

function outputBands() {
  // bands of the tiles the current parameters make (null: unknown)
  if ($("bidx").value) return $("bidx").value.split(",").length;
  return assetInfo($("asset").value).bands;
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
  if (!tj) return null;
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

function fillBands() {
  // a band picker for multi-band assets: all bands, or one (which a colormap can colour)
  const info = assetInfo($("asset").value);
  const select = $("bidx");
  const keep = select.value;
  select.replaceChildren(new Option("all", ""));
  if (info.bands > 1) info.names.forEach((name, i) => select.append(new Option(`${i + 1}: ${name}`, String(i + 1))));
  select.value = [...select.options].some((o) => o.value === keep) ? keep : "";
  $("bidx-label").hidden = !(info.bands > 1);
}

function checkColormap() {
  // a colormap colours one band: offered only when the output has one
  const bands = outputBands();
  const one = bands === null || bands === 1;
  $("colormap").disabled = !one;
  if (!one) $("colormap").value = "";
  $("colormap-hint").textContent = one ? "" : "one band only: pick a band";
}

async function applyDefaults() {
  // a rescale (and a colormap for one band) the chosen asset and method need to render
  const asset = $("asset").value;
  const method = $("method").value;
  const info = assetInfo(asset);
  if (method === "count" && info.bands > 1 && !$("bidx").value) {
    $("bidx").value = "1"; // every band counts the same items; one band takes a colormap
    state.autoBidx = true;
  } else if (method !== "count" && state.autoBidx) {
    $("bidx").value = "";
    state.autoBidx = false;
  }
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
  if (outputBands() === 1 && rescale) {
    colormap = /dem|dtm|dsm|elev|height/i.test(asset) ? "terrain" : "viridis";
    if (!state.colormapNames.includes(colormap)) colormap = "";
  }
  $("colormap").value = colormap;
  checkColormap();
}

/* -- the legend ------------------------------------------------------------------------- */

async function colormapColours(name) {
  if (!state.colormaps[name]) state.colormaps[name] = (await getJSON(api(`map/colormaps/${encodeURIComponent(name)}`))).colors;
  return state.colormaps[name];
}

const GRAY = Array.from({ length: 256 }, (_, i) => `#${i.toString(16).padStart(2, "0").repeat(3)}`);

function rescaleRange() {
  const parts = $("rescale").value.split(",").map((s) => Number(s.trim()));
  return parts.length >= 2 && parts.slice(0, 2).every(Number.isFinite) ? parts.slice(0, 2) : null;
}

let legendSeq = 0;
async function renderLegend() {
  // one output band: its colours (the colormap, else gray) and the values at both ends
  const seq = ++legendSeq;
  const legend = $("legend");
  const method = $("method").value;
  const name = $("colormap").value;
  const bands = outputBands();
  if (bands !== 1 || state.tileErrors.length || state.tilejsonError) {
    legend.hidden = true;
    legend.dataset.colormap = "";
    return;
  }
  let colours = GRAY;
  try {
    if (name) colours = await colormapColours(name);
  } catch (err) {
    if (seq === legendSeq) showMessage(`legend: ${err.message}`);
    return;
  }
  if (seq !== legendSeq) return;
  const info = assetInfo($("asset").value);
  const range = rescaleRange();
  const [lo, hi] = range || (method === "count" ? [0, 255] : [0, info.dtype === "uint16" ? 65535 : 255]);
  const band = $("bidx").value ? ` band ${$("bidx").value}` : "";
  let title = `${$("asset").value}${band}`;
  let note = "";
  const steps = $("legend-steps");
  steps.replaceChildren();
  const colourOf = (v) => colours[Math.max(0, Math.min(255, Math.floor(((v - lo) / (hi - lo || 1)) * 255)))];
  if (method === "count") {
    title = "count: items with data at each pixel";
    note = `items (of these filters) with a valid pixel there${range ? `; ${fmt(hi)}+: ${fmt(hi)} or more` : ""}`;
    if (Number.isInteger(lo) && Number.isInteger(hi) && hi > lo && hi - lo <= 12) {
      for (let k = Math.max(1, lo); k <= hi; k++) {
        const step = document.createElement("span");
        step.textContent = k === hi ? `${k}+` : String(k);
        step.style.backgroundImage = `linear-gradient(${colourOf(k)}, ${colourOf(k)})`;
        step.dataset.colour = colourOf(k);
        steps.append(step);
      }
    }
  } else {
    title += name ? ` · ${name}` : " · gray";
    if (method !== "first") title += ` · ${method}`;
    if (!range) note = "no rescale: the band's values as they are";
  }
  const bar = $("legend-bar");
  const ctx = bar.getContext("2d");
  colours.forEach((c, i) => {
    ctx.fillStyle = c;
    ctx.clearRect(i, 0, 1, 1);
    ctx.fillRect(i, 0, 1, 1);
  });
  bar.hidden = steps.childElementCount > 0;
  $("legend-title").textContent = title;
  $("legend-min").textContent = fmt(lo);
  $("legend-max").textContent = fmt(hi);
  $("legend-labels").hidden = steps.childElementCount > 0;
  $("legend-note").textContent = note;
  legend.dataset.colormap = name || "gray";
  legend.hidden = false;
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
  if (gen === state.tileGen) noteTile(url, response.headers);
  if (!response.ok) {
    const detail = await errorDetail(response);
    if (gen === state.tileGen) noteTileError(url, response.status, detail);
    const error = new Error(`AJAXError: ${response.statusText} (${response.status}): ${url}`);
    Object.assign(error, { status: response.status, statusText: response.statusText, url });
    throw error;
  }
  return {
    data: await response.arrayBuffer(),
    cacheControl: response.headers.get("Cache-Control"),
    expires: response.headers.get("Expires"),
  };
}

function noteTileError(url, status, detail) {
  state.tileErrors.push({ url, status, detail });
  const count = state.tileErrors.length;
  const tiles = count === 1 ? "A tile" : `${count} tiles`;
  showMessage(`${tiles} failed (${status}): ${detail}`);
  setStatus(`tile: ${detail}`, true);
  $("legend").hidden = true;
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

function tileTemplate(params) {
  // relative to the page (the braces must stay literal, so not through new URL)
  const base = new URL(".", document.baseURI).href;
  return `${base}tiles/WebMercatorQuad/{z}/{x}/{y}?${params}`;
}

function setMosaic(params, tj) {
  // (re)build the raster source: its zoom range and bounds follow the TileJSON
  const map = state.map;
  if (map.getLayer("mosaic")) map.removeLayer("mosaic");
  if (map.getSource("mosaic")) map.removeSource("mosaic");
  state.sourceParams = params ? params.toString() : null;
  if (!params) return;
  map.addSource("mosaic", {
    type: "raster",
    tiles: [tileTemplate(params)],
    tileSize: 256,
    minzoom: tj.minzoom,
    maxzoom: tj.maxzoom,
    bounds: tj.bounds,
  });
  const before = map.getLayer("footprints") ? "footprints" : undefined;
  map.addLayer({ id: "mosaic", type: "raster", source: "mosaic", paint: { "raster-fade-duration": 0 } }, before);
}

let updateSeq = 0;
async function update({ push = false, force = false } = {}) {
  // the parameters changed: validate them through /tilejson.json, then draw with them
  checkColormap();
  const params = tileParams();
  writeHash(push);
  const url = api("tilejson.json", params);
  $("tilejson-link").href = url;
  $("wmts-link").href = api("WMTSCapabilities.xml", params);
  if (!force && params.toString() === state.sourceParams && !state.tilejsonError) {
    renderLegend();
    return;
  }
  const seq = ++updateSeq;
  state.idle = false;
  state.tileGen += 1; // the marks and errors were for the old parameters
  state.tileMarks.clear();
  state.tileErrors = [];
  showMessage("");
  let tj;
  try {
    tj = await getJSON(url);
  } catch (err) {
    if (seq !== updateSeq) return;
    // refused (400 for a combination every tile would refuse, 401, 404…): say why, draw nothing
    state.tilejsonError = err.message;
    showMessage(`The server refused these parameters: ${err.message}`);
    setStatus(err.message, true);
    if (state.map) setMosaic(null);
    $("legend").hidden = true;
    state.idle = true;
    return;
  }
  if (seq !== updateSeq) return;
  state.tilejsonError = null;
  state.tilejson = tj;
  if (!state.map) return;
  drawMarks();
  setMosaic(params, tj);
  renderLegend();
  refreshFootprints();
}

function createMap(view) {
  maplibregl.addProtocol(PROTOCOL, fetchTile);
  const map = new maplibregl.Map({
    container: "map",
    style: {
      version: 8,
      sources: {},
      layers: [{ id: "background", type: "background", paint: { "background-color": "#dde3e8" } }],
    },
    ...view,
    fitBoundsOptions: { padding: 24 },
    attributionControl: false,
    transformRequest: (url, type) => {
      if (type !== "Tile") return { url, headers: keyHeaders };
      state.tileUrls.push(url);
      return { url: `${PROTOCOL}://${url}` }; // fetchTile reads its status and headers
    },
  });
  state.map = map;
  state.marker = new maplibregl.Marker({ color: "#d7263d" });
  map.addControl(new maplibregl.NavigationControl({ showCompass: false }), "top-right");
  map.addControl(new maplibregl.ScaleControl(), "bottom-right");
  map.on("load", () => {
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
    if (state.tilejson && !state.tilejsonError) setMosaic(tileParams(), state.tilejson);
    renderLegend();
    refreshFootprints();
    writeHash(false);
  });
  map.on("moveend", refreshFootprints);
  map.on("moveend", refreshMarks);
  map.on("moveend", () => writeHash(false));
  map.on("idle", () => {
    state.idle = true;
    drawMarks();
    if (!state.tileErrors.length && !state.tilejsonError) showReadyStatus();
  });
  map.on("dataloading", (e) => {
    if (e.sourceId === "mosaic") state.idle = false;
  });
  map.on("error", (e) => {
    // tile failures are reported by fetchTile with the server's detail; anything else here
    if (e.sourceId !== "mosaic" || !e.error || state.tileErrors.length) return;
    if (e.error.name === "AbortError") return;
    showMessage(`tiles: ${e.error.message}`);
  });
  map.on("click", (e) => inspect(e.lngLat));
}

/* -- the view in the URL's fragment ----------------------------------------------------- */

const VIEW_KEYS = ["collections", "datetime", "assets", "bidx", "method", "rescale", "colormap_name"];
const readable = (v) => encodeURIComponent(v).replace(/%2C/g, ",").replace(/%2F/g, "/").replace(/%3A/g, ":");

function hashString() {
  const parts = [];
  if (state.map) {
    const c = state.map.getCenter().wrap();
    const z = state.map.getZoom();
    // enough decimals for a tenth of a pixel at this zoom
    const d = Math.max(1, Math.min(8, Math.ceil(Math.log10((256 * 2 ** z) / 360)) + 1));
    parts.push(`center=${c.lng.toFixed(d)},${c.lat.toFixed(d)}`, `zoom=${z.toFixed(2)}`);
  }
  for (const [k, v] of tileParams()) parts.push(`${k}=${readable(v)}`);
  return parts.join("&");
}

function writeHash(push) {
  const hash = hashString();
  if (hash === state.hash) return;
  state.hash = hash;
  const url = new URL(location.href);
  url.search = ""; // an old ?query link becomes a #fragment one
  url.hash = hash;
  history[push ? "pushState" : "replaceState"](null, "", url.href);
}

function wantedView() {
  // the fragment's view, else (older links) the query string's
  const hash = new URLSearchParams(location.hash.slice(1));
  hash.delete("key");
  const wanted = [...hash.keys()].length ? hash : new URLSearchParams(location.search);
  const view = {};
  const center = (wanted.get("center") || "").split(",").map(Number);
  const zoom = Number(wanted.get("zoom"));
  if (center.length === 2 && center.every(Number.isFinite)) view.center = center;
  if (wanted.get("zoom") !== null && Number.isFinite(zoom)) view.zoom = zoom;
  return { params: wanted, view };
}

function pick(select, value) {
  // a value the select offers, else its first option
  select.value = [...select.options].some((o) => o.value === value) ? value : select.options[0].value;
}

async function setControls(wanted) {
  // the controls from a fragment (missing keys: the defaults); then only what is valid
  pick($("collection"), wanted.get("collections") || "");
  pick($("date"), wanted.get("datetime") || "");
  pick($("asset"), wanted.get("assets") || state.defaultAsset);
  fillBands();
  pick($("bidx"), wanted.get("bidx") || "");
  state.autoBidx = false;
  pick($("method"), wanted.get("method") || "first");
  if (wanted.has("rescale") || wanted.has("colormap_name")) {
    $("rescale").value = wanted.get("rescale") || "";
    pick($("colormap"), wanted.get("colormap_name") || "");
    checkColormap();
  } else {
    await applyDefaults();
  }
}

async function onHashChange() {
  if (takeKey()) {
    if (!state.map) return start(); // the key the first load lacked
  }
  const hash = location.hash.slice(1);
  if (hash === state.hash || !state.map) return;
  const { params, view } = wantedView();
  state.hash = hash; // what is on screen now; update() writes its canonical form
  await setControls(params);
  if (view.center || view.zoom !== undefined) state.map.jumpTo(view);
  update({ push: false });
}

/* -- the layout: controls beside the map, or a drawer over it on a phone ---------------- */

function setPanel(open) {
  document.body.classList.toggle("collapsed", !open);
  const toggle = $("panel-toggle");
  toggle.setAttribute("aria-expanded", String(open));
  toggle.textContent = open ? (matchMedia("(max-width: 700px)").matches ? "Map" : "Hide controls") : "Controls";
  if (state.map) state.map.resize();
}

/* -- start ------------------------------------------------------------------------------ */

function fillSelect(select, values) {
  for (const value of values) select.append(new Option(value, value));
}

async function start() {
  const [catalog, info, colormaps] = await Promise.all([
    getJSON(api("collections")),
    getJSON(api("info")),
    getJSON(api("map/colormaps")),
  ]);
  const collections = catalog.collections;
  for (const c of collections) Object.assign(state.assets, c.item_assets);
  state.dates = [...new Set(collections.flatMap((c) => c.dates))].sort().reverse();
  state.colormapNames = colormaps.colormaps;
  const common = ["viridis", "terrain", "magma", "cividis", "turbo", "gray", "rdylgn"].filter((n) => colormaps.colormaps.includes(n));
  fillSelect($("colormap"), [...common, ...colormaps.colormaps.filter((n) => !common.includes(n))]);
  fillSelect($("collection"), collections.map((c) => c.id).filter((id) => id !== null));
  fillSelect($("date"), state.dates);
  const names = Object.keys(state.assets);
  fillSelect($("asset"), names);
  state.defaultAsset = (info.default_assets || [])[0] || names[0];
  const ids = collections.map((c) => c.id);
  if (collections.length < 2 && ids[0] !== undefined) $("collection").closest("label").style.display = "none";

  const { params, view } = wantedView();
  state.hash = location.hash.slice(1);
  state.tilejson = await getJSON(api("tilejson.json", searchParams())).catch(() => null);
  await setControls(params);
  const [west, south, east, north] = info.bbox || (state.tilejson || {}).bounds || [-180, -85, 180, 85];
  const mapView = view.center
    ? { center: view.center, zoom: view.zoom ?? (state.tilejson ? state.tilejson.minzoom : 2) }
    : { bounds: [[west, south], [east, north]] };
  await update({ force: true }); // validates, shows a refusal; the source is added on load
  createMap(mapView);

  const changed = async (defaults) => {
    if (defaults) await applyDefaults();
    update({ push: true });
  };
  $("asset").addEventListener("change", () => { $("bidx").value = ""; fillBands(); state.autoBidx = false; changed(true); });
  $("method").addEventListener("change", () => changed(true));
  $("bidx").addEventListener("change", () => { state.autoBidx = false; checkColormap(); changed(false); });
  for (const id of ["date", "collection", "rescale", "colormap"]) $(id).addEventListener("change", () => changed(false));
  $("footprints").addEventListener("change", refreshFootprints);
  window.addEventListener("hashchange", onHashChange);
  window.addEventListener("popstate", onHashChange);
}

$("panel-toggle").addEventListener("click", () => setPanel(document.body.classList.contains("collapsed")));
setPanel(!matchMedia("(max-width: 700px)").matches); // a phone starts on the map
start().catch((err) => {
  setStatus(`could not load the catalog: ${err.message}`, true);
  showMessage(`could not load the catalog: ${err.message}`);
  window.addEventListener("hashchange", onHashChange, { once: true }); // e.g. #key=… added
});
