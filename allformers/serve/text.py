"""Token ids -> the text a client may see, one token at a time.

Two things are held back until they are settled: the bytes of a character that a byte-level
token left unfinished (they decode to U+FFFD), and a tail of the text that could still grow
into a stop string. Text that turns into a stop string is therefore never sent, even when the
stop string spans several tokens."""
from __future__ import annotations

from typing import Optional, Sequence


class TextOut:
    def __init__(self, tokenizer, stop: Optional[Sequence[str]] = None):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.ids: list[int] = []
        self.text = ""  # everything decoded so far (cut at a stop string once one is found)
        self.sent = 0  # len(text) already handed out
        self.offsets: list[int] = []  # where each token's text starts in `text`
        self.stopped = False  # a stop string was found; `text` ends right before it
        self._prefix = self._read = 0  # decode window (see add)

    def add(self, token_id: int) -> str:
        """Append one generated token; return the text that is now safe to send (maybe "")."""
        self.offsets.append(len(self.text))
        self.ids.append(int(token_id))
        # Decoding the whole list every step costs O(n) per token; decoding a token alone drops
        # SentencePiece's leading space. A window starting a few tokens back gives the right text.
        before = self.tokenizer.decode(self.ids[self._prefix:self._read])
        now = self.tokenizer.decode(self.ids[self._prefix:])
        if now.endswith("\ufffd") or len(now) <= len(before):
            return ""  # an unfinished character, or a token with no text of its own (yet)
        self.text += now[len(before):]
        self._prefix, self._read = self._read, len(self.ids)
        return self._release()

    def _release(self) -> str:
        if self._cut():
            return self._take(len(self.text))
        return self._take(len(self.text) - self._held())

    def _cut(self) -> bool:
        """Cut `text` before the earliest stop string in it. One cannot start inside text
        already sent: that text was never the start of a stop string."""
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True
        return self.stopped

    def _held(self) -> int:
        """Length of the longest tail of `text` that is the start of some stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text) - self.sent), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best

    def _take(self, end: int) -> str:
        if end <= self.sent:
            return ""
        out, self.sent = self.text[self.sent:end], end
        return out

    def flush(self) -> str:
        """At the end (eos or length): what was held back, an unfinished character included."""
        if not self.stopped:
            before = self.tokenizer.decode(self.ids[self._prefix:self._read])
            tail = self.tokenizer.decode(self.ids[self._prefix:])
            if len(tail) > len(before):
                self.text += tail[len(before):]
            self._prefix = self._read = len(self.ids)
            self._cut()
        return self._take(len(self.text))

    def n_visible_tokens(self) -> int:
        """Tokens whose text starts before the end of `text` (after a stop string cut)."""
        return sum(1 for o in self.offsets if o < len(self.text)) if self.stopped else len(self.ids)
