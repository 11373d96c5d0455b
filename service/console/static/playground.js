// The playground: submit a job and watch its tokens arrive as the worker makes them.

import { api, jobEvents } from "./api.js";
import { badge, field, generationHref, h, notice } from "./dom.js";
import { filesSection } from "./generation.js";

// Which input a model takes here: language models and char_rnn a prompt, the image
// families a number of images. Tables and anomaly scores need files: the API, not here.
function inputKind(card) {
  if (!card.tasks || card.tasks.includes("text")) return "prompt";
  if (card.tasks.includes("images")) return "images";
  return null;
}

function modelSelect(cards) {
  const served = cards.filter((card) => !card.tasks);
  const trained = cards.filter((card) => card.tasks && inputKind(card));
  const option = (card) => h("option", { value: card.id, dataset: { input: inputKind(card) } }, card.id);
  return h(
    "select",
    { name: "model", id: "playground-model" },
    h("optgroup", { label: "Served models" }, served.map(option)),
    trained.length ? h("optgroup", { label: "Trained here" }, trained.map(option)) : null,
  );
}

function selectedKind(form) {
  return form.elements.model.selectedOptions[0]?.dataset.input;
}

function jobBody(form, kind, parent) {
  const value = (name) => form.elements[name].value.trim();
  const params = { temperature: Number(value("temperature")) };
  if (value("max_tokens")) params.max_tokens = Number(value("max_tokens"));
  if (value("seed")) params.seed = Number(value("seed"));
  const tags = value("tags").split(",").map((tag) => tag.trim()).filter(Boolean);
  const body = {
    model: value("model"),
    input: kind === "images" ? { images: { n: Number(value("images")) } } : { prompt: form.elements.prompt.value },
    params,
    metadata: tags.length ? { tags, source: "console" } : { source: "console" },
  };
  if (parent) body.parent_generation_id = parent;
  return body;
}

// Streams the job's tokens into `output`; returns the job as it ended.
async function follow(job, output, status, signal) {
  let events = 0;
  for await (const { event, data } of jobEvents(job.id, { signal })) {
    if (event === "token") {
      output.append(data.text);
      output.dataset.events = String(++events);
      output.scrollTop = output.scrollHeight;
      status.textContent = `running · ${events} token event(s)`;
    } else if (event === "end") {
      return data;
    } else if (event === "error") {
      status.textContent = data.message;
    }
  }
  // The stream ended without the job (a restart): the result is in SQL.
  return api(`/v1/jobs/${encodeURIComponent(job.id)}`, { signal });
}

export async function render(view, { params, signal, fail }) {
  const cards = (await api("/v1/models", { signal })).data;
  const parent = params.get("parent");
  const form = h(
    "form",
    { class: "card playground", id: "playground-form" },
    h("label", { class: "field" }, h("span", {}, "Model"), modelSelect(cards)),
    parent
      ? h("p", { class: "muted" }, "Continues generation ", h("a", { href: generationHref(parent) }, parent))
      : null,
    h(
      "label",
      { class: "field prompt-field" },
      h("span", {}, "Prompt"),
      h("textarea", { name: "prompt", rows: 4, id: "playground-prompt" }),
    ),
    h(
      "label",
      { class: "field images-field" },
      h("span", {}, "Images"),
      h("input", { name: "images", type: "number", min: 1, max: 64, value: 4 }),
    ),
    h(
      "div",
      { class: "fields" },
      field("Max tokens", "max_tokens", { type: "number", min: 1, placeholder: "model default" }),
      field("Temperature", "temperature", { type: "number", min: 0, max: 2, step: 0.1, value: 0.7 }),
      field("Seed", "seed", { type: "number", min: 0, placeholder: "random" }),
      field("Tags", "tags", { placeholder: "a, b" }),
    ),
    h(
      "div",
      { class: "actions" },
      h("button", { type: "submit", id: "run" }, "Run"),
      h("button", { type: "button", class: "quiet", id: "stop", disabled: true }, "Stop"),
    ),
  );
  const status = h("p", { class: "muted", role: "status", id: "playground-status" });
  const output = h("pre", { class: "text output stream", id: "playground-output", "aria-live": "polite" });
  const files = h("div", { id: "playground-files" });
  const after = h("p", { id: "playground-after" });
  view.append(
    h("h1", {}, "Playground"),
    form,
    h("section", { class: "card" }, h("h2", {}, "Output"), status, output, after),
    files,
  );

  const kindChanged = () => {
    const kind = selectedKind(form);
    form.querySelector(".prompt-field").hidden = kind === "images";
    form.querySelector(".images-field").hidden = kind !== "images";
  };
  form.elements.model.addEventListener("change", kindChanged);
  kindChanged();

  const stop = form.querySelector("#stop");
  let job = null;
  stop.addEventListener("click", async () => {
    stop.disabled = true;
    const path = `/v1/jobs/${encodeURIComponent(job.id)}/cancel`;
    await api(path, { method: "POST", signal }).catch((error) => fail(error, after));
  });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const run = form.querySelector("#run");
    const kind = selectedKind(form);
    run.disabled = true;
    output.replaceChildren();
    files.replaceChildren();
    after.replaceChildren();
    delete output.dataset.events;
    try {
      job = await api("/v1/jobs", { method: "POST", body: jobBody(form, kind, parent), signal });
      status.textContent = `${job.status} · ${job.id}`;
      stop.disabled = false;
      const ended = await follow(job, output, status, signal);
      status.replaceChildren(badge(ended.status), ` ${ended.id}`);
      if (ended.error) after.append(notice(ended.error));
      if (ended.generation_id) {
        const link = generationHref(ended.generation_id);
        after.append(h("a", { href: link, id: "playground-generation" }, "Open the generation"));
        if (kind === "images") {
          const made = await api(`/v1/generations/${encodeURIComponent(ended.generation_id)}`, { signal });
          files.replaceChildren((await filesSection(made, signal)) ?? "");
        }
      }
    } catch (error) {
      fail(error, after);
    } finally {
      run.disabled = false;
      stop.disabled = true;
    }
  });
}
