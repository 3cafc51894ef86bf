// Conversations, kept in the browser's IndexedDB, and the tree each one is.
//
// A conversation is a tree of messages: editing a user message or regenerating an answer adds a sibling, and the
// earlier branch stays (as llama-server's page keeps it). `leaf` is the message shown last; the path from the root
// to it is the conversation as the model sees it. Each message remembers the child last shown (`last`), so going
// back to a sibling shows the branch under it as it was left.

const DB_NAME = "ossie-chat";
const STORE = "conversations";
let db = null;

function openDb() {
  return new Promise((resolve, reject) => {
    const req = indexedDB.open(DB_NAME, 1);
    req.onupgradeneeded = () => req.result.createObjectStore(STORE, { keyPath: "id" });
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}

async function transaction(mode, work) {
  db ??= await openDb();
  return new Promise((resolve, reject) => {
    const tx = db.transaction(STORE, mode);
    const req = work(tx.objectStore(STORE));
    tx.oncomplete = () => resolve(req.result);
    tx.onerror = () => reject(tx.error);
  });
}

export async function loadAll() {
  const all = await transaction("readonly", (s) => s.getAll());
  return all.sort((a, b) => b.updated - a.updated);
}

export const save = (conv) => transaction("readwrite", (s) => s.put(conv));
export const remove = (id) => transaction("readwrite", (s) => s.delete(id));

// crypto.randomUUID exists only in secure contexts (https, localhost): a page opened at http://192.168.1.5:8000
// (`ossie serve --host 0.0.0.0`) has getRandomValues alone
const newId = () => crypto.randomUUID?.()
  ?? Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join("");

export function newConversation(settings) {
  const now = Date.now();
  return { id: newId(), title: "", created: now, updated: now, system: "", effort: settings.effort || "medium",
           nodes: {}, roots: [], leaf: null };
}

// Adds a message under `parentId` (null: a first message) and shows it.
export function addMessage(conv, parentId, message) {
  const node = { id: newId(), parent: parentId, children: [], ...message };
  conv.nodes[node.id] = node;
  (parentId ? conv.nodes[parentId].children : conv.roots).push(node.id);
  show(conv, node.id);
  if (!conv.title && node.role === "user") conv.title = node.content.split("\n")[0].slice(0, 60);
  return node;
}

// Shows `id` and, below it, the branch that was shown last.
export function show(conv, id) {
  let node = conv.nodes[id];
  while (node.children.length) node = conv.nodes[node.last ?? node.children.at(-1)];
  conv.leaf = node.id;
  for (let n = node; n.parent; n = conv.nodes[n.parent]) conv.nodes[n.parent].last = n.id;
}

export function path(conv) {
  const out = [];
  for (let id = conv.leaf; id; id = conv.nodes[id].parent) out.unshift(conv.nodes[id]);
  return out;
}

export function siblings(conv, node) {
  return node.parent ? conv.nodes[node.parent].children : conv.roots;
}

// The conversation as `ossie chat` saves it (/save, /load): the branch shown, as chat messages.
export function toSaved(conv) {
  const messages = path(conv).filter((n) => !n.error || n.content).map((n) => {
    const m = { role: n.role, content: n.content };
    if (n.reasoning) m.reasoning_content = n.reasoning;
    return m;
  });
  return { title: conv.title, system: conv.system || null, reasoning_effort: conv.effort, tools: null, messages };
}

// A conversation from such a file (ossie chat's /save, or this page's export); throws on what is not one.
export function fromSaved(saved, settings) {
  if (!saved || !Array.isArray(saved.messages)) throw new Error("no messages list in the file");
  const conv = newConversation(settings);
  conv.system = typeof saved.system === "string" ? saved.system : "";
  if (["low", "medium", "high"].includes(saved.reasoning_effort)) conv.effort = saved.reasoning_effort;
  let parent = null;
  for (const m of saved.messages) {
    if (!m || !["user", "assistant"].includes(m.role)) continue; // tool results need the tools: not shown here
    const content = typeof m.content === "string" ? m.content
      : Array.isArray(m.content) ? m.content.map((p) => p?.text ?? "").join("") : "";
    const message = { role: m.role, content };
    if (m.role === "assistant") {
      message.reasoning = typeof m.reasoning_content === "string" ? m.reasoning_content : "";
      message.parts = [];
      if (message.reasoning) message.parts.push({ type: "reasoning", text: message.reasoning });
      message.parts.push({ type: "text", text: content });
    }
    parent = addMessage(conv, parent, message).id;
  }
  if (typeof saved.title === "string" && saved.title) conv.title = saved.title;
  return conv;
}
