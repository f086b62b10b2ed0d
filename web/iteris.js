// On the IterIS Merge node: live progress and a convergence chart (each LoRA's error per
// IterIS iteration), fed by the "iteris.progress" messages the node sends while it runs, and the
// merge's report once it ran. On IterIS Save LoRA: where the file was written.
// nodes/chart.py draws the same chart as an image; keep the two alike.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const COLORS = ["#4285f4", "#ea4335", "#fbbc05", "#34a853", "#ab47bc", "#00acc1"];
const KEPT = "#78d278";
const CHART_HEIGHT = 230;
const TEXT_LINE = 13;
const TEXT_FONT = "11px monospace";
const NODE_WIDTH = 520;

let tabPrompt = null; // the prompt this browser tab is running (its execution_start)
let measureCtx = null;

function fmtTime(s) {
  s = Math.max(0, Math.round(s));
  return s < 60 ? `${s} s` : `${Math.floor(s / 60)} min ${String(s % 60).padStart(2, "0")} s`;
}

function niceTicks(low, high, count = 5) {
  const raw = (high - low) / Math.max(1, count - 1);
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * magnitude).find((s) => s >= raw);
  const first = Math.floor(low / step) * step;
  const ticks = [];
  for (let v = first; v < high + step - 1e-9; v += step) ticks.push(v);
  return ticks;
}

function yRange(values) {
  const low = Math.min(...values), high = Math.max(...values);
  const pad = Math.max((high - low) * 0.08, 0.005);
  return [Math.max(0, low - pad), high + pad];
}

// The status line(s) of a merge: what it does now, or how it ended.
function statusLines(state, now) {
  if (state.status === "done") {
    const kept = state.history.length ? ` · kept iteration ${state.chosen}` : "";
    return [[`merge finished in ${fmtTime(state.seconds)}${kept}`, "#ddd"]];
  }
  const where = `${state.phase} ${state.done}/${state.total}`;
  if (state.status === "cancelled") return [[`cancelled at ${where}`, "#f0a030"]];
  if (state.status === "failed") return [[`failed at ${where}: ${state.message}`, "#ff6b6b"]];
  const inPhase = (now - state.phaseStart) / 1000;
  const pct = state.total ? Math.round((100 * state.done) / state.total) : 0;
  let eta = "";
  if (state.done > 0 && state.done < state.total && inPhase > 2) {
    eta = `, about ${fmtTime((inPhase * (state.total - state.done)) / state.done)} left`;
  }
  const quiet = (now - state.updated) / 1000;
  return [
    [`${state.phase === "start" ? "starting" : state.phase}: ${state.done}/${state.total} (${pct}%) · ${fmtTime(inPhase)} in this step${eta}`, "#ddd"],
    [`running for ${fmtTime((now - state.started) / 1000)}` +
      (state.estimate ? ` of about ${fmtTime(state.estimate)} in all` : " · estimating the total time") +
      (quiet > 5 ? ` · last update ${fmtTime(quiet)} ago` : ""), "#aaa"],
  ];
}

function drawChart(ctx, state, x0, y0, w, h) {
  ctx.fillStyle = "#1b1b1b";
  ctx.fillRect(x0, y0, w, h);
  ctx.font = "12px sans-serif";
  ctx.textBaseline = "middle";
  let y = y0 + 10;
  for (const [text, color] of statusLines(state, Date.now())) {
    ctx.fillStyle = color;
    ctx.textAlign = "left";
    ctx.fillText(fitText(ctx, text, w - 12), x0 + 6, y);
    y += 15;
  }
  const history = state.history;
  const concepts = state.concepts;
  // legend: one entry per LoRA, wrapped to the width
  const legend = [[]];
  let used = 0;
  concepts.forEach((name, c) => {
    const value = history.length ? `: ${history[state.status === "done" ? state.chosen : history.length - 1][c].toFixed(4)}` : "";
    const text = fitText(ctx, name, w - 60 - ctx.measureText(value).width) + value;
    const size = 14 + ctx.measureText(text).width + 14;
    if (legend[legend.length - 1].length && used + size > w - 12) {
      legend.push([]);
      used = 0;
    }
    legend[legend.length - 1].push([c, text]);
    used += size;
  });
  const bottomLegend = y0 + h - 6 - 15 * legend.length;
  legend.forEach((line, k) => {
    let x = x0 + 6;
    const ly = bottomLegend + 15 * k + 8;
    for (const [c, text] of line) {
      ctx.fillStyle = COLORS[c % COLORS.length];
      ctx.fillRect(x, ly - 5, 10, 10);
      ctx.textAlign = "left";
      ctx.fillText(text, x + 14, ly);
      x += 14 + ctx.measureText(text).width + 14;
    }
  });
  if (!history.length) return;
  const left = x0 + 52, right = x0 + w - 10, top = y + 12, bottom = bottomLegend - 32;
  if (bottom - top < 30) return;
  const ticks = niceTicks(...yRange(history.flat()), 4);
  const low = ticks[0], high = ticks[ticks.length - 1];
  const n = history.length;
  const px = (t) => left + (n > 1 ? ((right - left) * t) / (n - 1) : (right - left) / 2);
  const py = (e) => bottom - ((bottom - top) * (e - low)) / (high - low);
  ctx.fillStyle = "#ddd";
  ctx.textAlign = "left";
  ctx.fillText("error per LoRA, lower is better (0 = as the LoRA alone)", left, top - 8);
  ctx.lineWidth = 1;
  ctx.textAlign = "right";
  for (const v of ticks) {
    ctx.strokeStyle = "#333";
    ctx.beginPath();
    ctx.moveTo(left, py(v));
    ctx.lineTo(right, py(v));
    ctx.stroke();
    ctx.fillStyle = "#ccc";
    ctx.fillText(Number(v.toPrecision(3)).toString(), left - 4, py(v));
  }
  ctx.textAlign = "center";
  const step = Math.max(1, Math.ceil(n / 12));
  for (let t = 0; t < n; t += step) ctx.fillText(String(t), px(t), bottom + 9);
  ctx.fillText("iteration (0 = first solve)", (left + right) / 2, bottom + 23);
  ctx.strokeStyle = "#6e6e6e";
  ctx.strokeRect(left, top, right - left, bottom - top);
  const kept = state.status === "done" ? state.chosen : null;
  if (kept !== null && kept !== undefined) {
    ctx.strokeStyle = ctx.fillStyle = KEPT;
    ctx.setLineDash([4, 4]);
    ctx.beginPath();
    ctx.moveTo(px(kept), top);
    ctx.lineTo(px(kept), bottom);
    ctx.stroke();
    ctx.setLineDash([]);
    const onRight = px(kept) > (left + right) / 2;
    ctx.textAlign = onRight ? "right" : "left";
    ctx.fillText(`kept: iteration ${kept}`, px(kept) + (onRight ? -4 : 4), top + 9);
  }
  ctx.lineWidth = 2;
  for (let c = 0; c < concepts.length; c++) {
    ctx.strokeStyle = ctx.fillStyle = COLORS[c % COLORS.length];
    ctx.beginPath();
    history.forEach((errs, t) => (t ? ctx.lineTo(px(t), py(errs[c])) : ctx.moveTo(px(t), py(errs[c]))));
    ctx.stroke();
    history.forEach((errs, t) => {
      const r = t === kept ? 5 : 3;
      ctx.beginPath();
      ctx.arc(px(t), py(errs[c]), r, 0, 2 * Math.PI);
      ctx.fill();
    });
  }
}

function fitText(ctx, text, width) {
  if (ctx.measureText(text).width <= width) return text;
  while (text.length > 1 && ctx.measureText(text + "…").width > width) text = text.slice(0, -1);
  return text + "…";
}

// Lines of `text` wrapped to `width` pixels of TEXT_FONT.
function wrapLines(text, width) {
  measureCtx ??= document.createElement("canvas").getContext("2d");
  measureCtx.font = TEXT_FONT;
  const out = [];
  for (const line of text.split("\n")) {
    let rest = line;
    while (measureCtx.measureText(rest).width > width && rest.length > 1) {
      let cut = rest.length;
      while (cut > 1 && measureCtx.measureText(rest.slice(0, cut)).width > width) cut--;
      out.push(rest.slice(0, cut));
      rest = rest.slice(cut);
    }
    out.push(rest);
  }
  return out;
}

// A read-only text area drawn on the canvas (not saved with the workflow, not sent to the server).
function textWidget(node, name) {
  return node.addCustomWidget({
    name,
    type: "iteris_text",
    value: "",
    serialize: false,
    options: { serialize: false },
    computeSize(width) {
      return [width, this.value ? wrapLines(this.value, width - 24).length * TEXT_LINE + 10 : 0];
    },
    draw(ctx, node, width, y) {
      if (!this.value) return;
      const lines = wrapLines(this.value, width - 24);
      ctx.save();
      ctx.fillStyle = "#151515";
      ctx.fillRect(10, y, width - 20, lines.length * TEXT_LINE + 6);
      ctx.font = TEXT_FONT;
      ctx.fillStyle = "#e0e0e0";
      ctx.textAlign = "left";
      ctx.textBaseline = "top";
      lines.forEach((line, k) => ctx.fillText(line, 14, y + 4 + k * TEXT_LINE));
      ctx.restore();
    },
  });
}

function showText(node, widget, text) {
  widget.value = text;
  const min = node.computeSize();
  const before = [...node.pos, ...node.size];
  node.setSize([Math.max(node.size[0], min[0]), Math.max(node.size[1], min[1])]);
  growGroups(before, node);
  node.setDirtyCanvas(true, true);
}

// Each group that held the node before it grew grows with it, keeping its margins, so the
// node stays inside its frame.
function growGroups([x, y, w, h], node) {
  for (const group of app.graph?._groups ?? []) {
    const [gx, gy] = group.pos;
    const [gw, gh] = group.size;
    if (x < gx || y < gy || x + w > gx + gw || y + h > gy + gh) continue;
    group.size = [Math.max(gw, node.pos[0] + node.size[0] + (gx + gw - x - w) - gx),
                  Math.max(gh, node.pos[1] + node.size[1] + (gy + gh - y - h) - gy)];
  }
}

function mergeNodes() {
  return (app.graph?._nodes ?? []).filter((n) => n.type === "IterIS_Merge" && n.iterisState);
}

function onProgress({ detail }) {
  if (!detail.prompt_id || detail.prompt_id !== tabPrompt) return;
  const node = app.graph?.getNodeById(detail.node) ?? app.graph?.getNodeById(Number(detail.node));
  if (node?.type !== "IterIS_Merge") return;
  const now = Date.now();
  const old = node.iterisState?.promptId === detail.prompt_id && detail.phase !== "start" ? node.iterisState : null;
  const state = old ?? { promptId: detail.prompt_id, started: now, phaseStart: now, phase: detail.phase };
  if (state.phase !== detail.phase) state.phaseStart = now;
  Object.assign(state, {
    phase: detail.phase, done: detail.done, total: detail.total, concepts: detail.concepts,
    history: detail.history, updated: now, status: detail.phase === "done" ? "done" : "running",
    estimate: detail.estimate ?? null,
  });
  if (detail.phase === "done") Object.assign(state, { chosen: detail.chosen, seconds: detail.seconds });
  if (detail.phase === "start") node.iterisReport.value = "";
  node.iterisState = state;
  node.setDirtyCanvas(true, true);
}

// A run that ended other than by success: mark its merge nodes that were still running.
function onEnded(status) {
  return ({ detail }) => {
    for (const node of mergeNodes()) {
      const state = node.iterisState;
      if (state.promptId !== detail.prompt_id || state.status !== "running") continue;
      state.status = status;
      const here = String(detail.node_id) === String(node.id);
      state.message = here ? String(detail.exception_message ?? "").split("\n")[0] : `node ${detail.node_id} (${detail.node_type}) failed`;
      node.setDirtyCanvas(true, true);
    }
  };
}

app.registerExtension({
  name: "iteris.merge.progress",
  setup() {
    api.addEventListener("execution_start", ({ detail }) => (tabPrompt = detail.prompt_id));
    api.addEventListener("iteris.progress", onProgress);
    api.addEventListener("execution_error", onEnded("failed"));
    api.addEventListener("execution_interrupted", onEnded("cancelled"));
    // the clock on a running merge's panel moves even while a step sends nothing
    setInterval(() => mergeNodes().forEach((n) => n.iterisState.status === "running" && n.setDirtyCanvas(true, false)), 1000);
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "IterIS_Merge" && nodeData.name !== "IterIS_SaveLora") return;
    const isMerge = nodeData.name === "IterIS_Merge";
    const created = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = created?.apply(this, arguments);
      if (isMerge) {
        this.addCustomWidget({
          name: "iteris_chart",
          type: "iteris_chart",
          value: null,
          serialize: false,
          options: { serialize: false },
          computeSize: (width) => [width, CHART_HEIGHT],
          draw: (ctx, node, width, y) => {
            ctx.save();
            if (node.iterisState) drawChart(ctx, node.iterisState, 10, y, width - 20, CHART_HEIGHT - 4);
            else {
              ctx.fillStyle = "#1b1b1b";
              ctx.fillRect(10, y, width - 20, CHART_HEIGHT - 4);
              ctx.fillStyle = "#888";
              ctx.font = "12px sans-serif";
              ctx.textAlign = "center";
              ctx.fillText(fitText(ctx, "progress and each LoRA's error per iteration show here while it runs", width - 30), width / 2, y + CHART_HEIGHT / 2);
            }
            ctx.restore();
          },
        });
      }
      this.iterisReport = textWidget(this, "iteris_report");
      const min = this.computeSize();
      this.setSize([Math.max(isMerge ? NODE_WIDTH : 0, this.size[0], min[0]), Math.max(this.size[1], min[1])]);
      return r;
    };
    const executed = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      const r = executed?.apply(this, arguments);
      if (output?.text) showText(this, this.iterisReport, output.text.join("\n"));
      return r;
    };
  },
});
