// The editserve console: the HTTP API, read and written with the signed-in API key.
// Every value users typed reaches the page through textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
let key = sessionStorage.getItem("editserve-key") || "";
let pending = null; // the fact the last preview was made of
let shown = null; // the id of the edit whose detail is shown

async function api(method, path, body) {
  const init = { method, headers: { Authorization: `Bearer ${key}` } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    throw new Error(data.detail || data.title || `${response.status}`);
  }
  return data;
}

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text == null ? "" : String(text);
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

function fill(list, pairs) {
  list.replaceChildren();
  for (const [name, value] of pairs) {
    const dt = document.createElement("dt");
    dt.textContent = name;
    const dd = document.createElement("dd");
    dd.textContent = value == null ? "" : String(value);
    list.append(dt, dd);
  }
}

const when = (iso) => (iso ? new Date(iso).toLocaleString() : "");
const pct = (p) => (p == null ? "" : `${(100 * p).toFixed(1)}%`);

async function signIn(event) {
  if (event) event.preventDefault();
  if (!key) key = $("key").value.trim();
  try {
    await api("GET", "/info");
  } catch (error) {
    $("sign-in-error").textContent = `Sign-in failed: ${error.message}`;
    key = "";
    return;
  }
  sessionStorage.setItem("editserve-key", key);
  $("sign-in").hidden = true;
  $("console").hidden = false;
  $("sign-out").hidden = false;
  await refresh();
}

function signOut() {
  sessionStorage.removeItem("editserve-key");
  key = "";
  location.reload();
}

async function refresh() {
  await Promise.all([loadHealth(), loadEdits(), loadAudit()]);
  if (shown) await showEdit(shown);
}

async function loadHealth() {
  const info = await api("GET", "/info");
  const layers = Object.entries(info.layer_change || {})
    .map(([layer, value]) => `${layer}: ${value.toExponential(2)}`)
    .join(", ");
  fill($("health-list"), [
    ["model", info.model],
    ["method", info.method],
    ["model version", info.model_version],
    ["active edits", info.active_edits],
    ["edited blocks", info.edited_layers.join(", ")],
    ["mean |W - W0| per block", layers || "none"],
    ["probe agreement", info.probes ? pct(info.probes.agreement) : "probes off"],
    ["weights digest", info.weights_digest.slice(0, 16)],
  ]);
}

async function loadEdits(event) {
  if (event) event.preventDefault();
  const params = new URLSearchParams({ limit: "50" });
  if ($("filter-status").value) params.set("status", $("filter-status").value);
  if ($("filter-subject").value.trim()) params.set("subject", $("filter-subject").value.trim());
  const page = await api("GET", `/edits?${params}`);
  const body = $("edits-table").tBodies[0];
  body.replaceChildren();
  for (const edit of page.edits) {
    const row = body.insertRow();
    row.dataset.id = edit.id;
    cell(row, edit.id.slice(0, 8));
    cell(row, edit.status, `status status-${edit.status}`);
    cell(row, edit.facts[0].subject);
    cell(row, edit.facts[0].target_new);
    cell(row, edit.submitted_by);
    cell(row, when(edit.created_at));
    row.addEventListener("click", () => showEdit(edit.id));
  }
}

async function loadAudit() {
  const page = await api("GET", "/audit?limit=20");
  const body = $("audit-table").tBodies[0];
  body.replaceChildren();
  for (const event of page.events) {
    const row = body.insertRow();
    cell(row, when(event.at));
    cell(row, event.action, "action");
    cell(row, event.by);
    cell(row, event.edit_id.slice(0, 8));
    cell(row, event.reason);
  }
}

async function showEdit(id) {
  const edit = await api("GET", `/edits/${encodeURIComponent(id)}`);
  shown = id;
  $("detail").hidden = false;
  $("detail-id").textContent = id;
  const scores = edit.scores && edit.scores.facts ? edit.scores.facts[0].prompts[0] : null;
  fill($("detail-list"), [
    ["status", edit.status],
    ["subject", edit.facts.map((f) => f.subject).join("; ")],
    ["prompt", edit.facts.map((f) => f.prompt).join("; ")],
    ["new answer", edit.facts.map((f) => f.target_new).join("; ")],
    ["submitted by", edit.submitted_by],
    ["reason", edit.reason],
    ["model version", edit.model_version],
    ["P(new) before / after", scores ? `${pct(scores.p_target_before)} / ${pct(scores.p_target_after)}` : ""],
    ["still holds", edit.retention_held == null ? "not checked here" : edit.retention_held ? "yes" : "no"],
    ["error", edit.error ? edit.error.detail : ""],
  ]);
  const history = $("detail-history");
  history.replaceChildren();
  for (const event of edit.history) {
    const item = document.createElement("li");
    const reason = event.reason ? `: ${event.reason}` : "";
    item.textContent = `${when(event.at)} ${event.action} by ${event.by}${reason}`;
    history.appendChild(item);
  }
  $("revert-button").disabled = !["applied", "queued", "applying"].includes(edit.status);
}

function fact() {
  const found = {
    subject: $("f-subject").value.trim(),
    prompt: $("f-prompt").value.trim(),
    target_new: $("f-target").value.trim(),
  };
  const reason = $("f-reason").value.trim();
  if (reason) found.reason = reason;
  return found;
}

async function preview(event) {
  event.preventDefault();
  $("submit-error").textContent = "";
  $("preview").hidden = true;
  const asked = fact();
  $("preview-button").disabled = true;
  try {
    const seen = await api("POST", "/edits/preview", { ...asked, prompts: [asked.prompt] });
    pending = asked;
    const body = $("preview-table").tBodies[0];
    body.replaceChildren();
    for (const p of seen.scores.facts[0].prompts) {
      const row = body.insertRow();
      cell(row, p.prompt);
      cell(row, `P(${asked.target_new}) ${pct(p.p_target_before)} → ${pct(p.p_target_after)}`);
    }
    for (const g of seen.generations) {
      const row = body.insertRow();
      cell(row, g.prompt);
      cell(row, `"${g.before.trim()}" → "${g.after.trim()}"`, "generation");
    }
    $("preview-verdict").textContent = `Guardrails: ${seen.verdict}`;
    $("commit-button").disabled = seen.verdict === "reject";
    $("preview").hidden = false;
  } catch (error) {
    $("submit-error").textContent = `Preview failed: ${error.message}`;
  } finally {
    $("preview-button").disabled = false;
  }
}

async function commit() {
  if (!pending) return;
  try {
    const accepted = await api("POST", "/edits", pending);
    pending = null;
    $("preview").hidden = true;
    await showEdit(accepted.id);
    await refresh();
  } catch (error) {
    $("submit-error").textContent = `Not applied: ${error.message}`;
  }
}

async function revert(event) {
  event.preventDefault();
  const reason = $("revert-reason").value.trim();
  try {
    await api("POST", `/edits/${encodeURIComponent(shown)}/revert`, reason ? { reason } : undefined);
    await refresh();
  } catch (error) {
    $("detail-list").insertAdjacentText("afterend", `Revert failed: ${error.message}`);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("sign-in-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", signOut);
  $("fact-form").addEventListener("submit", preview);
  $("commit-button").addEventListener("click", commit);
  $("filter-form").addEventListener("submit", loadEdits);
  $("revert-form").addEventListener("submit", revert);
  if (key) signIn();
  setInterval(() => {
    if (key && !$("console").hidden) refresh().catch(() => {});
  }, 2000);
});
