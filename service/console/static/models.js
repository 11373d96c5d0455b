// The models served here, every trained version, and the loss curves of training runs
// (redrawn as a running one reports).

import { api } from "./api.js";
import { lineChart } from "./charts.js";
import { badge, h, number, sleep, table, when } from "./dom.js";

const RUNS = 6; // newest training runs drawn
const POLL_MS = 2000;

function versionRow(card) {
  return h(
    "tr",
    {},
    h("td", {}, h("code", {}, card.id), card.default ? h("span", { class: "badge default" }, "default") : null),
    h("td", {}, card.family),
    h("td", {}, card.tasks.join(", ")),
    h("td", {}, number(card.metrics.train_loss)),
    h("td", {}, number(card.metrics.val_loss)),
    h("td", {}, card.training_job_id ? h("code", {}, card.training_job_id) : card.created_by),
  );
}

// One line per loss the family reports (by step), and the validation loss where given.
function curves(events) {
  const series = new Map();
  const add = (name, step, value) => {
    if (typeof value !== "number") return;
    if (!series.has(name)) series.set(name, []);
    series.get(name).push([step, value]);
  };
  for (const event of events.filter((each) => each.kind === "progress")) {
    for (const [name, value] of Object.entries(event.data.losses || {})) add(name, event.data.step, value);
    add("val_loss", event.data.step, event.data.val_loss);
  }
  return [...series].map(([name, points]) => ({ name, points }));
}

async function drawRun(run, card, signal) {
  const chart = h("div", { class: "chart-box" });
  const head = h("header", { class: "item-head" });
  card.replaceChildren(head, chart);
  for (;;) {
    const [job, progress] = await Promise.all([
      api(`/v1/training-jobs/${encodeURIComponent(run.id)}`, { signal }),
      api(`/v1/training-jobs/${encodeURIComponent(run.id)}/progress`, { signal }),
    ]);
    head.replaceChildren(
      h("strong", {}, job.model || job.name),
      h("span", { class: "muted" }, `${job.arch} · ${when(job.created_at)}`),
      badge(job.status),
    );
    chart.replaceChildren();
    lineChart(chart, curves(progress.data), { title: `Loss of ${job.name} by step`, xLabel: "step" });
    if (job.status !== "queued" && job.status !== "running") return;
    await sleep(POLL_MS, signal);
    if (signal.aborted) return;
  }
}

export async function render(view, { signal, fail }) {
  const [models, runs] = await Promise.all([
    api("/v1/models", { signal }),
    api("/v1/training-jobs", { query: { limit: RUNS }, signal }),
  ]);
  const served = models.data.filter((card) => !card.tasks);
  const trained = models.data.filter((card) => card.tasks);
  const cards = runs.data.map((run) => h("article", { class: "card run", dataset: { run: run.id } }));
  view.append(
    h("h1", {}, "Models"),
    h(
      "section",
      { class: "card" },
      h("h2", {}, "Served"),
      h("p", { class: "chips" }, served.map((card) => h("code", { class: "chip" }, card.id))),
    ),
    h(
      "section",
      { class: "card" },
      h("h2", {}, "Trained versions"),
      table(
        ["Model", "Family", "Serves", "Train loss", "Val loss", "Made by"],
        trained.map(versionRow),
        "No trained models yet.",
      ),
    ),
    h(
      "section",
      { id: "training-curves" },
      h("h2", {}, "Training curves"),
      cards.length ? h("div", { class: "runs" }, cards) : h("p", { class: "muted" }, "No training runs yet."),
    ),
  );
  // Drawn once the cards are laid out, so each chart takes its card's width.
  runs.data.forEach((run, index) => drawRun(run, cards[index], signal).catch(fail));
}
