// The rl-service dashboard: the runs table, a run's page with its live learning curve, and the start-run form
// built from /v1/algorithms. Plain JavaScript over the HTTP API; every value the server sends goes in as text.
"use strict";

const $ = (id) => document.getElementById(id);
const AVERAGE_WINDOW = 10;
const POLL_MS = 1000;
let algorithms = [];
let runsTimer = null;
let runPage = null;  // {id, abort, episodes, timer}

// ---------------------------------------------------------------------------------------------- the API
function headers(extra) {
  const token = sessionStorage.getItem("token") || "";
  const all = Object.assign({}, extra || {});
  if (token) all["Authorization"] = "Bearer " + token;
  return all;
}

class Problem extends Error {
  constructor(body, status) {
    super(body.detail || ("HTTP " + status));
    this.field = body.field || "";
    this.status = status;
  }
}

async function api(method, path, body) {
  const init = {method, headers: headers(body === undefined ? {} : {"Content-Type": "application/json"})};
  if (body !== undefined) init.body = JSON.stringify(body);
  const response = await fetch(path, init);
  if (!response.ok) {
    let problem = {};
    try { problem = await response.json(); } catch (e) { /* not JSON */ }
    throw new Problem(problem, response.status);
  }
  return response;
}

const getJson = async (path) => (await api("GET", path)).json();

function el(tag, text, attrs) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  return node;
}

function number(value, digits) {
  const n = Number(value);
  return Number.isFinite(n) ? n.toFixed(digits) : "–";
}

function progressBar(done, total) {
  const bar = el("div", null, {class: "bar"});
  const fill = el("div");
  fill.style.width = fraction(done, total) + "%";
  bar.appendChild(fill);
  return bar;
}

const fraction = (done, total) => (Number(total) > 0 ? Math.min(100, 100 * Number(done) / Number(total)) : 0);

function showBanner(text) {
  const banner = $("banner");
  banner.textContent = text || "";
  banner.hidden = !text;
}

// ---------------------------------------------------------------------------------------------- start form
async function loadAlgorithms() {
  algorithms = (await getJson("/v1/algorithms")).algorithms;
  const select = $("algorithm");
  select.replaceChildren(...algorithms.map((a) => el("option", a.name, {value: a.name})));
  select.value = "PPO";
  renderParams();
}

function renderParams() {
  const spec = algorithms.find((a) => a.name === $("algorithm").value);
  if (!spec) return;
  $("algorithm-info").textContent = `${spec.name} (${spec.source}) acts in ${spec.action_spaces.join(", ")} spaces`;
  const rows = spec.hyperparameters.map((p) => {
    const row = el("tr");
    row.appendChild(el("td", p.name, {title: p.help}));
    const cell = el("td");
    const input = el("input", null, {name: "hp:" + p.name, placeholder: p.default_value,
                                     "data-testid": "hp-" + p.name});
    cell.appendChild(input);
    row.appendChild(cell);
    row.appendChild(el("td", `${p.accepted} (default ${p.default_value}) – ${p.help}`, {class: "accepted"}));
    row.appendChild(el("td", null, {class: "field-error", "data-field": "hyperparameters." + p.name}));
    return row;
  });
  $("params").replaceChildren(...rows);
}

function clearFieldErrors(form) {
  form.querySelectorAll(".field-error").forEach((node) => { node.textContent = ""; });
}

function showFieldError(form, problem) {
  // The server names the field at fault ("total_timesteps", "hyperparameters.n_steps"): show it beside it.
  const target = [...form.querySelectorAll(".field-error")].find((n) => n.dataset.field === problem.field);
  (target || $("form-error")).textContent = problem.message;
  const details = target && target.closest("details");
  if (details) details.open = true;
}

async function startRun(event) {
  event.preventDefault();
  const form = event.target;
  clearFieldErrors(form);
  const data = new FormData(form);
  const body = {algorithm: data.get("algorithm"), env_id: data.get("env_id"), hyperparameters: {},
                total_timesteps: Number(data.get("total_timesteps")), experiment_id: data.get("experiment_id")};
  if (data.get("seed") !== "") body.seed = Number(data.get("seed"));
  for (const [key, value] of data.entries()) {
    if (key.startsWith("hp:") && String(value).trim() !== "") body.hyperparameters[key.slice(3)] = String(value);
  }
  try {
    const reply = await (await api("POST", "/v1/runs", body)).json();
    location.hash = "#/runs/" + encodeURIComponent(reply.run_id);
  } catch (error) {
    if (error instanceof Problem) showFieldError(form, error); else throw error;
  }
}

// ---------------------------------------------------------------------------------------------- runs table
async function refreshRuns() {
  const query = new URLSearchParams();
  if ($("filter-experiment").value) query.set("experiment_id", $("filter-experiment").value);
  if ($("filter-state").value) query.set("state", $("filter-state").value);
  try {
    const runs = (await getJson("/v1/runs?" + query)).runs;
    $("runs").replaceChildren(...runs.map(runRow));
    showBanner("");
  } catch (error) {
    showBanner("cannot list runs: " + error.message);
  }
}

function runRow(run) {
  const row = el("tr", null, {"data-run-id": run.run_id, "data-state": run.state});
  const link = el("a", run.run_id, {href: "#/runs/" + encodeURIComponent(run.run_id)});
  row.appendChild(el("td")).appendChild(link);
  row.appendChild(el("td", run.experiment_id));
  row.appendChild(el("td", run.algorithm));
  row.appendChild(el("td", run.env_id));
  row.appendChild(el("td")).appendChild(el("span", run.state, {class: "state " + run.state}));
  const progress = el("td", null, {title: `${run.timesteps_done} / ${run.total_timesteps}`});
  progress.appendChild(progressBar(run.timesteps_done, run.total_timesteps));
  row.appendChild(progress);
  row.appendChild(el("td", number(run.metrics.steps_per_second, 0)));
  row.appendChild(el("td", number(run.metrics.mean_episode_reward, 1)));
  return row;
}

// ---------------------------------------------------------------------------------------------- a run's page
function showStatus(run) {
  $("run-id").textContent = run.run_id;
  const state = $("run-state");
  state.textContent = run.state;
  state.className = "state " + run.state;
  const bar = $("run-progress");
  bar.style.width = fraction(run.timesteps_done, run.total_timesteps) + "%";
  bar.dataset.done = run.timesteps_done;
  bar.dataset.total = run.total_timesteps;
  $("run-summary").textContent = `${run.algorithm} on ${run.env_id}, experiment ${run.experiment_id}: ` +
    `${run.timesteps_done} of ${run.total_timesteps} timesteps, ${number(run.metrics.steps_per_second, 0)} steps/s, ` +
    `mean reward ${number(run.metrics.mean_episode_reward, 1)}` + (run.error ? ` – ${run.error}` : "");
  $("stop").disabled = run.is_done;
  $("resume").disabled = !run.is_done;
  $("checkpoint").textContent = run.last_checkpoint_path ? "newest checkpoint: " + run.last_checkpoint_path
    : "no checkpoint yet";
  $("run-params").replaceChildren(...Object.entries(run.hyperparameters).sort().map(([key, value]) => {
    const row = el("tr");
    row.appendChild(el("td", key));
    row.appendChild(el("td", value));
    return row;
  }));
  $("attempts").replaceChildren(...run.attempts.map((a) => {
    const row = el("tr");
    [a.attempt, a.start_timesteps, a.end_timesteps || "…", a.outcome || "running"].forEach(
      (v) => row.appendChild(el("td", v)));
    return row;
  }));
}

async function loadHistory(page) {
  // Pages from where the curve ends, until the server has no more.
  for (;;) {
    const history = await getJson(`/v1/runs/${encodeURIComponent(page.id)}/history?offset=${page.episodes.length}`);
    page.episodes.push(...history.episodes);
    if (!history.episodes.length || page.episodes.length >= history.total_episodes) break;
  }
  drawCurve(page.episodes);
}

function movingAverage(values, window) {
  let sum = 0;
  return values.map((value, i) => {
    sum += value;
    if (i >= window) sum -= values[i - window];
    return sum / Math.min(i + 1, window);
  });
}

function drawCurve(episodes) {
  const svg = $("curve");
  const ns = "http://www.w3.org/2000/svg";
  const [width, height, pad] = [720, 300, 40];
  const nodes = [];
  const node = (tag, attrs, text) => {
    const n = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
    if (text !== undefined) n.textContent = text;
    nodes.push(n);
    return n;
  };
  $("episodes").textContent = episodes.length;
  $("window").textContent = AVERAGE_WINDOW;
  svg.dataset.episodes = episodes.length;
  if (!episodes.length) {
    node("text", {x: width / 2, y: height / 2, "text-anchor": "middle", fill: "#5c6370"}, "no episode yet");
    svg.replaceChildren(...nodes);
    return;
  }
  const rewards = episodes.map((e) => e.reward);
  const average = movingAverage(rewards, AVERAGE_WINDOW);
  const xs = episodes.map((e) => e.timesteps);
  const [xMax, yMin, yMax] = [Math.max(...xs, 1), Math.min(...rewards, 0), Math.max(...rewards, 1)];
  const x = (t) => pad + (width - 2 * pad) * t / xMax;
  const y = (r) => height - pad - (height - 2 * pad) * (r - yMin) / (yMax - yMin || 1);
  node("line", {x1: pad, y1: height - pad, x2: width - pad, y2: height - pad, stroke: "#999"});
  node("line", {x1: pad, y1: pad, x2: pad, y2: height - pad, stroke: "#999"});
  node("text", {x: width - pad, y: height - 10, "text-anchor": "end", "font-size": 12}, `${xMax} timesteps`);
  node("text", {x: 5, y: pad - 8, "font-size": 12}, `reward ${number(yMax, 1)}`);
  node("text", {x: 5, y: height - pad + 14, "font-size": 12}, number(yMin, 1));
  rewards.forEach((r, i) => node("circle", {cx: x(xs[i]), cy: y(r), r: 2, fill: "#9db8ec"}));
  const path = average.map((a, i) => `${i ? "L" : "M"}${x(xs[i]).toFixed(1)},${y(a).toFixed(1)}`).join(" ");
  node("path", {d: path, fill: "none", stroke: "#b3261e", "stroke-width": 2, "data-testid": "average-line"});
  svg.dataset.firstAverage = average[0];
  svg.dataset.lastAverage = average[average.length - 1];
  svg.replaceChildren(...nodes);
}

async function followEvents(page) {
  // Server-Sent Events read with fetch, so that a bearer token can go with them (EventSource sends no headers).
  const response = await fetch(`/v1/runs/${encodeURIComponent(page.id)}/events`,
                               {headers: headers(), signal: page.abort.signal});
  if (!response.ok) throw new Problem(await response.json(), response.status);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const name = (block.match(/^event: (.*)$/m) || [])[1];
      const data = (block.match(/^data: (.*)$/m) || [])[1];
      if (name === "status" && page === runPage) {
        showStatus(JSON.parse(data));
        await loadHistory(page);
      }
    }
  }
}

async function openRun(id) {
  closeRun();
  const page = {id, abort: new AbortController(), episodes: []};
  runPage = page;
  $("run-error").textContent = "";
  try {
    showStatus(await getJson("/v1/runs/" + encodeURIComponent(id)));
    await loadHistory(page);
    await followEvents(page);
    if (page === runPage) {  // the run ended: one last look
      showStatus(await getJson("/v1/runs/" + encodeURIComponent(id)));
      await loadHistory(page);
    }
  } catch (error) {
    if (error.name !== "AbortError" && page === runPage) $("run-error").textContent = error.message;
  }
}

function closeRun() {
  if (runPage) runPage.abort.abort();
  runPage = null;
}

async function runAction(action) {
  $("run-error").textContent = "";
  try {
    showStatus(await (await api("POST", `/v1/runs/${encodeURIComponent(runPage.id)}/${action}`)).json());
    if (action === "resume") openRun(runPage.id);
  } catch (error) {
    $("run-error").textContent = error.message;
  }
}

async function download(format) {
  // Fetched with the token, then saved from memory under the server's file name.
  $("run-error").textContent = "";
  try {
    const response = await api("GET", `/v1/runs/${encodeURIComponent(runPage.id)}/export?format=${format}`);
    const disposition = response.headers.get("Content-Disposition") || "";
    const name = (disposition.match(/filename="([^"]+)"/) || [])[1] || `${runPage.id}.${format}`;
    const link = el("a", null, {href: URL.createObjectURL(await response.blob()), download: name});
    document.body.appendChild(link);
    link.click();
    link.remove();
  } catch (error) {
    $("run-error").textContent = error.message;
  }
}

// ---------------------------------------------------------------------------------------------- routing
function route() {
  const match = location.hash.match(/^#\/runs\/(.+)$/);
  $("runs-view").hidden = Boolean(match);
  $("run-view").hidden = !match;
  clearInterval(runsTimer);
  if (match) {
    openRun(decodeURIComponent(match[1]));
  } else {
    closeRun();
    refreshRuns();
    runsTimer = setInterval(refreshRuns, POLL_MS);
  }
}

function init() {
  $("token").value = sessionStorage.getItem("token") || "";
  $("token").addEventListener("change", () => { sessionStorage.setItem("token", $("token").value); route(); });
  $("algorithm").addEventListener("change", renderParams);
  $("start-form").addEventListener("submit", startRun);
  $("filter-experiment").addEventListener("input", refreshRuns);
  $("filter-state").addEventListener("change", refreshRuns);
  $("stop").addEventListener("click", () => runAction("stop"));
  $("resume").addEventListener("click", () => runAction("resume"));
  document.querySelectorAll("button.export").forEach(
    (button) => button.addEventListener("click", () => download(button.dataset.format)));
  window.addEventListener("hashchange", route);
  loadAlgorithms().catch((error) => showBanner("cannot load the algorithms: " + error.message));
  route();
}

init();
