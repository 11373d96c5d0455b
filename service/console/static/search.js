// Search past generations by meaning, by words or both, with the API's highlighted
// snippets.

import { api } from "./api.js";
import { field, generationCard, h, highlighted, number, select } from "./dom.js";
import { fill, paramsOf } from "./filters.js";

const MODES = [
  ["hybrid", "Hybrid"],
  ["vector", "Meaning (vector)"],
  ["keyword", "Words (keyword)"],
];
const TARGETS = [
  ["both", "Prompt and output"],
  ["prompt", "Prompt"],
  ["output", "Output"],
];

function scoreLine(hit) {
  const parts = [`score ${number(hit.score, 3)}`];
  if (hit.scores.vector) parts.push(`vector #${hit.scores.vector.rank}`);
  if (hit.scores.keyword) parts.push(`keyword #${hit.scores.keyword.rank}`);
  if (hit.matched) parts.push(`matched in ${hit.matched}`);
  return parts.join(" · ");
}

function hitCard(hit) {
  return generationCard(hit.generation, {
    cls: "hit",
    head: h("span", { class: "muted" }, scoreLine(hit)),
    body: Object.entries(hit.snippets).map(([name, snippet]) =>
      h(
        "p",
        { class: `snippet ${name}` },
        h("span", { class: "snippet-name" }, name),
        highlighted(snippet.text, snippet.highlights),
      ),
    ),
  });
}

function request(params) {
  const filters = {};
  if (params.get("model")) filters.model = params.get("model");
  if (params.getAll("tag").length) filters.tags = params.getAll("tag");
  return {
    query: params.get("q"),
    mode: params.get("mode") || "hybrid",
    target: params.get("target") || "both",
    k: 20,
    filters,
  };
}

export async function render(view, { params, signal, fail }) {
  const form = h(
    "form",
    { class: "filters search", role: "search" },
    field("Search", "q", { type: "search", required: true, placeholder: "words or a meaning" }),
    select("Mode", "mode", MODES),
    select("In", "target", TARGETS),
    field("Model", "model", { placeholder: "any" }),
    field("Tags", "tag", { placeholder: "all of: a, b" }),
    h("div", { class: "actions" }, h("button", { type: "submit" }, "Search")),
  );
  fill(form, params);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    location.hash = `#/search?${paramsOf(form)}`;
  });
  const results = h("div", { class: "list", id: "search-results" });
  const more = h("button", { type: "button", class: "quiet", hidden: true }, "Load more");
  view.append(h("h1", {}, "Search"), form, results, more);
  if (!params.get("q")) {
    form.elements.q.focus();
    return;
  }

  const body = request(params);
  let cursor = null;
  const load = async () => {
    const page = await api("/v1/search", { method: "POST", body: { ...body, cursor }, signal });
    results.append(...page.data.map(hitCard));
    if (!results.children.length) results.append(h("p", { class: "muted" }, "Nothing found."));
    cursor = page.next_cursor;
    more.hidden = !cursor;
  };
  more.addEventListener("click", () => load().catch(fail));
  await load();
}
