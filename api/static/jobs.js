// What the batch and the video sides share about jobs: handing one in, following it (its events
// stream, reconnected when it breaks off, the job read now and then meanwhile), cancelling it.

import { api, sleep } from "./api.js";
import { $, fail, say, waiting } from "./util.js";

const STREAM_RETRY_MS = 2000; // pause before reconnecting an events stream that broke off
const STREAM_REFUSED_MS = 5000; // … or one the service refused (too many streams open): its Retry-After
const POLL_MS = 1000; // how often the job is read while there is no stream
// A refused events stream: 429 too_many_requests (this client's streams), 503 event_streams_full.
const REFUSED = new Set([429, 503]);
export const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
// localStorage: the side ("batch", "video") whose job was handed in last, shown first after a reload.
export const LAST_SIDE_STORE = "toonserve.lastSide";
const ITEM_ENDED = new Set(["ok", "error", "cancelled"]);

// Ended, and every item with it: a cancelled job's running item still reports how it stopped.
const settled = (job) => TERMINAL.has(job.status) && job.items.every((i) => ITEM_ENDED.has(i.status));

function randomKey() {
  // crypto.randomUUID needs a secure context; plain http on a LAN address is not one.
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

// POST /jobs: resolves to the job object the service stored.
export async function submitJob(form, side) {
  // One idempotency key per press: a retry (after a 401 or a 503) never makes a second job.
  const response = await api("/jobs", {
    method: "POST",
    body: form,
    headers: { "Idempotency-Key": randomKey() },
    onWait: waiting(side),
  });
  localStorage.setItem(LAST_SIDE_STORE, side);
  return response.json();
}

export async function cancelJob(id, side) {
  say(side, "Cancelling…"); // the events stream then reports the end
  try {
    await api(`/jobs/${id}`, { method: "DELETE" });
  } catch (err) {
    fail(side, err.message);
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

// Follow job `id` until it ends, calling `on.<event>(data)` for its events (`job`, `item`,
// `progress`) and resolving to what `on.end(job)` does; `on.gone(error)` when there is no such job
// (expired, deleted), `on.error(error)` when the service refuses for good. The first event of every
// connection is the whole job, so a reconnection misses nothing. While there is no stream (it broke
// off: `on.lost(false)`; the service holds no more: `on.lost(true)`), the job is read every second,
// and `on.job` or `on.end` told, before the stream is asked for again.
export async function watchJob(id, signal, on) {
  for (;;) {
    let refused = false;
    try {
      const response = await api(`/jobs/${id}/events`, { signal });
      for await (const { name, data } of serverEvents(response.body)) {
        if (name === "end") return await on.end(data);
        on[name]?.(data);
      }
    } catch (err) {
      if (signal.aborted) return;
      if (err.status === 404) return on.gone(err);
      refused = REFUSED.has(err.status);
      if (err.status && !refused) return on.error(err);
    }
    if (signal.aborted) return;
    on.lost(refused);
    const until = Date.now() + (refused ? STREAM_REFUSED_MS : STREAM_RETRY_MS);
    do {
      try {
        const job = await (await api(`/jobs/${id}`, { signal })).json();
        if (settled(job)) return await on.end(job);
        on.job(job);
      } catch (err) {
        if (signal.aborted) return;
        if (err.status === 404) return on.gone(err);
        // Unreachable, or busy: asked again in a moment.
      }
      try {
        await sleep(POLL_MS, signal);
      } catch (_) {
        return;
      }
    } while (Date.now() < until);
  }
}

// The handlers of watchJob (above) that both sides share: the job gone (forgotten, its panel hidden, said
// unless it was only found again after a reload), an error, and a lost stream (said while the page
// polls). `what` names the job in the messages ("this batch", "this one").
export function commonHandlers(side, store, panel, resumed, what) {
  return {
    gone: (err) => {
      localStorage.removeItem(store);
      $(panel).hidden = true;
      if (!resumed) fail(side, err.message);
    },
    error: (err) => fail(side, err.message),
    lost: (refused) =>
      say(
        side,
        refused
          ? `The service follows too many jobs at once right now; checking ${what} every second meanwhile…`
          : "The connection was lost; reconnecting…",
      ),
  };
}
