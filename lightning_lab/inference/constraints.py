"""Constrained decoding with llguidance: per-row token masks from a grammar.

Why llguidance (compared on this machine, CPU only, ``pip install --dry-run`` against the pinned
torch): one wheel with no dependencies, so torch stays 2.13.0 (xgrammar 0.2 pulls triton and
apache-tvm-ffi; outlines pulls outlines_core, genson, diskcache and works through its own model
wrappers; lm-format-enforcer is pure Python and computes masks by walking the vocabulary, too slow
per token on 2 cores). llguidance is the Rust engine behind vLLM's and SGLang's ``guidance``
backend and llama.cpp's ``%llguidance``: it reads HF fast tokenizers directly, compiles JSON
Schema and Lark (with inline ``%json``), computes a 49k-token mask in well under a millisecond
and is maintained by the guidance team.

The logprob contract (see ``DEVELOPERS.md``): the mask only decides which token is *chosen*. The
recorded logprob of a constrained token is the unmasked policy logprob ``log_softmax(logits /
T)[token]``, which is what the trainer's forward recomputes, so ``behaviour_logprob_err`` stays
at float noise; the transition is marked ``meta["constrained"] = True`` so analyses can tell
that the behaviour distribution was the masked one.
"""

from __future__ import annotations

import json
import threading
import weakref
from typing import Any

import torch

__all__ = ["Constraint", "GrammarError", "compile_grammar", "json_schema_grammar"]

_TOKENIZERS: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()
_TOKENIZERS_LOCK = threading.Lock()


class GrammarError(ValueError):
    """The grammar (or JSON schema) cannot be compiled for this tokenizer."""


def _ll_tokenizer(tokenizer: Any, vocab_size: int, eos_ids: tuple[int, ...]) -> Any:
    """llguidance's view of a HF tokenizer; built once per tokenizer (~0.3 s)."""
    import llguidance.hf

    with _TOKENIZERS_LOCK:
        cached = _TOKENIZERS.get(tokenizer)
        if cached is None or cached[0] != (vocab_size, eos_ids):
            built = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size,
                                                 eos_token=list(eos_ids))
            cached = ((vocab_size, eos_ids), built)
            _TOKENIZERS[tokenizer] = cached
        return cached[1]


def json_schema_grammar(schema: dict[str, Any]) -> str:
    """A Lark grammar for one JSON value matching ``schema``, compact spacing."""
    from .tools import JSON_STYLE  # torch-free, no cycle

    schema = {**schema, "x-guidance": {**JSON_STYLE, **schema.get("x-guidance", {})}}
    return f"start: %json {json.dumps(schema)}\n"


def compile_grammar(grammar: str, tokenizer: Any, vocab_size: int, eos_ids: set[int] | tuple[int, ...]) -> str:
    """Validate a Lark grammar against the tokenizer; returns llguidance's grammar string."""
    import llguidance

    ll_tok = _ll_tokenizer(tokenizer, vocab_size, tuple(sorted(eos_ids)))
    compiled = llguidance.LLMatcher.grammar_from_lark(grammar)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(compiled, ll_tok)
    if is_error:
        raise GrammarError(f"cannot compile the constraint: {messages[0] if messages else '?'}")
    _probe(Constraint(compiled, tokenizer, vocab_size, eos_ids))
    return compiled


def _probe(constraint: "Constraint") -> None:
    """Take the grammar's first step before any sampling.

    llguidance builds lexer states lazily, so a grammar past its limits (``/a{1000000}/``:
    "too many expressions constructed") validates and then fails on its first token; finding
    that here turns it into a client error instead of a reply that ignores the grammar. A
    grammar that fails later, on a branch this step does not take, is caught while decoding.
    """
    allowed = constraint.allowed()
    allowed[list(constraint.eos_ids)] = False
    if bool(allowed.any()):
        constraint.advance(int(allowed.nonzero()[0]))
    if constraint.failed:
        raise GrammarError(f"llguidance gave up on the grammar: {constraint.error}")


class Constraint:
    """One row's grammar state: ``allowed()`` before sampling, ``advance(token)`` after."""

    def __init__(self, compiled: str, tokenizer: Any, vocab_size: int, eos_ids: set[int] | tuple[int, ...]):
        import llguidance

        self.vocab_size, self.eos_ids = vocab_size, tuple(sorted(eos_ids))
        self.matcher = llguidance.LLMatcher(
            _ll_tokenizer(tokenizer, vocab_size, self.eos_ids), compiled,
            limits=llguidance.LLParserLimits(verbose_errors=False))  # no parser dumps in errors
        if self.matcher.is_error():
            raise GrammarError(self.error)
        self._bits = torch.arange(32, dtype=torch.int32)

    def allowed(self) -> torch.Tensor:
        """Bool mask (V,) of tokens the grammar accepts next (only EOS once it is complete)."""
        import llguidance.torch as llt

        bitmask = llt.allocate_token_bitmask(1, self.vocab_size)  # (1, ceil(V / 32)) int32
        llt.fill_next_token_bitmask(self.matcher, bitmask)
        bits = (bitmask[0, :, None] >> self._bits) & 1  # (W, 32)
        return bits.flatten()[: self.vocab_size].bool()

    def advance(self, token: int) -> bool:
        """Feed the chosen token; False if the grammar failed (it rejected the token, or llguidance
        gave up on it, e.g. at a lexer limit): the matcher is then dead and the row must end.

        A stop token ends the row without being fed; it is only fine if the grammar is intact
        (a failed matcher's mask allows nothing but stop tokens)."""
        if token in self.eos_ids:
            return not self.failed
        return bool(self.matcher.consume_token(token))

    @property
    def failed(self) -> bool:
        return self.matcher.is_error()

    @property
    def error(self) -> str:
        """llguidance's reason, first line (the rest is a ``<non-verbose/>`` marker)."""
        return self.matcher.get_error().split("\n", 1)[0]
