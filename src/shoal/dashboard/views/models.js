// Models: which node holds which model (and whether their files agree), each model's card
// status, downloads in flight, and a full audit on demand (`shoal audit` through the API).

import { api, badge, bytes, fill, h } from "../util.js";

let table, stores, audits = {};
let rendered = "";

export function mount(el) {
  table = h("div", { id: "models-table" });
  stores = h("div", { id: "stores" });
  fill(el, h("h2", {}, "Models in the cluster"), table, h("h2", {}, "Stores"), stores);
}

export function update(state) {
  const nodes = state.nodes.filter((n) => n.status !== "gone");
  const models = state.models || [];
  const key = JSON.stringify([models, nodes.map((n) => [n.node_id, n.name, n.store]), audits]);
  if (key === rendered) return; // keeps an open audit's text selectable between polls
  rendered = key;
  fill(table, models.length ? h("table", {},
    h("thead", {}, h("tr", {}, h("th", {}, "Model"), h("th", {}, "Card"),
      nodes.map((n) => h("th", {}, n.name || n.node_id.slice(0, 8))), h("th", {}, "Audit"))),
    h("tbody", {}, models.map((m) => modelRow(nodes, m))))
    : h("div", { class: "empty" }, "No node holds a model."));
  fill(stores, h("table", {},
    h("thead", {}, h("tr", {}, ["Node", "Store", "Free disk", "Downloads"].map((t) => h("th", {}, t)))),
    h("tbody", {}, nodes.map((n) => h("tr", {},
      h("td", {}, n.name || n.node_id.slice(0, 8)),
      h("td", { class: "mono" }, n.store?.root || "–"),
      h("td", {}, n.store ? `${bytes(n.store.disk_free)} of ${bytes(n.store.disk_total)}` : "–"),
      h("td", {}, (n.store?.downloads || []).length
        ? n.store.downloads.map(download) : h("span", { class: "dim" }, "none")))))));
}

function modelRow(nodes, m) {
  const audit = audits[m.model_id];
  return h("tr", { dataset: { model: m.model_id } },
    h("td", {}, m.model_id),
    h("td", { title: m.card?.status_note || "" }, m.card ? badge(m.card.status) : h("span", { class: "dim" }, "no card")),
    nodes.map((n) => {
      const digest = m.holders?.[n.node_id];
      const dl = (m.downloads || []).find((d) => d.node === n.node_id && d.status === "downloading");
      if (dl) return h("td", {}, download(dl));
      if (!(n.node_id in (m.holders || {}))) return h("td", { class: "dim" }, "–");
      const differs = (m.differ || []).includes(n.node_id);
      return h("td", { title: digest ? `files digest ${digest}` : "" },
        differs ? badge("differs", "files differ") : badge("ok", "✓ held"));
    }),
    h("td", {},
      h("button", { class: "audit", onclick: () => runAudit(m.model_id) }, "Audit"),
      audit ? auditResult(audit) : null));
}

function download(d) {
  const pct = d.bytes_total ? Math.floor((100 * d.bytes_done) / d.bytes_total) : 0;
  return h("div", { class: "download", dataset: { model: d.model_id, status: d.status } },
    `${d.model_id} `, badge(d.status),
    ` ${bytes(d.bytes_done)} / ${bytes(d.bytes_total)} (${pct}%), file ${d.files_done}/${d.files_total}`,
    d.error ? h("div", { class: "message error" }, d.error) : null,
    h("div", { class: "bar" }, h("div", { style: `width:${pct}%` })));
}

function auditResult(audit) {
  if (audit.pending) return h("span", { class: "dim" }, " auditing…");
  if (audit.error) return h("div", { class: "message error" }, audit.error);
  return h("div", {}, badge(audit.ready ? "pass" : "fail", audit.ready ? "RING_INPUT_READY" : "not ready"),
    h("ul", { class: "checks" }, audit.checks.map((c) => h("li", {},
      badge(c.ok ? "pass" : "fail", c.ok ? "PASS" : "FAIL"), ` ${c.name}: ${c.detail}`))));
}

async function runAudit(modelId) {
  audits[modelId] = { pending: true };
  rendered = "";
  try {
    audits[modelId] = await api(`/cluster/audit/${modelId}`);
  } catch (error) {
    audits[modelId] = { error: error.message };
  }
  rendered = "";
}
