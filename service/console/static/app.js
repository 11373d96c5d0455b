// The console's shell: sign-in, the navigation, and hash routes to the views. Routes live
// in the fragment (#/generations/gen_...), which the browser never sends to the server.

import { api, ApiError, credentials } from "./api.js";
import { notice } from "./dom.js";
import * as activity from "./activity.js";
import * as generation from "./generation.js";
import * as historyView from "./history.js";
import * as models from "./models.js";
import * as playground from "./playground.js";
import * as search from "./search.js";
import * as usage from "./usage.js";

const ROUTES = [
  { pattern: /^history$/, nav: "history", render: historyView.render },
  { pattern: /^search$/, nav: "search", render: search.render },
  { pattern: /^generations\/([^/]+)$/, nav: "history", render: generation.render },
  { pattern: /^playground$/, nav: "playground", render: playground.render },
  { pattern: /^jobs$/, nav: "jobs", render: activity.render },
  { pattern: /^models$/, nav: "models", render: models.render },
  { pattern: /^usage$/, nav: "usage", render: usage.render },
];

const loginSection = document.getElementById("login");
const loginForm = document.getElementById("login-form");
const loginError = document.getElementById("login-error");
const nav = document.getElementById("nav");
const logout = document.getElementById("logout");
const view = document.getElementById("view");
let running = null; // the AbortController of the view on screen

function parse(hash) {
  const [path, query = ""] = hash.replace(/^#\/?/, "").split("?", 2);
  return { path: path || "history", params: new URLSearchParams(query) };
}

// What every view does with an error: a refused key signs out, anything else is shown
// (at the end of the view, or in the element given).
function fail(error, signal, into = view) {
  if (signal.aborted || error.name === "AbortError") return;
  if (error instanceof ApiError && error.status === 401) {
    signOut(error.message);
    return;
  }
  into.append(notice(error.message));
}

async function show() {
  if (!credentials.key) return;
  running?.abort();
  const controller = (running = new AbortController());
  const { path, params } = parse(location.hash);
  const route = ROUTES.find((each) => each.pattern.test(path));
  for (const link of nav.querySelectorAll("a")) {
    link.toggleAttribute("aria-current", route !== undefined && link.dataset.view === route.nav);
  }
  view.replaceChildren();
  if (!route) {
    view.append(notice(`There is no view at #/${path}.`));
    return;
  }
  const args = path.match(route.pattern).slice(1).map(decodeURIComponent);
  const signal = controller.signal;
  view.setAttribute("aria-busy", "true");
  try {
    await route.render(view, { args, params, signal, fail: (error, into) => fail(error, signal, into) });
  } catch (error) {
    fail(error, signal);
  } finally {
    if (running === controller) view.removeAttribute("aria-busy");
  }
}

function enter() {
  loginSection.hidden = true;
  nav.hidden = logout.hidden = view.hidden = false;
  if (!location.hash) history.replaceState(null, "", "#/history");
  show();
}

function signOut(message = "") {
  credentials.key = null;
  running?.abort();
  view.replaceChildren();
  nav.hidden = logout.hidden = view.hidden = true;
  loginSection.hidden = false;
  loginError.textContent = message;
  document.getElementById("login-key").focus();
}

loginForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  const input = document.getElementById("login-key");
  const button = loginForm.querySelector("button");
  const key = input.value.trim();
  loginError.textContent = "";
  button.disabled = true;
  try {
    // Any authenticated read proves the key; the models list is small.
    await api("/v1/models", { key });
    credentials.key = key;
    input.value = "";
    enter();
  } catch (error) {
    loginError.textContent = error.message;
  } finally {
    button.disabled = false;
  }
});

logout.addEventListener("click", () => signOut());
window.addEventListener("hashchange", show);

if (credentials.key) enter();
else signOut();
