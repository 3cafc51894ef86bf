"""`StopStrings`: text cut at the first stop string a request gave (OpenAI's `stop`, Ollama's `options.stop`)."""

from __future__ import annotations


def _prefix_function(s: str) -> list[int]:
    """Knuth-Morris-Pratt: for each i, the length of the longest proper prefix of s[:i+1] that is also its suffix."""
    fail = [0] * len(s)
    k = 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = fail[k - 1]
        if s[i] == s[k]:
            k += 1
        fail[i] = k
    return fail


class StopStrings:
    """Cuts text at the first stop string to complete, holding back a tail that could be the start of one. Each
    stop string is matched by its Knuth-Morris-Pratt automaton, so every character costs O(1) per stop string,
    however long the strings (a quadratic check on every token stalled the event loop)."""

    def __init__(self, stop: str | list[str] | None):
        self.stops = [s for s in ([stop] if isinstance(stop, str) else stop or []) if s]
        self.fail = [_prefix_function(s) for s in self.stops]
        self.matched = [0] * len(self.stops)  # characters of each stop string matched at the end of the text
        self.pending = ""
        self.hit = False

    def push(self, text: str) -> str:
        if not self.stops:
            return text
        if self.hit:
            return ""
        buf = self.pending + text
        start = len(self.pending)
        for j, ch in enumerate(text):
            done = 0  # the longest stop string completed by this character: "STOP" and "TOP" end together, and
            for i, stop in enumerate(self.stops):  # the text is cut where "STOP" starts (its "S" must not leak)
                k = self.matched[i]
                while k and stop[k] != ch:
                    k = self.fail[i][k - 1]
                if stop[k] == ch:
                    k += 1
                if k == len(stop):
                    done = max(done, k)
                self.matched[i] = k
            if done:
                self.hit, self.pending = True, ""
                return buf[:start + j + 1 - done]
        keep = max(self.matched)  # the held-back tail: the longest partial match
        self.pending = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep]

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        self.matched = [0] * len(self.stops)
        return out
