// A batch: a job of several photos, followed through its events stream (resumed after a reload),
// each result shown as it ends (and downloadable alone), cancelled, downloaded whole.

import { api, apiKey, sleep } from "./api.js";
import { batchLimits, settingsForm } from "./settings.js";
import { $, byteSize, dropObjectUrls, fail, objectUrl, plural, say, stemOf, suffixOf, waiting } from "./util.js";

export const JOB_STORE = "toonserve.job"; // localStorage: the last batch, found again after a reload
const STREAM_RETRY_MS = 2000; // pause before reconnecting an events stream that broke off

let follower = null; // AbortController of the events stream followed now
let batch = null; // { id, total, done, failed }

function randomKey() {
  // crypto.randomUUID needs a secure context; plain http on a LAN address is not one.
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

// Why the chosen photos cannot go as one batch (over the service's limits), or "" when they can.
function overLimits(files, bytes) {
  if (files.length > batchLimits.files)
    return `${plural(files.length, "photo")} chosen; this service takes at most ${batchLimits.files} in one batch. Choose fewer, or send them as several batches.`;
  if (bytes > batchLimits.bytes)
    return `The chosen photos come to ${byteSize(bytes)}; this service takes at most ${byteSize(batchLimits.bytes)} in one batch. Choose fewer, or send them as several batches.`;
  const large = files.find((f) => f.size > batchLimits.photoBytes);
  if (large)
    return `${large.name} is ${byteSize(large.size)}; this service takes photos of at most ${byteSize(batchLimits.photoBytes)}. Leave it out, or make it smaller.`;
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

export async function cancelBatch() {
  if (!batch) return;
  say("batch", "Cancelling…"); // the events stream then reports the end
  try {
    await api(`/jobs/${batch.id}`, { method: "DELETE" });
  } catch (err) {
    fail("batch", err.message);
  }
}
