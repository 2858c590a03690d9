// The status page: polls /api/status every 2 s and redraws in place. No library, no CDN.
"use strict";

const EVERY_MS = 2000;
let previous = null; // the last answer and when it came, for rates

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== undefined && v !== null) e.setAttribute(k, v);
  }
  for (const c of children) {
    if (c !== undefined && c !== null) e.append(c instanceof Node ? c : String(c));
  }
  return e;
}

function age(ms) {
  if (ms === null || ms === undefined) return "—";
  const s = Math.max(0, Math.round(ms / 1000));
  if (s < 120) return s + " s";
  if (s < 7200) return Math.round(s / 60) + " min";
  if (s < 172800) return Math.round(s / 3600) + " h";
  return Math.round(s / 86400) + " d";
}

function since(tsMs, now) {
  return tsMs ? age(now - tsMs) + " ago" : "—";
}

function num(x) {
  return typeof x === "number" ? x.toLocaleString("en-US", { maximumFractionDigits: 3 }) : x;
}

function show(value) {
  if (value === null) return "null";
  if (typeof value === "number") return num(value);
  return String(value);
}

function rate(now, before, dtS) {
  // Under a second apart, a rate says little: wait for the next snapshot.
  if (before === undefined || dtS < 1) return "—";
  return (Math.max(0, now - before) / dtS).toFixed(1) + "/s";
}

function render(api, at) {
  const s = api.status;
  const now = Date.parse(s.ts) || at;
  const prev = previous;
  // Rates between two snapshots, by the gateway's own clock (not the browser's).
  const dt = prev ? (now - prev.now) / 1000 : 0;
  const g = s.gateway || {};
  const broker = g.broker || {};

  $("gateway").textContent = "fieldgate " + (g.id || "");
  document.title = "fieldgate " + (g.id || "");
  $("summary").textContent = "version " + (g.version || "?") + " · up " + age(s.uptime_s * 1000);
  const link = $("link");
  link.className = "badge " + (broker.connected ? "ok" : "bad");
  link.textContent = "broker " + (broker.connected ? "connected" : "down") +
    (broker.since_ms ? " for " + age(now - broker.since_ms) : "");
  link.title = broker.last_error ? "last error " + since(broker.last_error.at_ms, now) + ": " + broker.last_error.message : "";

  // Queue.
  const q = s.queue || {};
  const d = q.dropped || {};
  const rows = [
    ["depth", num(q.depth) + " readings"],
    ["oldest", q.oldest_age_s === null || q.oldest_age_s === undefined ? "—" : age(q.oldest_age_s * 1000)],
    ["drained", prev ? rate(q.acked_total, prev.api.status.queue.acked_total, dt) : "—"],
    ["dropped", num(d.total || 0) + " (oldest " + (d.oldest || 0) + ", newest " + (d.newest || 0) + ", expired " + (d.expired || 0) + (d.unsaved ? ", unsaved at a stop " + d.unsaved : "") + ")"],
    ["set aside", num(d.set_aside || 0) + asideReasons(d.aside_by_reason)],
    ["file", num(Math.round((q.bytes || 0) / 1024)) + " KiB in use"],
    ["last seq", num(q.last_seq)],
  ];
  if (q.write_error) rows.unshift(["disk", "REFUSES WRITES: " + num(q.held || 0) + " readings held in memory (" + q.write_error + ")"]);
  if (broker.last_error) rows.push(["broker error", broker.last_error.message + " (" + since(broker.last_error.at_ms, now) + ")"]);
  $("queue").replaceChildren(...rows.flatMap(([k, v]) => [el("dt", {}, k), el("dd", { "data-key": k.replace(" ", "_") }, v)]));
  chart(api.depth_history || [], q.depth, now);

  // Buses.
  const head = el("tr", {}, ...["bus", "state", "requests", "timeouts", "CRC", "exceptions", "last error"].map((h) => el("th", {}, h)));
  const busRows = Object.entries(s.buses || {}).map(([name, b]) => {
    const errors = b.errors || {};
    const devices = Object.values(b.devices || {});
    const online = devices.filter((x) => x.online === true).length;
    const state = devices.length === 0 ? "idle" : online === devices.length ? "ok" : online === 0 ? "down" : online + "/" + devices.length + " online";
    const before = prev && prev.api.status.buses && prev.api.status.buses[name];
    const reqs = rate(b.requests, before && before.requests, dt);
    const err = b.last_error ? b.last_error.message + " (" + since(b.last_error.at_ms, now) + ")" : "";
    return el("tr", { "data-bus": name },
      el("td", {}, name),
      el("td", {}, el("span", { class: "badge " + (state === "ok" ? "ok" : state === "down" ? "bad" : "unknown") }, state)),
      el("td", { class: "num" }, (b.lines ? num(b.lines) + " lines · " : "") + reqs),
      el("td", { class: "num" }, num(errors.timeout || 0)),
      el("td", { class: "num" }, num((errors.crc || 0) + ((b.line && b.line.crc) || 0))),
      el("td", { class: "num" }, num(errors.exception || 0)),
      el("td", { class: "error" }, err));
  });
  $("buses").replaceChildren(head, ...busRows);

  // Devices: one card each.
  const cards = [];
  for (const [busName, b] of Object.entries(s.buses || {})) {
    for (const [name, dev] of Object.entries(b.devices || {})) {
      const state = dev.online === true ? "online" : dev.online === false ? "offline" : "unknown";
      const points = Object.entries(dev.values || {}).map(([p, r]) => {
        const a = now - r.ts_ms;
        const stale = a > Math.max(3 * r.every_ms, 10000);
        return el("tr", { class: stale ? "stale" : "", "data-point": p },
          el("td", {}, p),
          el("td", { class: "num value" }, show(r.value)),
          el("td", {}, r.unit || ""),
          el("td", { class: "num muted" }, age(a)));
      });
      const table = points.length
        ? el("div", { class: "scroll" }, el("table", {}, el("tr", {}, el("th", {}, "point"), el("th", {}, "value"), el("th", {}, "unit"), el("th", {}, "age")), ...points))
        : el("p", { class: "muted small" }, "no values yet");
      cards.push(el("section", { class: "card device", "data-device": name },
        el("h2", {}, el("span", {}, name, el("span", { class: "muted small" }, " on " + busName)), el("span", { class: "badge " + state }, state)),
        el("div", { class: "muted small" }, "last good poll " + since(dev.last_success_ms, now) + " · polls " + num(dev.polls || 0) + " · failed " + num(dev.failed_polls || 0)),
        dev.last_error ? el("div", { class: "error" }, dev.last_error.message + " (" + since(dev.last_error.at_ms, now) + ")") : null,
        table));
    }
  }
  $("devices").replaceChildren(...cards);
  previous = { api, at, now };
}

function chart(history, depthNow, now) {
  const svg = $("chart");
  const points = history.concat([[now, depthNow || 0]]);
  // The last hour, or as much of it as there is (the samples start with the gateway).
  const t0 = Math.max(now - 3600 * 1000, points[0][0]);
  const span = Math.max(now - t0, 1);
  const shown = points.filter((p) => p[0] >= t0);
  const max = Math.max(1, ...shown.map((p) => p[1]));
  const coords = shown
    .map((p) => ((360 * (p[0] - t0)) / span).toFixed(1) + "," + (78 - (p[1] / max) * 74).toFixed(1))
    .join(" ");
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("points", coords);
  svg.replaceChildren(line);
  $("chart-label").textContent = "depth over the last " + (span >= 3599000 ? "hour" : age(span)) + " (max " + num(max) + ")";
}

async function tick() {
  try {
    const r = await fetch("/api/status", { cache: "no-store" });
    if (r.status === 503) {
      // Before the queue opens (a read-only or missing state directory): why nothing is polled.
      const body = await r.json().catch(() => ({}));
      if (body.waiting) {
        const link = $("link");
        link.className = "badge bad";
        link.textContent = "polling nothing";
        $("summary").textContent = body.waiting;
        return;
      }
    }
    if (!r.ok) throw new Error("HTTP " + r.status);
    render(await r.json(), Date.now());
  } catch (e) {
    const link = $("link");
    link.className = "badge bad";
    link.textContent = "gateway not answering (" + e.message + ")";
  } finally {
    setTimeout(tick, EVERY_MS);
  }
}

tick();

// "", or " (not authorized (0x87): 3, …)" for what the aside table holds now.
function asideReasons(by) {
  const parts = Object.entries(by || {}).map(([r, n]) => r + ": " + num(n));
  return parts.length ? " (" + parts.join(", ") + ")" : "";
}
