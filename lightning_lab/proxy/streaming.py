"""Token-by-token SSE: turn the engine's sampled tokens into OpenAI content deltas as they arrive.

Detokenising token by token is not text concatenation: a byte-level BPE token may end inside a
UTF-8 character (decoded as U+FFFD until the next token completes it), and a stop string may
begin in the text already seen. So each choice re-decodes its tokens, holds back an unfinished
character and any tail that could still become a stop string, and at the end emits the rest of
the engine's final text, which is authoritative. Concatenated deltas equal the non-streaming text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from .backends import Completion
from .protocol import ProtocolError, error_body

__all__ = ["IncrementalText", "ContentBeforeCalls", "Delta", "stream_deltas", "released",
           "top_texts"]


class IncrementalText:
    """One choice's text so far, released only where it can no longer change."""

    def __init__(self, decode: Callable[[list[int]], str], stop: tuple[str, ...],
                 stop_token_ids: set[int]):
        self.decode, self.stop, self.stop_token_ids = decode, stop, stop_token_ids
        self.ids: list[int] = []
        self.emitted = ""
        self.holdback = max((len(s) for s in stop), default=1) - 1

    def add(self, token: int) -> str:
        """Take one sampled token; return the text that became safe to send (maybe "")."""
        if token in self.stop_token_ids:  # the end-of-turn token is never part of the text
            return ""
        self.ids.append(token)
        text = self.decode(self.ids)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=len(text))
        safe = text[:cut] if cut < len(text) else text[:max(0, len(text) - self.holdback)]
        safe = safe.rstrip("\ufffd")  # an incomplete UTF-8 sequence: wait for its next byte
        if not safe.startswith(self.emitted) or len(safe) == len(self.emitted):
            return ""
        delta, self.emitted = safe[len(self.emitted):], safe
        return delta

    def finish(self, final: str) -> str:
        """The rest of the engine's final text (empty if the stream already sent all of it)."""
        if not final.startswith(self.emitted):  # cannot happen for prefix-stable tokenizers
            return ""
        delta, self.emitted = final[len(self.emitted):], final
        return delta


class ContentBeforeCalls:
    """The content part of a reply that may hold tool calls, released as it streams.

    Text goes out until the format's call marker (Hermes ``<tool_call>``) appears; a tail that
    could still become the marker, and trailing whitespace (the parser strips it from content),
    wait for the next text. After the marker nothing is content: the calls are parsed from the
    whole reply (``finish``), as the non-streaming answer is, so both agree.
    """

    def __init__(self, marker: str):
        self.marker, self.seen, self.emitted, self.calling = marker, "", "", False

    def add(self, text: str) -> str:
        """Take the next safe text of the reply; return the content that may go out now."""
        if self.calling:
            return ""
        self.seen += text
        at = self.seen.find(self.marker)
        self.calling = at >= 0
        end = at if self.calling else len(self.seen) - _marker_prefix(self.seen, self.marker)
        safe = self.seen[:end].rstrip()
        if not safe.startswith(self.emitted) or len(safe) == len(self.emitted):
            return ""
        delta, self.emitted = safe[len(self.emitted):], safe
        return delta

    def finish(self, content: str | None) -> str:
        """What the parsed reply's ``content`` adds to what went out (none if it disagrees)."""
        content = content or ""
        if not content.startswith(self.emitted):
            return ""
        delta, self.emitted = content[len(self.emitted):], content
        return delta


def _marker_prefix(text: str, marker: str) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of ``marker``."""
    return next((k for k in range(min(len(marker) - 1, len(text)), 0, -1)
                 if text.endswith(marker[:k])), 0)


@dataclass
class Delta:
    """New text (and the tokens that produced it) for one choice."""

    index: int
    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    """Per token, its most likely alternatives (when the request asked for them)."""


async def stream_deltas(backend: Any, prepared: Any, request: Any, temperature: float,
                        max_tokens: int) -> AsyncIterator[Delta | list[Completion]]:
    """``backend.stream`` regrouped into per-choice deltas; the last item is the completions.

    A token whose text is held back rides along with the next delta of its choice.
    """
    decode = backend.policy.tokenizer.decode
    stop_ids = backend.policy.engine.stop_token_ids
    texts = [IncrementalText(decode, tuple(request.stop), stop_ids) for _ in range(request.n)]
    pending: dict[int, Delta] = {}
    async for item in backend.stream(prepared, request, temperature, max_tokens):
        if isinstance(item, list):  # the completions: flush what the final texts add
            for index, completion in enumerate(item):
                delta = pending.pop(index, Delta(index, ""))
                delta.text += texts[index].finish(completion.text)
                if delta.text or delta.token_ids:
                    yield delta
            yield item
            return
        index, token, logprob, top = item
        delta = pending.setdefault(index, Delta(index, ""))
        delta.text += texts[index].add(token)
        delta.token_ids.append(token)
        delta.logprobs.append(logprob)
        if top is not None:
            delta.top_logprobs.append(top)
        if delta.text:
            yield pending.pop(index)


async def released(events: AsyncIterator[str], ticket: Any) -> AsyncIterator[str]:
    """The stream gives its tokens back when it ends, however it ends (client gone included)."""
    try:
        async for event in events:
            yield event
    finally:
        ticket.release()


def top_texts(backend: Any, top: list[list[tuple[int, float]]]) -> list[list[tuple[str, float]]]:
    """Per-token alternatives with their token ids replaced by the tokens' texts."""
    texts = iter(backend.token_texts([i for alts in top for i, _ in alts]))
    return [[(next(texts), lp) for _, lp in alts] for alts in top]


def sse_error(exc: Exception) -> str:
    """The in-band SSE error event of a stream whose headers are already sent (OpenAI's shape):
    a ``ProtocolError`` keeps its status and field, anything else is a ``server_error``."""
    error = exc if isinstance(exc, ProtocolError) else ProtocolError(
        f"{type(exc).__name__}: {exc}", type="server_error", status=500)
    return f"data: {json.dumps(error_body(error.message, error.type, error.param, error.code))}\n\n"

