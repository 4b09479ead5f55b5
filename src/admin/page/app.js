// The status page: polls /api/status and the page of /api/devices on screen, and
// redraws (helpers in common.js).
"use strict";

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

  $("webhooks").hidden = !s.webhooks.length;
  const hooks = $("webhook-table").tBodies[0];
  hooks.replaceChildren();
  for (const w of s.webhooks) {
    const row = hooks.insertRow();
    row.dataset.endpoint = w.name;
    cell(row, w.name);
    cell(row, w.url);
    cell(row, w.queued, "num");
    cell(row, w.delivered, "num");
    cell(row, w.failures, "num");
    cell(row, w.dropped, "num");
    cell(row, w.last_delivery || "never");
    cell(row, w.last_failure ? w.last_failure + ": " + w.last_error : "");
  }

  chart($("chart-connections"), s.history, "connections", v => v.toFixed(0));
  chart($("chart-throughput"), s.history, "bytes_per_sec", v => bytes(v) + "/s");
  $("updated").textContent = "updated " + s.clock.now + " · times in " + s.clock.zone;
}

// The device list: only the page on screen is fetched, with the search and filter.
const view = { q: "", status: "", page: 1, pages: 1 };

function renderDevices(p) {
  view.page = p.page;
  view.pages = p.pages;
  const devices = $("device-table").tBodies[0];
  devices.replaceChildren();
  for (const d of p.devices) {
    const row = devices.insertRow();
    row.dataset.mac = d.mac;
    const link = document.createElement("a");
    link.href = "/devices/" + encodeURIComponent(d.mac);
    link.textContent = d.host || "(no name)";
    row.insertCell().appendChild(link);
    cell(row, d.mac, "mac");
    cell(row, (d.user || "(not stored)") + " " + d.uuid);
    cell(row, d.online ? "online" : "offline", "status " + (d.online ? "online" : "offline"));
    cell(row, d.last_seen);
    cell(row, d.connected_from || "");
  }
  $("matches").textContent = p.total + (p.total === 1 ? " device" : " devices");
  $("page-of").textContent = "page " + p.page + " of " + p.pages;
  $("previous").disabled = p.page <= 1;
  $("next").disabled = p.page >= p.pages;
}

function devicesUrl() {
  const query = new URLSearchParams({ page: view.page });
  if (view.q) query.set("q", view.q);
  if (view.status) query.set("status", view.status);
  return "/api/devices?" + query;
}

// Fetches the device page now; a slower answer to an older search is dropped.
let asked = 0;
async function refreshDevices() {
  const mine = ++asked;
  const page = await get(devicesUrl());
  if (mine === asked) renderDevices(page);
}

let timer = null;
async function refresh() {
  clearTimeout(timer);
  try {
    const [status] = await Promise.all([get("/api/status"), refreshDevices()]);
    render(status);
  } catch (e) {
    $("updated").textContent = "cannot reach the gateway: " + e.message;
  } finally {
    timer = setTimeout(refresh, REFRESH_MS);
  }
}

let typing = null;
$("search").addEventListener("input", () => {
  clearTimeout(typing);
  typing = setTimeout(() => {
    view.q = $("search").value.trim();
    view.page = 1;
    refreshDevices().catch(() => {});
  }, 150);
});
$("status-filter").addEventListener("change", () => {
  view.status = $("status-filter").value;
  view.page = 1;
  refreshDevices().catch(() => {});
});
$("device-search").addEventListener("submit", e => e.preventDefault());
$("previous").addEventListener("click", () => { view.page = Math.max(1, view.page - 1); refreshDevices().catch(() => {}); });
$("next").addEventListener("click", () => { view.page = Math.min(view.pages, view.page + 1); refreshDevices().catch(() => {}); });

refresh();
