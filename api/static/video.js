// A video: one clip handed in as a video job, its frames followed as they are written (speed and time
// left), cancelled, and the cartoon clip played in the page and downloaded. Like a batch, it is found
// again after a reload.

import { api } from "./api.js";
import { cancelJob, commonHandlers, submitJob, TERMINAL, watchJob } from "./jobs.js";
import { jobLimits, settingsForm } from "./settings.js";
import { $, byteSize, dropObjectUrls, fail, lasting, objectUrl, plural, say, stemOf, waiting } from "./util.js";

export const VIDEO_STORE = "toonserve.video"; // localStorage: the last video job, found again after a reload
// Screen readers hear the progress this often, not at every frame (the bar moves twice a second).
const TELL_EVERY_MS = 5000;
// The speed is measured over the frames written in the last this long.
const SPEED_WINDOW_MS = 10000;

let follower = null; // AbortController of the events stream followed now
let clip = null; // { id, total, done, samples: [[ms, done]], toldAt, ended }

// Why the chosen clip cannot go (over the service's limit for a clip, or for a job's body), or "" when
// it can. Its duration, frames and frame size are checked by the service, from the file.
function overLimits(file) {
  return file.size > jobLimits.clipBytes
    ? `${file.name} is ${byteSize(file.size)}; this service takes clips of at most ${byteSize(jobLimits.clipBytes)}. ` +
        "Shorten the clip, or make it smaller."
    : "";
}

export function describeClip() {
  const file = $("clip").files[0];
  say("video", file ? `${file.name} chosen (${byteSize(file.size)}).` : "");
  const refusal = file ? overLimits(file) : "";
  fail("video", refusal);
  $("start-video").disabled = refusal !== "";
}

// A clip chosen: described, and shown once the browser has read it (clipShown); a file it cannot play
// (an AVI, most MKVs, not a video at all) is not shown (clipNotShown). An ended job's result goes.
export function chooseClip() {
  const file = $("clip").files[0];
  describeClip();
  $("clip-figure").hidden = true;
  if (!clip || clip.ended) {
    $("video-job").hidden = true;
    $("toon-figure").hidden = true;
  }
  if (!file) return;
  $("clip-preview").src = objectUrl("video:clip", file);
  $("clip-caption").textContent = file.name;
}

export function clipShown() {
  if ($("clip").files.length) $("clip-figure").hidden = false;
}

export function clipNotShown() {
  const file = $("clip").files[0];
  $("clip-figure").hidden = true;
  if (file && !$("video-error").textContent) {
    const chosen = `${file.name} chosen (${byteSize(file.size)}).`;
    say("video", `${chosen} This browser cannot preview it; the service may still read it.`);
  }
}

export async function startVideo(event) {
  event.preventDefault();
  const file = $("clip").files[0];
  if (!file) return;
  const refusal = overLimits(file);
  if (refusal) return fail("video", refusal);
  // Format is a photo's: a video comes back as MP4 whatever it says.
  const form = settingsForm(["format"]);
  form.append("video", file, file.name);
  fail("video", "");
  say("video", `Sending ${file.name} (${byteSize(file.size)})…`);
  // A large clip takes a while to send: one press, one job.
  $("start-video").disabled = true;
  $("panel-video").setAttribute("aria-busy", "true");
  try {
    const job = await submitJob(form, "video");
    localStorage.setItem(VIDEO_STORE, job.id);
    followVideo(job.id);
  } catch (err) {
    say("video", "");
    fail("video", err.message);
  } finally {
    $("start-video").disabled = false;
    $("panel-video").removeAttribute("aria-busy");
  }
}

// Follow the video job until it ends (jobs.js reconnects its events stream, and reads the job
// meanwhile).
export async function followVideo(id, { resumed = false } = {}) {
  follower?.abort();
  const run = new AbortController();
  follower = run;
  clip = { id, total: 0, done: 0, samples: [], toldAt: -Infinity, ended: false };
  $("toon").removeAttribute("src");
  $("toon").load(); // lets go of the last cartoon before its object URL is revoked
  dropObjectUrls("video:toon");
  $("toon-figure").hidden = true;
  $("video-speed").textContent = "";
  $("video-told").textContent = "";
  $("video-cancel").hidden = false;
  $("video-job").hidden = false;
  await watchJob(id, run.signal, {
    job: (job) => showJob(job, resumed),
    progress: showFrames,
    end: ended,
    ...commonHandlers("video", VIDEO_STORE, "video-job", resumed, "this one"),
  });
}

function showJob(job, resumed) {
  showFrames(job);
  if (TERMINAL.has(job.status)) return;
  const name = job.items[0].filename;
  if (resumed) say("video", `Found the video job that was running (${name}); following it again.`);
  else if (job.status === "queued") say("video", `${name} is waiting for its turn…`);
  else say("video", `Cartoonizing ${name}…`);
}

// Frames per second over the last SPEED_WINDOW_MS, once two counts a second apart are known.
function speed() {
  const { samples } = clip;
  if (samples.length < 2) return 0;
  const [t0, d0] = samples[0];
  const [t1, d1] = samples.at(-1);
  return t1 - t0 >= 1000 ? (1000 * (d1 - d0)) / (t1 - t0) : 0;
}

// The job's frame counts (a job object or a `progress` event: `{status, total, done}`).
function showFrames({ total, done, status }) {
  const now = performance.now();
  clip.total = total;
  clip.done = done;
  // Counts from the first frame written on: the wait before it is not the speed of the work.
  const { samples } = clip;
  if (done > 0 && done !== samples.at(-1)?.[1]) samples.push([now, done]);
  while (samples.length > 2 && now - samples[0][0] > SPEED_WINDOW_MS) samples.shift();
  $("video-progress").max = Math.max(1, total);
  $("video-progress").value = done;
  $("video-count").textContent = `${done} of ${plural(total, "frame")}`;
  const fps = speed();
  const running = status === "running" && done < total;
  const left = running && fps > 0 ? `, about ${lasting((total - done) / fps)} left` : "";
  $("video-speed").textContent = fps > 0 ? `${fps.toFixed(1)} frames/s${left}` : "";
  if (running && done > 0 && now - clip.toldAt >= TELL_EVERY_MS) {
    clip.toldAt = now;
    $("video-told").textContent = `Frame ${done} of ${total}${left}.`;
  }
}

async function ended(job) {
  const hadFocus = document.activeElement === $("video-cancel");
  clip.ended = true;
  $("video-cancel").hidden = true;
  $("video-told").textContent = "";
  if (job.status === "deleted") {
    localStorage.removeItem(VIDEO_STORE);
    say("video", "This video job was deleted on the service.");
    return;
  }
  showFrames(job);
  // The job's items are chunks of the clip: every one must be done for the clip to be.
  const failed = job.items.find((item) => item.status === "error");
  if (job.status === "failed" || failed) {
    say("video", "");
    fail("video", job.error ?? failed?.error?.message ?? `${job.items[0].filename} could not be cartoonized.`);
    return;
  }
  if (job.status === "cancelled" || job.items.some((item) => item.status !== "ok")) {
    say("video", `Cancelled after ${job.done} of ${plural(job.total, "frame")}.`);
    return;
  }
  say("video", "Fetching the cartoon clip…");
  let blob;
  try {
    // Fetched whole (with the API key, when there is one: a video element cannot send it), so that
    // the player and the download are the same bytes, named after the clip.
    blob = await (await api(`/jobs/${job.id}/result`, { onWait: waiting("video") })).blob();
  } catch (err) {
    say("video", "");
    fail("video", err.message);
    return;
  }
  if (clip?.id !== job.id) return; // another job replaced this one meanwhile
  const item = job.items[0]; // every chunk names the clip
  const url = objectUrl("video:toon", blob);
  $("toon").src = url;
  const link = $("video-download");
  link.href = url;
  link.download = `${stemOf(item.filename, "video")}-${job.options.style}.mp4`;
  $("toon-caption").textContent = `The cartoon of ${item.filename} (${byteSize(blob.size)})`;
  $("toon-figure").hidden = false;
  say("video", `Done: ${plural(job.total, "frame")} cartoonized. The cartoon clip plays below, ready to download.`);
  if (hadFocus) link.focus();
}

// The browser has the cartoon but cannot play it (a rare codec build): the download still works.
export function toonNotPlayable() {
  if ($("toon").getAttribute("src")) {
    say("video", "Done, but this browser cannot play the cartoon clip here: download it to watch it.");
  }
}

export function cancelVideo() {
  if (!clip) return;
  // Once: a second DELETE while a chunk is stopping would delete the (already cancelled) job.
  $("video-cancel").hidden = true;
  return cancelJob(clip.id, "video");
}
