// Small SVG charts: a line chart for loss curves and latencies, a bar chart for counts per
// day. Drawn at the width of their container, so text stays legible on a phone.

const SVG = "http://www.w3.org/2000/svg";
const MARGIN = { top: 12, right: 16, bottom: 40, left: 52 };
const compact = new Intl.NumberFormat(undefined, { notation: "compact", maximumSignificantDigits: 3 });

function s(tag, attributes = {}, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
  node.append(...children);
  return node;
}

// About `count` round values spanning [min, max] (steps of 1, 2 or 5 times a power of ten;
// whole numbers only when `whole`).
function ticks(min, max, { count = 5, whole = false } = {}) {
  if (min === max) [min, max] = min === 0 ? [0, 1] : [min - Math.abs(min) / 2, max + Math.abs(max) / 2];
  const raw = (max - min) / count;
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  const ratio = raw / magnitude;
  const round = magnitude * (ratio >= 7.5 ? 10 : ratio >= 3.5 ? 5 : ratio >= 1.5 ? 2 : 1);
  const step = whole ? Math.max(1, round) : round;
  const values = [];
  for (let value = Math.floor(min / step) * step; value < max + step * 0.999; value += step) {
    values.push(Number(value.toPrecision(12)));
    if (value >= max) break;
  }
  return values;
}

function frame(container, title, height) {
  const width = Math.max(280, Math.round(container.clientWidth || 640));
  const svg = s("svg", {
    viewBox: `0 0 ${width} ${height}`,
    width,
    height,
    role: "img",
    "aria-label": title,
    class: "chart",
  });
  svg.append(s("title", {}, title));
  return {
    svg,
    width,
    plot: {
      x0: MARGIN.left,
      x1: width - MARGIN.right,
      y0: height - MARGIN.bottom,
      y1: MARGIN.top,
    },
  };
}

function yAxis(svg, plot, values, y) {
  for (const value of values) {
    const at = y(value);
    svg.append(
      s("line", { x1: plot.x0, x2: plot.x1, y1: at, y2: at, class: "grid" }),
      s("text", { x: plot.x0 - 6, y: at + 4, class: "tick", "text-anchor": "end" }, compact.format(value)),
    );
  }
}

function scale(from0, from1, to0, to1) {
  const span = from1 - from0 || 1;
  return (value) => to0 + ((value - from0) / span) * (to1 - to0);
}

// series: [{name, points: [[x, y], ...]}]; each series gets the colour of its index.
// xDomain ([min, max]) defaults to the points' own; xFormat writes the x axis's ticks.
export function lineChart(container, series, { title, xLabel, xFormat = compact.format, xDomain, height = 240 }) {
  const { svg, plot } = frame(container, title, height);
  const points = series.flatMap((line) => line.points);
  if (!points.length) {
    container.append(empty("No points yet."));
    return;
  }
  const [xMin, xMax] = xDomain ?? [Math.min(...points.map(([px]) => px)), Math.max(...points.map(([px]) => px))];
  const ys = points.map(([, py]) => py);
  const yTicks = ticks(Math.min(...ys), Math.max(...ys));
  const x = scale(xMin, xMax, plot.x0, plot.x1);
  const y = scale(yTicks[0], yTicks.at(-1), plot.y0, plot.y1);
  yAxis(svg, plot, yTicks, y);
  for (const value of ticks(xMin, xMax, { count: 6 })) {
    if (value < xMin || value > xMax) continue;
    svg.append(s("text", { x: x(value), y: plot.y0 + 16, class: "tick", "text-anchor": "middle" }, xFormat(value)));
  }
  series.forEach((line, index) => {
    const path = line.points.map(([px, py]) => `${x(px).toFixed(1)},${y(py).toFixed(1)}`).join(" ");
    const drawn = line.points.length === 1
      ? s("circle", { cx: x(line.points[0][0]), cy: y(line.points[0][1]), r: 3, class: `series-${index % 6}` })
      : s("polyline", { points: path, class: `line series-${index % 6}`, "data-series": line.name });
    svg.append(drawn);
  });
  const middle = (plot.x0 + plot.x1) / 2;
  svg.append(s("text", { x: middle, y: plot.y0 + 34, class: "axis", "text-anchor": "middle" }, xLabel));
  container.append(svg, legend(series.map((line) => line.name)));
}

// bars: [{label, value}], drawn in order.
export function barChart(container, bars, { title, height = 220 }) {
  const { svg, plot } = frame(container, title, height);
  const yTicks = ticks(0, Math.max(0, ...bars.map((bar) => bar.value)), { whole: true });
  const y = scale(0, yTicks.at(-1), plot.y0, plot.y1);
  yAxis(svg, plot, yTicks, y);
  const slot = (plot.x1 - plot.x0) / Math.max(1, bars.length);
  // Label at most ~one bar in every 48 px so labels never overlap.
  const labelEvery = Math.max(1, Math.ceil(48 / slot));
  bars.forEach((bar, index) => {
    const left = plot.x0 + index * slot;
    const top = y(bar.value);
    const rect = s("rect", {
      x: left + slot * 0.15,
      y: top,
      width: Math.max(1, slot * 0.7),
      height: Math.max(0, plot.y0 - top),
      class: "bar",
    });
    rect.append(s("title", {}, `${bar.label}: ${bar.value}`));
    svg.append(rect);
    if (index % labelEvery === 0) {
      svg.append(s("text", { x: left + slot / 2, y: plot.y0 + 16, class: "tick", "text-anchor": "middle" }, bar.label));
    }
  });
  container.append(svg);
}

function empty(message) {
  const note = document.createElement("p");
  note.className = "muted";
  note.textContent = message;
  return note;
}

function legend(names) {
  const list = document.createElement("ul");
  list.className = "legend";
  names.forEach((name, index) => {
    const item = document.createElement("li");
    item.className = `series-${index % 6}`;
    item.textContent = name;
    list.append(item);
  });
  return list;
}
