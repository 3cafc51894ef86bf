// One answer streamed into its message from the Responses API: reasoning, text and the built-in tools' calls
// arrive as separate output items, each a part of the message; the live figures while it streams, the closing ones
// (from the response's usage) when it ends.

import * as store from "./store.js";
import { call, events } from "./api.js";

export function requestBody(conv, node, config, settings) {
  const input = conv.system.trim() ? [{ type: "message", role: "system", content: conv.system }] : [];
  for (const n of store.path(conv)) {
    if (n === node) break;
    if (n.role === "user" || n.content) input.push({ type: "message", role: n.role, content: n.content });
  }
  const body = { model: config?.models[0] ?? "", input, stream: true, store: false,
                 reasoning: { effort: conv.effort } };
  if (settings.temperature !== null) body.temperature = settings.temperature;
  if (settings.top_p !== null) body.top_p = settings.top_p;
  if (settings.max_tokens !== null) body.max_output_tokens = settings.max_tokens;
  if (settings.seed !== null) body.seed = settings.seed;
  const tools = config?.builtin_tools || [];
  const declared = [];
  if (tools.includes("python")) declared.push({ type: "code_interpreter", container: { type: "auto" } });
  if (tools.includes("browser")) declared.push({ type: "web_search_preview" });
  if (declared.length) body.tools = declared;
  return body;
}

// Streams the answer into `node` (its parts, content, reasoning, live figures, then stats or error), calling
// changed() after each event; returns when it has ended, been stopped (signal) or failed.
export async function streamAnswer(node, body, signal, changed) {
  const t0 = performance.now();
  let first = null;
  node.live = { count: 0, rate: 0, ttft: 0 };
  const tick = () => {
    const now = performance.now();
    first ??= now;
    node.live.count += 1;
    node.live.ttft = (first - t0) / 1000;
    node.live.rate = node.live.count > 1 ? (node.live.count - 1) / ((now - first) / 1000) : 0;
  };
  const byItem = new Map();
  let usage = null, finish = "stop";
  try {
    const response = await call("/v1/responses", { body, signal });
    for await (const { data } of events(response)) {
      const item = data.item;
      if (data.type === "response.output_item.added") {
        const part = newPart(item);
        if (part) { node.parts.push(part); byItem.set(item.id, part); }
      } else if (data.type === "response.reasoning_text.delta" || data.type === "response.output_text.delta") {
        const part = byItem.get(data.item_id);
        part.text += data.delta;
        if (part.type === "text") {
          node.content += data.delta;
          for (const p of node.parts) if (p.type === "reasoning" && p.open === undefined) p.open = false;
        } else node.reasoning += data.delta;
        tick();
      } else if (data.type === "response.output_item.done") {
        finishPart(byItem.get(item.id), item);
      } else if (data.type === "response.completed" || data.type === "response.incomplete") {
        usage = data.response.usage;
        finish = data.type === "response.incomplete" ? "length" : "stop";
      } else if (data.type === "error") {
        throw new Error(data.message);
      }
      changed();
    }
  } catch (e) {
    if (e.name === "AbortError") finish = "stopped";
    else {
      node.error = e.message;
      node.errorStatus = e.status; // 401: the key is no longer accepted (the page asks for it again)
      finish = "failed";
    }
  }
  const end = performance.now();
  const out = usage?.output_tokens;
  node.stats = { finish, ttft: first === null ? undefined : (first - t0) / 1000 };
  if (usage) {
    Object.assign(node.stats, { output_tokens: out, reasoning_tokens: usage.output_tokens_details?.reasoning_tokens,
                                input_tokens: usage.input_tokens, cached_tokens: usage.input_tokens_details?.cached_tokens,
                                rate: out > 1 && first !== null && end > first ? (out - 1) / ((end - first) / 1000) : 0 });
  } else if (node.live.count) {
    Object.assign(node.stats, { output_tokens: node.live.count, rate: node.live.rate });
  }
  for (const p of node.parts) if (p.type === "reasoning" && p.open === undefined) p.open = false;
  delete node.live;
}

function newPart(item) {
  if (item.type === "reasoning") return { type: "reasoning", text: "" };
  if (item.type === "message") return { type: "text", text: "" };
  if (item.type === "code_interpreter_call") return { type: "tool", tool: "python", code: item.code || "" };
  if (item.type === "web_search_call") {
    const a = item.action || {};
    return { type: "tool", tool: "browser", action: a.type, query: a.query, pattern: a.pattern, url: a.url };
  }
  return null;
}

function finishPart(part, item) {
  if (!part) return;
  if (item.type === "message") {
    part.citations = (item.content?.[0]?.annotations || []).filter((a) => a.type === "url_citation");
  } else if (item.type === "code_interpreter_call") {
    part.code = item.code || part.code;
    part.output = (item.outputs || []).map((o) => o.logs ?? "").join("");
  } else if (item.type === "web_search_call") {
    part.url = item.action?.url ?? part.url;
  }
  part.status = "done";
}

