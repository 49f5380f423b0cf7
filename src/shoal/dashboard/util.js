// Small helpers shared by the views: a DOM builder, formatters and the API calls.

/** h("div", {class: "x", onclick: f}, child, ...) -> an element; null/false children are skipped. */
export function h(tag, attrs = {}, ...children) {
  const svg = ["svg", "line", "path", "circle", "text", "g", "defs", "marker", "title"];
  const el = svg.includes(tag)
    ? document.createElementNS("http://www.w3.org/2000/svg", tag)
    : document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(el.dataset, value);
    else el.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function badge(status, text = status) {
  const cls = String(status || "").toLowerCase().replace(/[^a-z-]+/g, "-");
  return h("span", { class: `badge s-${cls}` }, text);
}

export function bytes(n) {
  if (n === null || n === undefined) return "?";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(n >= 10 || i === 0 ? 0 : 1)} ${units[i]}`;
}

export function ms(value) {
  if (value === null || value === undefined) return "–";
  return value < 10 ? `${value.toFixed(2)} ms` : `${value.toFixed(1)} ms`;
}

export function percent(fraction) {
  return `${Math.round((fraction || 0) * 100)}%`;
}

export function ago(unixSeconds) {
  if (!unixSeconds) return "";
  const s = Math.max(0, Date.now() / 1000 - unixSeconds);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  return `${(s / 3600).toFixed(1)} h ago`;
}

export function clock(unixSeconds) {
  return new Date(unixSeconds * 1000).toLocaleTimeString();
}

/** Friendly name of a node id, from the latest state. */
export function nameOf(state, nodeId) {
  const node = (state?.nodes || []).find((n) => n.node_id === nodeId);
  return node?.name || (nodeId || "?").slice(0, 8);
}

/** A server sentence with the nodes it names shown by name: rendered from its `parts` (text
 * runs and {node: id} marks, from the fields of its reason) where the document has them, else
 * its text as written. Never a rewrite of ids inside prose. */
export function said(state, parts, text) {
  if (!Array.isArray(parts)) return String(text ?? "");
  return parts.map((p) => (typeof p === "string" ? p : nameOf(state, p.node))).join("");
}

/** The host of "host:port" or "[v6]:port". */
export function hostOf(addr) {
  if (!addr) return "";
  if (addr.startsWith("[")) return addr.slice(1, addr.indexOf("]"));
  const i = addr.lastIndexOf(":");
  return i > 0 && addr.indexOf(":") === i ? addr.slice(0, i) : addr;
}

// The node's API key (`shoal run --api-key`), as the operator entered it: sessionStorage, so
// it lives as long as this tab and never lands on disk or in another site's reach.
const KEY_STORE = "shoal.apiKey";

/** The Authorization header of every call to the API; empty until a key is entered. */
export function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORE);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

/** After a 401: show the key form (one at a time); the next poll sends what was entered. */
export function askForKey() {
  const form = document.getElementById("key-form");
  if (!form || !form.hidden) return;
  const input = form.querySelector("input");
  document.getElementById("key-why").textContent = sessionStorage.getItem(KEY_STORE)
    ? "The node refused that API key; enter the right one."
    : "This node needs an API key (shoal run --api-key).";
  form.onsubmit = (event) => {
    event.preventDefault();
    if (!input.value.trim()) return;
    sessionStorage.setItem(KEY_STORE, input.value.trim());
    input.value = "";
    form.hidden = true;
  };
  form.hidden = false;
  input.focus();
}

/** fetch JSON; a non-2xx answer throws the OpenAI-style error message the API returns. */
export async function api(path, options = {}) {
  const response = await fetch(path, {
    cache: "no-store",
    ...options,
    headers: {
      ...authHeaders(),
      ...(options.body ? { "Content-Type": "application/json" } : {}),
      ...options.headers,
    },
    body: options.body ? JSON.stringify(options.body) : undefined,
  });
  if (response.status === 401) askForKey();
  const text = await response.text();
  let doc = null;
  try { doc = text ? JSON.parse(text) : null; } catch { /* not JSON: keep the text */ }
  if (!response.ok) {
    const message = doc?.error?.message || doc?.detail || text || response.statusText;
    const error = new Error(`${response.status}: ${message}`);
    error.status = response.status;
    throw error;
  }
  return doc;
}

/** Replace an element's children. */
export function fill(el, ...children) {
  el.replaceChildren(...children.flat(Infinity).filter((c) => c !== null && c !== false && c !== undefined));
}
