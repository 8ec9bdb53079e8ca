// Small helpers shared by the page's modules: elements by id, object URLs, names and sizes, the
// status line of each side.

export const $ = (id) => document.getElementById(id);

export const objectUrls = new Map(); // slot → object URL, revoked when the slot is reused

export function objectUrl(slot, blob) {
  const old = objectUrls.get(slot);
  if (old) URL.revokeObjectURL(old);
  const url = URL.createObjectURL(blob);
  objectUrls.set(slot, url);
  return url;
}

export function dropObjectUrls(prefix) {
  for (const [slot, url] of objectUrls) {
    if (slot.startsWith(prefix)) {
      URL.revokeObjectURL(url);
      objectUrls.delete(slot);
    }
  }
}

export function base64Blob(data, type) {
  const text = atob(data);
  const bytes = new Uint8Array(text.length);
  for (let i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
  return new Blob([bytes], { type });
}

// The same suffixes as the service's own file names (ZIP entries).
const SUFFIXES = { "image/png": "png", "image/jpeg": "jpg", "image/webp": "webp" };
export const suffixOf = (type) => SUFFIXES[type] ?? type.split("/").pop();
export const stemOf = (name, fallback = "photo") => name.replace(/\.[^.]*$/, "") || fallback;
export const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;

// A byte count as people read it: "0.4 MB", "35 MB", "1.1 GB".
export const byteSize = (bytes) =>
  bytes >= 1e9 ? `${(bytes / 1e9).toFixed(1)} GB` : `${(bytes / 1e6).toFixed(bytes < 1e7 ? 1 : 0)} MB`;

// A time to wait as people say it: "8 s", "2 min", "1 h 5 min".
export function lasting(seconds) {
  const s = Math.max(1, Math.round(seconds));
  if (s < 90) return `${s} s`;
  const min = Math.round(s / 60);
  return min < 90 ? `${min} min` : `${Math.floor(min / 60)} h ${min % 60} min`;
}

export function say(side, text) {
  $(`${side}-status`).textContent = text;
}

export function fail(side, message) {
  $(`${side}-error`).textContent = message;
}

export const waiting = (side) => (seconds, message) =>
  say(side, `The service is busy; trying again in ${seconds} s. (${message})`);
