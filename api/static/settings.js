// The settings every side shares (style, strength, format, sizes, quality), remembered across visits;
// their bounds and choices come from the API's own schema. (describeChoice, from batch.js, and
// describeClip, from video.js, are called once the bounds are known: those modules import this one
// too, and each uses the other's names inside functions only.)

import { api, sleep } from "./api.js";
import { describeChoice } from "./batch.js";
import { $, byteSize, plural, say, waiting } from "./util.js";
import { describeClip } from "./video.js";

const SETTINGS_STORE = "toonserve.settings"; // localStorage: remembered across visits

// Each shared setting: its control, the API's form field, and its key in the page's storage.
export const SETTINGS = [
  { id: "style", field: "style", key: "style" },
  { id: "strength", field: "strength", key: "strength" },
  { id: "processing-size", field: "processing_size", key: "processingSize" },
  { id: "output-size", field: "output_size", key: "outputSize" },
  { id: "format", field: "format", key: "format" },
  { id: "quality", field: "quality", key: "quality" },
];

export function saveSettings() {
  const saved = Object.fromEntries(SETTINGS.map((s) => [s.key, $(s.id).value]));
  localStorage.setItem(SETTINGS_STORE, JSON.stringify(saved));
}

export function savedSettings() {
  try {
    return JSON.parse(localStorage.getItem(SETTINGS_STORE) ?? "{}") ?? {};
  } catch (_) {
    return {};
  }
}

export function showStrength() {
  $("strength-value").textContent = Number($("strength").value).toFixed(2);
}

// The form fields every request shares, but those in `leftOut` (the fields that do not apply to
// it). Empty fields are left out too: the service's defaults apply.
export function settingsForm(leftOut = []) {
  const form = new FormData();
  for (const { id, field } of SETTINGS) {
    const value = $(id).value.trim();
    if (value && !leftOut.includes(field)) form.append(field, value);
  }
  return form;
}

// What one job may hold (a batch's photos, or one clip), and one photo in a batch, from the API's
// schema; unknown until it is read.
export const jobLimits = {
  files: Infinity,
  bytes: Infinity,
  photoBytes: Infinity,
  clipBytes: Infinity,
  clipSeconds: Infinity,
};

// Bounds and choices come from the API's own schema, so the page never disagrees with the service.
export async function loadBounds() {
  const spec = await (await api("/openapi.json")).json();
  const jobBody = spec.paths["/jobs"].post.requestBody.content["multipart/form-data"];
  const jobProps = spec.components.schemas[jobBody.schema.$ref.split("/").pop()].properties;
  jobLimits.files = jobProps.images.maxItems ?? Infinity;
  jobLimits.bytes = jobBody["x-max-body-bytes"] ?? Infinity;
  // A photo in a job may be as large as the body /cartoonize takes, no larger.
  const oneBody = spec.paths["/cartoonize"].post.requestBody.content["multipart/form-data"];
  jobLimits.photoBytes = oneBody["x-max-body-bytes"] ?? Infinity;
  // A clip is checked against its own limits too (the service says them on the `video` part).
  jobLimits.clipBytes = Math.min(jobLimits.bytes, jobProps.video?.["x-max-bytes"] ?? Infinity);
  jobLimits.clipSeconds = jobProps.video?.["x-max-seconds"] ?? Infinity;
  $("photos-limit").textContent = Number.isFinite(jobLimits.files)
    ? ` At most ${plural(jobLimits.files, "photo")} and ${byteSize(jobLimits.bytes)} in one batch.`
    : "";
  const minutes = jobLimits.clipSeconds / 60;
  const duration = minutes >= 1 ? `${+minutes.toFixed(1)} min` : `${jobLimits.clipSeconds} s`;
  const length = Number.isFinite(minutes) ? `, ${duration} long` : "";
  $("clip-limit").textContent = Number.isFinite(jobLimits.clipBytes)
    ? ` At most ${byteSize(jobLimits.clipBytes)}${length}.`
    : "";
  if ($("photos").files.length) describeChoice();
  if ($("clip").files.length) describeClip();
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
    `JPEG, WebP and videos, ${bound("quality", "quality")}: more is finer and larger; a video at 100 is ` +
    "lossless (large, for editing). Empty: the service's default.";
  const format = $("format");
  for (const name of typed(props.format).enum) {
    const option = new Option(name === "jpeg" ? "JPEG" : name === "webp" ? "WebP" : name.toUpperCase(), name);
    format.append(option);
  }
}

// The styles this service can draw now (loaded), the default one selected unless one was remembered.
export async function loadStyles() {
  const select = $("style");
  for (;;) {
    const { styles } = await (await api("/styles", { onWait: waiting("settings") })).json();
    const loaded = styles.filter((s) => s.loaded);
    if (loaded.length) {
      showDemo(loaded.filter((s) => s.source === "demo").map((s) => s.name));
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

// Demo weights (random, in the real architecture) make colourful noise, not cartoons: say so up front.
function showDemo(names) {
  const banner = $("demo-banner");
  banner.hidden = names.length === 0;
  banner.textContent = names.length
    ? `Demo weights: these are not real cartoons. ${names.join(", ")} ${names.length === 1 ? "runs" : "run"} on ` +
      "random weights, for trying the service out; whoever runs it can install the real models (see its README)."
    : "";
}

export function showStyleHint() {
  const descriptions = JSON.parse($("style").dataset.descriptions ?? "{}");
  $("style-hint").textContent = descriptions[$("style").value] ?? "";
}

export function restoreSettings(saved) {
  for (const { id, key } of SETTINGS) {
    const control = $(id);
    if (typeof saved[key] !== "string") continue;
    // Only choices the service offers now: a remembered style that is not loaded here is skipped.
    if (control.tagName === "SELECT" && ![...control.options].some((o) => o.value === saved[key])) continue;
    control.value = saved[key];
  }
  showStrength();
  showStyleHint();
  // A remembered setting under "More settings" is shown, not hidden away.
  if ($("processing-size").value) $("more-settings").open = true;
}
