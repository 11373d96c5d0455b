// Usage over the last days: totals, requests, tokens and latency per UTC day, and per model.

import { api } from "./api.js";
import { barChart, lineChart } from "./charts.js";
import { h, number, select, table } from "./dom.js";
import { fill } from "./filters.js";

const RANGES = [
  ["7", "Last 7 days"],
  ["30", "Last 30 days"],
  ["90", "Last 90 days"],
];
const DAY_MS = 86_400_000;

// Every UTC day from `days` ago to today, as the API writes them (YYYY-MM-DD).
function dayRange(days) {
  const now = new Date();
  const today = Date.UTC(now.getUTCFullYear(), now.getUTCMonth(), now.getUTCDate());
  return Array.from({ length: days }, (_, i) => new Date(today - (days - 1 - i) * DAY_MS).toISOString().slice(0, 10));
}

function totals(total) {
  const latency = total.latency_ms;
  const cells = [
    ["Requests", number(total.requests)],
    ["Succeeded", number(total.succeeded)],
    ["Errors", number(total.errors)],
    ["Tokens in / out", `${number(total.prompt_tokens)} / ${number(total.completion_tokens)}`],
    ["Latency p50 / p95", latency.p50 === null ? "–" : `${number(latency.p50)} / ${number(latency.p95)} ms`],
    ["Cache hits", number(total.cache_hits)],
    ["Feedback", total.feedback_count ? `${number(total.feedback_score, 2)} (${total.feedback_count})` : "–"],
  ];
  return h(
    "div",
    { class: "stats" },
    cells.map(([name, value]) =>
      h("div", { class: "stat" }, h("span", { class: "muted" }, name), h("strong", {}, value)),
    ),
  );
}

function modelRow(group) {
  return h(
    "tr",
    {},
    h("td", {}, group.model),
    h("td", {}, number(group.requests)),
    h("td", {}, number(group.errors)),
    h("td", {}, number(group.completion_tokens)),
    h("td", {}, number(group.latency_ms.p95)),
    h("td", {}, number(group.feedback_score, 2)),
  );
}

function card(title, box) {
  return h("section", { class: "card" }, h("h2", {}, title), box);
}

export async function render(view, { params, signal }) {
  const form = h("form", { class: "filters" }, select("Days", "days", RANGES));
  form.elements.days.value = "30";
  fill(form, params);
  form.addEventListener("change", () => {
    location.hash = `#/usage?days=${form.elements.days.value}`;
  });
  const days = dayRange(Number(form.elements.days.value));
  const range = { start: days[0], end: days.at(-1) };
  const [byDay, byModel] = await Promise.all([
    api("/v1/usage", { query: { ...range, group_by: "day" }, signal }),
    api("/v1/usage", { query: { ...range, group_by: "model" }, signal }),
  ]);
  const found = new Map(byDay.data.map((group) => [group.day, group]));
  const series = days.map((day) => found.get(day));
  const label = (index) => days[Math.round(index)]?.slice(5) ?? "";
  const requests = h("div", { class: "chart-box", id: "usage-requests" });
  const tokens = h("div", { class: "chart-box", id: "usage-tokens" });
  const latency = h("div", { class: "chart-box", id: "usage-latency" });
  view.append(
    h("h1", {}, "Usage"),
    form,
    totals(byDay.total),
    h("div", { class: "columns even" }, card("Requests per day", requests), card("Tokens per day", tokens)),
    card("Latency (ms)", latency),
    card(
      "By model",
      table(
        ["Model", "Requests", "Errors", "Tokens out", "p95 ms", "Feedback"],
        byModel.data.map(modelRow),
        "No requests in these days.",
      ),
    ),
  );
  // Drawn once laid out, at their boxes' widths.
  const perDay = (name) => days.map((_, i) => [i, series[i]?.[name] ?? 0]);
  barChart(
    requests,
    days.map((day, i) => ({ label: day.slice(5), value: series[i]?.requests ?? 0 })),
    { title: "Requests per day" },
  );
  lineChart(
    tokens,
    ["prompt_tokens", "completion_tokens"].map((name) => ({ name, points: perDay(name) })),
    { title: "Tokens per day", xLabel: "day (UTC)", xFormat: label, xDomain: [0, days.length - 1] },
  );
  lineChart(
    latency,
    ["p50", "p95"].map((name) => ({
      name,
      points: days.flatMap((_, i) => (series[i]?.latency_ms[name] == null ? [] : [[i, series[i].latency_ms[name]]])),
    })),
    { title: "Latency per day", xLabel: "day (UTC)", xFormat: label, xDomain: [0, days.length - 1] },
  );
}
