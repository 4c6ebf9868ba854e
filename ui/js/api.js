// The service's public REST API, as the page uses it: JSON calls with the user's key, errors with their
// code and recovery hint, and the job event stream read with fetch (EventSource cannot send a key).

const KEY = "musicgen.apiKey";

export function apiKey() {
  return localStorage.getItem(KEY) || "";
}

export function setApiKey(value) {
  if (value) localStorage.setItem(KEY, value.trim());
  else localStorage.removeItem(KEY);
}

export class ApiError extends Error {
  constructor(status, body) {
    const err = (body && body.error) || {};
    super(err.message || `HTTP ${status}`);
    this.status = status;
    this.code = err.code || "HTTP_" + status;
    this.recovery = err.recovery || "";
    this.details = err.details || {};
  }
}

function headers(extra = {}) {
  const h = { ...extra };
  const key = apiKey();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function errorOf(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  return new ApiError(response.status, body);
}

export async function call(method, path, body, extraHeaders = {}) {
  const init = { method, headers: headers(extraHeaders) };
  if (body instanceof Blob) {
    init.body = body;
    init.headers["Content-Type"] = "application/octet-stream";
  } else if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const response = await fetch(path, init);
  if (!response.ok) throw await errorOf(response);
  return response.status === 204 ? null : response.json();
}

export const api = {
  models: () => call("GET", "/v1/models"),
  timing: (body) => call("POST", "/v1/lyrics/timing", body),
  submit: (body) => call("POST", "/v1/songs", body, { "Idempotency-Key": crypto.randomUUID() }),
  song: (id) => call("GET", `/v1/songs/${id}`),
  songs: () => call("GET", "/v1/songs?limit=50"),
  cancel: (id) => call("POST", `/v1/songs/${id}/cancel`),
  upload: (blob) => call("POST", "/v1/uploads", blob),
};

// A take's audio as a Blob (with the key: an <audio src> could not send it).
export async function audioBlob(url, format) {
  const target = format ? `${url}${url.includes("?") ? "&" : "?"}format=${format}` : url;
  const response = await fetch(target, { headers: headers() });
  if (!response.ok) throw await errorOf(response);
  return response.blob();
}

// A take's live audio (GET .../takes/{n}/live) from byte `offset` on: the Response, whose body grows
// while the take is written.
export async function liveAudio(url, offset, signal) {
  const response = await fetch(`${url}?offset=${offset}`, { headers: headers(), signal });
  if (!response.ok && response.status !== 416) throw await errorOf(response);
  return response;
}

// Follow a job's events until it ends. `onEvent({id, event, data})` for each event; resolves with
// "final" when the job ended, "closed" when the server closed the stream before that (reconnect), and
// rejects on a network or HTTP error. `lastEventId` resumes after that event (204: nothing left).
export async function streamEvents(jobId, lastEventId, onEvent, signal) {
  const extra = { Accept: "text/event-stream" };
  if (lastEventId) extra["Last-Event-ID"] = lastEventId;
  const response = await fetch(`/v1/songs/${jobId}/events`, { headers: headers(extra), signal });
  if (response.status === 204) return "final";
  if (!response.ok) throw await errorOf(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let final = false; // after the final event the server ends the stream: read to its end, not abort it
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return final ? "final" : "closed";
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const event = { id: null, event: "message", data: "" };
      for (const line of frame.split("\n")) {
        if (!line || line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const val = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "id") event.id = val;
        else if (field === "event") event.event = val;
        else if (field === "data") event.data += (event.data ? "\n" : "") + val;
      }
      if (!event.data) continue; // retry: and comments
      const data = JSON.parse(event.data);
      if (onEvent({ ...event, data })) final = true;
    }
  }
}
