// One generation: its conversation, what it made, the passages it was grounded in,
// feedback, and everything stored about it.

import { api, apiBlob } from "./api.js";
import { facts, generationHref, h, json, notice, number, when } from "./dom.js";

const FEEDBACK = [
  { score: 1, label: "good", text: "Good (+1)" },
  { score: -1, label: "bad", text: "Bad (−1)" },
];

function turn(generation, current) {
  const here = generation.id === current;
  const model = here ? generation.model : h("a", { href: generationHref(generation.id) }, generation.model);
  return h(
    "li",
    { class: "turn", "aria-current": here ? "true" : null },
    h("div", { class: "bubble user" }, h("span", { class: "who" }, "prompt"), generation.prompt),
    h(
      "div",
      { class: "bubble model" },
      h("span", { class: "who" }, model),
      generation.content.length ? `${generation.content.length} file(s)` : generation.output,
    ),
  );
}

async function thread(generation, signal) {
  const turns = generation.conversation_id
    ? (await api(`/v1/conversations/${encodeURIComponent(generation.conversation_id)}`, { signal })).turns
    : [generation];
  return h(
    "section",
    { class: "card" },
    h("h2", {}, turns.length > 1 ? `Conversation (${turns.length} turns)` : "Prompt and output"),
    h("ol", { class: "thread", id: "thread" }, turns.map((each) => turn(each, generation.id))),
  );
}

// What a generation made. Images are fetched with the key and shown from blob: URLs,
// released with the view; other files are offered for download the same way.
export async function filesSection(generation, signal) {
  if (!generation.content.length) return null;
  const section = h("section", { class: "card" }, h("h2", {}, "Files"));
  const gallery = h("div", { class: "gallery" });
  section.append(gallery);
  for (const part of generation.content) {
    const path = `/v1/generations/${encodeURIComponent(generation.id)}/content?index=${part.index}`;
    const blob = await apiBlob(path, { signal });
    const address = URL.createObjectURL(blob);
    signal.addEventListener("abort", () => URL.revokeObjectURL(address));
    const name = `${generation.id}-${part.index}${part.media_type === "text/csv" ? ".csv" : ""}`;
    gallery.append(
      part.media_type.startsWith("image/")
        ? h("img", { src: address, alt: `image ${part.index + 1} of ${generation.id}` })
        : h("a", { href: address, download: name }, `Download ${part.media_type} (${number(part.bytes)} bytes)`),
    );
  }
  return section;
}

async function sources(generation, signal) {
  const found = await api(`/v1/generations/${encodeURIComponent(generation.id)}/sources`, { signal });
  if (!found.data.length) return null;
  return h(
    "section",
    { class: "card" },
    h("h2", {}, "Sources"),
    h(
      "ol",
      { class: "sources" },
      found.data.map((source) =>
        h(
          "li",
          { class: source.cited ? "cited" : null },
          h(
            "header",
            {},
            h("strong", {}, `[${source.number}] ${source.title || source.document_id || "passage"}`),
            h("span", { class: "muted" }, ` rank ${source.rank} · score ${number(source.score)}`),
            source.cited ? h("span", { class: "muted" }, " · cited") : null,
          ),
          h("p", { class: "passage" }, source.text),
        ),
      ),
    ),
  );
}

function feedbackItem(item) {
  const said = [item.label, item.score === null ? null : `score ${item.score}`, item.user && `by ${item.user}`];
  return h(
    "li",
    {},
    h("span", {}, said.filter(Boolean).join(" · ")),
    item.comment ? h("q", {}, item.comment) : null,
    h("span", { class: "muted" }, ` ${when(item.created_at)}`),
  );
}

async function feedback(generation, signal) {
  const path = `/v1/generations/${encodeURIComponent(generation.id)}/feedback`;
  const summary = h("p", { class: "muted" });
  const list = h("ul", { class: "feedback-list" });
  const status = h("p", { role: "status", class: "muted" });
  const comment = h("textarea", { name: "comment", rows: 2, maxlength: 8192, placeholder: "A comment (optional)" });
  const refresh = async () => {
    const given = await api(path, { signal });
    summary.textContent = given.count ? `Mean score ${number(given.score, 2)} over ${given.count}` : "No score yet.";
    list.replaceChildren(...given.data.map(feedbackItem));
  };
  const give = async ({ score, label }, button) => {
    button.disabled = true;
    status.textContent = "";
    try {
      const body = { score, label };
      if (comment.value.trim()) body.comment = comment.value.trim();
      await api(path, { method: "POST", body, signal });
      comment.value = "";
      status.textContent = "Feedback saved.";
      await refresh();
    } catch (error) {
      status.replaceChildren(notice(error.message));
    } finally {
      button.disabled = false;
    }
  };
  const buttons = FEEDBACK.map((choice) => {
    const button = h("button", { type: "button", class: "feedback", dataset: { label: choice.label } }, choice.text);
    button.addEventListener("click", () => give(choice, button));
    return button;
  });
  await refresh();
  return h(
    "section",
    { class: "card", id: "feedback" },
    h("h2", {}, "Feedback"),
    h("div", { class: "actions" }, buttons),
    comment,
    status,
    summary,
    list,
  );
}

function details(generation) {
  const usage = generation.usage;
  return h(
    "section",
    { class: "card" },
    h("h2", {}, "Details"),
    facts([
      ["Model", `${generation.model} (${generation.model_version})`],
      ["Created", when(generation.created_at)],
      ["Finish", generation.finish_reason],
      ["Tokens", `${usage.prompt_tokens} in, ${usage.completion_tokens} out`],
      ...Object.entries(generation.timings).map(([name, value]) => [
        name.replaceAll("_", " "),
        typeof value === "number" ? number(value) : String(value),
      ]),
      ["Job", generation.job_id],
      ["Conversation", generation.conversation_id],
      ["Parent", generation.parent_id && h("a", { href: generationHref(generation.parent_id) }, generation.parent_id)],
    ]),
    h("h3", {}, "Parameters"),
    json(generation.params),
    h("h3", {}, "Metadata"),
    json(generation.metadata),
  );
}

export async function render(view, { args: [id], signal }) {
  const generation = await api(`/v1/generations/${encodeURIComponent(id)}`, { signal });
  const [conversation, files, grounded, judged] = await Promise.all([
    thread(generation, signal),
    filesSection(generation, signal),
    sources(generation, signal),
    feedback(generation, signal),
  ]);
  view.append(
    h(
      "div",
      { class: "page-head" },
      h("h1", {}, "Generation ", h("code", {}, generation.id)),
      // Trained models' outputs (marked synthetic) start no conversation.
      generation.metadata.synthetic
        ? null
        : h(
            "a",
            { class: "button", href: `#/playground?parent=${encodeURIComponent(generation.id)}` },
            "Continue in playground",
          ),
    ),
    h(
      "div",
      { class: "columns" },
      h("div", { class: "main-column" }, conversation, files, grounded),
      h("div", { class: "side-column" }, judged, details(generation)),
    ),
  );
}
