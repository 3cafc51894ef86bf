// Model output to DOM. The output is untrusted: markdown is rendered with raw HTML shown as text (marked's html
// tokens escaped), the result goes through DOMPurify, links keep http(s) and mailto targets only and open in a new
// tab without a referrer, and images become links (loading one would tell its host that the page was read). The
// page's Content-Security-Policy (no inline script, nothing from other origins) stands behind all of it.

import { marked } from "./vendor/marked.esm.js";
import hljs from "./vendor/highlight.min.js";

const escapeHtml = (s) => s.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

marked.use({
  gfm: true,
  renderer: {
    html: (token) => escapeHtml(token.text),
  },
});

const SAFE_URL = /^(https?:|mailto:)/i;
const CITE = /\uE000(\d+)\uE001/g; // a citation's place in the text, put there before the markdown is read
const HAS_CITE = /\uE000\d+\uE001/;

export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined && v !== false) node.setAttribute(k, v === true ? "" : v);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

export function copyButton(getText, label = "Copy") {
  const button = el("button", { type: "button", class: "small", text: label, "aria-label": label });
  button.addEventListener("click", async () => {
    await writeClipboard(getText());
    button.textContent = "Copied";
    setTimeout(() => { button.textContent = label; }, 1500);
  });
  return button;
}

// navigator.clipboard exists only in secure contexts (https, localhost); elsewhere (the page opened by a LAN
// address) the older way: a selected, off-screen textarea and the copy command.
async function writeClipboard(text) {
  if (navigator.clipboard?.writeText) return navigator.clipboard.writeText(text);
  const area = el("textarea", { class: "offscreen", "aria-hidden": "true" });
  area.value = text;
  document.body.append(area);
  area.select();
  document.execCommand("copy");
  area.remove();
}

// Markdown as a sanitized fragment; citations ({start_index, end_index, url, title}, indices in code points, as
// the server counts) become numbered links. `final`: guess the language of unlabeled code blocks too (too slow to
// do at every streamed token).
export function markdown(text, citations = [], final = true) {
  let source = text;
  if (citations.length) {
    const points = Array.from(text);
    const sorted = citations.map((c, i) => ({ ...c, i })).sort((a, b) => b.start_index - a.start_index);
    for (const c of sorted) points.splice(c.start_index, c.end_index - c.start_index, `\uE000${c.i}\uE001`);
    source = points.join("");
  }
  const html = window.DOMPurify.sanitize(marked.parse(source), { FORBID_TAGS: ["style", "form", "input"] });
  const box = el("div", { class: "markdown" });
  box.innerHTML = html; // sanitized above; the CSP forbids what could still slip through
  for (const a of box.querySelectorAll("a")) {
    const href = a.getAttribute("href") || "";
    if (!SAFE_URL.test(href)) a.removeAttribute("href");
    a.setAttribute("target", "_blank");
    a.setAttribute("rel", "noopener noreferrer nofollow");
  }
  for (const img of box.querySelectorAll("img")) {
    const src = img.getAttribute("src") || "";
    const link = el("a", { target: "_blank", rel: "noopener noreferrer nofollow",
                           href: SAFE_URL.test(src) ? src : null }, `[image: ${img.getAttribute("alt") || src}]`);
    img.replaceWith(link);
  }
  if (citations.length) placeCitations(box, citations);
  for (const code of box.querySelectorAll("pre > code")) {
    const known = [...code.classList].some((c) => c.startsWith("language-") && hljs.getLanguage(c.slice(9)));
    if (known || final) hljs.highlightElement(code);
    const text = code.textContent;
    code.parentElement.before(el("div", { class: "code-head" },
                                 el("span", { text: code.className.match(/language-(\S+)/)?.[1] || "" }),
                                 copyButton(() => text, "Copy code")));
  }
  return box;
}

function placeCitations(box, citations) {
  const walker = document.createTreeWalker(box, NodeFilter.SHOW_TEXT);
  const found = [];
  while (walker.nextNode()) if (HAS_CITE.test(walker.currentNode.data)) found.push(walker.currentNode);
  for (const node of found) {
    const pieces = node.data.split(CITE); // text, index, text, index, ...
    node.replaceWith(...pieces.map((piece, k) => {
      if (k % 2 === 0) return piece;
      const c = citations[Number(piece)];
      return el("a", { class: "citation", href: SAFE_URL.test(c.url) ? c.url : null, title: c.title || c.url,
                       target: "_blank", rel: "noopener noreferrer nofollow" }, `[${Number(piece) + 1}]`);
    }));
  }
}

// A built-in tool's work, as a card in the answer: python's code and output, the browser's search or page.
export function toolCard(part) {
  if (part.tool === "python") {
    const code = el("code", { class: "language-python", text: part.code || "" });
    hljs.highlightElement(code);
    return el("details", { class: "tool", open: true },
              el("summary", { text: part.status === "done" ? "Python" : "Python (running…)" }),
              el("pre", {}, code),
              part.output !== undefined ? el("div", { class: "dim", text: "Output" }) : null,
              part.output !== undefined ? el("pre", { class: "tool-output", text: part.output }) : null);
  }
  const url = part.url && SAFE_URL.test(part.url) ? part.url : null;
  let what;
  if (part.action === "search") what = [`Searched the web for “${part.query || ""}”`];
  else if (part.action === "find") what = [`Looked for “${part.pattern || ""}” in `, link(url)];
  else what = ["Opened ", link(url)];
  return el("div", { class: "tool" }, el("span", { class: "tool-name", text: "Browser" }), " ", ...what,
            part.status === "done" ? null : el("span", { class: "dim", text: " …" }));
}

function link(url) {
  return url ? el("a", { href: url, target: "_blank", rel: "noopener noreferrer nofollow", text: url })
             : el("span", { text: "a page" });
}
