// fairgate's small SVG charts, served by every service at /assets/charts.js (no dependencies):
// line charts over time and bar charts, each labelled for screen readers with its latest values.
"use strict";
const FairgateCharts = (() => {
  const ns = "http://www.w3.org/2000/svg";
  const palette = ["#0b57d0", "#e8710a", "#137333", "#a142f4", "#a4001d", "#5b6475"];
  const el = (name, attrs = {}, text) => {
    const e = document.createElementNS(ns, name);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text != null) e.textContent = text;
    return e;
  };
  const number = (v) => Number(v).toLocaleString(undefined, { maximumFractionDigits: 1 });
  const clock = (t) => new Date(t).toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit", second: "2-digit" });

  function frame(container, height, summary) {
    const width = Math.max(container.clientWidth || 600, 280);
    const svg = el("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": summary });
    return { svg, width };
  }

  function axis(svg, width, height, pad, vmax) {
    for (const f of [0, 0.5, 1]) {
      const y = pad.top + (1 - f) * (height - pad.top - pad.bottom);
      svg.append(el("line", { x1: pad.left, x2: width - pad.right, y1: y, y2: y, stroke: "#e3e6ec" }));
      svg.append(el("text", { x: pad.left - 6, y: y + 4, "text-anchor": "end", "font-size": 11, fill: "#5b6475" }, number(vmax * f)));
    }
  }

  function legend(items) {
    const div = document.createElement("div");
    div.className = "row muted";
    for (const { name, colour, value } of items) {
      const span = document.createElement("span");
      const swatch = document.createElement("i");
      swatch.style.cssText = `display:inline-block;width:.8rem;height:.3rem;margin-right:.3rem;vertical-align:middle;background:${colour}`;
      span.append(swatch, value == null ? name : `${name}: ${number(value)}`);
      div.append(span);
    }
    return div;
  }

  /** series: [{ name, points: [[timeMs, value], …], colour? }] */
  function lines(container, series, { height = 180, title = "" } = {}) {
    series.forEach((s, i) => { s.colour = s.colour || palette[i % palette.length]; });
    const latest = series.map((s) => ({ name: s.name, colour: s.colour, value: s.points.length ? s.points[s.points.length - 1][1] : null }));
    const summary = `${title}: ` + latest.map((l) => `${l.name} ${l.value == null ? "no data" : number(l.value)}`).join(", ");
    const { svg, width } = frame(container, height, summary);
    const pad = { left: 52, right: 10, top: 8, bottom: 22 };
    const all = series.flatMap((s) => s.points);
    const t0 = all.length ? Math.min(...all.map((p) => p[0])) : 0;
    const t1 = all.length ? Math.max(...all.map((p) => p[0])) : 1;
    const vmax = Math.max(1, ...all.map((p) => p[1]));
    axis(svg, width, height, pad, vmax);
    const x = (t) => pad.left + (t1 > t0 ? (t - t0) / (t1 - t0) : 1) * (width - pad.left - pad.right);
    const y = (v) => pad.top + (1 - v / vmax) * (height - pad.top - pad.bottom);
    for (const s of series) {
      if (!s.points.length) continue;
      svg.append(el("polyline", {
        points: s.points.map(([t, v]) => `${x(t).toFixed(1)},${y(v).toFixed(1)}`).join(" "),
        fill: "none", stroke: s.colour, "stroke-width": 2, "stroke-dasharray": s.dashed ? "5 4" : "none",
      }));
    }
    if (all.length) {
      svg.append(el("text", { x: pad.left, y: height - 6, "font-size": 11, fill: "#5b6475" }, clock(t0)));
      svg.append(el("text", { x: width - pad.right, y: height - 6, "font-size": 11, fill: "#5b6475", "text-anchor": "end" }, clock(t1)));
    }
    container.replaceChildren(svg, legend(latest));
  }

  /** items: [{ label, value }] */
  function bars(container, items, { height = 180, title = "", format = number } = {}) {
    const summary = `${title}: ` + items.map((i) => `${i.label} ${format(i.value)}`).join(", ");
    const { svg, width } = frame(container, height, summary);
    const pad = { left: 52, right: 10, top: 8, bottom: 22 };
    const vmax = Math.max(1, ...items.map((i) => i.value));
    axis(svg, width, height, pad, vmax);
    const slot = (width - pad.left - pad.right) / Math.max(items.length, 1);
    items.forEach((item, n) => {
      const h = (item.value / vmax) * (height - pad.top - pad.bottom);
      const bar = el("rect", { x: pad.left + n * slot + slot * 0.15, width: slot * 0.7, y: height - pad.bottom - h, height: h, fill: palette[0] });
      bar.append(el("title", {}, `${item.label}: ${format(item.value)}`));
      svg.append(bar);
      if (items.length <= 12 || n % Math.ceil(items.length / 12) === 0) {
        svg.append(el("text", { x: pad.left + (n + 0.5) * slot, y: height - 6, "font-size": 11, fill: "#5b6475", "text-anchor": "middle" }, item.label));
      }
    });
    container.replaceChildren(svg);
  }

  return { lines, bars };
})();
