// The operator console: plain JavaScript, no build step, no third-party code. Every value
// that comes from a function, a connector or a message is put on the page as text
// (textContent), never as markup.
"use strict";

const POLL_MS = 2000;
const PAGE = 50;

const $ = (selector) => document.querySelector(selector);

/// A cell or element holding `text` as text.
function el(tag, text, className) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (className) e.className = className;
  return e;
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const c of cells) tr.appendChild(c instanceof Node ? c : el("td", c));
  return tr;
}

async function api(path, options = {}) {
  const response = await fetch(path, { credentials: "same-origin", ...options });
  const text = await response.text();
  let body;
  try { body = text ? JSON.parse(text) : null; } catch { body = text; }
  if (!response.ok) {
    const message = body && body.error ? body.error : `${response.status} ${text}`;
    throw new Error(message);
  }
  return body;
}

// ---------------------------------------------------------------- functions

function annotation(f, key) {
  return (f.annotations && f.annotations[key]) || "";
}

/// Each scheduled function's next fire time, from the cron connector's status (by name
/// without namespace).
const nextFire = new Map();

function scheduleText(f) {
  const schedule = annotation(f, "schedule");
  const next = nextFire.get(f.name);
  return schedule && next ? `${schedule} (next ${new Date(next).toLocaleTimeString()})` : schedule;
}

async function refreshFunctions() {
  const functions = await api("/system/functions");
  const tbody = $("#functions tbody");
  tbody.replaceChildren();
  functions.sort((a, b) => a.name.localeCompare(b.name));
  for (const f of functions) {
    const actions = el("td");
    const invoke = el("button", "invoke");
    invoke.addEventListener("click", () => openInvoke(f.name));
    const remove = el("button", "remove");
    remove.addEventListener("click", () => removeFunction(f.name));
    actions.append(invoke, remove);
    const tr = row([
      f.name,
      `${f.availableReplicas ?? 0} / ${f.replicas ?? 0}`,
      f.invocationCount ?? 0,
      annotation(f, "topic"),
      scheduleText(f),
      actions,
    ]);
    tr.dataset.function = f.name;
    tbody.appendChild(tr);
  }
}

function openInvoke(name) {
  $("#invoke").hidden = false;
  $("#invoke-name").textContent = name;
  $("#invoke-result").textContent = "";
}

async function sendInvoke() {
  const name = $("#invoke-name").textContent;
  const response = await fetch(`/function/${encodeURIComponent(name)}`, {
    method: "POST",
    body: $("#invoke-body").value,
  });
  const text = await response.text();
  $("#invoke-result").textContent = `${response.status}\n${text}`;
}

async function removeFunction(name) {
  if (!confirm(`Remove ${name}?`)) return;
  try {
    await api("/system/functions", {
      method: "DELETE",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ functionName: name }),
    });
  } catch (e) {
    alert(`remove ${name}: ${e.message}`);
  }
  await refreshFunctions();
}

async function deploy(event) {
  event.preventDefault();
  const form = new FormData(event.target);
  const annotations = {};
  for (const key of ["topic", "schedule"]) {
    const value = (form.get(key) || "").trim();
    if (value) annotations[key] = value;
  }
  try {
    await api("/system/functions", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({
        service: form.get("service"),
        image: "local",
        envProcess: form.get("envProcess"),
        annotations,
      }),
    });
    event.target.reset();
  } catch (e) {
    alert(`deploy: ${e.message}`);
  }
  await refreshFunctions();
}

// ---------------------------------------------------------------- connectors

async function refreshConnectors() {
  const { connectors } = await api("/ui/api/connectors");
  const tbody = $("#connectors tbody");
  tbody.replaceChildren();
  const select = $("#filter select[name=connector]");
  const chosen = select.value;
  const ids = [];
  let withLetters = null;
  for (const c of connectors) {
    const name = `${c.connector.name} (${c.connector.origin})`;
    ids.push([c.connector.id, name]);
    if (!withLetters && c.status && c.status.dead_letters) withLetters = c.connector.id;
    const status = c.status;
    const state = !c.up ? "down" : status && status.ready ? "ready" : "up, not ready";
    const stateCell = el("td", c.error ? `${state}: ${c.error}` : state, c.up ? "up" : "down");
    const subscriptions = (status && status.subscriptions) || [];
    if (subscriptions.length === 0) {
      tbody.appendChild(row([name, stateCell, "", "", "", "", "", "", "", ""]));
      continue;
    }
    for (const s of subscriptions) {
      const next = s.details && Array.isArray(s.details.next) ? s.details.next : null;
      if (next && next.length) nextFire.set(s.function.split(".")[0], next[0]);
      // Delivered per second over the connector's last ten seconds (null at its start).
      const rate = typeof s.delivered_per_second === "number"
        ? s.delivered_per_second.toFixed(1)
        : "–";
      const tr = row([
        name,
        el("td", stateCell.textContent, stateCell.className),
        s.function,
        s.topics.join(", "),
        rate,
        s.attempting,
        s.retrying,
        s.backlog,
        s.retried,
        s.totals.dead_lettered || 0,
      ]);
      tr.dataset.function = s.function;
      tr.dataset.connector = c.connector.id;
      tr.querySelector("td:nth-child(5)").className = "rate";
      tr.querySelector("td:nth-child(7)").className = "retrying";
      tr.querySelector("td:nth-child(8)").className = "backlog";
      tbody.appendChild(tr);
    }
  }
  const known = [...select.options].map((o) => o.value).join("\n");
  if (known !== ids.map(([id]) => id).join("\n")) {
    select.replaceChildren(...ids.map(([id, name]) => {
      const o = el("option", name);
      o.value = id;
      return o;
    }));
    // Keep the operator's choice; else the first connector that has dead letters.
    if (ids.some(([id]) => id === chosen)) select.value = chosen;
    else if (withLetters) select.value = withLetters;
  }
}

// ---------------------------------------------------------------- dead letters

let offset = 0;

function filterFields() {
  const form = new FormData($("#filter"));
  const fields = {};
  for (const key of ["function", "status", "reason", "topic", "key", "since", "until"]) {
    const value = (form.get(key) || "").trim();
    if (value) fields[key] = value;
  }
  return { connector: form.get("connector"), fields };
}

async function searchLetters() {
  const { connector, fields } = filterFields();
  if (!connector) {
    $("#letters-summary").textContent = "no connector to ask";
    return;
  }
  const query = new URLSearchParams({ ...fields, offset: String(offset), limit: String(PAGE) });
  try {
    const page = await api(`/ui/api/connectors/${encodeURIComponent(connector)}/dead-letters?${query}`);
    const tbody = $("#letters tbody");
    tbody.replaceChildren();
    for (const l of page.letters) {
      const payload = el("td", l.preview + (l.truncated ? " …" : ""), "payload");
      const tr = row([
        l.location,
        l.function,
        l.topic,
        l.reason ?? "",
        l.status ?? "none",
        l.attempts ?? "",
        l.last_failure ?? "",
        payload,
      ]);
      tr.className = "letter";
      tbody.appendChild(tr);
    }
    const shown = page.letters.length;
    $("#letters-summary").textContent = shown
      ? `${offset + 1}–${offset + shown} of ${page.matched} selected`
      : `${page.matched} selected`;
    $("#prev").disabled = offset === 0;
    $("#next").disabled = page.next === null || page.next === undefined;
  } catch (e) {
    $("#letters-summary").textContent = `error: ${e.message}`;
  }
}

async function operate(operation, dryRun) {
  const { connector, fields } = filterFields();
  if (!connector) return;
  if (!dryRun && !confirm(`${operation} every dead letter the filter selects?`)) return;
  $("#result").textContent = `${operation}…`;
  try {
    const answer = await api(
      `/ui/api/connectors/${encodeURIComponent(connector)}/dead-letters/${operation}`,
      {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ ...fields, dry_run: dryRun }),
      },
    );
    $("#result").textContent = answer.output.join("\n");
  } catch (e) {
    $("#result").textContent = `error: ${e.message}`;
  }
  offset = 0;
  await searchLetters();
}

// ---------------------------------------------------------------- wiring

async function poll() {
  try {
    await Promise.all([refreshFunctions(), refreshConnectors()]);
    $("#updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (e) {
    $("#updated").textContent = `error: ${e.message}`;
  }
}

$("#deploy-form").addEventListener("submit", deploy);
$("#invoke-send").addEventListener("click", sendInvoke);
$("#filter").addEventListener("submit", (event) => {
  event.preventDefault();
  offset = 0;
  searchLetters();
});
$("#prev").addEventListener("click", () => { offset = Math.max(0, offset - PAGE); searchLetters(); });
$("#next").addEventListener("click", () => { offset += PAGE; searchLetters(); });
$("#dry-run").addEventListener("click", () => operate("replay", true));
$("#replay").addEventListener("click", () => operate("replay", false));
$("#purge").addEventListener("click", () => operate("purge", false));

poll();
setInterval(poll, POLL_MS);
