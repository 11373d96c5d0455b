// The JSON API, as the console calls it. The key lives in this tab's sessionStorage and
// leaves it only in the Authorization header: never in a URL, never in a log line.

const KEY = "genserve.key";

export class ApiError extends Error {
  constructor(status, body) {
    const error = body && body.error;
    super(error && error.message ? error.message : `the API answered ${status}`);
    this.status = status;
    this.param = error ? error.param : null;
  }
}

export const credentials = {
  get key() {
    return sessionStorage.getItem(KEY);
  },
  set key(value) {
    if (value) sessionStorage.setItem(KEY, value);
    else sessionStorage.removeItem(KEY);
  },
};

// "/v1/x" with query parameters; arrays repeat their name, empty values are left out.
export function url(path, query = {}) {
  const params = new URLSearchParams();
  for (const [name, value] of Object.entries(query)) {
    for (const each of Array.isArray(value) ? value : [value]) {
      if (each !== undefined && each !== null && each !== "") params.append(name, String(each));
    }
  }
  const search = params.toString();
  return search ? `${path}?${search}` : path;
}

async function send(path, { method = "GET", body, query, key, signal } = {}) {
  const headers = { Authorization: `Bearer ${key ?? credentials.key}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(url(path, query), {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    signal,
    cache: "no-store",
    credentials: "omit",
  });
  if (!response.ok) {
    let parsed = null;
    try {
      parsed = await response.json();
    } catch {
      // Not the API's error body (a proxy's page, a cut connection): the status says it.
    }
    throw new ApiError(response.status, parsed);
  }
  return response;
}

export async function api(path, options) {
  const response = await send(path, options);
  return response.status === 204 ? null : response.json();
}

export async function apiBlob(path, options) {
  return (await send(path, options)).blob();
}

// A job's Server-Sent Events as {event, data} objects. EventSource cannot send an
// Authorization header, so the stream is read with fetch and parsed here.
export async function* jobEvents(jobId, { signal } = {}) {
  const response = await send(`/v1/jobs/${encodeURIComponent(jobId)}/events`, { signal });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const frame = parseFrame(buffer.slice(0, end));
      buffer = buffer.slice(end + 2);
      if (frame) yield frame;
    }
  }
}

function parseFrame(block) {
  let event = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "event") event = value;
    else if (field === "data") data.push(value);
  }
  return data.length ? { event, data: JSON.parse(data.join("\n")) } : null;
}
