// Talking to the API: fetch() on this origin with the API key (asked for once, kept for the tab), a
// 503 that says when to come back waited out, every other error the API's own message.

import { $ } from "./util.js";

const KEY_STORE = "toonserve.apiKey"; // sessionStorage: the key never outlives the tab

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

export function sleep(ms, signal) {
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

export const apiKey = () => sessionStorage.getItem(KEY_STORE);
let keyPrompt = null; // the open prompt, shared by every request that met a 401 meanwhile

// Ask for the API key once (a modal dialog); resolves when one is given, rejects if dismissed. It
// speaks to a person: a first visit, or a key that was not accepted.
function askForKey(message) {
  if (keyPrompt) return keyPrompt;
  const dialog = $("key-dialog");
  $("key-message").textContent = apiKey()
    ? "That key was not accepted. Check it with whoever runs this service, then try again."
    : "This service asks for a key before it makes cartoons. Ask whoever runs it for one and paste it here.";
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
          reject(new ApiError(401, "unauthorized", `No API key was given, so nothing was sent (${message}).`));
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
export async function api(path, { method = "GET", body, headers = {}, signal, onWait } = {}) {
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
