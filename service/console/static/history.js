// The history: stored generations, newest first, with the API's filters.

import { api } from "./api.js";
import { field, generationCard, h, number, shorten } from "./dom.js";
import { apiQuery, fill, listFields, paramsOf } from "./filters.js";

function historyCard(generation) {
  const tags = generation.metadata.tags || [];
  return generationCard(generation, {
    head: generation.feedback_count
      ? h("span", { class: "score" }, `score ${number(generation.feedback_score, 2)}`)
      : null,
    body: [
      h("p", { class: "prompt" }, shorten(generation.prompt, 200)),
      generation.content.length
        ? h("p", { class: "output muted" }, `${generation.content.length} file(s): ${generation.content[0].media_type}`)
        : h("p", { class: "output" }, shorten(generation.output, 280)),
    ],
    after: tags.length ? h("p", { class: "chips" }, tags.map((tag) => h("span", { class: "chip" }, tag))) : null,
  });
}

export async function render(view, { params, signal, fail }) {
  const form = h(
    "form",
    { class: "filters", role: "search" },
    listFields([
      field("Min score", "min_feedback_score", { type: "number", step: "any" }),
      field("Max score", "max_feedback_score", { type: "number", step: "any" }),
      field("Feedback label", "label"),
      field("Category", "category"),
    ]),
    h("div", { class: "actions" }, h("button", { type: "submit" }, "Filter")),
  );
  fill(form, params);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    location.hash = `#/history?${paramsOf(form)}`;
  });
  const list = h("div", { class: "list", id: "history-list" });
  const more = h("button", { type: "button", class: "quiet", hidden: true }, "Load more");
  view.append(h("h1", {}, "History"), form, list, more);

  const query = apiQuery(params);
  let cursor = null;
  const load = async () => {
    const page = await api("/v1/generations", { query: { ...query, cursor, limit: 20 }, signal });
    list.append(...page.data.map(historyCard));
    if (!list.children.length) list.append(h("p", { class: "muted" }, "No generations match."));
    cursor = page.next_cursor;
    more.hidden = !page.has_more;
  };
  more.addEventListener("click", () => load().catch(fail));
  await load();
}
