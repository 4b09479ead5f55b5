// What both pages share: the refresh period, DOM helpers, number formats and the
// JSON fetch that sends a signed-out viewer to the login form. Every value that
// came from a device or a client is set as text, never as markup.
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

async function get(url) {
  const response = await fetch(url, { credentials: "same-origin", cache: "no-store" });
  if (response.status === 401) { window.location.href = "/login"; throw new Error("signed out"); }
  if (!response.ok) throw new Error("HTTP " + response.status);
  return response.json();
}

