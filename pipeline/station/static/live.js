// Live view: parts as the recorder stores them (server-sent events), counts and health every few seconds.
"use strict";
const STRIP = 80;      // parts shown per camera
const REJECTS = 24;    // reject cards shown
const DRAW_MS = 250;   // parts are drawn in batches this often: a browser on the line's box takes less CPU
let waiting = [];      // parts received, not drawn yet
let drawTimer = null;
const camerasEl = document.getElementById("cameras");
const rejectsEl = document.getElementById("rejects");
const healthEl = document.getElementById("health");
const panels = new Map();

function el(tag, attrs = {}, text = "") {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text) node.textContent = text;
  return node;
}

function panel(camera) {
  if (!panels.has(camera)) {
    const box = el("div", { class: "camera", id: "camera-" + camera });
    const head = el("h2");
    head.append(el("span", {}, camera), el("span", { class: "rate" }), el("span", { class: "counts" }));
    const strip = el("div", { class: "strip" });
    box.append(head, strip);
    camerasEl.append(box);
    panels.set(camera, { box, strip, rate: head.children[1], counts: head.children[2] });
  }
  return panels.get(camera);
}

function score(p) { return p.score === null ? "no score" : p.score.toPrecision(4); }

function addPart(p) {
  const shown = String(Date.now());
  const link = "/part/" + encodeURIComponent(p.run) + "/" + p.seq;
  const cell = el("a", { class: p.verdict, href: link, title: p.verdict + " · score " + score(p) + " · frame " + p.frame_id,
                         "data-seq": p.seq, "data-run": p.run, "data-shown-ms": shown });
  const strip = panel(p.camera_id).strip;
  strip.prepend(cell);
  while (strip.children.length > STRIP) strip.lastChild.remove();
  if (p.verdict !== "reject") return;
  const card = el("a", { class: "reject-card", href: link, id: "reject-" + p.run + "-" + p.seq,
                         "data-seq": p.seq, "data-run": p.run, "data-shown-ms": shown });
  if (p.image_key) card.append(el("img", { src: "/image/" + p.image_key + "?kind=overlay", alt: "anomaly map" }));
  card.append(el("div", {}, p.camera_id + " · frame " + p.frame_id),
              el("div", {}, "score " + score(p) + " > " + p.threshold.toPrecision(4)),
              el("div", {}, new Date(p.t_decision_ns / 1e6).toLocaleTimeString()));
  rejectsEl.prepend(card);
  while (rejectsEl.children.length > REJECTS) rejectsEl.lastChild.remove();
}

function pct(x) { return (100 * x).toPrecision(2) + " %"; }

function showStats(s) {
  for (const [camera, c] of Object.entries(s.counts)) {
    const p = panel(camera);
    if (c.reject_rate === null) { p.rate.textContent = "no parts yet"; p.rate.className = "rate"; }
    else {
      const bound = s.target_fpr === null ? "" : ", calibrated for \u2264 " + pct(s.target_fpr) + " false rejects";
      p.rate.textContent = pct(c.reject_rate) + " rejected" + bound;
      p.rate.className = "rate" + (s.target_fpr !== null && c.reject_rate > s.target_fpr ? " over" : "");
    }
    p.counts.textContent = c.total + " parts: " + c.pass + " pass, " + c.reject + " reject, " + c.error + " error";
  }
  showHealth(s);
}

function showHealth(s) {
  healthEl.replaceChildren();
  const beat = s.heartbeat;
  const line = el("p", { id: "heartbeat" });
  if (beat === null) { line.textContent = "no heartbeat heard"; line.className = "bad"; }
  else {
    const stale = beat.age_s > 1.0;
    line.textContent = "heartbeat " + beat.age_s.toFixed(1) + " s ago, " + beat.health +
      (beat.problems.length ? ": " + beat.problems.join("; ") : "") + " (last seq " + beat.seq + ")";
    line.className = stale || beat.health !== "ok" ? "bad" : "ok";
  }
  healthEl.append(line);
  const h = s.health;
  if (h === null) { healthEl.append(el("p", {}, "no run on this box: the store alone")); return; }
  const table = el("table");
  table.append(el("tr")); table.lastChild.append(el("th", {}, "stage"), el("th", {}, "state"), el("th", {}, "restarts"));
  for (const st of h.stages) {
    const row = el("tr");
    row.append(el("td", {}, st.name), el("td", { class: st.state === "down" ? "down" : "ok" }, st.state),
               el("td", {}, String(st.restarts)));
    table.append(row);
  }
  for (const c of h.cameras) {
    const row = el("tr");
    const state = c.done ? "finished" : c.connected ? "connected" : "disconnected";
    row.append(el("td", {}, "camera " + c.id), el("td", { class: c.connected || c.done ? "ok" : "down" }, state),
               el("td", {}, c.captured + " frames, " + c.drops + " dropped"));
    table.append(row);
  }
  healthEl.append(table, el("p", { class: h.store_failing ? "bad" : "" },
    "store backlog " + h.store_backlog + (h.store_failing ? " (store unreachable: verdicts are kept and written later)" : "")));
}

for (const camera of JSON.parse(camerasEl.dataset.cameras || "[]")) panel(camera);
const source = new EventSource("/live/events");
source.addEventListener("snapshot", (e) => {  // also after a reconnect: start over from what the server has
  const d = JSON.parse(e.data);
  waiting = [];
  for (const p of panels.values()) p.strip.replaceChildren();
  rejectsEl.replaceChildren();
  d.parts.forEach(addPart);
  showStats(d.stats);
});
function draw() {
  drawTimer = null;
  const parts = waiting;
  waiting = [];
  parts.forEach(addPart);
}

source.addEventListener("parts", (e) => {
  waiting.push(...JSON.parse(e.data));
  if (drawTimer === null) drawTimer = setTimeout(draw, DRAW_MS);
});
source.addEventListener("stats", (e) => showStats(JSON.parse(e.data)));
