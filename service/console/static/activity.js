// Jobs, batches and training jobs as they run: the lists refresh every few seconds while
// anything is unfinished, and slowly otherwise.

import { api } from "./api.js";
import { badge, field, generationHref, h, number, select, shorten, sleep, table, when } from "./dom.js";
import { apiQuery, fill, paramsOf } from "./filters.js";

const BUSY_MS = 2000;
const IDLE_MS = 10000;
const UNFINISHED = new Set(["queued", "running", "validating", "in_progress", "finalizing", "cancelling"]);
const STATUSES = [["", "any"], ...["queued", "running", "succeeded", "failed", "cancelled"].map((s) => [s, s])];

function took(job) {
  if (!job.started_at) return "";
  const end = job.finished_at ? new Date(job.finished_at) : new Date();
  return `${number((end - new Date(job.started_at)) / 1000, 2)} s`;
}

// What a job was asked, in a few words.
function asked(input) {
  if (input.prompt !== undefined) return input.prompt;
  if (input.messages) return input.messages.at(-1).content;
  if (input.images) return input.images.interpolate ? "images between two seeds" : `${input.images.n ?? 1} image(s)`;
  if (input.rows) return `${input.rows.n ?? 100} table rows`;
  return JSON.stringify(input);
}

function jobRow(job) {
  const input = asked(job.input);
  return h(
    "tr",
    { dataset: { job: job.id } },
    h("td", {}, h("code", {}, job.id), h("div", { class: "muted" }, shorten(input, 60))),
    h("td", {}, job.model),
    h("td", {}, badge(job.status)),
    h("td", {}, when(job.created_at)),
    h("td", {}, took(job)),
    h(
      "td",
      {},
      job.generation_id
        ? h("a", { href: generationHref(job.generation_id) }, "generation")
        : job.error
          ? h("span", { class: "error-text" }, shorten(job.error, 80))
          : "",
    ),
  );
}

function batchRow(batch) {
  const counts = batch.request_counts;
  const done = counts.completed + counts.failed;
  return h(
    "tr",
    {},
    h("td", {}, h("code", {}, batch.id)),
    h("td", {}, batch.endpoint),
    h("td", {}, badge(batch.status)),
    h(
      "td",
      {},
      h("progress", { max: Math.max(1, counts.total), value: done }),
      ` ${done}/${counts.total}${counts.failed ? ` (${counts.failed} failed)` : ""}`,
    ),
    h("td", {}, when(batch.created_at)),
  );
}

function trainingRow(job) {
  const progress = job.progress || {};
  const epochs = job.config.epochs;
  const losses = Object.entries(progress.losses || {}).map(([name, value]) => `${name} ${number(value)}`);
  return h(
    "tr",
    {},
    h("td", {}, h("code", {}, job.id)),
    h("td", {}, `${job.name} (${job.arch})`),
    h("td", {}, badge(job.status)),
    h(
      "td",
      {},
      epochs && progress.epoch ? h("progress", { max: epochs, value: progress.epoch }) : null,
      progress.epoch ? ` epoch ${progress.epoch}${epochs ? `/${epochs}` : ""}, step ${progress.step}` : "",
      losses.length ? h("div", { class: "muted" }, losses.join(", ")) : null,
    ),
    h("td", {}, job.model ? h("a", { href: "#/models" }, job.model) : job.error ? shorten(job.error, 80) : ""),
  );
}

export async function render(view, { params, signal, fail }) {
  const form = h(
    "form",
    { class: "filters" },
    select("Status", "status", STATUSES),
    field("Model", "model", { placeholder: "any" }),
    field("Tags", "tag", { placeholder: "all of: a, b" }),
    h("div", { class: "actions" }, h("button", { type: "submit" }, "Filter")),
  );
  fill(form, params);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    location.hash = `#/jobs?${paramsOf(form)}`;
  });
  const jobs = h("section", { class: "card", id: "jobs" });
  const batches = h("section", { class: "card", id: "batches" });
  const training = h("section", { class: "card", id: "training-jobs" });
  view.append(h("h1", {}, "Jobs"), form, jobs, batches, training);

  const query = { ...apiQuery(params), limit: 25 };
  const refresh = async () => {
    const [jobPage, batchPage, trainingPage] = await Promise.all([
      api("/v1/jobs", { query, signal }),
      api("/v1/batches", { query: { limit: 10 }, signal }),
      api("/v1/training-jobs", { query: { limit: 10 }, signal }),
    ]);
    jobs.replaceChildren(
      h("h2", {}, "Generation jobs"),
      table(["Job", "Model", "Status", "Created", "Took", "Result"], jobPage.data.map(jobRow), "No jobs match."),
    );
    batches.replaceChildren(
      h("h2", {}, "Batches"),
      table(["Batch", "Endpoint", "Status", "Progress", "Created"], batchPage.data.map(batchRow), "No batches yet."),
    );
    training.replaceChildren(
      h("h2", {}, "Training"),
      table(
        ["Job", "Model", "Status", "Progress", "Result"],
        trainingPage.data.map(trainingRow),
        "No training jobs yet.",
      ),
    );
    return [...jobPage.data, ...batchPage.data, ...trainingPage.data].some((each) => UNFINISHED.has(each.status));
  };
  let busy = await refresh();
  // Refreshing goes on after the view is drawn, until it is left or a refresh fails.
  (async () => {
    for (;;) {
      await sleep(busy ? BUSY_MS : IDLE_MS, signal);
      if (signal.aborted) return;
      busy = await refresh();
    }
  })().catch(fail);
}
