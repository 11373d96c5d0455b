// Building the page from data without markup: every string becomes a text node, so
// nothing a model generated or a user stored is ever parsed as HTML.

// h("a", {href: "#/x", class: "link", onclick: fn}, "text", child, [more children])
export function h(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(node.dataset, value);
    else if (value === true) node.setAttribute(name, "");
    else node.setAttribute(name, String(value));
  }
  node.append(...flatten(children));
  return node;
}

function flatten(children) {
  return children
    .flat(Infinity)
    .filter((child) => child !== undefined && child !== null && child !== false)
    .map((child) => (child instanceof Node ? child : document.createTextNode(String(child))));
}

// Text with [start, end) ranges marked. The API counts characters as Python does (code
// points), so the text is sliced by code points, not UTF-16 units.
export function highlighted(text, ranges) {
  const chars = Array.from(text);
  const fragment = document.createDocumentFragment();
  let at = 0;
  for (const [start, end] of [...ranges].sort((a, b) => a[0] - b[0])) {
    if (start < at) continue;
    fragment.append(chars.slice(at, start).join(""), h("mark", {}, chars.slice(start, end).join("")));
    at = end;
  }
  fragment.append(chars.slice(at).join(""));
  return fragment;
}

// A labelled input, and a labelled select of [value, text] options.
export function field(label, name, attributes = {}) {
  return h("label", { class: "field" }, h("span", {}, label), h("input", { name, ...attributes }));
}

export function select(label, name, options) {
  return h(
    "label",
    { class: "field" },
    h("span", {}, label),
    h("select", { name }, options.map(([value, text]) => h("option", { value }, text))),
  );
}

// A table of rows (tr elements) that scrolls sideways on a narrow screen; `empty` when none.
export function table(headings, rows, empty) {
  if (!rows.length) return h("p", { class: "muted" }, empty);
  return h(
    "div",
    { class: "table-wrap" },
    h("table", {}, h("thead", {}, h("tr", {}, headings.map((name) => h("th", {}, name)))), h("tbody", {}, rows)),
  );
}

export function generationHref(id) {
  return `#/generations/${encodeURIComponent(id)}`;
}

// A card that opens a generation: its model and time, what the view adds to that line,
// then the view's body; `after` sits outside the link.
export function generationCard(generation, { cls = "", head = [], body = [], after = null } = {}) {
  return h(
    "article",
    { class: `card item ${cls}`.trim() },
    h(
      "a",
      { class: "item-link", href: generationHref(generation.id) },
      h(
        "header",
        { class: "item-head" },
        h("strong", {}, generation.model),
        h("span", { class: "muted" }, when(generation.created_at)),
        head,
      ),
      body,
    ),
    after,
  );
}

export function when(iso) {
  if (!iso) return "";
  const date = typeof iso === "number" ? new Date(iso * 1000) : new Date(iso);
  return Number.isNaN(date.getTime()) ? String(iso) : date.toLocaleString();
}

export function shorten(text, length = 160) {
  const chars = Array.from(text || "");
  return chars.length > length ? `${chars.slice(0, length).join("")}…` : chars.join("");
}

export function number(value, digits = 3) {
  if (value === null || value === undefined) return "–";
  return Number.isInteger(value) ? value.toLocaleString() : Number(value).toPrecision(digits);
}

export function badge(status) {
  return h("span", { class: `badge ${status}` }, status);
}

export function notice(message, kind = "error") {
  return h("p", { class: kind, role: kind === "error" ? "alert" : "status" }, message);
}

// "key=value" pairs of a definition list.
export function facts(pairs) {
  return h(
    "dl",
    { class: "facts" },
    pairs
      .filter(([, value]) => value !== undefined && value !== null && value !== "")
      .map(([name, value]) => [h("dt", {}, name), h("dd", {}, value)]),
  );
}

export function json(value) {
  return h("pre", { class: "json" }, JSON.stringify(value, null, 2));
}

// Resolves after `ms`, or at once when the view's signal aborts.
export function sleep(ms, signal) {
  return new Promise((resolve) => {
    const wake = () => {
      clearTimeout(timer);
      signal.removeEventListener("abort", wake);
      resolve();
    };
    const timer = setTimeout(wake, ms);
    signal.addEventListener("abort", wake);
  });
}
