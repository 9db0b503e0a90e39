// cp2image-tf explore: the page. Plain JavaScript, no build step, nothing from the internet.
//
// State: a base profile (median, a treatment's mean or a cell id) and offsets of some
// features in training SDs. The URL hash holds the same query the API takes:
//   #base=DMSO&Nuclei_AreaShape_Area=2&Cells_Intensity_MeanIntensity_Actin=-1.5[&alone=1]
// A slider moves its feature with the features correlated with it (alone=1: by itself); the
// picture is always an edit of the base's cell. After each drawing the page asks
// /api/remeasure for the moved features re-measured on the drawn cell and shows them beside
// the sliders.
// The server answers /api/render with the generated cell's channels side by side in one
// greyscale PNG; this page colours and composites them (DNA blue, tubulin green, actin red,
// as the generate_png signature does) so that channel toggles need no request.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const S = {
    info: null,
    names: [],
    position: {},        // feature name -> index
    base: "median",
    baseRaw: null,
    baseLabel: "",
    offsets: {},         // feature -> SD offset (non-zero only)
    alone: false,        // sliders move their feature alone (else with its correlated ones)
    committed: null,     // last state pushed to the undo history
    undo: [],
    enabled: [],         // channel toggles
    last: null,          // decoded channels of the generated cell
    neighbours: [],      // [{cell, decoded}]
    strips: { tr: [], ip: [] },
    rows: {},            // feature -> slider row elements
    render: { inflight: false, pending: false },
    nnSeq: 0,
    nnTimer: null,
    rmSeq: 0,
    rmTimer: null,
  };
  const FIELDS = new Set(["base", "alone"]);

  // --- messages ----------------------------------------------------------------------------

  function note(text, kind) {
    const li = document.createElement("li");
    li.className = kind || "note";
    const span = document.createElement("span");
    span.textContent = text;
    const close = document.createElement("button");
    close.type = "button";
    close.className = "dismiss";
    close.textContent = "×";
    close.title = "dismiss";
    close.addEventListener("click", () => li.remove());
    li.append(span, close);
    $("notes").append(li);
    while ($("notes").children.length > 6) $("notes").firstChild.remove();
    if (kind === "flash") setTimeout(() => li.remove(), 2500);
  }

  function clearNotes(kind) {
    for (const li of Array.from($("notes").children)) if (li.className === kind) li.remove();
  }

  function connection(text) {
    $("connection").hidden = !text;
    $("connection-text").textContent = text || "";
  }

  class Unreachable extends Error {}
  class ApiFailure extends Error {
    constructor(message, status) { super(message); this.status = status; }
  }

  async function getJSON(path) {
    let response;
    try {
      response = await fetch(path, { cache: "no-store" });
    } catch (err) {
      throw new Unreachable("no answer");
    }
    let body = null;
    try { body = await response.json(); } catch (err) { body = null; }
    if (!response.ok) {
      throw new ApiFailure((body && body.error) || `the server answered HTTP ${response.status}`,
                           response.status);
    }
    if (body === null) throw new ApiFailure("the server's answer was not JSON", response.status);
    return body;
  }

  // Every failure ends here: a visible message, never an exception in the console.
  function failed(err, what) {
    if (err instanceof Unreachable) {
      connection(`The explore server at ${location.host} is not answering (${what}). Is ` +
                 "`cp2image-tf explore` still running? Your profile stays on this page: press Retry, " +
                 "or move a slider, once it is back.");
    } else if (err instanceof ApiFailure && err.status === 503) {
      connection(err.message);
    } else {
      note(`${what}: ${err.message}`, "error");
    }
  }

  function answered() { connection(null); }

  // Work under way (requests and the pictures they bring), as body[data-activity]: a page
  // that is idle shows 0 (browser tests wait for it).
  let active = 0;
  function activity(delta) {
    active += delta;
    document.body.dataset.activity = String(active);
  }

  // --- numbers -----------------------------------------------------------------------------

  function fmtSD(v) { return (v > 0 ? "+" : v < 0 ? "−" : "±") + Math.abs(v).toFixed(1) + " SD"; }
  function fmtRaw(v) {
    if (!isFinite(v)) return "–";
    const a = Math.abs(v);
    if (a !== 0 && (a >= 1e5 || a < 1e-3)) return v.toExponential(3);
    return Number(v.toPrecision(4)).toString();
  }
  function round2(v) { return Math.round(v * 100) / 100; }
  function limit() { return S.info ? S.info.offset_limit : 5; }
  function rawValue(name, offset) {
    const j = S.position[name];
    const f = S.info.features[j];
    return S.baseRaw[j] + (offset === undefined ? (S.offsets[name] || 0) : offset) * f.sd;
  }

  // --- state and the URL -------------------------------------------------------------------

  function query(state) {
    state = state || S;
    const p = new URLSearchParams();
    p.set("base", state.base);
    if (state.alone) p.set("alone", "1");
    for (const [name, v] of Object.entries(state.offsets)) if (v) p.set(name, String(round2(v)));
    return p.toString();
  }

  function snapshot() { return { base: S.base, alone: S.alone, offsets: Object.assign({}, S.offsets) }; }
  function sameState(a, b) { return a && b && query(a) === query(b); }

  function commit() {
    const now = snapshot();
    if (S.committed && !sameState(S.committed, now)) {
      S.undo.push(S.committed);
      if (S.undo.length > 200) S.undo.shift();
    }
    S.committed = now;
    $("undo").disabled = S.undo.length === 0;
  }

  function stateChanged() {
    const q = query();
    history.replaceState(null, "", "#" + q);
    $("dl-png").href = "api/image.png?download=1&" + q;
    $("dl-tiff").href = "api/image.tiff?" + q;
    $("dl-csv").href = "api/profile.csv?" + q;
    updateChanged();
    requestRender();
    scheduleNeighbours();
    scheduleRemeasure();
  }

  // Parse a hash into a state, dropping (with a visible note) what the model does not know.
  async function stateFromHash(hash) {
    const p = new URLSearchParams(hash.replace(/^#/, ""));
    const state = { base: "median", offsets: {}, alone: p.get("alone") === "1" };
    const base = (p.get("base") || "median").trim();
    if (await baseKnown(base)) state.base = base;
    for (const [key, text] of p.entries()) {
      if (FIELDS.has(key)) continue;
      if (!(key in S.position)) {
        note(`The link names a feature this model does not have: ${key}; it is left out.`, "error");
        continue;
      }
      const value = Number(text);
      if (text.trim() === "" || !isFinite(value)) {
        note(`The link gives ${key} the value "${text}", not a number of SDs; it is left out.`, "error");
        continue;
      }
      const f = S.info.features[S.position[key]];
      if (!(f.sd > 0)) {
        note(`${key} does not vary in the training data (SD 0); it is left out.`, "error");
        continue;
      }
      if (value) state.offsets[key] = value;
    }
    state.announce = true;  // clamping is explained on the page (applyState)
    return state;
  }

  // The offset a feature may take: within ±limit SDs and, with --data, not past the
  // training cells' values in the direction moved (as the server's Explorer.allowed).
  // Returns [offset used, the reason it differs or null].
  function allowed(name, v) {
    const j = S.position[name];
    const f = S.info.features[j];
    const L = limit();
    let used = Math.max(-L, Math.min(L, v));
    let why = used !== v ? "limit" : null;
    if (f.high !== null && S.baseRaw) {
      const b = S.baseRaw[j];
      const most = (Math.max(f.high, b) - b) / f.sd;
      const least = (Math.min(f.low, b) - b) / f.sd;
      if (used > most) { used = Math.floor(most * 100) / 100; why = "range"; }
      if (used < least) { used = Math.ceil(least * 100) / 100; why = "range"; }
    }
    return [used, why];
  }

  function clampNote(name, asked, used, why) {
    const sign = (v) => (v > 0 ? "+" : v < 0 ? "−" : "±") + Math.abs(v);
    if (why === "limit") {
      return `${name}: ${sign(asked)} SD is beyond the ±${limit()} SD range the sliders cover; ` +
             `drawn at ${sign(used)} SD.`;
    }
    const f = S.info.features[S.position[name]];
    return `${name}: ${sign(asked)} SD from the base is beyond the values of the training cells ` +
           `(${fmtRaw(f.low)} to ${fmtRaw(f.high)}); drawn at ${fmtRaw(rawValue(name, used))} ` +
           `(${sign(round2(used))} SD).`;
  }

  async function baseKnown(base) {
    if (base === "median") return true;
    if (S.info.treatments.includes(base)) return true;
    if (S.info.model_treatments.includes(base)) {
      note(`The link's base is the ${base} mean, which needs the dataset: start explore with ` +
           "--data DATA_DIR. Showing the median cell instead.", "error");
      return false;
    }
    if (!S.info.data) {
      note(`The link's base ${base} is not a treatment; cells need the dataset (--data ` +
           "DATA_DIR). Showing the median cell instead.", "error");
      return false;
    }
    try {
      const found = await getJSON("api/cells?lookup=1&q=" + encodeURIComponent(base));
      if (found.exact) return true;
      note(`The link's base ${base} is neither a treatment nor a cell of ${S.info.data}. ` +
           "Showing the median cell instead.", "error");
    } catch (err) {
      failed(err, "looking up the link's cell");
    }
    return false;
  }

  async function applyState(state, record) {
    activity(+1);
    try {
      await applyStateNow(state, record);
    } finally {
      activity(-1);
    }
  }

  async function applyStateNow(state, record) {
    const baseChanged = state.base !== S.base || S.baseRaw === null;
    if (baseChanged) {
      try {
        const found = await getJSON("api/base?base=" + encodeURIComponent(state.base));
        answered();
        S.base = state.base;
        S.baseRaw = found.raw;
        S.baseLabel = found.label;
        clearNotes("base");
        if (found.missing.length) {
          note(`${found.missing.length} feature(s) missing in ${found.label} are drawn at the ` +
               `training median (${found.missing.slice(0, 3).join(", ")}` +
               `${found.missing.length > 3 ? ", …" : ""}).`, "base");
        }
      } catch (err) {
        failed(err, "loading the base profile");
        syncBaseSelect();
        return;
      }
    }
    S.offsets = {};
    if (state.alone !== undefined) S.alone = !!state.alone;
    syncMode();
    for (const [name, asked] of Object.entries(state.offsets)) {
      const [used, why] = allowed(name, asked);
      if (why && state.announce) note(clampNote(name, asked, used, why), "warn");
      if (used) S.offsets[name] = used;
    }
    syncBaseSelect();
    $("base-label").textContent = `Drawing from ${S.baseLabel}.`;
    for (const name of S.names) syncRow(name);
    if (record !== false) commit();
    stateChanged();
  }

  // --- the feature sliders -----------------------------------------------------------------

  function buildGroups() {
    const groups = $("groups");
    const byCompartment = new Map();
    S.info.features.forEach((f) => {
      if (!byCompartment.has(f.compartment)) byCompartment.set(f.compartment, new Map());
      const modules = byCompartment.get(f.compartment);
      if (!modules.has(f.module)) modules.set(f.module, []);
      modules.get(f.module).push(f);
    });
    let first = true;
    for (const [compartment, modules] of byCompartment) {
      const outer = document.createElement("details");
      outer.className = "compartment";
      const total = Array.from(modules.values()).reduce((n, list) => n + list.length, 0);
      outer.innerHTML = `<summary>${esc(compartment)} <span class="count">${total}</span></summary>`;
      for (const [module, features] of modules) {
        const inner = document.createElement("details");
        inner.className = "module";
        inner.innerHTML = `<summary>${esc(module)} <span class="count">${features.length}</span></summary>`;
        for (const f of features) inner.append(makeRow(f));
        outer.append(inner);
        if (first) { outer.open = true; inner.open = true; first = false; }
      }
      groups.append(outer);
    }
  }

  function esc(text) {
    return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;",
                                                       '"': "&quot;", "'": "&#39;" }[c]));
  }

  function makeRow(f) {
    const row = document.createElement("div");
    row.className = "row";
    row.dataset.name = f.name;
    const L = limit();
    row.innerHTML =
      `<div class="row-head"><span class="fname"></span>` +
      `<span class="vals"><output class="sd"></output> <output class="raw"></output></span></div>` +
      `<input type="range" min="${-L}" max="${L}" step="0.1" value="0">` +
      `<div class="remeasured" hidden></div>`;
    row.querySelector(".fname").textContent = f.short;
    row.title = `${f.name}\ntraining median ${fmtRaw(f.median)}, SD ${fmtRaw(f.sd)}` +
                "\ndouble-click the slider to reset it";
    const slider = row.querySelector("input");
    slider.setAttribute("aria-label", f.name);
    if (!(f.sd > 0)) {
      slider.disabled = true;
      row.classList.add("fixed");
      row.title += "\n(constant in the training data: cannot be varied)";
    }
    slider.addEventListener("input", () => {
      const [v] = allowed(f.name, round2(Number(slider.value)));  // stops at the cells' range
      if (v) S.offsets[f.name] = v; else delete S.offsets[f.name];
      syncRow(f.name);
      stateChanged();
    });
    slider.addEventListener("change", commit);
    slider.addEventListener("dblclick", () => setOffset(f.name, 0));
    S.rows[f.name] = { row, slider, sd: row.querySelector(".sd"), raw: row.querySelector(".raw"),
                       readout: row.querySelector(".remeasured") };
    return row;
  }

  function syncRow(name) {
    const r = S.rows[name];
    const v = S.offsets[name] || 0;
    if (Number(r.slider.value) !== v) r.slider.value = String(v);
    r.sd.textContent = fmtSD(v);
    const f = S.info.features[S.position[name]];
    const value = rawValue(name);
    const step = 0.0101 * f.sd;  // offsets are rounded to 0.01 SD inside the range
    const edge = v !== 0 && f.high !== null &&
      ((v > 0 && value >= f.high - step) || (v < 0 && value <= f.low + step));
    r.raw.textContent = "= " + fmtRaw(value) + (edge ? (v > 0 ? " (max seen)" : " (min seen)") : "");
    r.raw.title = edge ? "the training cells' most extreme value: the slider stops here" : "";
    r.row.classList.toggle("moved", v !== 0);
    r.row.classList.toggle("edge", edge);
    if (v === 0) { r.readout.hidden = true; r.readout.textContent = ""; }
  }

  // --- the sliders' mode: with the correlated features, or alone ------------------------------

  function syncMode() {
    const box = $("alone");
    box.disabled = !S.info.correlated;
    box.checked = S.alone || !S.info.correlated;
    $("alone-label").title = S.info.correlated ? "" : "moving correlated features needs --data DATA_DIR";
    $("mode").textContent = !S.info.correlated
      ? "A slider moves its feature alone: moving the features correlated with it needs the " +
        "dataset (start explore with --data DATA_DIR)."
      : S.alone
        ? "A slider moves its feature alone; every other feature is held."
        : "A slider moves its feature with the features correlated with it (cells with a " +
          "larger nucleus look like this), as traverse does.";
    $("mode").classList.toggle("alone", box.checked);
  }

  function setAlone(alone) {
    S.alone = alone;
    syncMode();
    commit();
    stateChanged();
  }

  function setOffset(name, v) {
    if (v) S.offsets[name] = v; else delete S.offsets[name];
    syncRow(name);
    commit();
    stateChanged();
  }

  function updateChanged() {
    const names = Object.keys(S.offsets);
    $("changed-count").textContent = names.length;
    $("changed-empty").hidden = names.length > 0;
    const list = $("changed-list");
    list.textContent = "";
    for (const name of names) {
      const li = document.createElement("li");
      const link = document.createElement("a");
      link.href = "#";
      link.textContent = name;
      link.title = `${name}: show its slider`;
      link.addEventListener("click", (e) => { e.preventDefault(); reveal(name); });
      const value = document.createElement("span");
      value.className = "vals";
      value.textContent = `${fmtSD(S.offsets[name])} = ${fmtRaw(rawValue(name))}`;
      const reset = document.createElement("button");
      reset.type = "button";
      reset.className = "dismiss";
      reset.textContent = "×";
      reset.title = "back to the base value";
      reset.addEventListener("click", () => setOffset(name, 0));
      const readout = document.createElement("div");
      readout.className = "remeasured";
      readout.dataset.name = name;
      li.append(link, value, reset, readout);
      list.append(li);
    }
    showReadings();
  }

  // --- the moved features re-measured on the drawn cell ---------------------------------------

  function fmtReading(entry) {
    if (entry === "pending") return { text: "re-measuring…", title: "" };
    if (entry.measured === null) return { text: `re-measured: – (${entry.note})`, title: entry.note };
    const asked = entry.asked - entry.base;
    const share = asked ? Math.round(100 * (entry.measured - entry.base) / asked) : null;
    const text = `re-measured ${fmtRaw(entry.measured)} · asked ${fmtRaw(entry.asked)}` +
      (share === null ? "" : ` (${share}% of the change)`);
    const title = "cp-measure on the drawn cell: the change from the base's picture, in " +
      `${entry.feature}'s units (slope over real cells${entry.r === null ? "" : `, r ${entry.r}`}); ` +
      `the base's value ${fmtRaw(entry.base)}` + (entry.note ? `\n${entry.note}` : "");
    return { text: text + (entry.note ? " — weak" : ""), title };
  }

  function showReadings() {
    const readings = S.readings || {};
    const targets = Array.from(document.querySelectorAll("#changed-list .remeasured"))
      .map((el) => [el.dataset.name, el]);
    for (const name of Object.keys(S.offsets)) if (S.rows[name]) targets.push([name, S.rows[name].readout]);
    for (const [name, el] of targets) {
      const entry = readings[name];
      el.hidden = !entry;
      if (!entry) continue;
      const shown = fmtReading(entry);
      el.textContent = shown.text;
      el.title = shown.title;
      el.classList.toggle("pending", entry === "pending");
      // Amber where the picture moved the feature less than half (or over twice) as far as
      // asked, or the reading itself is weak.
      const share = entry === "pending" || entry.measured === null || entry.asked === entry.base
        ? 1 : (entry.measured - entry.base) / (entry.asked - entry.base);
      el.classList.toggle("weak", entry !== "pending" &&
        (entry.measured === null || !!entry.note || share < 0.5 || share > 2));
    }
  }

  function scheduleRemeasure() {
    const note = $("remeasure-note");
    if (S.info.remeasure) {
      note.hidden = Object.keys(S.offsets).length === 0;
      note.textContent = `No re-measured values: ${S.info.remeasure}`;
      return;
    }
    S.rmSeq += 1;
    S.readings = {};
    for (const name of Object.keys(S.offsets)) S.readings[name] = "pending";
    showReadings();
    if (!Object.keys(S.offsets).length) return;
    if (S.rmTimer === null) activity(+1);
    clearTimeout(S.rmTimer);
    S.rmTimer = setTimeout(() => { S.rmTimer = null; loadRemeasure(); activity(-1); }, 300);
  }

  async function loadRemeasure() {
    const seq = S.rmSeq;
    activity(+1);
    try {
      const answer = await getJSON("api/remeasure?" + query());
      if (seq !== S.rmSeq) return;  // a newer profile asked meanwhile
      const note = $("remeasure-note");
      note.hidden = answer.available;
      note.textContent = answer.available ? "" : `No re-measured values: ${answer.why}`;
      S.readings = {};
      for (const entry of answer.features) S.readings[entry.feature] = entry;
      showReadings();
    } catch (err) {
      if (seq === S.rmSeq) failed(err, "re-measuring the drawn cell");
    } finally {
      activity(-1);
    }
  }

  function reveal(name) {
    const r = S.rows[name];
    if (!r) return;
    let el = r.row.parentElement;
    while (el && el !== $("groups")) { if (el.tagName === "DETAILS") el.open = true; el = el.parentElement; }
    r.row.scrollIntoView({ block: "center" });
    r.row.classList.add("flash");
    setTimeout(() => r.row.classList.remove("flash"), 1200);
  }

  function filterFeatures() {
    const terms = $("search").value.toLowerCase().split(/[\s_]+/).filter(Boolean);
    let shown = 0;
    for (const name of S.names) {
      const hay = name.toLowerCase().replace(/_/g, " ");
      const ok = terms.every((t) => hay.includes(t));
      S.rows[name].row.hidden = !ok;
      if (ok) shown += 1;
    }
    for (const d of document.querySelectorAll("#groups details")) {
      const any = d.querySelector(".row:not([hidden])") !== null;
      d.hidden = !any;
      if (terms.length) d.open = any && shown <= 60;
    }
    $("search-count").textContent = terms.length ? `${shown} of ${S.names.length} features match` : "";
  }

  // --- pictures ----------------------------------------------------------------------------

  const work = document.createElement("canvas");

  // A strip PNG (channels side by side, greyscale) -> {w, h, c, planes: [Uint8Array]}.
  async function decodeStrip(url) {
    const img = new Image();
    img.src = url;
    await img.decode();
    const c = S.info.channels.length;
    const h = img.naturalHeight;
    const w = img.naturalWidth / c;
    work.width = img.naturalWidth;
    work.height = h;
    const ctx = work.getContext("2d", { willReadFrequently: true });
    ctx.drawImage(img, 0, 0);
    const data = ctx.getImageData(0, 0, work.width, h).data;
    const planes = [];
    for (let k = 0; k < c; k++) {
      const plane = new Uint8Array(w * h);
      for (let y = 0; y < h; y++) {
        for (let x = 0; x < w; x++) plane[y * w + x] = data[4 * (y * work.width + k * w + x)];
      }
      planes.push(plane);
    }
    return { w, h, c, planes };
  }

  const out = document.createElement("canvas");

  function toURL(decoded, fill) {
    out.width = decoded.w;
    out.height = decoded.h;
    const ctx = out.getContext("2d");
    const image = ctx.createImageData(decoded.w, decoded.h);
    fill(image.data);
    ctx.putImageData(image, 0, 0);
    return out.toDataURL("image/png");
  }

  // Additive colour composite of the enabled channels, as viz.composite computes it.
  function compositeURL(decoded) {
    const colours = S.info.colours;
    return toURL(decoded, (px) => {
      const n = decoded.w * decoded.h;
      for (let i = 0; i < n; i++) {
        let r = 0, g = 0, b = 0;
        for (let k = 0; k < decoded.c; k++) {
          if (!S.enabled[k]) continue;
          const v = decoded.planes[k][i] / 255;
          r += v * colours[k][0]; g += v * colours[k][1]; b += v * colours[k][2];
        }
        px[4 * i] = Math.round(Math.min(r, 1) * 255);
        px[4 * i + 1] = Math.round(Math.min(g, 1) * 255);
        px[4 * i + 2] = Math.round(Math.min(b, 1) * 255);
        px[4 * i + 3] = 255;
      }
    });
  }

  function channelURL(decoded, k) {
    return toURL(decoded, (px) => {
      const plane = decoded.planes[k];
      for (let i = 0; i < plane.length; i++) {
        px[4 * i] = px[4 * i + 1] = px[4 * i + 2] = plane[i];
        px[4 * i + 3] = 255;
      }
    });
  }

  function sized(img, w, h, scale) {
    img.style.width = `${w * scale}px`;
    img.style.height = `${h * scale}px`;
  }

  function compositeScale() {
    const w = S.info.crop[1];
    return Math.max(1, Math.round(340 / w));
  }

  function scaleBar() {
    const w = S.info.crop[1];
    const nice = [1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000];
    const px = nice.filter((n) => n <= w / 3).pop() || 1;
    const bar = $("scalebar");
    bar.querySelector(".bar").style.width = `${px * compositeScale()}px`;
    bar.querySelector("span").textContent = `${px} px`;
  }

  function buildTiles() {
    const tiles = $("channel-tiles");
    tiles.textContent = "";
    S.info.channels.forEach((name, k) => {
      const fig = document.createElement("figure");
      const img = document.createElement("img");
      img.alt = `${name} channel`;
      img.className = "channel";
      const cap = document.createElement("figcaption");
      cap.textContent = (S.info.channel_labels || S.info.channels)[k];
      cap.style.color = cssColour(S.info.colours[k]);
      fig.append(img, cap);
      tiles.append(fig);
    });
  }

  function cssColour(c) {
    const lift = (v) => Math.round(Math.min(1, v * 0.85 + 0.1) * 255);
    return `rgb(${lift(c[0])}, ${lift(c[1])}, ${lift(c[2])})`;
  }

  function tileScale() {
    const [h, w, c] = S.info.crop;
    const room = Math.max(200, $("viewer").clientWidth - 40);
    return Math.max(1, Math.min(compositeScale(), Math.floor((room - 16 * c) / (c * w))));
  }

  function showGenerated() {
    const d = S.last;
    if (!d) return;
    const img = $("composite");
    img.src = compositeURL(d);
    sized(img, d.w, d.h, compositeScale());
    const scale = tileScale();
    Array.from($("channel-tiles").querySelectorAll("img")).forEach((tile, k) => {
      tile.src = channelURL(d, k);
      sized(tile, d.w, d.h, scale);
    });
  }

  function buildToggles() {
    const box = $("toggles");
    S.enabled = S.info.channels.map(() => true);
    S.info.channels.forEach((name, k) => {
      const label = document.createElement("label");
      label.className = "toggle";
      label.style.borderColor = cssColour(S.info.colours[k]);
      const input = document.createElement("input");
      input.type = "checkbox";
      input.checked = true;
      input.addEventListener("change", () => {
        S.enabled[k] = input.checked;
        label.classList.toggle("off", !input.checked);
        recomposite();
      });
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = cssColour(S.info.colours[k]);
      label.append(input, swatch, document.createTextNode(name));
      box.append(label);
    });
  }

  function recomposite() {
    showGenerated();
    showNeighbours();
    showStrip("tr");
    showStrip("ip");
  }

  // --- drawing the current profile: one request in flight, the latest state next ------------

  function requestRender() {
    if (S.render.inflight) { S.render.pending = true; return; }
    S.render.inflight = true;
    S.render.pending = false;
    activity(+1);
    const q = query();
    const started = performance.now();
    const busy = setTimeout(() => { $("busy").hidden = false; }, 300);
    getJSON("api/render?" + q)
      .then(async (answer) => {
        answered();
        const decoded = await decodeStrip(answer.strip);
        const ms = performance.now() - started;
        // Shown even if a newer state waits: while a slider moves, each answer is a frame.
        $("viewer").classList.remove("stale");
        S.last = decoded;
        showGenerated();
        $("caption").textContent = caption(answer);
        showMovedWith(answer);
        $("timing").textContent = `drawn in ${Math.round(ms)} ms (model ${Math.round(answer.model_ms)} ms)`;
        clearNotes("clamp");
        for (const text of answer.notes) if (/beyond/.test(text)) note(text, "clamp");
      })
      .catch((err) => {
        $("viewer").classList.add("stale");
        $("caption").textContent = "Not redrawn: the picture is of an earlier profile.";
        failed(err, "drawing the cell");
      })
      .finally(() => {
        clearTimeout(busy);
        $("busy").hidden = true;
        S.render.inflight = false;
        if (S.render.pending) requestRender();
        activity(-1);
      });
  }

  function caption(answer) {
    const n = Object.keys(answer.offsets).length;
    const m = answer.moved_with_count;
    return `${answer.label[0].toUpperCase()}${answer.label.slice(1)}` +
           (n ? `, ${n} feature${n > 1 ? "s" : ""} changed` : "") +
           (m ? ` and ${m} correlated feature${m > 1 ? "s" : ""} with ${n > 1 ? "them" : "it"}` : "") +
           (n && answer.alone ? " alone" : "") +
           (answer.pinned ? "" : " (this model draws the training cell nearest each profile: a " +
                                  "slider may swap the cell)");
  }

  function showMovedWith(answer) {
    const box = $("moved-with");
    box.hidden = !answer.moved_with_count;
    if (!answer.moved_with_count) return;
    const shown = answer.moved_with.map(([name, v]) => `${name} ${fmtSD(v)}`).join(", ");
    const more = answer.moved_with_count - answer.moved_with.length;
    box.textContent = `Moved with ${Object.keys(answer.offsets).length > 1 ? "them" : "it"}: ` +
      shown + (more > 0 ? `, and ${more} more` : "") + ".";
  }

  // --- the nearest real cells ----------------------------------------------------------------

  function scheduleNeighbours() {
    if (!S.info.data) return;
    if (S.nnTimer === null) activity(+1);
    clearTimeout(S.nnTimer);
    S.nnTimer = setTimeout(() => { S.nnTimer = null; loadNeighbours(); activity(-1); }, 250);
  }

  async function loadNeighbours() {
    const seq = ++S.nnSeq;
    activity(+1);
    try {
      const answer = await getJSON("api/neighbours?k=6&" + query());
      const decoded = await Promise.all(answer.cells.map((c) => decodeStrip(c.strip)));
      if (seq !== S.nnSeq) return;  // a newer profile asked meanwhile
      S.neighbours = answer.cells.map((cell, i) => ({ cell, decoded: decoded[i] }));
      $("nn-hint").textContent = `Closest of ${answer.searched} training cells of ${S.info.data} ` +
        "(RMS distance over all features, in training SDs). Click one to start from it.";
      showNeighbours(true);
    } catch (err) {
      if (seq === S.nnSeq) failed(err, "finding the nearest real cells");
    } finally {
      activity(-1);
    }
  }

  function showNeighbours(rebuild) {
    const list = $("nn-list");
    if (rebuild) {
      list.textContent = "";
      for (const { cell } of S.neighbours) {
        const fig = document.createElement("figure");
        fig.className = "nn";
        fig.title = `cell ${cell.id} (${cell.treatment}): start from this cell`;
        const img = document.createElement("img");
        img.alt = `real cell ${cell.id}`;
        const cap = document.createElement("figcaption");
        cap.innerHTML = `<b>${esc(cell.id)}</b> ${esc(cell.treatment)}<br><span class="muted">${cell.rms_sd.toFixed(2)} SD</span>`;
        fig.append(img, cap);
        fig.addEventListener("click", () => applyState({ base: cell.id, offsets: {} }));
        list.append(fig);
      }
    }
    Array.from(list.querySelectorAll("img")).forEach((img, i) => {
      const d = S.neighbours[i].decoded;
      img.src = compositeURL(d);
      sized(img, d.w, d.h, Math.max(1, Math.floor(140 / d.w)));
    });
  }

  // --- base picker ---------------------------------------------------------------------------

  function buildBaseSelect() {
    const select = $("base-select");
    const add = (parent, value, text, disabled) => {
      const o = document.createElement("option");
      o.value = value;
      o.textContent = text;
      o.disabled = !!disabled;
      parent.append(o);
    };
    add(select, "median", "Median cell (training)");
    const treatments = S.info.data ? S.info.treatments : S.info.model_treatments;
    if (treatments.length) {
      const group = document.createElement("optgroup");
      group.label = S.info.data ? "Treatment means" : "Treatment means (need --data)";
      for (const t of treatments) add(group, t, `${t} mean`, !S.info.data);
      select.append(group);
    }
    add(select, "__cell", S.info.data ? "A cell by id…" : "A cell by id… (needs --data)", !S.info.data);
    add(select, "__current", "", true);
    select.lastChild.hidden = true;
    select.addEventListener("change", () => {
      if (select.value === "__cell") {
        $("cell-picker").hidden = false;
        $("cell-id").focus();
        return;
      }
      $("cell-picker").hidden = true;
      applyState({ base: select.value, offsets: {} });
    });
    $("cell-id").addEventListener("input", suggestCells);
    $("cell-id").addEventListener("keydown", (e) => { if (e.key === "Enter") loadCell(); });
    $("cell-go").addEventListener("click", loadCell);
  }

  function syncBaseSelect() {
    const select = $("base-select");
    const known = Array.from(select.options).some((o) => o.value === S.base && !o.disabled);
    if (known) {
      select.value = S.base;
      $("cell-picker").hidden = true;
    } else {
      const current = select.querySelector('option[value="__current"]');
      current.textContent = `Cell ${S.base}`;
      current.hidden = false;
      select.value = "__current";
    }
  }

  let cellSeq = 0;
  async function suggestCells() {
    const q = $("cell-id").value.trim();
    const seq = ++cellSeq;
    if (!q) return;
    try {
      const found = await getJSON("api/cells?q=" + encodeURIComponent(q));
      if (seq !== cellSeq) return;
      const list = $("cell-list");
      list.textContent = "";
      for (const id of found.matches) {
        const o = document.createElement("option");
        o.value = id;
        list.append(o);
      }
    } catch (err) {
      failed(err, "looking up cells");
    }
  }

  async function loadCell() {
    const id = $("cell-id").value.trim();
    if (!id) return;
    try {
      const found = await getJSON("api/cells?lookup=1&q=" + encodeURIComponent(id));
      if (!found.exact) {
        const hint = S.info.example_cells.length ? ` (ids look like ${S.info.example_cells.slice(0, 3).join(", ")})` : "";
        note(`Cell ${id}: not in ${S.info.data}${hint}.`, "error");
        return;
      }
      await applyState({ base: id, offsets: {} });
    } catch (err) {
      failed(err, "loading the cell");
    }
  }

  // --- traversal and interpolation strips -----------------------------------------------------

  async function drawTraverse() {
    const feature = $("tr-feature").value.trim();
    if (!(feature in S.position)) {
      note(feature ? `${feature}: not one of the model's features; pick one from the list.`
                   : "Pick a feature to traverse.", "error");
      return;
    }
    const p = new URLSearchParams(query());
    p.set("feature", feature);
    p.set("start", $("tr-start").value);
    p.set("stop", $("tr-stop").value);
    p.set("steps", $("tr-steps").value);
    if ($("tr-alone").checked) p.set("alone", "1"); else p.delete("alone");
    await drawStrip("tr", "api/traverse?" + p.toString(), (answer) => {
      $("tr-title").textContent = `${answer.feature} around ${answer.label}` +
        (Object.keys(S.offsets).length ? " with your changes" : "") +
        (answer.correlated ? ", correlated features moving with it" : ", other features held") +
        (answer.range ? `; ${answer.range}` : "");
    });
  }

  async function drawInterpolation() {
    const p = new URLSearchParams({ a: $("ip-a").value, b: $("ip-b").value, steps: $("ip-steps").value });
    await drawStrip("ip", "api/interpolate?" + p.toString());
  }

  async function drawStrip(key, url, done) {
    const box = $(key + "-strip");
    box.classList.add("loading");
    activity(+1);
    try {
      const answer = await getJSON(url);
      answered();
      const decoded = await Promise.all(answer.frames.map((f) => decodeStrip(f.strip)));
      S.strips[key] = answer.frames.map((frame, i) => ({ frame, decoded: decoded[i] }));
      box.textContent = "";
      for (const { frame } of S.strips[key]) {
        const fig = document.createElement("figure");
        const img = document.createElement("img");
        img.alt = frame.label;
        const cap = document.createElement("figcaption");
        cap.textContent = frame.label + ("value" in frame ? ` = ${fmtRaw(frame.value)}` : "");
        fig.append(img, cap);
        box.append(fig);
      }
      showStrip(key);
      if (done) done(answer);
    } catch (err) {
      failed(err, key === "tr" ? "drawing the traversal" : "drawing the interpolation");
    } finally {
      box.classList.remove("loading");
      activity(-1);
    }
  }

  function showStrip(key) {
    const frames = S.strips[key];
    const imgs = $(key + "-strip").querySelectorAll("img");
    frames.forEach(({ decoded }, i) => {
      if (!imgs[i]) return;
      imgs[i].src = compositeURL(decoded);
      sized(imgs[i], decoded.w, decoded.h, Math.max(1, Math.floor(150 / decoded.w)));
    });
  }

  function buildStrips() {
    const list = $("feature-list");
    for (const name of S.names) {
      const o = document.createElement("option");
      o.value = name;
      list.append(o);
    }
    const preferred = ["Nuclei_AreaShape_Area", "Cells_AreaShape_Area"].find((n) => n in S.position);
    $("tr-feature").value = preferred || S.names.find((n, j) => S.info.features[j].sd > 0) || "";
    $("tr-alone").checked = !S.info.correlated;
    $("tr-alone").disabled = !S.info.correlated;
    if (!S.info.correlated) $("tr-alone").parentElement.title = "moving correlated features needs --data DATA_DIR";
    const ts = S.info.treatments;
    for (const id of ["ip-a", "ip-b"]) {
      for (const t of ts) {
        const o = document.createElement("option");
        o.value = o.textContent = t;
        $(id).append(o);
      }
      $(id).disabled = !ts.length;
    }
    $("ip-go").disabled = ts.length < 2;
    if (ts.length >= 2) {
      $("ip-a").value = ts.includes("DMSO") ? "DMSO" : ts[0];
      $("ip-b").value = ts.find((t) => t !== $("ip-a").value);
    } else {
      $("ip-strip").innerHTML = '<p class="muted">Interpolation needs treatment means: start explore with --data DATA_DIR.</p>';
    }
    $("tr-go").addEventListener("click", drawTraverse);
    $("ip-go").addEventListener("click", drawInterpolation);
  }

  let stripsDrawn = false;
  function showView(name) {
    for (const b of document.querySelectorAll(".tab")) b.classList.toggle("active", b.dataset.view === name);
    $("view-explore").hidden = name !== "explore";
    $("view-strips").hidden = name !== "strips";
    if (name === "strips" && !stripsDrawn) {
      stripsDrawn = true;
      drawTraverse();
      if (S.info.treatments.length >= 2) drawInterpolation();
    }
    if (name === "explore") showGenerated();
  }

  // --- start ---------------------------------------------------------------------------------

  function describeModel() {
    const i = S.info;
    const [h, w, c] = i.crop;
    let text = `${i.source} · ${i.features.length} features · ${w}×${h} px, ${i.channels.join(", ")}`;
    text += i.data ? ` · data ${i.data} (${i.reference_cells} training cells loaded)` : " · no --data";
    $("model-info").textContent = text;
    $("model-info").title = text;
    $("nn-hint").textContent = i.data ? "" : "Start explore with --data DATA_DIR to see the real cells nearest to the current profile.";
    if (!i.pinned) {
      note("This model does not edit a chosen cell (no exemplar bank, or served by TensorFlow " +
           "Serving): each picture is drawn from the training cell nearest its profile, so a " +
           "slider may swap the cell instead of changing it.", "warn");
    }
  }

  async function copyLink() {
    const url = location.href;
    try {
      await navigator.clipboard.writeText(url);
      note("Link copied: it opens this profile.", "flash");
    } catch (err) {
      window.prompt("Copy this link:", url);
    }
  }

  async function start() {
    try {
      S.info = await getJSON("api/info");
    } catch (err) {
      failed(err, "reading the model description");
      $("retry").onclick = () => location.reload();
      return;
    }
    S.names = S.info.features.map((f) => f.name);
    S.names.forEach((n, j) => { S.position[n] = j; });
    describeModel();
    buildToggles();
    buildTiles();
    buildGroups();
    buildBaseSelect();
    buildStrips();
    scaleBar();
    $("search").addEventListener("input", filterFeatures);
    $("alone").addEventListener("change", () => setAlone($("alone").checked));
    $("reset").addEventListener("click", () => applyState({ base: S.base, offsets: {} }));
    $("undo").addEventListener("click", undo);
    $("copy-link").addEventListener("click", copyLink);
    $("retry").addEventListener("click", () => { connection(null); S.baseRaw === null ? applyState(S.committed || { base: "median", offsets: {} }) : stateChanged(); });
    for (const b of document.querySelectorAll(".tab")) b.addEventListener("click", () => showView(b.dataset.view));
    document.addEventListener("keydown", (e) => {
      const typing = ["INPUT", "SELECT", "TEXTAREA"].includes(e.target.tagName) && e.target.type !== "range";
      if ((e.ctrlKey || e.metaKey) && e.key === "z" && !typing) { e.preventDefault(); undo(); }
    });
    window.addEventListener("hashchange", async () => {
      if (location.hash.replace(/^#/, "") === query()) return;
      await applyState(await stateFromHash(location.hash));
    });
    let resizeTimer = null;
    window.addEventListener("resize", () => { clearTimeout(resizeTimer); resizeTimer = setTimeout(showGenerated, 150); });
    activity(+1);
    await applyState(await stateFromHash(location.hash));
    document.body.classList.add("ready");
    activity(-1);
  }

  async function undo() {
    if (!S.undo.length) return;
    const previous = S.undo.pop();
    S.committed = previous;
    $("undo").disabled = S.undo.length === 0;
    await applyState(previous, false);
  }

  window.addEventListener("unhandledrejection", (e) => { e.preventDefault(); note(`Unexpected: ${e.reason && e.reason.message || e.reason}`, "error"); });
  start();
})();
