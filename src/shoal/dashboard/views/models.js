// Models: which node holds which model (and whether their files agree), each model's card
// status, downloads in flight, a full audit on demand (`shoal audit` through the API), and a
// download into this node's store (`shoal models pull --api`: each node pulls for itself).

import { api, badge, bytes, fill, h } from "../util.js";

let table, stores, pullInput, pullMessage, audits = {};
let rendered = "";

export function mount(el) {
  table = h("div", { id: "models-table" });
  stores = h("div", { id: "stores" });
  pullInput = h("input", { id: "pull-model", placeholder: "org/name on Hugging Face", size: 40,
    onkeydown: (e) => { if (e.key === "Enter") pull(); } });
  pullMessage = h("span", { id: "pull-message", class: "message" });
  fill(el, h("h2", {}, "Models in the cluster"), table, h("h2", {}, "Stores"), stores,
    h("h2", {}, "Download to this node"),
    h("div", { class: "toolbar" }, pullInput,
      h("button", { id: "pull-button", onclick: () => pull() }, "Download"), pullMessage));
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
      const dl = (m.downloads || []).find((d) => d.node === n.node_id && d.status !== "done");
      const held = n.node_id in (m.holders || {});
      if (dl?.status === "downloading") return h("td", {}, download(dl));
      if (dl && !held) return h("td", { title: dl.error || "" }, badge("failed", "download failed"));
      if (!held) return h("td", { class: "dim" }, "–");
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

async function pull() {
  const model = pullInput.value.trim();
  if (!model) return;
  try {
    await api("/models/pull", { method: "POST", body: { model } });
    pullMessage.className = "message";
    fill(pullMessage, `Downloading ${model}: progress shows under Stores.`);
    pullInput.value = "";
  } catch (error) {
    pullMessage.className = "message error";
    fill(pullMessage, error.message);
  }
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
