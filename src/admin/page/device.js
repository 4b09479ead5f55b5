// A device's page (/devices/<mac>): polls /api/devices/<mac> and redraws its
// connection, open tunnels, past tunnels and online/offline history (helpers in
// common.js).
"use strict";

const MAC = decodeURIComponent(window.location.pathname.split("/").pop());

function end(e) {
  const who = e.kind === "device" ? "device " + e.mac : "client";
  return who + " (" + e.address + (e.transport === "tls" ? ", TLS" : "") + ")";
}

// A certificate's subject and serial, as the audit command shows it.
function certificate(name, serial) {
  if (!name) return "";
  return serial ? name + " #" + serial : name;
}

function rows(table, items, fill) {
  const body = $(table).tBodies[0];
  body.replaceChildren();
  for (const item of items) fill(body.insertRow(), item);
  if (!items.length) {
    const none = cell(body.insertRow(), "none", "muted");
    none.colSpan = $(table).tHead.rows[0].cells.length;
  }
}

function render(d) {
  const device = d.device;
  document.title = (device.host || device.mac) + " · Elfin Connect gateway";
  $("title").textContent = (device.host || "(no name)") + " " + device.mac;
  const status = $("status");
  status.textContent = device.online ? "online" : "offline";
  status.className = device.online ? "online" : "offline";
  $("host").textContent = device.host || "–";
  $("user").textContent = (device.user || "(not stored)") + " " + device.uuid;
  $("last-seen").textContent = device.last_seen;
  $("connected-from").textContent = device.connected_from || "–";

  const contested = $("contested");
  contested.hidden = !d.contested;
  contested.textContent = d.contested
    ? "Contested: seen from " + d.contested.seen_from + ", claimed from " +
      d.contested.claimants.join(", ") + " in the last " + age(d.contested.since_secs) +
      " (refused: auth.device_takeover = \"when-silent\")"
    : "";

  const problem = $("problem");
  problem.hidden = !d.audit_error;
  problem.textContent = d.audit_error ? "Audit trail: " + d.audit_error : "";

  rows("open-tunnels", d.tunnels_now, (row, t) => {
    row.dataset.tunnel = t.id;
    cell(row, t.id, "num");
    cell(row, end(t.a));
    cell(row, end(t.b));
    cell(row, age(t.age_secs), "num");
    cell(row, bytes(t.bytes_a_to_b), "num");
    cell(row, bytes(t.bytes_b_to_a), "num");
  });
  rows("tunnel-history", d.tunnels, (row, t) => {
    cell(row, t.opened);
    cell(row, t.seconds === null ? "open" : age(t.seconds), "num");
    cell(row, t.user);
    cell(row, t.peer_device ? "device " + (t.device === MAC ? t.peer_device : t.device) + " (" + t.client_address + ")" : t.client_address);
    cell(row, certificate(t.client_certificate, t.client_certificate_serial));
    cell(row, t.node);
    cell(row, bytes(t.bytes_to_device), "num");
    cell(row, bytes(t.bytes_from_device), "num");
    cell(row, t.cause ? t.closed + ": " + t.cause : "");
  });
  rows("device-events", d.events, (row, e) => {
    cell(row, e.at);
    cell(row, e.event, "status " + e.event);
    cell(row, e.address);
    cell(row, e.cause || "");
    cell(row, e.node);
  });
  rows("device-refusals", d.refusals, (row, r) => {
    cell(row, r.at);
    cell(row, r.request);
    cell(row, r.user || "");
    cell(row, r.reason);
    cell(row, r.source);
    cell(row, certificate(r.certificate, r.certificate_serial));
    cell(row, r.detail);
    cell(row, r.node);
  });
  $("updated").textContent = "updated " + d.clock.now + " · times in " + d.clock.zone;
}

async function refresh() {
  try {
    render(await get("/api/devices/" + encodeURIComponent(MAC)));
  } catch (e) {
    $("updated").textContent = e.message === "HTTP 404"
      ? "the gateway knows no device " + MAC
      : "cannot reach the gateway: " + e.message;
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}

refresh();
