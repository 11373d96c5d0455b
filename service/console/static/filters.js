// Listing filters kept in the route (#/history?model=...&tag=a&tag=b), so a filtered view
// can be bookmarked and the back button returns to it. Field names are the API's own.

import { field, h } from "./dom.js";

const REPEATED = new Set(["tag", "metadata"]); // comma-separated in the form
const TIMES = new Set(["created_after", "created_before"]); // local time in the form

// The filters of the API's listings (service/api/routes/listing.py); `extra` go with the
// less used ones.
export function listFields(extra = []) {
  return [
    field("Model", "model", { placeholder: "any" }),
    field("Tags", "tag", { placeholder: "all of: a, b" }),
    h(
      "details",
      { class: "more" },
      h("summary", {}, "More filters"),
      h(
        "div",
        { class: "fields" },
        field("Metadata", "metadata", { placeholder: "key=value, …" }),
        field("Created after", "created_after", { type: "datetime-local" }),
        field("Created before", "created_before", { type: "datetime-local" }),
        field("Conversation", "conversation_id", { placeholder: "conv_…" }),
        extra,
      ),
    ),
  ];
}

// The route's parameters from a filled form.
export function paramsOf(form) {
  const params = new URLSearchParams();
  for (const [name, value] of new FormData(form)) {
    if (typeof value !== "string") continue;
    const values = REPEATED.has(name) ? value.split(",") : [value];
    for (const each of values.map((v) => v.trim()).filter(Boolean)) params.append(name, each);
  }
  return params;
}

export function fill(form, params) {
  for (const element of form.elements) {
    if (!element.name) continue;
    const values = params.getAll(element.name);
    element.value = REPEATED.has(element.name) ? values.join(", ") : values[0] ?? element.value;
  }
  const more = form.querySelector("details.more");
  if (more) more.open = [...more.querySelectorAll("[name]")].some((element) => element.value);
}

// The API's query from the route's parameters.
export function apiQuery(params) {
  const query = {};
  for (const name of new Set(params.keys())) {
    if (REPEATED.has(name)) query[name] = params.getAll(name);
    else if (TIMES.has(name)) query[name] = isoTime(params.get(name));
    else query[name] = params.get(name);
  }
  return query;
}

function isoTime(local) {
  const date = new Date(local);
  return Number.isNaN(date.getTime()) ? local : date.toISOString();
}
