// The ragline admin console: plain JavaScript over the gateway's own API (no build step, no
// framework); charts with uPlot, shipped in ui/vendor. Every call sends the signed-in key.
"use strict";

const $ = (id) => document.getElementById(id);
const TABS = ["overview", "keys", "usage", "prompts", "stores", "safety", "playground"];
let KEY = sessionStorage.getItem("ragline-key") || "";
const charts = {};

async function api(path, options = {}) {
  const headers = { Authorization: `Bearer ${KEY}`, ...(options.headers || {}) };
  const response = await fetch(path, { ...options, headers });
  if (!response.ok) {
    let message = `HTTP ${response.status}`;
    try { message = (await response.json()).error.message; } catch (_) { /* not JSON */ }
    throw new Error(message);
  }
  const kind = response.headers.get("content-type") || "";
  return kind.includes("json") ? response.json() : response.text();
}

function text(value) {
  return value === null || value === undefined ? "" : String(value);
}

function table(id, rows, columns) {
  const el = $(id);
  el.replaceChildren();
  if (!rows.length) {
    el.insertRow().insertCell().textContent = "nothing yet";
    return el;
  }
  columns = columns || Object.keys(rows[0]);
  const head = el.createTHead().insertRow();
  for (const c of columns) {
    const th = document.createElement("th");
    th.textContent = c;
    head.appendChild(th);
  }
  const body = el.createTBody();
  for (const row of rows) {
    const tr = body.insertRow();
    for (const c of columns) {
      const cell = tr.insertCell();
      const value = row[c];
      if (value instanceof Node) cell.appendChild(value); else cell.textContent = text(value);
    }
  }
  return el;
}

function button(label, onClick) {
  const b = document.createElement("button");
  b.textContent = label;
  b.addEventListener("click", onClick);
  return b;
}

function chart(id, title, series, data, time = true) {
  if (typeof uPlot === "undefined") return;
  const el = $(id);
  if (charts[id]) charts[id].destroy();
  el.replaceChildren();
  charts[id] = new uPlot({
    title, width: 560, height: 240, scales: { x: { time } },
    series: [{}, ...series.map((label, i) => ({
      label, stroke: ["#2563eb", "#dc2626", "#16a34a", "#9333ea"][i % 4], width: 2, spanGaps: true,
      points: { show: true, size: 5 },
    }))],
  }, data, el);
}

// -- sign in and tabs ------------------------------------------------------------------------

async function signIn(key) {
  KEY = key;
  await api("/admin/keys");  // an admin key or one with the console scope, or this throws
  sessionStorage.setItem("ragline-key", key);
  $("login").hidden = true;
  $("tabs").hidden = false;
  $("logout").hidden = false;
  if (!location.hash || location.hash === "#login") location.hash = "#overview";
  show();
}

function show() {
  const tab = (location.hash || "#overview").slice(1);
  if (!KEY || !TABS.includes(tab)) return;
  for (const name of TABS) $(name).hidden = name !== tab;
  for (const a of document.querySelectorAll("#tabs a")) {
    a.classList.toggle("active", a.getAttribute("href") === `#${tab}`);
  }
  LOADERS[tab]().then(() => loaded(tab)).catch((error) => alert(error.message));
}

// Each finished load of a page adds one to its data-loads, so a script (the browser test) can
// wait for the load its click caused instead of reading the page the load before left.
function loaded(tab) {
  $(tab).dataset.loads = String(Number($(tab).dataset.loads || 0) + 1);
}

// -- the pages -------------------------------------------------------------------------------

async function loadOverview() {
  const series = await api("/admin/usage/series?bucket=60&window=3600");
  // every minute of the hour, empty ones included, so the time axis is the hour
  const byMinute = new Map(series.points.map((p) => [p.t, p]));
  const now = Math.floor(Date.now() / 60000) * 60;
  const points = [];
  for (let t = now - 3540; t <= now; t += 60) {
    points.push(byMinute.get(t) || { t, requests: 0, tokens: 0, errors: 0, cached: 0,
      latency_p50_ms: null, latency_p99_ms: null, ttft_p50_ms: null, ttft_p99_ms: null });
  }
  const sum = (k) => points.reduce((a, p) => a + p[k], 0);
  const requests = sum("requests");
  const cards = [
    ["requests", requests], ["tokens", sum("tokens")], ["errors", sum("errors")],
    ["cache hit rate", requests ? `${Math.round((100 * sum("cached")) / requests)}%` : "–"],
  ];
  $("overview-totals").replaceChildren(...cards.map(([label, value]) => {
    const card = document.createElement("div");
    card.className = "card";
    card.dataset.metric = label;
    card.innerHTML = `<b></b><span></span>`;
    card.querySelector("b").textContent = text(value);
    card.querySelector("span").textContent = label;
    return card;
  }));
  const t = points.map((p) => p.t);
  chart("chart-traffic", "requests, errors, cache hits per minute", ["requests", "errors", "cached"],
    [t, points.map((p) => p.requests), points.map((p) => p.errors), points.map((p) => p.cached)]);
  chart("chart-latency", "latency and TTFT (ms)", ["latency p50", "latency p99", "TTFT p50", "TTFT p99"],
    [t, points.map((p) => p.latency_p50_ms), points.map((p) => p.latency_p99_ms),
      points.map((p) => p.ttft_p50_ms), points.map((p) => p.ttft_p99_ms)]);
}

async function loadKeys() {
  const keys = (await api("/admin/keys")).data;
  table("keys-table", keys.map((k) => ({
    id: k.id, name: k.name, admin: k.admin ? "yes" : "", team: (k.policy || {}).team,
    models: ((k.policy || {}).models || []).join(", "), source: k.source || "run-time",
    "": k.source === "config" ? "" : actions(k),
  })));
  const budgets = (await api("/admin/budgets")).data;
  table("budgets-table", budgets.flatMap((b) => b.usage.map((u) => ({
    scope: b.scope, id: b.id, period: u.period, unit: u.unit, used: u.used, limit: u.limit,
    resets: u.resets_at,
  }))));
}

function actions(k) {
  const span = document.createElement("span");
  span.append(button("Edit policy", async () => {
    const edited = prompt(`Policy of ${k.id} (JSON)`, JSON.stringify(k.policy));
    if (edited === null) return;
    try {
      await api(`/admin/keys/${encodeURIComponent(k.id)}`, {
        method: "PATCH", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ policy: JSON.parse(edited) }),
      });
    } catch (error) { alert(error.message); }
    loadKeys();
  }), " ", button("Revoke", async () => {
    if (!confirm(`Revoke ${k.id}?`)) return;
    await api(`/admin/keys/${encodeURIComponent(k.id)}`, { method: "DELETE" });
    loadKeys();
  }));
  return span;
}

async function loadUsage(event) {
  if (event) event.preventDefault();
  const params = usageParams();
  const rows = (await api(`/admin/usage?${params}`)).data;
  table("usage-table", rows);
  const labels = rows.map((r) => $("usage-group").value.split(",").map((g) => r[g.trim()]).join(" / "));
  chart("chart-usage", "requests per group (in table order)", ["requests"],
    [rows.map((_, i) => i + 1), rows.map((r) => r.requests)], false);
  $("chart-usage").title = labels.join(", ");
}

function usageParams(format = "json") {
  const params = new URLSearchParams({ group_by: $("usage-group").value, format });
  if ($("usage-start").value) params.set("start", $("usage-start").value);
  return params;
}

async function exportCsv() {
  const csv = await api(`/admin/usage?${usageParams("csv")}`);
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([csv], { type: "text/csv" }));
  link.download = "ragline-usage.csv";
  link.click();
}

async function loadPrompts() {
  const prompts = (await api("/admin/prompts")).data || [];
  table("prompts-table", prompts.map((p) => ({
    name: p.name, versions: p.versions.join(", "), default: p.default,
    labels: Object.entries(p.labels).map(([l, v]) => `${l}→${v}`).join(", "),
  })));
  const variants = (await api("/admin/prompts/variants")).data;
  table("variants-table", variants.map((v) => ({
    experiment: v.experiment, variant: v.variant, template: v.template, requests: v.requests,
    "mean prompt tokens": v.mean_prompt_tokens, "mean completion tokens": v.mean_completion_tokens,
    feedback: v.feedback, "mean score": v.mean_feedback,
  })));
}

async function loadStores() {
  const stores = (await api("/v1/vector_stores")).data;
  table("stores-table", stores.map((s) => ({
    id: s.id, name: s.name, files: (s.file_counts || {}).completed,
    "": button("Delete", async () => {
      if (!confirm(`Delete ${s.name}?`)) return;
      await api(`/v1/vector_stores/${s.id}`, { method: "DELETE" });
      loadStores();
    }),
  })));
  for (const id of ["upload-store", "search-store"]) {
    $(id).replaceChildren(...stores.map((s) => new Option(s.name, s.id)));
  }
}

async function createStore(event) {
  event.preventDefault();
  await api("/v1/vector_stores", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ name: $("store-name").value }),
  });
  $("store-name").value = "";
  await loadStores();
}

async function upload(event) {
  event.preventDefault();
  const form = new FormData();
  form.append("file", $("upload-file").files[0]);
  $("upload-status").textContent = "uploading…";
  const attached = await api(`/v1/vector_stores/${$("upload-store").value}/files`, { method: "POST", body: form });
  $("upload-status").textContent = `${attached.status}: ${attached.id}`;
  const chosen = [$("upload-store").value, $("search-store").value];
  await loadStores();  // the file counts changed
  [$("upload-store").value, $("search-store").value] = chosen;
}

async function search(event) {
  event.preventDefault();
  const result = await api(`/v1/vector_stores/${$("search-store").value}/search`, {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ query: $("search-query").value, max_num_results: 5 }),
  });
  table("search-results", result.data.map((hit) => ({
    score: hit.score.toFixed(3), file: hit.filename, snippet: hit.content[0].text.slice(0, 240),
  })));
}

async function loadSafety() {
  const findings = await api("/admin/safety/findings");
  table("safety-counts", findings.counts);
  table("safety-recent", findings.recent.map((f) => ({
    when: new Date(f.ts * 1000).toISOString(), scanner: f.scanner, type: f.type, action: f.action,
  })));
}

async function loadPlayground() {
  const models = (await api("/v1/models")).data.filter((m) => !m.id.includes("MiniLM"));
  const current = $("chat-model").value;
  $("chat-model").replaceChildren(...models.map((m) => new Option(m.id, m.id)));
  if (current) $("chat-model").value = current;
}

async function chat(event) {
  event.preventDefault();
  const out = $("chat-output");
  out.textContent = "";
  $("chat-meta").replaceChildren();
  $("chat-send").disabled = true;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { Authorization: `Bearer ${KEY}`, "Content-Type": "application/json" },
      body: JSON.stringify({
        model: $("chat-model").value, stream: true, stream_options: { include_usage: true },
        max_tokens: Number($("chat-max").value),
        messages: [{ role: "user", content: $("chat-input").value }],
      }),
    });
    if (!response.ok) throw new Error((await response.json()).error.message);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let extra = null;
    let usage = null;
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, cut).trim();
        buffer = buffer.slice(cut + 2);
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const chunk = JSON.parse(line.slice(6));
        if (chunk.error) throw new Error(chunk.error.message);
        for (const choice of chunk.choices || []) out.textContent += (choice.delta || {}).content || "";
        if (chunk.ragline) extra = chunk.ragline;
        if (chunk.usage) usage = chunk.usage;
      }
    }
    showMeta(extra, usage);
  } catch (error) {
    out.textContent += `\n[error] ${error.message}`;
  } finally {
    $("chat-send").disabled = false;
  }
}

function showMeta(extra, usage) {
  const meta = $("chat-meta");
  if (usage) {
    const p = document.createElement("p");
    p.id = "chat-usage";
    p.textContent = `${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens`;
    meta.appendChild(p);
  }
  if (extra && extra.citations) {
    const t = document.createElement("table");
    t.id = "chat-citations";
    meta.appendChild(t);
    table("chat-citations", extra.citations.map((c) => ({
      "[n]": c.marker, document: c.document_id, similarity: c.similarity, snippet: c.snippet,
    })));
  }
  if (extra && extra.safety) {
    const p = document.createElement("p");
    p.textContent = `safety: ${JSON.stringify(extra.safety)}`;
    meta.appendChild(p);
  }
}

const LOADERS = {
  overview: loadOverview, keys: loadKeys, usage: loadUsage, prompts: loadPrompts,
  stores: loadStores, safety: loadSafety, playground: loadPlayground,
};

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    signIn($("login-key").value).catch((error) => { $("login-error").textContent = error.message; });
  });
  $("logout").addEventListener("click", () => {
    sessionStorage.removeItem("ragline-key");
    location.hash = "";
    location.reload();
  });
  $("key-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const policy = { models: $("key-models").value.split(",").map((m) => m.trim()).filter(Boolean) };
    if ($("key-team").value) policy.team = $("key-team").value;
    const made = await api("/admin/keys", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ name: $("key-name").value, admin: $("key-admin").checked, policy }),
    });
    $("key-value").textContent = made.key;
    $("key-created").hidden = false;
    await loadKeys();
  });
  $("budget-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const budget = {};
    if ($("budget-tokens-day").value) budget.tokens_per_day = Number($("budget-tokens-day").value);
    if ($("budget-cost-month").value) budget.cost_per_month = Number($("budget-cost-month").value);
    await api(`/admin/budgets/${$("budget-scope").value}/${encodeURIComponent($("budget-owner").value)}`, {
      method: "PUT", headers: { "Content-Type": "application/json" }, body: JSON.stringify(budget),
    });
    await loadKeys();
  });
  $("usage-form").addEventListener("submit", (e) => loadUsage(e).then(() => loaded("usage")));
  $("usage-csv").addEventListener("click", exportCsv);
  $("store-form").addEventListener("submit", createStore);
  $("upload-form").addEventListener("submit", (e) => upload(e).catch((error) => {
    $("upload-status").textContent = error.message;
  }));
  $("search-form").addEventListener("submit", search);
  $("chat-form").addEventListener("submit", chat);
  window.addEventListener("hashchange", show);
  if (KEY) signIn(KEY).catch(() => { KEY = ""; });
});
