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
  capacity: null,     // the policy node's capacity figures (its ping reply), or why they are missing
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

// An uptime as short as it can be said: 45 s, 12 min, 3.5 h, 2.1 d.
function duration(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  if (seconds < 120) return `${Math.round(seconds)} s`;
  if (seconds < 7200) return `${Math.round(seconds / 60)} min`;
  if (seconds < 172800) return `${(seconds / 3600).toFixed(1)} h`;
  return `${(seconds / 86400).toFixed(1)} d`;
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
    const img = el("img", { alt: `camera ${name}`, "data-seq": "-1" });
    const size = (config.camera_sizes || {})[name];
    if (size) img.style.aspectRatio = `${size[0]} / ${size[1]}`;  // the tile is the picture's shape
    cameras.append(el("figure", { class: "camera", id: `camera-${name}` }, img,
      el("figcaption", {}, el("b", {}, name), " ", el("span", { class: "info" }, "waiting for frames…"))));
  }
  const joints = $("#joints");
  joints.replaceChildren();
  config.action_names.forEach((name, index) => {
    joints.append(el("div", { class: "joint" }, el("div", { class: "name" }, name),
      el("canvas", { "data-index": String(index) })));
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
  if (snapshot.capacity) onCapacity(snapshot.capacity);
  showContract(snapshot.contract);
  if (snapshot.instruction) onInstruction(snapshot.instruction);
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
  const source = frame.source === "dataset" && frame.frame_index !== null && frame.frame_index !== undefined
    ? ` · replay ep ${frame.episode_index} frame ${frame.frame_index}` : "";
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
  state.dirty = true;
}

function showLatency() {
  const samples = state.latency.filter((s) => s.end_to_end_s !== null);
  if (!samples.length) {
    $("#latency-latest").textContent = "no goal written yet (holding, or a dry run writes none)";
    return;
  }
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

// The policy node's capacity over its last period (its ping reply, asked by the monitor every 2 s): how busy the
// GPU server is with every robot it serves, and this robot's own share (its last chunk's batch and queue wait).
function onCapacity(capacity) {
  state.capacity = capacity;
  showCapacity();
}

function showCapacity() {
  const capacity = state.capacity;
  if (!capacity) return;
  const figures = capacity.figures || {};
  const note = $("#capacity-note");
  note.textContent = capacity.error || (figures.period_s ? `over its last ${fmt(figures.period_s, 0, " s")}`
    : "no period finished yet");
  note.className = capacity.error ? "error" : "";
  const chunk = state.lastChunk;
  const timings = (chunk && chunk.timings) || {};
  const served = Boolean(figures.chunks);
  const rows = [
    ["chunks/s", fmt(figures.chunks_per_s, 1)],
    ["sessions served", figures.sessions ?? "—"],
    ["batch size", served ? `mean ${fmt(figures.batch_mean, 1)} · max ${figures.batch_max} of ${figures.max_batch}`
      : `— (at most ${figures.max_batch ?? "?"})`],
    ["queue wait", served ? `p50 ${fmt(figures.queue_ms_p50, 1, " ms")} · p99 ${fmt(figures.queue_ms_p99, 1, " ms")}` : "—"],
    ["server time", served ? `p50 ${fmt(figures.total_ms_p50, 1, " ms")} · max ${fmt(figures.total_ms_max, 1, " ms")}` : "—"],
    ["superseded · busy · failed", capacity.figures
      ? `${figures.superseded ?? 0} · ${figures.refused_busy ?? 0} · ${figures.failed ?? 0}` : "—"],
    ["this robot's last chunk", chunk
      ? `batch ${chunk.batch ?? 1} · queue wait ${fmt(timings.queue_s === undefined ? null : timings.queue_s * 1000, 1, " ms")}`
      : "—"],
  ];
  $("#capacity").replaceChildren(...rows.flatMap(([key, value]) => [
    el("dt", {}, key), el("dd", { "data-key": key }, String(value))]));
}

function onChunk(chunk) {
  state.lastChunk = chunk;
  state.chunks.push(chunk);
  const timings = chunk.timings || {};
  $("#timing-latest").textContent = `round trip ${fmt(chunk.round_trip_s * 1000, 1, " ms")} · inference ` +
    `${fmt((timings.inference_s ?? timings.total_s) * 1000, 1, " ms")} · ${chunk.rows} rows` +
    (chunk.dropped_stale ? `, ${chunk.dropped_stale} stale dropped` : "");
  showCapacity();
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

// The task instruction a language policy gets; changed between episodes from the form (the actuator refuses
// a change during an episode, and the page says so).
function onInstruction(instruction) {
  if (instruction.text === null || instruction.text === undefined) return;
  const node = $("#instruction-now");
  node.textContent = instruction.text === "" ? "none" : `“${instruction.text}”`;
  node.title = instruction.source === "dataset" ? "the dataset player's task (actuator.instruction_source: dataset)"
    : "the task a language policy gets";
  const input = $("#instruction");
  if (document.activeElement !== input && !input.value) input.placeholder = instruction.text || "instruction for the next episode";
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
    const button = program.self ? el("span", { class: "self" }, "this page") : el("button", { type: "button", class: "restart",
      title: `restart ${program.name}` }, "restart");
    if (!program.self) {
      button.addEventListener("click", () => command(`/api/nodes/${encodeURIComponent(program.name)}/restart`, {}, button));
    }
    // A node that runs but refuses its work (the actuator on a contract or units mismatch: its readiness
    // file's "refusing") reads as plainly as one that refused to run: REFUSES, and the reason under it.
    const refusing = program.refusing || "";
    const readyText = refusing ? "REFUSES" : ready + role;
    const readyClass = refusing ? "ready-refuses" : `ready-${ready}`;
    const row = el("tr", { "data-node": program.name, title: program.description },
      el("td", { class: "program" }, program.name), el("td", { class: `state state-${program.state}` }, program.state),
      el("td", { class: "pid" }, program.pid ? String(program.pid) : "—"),
      el("td", {}, program.pid ? duration(program.uptime_s) : "—"),
      el("td", { class: `ready ${readyClass}`, "data-role": program.role || "" }, readyText),
      el("td", {}, button));
    if (refusing) {
      return [row, el("tr", { "data-why": program.name, class: "why refused" },
        el("td", { colSpan: 6 }, refusing.startsWith("refuses") ? refusing : `refuses: ${refusing}`))];
    }
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
$("#instruction-form").addEventListener("submit", (e) => {
  e.preventDefault();
  command("/api/episode/instruction", { text: $("#instruction").value }, $("#btn-instruction"));
});
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

// A canvas drawn at its displayed size (times the screen's pixel ratio): crisp lines and readable text
// whatever the column's width. Returns the context in CSS pixels and the size to draw in.
function fit(canvas) {
  const ratio = window.devicePixelRatio || 1;
  const width = Math.max(1, canvas.clientWidth);
  const height = Math.max(1, canvas.clientHeight);
  if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  return { ctx, w: width, h: height };
}

const GUTTER = 34; // left margin of the timing charts: their axis labels, never under the hold shading

// A label on a dark box, so it stays readable over lines and hold bands.
function label(ctx, text, x, y, colour = "#c5ccd6") {
  ctx.font = "11px system-ui";
  const width = ctx.measureText(text).width;
  ctx.fillStyle = "rgba(17, 20, 25, 0.85)";
  ctx.fillRect(x - 2, y - 10, width + 4, 13);
  ctx.fillStyle = colour;
  ctx.fillText(text, x, y);
}

function axes(ctx, h, lo, hi, unit) {
  label(ctx, `${fmt(hi, 1)}${unit}`, 3, 12);
  label(ctx, `${fmt(lo, 1)}${unit}`, 3, h - 4);
}

// Round steps (1, 2, 5 x 10^k) from 0 to at least hi; integers only where the quantity is a count.
function ticks(hi, { integer = false, count = 4 } = {}) {
  const raw = Math.max(hi, integer ? 1 : 1e-9) / count;
  const power = 10 ** Math.floor(Math.log10(raw));
  let step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw);
  if (integer) step = Math.max(1, Math.ceil(step));
  const top = Math.ceil(hi / step) * step || step;
  const values = [];
  for (let v = 0; v <= top + step / 2; v += step) values.push(Number(v.toFixed(6)));
  return values;
}

// Horizontal grid lines with their labels in the left gutter; returns the top of the scale.
function gridY(ctx, w, h, values, unit, y) {
  ctx.strokeStyle = "#262c35";
  ctx.lineWidth = 1;
  for (const v of values) {
    const yy = Math.round(y(v)) + 0.5;
    ctx.beginPath();
    ctx.moveTo(GUTTER, yy);
    ctx.lineTo(w, yy);
    ctx.stroke();
    ctx.font = "11px system-ui";
    ctx.fillStyle = "#aab3bf";
    const text = `${v}${unit}`;
    ctx.fillText(text, GUTTER - 4 - ctx.measureText(text).width, Math.min(h - 2, Math.max(10, yy + 4)));
  }
}

function cssVar(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
}

// Ticks that held during an episode (not the holds between episodes), as red bands from ``left`` on.
function shadeHolds(ctx, w, h, x, t0, colour, left = 0) {
  const config = state.config;
  const tickWidth = Math.max(1, (w - left) / (Math.min(config.history_s, 20) * config.fps)) + 0.5;
  ctx.fillStyle = colour;
  let start = null;
  let end = null;
  const flush = () => {
    if (start !== null) ctx.fillRect(Math.max(left, start), 0, Math.max(0, end - Math.max(left, start)), h);
    start = null;
  };
  // Neighbouring held ticks make one band (no darker stripes where translucent rectangles overlap).
  for (const s of state.actions) {
    if (!(s.hold && s.episode_index >= 0 && s.t >= t0)) {
      flush();
      continue;
    }
    const xs = x(s.t);
    if (start === null) start = xs;
    else if (xs > end + tickWidth) {
      flush();
      start = xs;
    }
    end = xs + tickWidth;
  }
  flush();
}

function timeAxis(ctx, w, h, span, left = 0) {
  ctx.font = "11px system-ui";
  ctx.fillStyle = "#8b95a3";
  ctx.fillText(`-${span.toFixed(0)} s`, left + 4, h - 4);
  ctx.fillText("now", w - 24, h - 4);
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
    const { ctx, w, h } = fit(canvas);
    const x = (t) => ((t - t0) / (t1 - t0)) * w;
    // A held tick commands no new target (the arm stays; the hold position is not an action the policy
    // chose): the executed line breaks there, so it is never drawn over the state as if the arm followed.
    const acts = state.actions.filter((s) => s.t >= t0).map((s) => [s.t, s.hold ? null : s.values[index]]);
    const gts = state.gt.filter((s) => s.t >= t0).map((s) => [s.t, s.values[index]]);
    const sts = stateByJoint[index].filter(([t]) => t >= t0);
    const predicted = chunk && chunk.chunk && chunk.obs_t !== null
      ? chunk.chunk.map((row, k) => [chunk.obs_t + k / config.fps, row[index]]) : [];
    const [lo, hi] = range([...acts, ...gts, ...sts, ...predicted].map(([, v]) => v),
      [config.lower_limits[index], config.upper_limits[index]]);
    const y = (v) => (v === null || v === undefined ? NaN : h - ((v - lo) / (hi - lo)) * h);
    shadeHolds(ctx, w, h, x, t0, colours.hold);
    line(ctx, sts.map(([t, v]) => [x(t), y(v)]), colours.state);
    line(ctx, gts.map(([t, v]) => [x(t), y(v)]), colours.gt, { dash: [4, 3] });
    line(ctx, acts.map(([t, v]) => [x(t), y(v)]), colours.action);
    line(ctx, predicted.map(([t, v]) => [x(t), y(v)]), colours.chunk, { dash: [2, 2] });
    axes(ctx, h, lo, hi, "");
    timeAxis(ctx, w, h, t1 - t0, 48);
  });
}

// A time series with round-number grid lines: points joined by a line, each marked (a slow policy sends
// few chunks: one or two points still show).
function series(ctx, points, colour, x, y) {
  line(ctx, points.map(([t, v]) => [x(t), y(v)]), colour, { width: 1.5 });
  ctx.fillStyle = colour;
  for (const [t, v] of points) if (Number.isFinite(v)) ctx.fillRect(x(t) - 2.5, y(v) - 2.5, 5, 5);
}

function emptyNote(ctx, w, h, text) {
  ctx.font = "12px system-ui";
  ctx.fillStyle = "#8b95a3";
  ctx.fillText(text, GUTTER + 8, h / 2);
}

function drawTiming() {
  const config = state.config;
  if (!config) return;
  const t1 = now();
  const span = Math.min(config.history_s, 20);
  const t0 = t1 - span;
  const x = (w) => (t) => GUTTER + ((t - t0) / (t1 - t0)) * (w - GUTTER);

  // Policy timing per chunk. A slow (CPU) policy sends a chunk every few seconds: the chart keeps the whole
  // history (history_s), not only the joints' 20 s, so its line has points to join.
  {
    const canvas = $("#timing-chart");
    const { ctx, w, h } = fit(canvas);
    const tStart = t1 - config.history_s;
    const xs = (t) => GUTTER + ((t - tStart) / (t1 - tStart)) * (w - GUTTER);
    const chunks = state.chunks.filter((c) => c.t >= tStart);
    const rt = chunks.map((c) => [c.t, c.round_trip_s === null ? NaN : c.round_trip_s * 1000]);
    const inf = chunks.map((c) => {
      const timings = c.timings || {};
      const value = timings.inference_s ?? timings.total_s;
      return [c.t, value === null || value === undefined ? NaN : value * 1000];
    });
    const [, top] = range([...rt, ...inf].map(([, v]) => v), [0, 100]);
    const grid = ticks(top);
    const hi = grid[grid.length - 1];
    const y = (v) => h - 14 - (v / hi) * (h - 24);
    gridY(ctx, w, h, grid, "", y);
    series(ctx, rt, cssVar("--action"), xs, y);
    series(ctx, inf, cssVar("--chunk"), xs, y);
    if (!chunks.length) emptyNote(ctx, w, h, "no chunk in the last " + config.history_s.toFixed(0) + " s");
    timeAxis(ctx, w, h, t1 - tStart, GUTTER);
    label(ctx, "ms · round trip", w - 160, 12, cssVar("--action"));
    label(ctx, "inference", w - 62, 12, cssVar("--chunk"));
    canvas.dataset.points = String(rt.filter(([, v]) => Number.isFinite(v)).length);
  }

  // Capture -> goal written, per goal written to the bus (docs/protocol.md, section 8).
  {
    const canvas = $("#latency-chart");
    const { ctx, w, h } = fit(canvas);
    const points = state.latency.filter((s) => s.t >= t0 && s.end_to_end_s !== null)
      .map((s) => [s.t, s.end_to_end_s * 1000]);
    const [, top] = range(points.map(([, v]) => v), [0, 100]);
    const grid = ticks(top);
    const hi = grid[grid.length - 1];
    const y = (v) => h - 14 - (v / hi) * (h - 24);
    gridY(ctx, w, h, grid, "", y);
    line(ctx, points.map(([t, v]) => [x(w)(t), y(v)]), cssVar("--gt"), { width: 1.5 });
    if (!points.length) emptyNote(ctx, w, h, "no goal written in the last " + span.toFixed(0) + " s");
    timeAxis(ctx, w, h, span, GUTTER);
    label(ctx, "ms", w - 22, 12, cssVar("--gt"));
    canvas.dataset.points = String(points.length);
  }

  // Queue depth: a count of rows, so whole-number grid lines; labels in the gutter, left of the hold bands.
  {
    const canvas = $("#queue-chart");
    const { ctx, w, h } = fit(canvas);
    const depth = state.actions.filter((s) => s.t >= t0 && s.queue_depth !== null).map((s) => [s.t, s.queue_depth]);
    const [, top] = range(depth.map(([, v]) => v), [0, 8]);
    const grid = ticks(Math.max(1, Math.ceil(top)), { integer: true });
    const hi = grid[grid.length - 1];
    const y = (v) => h - 14 - (v / hi) * (h - 24);
    shadeHolds(ctx, w, h, x(w), t0, cssVar("--hold"), GUTTER);
    gridY(ctx, w, h, grid, "", y);
    line(ctx, depth.map(([t, v]) => [x(w)(t), y(v)]), cssVar("--state"), { width: 1.5 });
    if (!depth.length) emptyNote(ctx, w, h, "no tick in the last " + span.toFixed(0) + " s");
    timeAxis(ctx, w, h, span, GUTTER);
    label(ctx, "rows", w - 34, 12, cssVar("--state"));
    canvas.dataset.axisLabels = JSON.stringify(grid);
  }
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
    episode: onEpisode, player: onPlayer, nodes: onNodes, log: onLog, instruction: onInstruction, capacity: onCapacity,
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
