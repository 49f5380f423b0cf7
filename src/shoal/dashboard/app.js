// The dashboard shell: polls this node's /state every second and hands it to the views.
// Each view builds its controls once (mount) and refreshes its live parts on every poll
// (update), so a form being filled in is never redrawn under the operator's cursor.

import { api, ago } from "./util.js";
import * as topology from "./views/topology.js";
import * as instances from "./views/instances.js";
import * as chat from "./views/chat.js";
import * as alerts from "./views/alerts.js";
import * as models from "./views/models.js";

const POLL_MS = 1000;
const VIEWS = { topology, instances, chat, alerts, models };
const ctx = { state: null, refresh: poll };
let lastOk = 0;

function show(name) {
  if (!VIEWS[name]) name = "topology";
  for (const [key, view] of Object.entries(VIEWS)) {
    document.getElementById(`view-${key}`).classList.toggle("active", key === name);
    view.visible?.(key === name);
  }
  for (const a of document.querySelectorAll("nav a")) {
    a.classList.toggle("active", a.dataset.view === name);
  }
}

async function poll() {
  const status = document.getElementById("status");
  try {
    ctx.state = await api("/state", { signal: AbortSignal.timeout(3000) });
    lastOk = Date.now() / 1000;
    status.className = "live ok";
    status.textContent = `live · ${ctx.state.nodes.filter((n) => n.status !== "gone").length} node(s)`;
    document.getElementById("banner").hidden = true;
  } catch (error) {
    status.className = "live bad";
    status.textContent = lastOk ? `no answer since ${ago(lastOk)}` : "no answer";
    const banner = document.getElementById("banner");
    banner.hidden = false;
    banner.textContent = error.status === 401
      ? "This node's API needs its key: enter it above."
      : `This node's API is not answering (${error.message}); showing the last state it sent.`;
    return;
  }
  for (const [name, view] of Object.entries(VIEWS)) {
    try {
      view.update(ctx.state, ctx);
    } catch (error) {
      console.error(`view ${name}:`, error);
    }
  }
}

function start() {
  for (const [name, view] of Object.entries(VIEWS)) {
    view.mount(document.getElementById(`view-${name}`), ctx);
  }
  window.addEventListener("hashchange", () => show(location.hash.slice(1)));
  show(location.hash.slice(1));
  // setTimeout after each poll, not setInterval: a slow node never gets requests piled up
  const loop = async () => { await poll(); setTimeout(loop, POLL_MS); };
  loop();
}

start();
