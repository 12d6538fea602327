// microfed dashboard: renders the snapshot the server pushes over server-sent events
// (/api/stream) whenever the coordinator store changes. Read-only; no framework, no build.
"use strict";

const $ = (sel) => document.querySelector(sel);
const esc = (s) => String(s == null ? "" : s).replace(/[&<>"']/g,
  (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
const pct = (x) => (x == null ? "–" : (100 * x).toFixed(1) + " %");
const time = (t) => (t == null ? "–" : new Date(t * 1000).toLocaleTimeString());
function ago(t, now) {
  if (t == null) return "never";
  const s = Math.max(0, Math.round(now - t));
  return s < 90 ? s + " s ago" : s < 5400 ? Math.round(s / 60) + " min ago" : Math.round(s / 3600) + " h ago";
}
const sum = (o) => Object.values(o || {}).reduce((a, b) => a + b, 0);

function card(k, v, cls) {
  return `<div class="card ${cls || ""}" data-card="${esc(k)}"><div class="v">${esc(v)}</div><div class="k">${esc(k)}</div></div>`;
}

function renderRun(s) {
  const r = s.run;
  if (!s.store_up) { $("#run").textContent = "waiting for the coordinator store…"; return; }
  const total = r.forever ? "∞" : r.rounds;
  $("#run").innerHTML = `mesh <b>${esc(r.mesh)}</b> · ${esc(r.rule)} f=${esc(r.f)} · ${esc(r.mode)} · ` +
    `round <b id="round">${esc(Math.min(r.round, r.rounds || r.round))}</b> of ${esc(total)}` + (r.done ? " · <b>done</b>" : "");
}

function renderCards(s) {
  const rounds = s.rounds, last = rounds[rounds.length - 1];
  const nodes = s.nodes, now = s.read_at;
  const alive = nodes.filter((n) => n.last_seen != null && now - n.last_seen < 300).length;
  const banned = nodes.filter((n) => n.banned).length;
  const rejected = sum(s.rejected.by_reason);
  const mism = s.security.filter((e) => e.kind === "crosscheck_mismatch").length;
  const dis = rounds.reduce((a, r) => a + r.digests.disagree, 0);
  const agree = rounds.reduce((a, r) => a + r.digests.agree, 0);
  let html = card("rounds closed", rounds.length ? last.round : 0) +
    card("accuracy", pct(last && last.accuracy)) +
    card("nodes heard in 5 min", alive + " / " + nodes.length) +
    card("banned", banned, banned ? "bad" : "ok") +
    card("frames rejected", rejected, rejected ? "bad" : "ok") +
    card("cross-check mismatches", mism, mism ? "bad" : "ok") +
    card("gossip digests agreeing", agree + " / " + (agree + dis), dis ? "bad" : "ok");
  if (s.privacy) html += card("privacy spent (ε at δ=" + s.privacy.delta + ")", s.privacy.epsilon.toFixed(2));
  $("#cards").innerHTML = html;
}

function axes(svg, ymax, label) {
  return `<line class="axis" x1="40" y1="10" x2="40" y2="180"/><line class="axis" x1="40" y1="180" x2="590" y2="180"/>` +
    `<text x="2" y="14">${esc(label(ymax))}</text><text x="2" y="182">${esc(label(0))}</text>`;
}

function renderCharts(s) {
  const rs = s.rounds;
  const n = Math.max(rs.length, 1), w = 550 / n;
  const x = (i) => 40 + w * (i + 0.5);
  let acc = axes(null, 1, (v) => v * 100 + " %");
  const pts = rs.map((r, i) => (r.accuracy == null ? null : `${x(i).toFixed(1)},${(180 - 170 * r.accuracy).toFixed(1)}`)).filter(Boolean);
  if (pts.length) acc += `<polyline class="acc" points="${pts.join(" ")}"/>`;
  if (rs.length) acc += `<text x="40" y="195">round ${rs[0].round}</text><text x="540" y="195">round ${rs[rs.length - 1].round}</text>`;
  $("#chart-accuracy").innerHTML = acc;
  const ymax = Math.max(1, ...rs.map((r) => r.n_accepted + sum(r.rejected)));
  let bars = axes(null, ymax, (v) => String(v));
  rs.forEach((r, i) => {
    const a = 170 * r.n_accepted / ymax, b = 170 * sum(r.rejected) / ymax, bw = Math.max(1, w * 0.7);
    bars += `<rect class="ok" x="${(x(i) - bw / 2).toFixed(1)}" y="${(180 - a).toFixed(1)}" width="${bw.toFixed(1)}" height="${a.toFixed(1)}"><title>round ${r.round}: ${r.n_accepted} accepted</title></rect>`;
    if (b > 0) bars += `<rect class="bad" x="${(x(i) - bw / 2).toFixed(1)}" y="${(180 - a - b).toFixed(1)}" width="${bw.toFixed(1)}" height="${b.toFixed(1)}"><title>round ${r.round}: ${sum(r.rejected)} rejected</title></rect>`;
  });
  $("#chart-updates").innerHTML = bars;
}

function renderNodes(s) {
  const now = s.read_at;
  $("#nodes tbody").innerHTML = s.nodes.map((n) => {
    const rep = n.reputation == null ? "–" : `<span class="rep"><i style="width:${(100 * n.reputation).toFixed(0)}%"></i></span>${n.reputation.toFixed(2)}`;
    const chips = n.verdicts.map((v) => `<span class="chip ${esc(v.verdict)}" title="round ${v.round}: ${esc(v.verdict)}, reputation ${v.rep.toFixed(2)}">${esc((v.verdict || "?")[0])}</span>`).join("");
    let st = n.banned ? `<b class="ban">banned</b> in round ${esc(n.ban ? n.ban.round : "?")}: ${esc(n.ban ? n.ban.reason : "")}` : "ok";
    if (n.last_status && !n.banned) st = esc(n.last_status.kind) + (n.last_status.label ? ": " + esc(n.last_status.label) : "");
    return `<tr data-node="${esc(n.node)}" class="${n.banned ? "banned" : ""}"><td>${esc(n.node)}` +
      (n.simulated_attacker ? `<span class="tag" title="run by the simulated adversary">attacker</span>` : "") +
      `</td><td>${esc(n.board || (n.simulated_attacker ? "adversary (host)" : "–"))}</td><td>${ago(n.last_seen, now)}</td><td>${rep}</td><td>${chips}</td>` +
      `<td>${n.accepted}</td><td>${n.rejected}</td><td class="status">${st}</td></tr>`;
  }).join("");
}

function renderRounds(s) {
  const rows = s.rounds.slice(-100).reverse();
  $("#rounds tbody").innerHTML = rows.map((r) => {
    const rej = Object.entries(r.rejected).map(([k, v]) => `${esc(k)} ×${v}`).join(", ") || "0";
    const dg = r.digests.agree + r.digests.disagree === 0 ? "–" :
      `${r.digests.agree} agree` + (r.digests.disagree ? `, <b class="bad">${r.digests.disagree} differ</b>` : "");
    return `<tr data-round="${r.round}"><td>${r.round}</td><td>${time(r.closed)}</td><td>${r.n_accepted}</td>` +
      `<td>${rej}</td><td>${pct(r.accuracy)}</td><td>${r.crosschecked ? "bit-identical" : "not checked"}</td>` +
      `<td>${dg}</td><td>${esc(r.close_reason)}</td></tr>`;
  }).join("");
}

function renderSecurity(s) {
  $("#security-events").innerHTML = s.security.map((e) =>
    `<li data-kind="${esc(e.kind)}"><span class="kind ${esc(e.kind)}">${esc(e.kind)}</span>${e.node ? esc(e.node) + " · " : ""}` +
    `round ${esc(e.round)} · ${time(e.at)}<br><code>${esc(e.detail)}</code></li>`).join("") || "<li>none</li>";
  $("#reject-reasons").innerHTML = Object.entries(s.rejected.by_reason).map(([k, v]) => `${esc(k)}: <b>${v}</b>`).join(" · ") || "none";
  $("#rejected-frames").innerHTML = s.rejected.recent.map((e) =>
    `<li data-reason="${esc(e.reason)}"><span class="kind">${esc(e.reason)}</span>${e.sender ? "claims " + esc(e.sender) + " · " : ""}` +
    `${e.size} B · ${time(e.at)}<br><code>${esc(e.message)}</code>` +
    (e.frame_sha256 ? `<br><code>sha256 ${esc(e.frame_sha256)}</code>` : "") + `</li>`).join("");
}

function render(s) {
  window.microfedSnapshot = s;
  renderRun(s); renderCards(s); renderCharts(s); renderNodes(s); renderRounds(s); renderSecurity(s);
  $("#store").textContent = s.store;
  $("#updated").textContent = time(s.read_at);
}

function connect() {
  const live = $("#live");
  const es = new EventSource("api/stream");
  es.addEventListener("snapshot", (ev) => { render(JSON.parse(ev.data)); });
  es.onopen = () => { live.textContent = "live"; live.className = "live on"; };
  es.onerror = () => { live.textContent = "reconnecting"; live.className = "live off"; };
}

fetch("api/snapshot").then((r) => r.json()).then(render).catch(() => {});
connect();
