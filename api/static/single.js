// One photo: its preview, the request, the result with its before/after slider, faces and timings.

import { api } from "./api.js";
import { settingsForm } from "./settings.js";
import { $, base64Blob, fail, objectUrl, objectUrls, plural, say, stemOf, suffixOf, waiting } from "./util.js";


let singleRun = null; // AbortController of the request in flight
let shownFile = null; // the photo whose cartoon is shown, while it is still the chosen one
let refreshTimer = null;
// A slider sends many input events: the page asks again once it rests this long.
const REFRESH_DELAY_MS = 200;

export function previewPhoto() {
  const file = $("photo").files[0];
  shownFile = null;
  $("cartoon-figure").hidden = true;
  $("single-details").hidden = true;
  $("face-boxes").replaceChildren();
  fail("single", "");
  say("single", "");
  if (!file) {
    $("photo-figure").hidden = true;
    return;
  }
  // Shown once the browser has drawn it (photoShown); a file it cannot draw (a PDF, a TIFF) is not
  // shown at all (photoNotShown), rather than as a broken image.
  $("photo-figure").hidden = true;
  $("photo-preview").src = objectUrl("single:photo", file);
  $("photo-caption").textContent = file.name;
}

export function photoShown() {
  if ($("photo").files.length) $("photo-figure").hidden = false;
}

export function photoNotShown() {
  $("photo-figure").hidden = true;
  if ($("photo").files.length) say("single", "This browser cannot preview this file; the service may still read it.");
}

export function cartoonize(event) {
  event.preventDefault();
  return runSingle($("photo").files[0], false);
}

// A setting changed while a cartoon is shown: ask again, so what is shown always matches the settings.
// The service keeps what its models made of this photo for this page's client, so a change of
// strength, format, quality or output size comes back at once (only those last steps run there);
// the page does not blend on its own, so that what it shows is byte for byte what it downloads.
export function settingsChanged() {
  clearTimeout(refreshTimer);
  const file = $("photo").files[0];
  if (!shownFile || file !== shownFile) return;
  refreshTimer = setTimeout(() => runSingle(file, true), REFRESH_DELAY_MS);
}

async function runSingle(file, refresh) {
  clearTimeout(refreshTimer);
  singleRun?.abort();
  const run = new AbortController();
  singleRun = run;
  fail("single", "");
  say("single", refresh ? `Updating the cartoon of ${file.name}…` : `Cartoonizing ${file.name}…`);
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
    shownFile = file;
  } catch (err) {
    if (run.signal.aborted) return;
    say("single", "");
    fail("single", err.message);
  } finally {
    if (singleRun === run) $("panel-single").removeAttribute("aria-busy");
  }
}

// Each face outcome in plain words (the API's `reason` codes, `no_face` policies).
const REASONS = {
  below_threshold: "it may not be a face",
  too_small: "it is too small to draw",
  over_limit: "this service draws only so many faces in one photo",
  alignment_failed: "it could not be lined up",
};
const NO_FACE = {
  background: "No face was found, so the whole photo was drawn in the style as scenery.",
  passthrough: "No face was found, so the photo came back unchanged.",
};

function showResult(file, data) {
  const url = objectUrl("single:cartoon", base64Blob(data.image, data.media_type));
  $("cartoon").src = url;
  $("compare-photo").src = objectUrls.get("single:photo");
  $("compare-photo").hidden = $("photo-figure").hidden; // a photo the browser cannot draw is not shown
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
    item.textContent = face.stylized
      ? `Face ${i + 1}: cartooned.`
      : `Face ${i + 1}: left as it is, because ${REASONS[face.reason] ?? face.reason}.`;
    if (!face.stylized) item.className = "skipped";
    list.push(item);
  });
  if (!data.faces.length) {
    const item = document.createElement("li");
    item.textContent = NO_FACE[data.no_face] ?? "No face was found.";
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
    `Your photo is ${size(data.input_size)} pixels; it was worked on at ${size(data.processing_size)} ` +
    `(the processing size) and the cartoon is ${size(data.output_size)}. Drawn on ${data.device} in ` +
    `${data.dtype}${data.source === "demo" ? ", with demo weights (not a real cartoon)" : ""}.`;
  $("single-details").hidden = false;
  const total = Object.values(data.timings_ms).reduce((a, b) => a + b, 0);
  say(
    "single",
    data.cache === "hit"
      ? `Updated in ${total.toFixed(0)} ms from what the models already made of this photo ` +
          "(only strength, size and encoding ran). The cartoon is ready to download."
      : `Done: ${plural(data.faces_stylized, "face")} stylised. The cartoon is ready to download.`,
  );
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
export function compare() {
  const at = Number($("compare-slider").value);
  $("cartoon").style.clipPath = `inset(0 0 0 ${at}%)`;
  $("compare-divider").style.left = `${at}%`;
  $("compare-slider").setAttribute("aria-valuetext", `${at} % photo, ${100 - at} % cartoon`);
}
