// The chat page: conversations in the sidebar, the one open in the middle, answers streamed from the server's
// Responses API (/v1/responses: reasoning, text and the built-in tools' calls come as separate items there).

import * as store from "./store.js";
import { apiKey, call } from "./api.js";
import { requestBody, streamAnswer } from "./answer.js";
import { copyButton, el, markdown, toolCard } from "./render.js";

const $ = (id) => document.getElementById(id);
const SETTINGS = "ossie.settings";
const state = { config: null, conversations: [], conv: null, running: null, filter: "", views: new Map() };
const settings = { temperature: null, top_p: null, max_tokens: null, seed: null, effort: "medium",
                   ...JSON.parse(localStorage.getItem(SETTINGS) || "{}") };

// ---- start, and the API key ----------------------------------------------------------------------------------

async function start() {
  bindControls();
  state.conversations = await store.loadAll();
  await connect();
}

async function connect() {
  try {
    state.config = await (await call("/ui/config")).json();
  } catch (e) {
    if (e.status === 401) {
      askKey(apiKey.get() ? "That key was not accepted." : "");
      return;
    }
    banner(e.message); // the server is down: the conversations kept here can still be read
  }
  document.body.classList.remove("locked");
  $("model").textContent = state.config ? state.config.models[0] : "";
  open(state.conversations[0] ?? null);
  $("input").focus();
}

function askKey(problem) {
  document.body.classList.add("locked");
  $("key-error").textContent = problem;
  if (!$("key-dialog").open) $("key-dialog").showModal();
}

function banner(text) {
  const box = $("banner");
  box.textContent = text || "";
  box.hidden = !text;
}

// ---- the sidebar -----------------------------------------------------------------------------------------------

function matches(conv, filter) {
  if (!filter) return true;
  const f = filter.toLowerCase();
  return (conv.title || "").toLowerCase().includes(f)
    || Object.values(conv.nodes).some((n) => (n.content || "").toLowerCase().includes(f));
}

function renderList() {
  const list = $("conversations");
  list.replaceChildren(...state.conversations.filter((c) => matches(c, state.filter)).map((conv) => {
    const current = state.conv && conv.id === state.conv.id;
    const title = el("button", { type: "button", class: "conv-title", "aria-current": current ? "true" : null,
                                 text: conv.title || "New chat", onclick: () => open(conv) });
    const rename = el("button", { type: "button", class: "small icon", text: "✎", title: "Rename",
                                  "aria-label": `Rename ${conv.title}`, onclick: () => startRename(li, conv) });
    const remove = el("button", { type: "button", class: "small icon", text: "✕", title: "Delete",
                                  "aria-label": `Delete ${conv.title}`, onclick: () => removeConversation(conv) });
    const li = el("li", { class: current ? "current" : "" }, title, el("span", { class: "conv-actions" }, rename,
                                                                        remove));
    return li;
  }));
}

function startRename(li, conv) {
  const field = el("input", { type: "text", value: conv.title, "aria-label": "New name" });
  const finish = async (keep) => {
    if (keep && field.value.trim()) {
      conv.title = field.value.trim();
      await store.save(conv);
    }
    renderList();
    if (state.conv?.id === conv.id) $("title").textContent = conv.title;
  };
  field.addEventListener("keydown", (e) => {
    if (e.key === "Enter") finish(true);
    else if (e.key === "Escape") { e.stopPropagation(); finish(false); }
  });
  field.addEventListener("blur", () => finish(true), { once: true });
  li.replaceChildren(field);
  field.focus();
  field.select();
}

async function removeConversation(conv) {
  if (!confirm(`Delete “${conv.title || "New chat"}”?`)) return;
  if (state.running && state.conv?.id === conv.id) state.running.controller.abort();
  await store.remove(conv.id);
  state.conversations = state.conversations.filter((c) => c.id !== conv.id);
  if (state.conv?.id === conv.id) open(state.conversations[0] ?? null);
  else renderList();
}

// ---- one conversation ------------------------------------------------------------------------------------------

function open(conv) {
  if (state.running) state.running.controller.abort();
  state.conv = conv ?? store.newConversation(settings);
  for (const n of Object.values(state.conv.nodes)) delete n.editing;
  document.body.classList.remove("show-sidebar");
  render();
}

function render() {
  const conv = state.conv;
  $("title").textContent = conv.title || "New chat";
  $("effort").value = conv.effort;
  $("system").value = conv.system;
  state.views.clear();
  $("messages").replaceChildren(...store.path(conv).map(view));
  renderList();
  scrollDown(true);
}

function view(node) {
  const conv = state.conv;
  const box = el("article", { class: `message ${node.role}`, "aria-label": node.role === "user" ? "You" : "Answer" });
  if (node.role === "user" && node.editing) box.append(editor(node));
  else if (node.role === "user") box.append(el("div", { class: "user-text", text: node.content }));
  else {
    for (const part of node.parts || []) box.append(partView(node, part));
    if (node.error) box.append(el("p", { class: "error", role: "alert", text: node.error }));
    const figures = statsLine(node);
    if (figures) box.append(el("p", { class: "stats dim", text: figures }));
  }
  const actions = el("div", { class: "actions" });
  const family = store.siblings(conv, node);
  if (family.length > 1) {
    const at = family.indexOf(node.id);
    actions.append(
      el("button", { type: "button", class: "small", text: "‹", "aria-label": "Previous version",
                     disabled: at === 0 || !!state.running, onclick: () => switchTo(family[at - 1]) }),
      el("span", { class: "dim", text: `${at + 1}/${family.length}` }),
      el("button", { type: "button", class: "small", text: "›", "aria-label": "Next version",
                     disabled: at === family.length - 1 || !!state.running, onclick: () => switchTo(family[at + 1]) }));
  }
  if (node.role === "user" && !node.editing) {
    actions.append(el("button", { type: "button", class: "small", text: "Edit", disabled: !!state.running,
                                  onclick: () => { node.editing = true; rerender(node); } }));
  }
  if (node.role === "assistant" && state.running?.node !== node) {
    actions.append(el("button", { type: "button", class: "small", text: "Regenerate", disabled: !!state.running,
                                  onclick: () => regenerate(node) }));
  }
  if (!node.editing) actions.append(copyButton(() => node.content, "Copy"));
  box.append(actions);
  state.views.set(node.id, box);
  return box;
}

function partView(node, part) {
  if (part.type === "reasoning") {
    const details = el("details", { class: "reasoning", open: part.open !== false },
                       el("summary", { text: state.running?.node === node && part.open !== false
                         ? "Thinking…" : `Reasoning (${part.text.split(/\s+/).filter(Boolean).length} words)` }),
                       el("div", { class: "reasoning-text", text: part.text }));
    const shown = part.open !== false; // "toggle" also fires for the open state it was made with: not a choice
    details.addEventListener("toggle", () => { if (details.open !== shown) part.open = details.open; });
    return details;
  }
  if (part.type === "tool") return toolCard(part);
  return markdown(part.text, part.citations || [], state.running?.node !== node);
}

function editor(node) {
  const field = el("textarea", { rows: 3, "aria-label": "Edit the message" });
  field.value = node.content;
  const done = () => { delete node.editing; rerender(node); };
  const form = el("form", { class: "editor" }, field,
                  el("div", { class: "row" }, el("button", { type: "submit", text: "Send" }),
                     el("button", { type: "button", text: "Cancel", onclick: done })));
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const text = field.value.trim();
    delete node.editing;
    if (text) ask(text, node.parent);
    else done();
  });
  field.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); form.requestSubmit(); }
    else if (e.key === "Escape") { e.stopPropagation(); done(); }
  });
  queueMicrotask(() => field.focus());
  return form;
}

function rerender(node) {
  const old = state.views.get(node.id);
  if (old?.isConnected) old.replaceWith(view(node));
}

function statsLine(node) {
  const live = node.live;
  if (live) {
    if (!live.count) return "waiting for the first token…";
    return `≈${live.count} tokens so far · ${live.rate.toFixed(1)} tok/s · first token ${live.ttft.toFixed(2)} s`;
  }
  const s = node.stats;
  if (!s) return "";
  const bits = [];
  if (s.output_tokens !== undefined) {
    bits.push(`${s.output_tokens} tokens${s.reasoning_tokens ? ` (${s.reasoning_tokens} reasoning)` : ""}`);
  }
  if (s.rate) bits.push(`${s.rate.toFixed(1)} tok/s`);
  if (s.ttft !== undefined) bits.push(`first token ${s.ttft.toFixed(2)} s`);
  if (s.input_tokens !== undefined) bits.push(`prompt ${s.input_tokens} tokens, ${s.cached_tokens || 0} cached`);
  bits.push(s.finish === "stop" ? "finished" : s.finish === "length" ? "cut at max tokens" : s.finish);
  return bits.join(" · ");
}

function scrollDown(force = false) {
  const box = $("messages");
  if (force || box.scrollHeight - box.scrollTop - box.clientHeight < 120) box.scrollTop = box.scrollHeight;
}

async function switchTo(id) {
  store.show(state.conv, id);
  await persist();
  render();
}

async function persist() {
  const conv = state.conv;
  conv.updated = Date.now();
  if (!state.conversations.includes(conv)) state.conversations.unshift(conv);
  state.conversations.sort((a, b) => b.updated - a.updated);
  await store.save(conv);
}

// ---- asking and answering --------------------------------------------------------------------------------------

async function ask(text, parentId) {
  const conv = state.conv;
  const user = store.addMessage(conv, parentId, { role: "user", content: text });
  const answer = store.addMessage(conv, user.id, { role: "assistant", content: "", reasoning: "", parts: [] });
  await persist();
  render();
  await generate(answer);
}

async function regenerate(node) {
  const answer = store.addMessage(state.conv, node.parent, { role: "assistant", content: "", reasoning: "",
                                                              parts: [] });
  await persist();
  render();
  await generate(answer);
}

async function generate(node) {
  const conv = state.conv;
  const controller = new AbortController();
  state.running = { node, controller };
  showRunning(true);
  await streamAnswer(node, requestBody(conv, node, state.config, settings), controller.signal, () => schedule(node));
  state.running = null;
  showRunning(false);
  if (conv === state.conv) render();
  await store.save(conv);
  if (node.errorStatus === 401) askKey("The server no longer accepts the key kept here: enter it again, then " +
                                       "press Regenerate.");
}

let pending = null;
function schedule(node) { // one re-render a frame while tokens stream
  if (pending) return;
  pending = requestAnimationFrame(() => {
    pending = null;
    rerender(node);
    scrollDown();
  });
}

function showRunning(running) {
  $("send").hidden = running;
  $("stop").hidden = !running;
  if (!running && pending) { cancelAnimationFrame(pending); pending = null; }
}

function stop() {
  state.running?.controller.abort();
}

async function send() {
  const text = $("input").value.trim();
  if (!text || state.running) return;
  $("input").value = "";
  await ask(text, state.conv.leaf);
}

// ---- controls --------------------------------------------------------------------------------------------------

function bindControls() {
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  });
  $("stop").addEventListener("click", stop);
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && state.running && !document.querySelector("dialog[open]")) stop();
  });
  $("new-chat").addEventListener("click", () => { open(null); $("input").focus(); });
  $("search").addEventListener("input", (e) => { state.filter = e.target.value; renderList(); });
  $("effort").addEventListener("change", async (e) => {
    state.conv.effort = settings.effort = e.target.value;
    saveSettings();
    if (state.conv.leaf) await store.save(state.conv);
  });
  $("system").addEventListener("change", async (e) => {
    state.conv.system = e.target.value;
    if (state.conv.leaf) await store.save(state.conv);
  });
  $("open-sidebar").addEventListener("click", () => document.body.classList.add("show-sidebar"));
  $("close-sidebar").addEventListener("click", () => document.body.classList.remove("show-sidebar"));
  $("export").addEventListener("click", exportConversation);
  $("import").addEventListener("click", () => $("import-file").click());
  $("import-file").addEventListener("change", importConversation);
  $("open-settings").addEventListener("click", openSettings);
  $("settings-cancel").addEventListener("click", () => $("settings").close());
  $("settings-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const form = new FormData(e.target);
    for (const name of ["temperature", "top_p", "max_tokens", "seed"]) {
      const value = String(form.get(name) ?? "").trim();
      settings[name] = value === "" ? null : Number(value);
    }
    saveSettings();
    $("settings").close();
  });
  $("key-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    apiKey.set($("key").value.trim());
    $("key-dialog").close();
    await connect();
  });
}

function saveSettings() {
  localStorage.setItem(SETTINGS, JSON.stringify(settings));
}

function openSettings() {
  const form = $("settings-form");
  for (const name of ["temperature", "top_p", "max_tokens", "seed"]) form.elements[name].value = settings[name] ?? "";
  $("settings").showModal();
}

function exportConversation() {
  const conv = state.conv;
  if (!conv.leaf) return banner("Nothing to export yet: this conversation is empty.");
  const blob = new Blob([JSON.stringify(store.toSaved(conv), null, 2)], { type: "application/json" });
  const a = el("a", { href: URL.createObjectURL(blob),
                      download: `${(conv.title || "conversation").replace(/[^\w.-]+/g, "_").slice(0, 60)}.json` });
  a.click();
  setTimeout(() => URL.revokeObjectURL(a.href), 10000);
}

async function importConversation(e) {
  const file = e.target.files[0];
  e.target.value = "";
  if (!file) return;
  try {
    const conv = store.fromSaved(JSON.parse(await file.text()), settings);
    if (!conv.title) conv.title = file.name.replace(/\.json$/i, "");
    state.conv = conv;
    await persist();
    banner("");
    render();
  } catch (err) {
    banner(`Cannot import ${file.name}: ${err.message}. It should be a conversation saved by this page's Export ` +
           "or by `ossie chat`'s /save.");
  }
}

start();
