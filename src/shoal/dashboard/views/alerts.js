// Alerts and history: what is wrong now (paths degraded or down, instances that cannot serve
// as placed, failed runners, refused nodes, drift), hints worth acting on, and what happened
// across the cluster (degradations, failovers, crashes, refusals, nodes joining and leaving).

import { api, badge, clock, fill, h, nameOf, said } from "../util.js";

const HISTORY_EVERY_MS = 2000; // every node is asked: a little slower than the state poll
let root, now, hints, history, fetchedAt = 0, events = [], historyError = "";

export function mount(el) {
  root = el;
  now = h("div", { id: "alerts-now" });
  hints = h("div", { id: "hints" });
  history = h("div", { id: "history" });
  fill(root, h("h2", {}, "Now"), now, hints, h("h2", {}, "History, newest first"), history);
}

export function update(state) {
  const current = [
    ...(state.alerts || []).map((a) => ({ status: a.status, text: said(state, a.parts, a.message) })),
    ...(state.drift || []).map((d) => ({ status: "degraded", text: `drift: ${d}` })),
    ...(state.refused || []).map((r) => ({
      status: "down", text: `refused node ${r.name || r.node_id}: ${r.reason} (${r.count}×)` })),
  ];
  const count = document.getElementById("alert-count");
  count.hidden = !current.length;
  count.textContent = current.length;
  fill(now, current.length
    ? current.map((a) => h("div", { class: `alert ${a.status}` }, badge(a.status), " ", a.text))
    : h("div", { class: "empty" }, "Nothing is wrong."));
  fill(hints, (state.hints || []).map((x) => h("div", { class: "hint" },
    h("strong", {}, `${nameOf(state, x.node)} ${x.interface}: `), x.message)));
  if (Date.now() - fetchedAt >= HISTORY_EVERY_MS) {
    fetchedAt = Date.now();
    api("/cluster/history", { signal: AbortSignal.timeout(5000) })
      .then((doc) => { events = doc.events; historyError = doc.unreachable?.length
        ? `no history from ${doc.unreachable.join(", ")}` : ""; })
      .catch((error) => { events = state.events || []; historyError = error.message; });
  }
  renderHistory(state);
}

function renderHistory(state) {
  if (!events.length) {
    fill(history, h("div", { class: "empty" }, "No events yet."));
    return;
  }
  fill(history,
    historyError ? h("div", { class: "dim" }, historyError) : null,
    h("table", { class: "events" }, h("tbody", {}, [...events].reverse().map((e) => h("tr", {
      dataset: { kind: e.kind } },
      h("td", { class: "when" }, clock(e.at)),
      h("td", { class: "when", title: "the node that recorded it" },
        e.recorded_by ? `seen by ${nameOf(state, e.recorded_by)}` : ""),
      h("td", {}, badge(statusOf(e.kind), e.kind)),
      h("td", {}, said(state, e.parts, e.message)))))));
}

function statusOf(kind) {
  return { recovered: "ok", node_joined: "ok", degraded: "degraded", moved: "degraded",
    instance: "degraded", refused: "degraded", down: "down", runner_failed: "failed",
    node_gone: "gone" }[kind] || "idle";
}
