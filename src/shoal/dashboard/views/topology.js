// Topology: every node with its machine and memory, and every path between two nodes, per
// direction, coloured by health. The paths a placed instance uses are drawn thick.

import { badge, bytes, fill, h, hostOf, ms, nameOf, percent } from "../util.js";

const COLOURS = { ok: "var(--ok)", degraded: "var(--warn)", "one-way": "var(--warn)",
  down: "var(--bad)", measuring: "var(--gone)" };
const WORST_FIRST = ["down", "one-way", "degraded", "measuring", "ok"];
let root;

export function mount(el) {
  root = el;
}

export function update(state) {
  const paths = pathsOf(state);
  fill(root,
    driftBanner(state),
    h("h2", {}, "Nodes"),
    h("div", { class: "nodes" }, state.nodes.map((n) => nodeCard(state, n))),
    h("h2", {}, "Paths"),
    graph(state, paths),
    h("div", { class: "legend" },
      Object.entries({ ok: "ok", degraded: "degraded", "one-way": "one-way", down: "down" }).map(
        ([status, text]) => h("span", { style: `color:${COLOURS[status]}` }, text)),
      h("span", { class: "l-used" }, "used by an instance")),
    pathTable(state, paths));
}

function driftBanner(state) {
  if (!state.drift?.length) return null;
  return h("div", { class: "banner warn", id: "drift" },
    state.drift.map((line) => h("div", {}, `⚠ ${line}`)));
}

function nodeCard(state, node) {
  const res = node.resources || {};
  const used = (res.ram_total || 0) - (res.ram_available || 0);
  const selfVersion = state.nodes.find((n) => n.is_self)?.version;
  const drifted = node.version && selfVersion && node.version !== selfVersion;
  const gpus = res.gpus || [];
  return h("div", {
    class: `card node ${node.status === "gone" ? "gone" : ""} ${node.is_leader ? "leader" : ""}`,
    dataset: { nodeId: node.node_id, status: node.status },
  },
    h("div", { class: "title" },
      h("span", { class: "node-name" }, node.name || node.node_id.slice(0, 8)),
      node.is_leader ? h("span", { class: "badge", title: "the leader decides placement" }, "★ leader") : null,
      node.is_self ? h("span", { class: "badge dim" }, "this node") : null,
      badge(node.status)),
    node.status === "gone" && node.gone_reason ? h("div", { class: "row s-gone" }, node.gone_reason) : null,
    h("div", { class: "row" }, res.device || "device unknown"),
    h("div", { class: "row" },
      `RAM ${bytes(used)} / ${bytes(res.ram_total)} · ${res.cpu_count || "?"} CPU at ${Math.round(res.cpu_percent || 0)}%`),
    h("div", { class: "bar" }, h("div", { style: `width:${res.ram_total ? (100 * used) / res.ram_total : 0}%` })),
    h("div", { class: "row" },
      gpus.length ? gpus.map((g) => `${g.name} (${g.backend}${g.memory_total ? `, ${bytes(g.memory_total)}` : ""})`).join(", ") : "no GPU"),
    h("div", { class: "row" }, `shoal ${node.version || "?"}`,
      drifted ? h("span", { class: "badge s-degraded", style: "margin-left:6px" }, "version drift") : null),
    h("div", { class: "row mono dim" }, node.node_id));
}

/** One entry per (from, to, address): the source's own record when it has one. */
function pathsOf(state) {
  const used = new Map();
  for (const [iid, list] of Object.entries(state.instance_paths || {})) {
    for (const p of list) used.set(`${p.src}>${p.dst}>${p.host}`, iid);
  }
  const byKey = new Map();
  for (const row of state.links || []) {
    const key = `${row.from_node}>${row.to_node}>${hostOf(row.to_addr)}`;
    const held = byKey.get(key);
    const own = row.recorded_by === row.from_node;
    if (!held || (own && held.recorded_by !== held.from_node)) {
      byKey.set(key, { ...row, key, seenBy: [...(held?.seenBy || []), row.direction] });
    } else {
      held.seenBy.push(row.direction);
    }
  }
  const nodes = Object.fromEntries((state.nodes || []).map((n) => [n.node_id, n]));
  return [...byKey.values()].map((row) => {
    const health = (nodes[row.from_node]?.health || []).find(
      (x) => x.peer_node_id === row.to_node && x.peer_addr === row.to_addr);
    let status = health?.status || (row.rtt_ms_ewma === null ? "measuring" : "ok");
    let reason = health?.reason || "";
    if (row.one_way && status !== "down") status = "one-way";
    if (!row.recent) status = "down";
    const gone = [row.from_node, row.to_node].find((n) => nodes[n]?.status === "gone");
    if (gone) [status, reason] = ["down", `${nameOf(state, gone)} is gone`];
    return { ...row, status, reason, usedBy: used.get(row.key) || null };
  });
}

/** The path drawn between two nodes in one direction: the used one, else the healthiest. */
function primary(paths, from, to) {
  const candidates = paths.filter((p) => p.from_node === from && p.to_node === to);
  candidates.sort((a, b) => (b.usedBy ? 1 : 0) - (a.usedBy ? 1 : 0)
    || WORST_FIRST.indexOf(b.status) - WORST_FIRST.indexOf(a.status)
    || (a.rtt_ms_p50 ?? a.rtt_ms_ewma ?? 1e9) - (b.rtt_ms_p50 ?? b.rtt_ms_ewma ?? 1e9));
  return { best: candidates[0], more: candidates.length - 1 };
}

function graph(state, paths) {
  const nodes = state.nodes || [];
  const width = 900, height = nodes.length > 2 ? 340 : 180, radius = 26;
  const cx = width / 2, cy = height / 2, ring = nodes.length > 2 ? 120 : 260;
  const at = {};
  nodes.forEach((n, i) => {
    const angle = Math.PI + (2 * Math.PI * i) / Math.max(1, nodes.length);
    at[n.node_id] = nodes.length === 1 ? [cx, cy]
      : [cx + ring * Math.cos(angle), cy + (nodes.length > 2 ? ring * Math.sin(angle) : 0)];
  });
  const svg = h("svg", { class: "graph", viewBox: `0 0 ${width} ${height}`, id: "topology-graph",
    style: `height:${height}px` });
  svg.append(h("defs", {}, ["ok", "degraded", "one-way", "down", "measuring"].map((s) =>
    h("marker", { id: `arrow-${s}`, viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 12,
      markerHeight: 12, markerUnits: "userSpaceOnUse", orient: "auto-start-reverse" },
    h("path", { d: "M 0 0 L 10 5 L 0 10 z", fill: COLOURS[s] })))));
  for (const a of nodes) {
    for (const b of nodes) {
      if (a.node_id === b.node_id || !at[a.node_id] || !at[b.node_id]) continue;
      const { best, more } = primary(paths, a.node_id, b.node_id);
      if (!best) continue;
      const [x1, y1] = at[a.node_id], [x2, y2] = at[b.node_id];
      const len = Math.hypot(x2 - x1, y2 - y1) || 1;
      const ux = (x2 - x1) / len, uy = (y2 - y1) / len;
      const nx = -uy * 8, ny = ux * 8; // each direction on its own side of the pair
      const sx = x1 + ux * (radius + 4) + nx, sy = y1 + uy * (radius + 4) + ny;
      const ex = x2 - ux * (radius + 6) + nx, ey = y2 - uy * (radius + 6) + ny;
      const rtt = best.rtt_ms_p50 ?? best.rtt_ms_ewma;
      const text = `${nameOf(state, a.node_id)}→${nameOf(state, b.node_id)} ${best.interface_kind} `
        + `${best.status === "ok" ? "" : `${best.status} `}`
        + `${ms(rtt)}${best.loss ? ` loss ${percent(best.loss)}` : ""}${more ? ` (+${more})` : ""}`;
      svg.append(h("line", {
        class: `path ${best.usedBy ? "used" : ""} ${best.status === "one-way" ? "one-way" : ""}`,
        x1: sx, y1: sy, x2: ex, y2: ey, stroke: COLOURS[best.status],
        "marker-end": `url(#arrow-${best.status})`, dataset: { from: a.node_id, to: b.node_id, status: best.status },
      }, h("title", {}, `${text}${best.reason ? `: ${best.reason}` : ""}`)));
      const lx = (sx + ex) / 2 + nx * 2.2, ly = (sy + ey) / 2 + ny * 2.2 + 4;
      svg.append(h("text", { class: "path-label", x: lx, y: ly, "text-anchor": "middle" }, text));
    }
  }
  for (const n of nodes) {
    const [x, y] = at[n.node_id];
    svg.append(h("g", { dataset: { nodeId: n.node_id } },
      h("circle", { class: `node-dot ${n.status === "gone" ? "gone" : ""}`, cx: x, cy: y, r: radius }),
      h("text", { class: "node-label", x, y: y + 5 }, (n.name || n.node_id).slice(0, 10)),
      h("text", { class: "path-label", x, y: y + radius + 16, "text-anchor": "middle" },
        `${n.is_leader ? "★ " : ""}${n.status}`)));
  }
  return svg;
}

function pathTable(state, paths) {
  if (!paths.length) return h("div", { class: "empty" }, "No paths measured yet.");
  const order = (p) => `${nameOf(state, p.from_node)} ${nameOf(state, p.to_node)} ${p.to_addr}`;
  paths.sort((a, b) => order(a).localeCompare(order(b)));
  return h("table", { id: "paths" },
    h("thead", {}, h("tr", {},
      ["From → to", "Address", "Kind", "Interface", "RTT p50", "RTT EWMA", "Loss", "Status", "Used by"].map(
        (t, i) => h("th", { class: i >= 4 && i <= 6 ? "num" : "" }, t)))),
    h("tbody", {}, paths.map((p) => h("tr", {
      class: p.usedBy ? "used" : "", dataset: { from: p.from_node, to: p.to_node, status: p.status },
    },
      h("td", {}, `${nameOf(state, p.from_node)} → ${nameOf(state, p.to_node)}`),
      h("td", { class: "mono" }, p.to_addr),
      h("td", {}, p.interface_kind),
      h("td", { class: "mono" }, p.local_interface || "–"),
      h("td", { class: "num rtt" }, ms(p.rtt_ms_p50)),
      h("td", { class: "num" }, ms(p.rtt_ms_ewma)),
      h("td", { class: "num" }, percent(p.loss)),
      h("td", { title: p.reason || "" }, badge(p.status),
        p.recorded_by !== p.from_node ? h("span", { class: "dim" }, " seen by receiver only") : null),
      h("td", { class: "mono" }, p.usedBy ? p.usedBy.slice(0, 8) : "")))));
}
