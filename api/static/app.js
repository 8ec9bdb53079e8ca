// The toonserve web page: plain JavaScript (ES2020), no framework, no build step. Every call goes to
// this page's own origin; every error shown is the API's own `error.message`.
"use strict";

const KEY_STORE = "toonserve.apiKey"; // sessionStorage: the key never outlives the tab
const SETTINGS_STORE = "toonserve.settings"; // localStorage: remembered across visits
const JOB_STORE = "toonserve.job"; // localStorage: the last batch, found again after a reload
const STREAM_RETRY_MS = 2000; // pause before reconnecting an events stream that broke off

const $ = (id) => document.getElementById(id);

// -- talking to the API --------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function readError(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) {
      return new ApiError(response.status, body.error.code, body.error.message);
    }
  } catch (_) {
    // not the service's JSON (a proxy in between): fall through
  }
  return new ApiError(response.status, "http_error", `${response.status} ${response.statusText}`.trim());
}

function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener(
      "abort",
      () => {
        clearTimeout(timer);
        reject(signal.reason);
      },
      { once: true },
    );
  });
}

const apiKey = () => sessionStorage.getItem(KEY_STORE);
let keyPrompt = null; // the open prompt, shared by every request that met a 401 meanwhile

// Ask for the API key once (a modal dialog); resolves when one is given, rejects if dismissed.
function askForKey(message) {
  if (keyPrompt) return keyPrompt;
  const dialog = $("key-dialog");
  $("key-message").textContent = message;
  $("api-key").value = "";
  keyPrompt = new Promise((resolve, reject) => {
    dialog.addEventListener(
      "close",
      () => {
        keyPrompt = null;
        const key = $("api-key").value.trim();
        if (dialog.returnValue === "save" && key) {
          sessionStorage.setItem(KEY_STORE, key);
          resolve();
        } else {
          reject(new ApiError(401, "unauthorized", message));
        }
      },
      { once: true },
    );
  });
  dialog.returnValue = "";
  dialog.showModal();
  return keyPrompt;
}

// fetch() on this origin with the API key, asking for the key on a 401 and waiting out a 503 that
// says when to come back (`onWait(seconds, message)` tells the person). Resolves to an OK response;
// throws ApiError otherwise. Bodies must be re-sendable (FormData, strings): a retry sends them again.
async function api(path, { method = "GET", body, headers = {}, signal, onWait } = {}) {
  for (;;) {
    const sent = { ...headers };
    const key = apiKey();
    if (key) sent["X-API-Key"] = key;
    let response;
    try {
      response = await fetch(path, { method, body, headers: sent, signal });
    } catch (err) {
      if (signal?.aborted) throw err;
      throw new ApiError(0, "network", "The service could not be reached; check the connection and try again.");
    }
    if (response.ok) return response;
    const error = await readError(response);
    if (response.status === 401) {
      await askForKey(error.message);
      continue;
    }
    const wait = Number.parseInt(response.headers.get("Retry-After") ?? "", 10);
    if (response.status === 503 && Number.isFinite(wait) && onWait) {
      const seconds = Math.max(1, wait);
      onWait(seconds, error.message);
      await sleep(seconds * 1000, signal);
      continue;
    }
    throw error;
  }
}

// -- small helpers -------------------------------------------------------------------------------

const objectUrls = new Map(); // slot → object URL, revoked when the slot is reused

function objectUrl(slot, blob) {
  const old = objectUrls.get(slot);
  if (old) URL.revokeObjectURL(old);
  const url = URL.createObjectURL(blob);
  objectUrls.set(slot, url);
  return url;
}

function dropObjectUrls(prefix) {
  for (const [slot, url] of objectUrls) {
    if (slot.startsWith(prefix)) {
      URL.revokeObjectURL(url);
      objectUrls.delete(slot);
    }
  }
}

function base64Blob(data, type) {
  const text = atob(data);
  const bytes = new Uint8Array(text.length);
  for (let i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
  return new Blob([bytes], { type });
}

// The same suffixes as the service's own file names (ZIP entries).
const SUFFIXES = { "image/png": "png", "image/jpeg": "jpg", "image/webp": "webp" };
const suffixOf = (type) => SUFFIXES[type] ?? type.split("/").pop();
const stemOf = (name) => name.replace(/\.[^.]*$/, "") || "photo";
const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;

function say(side, text) {
  $(`${side}-status`).textContent = text;
}

function fail(side, message) {
  $(`${side}-error`).textContent = message;
}

const waiting = (side) => (seconds, message) =>
  say(side, `The service is busy; trying again in ${seconds} s. (${message})`);

// -- settings (shared by both sides, remembered in localStorage) ---------------------------------

// Each shared setting: its control, the API's form field, and its key in the page's storage.
const SETTINGS = [
  { id: "style", field: "style", key: "style" },
  { id: "strength", field: "strength", key: "strength" },
  { id: "processing-size", field: "processing_size", key: "processingSize" },
  { id: "output-size", field: "output_size", key: "outputSize" },
  { id: "format", field: "format", key: "format" },
  { id: "quality", field: "quality", key: "quality" },
];

function saveSettings() {
  const saved = Object.fromEntries(SETTINGS.map((s) => [s.key, $(s.id).value]));
  localStorage.setItem(SETTINGS_STORE, JSON.stringify(saved));
}

function savedSettings() {
  try {
    return JSON.parse(localStorage.getItem(SETTINGS_STORE) ?? "{}") ?? {};
  } catch (_) {
    return {};
  }
}

function showStrength() {
  $("strength-value").textContent = Number($("strength").value).toFixed(2);
}

// The form fields every request shares. Empty fields are left out: the service's defaults apply.
function settingsForm() {
  const form = new FormData();
  for (const { id, field } of SETTINGS) {
    const value = $(id).value.trim();
    if (value) form.append(field, value);
  }
  return form;
}

// What one batch (a job) may hold, from the API's schema; unknown until it is read.
const batchLimits = { files: Infinity, bytes: Infinity };

// Bounds and choices come from the API's own schema, so the page never disagrees with the service.
async function loadBounds() {
  const spec = await (await api("/openapi.json")).json();
  const jobBody = spec.paths["/jobs"].post.requestBody.content["multipart/form-data"];
  const jobProps = spec.components.schemas[jobBody.schema.$ref.split("/").pop()].properties;
  batchLimits.files = jobProps.images.maxItems ?? Infinity;
  batchLimits.bytes = jobBody["x-max-body-bytes"] ?? Infinity;
  $("photos-limit").textContent = Number.isFinite(batchLimits.files)
    ? ` At most ${plural(batchLimits.files, "photo")} and ${byteSize(batchLimits.bytes)} in one batch.`
    : "";
  if ($("photos").files.length) describeChoice();
  const body = spec.paths["/cartoonize"].post.requestBody.content["multipart/form-data"].schema;
  const props = spec.components.schemas[body.$ref.split("/").pop()].properties;
  // Optional fields are `anyOf: [{the type}, {null}]`.
  const typed = (prop) => (prop.anyOf ? prop.anyOf.find((s) => s.type && s.type !== "null") : prop);
  const strength = typed(props.strength);
  $("strength").min = strength.minimum;
  $("strength").max = strength.maximum;
  const bound = (id, field) => {
    const { minimum, maximum } = typed(props[field]);
    $(id).min = minimum;
    $(id).max = maximum;
    return `${minimum} to ${maximum}`;
  };
  $("processing-hint").textContent =
    `The photo's short side while it is worked on, ${bound("processing-size", "processing_size")} pixels: ` +
    "more is sharper and slower. Empty: the service's default.";
  $("output-hint").textContent =
    `The result's long side, ${bound("output-size", "output_size")} pixels. Empty: the photo's own size.`;
  $("quality-hint").textContent =
    `JPEG and WebP only, ${bound("quality", "quality")}: more is finer and larger. Empty: the service's default.`;
  const format = $("format");
  for (const name of typed(props.format).enum) {
    const option = new Option(name === "jpeg" ? "JPEG" : name === "webp" ? "WebP" : name.toUpperCase(), name);
    format.append(option);
  }
}

// The styles this service can draw now (loaded), the default one selected unless one was remembered.
async function loadStyles() {
  const select = $("style");
  for (;;) {
    const { styles } = await (await api("/styles", { onWait: waiting("settings") })).json();
    const loaded = styles.filter((s) => s.loaded);
    if (loaded.length) {
      select.replaceChildren(...loaded.map((s) => new Option(s.name, s.name, s.default, s.default)));
      select.dataset.descriptions = JSON.stringify(Object.fromEntries(loaded.map((s) => [s.name, s.description])));
      const loading = styles.filter((s) => s.state === "loading").map((s) => s.name);
      say("settings", loading.length ? `Still loading: ${loading.join(", ")}.` : "");
      return;
    }
    const states = styles.filter((s) => s.configured).map((s) => `${s.name}: ${s.error ?? s.state}`);
    say("settings", `No style is ready yet (${states.join("; ")}); checking again in 3 s.`);
    await sleep(3000);
  }
}

function showStyleHint() {
  const descriptions = JSON.parse($("style").dataset.descriptions ?? "{}");
  $("style-hint").textContent = descriptions[$("style").value] ?? "";
}

function restoreSettings(saved) {
  for (const { id, key } of SETTINGS) {
    const control = $(id);
    if (typeof saved[key] !== "string") continue;
    // Only choices the service offers now: a remembered style that is not loaded here is skipped.
    if (control.tagName === "SELECT" && ![...control.options].some((o) => o.value === saved[key])) continue;
    control.value = saved[key];
  }
  showStrength();
  showStyleHint();
}

// -- tabs and drop zones -------------------------------------------------------------------------

const tabs = () => [$("tab-single"), $("tab-batch")];

function selectTab(tab, focus = false) {
  for (const t of tabs()) {
    const on = t === tab;
    t.setAttribute("aria-selected", String(on));
    t.tabIndex = on ? 0 : -1;
    $(t.getAttribute("aria-controls")).hidden = !on;
  }
  if (focus) tab.focus();
}

function onTabKey(event) {
  const list = tabs();
  const at = list.indexOf(event.target);
  const to = { ArrowRight: at + 1, ArrowLeft: at - 1, Home: 0, End: list.length - 1 }[event.key];
  if (to === undefined) return;
  event.preventDefault();
  selectTab(list[(to + list.length) % list.length], true);
}

function dropZone(zone, input) {
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    const dropped = [...event.dataTransfer.files];
    if (!dropped.length) return;
    const chosen = new DataTransfer();
    for (const file of input.multiple ? dropped : dropped.slice(0, 1)) chosen.items.add(file);
    input.files = chosen.files;
    input.dispatchEvent(new Event("change", { bubbles: true }));
  });
}

// -- one photo -----------------------------------------------------------------------------------

let singleRun = null; // AbortController of the request in flight

function previewPhoto() {
  const file = $("photo").files[0];
  $("cartoon-figure").hidden = true;
  $("single-details").hidden = true;
  $("face-boxes").replaceChildren();
  fail("single", "");
  say("single", "");
  if (!file) {
    $("photo-figure").hidden = true;
    return;
  }
  $("photo-preview").src = objectUrl("single:photo", file);
  $("photo-caption").textContent = file.name;
  $("photo-figure").hidden = false;
}

async function cartoonize(event) {
  event.preventDefault();
  const file = $("photo").files[0];
  singleRun?.abort();
  const run = new AbortController();
  singleRun = run;
  fail("single", "");
  say("single", `Cartoonizing ${file.name}…`);
  $("panel-single").setAttribute("aria-busy", "true");
  const form = settingsForm();
  form.append("image", file, file.name);
  form.append("response", "json");
  try {
    const response = await api("/cartoonize", {
      method: "POST",
      body: form,
      signal: run.signal,
      onWait: waiting("single"),
    });
    showResult(file, await response.json());
  } catch (err) {
    if (run.signal.aborted) return;
    say("single", "");
    fail("single", err.message);
  } finally {
    if (singleRun === run) $("panel-single").removeAttribute("aria-busy");
  }
}

const REASONS = {
  below_threshold: "the detector was not sure enough",
  too_small: "too small",
  over_limit: "over the limit of faces per photo",
  alignment_failed: "it could not be aligned",
};

function showResult(file, data) {
  const url = objectUrl("single:cartoon", base64Blob(data.image, data.media_type));
  $("cartoon").src = url;
  $("compare-photo").src = objectUrls.get("single:photo");
  const download = $("download");
  download.href = url;
  download.download = `${stemOf(file.name)}-${data.style}.${suffixOf(data.media_type)}`;
  $("cartoon-figure").hidden = false;
  compare();

  // Face boxes over the photo, in percent of the input size (the preview is the same photo upright).
  const { width, height } = data.input_size;
  const boxes = [];
  const list = [];
  data.faces.forEach((face, i) => {
    const [x1, y1, x2, y2] = face.box;
    const box = document.createElement("div");
    box.className = face.stylized ? "box" : "box skipped";
    box.style.left = `${(100 * x1) / width}%`;
    box.style.top = `${(100 * y1) / height}%`;
    box.style.width = `${(100 * (x2 - x1)) / width}%`;
    box.style.height = `${(100 * (y2 - y1)) / height}%`;
    const tag = document.createElement("span");
    tag.textContent = String(i + 1);
    box.append(tag);
    boxes.push(box);
    const item = document.createElement("li");
    const score = `detector score ${face.score.toFixed(2)}`;
    item.textContent = face.stylized
      ? `Face ${i + 1}: stylised (${score})`
      : `Face ${i + 1}: skipped, ${REASONS[face.reason] ?? face.reason} (${score})`;
    if (!face.stylized) item.className = "skipped";
    list.push(item);
  });
  if (!data.faces.length) {
    const item = document.createElement("li");
    item.textContent = `No face found; the whole photo was drawn as background (${data.no_face}).`;
    list.push(item);
  }
  $("face-boxes").replaceChildren(...boxes);
  $("faces-list").replaceChildren(...list);
  $("photo-caption").textContent = `${file.name}: ${plural(data.faces.length, "face")} found`;

  const rows = [];
  let sum = 0;
  for (const [stage, ms] of Object.entries(data.timings_ms)) {
    sum += ms;
    rows.push(timingRow(stage.replace("_", " "), ms));
  }
  rows.push(timingRow("sum", sum, "sum"));
  $("timings").replaceChildren(...rows.flat());
  const size = (s) => `${s.width}×${s.height}`;
  $("run-info").textContent =
    `${size(data.input_size)} in, worked at ${size(data.processing_size)}, ${size(data.output_size)} out; ` +
    `${data.device}, ${data.dtype}.`;
  $("single-details").hidden = false;
  say("single", `Done: ${plural(data.faces_stylized, "face")} stylised. The cartoon is ready to download.`);
}

function timingRow(name, ms, className) {
  const dt = document.createElement("dt");
  const dd = document.createElement("dd");
  dt.textContent = name;
  dd.textContent = `${ms.toFixed(1)} ms`;
  if (className) dt.className = dd.className = className;
  return [dt, dd];
}

// The before/after slider: the cartoon is clipped from the left up to the line.
function compare() {
  const at = Number($("compare-slider").value);
  $("cartoon").style.clipPath = `inset(0 0 0 ${at}%)`;
  $("compare-divider").style.left = `${at}%`;
  $("compare-slider").setAttribute("aria-valuetext", `${at} % photo, ${100 - at} % cartoon`);
}

// -- a batch (a job) -----------------------------------------------------------------------------

let follower = null; // AbortController of the events stream followed now
let batch = null; // { id, total, done, failed }

function randomKey() {
  // crypto.randomUUID needs a secure context; plain http on a LAN address is not one.
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

// A byte count as people read it: "0.4 MB", "35 MB", "1.1 GB".
const byteSize = (bytes) =>
  bytes >= 1e9 ? `${(bytes / 1e9).toFixed(1)} GB` : `${(bytes / 1e6).toFixed(bytes < 1e7 ? 1 : 0)} MB`;

// Why the chosen photos cannot go as one batch (over the service's limits), or "" when they can.
function overLimits(files, bytes) {
  if (files.length > batchLimits.files)
    return `${plural(files.length, "photo")} chosen; this service takes at most ${batchLimits.files} in one batch. Choose fewer, or send them as several batches.`;
  if (bytes > batchLimits.bytes)
    return `The chosen photos come to ${byteSize(bytes)}; this service takes at most ${byteSize(batchLimits.bytes)} in one batch. Choose fewer, or send them as several batches.`;
  return "";
}

function describeChoice() {
  const files = [...$("photos").files];
  const bytes = files.reduce((n, f) => n + f.size, 0);
  say("batch", files.length ? `${plural(files.length, "photo")} chosen (${byteSize(bytes)}).` : "");
  const refusal = overLimits(files, bytes);
  fail("batch", refusal);
  $("start-batch").disabled = refusal !== "";
}

async function startBatch(event) {
  event.preventDefault();
  const files = [...$("photos").files];
  const refusal = overLimits(files, files.reduce((n, f) => n + f.size, 0));
  if (refusal) return fail("batch", refusal);
  const form = settingsForm();
  for (const file of files) form.append("images", file, file.name);
  fail("batch", "");
  say("batch", `Sending ${plural(files.length, "photo")}…`);
  try {
    // One idempotency key per press: a retry (after a 401 or a 503) never makes a second job.
    const response = await api("/jobs", {
      method: "POST",
      body: form,
      headers: { "Idempotency-Key": randomKey() },
      onWait: waiting("batch"),
    });
    const job = await response.json();
    localStorage.setItem(JOB_STORE, job.id);
    follow(job.id);
  } catch (err) {
    say("batch", "");
    fail("batch", err.message);
  }
}

// Server-Sent Events from a fetch() body (EventSource cannot send the API key header).
async function* serverEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer = (buffer + value).replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (!line || line.startsWith(":")) continue; // a keep-alive comment
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") name = text;
        else if (field === "data") data.push(text);
      }
      if (data.length) yield { name, data: JSON.parse(data.join("\n")) };
    }
  }
}

// Follow a job's events until it ends, reconnecting if the stream breaks off (the first event of
// every connection is the whole job, so nothing is missed).
async function follow(id, { resumed = false } = {}) {
  follower?.abort();
  const run = new AbortController();
  follower = run;
  batch = { id, total: 0, done: 0, failed: 0 };
  dropObjectUrls("batch:");
  $("batch-items").replaceChildren();
  $("download-all").hidden = true;
  $("cancel").hidden = false;
  $("batch-job").hidden = false;
  if (!resumed) say("batch", "Batch started.");
  for (;;) {
    try {
      const response = await api(`/jobs/${id}/events`, { signal: run.signal, onWait: waiting("batch") });
      for await (const event of serverEvents(response.body)) {
        if (event.name === "job") showJob(event.data, resumed);
        else if (event.name === "item") showItem(event.data, true);
        else if (event.name === "end") return await ended(event.data);
      }
    } catch (err) {
      if (run.signal.aborted) return;
      if (err.status === 404) {
        localStorage.removeItem(JOB_STORE);
        $("batch-job").hidden = true;
        if (!resumed) fail("batch", err.message);
        return;
      }
      if (err.status) {
        fail("batch", err.message);
        return;
      }
    }
    if (run.signal.aborted) return;
    say("batch", "The connection was lost; reconnecting…");
    try {
      await sleep(STREAM_RETRY_MS, run.signal);
    } catch (_) {
      return;
    }
  }
}

function showJob(job, resumed) {
  batch.total = job.total;
  batch.done = job.done;
  batch.failed = job.failed;
  for (const item of job.items) showItem(item, false);
  showCount();
  if (resumed && job.status !== "succeeded" && job.status !== "failed" && job.status !== "cancelled") {
    say("batch", "Found the batch that was running; following it again.");
  }
}

function showCount() {
  $("batch-progress").max = Math.max(1, batch.total);
  $("batch-progress").value = batch.done;
  $("batch-count").textContent = `${batch.done} of ${batch.total}`;
}

const ENDED = new Set(["ok", "error", "cancelled"]);

function itemRow(item) {
  const list = $("batch-items");
  let row = list.querySelector(`[data-index="${item.index}"]`);
  if (!row) {
    row = document.createElement("li");
    row.dataset.index = String(item.index);
    const picture = document.createElement("div");
    picture.className = "thumb";
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = item.filename;
    const note = document.createElement("span");
    note.className = "note";
    row.append(picture, name, note);
    list.append(row);
  }
  return row;
}

function showItem(item, counted) {
  const row = itemRow(item);
  if (counted && ENDED.has(item.status) && row.dataset.status !== item.status) {
    batch.done += 1;
    if (item.status === "error") batch.failed += 1;
    showCount();
  }
  if (row.dataset.status === item.status) return;
  row.dataset.status = item.status;
  const note = row.querySelector(".note");
  if (item.status === "ok") {
    note.textContent = `${plural(item.faces_stylized ?? 0, "face")} stylised`;
    loadThumb(row, item);
  } else if (item.status === "error") {
    row.classList.add("failed");
    note.textContent = item.error?.message ?? "failed";
  } else {
    note.textContent = { queued: "waiting", running: "working…", cancelled: "cancelled" }[item.status];
  }
}

async function loadThumb(row, item) {
  const { id } = batch;
  try {
    const response = await api(item.result_url ?? `/jobs/${id}/items/${item.index}`);
    const blob = await response.blob();
    if (batch?.id !== id) return; // another batch replaced this one meanwhile
    const img = document.createElement("img");
    img.alt = `Cartoon of ${item.filename}`;
    img.src = objectUrl(`batch:${item.index}`, blob);
    row.querySelector(".thumb").replaceChildren(img);
  } catch (err) {
    row.classList.add("failed");
    row.querySelector(".note").textContent = err.message;
  }
}

async function ended(job) {
  const hadFocus = document.activeElement === $("cancel");
  $("cancel").hidden = true;
  if (job.status === "deleted") {
    localStorage.removeItem(JOB_STORE);
    say("batch", "This batch was deleted on the service.");
    return;
  }
  showJob(job, false);
  const ok = job.items.filter((i) => i.status === "ok").length;
  const summary = `${plural(ok, "photo")} of ${job.total} cartoonized`;
  if (job.status === "failed") fail("batch", job.error);
  else if (job.status === "cancelled") say("batch", `Batch cancelled: ${summary}.`);
  else say("batch", `Batch done: ${summary}${job.failed ? `, ${job.failed} failed` : ""}.`);
  await offerZip(job.id);
  if (hadFocus) $("download-all").focus();
}

// "Download all": a plain link to the ZIP, or, when the API needs a key (a link cannot send it), the
// ZIP fetched with the key and offered from memory.
async function offerZip(id) {
  const link = $("download-all");
  link.download = `toonserve-${id}.zip`;
  if (apiKey()) {
    try {
      const blob = await (await api(`/jobs/${id}/result`)).blob();
      link.href = objectUrl("batch:zip", blob);
    } catch (err) {
      fail("batch", err.message);
      return;
    }
  } else {
    link.href = `/jobs/${id}/result`;
  }
  link.hidden = false;
}

async function cancelBatch() {
  if (!batch) return;
  say("batch", "Cancelling…"); // the events stream then reports the end
  try {
    await api(`/jobs/${batch.id}`, { method: "DELETE" });
  } catch (err) {
    fail("batch", err.message);
  }
}

// -- start-up ------------------------------------------------------------------------------------

async function start() {
  for (const tab of tabs()) {
    tab.addEventListener("click", () => selectTab(tab));
    tab.addEventListener("keydown", onTabKey);
  }
  // A file dropped beside a drop zone must not replace the page.
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());
  dropZone($("single-drop"), $("photo"));
  dropZone($("batch-drop"), $("photos"));
  $("photo").addEventListener("change", previewPhoto);
  $("photos").addEventListener("change", describeChoice);
  $("single-form").addEventListener("submit", cartoonize);
  $("batch-form").addEventListener("submit", startBatch);
  $("cancel").addEventListener("click", cancelBatch);
  $("compare-slider").addEventListener("input", compare);
  $("strength").addEventListener("input", showStrength);
  $("style").addEventListener("change", showStyleHint);
  for (const { id } of SETTINGS) $(id).addEventListener("change", saveSettings);
  $("photo-preview").addEventListener("error", () => {
    if ($("photo").files.length) $("photo-caption").textContent = "This browser cannot show this photo; the service may still read it.";
  });

  const saved = savedSettings();
  restoreSettings(saved);
  try {
    await Promise.all([loadBounds(), loadStyles()]);
  } catch (err) {
    say("settings", "");
    fail("single", err.message);
  }
  restoreSettings(saved);

  const job = localStorage.getItem(JOB_STORE);
  if (job) {
    selectTab($("tab-batch"));
    follow(job, { resumed: true });
  }
  document.body.dataset.ready = "true";
}

start();
