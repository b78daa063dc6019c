// distcomp dashboard: no framework, no CDN. Live data arrives over SSE
// (/api/stream); lists and actions use the JSON endpoints.
"use strict";
const $ = (sel) => document.querySelector(sel);
const STATES = ["queued", "running", "succeeded", "failed", "cancelled"];

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "onclick") node.onclick = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}
function fmtSize(n) {
  if (n === null || n === undefined || n === "") return "-";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"]; let i = 0; n = Number(n);
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + units[i];
}
function fmtEta(s) {
  if (s === null || s === undefined) return "-";
  s = Math.round(s);
  if (s >= 3600) return Math.floor(s / 3600) + "h" + String(Math.floor(s % 3600 / 60)).padStart(2, "0") + "m";
  if (s >= 60) return Math.floor(s / 60) + "m" + String(s % 60).padStart(2, "0") + "s";
  return s + "s";
}
function bar(parts, total) {
  const b = el("span", {class: "bar"}); let left = 0;
  for (const [cls, n] of parts) {
    const w = total ? 100 * n / total : 0;
    b.append(el("span", {class: cls, style: `left:${left}%;width:${w}%`})); left += w;
  }
  return b;
}
async function api(path, opts) {
  // Actions carry a custom header: another site cannot send it without a CORS preflight.
  if (opts && opts.method === "POST") opts.headers = {"X-Distcomp-Action": "1"};
  const r = await fetch(path, opts);
  const data = await r.json();
  if (!r.ok) throw new Error(data.error || r.statusText);
  return data;
}

function renderOverview(d) {
  $("#queue").textContent = "queue " + d.queue;
  const c = d.counts;
  $("#summary").textContent = STATES.map((s) => `${s} ${c[s] || 0}`).join(" · ") +
    ` · ${(d.throughput_per_s * 60).toFixed(1)} tasks/min · ${d.totals.workers_alive} workers alive`;
  const body = $("#jobs tbody"); body.replaceChildren();
  for (const j of d.jobs) {
    const parts = [["succeeded", j.counts.succeeded], ["failed", j.counts.failed],
                   ["cancelled", j.counts.cancelled], ["running", j.counts.running]];
    const cancel = el("button", {onclick: () => cancelJob(j.id)}, "cancel");
    if (j.done) cancel.disabled = true;
    body.append(el("tr", {id: "job-" + j.id}, el("td", {}, j.id), el("td", {}, j.name),
      el("td", {}, bar(parts, j.n_tasks), ` ${j.finished}/${j.n_tasks}`),
      ...STATES.map((s) => el("td", {class: "num state-" + s, "data-state": s}, j.counts[s] || 0)),
      el("td", {class: "num"}, (j.rate_per_s * 60).toFixed(1)),
      el("td", {class: "num"}, j.done ? "done" : fmtEta(j.eta_s)), el("td", {}, cancel)));
  }
  const wb = $("#workers tbody"); wb.replaceChildren();
  for (const w of d.workers) {
    const i = w.info || {};
    wb.append(el("tr", {class: w.status}, el("td", {}, w.name), el("td", {}, w.status),
      el("td", {}, i.host || ""), el("td", {class: "num"}, w.n_tasks),
      el("td", {}, bar([["used", i.used_cpus || 0]], i.cpus || 1), ` ${i.used_cpus || 0}/${i.cpus}`),
      el("td", {}, bar([["used", i.used_mem || 0]], i.mem || 1), ` ${fmtSize(i.used_mem)}/${fmtSize(i.mem)}`),
      el("td", {}, fmtSize(i.rss)), el("td", {}, `${Number(w.heartbeat_age_s).toFixed(1)}s ago`),
      el("td", {class: "held"}, (w.tasks || []).join(", "))));
  }
  chart("#chart-tasks", d.history, [["queued", "#3182ce"], ["running", "#d69e2e"], ["finished", "#38a169"]]);
  chart("#chart-util", d.history, [["cpu", "#805ad5"], ["mem", "#3182ce"], ["rss", "#dd6b20"]], 1);
}

// A line chart drawn as inline SVG polylines (fixed max for ratios, else auto).
function chart(sel, hist, series, fixedMax) {
  const svg = $(sel); const W = 400, H = 140, pad = 4;
  svg.replaceChildren();
  if (!hist || hist.length < 2) return;
  const t0 = hist[0].t, t1 = hist[hist.length - 1].t || t0 + 1;
  let max = fixedMax || 1;
  if (!fixedMax) for (const h of hist) for (const [k] of series) max = Math.max(max, h[k]);
  for (const [k, color] of series) {
    const pts = hist.map((h) => `${pad + (W - 2 * pad) * (h.t - t0) / Math.max(t1 - t0, 1)},` +
      `${H - pad - (H - 2 * pad) * h[k] / max}`).join(" ");
    const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    line.setAttribute("points", pts); line.setAttribute("fill", "none");
    line.setAttribute("stroke", color); line.setAttribute("stroke-width", "2");
    svg.append(line);
  }
  const label = document.createElementNS("http://www.w3.org/2000/svg", "text");
  label.setAttribute("x", 6); label.setAttribute("y", 14); label.setAttribute("font-size", 11);
  label.textContent = fixedMax ? "100%" : String(max); svg.append(label);
}

async function loadFailures() {
  const d = await api("/api/failures");
  $("#failures-note").textContent = d.scanned < d.total_failed ?
    `(newest ${d.scanned} of ${d.total_failed} failed tasks)` : `(${d.total_failed} failed tasks)`;
  const body = $("#failures tbody"); body.replaceChildren();
  for (const g of d.groups) {
    body.append(el("tr", {class: "failure-group"}, el("td", {}, g.reason || "(no reason)"),
      el("td", {class: "num"}, g.count), el("td", {}, g.jobs.join(", ")),
      el("td", {}, g.examples.join(", ")),
      el("td", {}, el("button", {class: "retry", onclick: () => retryGroup(g.reason)}, "retry all"))));
  }
}
async function retryGroup(reason) {
  const d = await api("/api/failures/retry?reason=" + encodeURIComponent(reason), {method: "POST"});
  $("#failures-note").textContent = `(${d.requeued} tasks requeued)`;
  setTimeout(loadFailures, 300); loadTasks(cursorStack[cursorStack.length - 1]);
}
async function cancelJob(jid) {
  if (!confirm(`Cancel every unfinished task of job ${jid}?`)) return;
  await api(`/api/jobs/${jid}/cancel`, {method: "POST"});
}

let cursorStack = [""], nextCursor = null;
function filterQuery() {
  const f = new FormData($("#task-filter")); const q = new URLSearchParams();
  for (const [k, v] of f.entries()) if (v) q.set(k, v);
  return q;
}
async function loadTasks(cursor) {
  const q = filterQuery(); if (cursor) q.set("cursor", cursor); q.set("limit", "50");
  let d;
  try { d = await api("/api/tasks?" + q); } catch (e) { $("#tasks-note").textContent = e.message; return; }
  const body = $("#tasks tbody"); body.replaceChildren();
  for (const t of d.tasks) {
    body.append(el("tr", {"data-task": t.id, onclick: () => showTask(t.id)}, el("td", {}, t.id),
      el("td", {class: "state-" + t.state}, t.state), el("td", {}, (t.name || t.cmd).slice(0, 80)),
      el("td", {class: "num"}, t.attempt), el("td", {}, t.signal || (t.exit_code ?? "-")),
      el("td", {class: "num"}, t.wall === null ? "-" : t.wall.toFixed(2) + "s"),
      el("td", {}, fmtSize(t.peak_rss)), el("td", {}, t.host), el("td", {}, (t.reason || "").slice(0, 60))));
  }
  nextCursor = d.next; $("#next-page").disabled = !d.next;
  const notes = d.indexed ? [] : [`looked at ${d.scanned} tasks`];
  if (d.trimmed) notes.push(`${d.trimmed} finished tasks are no longer in Redis (history trimming` +
    (d.archives.length ? `; archived to ${d.archives.join(", ")})` : "; expired)"));
  $("#tasks-note").textContent = notes.join(" · ");
}
async function showTask(tid) {
  let d;
  $("#detail").hidden = false; $("#detail-id").textContent = tid;
  try { d = await api("/api/tasks/" + encodeURIComponent(tid)); } catch (e) {
    // e.g. a task history trimming archived: the message says where its record went
    $("#detail-body").replaceChildren(el("p", {class: "error"}, e.message));
    return;
  }
  const t = d.task, rec = d.record;
  const facts = el("table", {},
    ...[["state", t.state], ["command", t.cmd], ["attempts", t.attempt], ["host", t.host],
        ["exit", t.signal || (t.exit_code ?? "-")], ["wall", t.wall === null ? "-" : t.wall + " s"],
        ["peak memory", fmtSize(t.peak_rss)], ["memory requirement", fmtSize(t.mem) + " (declared " + fmtSize(t.declared_mem) + ")"],
        ["reason", t.reason], ["started", rec.started_wall ? new Date(rec.started_wall * 1000).toISOString() : "-"],
        ["finished", rec.finished_at ? new Date(Number(rec.finished_at)).toISOString() : "-"]]
      .map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, v))));
  const hist = el("table", {}, el("tr", {}, el("th", {}, "when"), el("th", {}, "event"), el("th", {}, "details")),
    ...d.history.map((e) => el("tr", {}, el("td", {}, new Date(Number(e.id.split("-")[0])).toISOString()),
      el("td", {}, e.type), el("td", {}, Object.entries(e).filter(([k]) => !["id", "type", "task"].includes(k))
        .map(([k, v]) => `${k}=${v}`).join(" ")))));
  $("#detail-body").replaceChildren(facts,
    el("h3", {}, "attempts and transitions (recent event stream)"), hist,
    el("h3", {}, "stdout" + (d.logs.out.complete ? "" : " (tail)")), el("pre", {id: "log-out"}, d.logs.out.text || "(empty)"),
    el("h3", {}, "stderr" + (d.logs.err.complete ? "" : " (tail)")), el("pre", {id: "log-err"}, d.logs.err.text || "(empty)"),
    el("h3", {}, "spec"), el("pre", {}, JSON.stringify(d.spec, null, 2)));
  $("#detail").scrollIntoView();
}

$("#task-filter").onsubmit = (e) => { e.preventDefault(); cursorStack = [""]; loadTasks(""); };
$("#next-page").onclick = () => { cursorStack.push(nextCursor); loadTasks(nextCursor); };
$("#first-page").onclick = () => { cursorStack = [""]; loadTasks(""); };
$("#detail-close").onclick = () => { $("#detail").hidden = true; };

function connect() {
  const es = new EventSource("/api/stream");
  let n = 0;
  es.addEventListener("overview", (ev) => {
    $("#live").textContent = "live"; $("#live").className = "badge on";
    renderOverview(JSON.parse(ev.data));
    if (n++ % 3 === 0) loadFailures();
  });
  es.onerror = () => { $("#live").textContent = "reconnecting"; $("#live").className = "badge"; };
}
const params = new URLSearchParams(location.search);
if (params.get("task")) showTask(params.get("task"));
connect(); loadTasks(""); loadFailures();
