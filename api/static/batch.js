// A batch: a job of several photos, followed through its events stream (resumed after a reload),
// each result shown as it ends (and downloadable alone), cancelled, downloaded whole.

import { api, apiKey } from "./api.js";
import { cancelJob, commonHandlers, submitJob, watchJob } from "./jobs.js";
import { jobLimits, settingsForm } from "./settings.js";
import { $, byteSize, dropObjectUrls, fail, objectUrl, plural, say, stemOf, suffixOf } from "./util.js";

export const JOB_STORE = "toonserve.job"; // localStorage: the last batch, found again after a reload

let follower = null; // AbortController of the events stream followed now
let batch = null; // { id, total, done, failed }

// Why the chosen photos cannot go as one batch (over the service's limits), or "" when they can.
function overLimits(files, bytes) {
  if (files.length > jobLimits.files)
    return `${plural(files.length, "photo")} chosen; this service takes at most ${jobLimits.files} in one batch. Choose fewer, or send them as several batches.`;
  if (bytes > jobLimits.bytes)
    return `The chosen photos come to ${byteSize(bytes)}; this service takes at most ${byteSize(jobLimits.bytes)} in one batch. Choose fewer, or send them as several batches.`;
  const large = files.find((f) => f.size > jobLimits.photoBytes);
  if (large)
    return `${large.name} is ${byteSize(large.size)}; this service takes photos of at most ${byteSize(jobLimits.photoBytes)}. Leave it out, or make it smaller.`;
  return "";
}

export function describeChoice() {
  const files = [...$("photos").files];
  const bytes = files.reduce((n, f) => n + f.size, 0);
  say("batch", files.length ? `${plural(files.length, "photo")} chosen (${byteSize(bytes)}).` : "");
  const refusal = overLimits(files, bytes);
  fail("batch", refusal);
  $("start-batch").disabled = refusal !== "";
}

export async function startBatch(event) {
  event.preventDefault();
  const files = [...$("photos").files];
  const refusal = overLimits(files, files.reduce((n, f) => n + f.size, 0));
  if (refusal) return fail("batch", refusal);
  const form = settingsForm();
  for (const file of files) form.append("images", file, file.name);
  fail("batch", "");
  say("batch", `Sending ${plural(files.length, "photo")}…`);
  try {
    const job = await submitJob(form, "batch");
    localStorage.setItem(JOB_STORE, job.id);
    follow(job.id);
  } catch (err) {
    say("batch", "");
    fail("batch", err.message);
  }
}

// Follow the batch until it ends (jobs.js reconnects its events stream, and reads the job meanwhile).
export async function follow(id, { resumed = false } = {}) {
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
  await watchJob(id, run.signal, {
    job: (job) => showJob(job, resumed),
    item: (item) => showItem(item, true),
    end: ended,
    ...commonHandlers("batch", JOB_STORE, "batch-job", resumed, "this batch"),
  });
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
    const url = objectUrl(`batch:${item.index}`, blob);
    const img = document.createElement("img");
    img.alt = `Cartoon of ${item.filename}`;
    img.src = url;
    // Each result downloadable on its own, named as in the ZIP.
    const link = document.createElement("a");
    link.href = url;
    link.download = `${stemOf(item.filename)}.${suffixOf(blob.type)}`;
    link.className = "save";
    link.textContent = "Download";
    link.setAttribute("aria-label", `Download the cartoon of ${item.filename}`);
    row.querySelector(".thumb").replaceChildren(img);
    row.querySelector(".note").after(link);
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

export function cancelBatch() {
  if (batch) return cancelJob(batch.id, "batch");
}
