// The status page: polls /api/status and redraws. Every value that came from a
// device or a client (host names, macs) is set as text, never as markup.
"use strict";

const REFRESH_MS = 2000;

function $(id) { return document.getElementById(id); }

function cell(row, text, cls) {
  const td = row.insertCell();
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n.toFixed(0) : n.toFixed(1)) + " " + units[i];
}

function age(secs) {
  if (secs < 60) return secs + " s";
  if (secs < 3600) return Math.floor(secs / 60) + " min";
  return Math.floor(secs / 3600) + " h " + Math.floor((secs % 3600) / 60) + " min";
}

function end(e) {
  const who = e.kind === "device" ? "device " + e.mac : "client";
  return who + " (" + e.address + (e.transport === "tls" ? ", TLS" : "") + ")";
}

// A line chart of `key` over the last 15 minutes of `history` into an <svg>,
// scaled to its largest value.
const SPAN_SECS = 15 * 60;

function chart(svg, history, key, label) {
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const ns = "http://www.w3.org/2000/svg";
  const values = history.map(h => h[key]);
  const max = Math.max(1, ...values);
  const end = history.length ? history[history.length - 1].at : 0;
  const line = document.createElementNS(ns, "polyline");
  line.setAttribute("points", history.map(h =>
    (300 - (end - h.at) * 300 / SPAN_SECS).toFixed(1) + "," +
    (78 - h[key] * 70 / max).toFixed(1)).join(" "));
  svg.appendChild(line);
  const text = document.createElementNS(ns, "text");
  text.setAttribute("x", "2");
  text.setAttribute("y", "9");
  text.textContent = "max " + label(max);
  svg.appendChild(text);
}

function render(s) {
  $("version").textContent = "v" + s.version + ", up " + age(s.uptime_secs);
  const cluster = $("cluster");
  cluster.hidden = !s.cluster;
  if (s.cluster) {
    cluster.textContent = "cluster node " + s.cluster.node + ", " +
      (s.cluster.connected ? "NATS connected" : "NATS unreachable") +
      ", other nodes: " + (s.cluster.nodes.length ? s.cluster.nodes.join(", ") : "none");
  }
  $("devices-online").textContent = s.totals.devices_online;
  $("devices-offline").textContent = s.totals.devices_offline;
  $("connections").textContent = s.totals.connections;
  $("tunnels").textContent = s.totals.tunnels;
  $("throughput").textContent = bytes(s.totals.bytes_per_sec) + "/s";

  const problem = $("problem");
  problem.hidden = !s.store_error;
  problem.textContent = s.store_error ? "Database: " + s.store_error + " (stored devices may be out of date)" : "";

  const tunnels = $("tunnel-table").tBodies[0];
  tunnels.replaceChildren();
  for (const t of s.tunnels) {
    const row = tunnels.insertRow();
    row.dataset.tunnel = t.id;
    cell(row, t.id, "num");
    cell(row, end(t.a));
    cell(row, end(t.b));
    cell(row, age(t.age_secs), "num");
    cell(row, bytes(t.bytes_a_to_b), "num bytes-a-b").dataset.bytes = t.bytes_a_to_b;
    cell(row, bytes(t.bytes_b_to_a), "num bytes-b-a").dataset.bytes = t.bytes_b_to_a;
  }

  const devices = $("device-table").tBodies[0];
  devices.replaceChildren();
  for (const u of s.users) {
    const list = u.devices.slice().sort((a, b) => (b.online - a.online) || a.mac.localeCompare(b.mac));
    for (const d of list) {
      const row = devices.insertRow();
      row.dataset.mac = d.mac;
      cell(row, (u.name || "(not stored)") + " " + u.uuid);
      cell(row, d.host);
      cell(row, d.mac);
      cell(row, d.online ? "online" : "offline", "status " + (d.online ? "online" : "offline"));
      cell(row, d.last_seen);
      cell(row, d.connected_from || "");
    }
  }
  const omitted = $("omitted");
  omitted.hidden = s.rows_omitted === 0;
  omitted.textContent = s.rows_omitted + " more devices not shown.";

  chart($("chart-connections"), s.history, "connections", v => v.toFixed(0));
  chart($("chart-throughput"), s.history, "bytes_per_sec", v => bytes(v) + "/s");
  $("updated").textContent = "updated " + new Date().toLocaleTimeString();
}

async function refresh() {
  try {
    const response = await fetch("/api/status", { credentials: "same-origin", cache: "no-store" });
    if (response.status === 401) { window.location.href = "/login"; return; }
    if (!response.ok) throw new Error("HTTP " + response.status);
    render(await response.json());
  } catch (e) {
    $("updated").textContent = "cannot reach the gateway: " + e.message;
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}

refresh();
