"""The browser tool: search, open and find, as harmony's browser tool description tells gpt-oss they work.

A session is a stack of pages. Each display gets the next cursor, shown in brackets before it; a page's text is
shown as numbered lines, a window of about 1,024 tokens at a time ("viewing lines [a - b] of N"), and its links as
`【id†text†domain】`, which `open(id)` follows. The model cites what it read as `【cursor†Lstart-Lend】`;
`citations(text)` maps those back to the pages' URLs (the Responses API's url_citation annotations).

Search goes to a pluggable backend: Exa (EXA_API_KEY) or You.com (YDC_API_KEY) as in the official tool, or
DuckDuckGo and others through the `ddgs` package, which needs no key; `LocalBackend` serves pages from memory, for
tests and offline use. Pages are fetched with httpx, only over http(s), with size and time limits, and never from
loopback, private or link-local addresses (a page must not make ossie read the services of the machine it runs
on) unless the session allows it; every redirect is checked the same way.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin, urlsplit

from .base import Tool

if TYPE_CHECKING:
    from openai_harmony import SystemContent

    from .settings import ToolSettings

VIEW_TOKENS = 1024  # a display's size, as the official tool's
MAX_FIND_RESULTS = 50
MAX_PAGE_BYTES = 2 << 20
FETCH_TIMEOUT_S = 15.0
MAX_REDIRECTS = 5
# html2text's [text](url "title"): it escapes parentheses in a URL as \( \) (Wikipedia's have them)
MARKDOWN_LINK = re.compile(r'\[([^\]]*)\]\(((?:\\.|[^()\s\\])*)(?:\s+"[^"]*")?\)')
CITATION = re.compile(r"【(\d+)†L(\d+)(?:-L(\d+))?】")


class BrowserError(Exception):
    """What the model did cannot be done (no such link, a refused address...): the message is its tool result."""


@dataclass
class SearchResult:
    title: str
    url: str
    snippet: str = ""


@dataclass
class Fetched:
    url: str  # after redirects
    content_type: str
    text: str


@dataclass
class Link:
    url: str
    text: str
    loc: int = -1  # a line of the target page (find results point into the page searched)


@dataclass
class Page:
    url: str
    title: str
    lines: list[str]
    links: dict[int, Link] = field(default_factory=dict)
    searchable: bool = True  # find works on fetched pages, not on search or find results


@dataclass
class Citation:
    start: int  # character offsets of the citation mark in the text
    end: int
    url: str
    title: str


# ---- fetching ---------------------------------------------------------------------------------------------


def check_url(url: str, allow_private: bool = False) -> None:
    """Refuse what a page must not make ossie fetch: schemes other than http(s), and hosts that resolve to a
    loopback, private, link-local, multicast or reserved address (unless allow_private)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise BrowserError(f"cannot open {url!r}: only http and https URLs can be opened")
    if not parts.hostname:
        raise BrowserError(f"cannot open {url!r}: the URL has no host")
    if allow_private:
        return
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80),
                                   proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as e:
        raise BrowserError(f"cannot open {url!r}: {parts.hostname} does not resolve ({e})") from None
    for info in infos:
        ip = ipaddress.ip_address(info[4][0].split("%")[0])
        if not ip.is_global or ip.is_multicast:
            raise BrowserError(f"cannot open {url!r}: {parts.hostname} is a local or private address ({ip}), "
                               "which the browser may not read")


def fetch(url: str, allow_private: bool = False, timeout: float = FETCH_TIMEOUT_S,
          max_bytes: int = MAX_PAGE_BYTES) -> Fetched:
    """GET a page: each hop of a redirect checked with check_url, at most max_bytes read."""
    import httpx

    headers = {"User-Agent": "Mozilla/5.0 (compatible; ossie browser tool)", "Accept": "text/html,text/plain,*/*"}
    with httpx.Client(timeout=timeout, follow_redirects=False, headers=headers) as client:
        for _ in range(MAX_REDIRECTS + 1):
            check_url(url, allow_private)
            try:
                with client.stream("GET", url) as r:
                    if r.is_redirect and "location" in r.headers:
                        url = urljoin(url, r.headers["location"])
                        continue
                    if r.status_code >= 400:
                        raise BrowserError(f"cannot open {url}: HTTP {r.status_code}")
                    body = bytearray()
                    for chunk in r.iter_bytes():
                        body += chunk
                        if len(body) >= max_bytes:
                            del body[max_bytes:]
                            break
                    content_type = r.headers.get("content-type", "text/html").split(";")[0].strip().lower()
                    text = bytes(body).decode(r.encoding or "utf-8", errors="replace")
                    return Fetched(str(r.url), content_type, text)
            except httpx.HTTPError as e:
                raise BrowserError(f"cannot open {url}: {type(e).__name__}: {e}") from None
    raise BrowserError(f"cannot open {url}: more than {MAX_REDIRECTS} redirects")


# ---- search backends ------------------------------------------------------------------------------------


class Backend:
    """Where searches go and pages come from. Subclasses implement search; fetch defaults to the web."""

    name = "web"

    def search(self, query: str, topn: int) -> list[SearchResult]:
        raise NotImplementedError

    def fetch(self, url: str, allow_private: bool) -> Fetched:
        return fetch(url, allow_private)


class KeyedBackend(Backend):
    """A search API called with a key, from the environment variable KEY_ENV unless given."""

    KEY_ENV = ""

    def __init__(self, api_key: str | None = None):
        self.api_key = api_key or os.environ.get(self.KEY_ENV)
        if not self.api_key:
            raise ValueError(f"the {self.name} search backend needs an API key: set {self.KEY_ENV}")

    def _call(self, method: str, url: str, **kw: Any) -> Any:
        """The API's JSON answer; a failure is the model's error message."""
        import httpx

        try:
            r = getattr(httpx, method)(url, timeout=FETCH_TIMEOUT_S, **kw)
        except httpx.HTTPError as e:
            raise BrowserError(f"search failed: {type(e).__name__}: {e}") from None
        if r.status_code >= 400:
            raise BrowserError(f"search failed: HTTP {r.status_code} from {urlsplit(url).hostname}")
        return r.json()


class ExaBackend(KeyedBackend):
    """Exa's search API (https://exa.ai)."""

    name, KEY_ENV = "exa", "EXA_API_KEY"

    def search(self, query: str, topn: int) -> list[SearchResult]:
        data = self._call("post", "https://api.exa.ai/search", headers={"x-api-key": self.api_key},
                          json={"query": query, "numResults": topn, "contents": {"text": {"maxCharacters": 400}}})
        return [SearchResult(r.get("title") or r["url"], r["url"], (r.get("text") or "").strip())
                for r in data.get("results", [])]


class YouComBackend(KeyedBackend):
    """You.com's search API (https://api.ydc-index.io)."""

    name, KEY_ENV = "you", "YDC_API_KEY"

    def search(self, query: str, topn: int) -> list[SearchResult]:
        data = self._call("get", "https://api.ydc-index.io/v1/search", headers={"X-API-Key": self.api_key},
                          params={"query": query, "count": topn})
        return [SearchResult(h.get("title") or h["url"], h["url"],
                             " ".join(h.get("snippets") or []) or h.get("description", ""))
                for h in data.get("results", {}).get("web", [])]


class DDGSBackend(Backend):
    """Metasearch (DuckDuckGo, Bing, ...) through the `ddgs` package (a dependency of ossie): no key needed."""

    name = "ddgs"

    def __init__(self):
        try:
            from ddgs import DDGS
        except ImportError:
            raise ValueError("the ddgs search backend needs the ddgs package: pip install ddgs") from None
        self._ddgs = DDGS

    def search(self, query: str, topn: int) -> list[SearchResult]:
        try:
            hits = self._ddgs().text(query, max_results=topn) or []
        except Exception as e:  # ddgs raises its own exceptions for every engine failure
            raise BrowserError(f"search failed: {type(e).__name__}: {e}") from None
        return [SearchResult(h.get("title") or h["href"], h["href"], h.get("body", "")) for h in hits]


class LocalBackend(Backend):
    """Pages held in memory ({url: HTML or text}): searched by the words they share with the query, opened without
    the network. Other URLs are fetched from the web as usual."""

    name = "local"

    def __init__(self, pages: Mapping[str, str]):
        self.pages = dict(pages)

    def search(self, query: str, topn: int) -> list[SearchResult]:
        words = set(re.findall(r"\w+", query.lower()))
        scored = []
        for url in self.pages:
            page = make_page(self.fetch(url, allow_private=False))
            text = re.sub(r"【\d+†([^†】]*)[^】]*】", r"\1", "\n".join(page.lines))
            found = re.findall(r"\w+", text.lower())
            score = sum(found.count(w) for w in words)
            if score:
                scored.append((-score, url, text))
        scored.sort()
        return [SearchResult(_title(self.pages[url], url), url, " ".join(text.split())[:200])
                for _, url, text in scored[:topn]]

    def fetch(self, url: str, allow_private: bool) -> Fetched:
        if url in self.pages:
            body = self.pages[url]
            return Fetched(url, "text/html" if _looks_like_html(body) else "text/plain", body)
        return super().fetch(url, allow_private)


BACKENDS = {"exa": ExaBackend, "you": YouComBackend, "ddgs": DDGSBackend}


def make_backend(name: str | None) -> Backend:
    """A search backend by name: "exa", "you", "ddgs", or None for the first one whose key is set (else ddgs)."""
    if name is None:
        return default_backend()
    if name not in BACKENDS:
        raise ValueError(f"unknown search backend {name!r}; choose from {sorted(BACKENDS)}")
    return BACKENDS[name]()


def default_backend() -> Backend:
    """Exa if EXA_API_KEY is set, else You.com if YDC_API_KEY is, else ddgs (no key)."""
    if os.environ.get("EXA_API_KEY"):
        return ExaBackend()
    if os.environ.get("YDC_API_KEY"):
        return YouComBackend()
    return DDGSBackend()


# ---- pages -------------------------------------------------------------------------------------------------


def _looks_like_html(body: str) -> bool:
    head = body[:2000].lower()
    return "<html" in head or "<body" in head or "<p" in head or "<!doctype" in head


def _title(body: str, url: str) -> str:
    m = re.search(r"<title[^>]*>(.*?)</title>", body, re.IGNORECASE | re.DOTALL)
    if m and m.group(1).strip():
        import html

        return html.unescape(" ".join(m.group(1).split()))
    return url


def _html_to_text(body: str, url: str) -> str:
    import html2text

    h = html2text.HTML2Text(baseurl=url, bodywidth=0)
    h.ignore_images = True
    h.ignore_emphasis = True
    return h.handle(body)


def _domain(url: str) -> str:
    return (urlsplit(url).hostname or "").removeprefix("www.")


def make_page(fetched: Fetched, view_source: bool = False) -> Page:
    """A fetched document as a page: HTML turned into text with its links numbered as 【id†text†domain】."""
    body = fetched.text
    if fetched.content_type not in ("text/html", "application/xhtml+xml") or view_source:
        if not (fetched.content_type.startswith("text/") or fetched.content_type in ("application/json",
                                                                                      "application/xml")):
            raise BrowserError(f"cannot show {fetched.url}: its content type is {fetched.content_type}")
        return Page(fetched.url, fetched.url, body.splitlines())
    text = _html_to_text(body, fetched.url)
    links: dict[int, Link] = {}

    def number(m: re.Match) -> str:
        label, target = " ".join(m.group(1).split()), re.sub(r"\\(.)", r"\1", m.group(2))
        if not target.startswith(("http://", "https://")):
            return label
        links[len(links)] = Link(target, label or target)
        return f"【{len(links) - 1}†{label or _domain(target)}†{_domain(target)}】"

    text = MARKDOWN_LINK.sub(number, text)
    lines = [line.rstrip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    squeezed: list[str] = []
    for line in lines:  # runs of blank lines as one
        if line or (squeezed and squeezed[-1]):
            squeezed.append(line)
    return Page(fetched.url, _title(body, fetched.url), squeezed, links)


class BrowserTool(Tool):
    """One browsing session (a stack of pages). `call(function, arguments)` runs a harmony call (`search`, `open`,
    `find`, arguments as JSON text) and returns the tool message; errors come back as text for the model. Safe to
    call from several threads (calls are taken one at a time)."""

    name = "browser"

    def __init__(self, backend: Backend | None = None, allow_private: bool = False, view_tokens: int = VIEW_TOKENS):
        self.backend = backend if backend is not None else default_backend()
        self.allow_private = allow_private
        self.view_tokens = view_tokens
        self.pages: list[Page] = []  # index = cursor
        self._lock = threading.Lock()

    # ---- the three functions ------------------------------------------------------------------------------
    def search(self, query: str, topn: int = 10) -> str:
        results = self.backend.search(query, max(1, min(int(topn), 20)))
        lines, links = [], {}
        for i, r in enumerate(results):
            links[i] = Link(r.url, r.title)
            lines.append(f"【{i}†{r.title}†{_domain(r.url)}】")
            lines += [s for s in (r.snippet or "").splitlines() if s.strip()] or [""]
            lines.append("")
        if not results:
            lines = ["No results."]
        page = Page(f"search: {query}", f"Search results for `{query}`", lines, links, searchable=False)
        return self._show(page, 0, -1)

    def open(self, id: int | str = -1, cursor: int = -1, loc: int = -1, num_lines: int = -1,
             view_source: bool = False) -> str:
        if isinstance(id, str) and not id.lstrip("-").isdigit():
            return self._show(make_page(self.backend.fetch(id, self.allow_private), view_source), loc, num_lines)
        page = self._page(cursor)
        id = int(id)
        if id < 0:  # scroll the page
            return self._show(page, loc, num_lines)
        if id not in page.links:
            raise BrowserError(f"no link {id} on page [{self._cursor(cursor)}]")
        link = page.links[id]
        if link.loc >= 0:  # a find result: the page it was found in, at the match
            target = next(p for p in reversed(self.pages) if p.url == link.url and p.searchable)
            return self._show(target, link.loc if loc < 0 else loc, num_lines)
        fetched = self.backend.fetch(link.url, self.allow_private)
        return self._show(make_page(fetched, view_source), loc, num_lines)

    def find(self, pattern: str, cursor: int = -1) -> str:
        page = self._page(cursor)
        if not page.searchable:
            raise BrowserError("find works on an opened page, not on search or find results")
        needle = pattern.lower()
        lines, links = [], {}
        for n, line in enumerate(page.lines):
            if needle in line.lower():
                links[len(links)] = Link(page.url, f"match at L{n}", loc=n)
                lines += [f"【{len(links) - 1}†match at L{n}】", line, ""]
                if len(links) == MAX_FIND_RESULTS:
                    break
        if not links:
            lines = [f"No matches for `{pattern}`."]
        found = Page(f"find: {pattern} in {page.url}", f"Find results for text: `{pattern}` in `{page.title}`",
                     lines, links, searchable=False)
        return self._show(found, 0, -1)

    # ---- harmony calls --------------------------------------------------------------------------------------
    def call(self, function: str, arguments: str) -> str:
        """Run `browser.<function>` with its JSON arguments; the tool message (an error explained, if it failed)."""
        with self._lock:
            try:
                args = json.loads(arguments or "{}")
                if not isinstance(args, dict):
                    raise BrowserError("the arguments must be a JSON object")
                args.pop("source", None)  # harmony declares it; there is one source here
                if function == "search":
                    return self.search(str(args.pop("query")), **_ints(args, "topn"))
                if function == "open":
                    return self.open(**_ints(args, "cursor", "loc", "num_lines"))
                if function == "find":
                    return self.find(str(args.pop("pattern")), **_ints(args, "cursor"))
                raise BrowserError(f"the browser has no function {function!r} (search, open, find)")
            except json.JSONDecodeError as e:
                return f"Error: the arguments are not valid JSON ({e})"
            except (KeyError, TypeError, ValueError) as e:
                return f"Error: bad arguments for browser.{function}: {e}"
            except BrowserError as e:
                return f"Error: {e}"

    # ---- the Tool interface (tools/base.py) ---------------------------------------------------------------
    @staticmethod
    def declare(system: SystemContent) -> SystemContent:
        return system.with_browser_tool()

    @classmethod
    def from_settings(cls, settings: ToolSettings) -> BrowserTool:
        return cls(make_backend(settings.search_backend), allow_private=settings.allow_private)

    @classmethod
    def check(cls, settings: ToolSettings) -> None:
        make_backend(settings.search_backend)

    def process(self, function: str, arguments: str) -> str:
        return self.call(function, arguments)

    def citations(self, text: str) -> list[Citation]:
        """The `【cursor†Lx-Ly】` marks in text that name a page of this session, with its URL."""
        out = []
        for m in CITATION.finditer(text):
            cursor = int(m.group(1))
            if 0 <= cursor < len(self.pages) and self.pages[cursor].searchable:
                page = self.pages[cursor]
                out.append(Citation(m.start(), m.end(), page.url, page.title))
        return out

    # ---- display ---------------------------------------------------------------------------------------------
    def _cursor(self, cursor: int) -> int:
        return len(self.pages) - 1 if cursor < 0 else cursor

    def _page(self, cursor: int) -> Page:
        if not self.pages:
            raise BrowserError("no page is open yet: search or open a URL first")
        c = self._cursor(cursor)
        if not 0 <= c < len(self.pages):
            raise BrowserError(f"no page at cursor {cursor} (cursors 0-{len(self.pages) - 1})")
        return self.pages[c]

    def _show(self, page: Page, loc: int, num_lines: int) -> str:
        """Push the page and show a window of it from line loc: num_lines lines, or about view_tokens tokens."""
        from ..tokenizer import harmony_encoding

        enc = harmony_encoding()
        self.pages.append(page)
        cursor = len(self.pages) - 1
        total = len(page.lines)
        start = min(max(loc, 0), max(total - 1, 0))
        end, used = start, 0
        while end < total and (end - start < num_lines if num_lines > 0 else used < self.view_tokens):
            used += len(enc.encode(f"L{end}: {page.lines[end]}\n", disallowed_special=()))
            end += 1
        body = "\n".join(f"L{n}: {page.lines[n]}" for n in range(start, end))
        where = "" if page.url.startswith(("search:", "find:")) else f"\n({page.url})"
        return (f"[{cursor}] {page.title}{where}\n**viewing lines [{start} - {max(end - 1, start)}] of "
                f"{max(total - 1, 0)}**\n\n{body}")

    def close(self) -> None:
        self.pages.clear()

    def __enter__(self) -> BrowserTool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _ints(args: dict, *names: str) -> dict[str, Any]:
    """The call's arguments, numbers among them checked (the model may write "3" for 3; id may be either)."""
    out = dict(args)
    for name in names:
        if name in out:
            out[name] = int(out[name])
    return out
