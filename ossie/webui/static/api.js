// The server's API as the page uses it: JSON requests with the key, the Responses API's event stream, and errors
// turned into what a person can act on.

export class APIError extends Error {
  constructor(message, { status = 0, code = null, retryAfter = null } = {}) {
    super(message);
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
  }
}

const KEY = "ossie.apiKey";
export const apiKey = {
  get: () => localStorage.getItem(KEY) || "",
  set: (key) => localStorage.setItem(KEY, key),
};

// fetch with the key; a non-2xx answer becomes an APIError with the server's message
export async function call(path, { body = null, signal = null } = {}) {
  const headers = {};
  const key = apiKey.get();
  if (key) headers.Authorization = `Bearer ${key}`;
  if (body) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, { method: body ? "POST" : "GET", headers, signal,
                                   body: body ? JSON.stringify(body) : null });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new APIError(`Cannot reach the server at ${location.origin}. Is \`ossie serve\` still running? ` +
                       "Start it again, then press Regenerate.", { code: "unreachable" });
  }
  if (response.ok) return response;
  let error = {};
  try {
    error = (await response.json()).error || {};
  } catch { /* not JSON: the status says enough */ }
  throw new APIError(explain(response.status, error, response.headers.get("retry-after")),
                     { status: response.status, code: error.code, retryAfter: response.headers.get("retry-after") });
}

function explain(status, error, retryAfter) {
  const said = error.message || `HTTP ${status}`;
  if (status === 401) return "The server did not accept the API key.";
  if (status === 429) {
    const wait = retryAfter ? ` Try again in ${retryAfter} s.` : " Try again in a moment.";
    return `The model is busy with other requests (${said}).${wait}`;
  }
  if (error.code === "context_length_exceeded") {
    return `This conversation no longer fits the model's context: ${said}. Start a new chat, or edit an earlier ` +
           "message to make it shorter.";
  }
  if (status >= 500) return `The server failed: ${said}. Its log says more.`;
  return said;
}

// The events of a streamed response: {event, data} with data parsed from JSON. SSE comments (": queued") are
// skipped.
export async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value.replaceAll("\r\n", "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (!data.length || data.join("\n") === "[DONE]") continue;
      yield { event, data: JSON.parse(data.join("\n")) };
    }
  }
}
