// Live progress text and a convergence chart (each concept's error per IterIS iteration)
// on the IterIS Merge node, fed by the "iteris.progress" messages the node sends while it runs.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const COLORS = ["#4285f4", "#ea4335", "#fbbc05", "#34a853", "#ab47bc", "#00acc1"];
const CHART_HEIGHT = 120;

function drawChart(ctx, node, state) {
  const w = node.size[0] - 20;
  const top = node.size[1] - CHART_HEIGHT - 6;
  ctx.save();
  ctx.fillStyle = "#1b1b1b";
  ctx.fillRect(10, top, w, CHART_HEIGHT);
  ctx.font = "11px sans-serif";
  ctx.fillStyle = "#ddd";
  const pct = state.total ? Math.round((100 * state.done) / state.total) : 0;
  ctx.fillText(state.phase === "done" ? "merge finished" : `${state.phase}: ${state.done}/${state.total} (${pct}%)`, 16, top + 14);
  const history = state.history || [];
  if (history.length > 0) {
    const max = Math.max(1e-6, ...history.flat()) * 1.1;
    const x0 = 16, y0 = top + 22, cw = w - 12, ch = CHART_HEIGHT - 30;
    const n = history.length;
    const px = (t) => x0 + (n > 1 ? (cw * t) / (n - 1) : cw / 2);
    const py = (e) => y0 + ch - (ch * e) / max;
    for (let c = 0; c < history[0].length; c++) {
      ctx.strokeStyle = ctx.fillStyle = COLORS[c % COLORS.length];
      ctx.beginPath();
      history.forEach((errs, t) => (t ? ctx.lineTo(px(t), py(errs[c])) : ctx.moveTo(px(t), py(errs[c]))));
      ctx.stroke();
      history.forEach((errs, t) => ctx.fillRect(px(t) - 2, py(errs[c]) - 2, 4, 4));
      const label = state.concepts ? state.concepts[c] : `LoRA ${c + 1}`;
      ctx.fillText(`${label}: ${history[n - 1][c].toFixed(3)}`, x0 + 4, y0 + 12 + 12 * c);
    }
  }
  ctx.restore();
}

app.registerExtension({
  name: "iteris.merge.progress",
  setup() {
    api.addEventListener("iteris.progress", ({ detail }) => {
      const node = app.graph?.getNodeById(detail.node) ?? app.graph?.getNodeById(Number(detail.node));
      if (!node) return;
      node.iterisState = detail;
      node.setDirtyCanvas(true, true);
    });
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "IterIS_Merge") return;
    const created = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = created?.apply(this, arguments);
      this.size[1] += CHART_HEIGHT + 10;
      return r;
    };
    const draw = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      const r = draw?.apply(this, arguments);
      if (this.iterisState && !this.flags?.collapsed) drawChart(ctx, this, this.iterisState);
      return r;
    };
  },
});
