"""Constrained decoding: steer the model into what a request demands instead of hoping for it.

- `tool_choice` "required" or a named function: the completion must be a call to an allowed function. The
  model may first reason (one analysis message); then the header `<|channel|>commentary to=functions.NAME
  <|constrain|>json<|message|>` is enforced token by token (only allowed names can be spelled), the
  arguments must be a JSON object, and `<|call|>` follows it.
- `tool_choice` "none": the completion must be a final answer (no call).
- `response_format` json_object / json_schema: the final answer must be a JSON object (its syntax is enforced;
  a schema is given to the model as instructions, not enforced).

The analysis message may be given a token budget (`reasoning_budget`), after which it is ended, so that the
demanded answer fits in max_tokens. A `Steering` object sees every sampled token (`advance`) and narrows the
next one (`mask`). The checks are
on tokens' bytes, with a small byte-level JSON automaton (`JsonPrefix`).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence

import torch

from ..special_tokens import CALL, END, N_ORDINARY, RETURN
from ..tokenizer import harmony_encoding, token_bytes

JSON_CANDIDATES = 512  # the most likely tokens checked against the JSON automaton at each step
CLOSING_BYTES = 10  # a closing's bytes beyond one per open container (the longest: finishing a key, '": null')

# ---- JSON syntax, byte by byte --------------------------------------------------------------------------------

_DIGITS = b"0123456789"
# modes
VALUE, OBJ_FIRST, OBJ_KEY, COLON, AFTER, ARR_FIRST, STRING, KEY, ESCAPE, UNICODE, NUMBER, LITERAL, DONE = range(13)


class JsonPrefix:
    """Whether bytes so far can begin one JSON object (the top level must be an object), and when it is complete.

    Whitespace is limited to one space after ':' and ',' (as json.dumps writes it): a model cannot wander off
    into endless indentation. The state is a small tuple, so trying a candidate token is cheap."""

    def __init__(self) -> None:
        self.state: tuple = ("", VALUE, None)  # (open containers, mode, detail)

    @property
    def done(self) -> bool:
        return self.state[1] == DONE

    def accepts(self, data: bytes) -> bool:
        return self._run(self.state, data) is not None

    def feed(self, data: bytes) -> None:
        state = self._run(self.state, data)
        if state is None:
            raise ValueError(f"not JSON: {data!r} after state {self.state}")
        self.state = state

    @staticmethod
    def _run(state: tuple, data: bytes) -> tuple | None:
        stack, mode, detail = state
        for c in data:
            while True:  # a byte that ends a number is read again in the mode after it
                again = False
                if mode == STRING or mode == KEY:
                    if c == 0x22:  # closing quote
                        mode, detail = (COLON, None) if mode == KEY else (AFTER, None)
                    elif c == 0x5C:
                        detail, mode = mode, ESCAPE
                    elif c < 0x20:
                        return None
                elif mode == ESCAPE:
                    if c == 0x75:  # \uXXXX
                        mode, detail = UNICODE, (detail, 4)
                    elif c in b'"\\/bfnrt':
                        mode, detail = detail, None
                    else:
                        return None
                elif mode == UNICODE:
                    if c not in b"0123456789abcdefABCDEF":
                        return None
                    back, left = detail
                    mode, detail = (back, None) if left == 1 else (UNICODE, (back, left - 1))
                elif c == 0x20 and mode in (VALUE, OBJ_KEY) and stack and not detail:
                    detail = "space"  # one space after ':' or ',' (compact JSON: no runs of whitespace)
                elif mode in (VALUE, ARR_FIRST):
                    detail = None
                    if mode == ARR_FIRST and c == 0x5D:  # ]
                        stack, mode = stack[:-1], AFTER
                    elif not stack and c != 0x7B:  # the top level is an object
                        return None
                    elif c == 0x7B:
                        stack, mode = stack + "{", OBJ_FIRST
                    elif c == 0x5B:
                        stack, mode = stack + "[", ARR_FIRST
                    elif c == 0x22:
                        mode = STRING
                    elif c == 0x2D or c in _DIGITS:
                        mode, detail = NUMBER, "-" if c == 0x2D else ("0" if c == 0x30 else "int")
                    elif c in b"tfn":
                        mode, detail = LITERAL, {0x74: b"rue", 0x66: b"alse", 0x6E: b"ull"}[c]
                    else:
                        return None
                elif mode in (OBJ_FIRST, OBJ_KEY):
                    detail = None
                    if c == 0x22:
                        mode = KEY
                    elif mode == OBJ_FIRST and c == 0x7D:
                        stack, mode = stack[:-1], AFTER
                    else:
                        return None
                elif mode == COLON:
                    if c != 0x3A:
                        return None
                    mode, detail = VALUE, None
                elif mode == LITERAL:
                    if c != detail[0]:
                        return None
                    mode, detail = (AFTER, None) if len(detail) == 1 else (LITERAL, detail[1:])
                elif mode == NUMBER:
                    nxt = _number_step(detail, c)
                    if nxt is not None:
                        detail = nxt
                    elif detail in ("0", "int", "frac", "exp"):  # a complete number ends here
                        mode, detail, again = AFTER, None, True
                    else:
                        return None
                elif mode == AFTER:
                    if not stack:
                        return None
                    if c == 0x2C:
                        mode, detail = (OBJ_KEY if stack[-1] == "{" else VALUE), None
                    elif (c == 0x7D and stack[-1] == "{") or (c == 0x5D and stack[-1] == "["):
                        stack = stack[:-1]
                    else:
                        return None
                else:  # DONE: nothing may follow the object
                    return None
                if mode == AFTER and not stack:
                    mode = DONE
                if not again:
                    break
        return (stack, mode, detail)


def closing(state: tuple) -> bytes:
    """The shortest bytes that complete the JSON object begun in `state`: the open string, key, number or literal
    finished (an empty key's value, a missing value as null), then every open container closed."""
    stack, mode, detail = state
    out = b""
    if mode == UNICODE:
        mode, out = detail[0], b"0" * detail[1]  # the rest of a \\uXXXX escape
    elif mode == ESCAPE:
        mode, out = detail, b"n"
    if mode == STRING:
        out += b'"'
    elif mode == KEY:
        out += b'": null'
    elif mode == OBJ_KEY:
        out += b'"": null'
    elif mode == COLON:
        out += b": null"
    elif mode == VALUE:
        out += b"null" if stack else b"{}"
    elif mode == NUMBER and detail in ("-", "dot", "e", "esign"):
        out += b"0"
    elif mode == LITERAL:
        out += detail
    return out + b"".join(b"}" if c == "{" else b"]" for c in reversed(stack))


def _number_step(part: str, c: int) -> str | None:
    """JSON number grammar: the part after reading c, or None if c cannot continue the number."""
    digit = c in _DIGITS
    if part == "-":
        return "0" if c == 0x30 else ("int" if digit else None)
    if part == "0":
        return "dot" if c == 0x2E else ("e" if c in b"eE" else None)
    if part == "int":
        return "int" if digit else ("dot" if c == 0x2E else ("e" if c in b"eE" else None))
    if part in ("dot", "frac"):
        return "frac" if digit else ("e" if part == "frac" and c in b"eE" else None)
    if part in ("e", "esign"):
        return "exp" if digit else ("esign" if part == "e" and c in b"+-" else None)
    if part == "exp":
        return "exp" if digit else None
    return None


# ---- harmony steering -------------------------------------------------------------------------------------------


class Steering:
    """A token-level automaton over the completion. Phases: a set of allowed token sequences (a trie), free
    analysis text, a JSON object; each ends by moving to the next phase."""

    def __init__(self, starts: list[tuple[list[int], str]], after_analysis: list[list[int]], end_token: int,
                 after_analysis_phase: str = "json"):
        self.reasoning_budget: int | None = None  # analysis tokens allowed before <|end|> is forced
        self.reasoning_tokens = 0
        self.budget: int | None = None  # the completion's max_tokens: the JSON is closed in time to fit in it
        self.tokens = 0
        # starts: (token sequence, then-phase) allowed at the beginning; phases: "analysis", "json", "text"
        self.after_analysis = after_analysis  # sequences allowed after the analysis message ends
        self.after_analysis_phase = after_analysis_phase
        self.end_token = end_token  # what ends the answer: <|call|> or <|return|>
        self._set_trie(list(starts))
        self.json: JsonPrefix | None = None
        self.finished = False

    def _set_trie(self, options: list[tuple[list[int], str]]) -> None:
        self.phase, self.options, self.prefix = "trie", options, []

    def copy(self) -> Steering:
        """A copy that advances on its own (a step's guesses are tried on one): its state copied, the tables shared
        (options and after_analysis are replaced, never changed in place)."""
        other = copy.copy(self)
        other.prefix = list(self.prefix)
        if self.json is not None:
            other.json = JsonPrefix()
            other.json.state = self.json.state
        return other

    # -- what may come next
    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits with every token the automaton forbids at -inf."""
        if self.phase == "trie":
            n = len(self.prefix)
            allowed = sorted({seq[n] for seq, _ in self.options if len(seq) > n and seq[:n] == self.prefix})
            return _only(logits, allowed)
        if self.phase == "analysis" and self.reasoning_budget is not None \
                and self.reasoning_tokens >= self.reasoning_budget:
            return _only(logits, [END])  # leave room for the answer the request demands
        if self.phase in ("analysis", "text"):  # free text, ended by <|end|> or the end token; no other special
            out = logits.clone()
            out[N_ORDINARY:] = float("-inf")
            ender = END if self.phase == "analysis" else self.end_token
            out[ender] = logits[ender]
            return out
        if self.phase == "json":
            if self.json.done:
                return _only(logits, [self.end_token])
            close = self._closing_tokens()
            if close is not None:
                return _only(logits, close[:1])
            return _only(logits, _json_candidates(logits, self.json))
        return logits  # finished: the stop token has been produced

    def _closing_tokens(self) -> list[int] | None:
        """When the budget left is what closing the JSON object and the end token take (one token to spare, as
        the rest of a closing may tokenize differently once it has begun), the tokens that close it; else None."""
        if self.budget is None:
            return None
        left = self.budget - self.tokens
        if left > len(self.json.state[0]) + CLOSING_BYTES:  # a closing is at most this many bytes, so tokens
            return None
        close = _encode(closing(self.json.state).decode())
        return close if left <= len(close) + 2 else None

    def advance(self, token: int) -> None:
        self.tokens += 1
        if self.phase == "trie":
            self.prefix.append(token)
            done = [then for seq, then in self.options if seq == self.prefix]
            if done:
                self.phase = done[0]
                if self.phase == "json":
                    self.json = JsonPrefix()
        elif self.phase == "analysis":
            self.reasoning_tokens += 1
            if token == END:
                self._set_trie([(seq, self.after_analysis_phase) for seq in self.after_analysis])
        elif self.phase == "text":
            if token == self.end_token:
                self.phase, self.finished = "finished", True
        elif self.phase == "json":
            if self.json.done:
                self.phase, self.finished = "finished", True
            else:
                self.json.feed(token_bytes()[token])


def _only(logits: torch.Tensor, allowed: Sequence[int]) -> torch.Tensor:
    out = torch.full_like(logits, float("-inf"))
    idx = torch.tensor(list(allowed), dtype=torch.long, device=logits.device)
    out[idx] = logits[idx]
    return out


@functools.lru_cache(maxsize=1)
def _string_safe() -> list[bool]:
    """Tokens that can continue any JSON string as they are: no quote, backslash or control byte."""
    return [not any(b == 0x22 or b == 0x5C or b < 0x20 for b in t) for t in token_bytes()]


def prepare() -> None:
    """Build the vocabulary's tables the steering reads (a few tenths of a second, once per process): a server
    does it at startup rather than in its first constrained request."""
    _string_safe()
    _first_bytes()


@functools.lru_cache(maxsize=1)
def _first_bytes() -> torch.Tensor:
    """The first byte of every ordinary token (a token's bytes are never empty)."""
    return torch.tensor([t[0] for t in token_bytes()[:N_ORDINARY]], dtype=torch.long)


@functools.lru_cache(maxsize=4096)
def _first_byte_ok(state: tuple) -> torch.Tensor:
    """Which bytes may come next in `state` [256]: a token whose first byte may not can never be accepted, so one
    vectorized test rules out most of the vocabulary before the automaton runs on any token."""
    return torch.tensor([JsonPrefix._run(state, bytes([b])) is not None for b in range(256)])


def _json_candidates(logits: torch.Tensor, state: JsonPrefix) -> list[int]:
    """The tokens among the most likely that keep the output a JSON prefix; if none of those does, the most
    likely one that does, searched among the tokens whose first byte can come next (where few can, as at the
    start of the object, scanning the whole vocabulary took a tenth of a second)."""
    vocab, safe = token_bytes(), _string_safe()
    in_string = state.state[1] in (STRING, KEY)
    top = torch.topk(logits[:N_ORDINARY], JSON_CANDIDATES).indices.tolist()
    ok = [t for t in top if (in_string and safe[t]) or state.accepts(vocab[t])]
    if ok:
        return ok
    eligible = _first_byte_ok(state.state)[_first_bytes()]
    scores = logits[:N_ORDINARY].masked_fill(~eligible, float("-inf"))
    for t in torch.argsort(scores, descending=True)[:int(eligible.sum())].tolist():
        if state.accepts(vocab[t]):
            return [t]
    raise RuntimeError("no token continues the JSON object")  # unreachable: '}' and '"' always continue


def _encode(text: str) -> list[int]:
    return list(harmony_encoding().encode(text, allowed_special="all"))


def tool_call_steering(names: Sequence[str], allow_reasoning: bool = True) -> Steering:
    """The completion must be a call to one of `names` (after at most one analysis message)."""
    if not names:
        raise ValueError("tool_choice demands a call, but no function tools are declared")
    suffix = _encode(" ") + _encode("<|constrain|>json<|message|>")
    calls = [_encode("commentary to=functions") + _encode("." + name) + suffix for name in names]
    channel = _encode("<|channel|>")
    starts = [(channel + c, "json") for c in calls]
    if allow_reasoning:
        starts.append((channel + _encode("analysis<|message|>"), "analysis"))
    after = [_encode("<|start|>assistant<|channel|>") + c for c in calls]
    return Steering(starts, after, CALL)


def answer_steering(json: bool = False) -> Steering:
    """The completion must be a final answer, no tool call (after at most one analysis message); with `json`, a
    JSON object."""
    then = "json" if json else "text"
    final = _encode("<|channel|>final<|message|>")
    starts = [(final, then), (_encode("<|channel|>analysis<|message|>"), "analysis")]
    return Steering(starts, [_encode("<|start|>assistant") + final], RETURN, after_analysis_phase=then)
