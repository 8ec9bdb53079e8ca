// The toonserve web page: plain JavaScript (ES2020 modules), no framework, no build step. Every call
// goes to this page's own origin; every error shown is the API's own `error.message`. This module
// wires the page up; the others (api, util, settings, tabs, jobs, single, batch, video) hold its parts.

import { cancelBatch, describeChoice, follow, JOB_STORE, startBatch } from "./batch.js";
import { LAST_SIDE_STORE } from "./jobs.js";
import { loadBounds, loadStyles, restoreSettings, savedSettings, saveSettings, SETTINGS, showStrength, showStyleHint } from "./settings.js";
import { cartoonize, compare, photoNotShown, photoShown, previewPhoto, settingsChanged } from "./single.js";
import { dropZone, onTabKey, selectTab, tabs } from "./tabs.js";
import { $, fail, say } from "./util.js";
import { cancelVideo, chooseClip, clipNotShown, clipShown, followVideo, startVideo, toonNotPlayable, VIDEO_STORE } from "./video.js";


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
  dropZone($("video-drop"), $("clip"));
  $("photo").addEventListener("change", previewPhoto);
  $("photos").addEventListener("change", describeChoice);
  $("single-form").addEventListener("submit", cartoonize);
  $("batch-form").addEventListener("submit", startBatch);
  $("cancel").addEventListener("click", cancelBatch);
  $("clip").addEventListener("change", chooseClip);
  $("video-form").addEventListener("submit", startVideo);
  $("video-cancel").addEventListener("click", cancelVideo);
  $("clip-preview").addEventListener("loadedmetadata", clipShown);
  $("clip-preview").addEventListener("error", clipNotShown);
  $("toon").addEventListener("error", toonNotPlayable);
  $("compare-slider").addEventListener("input", compare);
  $("strength").addEventListener("input", showStrength);
  $("style").addEventListener("change", showStyleHint);
  for (const { id } of SETTINGS) {
    $(id).addEventListener("change", saveSettings);
    $(id).addEventListener("change", settingsChanged);
  }
  // The strength slider updates the cartoon while it moves (once it rests a moment).
  $("strength").addEventListener("input", settingsChanged);
  $("photo-preview").addEventListener("load", photoShown);
  $("photo-preview").addEventListener("error", photoNotShown);

  const saved = savedSettings();
  restoreSettings(saved);
  try {
    await Promise.all([loadBounds(), loadStyles()]);
  } catch (err) {
    say("settings", "");
    fail("single", err.message);
  }
  restoreSettings(saved);

  // Jobs handed in before are found again; the side of the last one is shown.
  const jobs = { batch: localStorage.getItem(JOB_STORE), video: localStorage.getItem(VIDEO_STORE) };
  const last = localStorage.getItem(LAST_SIDE_STORE);
  const side = jobs[last] ? last : jobs.batch ? "batch" : jobs.video ? "video" : null;
  if (side) selectTab($(`tab-${side}`));
  if (jobs.batch) follow(jobs.batch, { resumed: true });
  if (jobs.video) followVideo(jobs.video, { resumed: true });
  document.body.dataset.ready = "true";
}

start();
