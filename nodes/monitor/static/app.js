// armpipe monitor page: everything arrives by server-sent events from /events (no polling);
// buttons POST to /api/... and show the server's answer in #message.
"use strict";

const state = {
  config: null,
  actions: [],        // executed ticks {t, values, hold, hold_reason, queue_depth, ...}
  states: [],         // {t, arm, names, values}
  gt: [],             // ground truth {t, values}
  latency: [],        // latency events {t, tick, first_row, end_to_end_s, stages}
  chunks: [],         // chunk events {t, obs_t, round_trip_s, timings, queue_depth, chunk?}
  lastChunk: null,
  serverNow: 0,       // robot monotonic clock (s) at lastLocal
  lastLocal: 0,
  dirty: true,
};

const $ = (selector) => document.querySelector(selector);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) node.append(child);
  return node;
}

function fmt(value, digits = 1, unit = "") {
  return value === null || value === undefined || Number.isNaN(value) ? "—" : `${Number(value).toFixed(digits)}${unit}`;
}

function now() {
  return state.serverNow + (performance.now() - state.lastLocal) / 1000;
}

function setNow(serverNow) {
  if (typeof serverNow === "number") {
    state.serverNow = serverNow;
    state.lastLocal = performance.now();
  }
}

// ------------------------------------------------------------------ page set-up from the config
function setup(config) {
  state.config = config;
  $("#task").textContent = `${config.task} · ${config.fps} fps`;
  const cameras = $("#cameras");
  cameras.replaceChildren();
  for (const name of config.cameras) {
    cameras.append(el("figure", { class: "camera", id: `camera-${name}` },
      el("img", { alt: `camera ${name}`, "data-seq": "-1" }),
      el("figcaption", {}, el("b", {}, name), " ", el("span", { class: "info" }, "waiting for frames…"))));
  }
  const joints = $("#joints");
  joints.replaceChildren();
  config.action_names.forEach((name, index) => {
    joints.append(el("div", { class: "joint" }, el("div", { class: "name" }, name),
      el("canvas", { width: 300, height: 90, "data-index": String(index) })));
  });
}

// ------------------------------------------------------------------ event handlers
function onSnapshot(snapshot) {
  setup(snapshot.config);
  state.actions = snapshot.series.action;
  state.states = snapshot.series.state;
  state.gt = snapshot.series.gt;
  state.chunks = snapshot.chunks;
  state.latency = snapshot.latency || [];
  showLatency();
  setNow(snapshot.series.now);
  snapshot.frames.forEach(onFrame);
  if (snapshot.loop_stats) onLoopStats(snapshot.loop_stats);
  if (snapshot.episode) onEpisode(snapshot.episode);
  if (snapshot.player) onPlayer(snapshot.player);
  onNodes(snapshot.nodes);
  showContract(snapshot.contract);
  $("#log").replaceChildren();
  snapshot.log.forEach(onLog);
  state.dirty = true;
}

function onFrame(frame) {
  const figure = document.getElementById(`camera-${frame.camera}`);
  if (!figure) return;
  const img = figure.querySelector("img");
  img.src = `data:image/jpeg;base64,${frame.jpeg}`;
  img.dataset.seq = String(frame.seq);
  const stats = frame.stats || {};
  const source = frame.source === "dataset" ? ` · replay ep ${frame.episode_index} frame ${frame.frame_index}` : "";
  figure.querySelector(".info").textContent =
    `#${frame.seq} · ${frame.width}×${frame.height} · age ${fmt(frame.age_s * 1000, 0, " ms")}` +
    (stats.fps !== undefined && stats.fps !== null ? ` · ${fmt(stats.fps, 1)} fps` : "") +
    (stats.dropped ? ` · dropped ${stats.dropped}` : "") + source;
}

function trim(list, horizon) {
  let drop = 0;
  while (drop < list.length && list[drop].t < horizon) drop++;
  if (drop) list.splice(0, drop);
}

function onSeries(batch) {
  setNow(batch.now);
  state.actions.push(...batch.action);
  state.states.push(...batch.state);
  state.gt.push(...batch.gt);
  const horizon = now() - (state.config ? state.config.history_s : 30);
  for (const list of [state.actions, state.states, state.gt, state.chunks]) trim(list, horizon);
  const last = batch.action[batch.action.length - 1];
  if (last) $("#queue-latest").textContent = `${last.queue_depth} rows`;
  state.dirty = true;
}

// Capture -> goal written over the last goals (docs/protocol.md, section 8), and the three largest stages.
function onLatency(sample) {
  state.latency.push(sample);
  if (state.latency.length > 300) state.latency.shift();
  showLatency();
}

function showLatency() {
  const samples = state.latency.filter((s) => s.end_to_end_s !== null);
  if (!samples.length) return;
  const sorted = samples.map((s) => s.end_to_end_s * 1000).sort((a, b) => a - b);
  const at = (p) => sorted[Math.min(sorted.length - 1, Math.floor(p * sorted.length))];
  const means = {};
  for (const s of samples) {
    for (const [name, value] of Object.entries(s.stages || {})) {
      if (value !== null) means[name] = (means[name] || 0) + (value * 1000) / samples.length;
    }
  }
  const largest = Object.entries(means).sort((a, b) => b[1] - a[1]).slice(0, 3)
    .map(([name, value]) => `${name} ${fmt(value, 1, " ms")}`).join(", ");
  $("#latency-latest").textContent = `p50 ${fmt(at(0.5), 1, " ms")} · p99 ${fmt(at(0.99), 1, " ms")} ` +
    `over ${samples.length} goals · mean ${largest}`;
}

function onChunk(chunk) {
  state.lastChunk = chunk;
  state.chunks.push(chunk);
  const timings = chunk.timings || {};
  $("#timing-latest").textContent = `round trip ${fmt(chunk.round_trip_s * 1000, 1, " ms")} · inference ` +
    `${fmt((timings.inference_s ?? timings.total_s) * 1000, 1, " ms")} · ${chunk.rows} rows` +
    (chunk.dropped_stale ? `, ${chunk.dropped_stale} stale dropped` : "");
  state.dirty = true;
}

function onLoopStats(stats) {
  $("#actuator-state").textContent = stats.state ?? "?";
  const rows = [
    ["state", stats.state], ["ticks", stats.ticks], ["queue depth", stats.queue_depth],
    ["lateness p50", fmt(stats.lateness_p50_s * 1000, 2, " ms")],
    ["lateness p99", fmt(stats.lateness_p99_s * 1000, 2, " ms")],
    ["contract", stats.contract_ok ? "ok" : "NOT ok"],
    // Refusals of what a peer said (issue 16): counted by the actuator since it started.
    ["policy errors", stats.policy_errors], ["clamped rows", stats.clamped_rows],
    ["future stamps refused", stats.refused_future], ["bad inputs", stats.bad_inputs],
    ["reconnects", stats.reconnects],
  ];
  $("#loop-stats").replaceChildren(...rows.flatMap(([key, value]) => [el("dt", {}, key), el("dd", {}, String(value ?? "—"))]));
  const holds = Object.entries(stats.holds || {}).sort((a, b) => b[1] - a[1]);
  $("#holds tbody").replaceChildren(...holds.map(([reason, count]) =>
    el("tr", { "data-reason": reason }, el("td", {}, reason), el("td", {}, String(count)))));
  if (stats.contract_ok !== undefined) showContract({ ok: stats.contract_ok, differences: [] });
}

function showContract(contract) {
  const node = $("#contract");
  node.textContent = contract.ok === null || contract.ok === undefined ? "?" : contract.ok ? "ok" : "MISMATCH";
  node.className = contract.ok === false ? "error" : "";
  if (contract.differences && contract.differences.length) node.title = contract.differences.join("\n");
}

function onEpisode(episode) {
  const label = episode.label ? ` (${episode.label})` : "";
  const what = { episode_start: "running", episode_stop: "stopped", episode_label: "labelled" }[episode.event] || episode.event;
  $("#episode").textContent = `${episode.episode_index} ${what}${label}`;
}

function onPlayer(player) {
  $("#player").textContent = `episode ${player.episode_index} ${player.event === "episode_end" ? "ended" : "playing"}` +
    (player.frames ? ` (${player.frames} frames)` : "");
}

function onNodes(nodes) {
  $("#nodes-error").textContent = nodes.error || "";
  const rows = nodes.programs.flatMap((program) => {
    const ready = program.ready === null || program.ready === undefined ? "—" : program.ready ? "yes" : "no";
    // policy.standby: which of the two policy processes holds the endpoint (the readiness file says).
    const role = program.ready && program.role ? ` (${program.role})` : "";
    // No button for the monitor itself: it cannot stop and then start its own process.
    const button = program.self ? "this page" : el("button", { type: "button", class: "restart",
      title: `restart ${program.name}` }, "restart");
    if (!program.self) {
      button.addEventListener("click", () => command(`/api/nodes/${encodeURIComponent(program.name)}/restart`, {}, button));
    }
    const row = el("tr", { "data-node": program.name, title: program.description },
      el("td", {}, program.name), el("td", { class: `state state-${program.state}` }, program.state),
      el("td", { class: "pid" }, program.pid ? String(program.pid) : "—"),
      el("td", {}, program.pid ? fmt(program.uptime_s, 0, " s") : "—"),
      el("td", { class: `ready ready-${ready}`, "data-role": program.role || "" }, ready + role),
      el("td", {}, button));
    if (!program.reason) return [row];
    // Why it is down, under its row: a refusal (exit 2, stays down until the config, checkpoint or dataset
    // is fixed) or, after a crash, the last error line of its log.
    const why = program.refused ? "refused" : "last error in its log";
    return [row, el("tr", { "data-why": program.name, class: program.refused ? "why refused" : "why crashed" },
      el("td", { colSpan: 6 }, `${why}: ${program.reason}`))];
  });
  for (const node of nodes.unsupervised || []) {
    rows.push(el("tr", { "data-node": node.name, title: "ready file without a supervisord program" },
      el("td", {}, node.name), el("td", {}, node.alive ? "running (unsupervised)" : "gone (stale ready file)"),
      el("td", { class: "pid" }, String(node.pid ?? "—")), el("td", {}, "—"),
      el("td", { class: node.alive ? "ready-yes" : "ready-no" }, node.alive ? "yes" : "no"), el("td", {})));
  }
  $("#nodes tbody").replaceChildren(...rows);
}

function onLog(entry) {
  const time = new Date(entry.wall * 1000).toLocaleTimeString();
  const list = $("#log");
  list.prepend(el("li", { class: entry.level }, el("time", {}, time), entry.text));
  while (list.children.length > 100) list.lastChild.remove();
}

// ------------------------------------------------------------------ commands
async function command(path, body, button) {
  const message = $("#message");
  if (button) button.disabled = true;
  message.className = "";
  message.textContent = "…";
  try {
    const response = await fetch(path, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    let reply;
    try {
      reply = await response.json();
    } catch {
      reply = { ok: false, message: `HTTP ${response.status} without a JSON answer` };
    }
    message.className = reply.ok ? "ok" : "error";
    message.textContent = reply.message || (reply.ok ? "done" : `failed (HTTP ${response.status})`);
  } catch (error) {
    message.className = "error";
    message.textContent = `monitor unreachable: ${error}`;
  } finally {
    if (button) button.disabled = false;
  }
}

$("#btn-start").addEventListener("click", (e) => command("/api/episode/start", {}, e.currentTarget));
$("#btn-stop-success").addEventListener("click", (e) => command("/api/episode/stop", { label: "success" }, e.currentTarget));
$("#btn-stop-failure").addEventListener("click", (e) => command("/api/episode/stop", { label: "failure" }, e.currentTarget));

// ------------------------------------------------------------------ drawing
function line(ctx, points, colour, { dash = [], width = 1.2 } = {}) {
  if (points.length < 2) return;
  ctx.strokeStyle = colour;
  ctx.lineWidth = width;
  ctx.setLineDash(dash);
  ctx.beginPath();
  // A missing value (null: the sender had no finite number, e.g. a hold before any position was known)
  // breaks the line instead of being drawn as zero.
  let drawing = false;
  for (const [x, y] of points) {
    if (!Number.isFinite(y)) {
      drawing = false;
      continue;
    }
    if (drawing) ctx.lineTo(x, y);
    else ctx.moveTo(x, y);
    drawing = true;
  }
  ctx.stroke();
  ctx.setLineDash([]);
}

function range(values, fallback) {
  let lo = Infinity;
  let hi = -Infinity;
  for (const v of values) {
    if (v === null || v === undefined || !Number.isFinite(v)) continue;
    lo = Math.min(lo, v);
    hi = Math.max(hi, v);
  }
  if (lo === Infinity) return fallback;
  const pad = Math.max(1e-3, (hi - lo) * 0.1);
  return [lo - pad, hi + pad];
}

function axes(ctx, canvas, lo, hi, unit) {
  ctx.fillStyle = "#8b95a3";
  ctx.font = "10px system-ui";
  ctx.fillText(`${fmt(hi, 1)}${unit}`, 2, 10);
  ctx.fillText(`${fmt(lo, 1)}${unit}`, 2, canvas.height - 3);
}

function cssVar(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
}

// Ticks that held during an episode (not the holds between episodes), as red bands.
function shadeHolds(ctx, canvas, x, t0, colour) {
  const config = state.config;
  const tickWidth = Math.max(1, canvas.width / (Math.min(config.history_s, 20) * config.fps));
  ctx.fillStyle = colour;
  for (const s of state.actions) {
    if (s.hold && s.episode_index >= 0 && s.t >= t0) ctx.fillRect(x(s.t), 0, tickWidth, canvas.height);
  }
}

function timeAxis(ctx, canvas, span) {
  ctx.fillStyle = "#8b95a3";
  ctx.font = "10px system-ui";
  ctx.fillText(`-${span.toFixed(0)} s`, 70, canvas.height - 3);
  ctx.fillText("now", canvas.width - 22, canvas.height - 3);
}

function drawJoints() {
  const config = state.config;
  if (!config) return;
  const t1 = now();
  const t0 = t1 - Math.min(config.history_s, 20);
  const colours = { state: cssVar("--state"), action: cssVar("--action"), gt: cssVar("--gt"), chunk: cssVar("--chunk"),
    hold: cssVar("--hold") };
  const names = config.action_names;
  // State samples come per arm: map each to the joint's index in the action vector.
  const stateByJoint = names.map(() => []);
  for (const sample of state.states) {
    (sample.names || []).forEach((name, i) => {
      const index = names.indexOf(name);
      if (index >= 0) stateByJoint[index].push([sample.t, sample.values[i]]);
    });
  }
  const chunk = state.lastChunk;
  document.querySelectorAll("#joints canvas").forEach((canvas) => {
    const index = Number(canvas.dataset.index);
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    const x = (t) => ((t - t0) / (t1 - t0)) * canvas.width;
    const acts = state.actions.filter((s) => s.t >= t0).map((s) => [s.t, s.values[index]]);
    const gts = state.gt.filter((s) => s.t >= t0).map((s) => [s.t, s.values[index]]);
    const sts = stateByJoint[index].filter(([t]) => t >= t0);
    const predicted = chunk && chunk.chunk && chunk.obs_t !== null
      ? chunk.chunk.map((row, k) => [chunk.obs_t + k / config.fps, row[index]]) : [];
    const [lo, hi] = range([...acts, ...gts, ...sts, ...predicted].map(([, v]) => v),
      [config.lower_limits[index], config.upper_limits[index]]);
    const y = (v) => (v === null || v === undefined ? NaN : canvas.height - ((v - lo) / (hi - lo)) * canvas.height);
    shadeHolds(ctx, canvas, x, t0, colours.hold);
    line(ctx, sts.map(([t, v]) => [x(t), y(v)]), colours.state);
    line(ctx, gts.map(([t, v]) => [x(t), y(v)]), colours.gt, { dash: [4, 3] });
    line(ctx, acts.map(([t, v]) => [x(t), y(v)]), colours.action);
    line(ctx, predicted.map(([t, v]) => [x(t), y(v)]), colours.chunk, { dash: [2, 2] });
    axes(ctx, canvas, lo, hi, "");
    timeAxis(ctx, canvas, t1 - t0);
  });
}

function drawTiming() {
  const config = state.config;
  if (!config) return;
  const t1 = now();
  const t0 = t1 - Math.min(config.history_s, 20);
  const canvas = $("#timing-chart");
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const chunks = state.chunks.filter((c) => c.t >= t0);
  const rt = chunks.map((c) => [c.t, c.round_trip_s * 1000]);
  const inf = chunks.map((c) => [c.t, ((c.timings || {}).inference_s ?? (c.timings || {}).total_s) * 1000]);
  const [, hi] = range([...rt, ...inf].map(([, v]) => v), [0, 100]);
  const x = (t) => ((t - t0) / (t1 - t0)) * canvas.width;
  const y = (v) => canvas.height - (v / hi) * canvas.height;
  line(ctx, rt.map(([t, v]) => [x(t), y(v)]), cssVar("--action"), { width: 1.5 });
  line(ctx, inf.map(([t, v]) => [x(t), y(v)]), cssVar("--chunk"), { width: 1.5 });
  ctx.fillStyle = cssVar("--action");
  for (const [t, v] of rt) ctx.fillRect(x(t) - 2, y(v) - 2, 4, 4);
  ctx.fillStyle = cssVar("--chunk");
  for (const [t, v] of inf) ctx.fillRect(x(t) - 2, y(v) - 2, 4, 4);
  axes(ctx, canvas, 0, hi, " ms");
  timeAxis(ctx, canvas, t1 - t0);
  ctx.fillText("orange: round trip · purple: inference", canvas.width - 210, 10);

  const queueCanvas = $("#queue-chart");
  const qctx = queueCanvas.getContext("2d");
  qctx.clearRect(0, 0, queueCanvas.width, queueCanvas.height);
  const depth = state.actions.filter((s) => s.t >= t0 && s.queue_depth !== null).map((s) => [s.t, s.queue_depth]);
  const [, qhi] = range(depth.map(([, v]) => v), [0, 10]);
  const qy = (v) => queueCanvas.height - (v / Math.max(qhi, 1)) * queueCanvas.height;
  shadeHolds(qctx, queueCanvas, x, t0, cssVar("--hold"));
  line(qctx, depth.map(([t, v]) => [x(t), qy(v)]), cssVar("--state"), { width: 1.5 });
  axes(qctx, queueCanvas, 0, Math.max(qhi, 1), " rows");
  timeAxis(qctx, queueCanvas, t1 - t0);
}

function frameLoop() {
  // Redraw at most 10 times a second, and only while something changed or time moves the window.
  if (state.config && (state.dirty || state.actions.length)) {
    drawJoints();
    drawTiming();
    state.dirty = false;
  }
  setTimeout(() => requestAnimationFrame(frameLoop), 100);
}

// ------------------------------------------------------------------ connection
function connect() {
  const source = new EventSource("/events");
  const badge = $("#connection");
  source.onopen = () => { badge.textContent = "live"; badge.className = "badge ok"; };
  source.onerror = () => { badge.textContent = "reconnecting…"; badge.className = "badge bad"; };
  const handlers = {
    snapshot: onSnapshot, frame: onFrame, series: onSeries, chunk: onChunk, latency: onLatency, loop_stats: onLoopStats,
    episode: onEpisode, player: onPlayer, nodes: onNodes, log: onLog,
  };
  for (const [event, handler] of Object.entries(handlers)) {
    source.addEventListener(event, (message) => {
      try {
        handler(JSON.parse(message.data));
      } catch (error) {
        console.error(`bad ${event} event`, error);
      }
    });
  }
}

connect();
frameLoop();
