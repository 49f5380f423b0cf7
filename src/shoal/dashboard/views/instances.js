// Instances: what runs where (ranks, layers, interface and address, runner status, tok/s),
// and the create flow: pick a model, see every layout placement would choose or why it can't,
// launch one. Delete from the list.

import { api, badge, fill, h, nameOf, said } from "../util.js";

let list, picker, previewsEl, messageEl, ctx;
let heldModels = "";

export function mount(el, context) {
  ctx = context;
  picker = h("select", { id: "model-picker", onchange: () => preview() });
  previewsEl = h("div", { class: "previews", id: "previews" });
  messageEl = h("div", { class: "message", id: "instance-message" });
  list = h("div", { id: "instance-list" });
  fill(el,
    h("h2", {}, "Running instances"), list,
    h("h2", {}, "Create an instance"),
    h("div", { class: "toolbar" }, h("label", { for: "model-picker" }, "Model"), picker,
      h("button", { id: "preview-button", onclick: () => preview() }, "Preview placements")),
    messageEl, previewsEl);
}

export function update(state) {
  // the picker lists every model some alive node holds; rebuilt only when that set changes
  const held = [...new Set(state.nodes.filter((n) => n.status !== "gone")
    .flatMap((n) => (n.models || []).map((m) => m.model_id)))].sort();
  if (held.join("\n") !== heldModels) {
    const chosen = picker.value;
    heldModels = held.join("\n");
    fill(picker, h("option", { value: "" }, held.length ? "choose a model…" : "no model held"),
      held.map((m) => h("option", { value: m, selected: m === chosen }, m)));
  }
  const instances = Object.entries(state.instances || {});
  if (!instances.length) {
    fill(list, h("div", { class: "empty" }, "No instance is placed."));
    return;
  }
  fill(list, instances.map(([iid, doc]) => instanceCard(state, iid, doc)));
}

function instanceCard(state, iid, doc) {
  const [meta, body] = Object.entries(doc)[0];
  const ranks = Object.entries(body.nodeToRunner).map(([node, rid]) => {
    const shard = Object.values(body.runnerToShard[rid])[0];
    return { node, rid, shard, status: body.runnerStatus[rid] || {} };
  }).sort((a, b) => a.shard.deviceRank - b.shard.deviceRank);
  const rank0 = state.runners?.[ranks[0]?.rid];
  const statuses = ranks.map((r) => r.status.status);
  const overall = statuses.includes("failed") ? "failed"
    : statuses.every((s) => s === "ready" || s === "running") ? "ready" : "loading";
  const rate = rank0?.tok_s;
  return h("div", { class: "card instance", dataset: { instanceId: iid, status: overall }, style: "margin-bottom:10px" },
    h("div", { class: "title" }, body.modelId, badge(overall),
      h("span", { class: "dim mono" }, iid.slice(0, 8)),
      h("span", { style: "margin-left:auto" },
        h("button", { class: "danger delete", onclick: () => remove(iid) }, "Delete"))),
    h("div", { class: "row" },
      `${body.sharding} parallel · ${body.backend} (${meta}) · generation ${body.generation}`
      + ` · store ${body.storeAddress}`),
    h("div", { class: "row" }, "Live: ", h("span", { class: "tok-s" },
      rate ? `${rate.toFixed(1)} tok/s` : "idle"),
      rank0?.tokens ? ` · ${rank0.tokens} tokens generated` : ""),
    body.placedBecause ? h("div", { class: "row" }, `Placed because: ${said(state, body.placedBecauseParts, body.placedBecause)}`) : null,
    h("table", {},
      h("thead", {}, h("tr", {}, ["Rank", "Node", "Layers", "Interface", "Address", "Runner"].map((t) => h("th", {}, t)))),
      h("tbody", {}, ranks.map((r) => h("tr", { class: "rank" },
        h("td", {}, r.shard.deviceRank),
        h("td", {}, nameOf(state, r.node)),
        h("td", {}, layers(r.shard)),
        h("td", { class: "mono" }, body.rankInterfaces?.[r.node] || "–"),
        h("td", { class: "mono" }, (body.hostsByNode[r.node] || []).map((x) => x.ip).join(", ")),
        h("td", { title: r.status.reason || "" }, badge(r.status.status || "pending"),
          r.status.reason ? h("span", { class: "dim" }, ` ${r.status.reason}`) : null))))));
}

/** "0–14 (15 of 30)": the shard's end layer is exclusive, the text is not. */
function layers(shard) {
  return `${shard.startLayer}–${shard.endLayer - 1} (${shard.endLayer - shard.startLayer} of ${shard.nLayers})`;
}

async function preview() {
  const model = picker.value;
  fill(messageEl);
  if (!model) { fill(previewsEl); return; }
  fill(previewsEl, h("div", { class: "empty" }, "Asking placement…"));
  try {
    const doc = await api(`/instance/previews?model_id=${encodeURIComponent(model)}`);
    fill(previewsEl, doc.previews.map(previewCard));
  } catch (error) {
    fill(previewsEl, h("div", { class: "message error" }, error.message));
  }
}

function previewCard(p) {
  const state = ctx.state;
  const title = `${p.sharding} · ${p.instance_meta.replace("Instance", "")} · ${p.min_nodes} node(s)`;
  if (!p.instance) {
    return h("div", { class: "card preview refused" }, h("div", { class: "title" }, title, badge("refused", "impossible")),
      h("div", { class: "reason" }, said(state, p.error_parts, p.error)));
  }
  const body = Object.values(p.instance)[0];
  const layout = Object.entries(body.nodeToRunner).map(([node, rid]) => {
    const shard = Object.values(body.runnerToShard[rid])[0];
    return { node, shard };
  }).sort((a, b) => a.shard.deviceRank - b.shard.deviceRank);
  return h("div", { class: "card preview", dataset: { sharding: p.sharding, meta: p.instance_meta, nodes: p.min_nodes } },
    h("div", { class: "title" }, title, badge("ok", "possible")),
    layout.map(({ node, shard }) => h("div", { class: "row" },
      `rank ${shard.deviceRank}: ${nameOf(state, node)} layers ${layers(shard)}`
      + ` via ${body.rankInterfaces?.[node] || "?"} ${(body.hostsByNode[node] || [])[0]?.ip || ""}`)),
    h("div", { style: "margin-top:8px" }, h("button", { class: "primary launch", onclick: (e) => launch(p, e.target) }, "Launch")));
}

async function launch(p, button) {
  button.disabled = true;
  try {
    const answer = await api("/instance", { method: "POST", body: { instance: p.instance } });
    fill(messageEl, `Launched ${answer.instance_id.slice(0, 8)}: its runners start on every node it names.`);
    messageEl.className = "message";
    ctx.refresh();
  } catch (error) {
    fill(messageEl, `Not launched: ${error.message}`);
    messageEl.className = "message error";
  } finally {
    button.disabled = false;
  }
}

async function remove(iid) {
  try {
    await api(`/instance/${encodeURIComponent(iid)}`, { method: "DELETE" });
    fill(messageEl, `Deleted ${iid.slice(0, 8)}: its runners are stopping.`);
    messageEl.className = "message";
    ctx.refresh();
  } catch (error) {
    fill(messageEl, `Not deleted: ${error.message}`);
    messageEl.className = "message error";
  }
}
