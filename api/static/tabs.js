// The sides' tabs (keyboard too) and the drop zones of their file inputs.

import { $ } from "./util.js";


export const tabs = () => [$("tab-single"), $("tab-batch"), $("tab-video")];

export function selectTab(tab, focus = false) {
  for (const t of tabs()) {
    const on = t === tab;
    t.setAttribute("aria-selected", String(on));
    t.tabIndex = on ? 0 : -1;
    $(t.getAttribute("aria-controls")).hidden = !on;
  }
  if (focus) tab.focus();
}

export function onTabKey(event) {
  const list = tabs();
  const at = list.indexOf(event.target);
  const to = { ArrowRight: at + 1, ArrowLeft: at - 1, Home: 0, End: list.length - 1 }[event.key];
  if (to === undefined) return;
  event.preventDefault();
  selectTab(list[(to + list.length) % list.length], true);
}

export function dropZone(zone, input) {
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
