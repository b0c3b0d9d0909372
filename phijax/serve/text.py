"""Tokens as the API shows them: the tokenizer seen from the server (`Vocab`), and one choice's
text as its tokens arrive (`TextStream`), cut at stop strings, in the pieces a stream sends.
"""
from __future__ import annotations

import bisect
import codecs
from typing import NamedTuple

from phijax.serve import schemas
from phijax.serve.schemas import MAX_PROMPTS, bad_type, bad_value

PROMPT_TYPES = ("a string, an array of strings, an array of token ids or an array of token id "
                "arrays")


class Vocab:
    """The tokenizer seen from the API: text -> ids, and each id's bytes and display text."""

    def __init__(self, tokenizer):
        self.tokenizer, self.eos_id = tokenizer, tokenizer.eos_id
        self.size = tokenizer.vocab_size
        self.token_bytes = [tokenizer.token_bytes(i) for i in range(self.size)]

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode([text])[0]) if text else []

    def bytes(self, t: int) -> bytes:
        return self.token_bytes[t] if 0 <= t < self.size else b""

    def text(self, t: int) -> str:
        """A token's text as OpenAI shows it: `bytes:\\xNN...` where it is not valid UTF-8."""
        raw = self.bytes(t)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    def pieces(self, ids: list[int]) -> tuple[str, list[int]]:
        """The text of `ids` decoded from their bytes, and each token's character offset."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        parts, offsets, size = [], [], 0
        for t in ids:
            offsets.append(size)
            parts.append(decoder.decode(self.bytes(t)))
            size += len(parts[-1])
        parts.append(decoder.decode(b"", final=True))
        return "".join(parts), offsets

    def stop_token_ids(self, stops: list[str]) -> tuple[int, ...]:
        """Tokens whose text is exactly a stop string: the sampler can stop on them early."""
        out = []
        for s in stops:
            ids = self.encode(s)
            if len(ids) == 1 and self.token_bytes[ids[0]] == s.encode():
                out.append(ids[0])
        return tuple(out)

    def ids(self, seq: list, key: str) -> list[int]:
        bad = [t for t in seq if isinstance(t, bool) or not isinstance(t, int)
               or not 0 <= t < self.size]
        if bad:
            raise bad_value(key, f"token ids must be integers in [0, {self.size}), got "
                                 f"{bad[0]!r}.")
        return list(seq)

    def prompts(self, prompt) -> list[list[int]]:
        """`prompt` -> token id lists: a string, strings, token ids or lists of token ids."""
        if prompt is None:
            raise schemas.missing("prompt")
        if isinstance(prompt, str):
            prompts = [self.encode(prompt)]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = [self.encode(p) for p in prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
            prompts = [self.ids(prompt, "prompt")]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, list) and p
                                                         for p in prompt):
            prompts = [self.ids(p, "prompt") for p in prompt]
        else:
            raise bad_type("prompt", PROMPT_TYPES, prompt)
        if len(prompts) > MAX_PROMPTS:
            raise bad_value("prompt", f"at most {MAX_PROMPTS} prompts per request, got "
                                      f"{len(prompts)}.")
        # An empty prompt starts a new document, as after <|endoftext|> in training.
        return [p if p else [self.eos_id] for p in prompts]


class Delta(NamedTuple):
    """What a choice adds: text, the tokens that start in it (their log-probs, top log-probs or
    None, character offsets in the choice's text) and, in its last delta, the finish reason."""
    text: str
    tokens: list[int]
    logprobs: list[float]
    top: list | None
    offsets: list[int]
    finish: str | None


class TextStream:
    """One choice's text as its tokens arrive: decoded incrementally (a UTF-8 character may
    span tokens), cut before the first stop string, and handed out only as far as no stop
    string can still begin. A final special stop token (<|endoftext|>, <|im_end|>) is not part
    of the text; tokens are kept where they start before the cut."""

    def __init__(self, vocab: Vocab, stops: list[str], special_ids: tuple[int, ...],
                 stop_ids: tuple[int, ...], top: bool = False):
        self.vocab, self.stops, self.special, self.stop_ids = vocab, stops, special_ids, stop_ids
        self.with_top = top
        self.longest = max(map(len, stops), default=0)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text, self.sent = "", 0           # characters decoded, and handed out
        self.tokens, self.logprobs, self.top, self.offsets = [], [], [], []
        self.sent_tokens = 0
        self.finish: str | None = None

    def feed(self, tokens: list[int], logprobs: list[float], top, done: bool) -> Delta | None:
        """Take a row's new tokens (`done`: its last); what can be handed out now, if any."""
        if self.finish:
            return None
        reason = None
        if done:
            reason = "stop" if tokens and tokens[-1] in self.stop_ids else "length"
            if reason == "stop" and tokens[-1] in self.special:
                tokens, logprobs, top = tokens[:-1], logprobs[:-1], top and top[:-1]
        for t in tokens:
            self.offsets.append(len(self.text))
            self.text += self.decoder.decode(self.vocab.bytes(t))
        self.tokens += tokens
        self.logprobs += logprobs
        self.top += top or []
        if done:
            self.text += self.decoder.decode(b"", final=True)
        cut = min((i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0),
                  default=None)
        if cut is not None:
            end, reason, ntok = cut, "stop", bisect.bisect_left(self.offsets, cut)
            self.text = self.text[:cut]
        elif done:
            end, ntok = len(self.text), len(self.tokens)
        else:
            end = len(self.text) - self._held()
            ntok = bisect.bisect_left(self.offsets, end)
        ntok = max(ntok, self.sent_tokens)
        span = slice(self.sent_tokens, ntok)
        delta = Delta(self.text[self.sent:end], self.tokens[span], self.logprobs[span],
                      self.top[span] if self.with_top else None,
                      self.offsets[span], reason)
        self.sent, self.sent_tokens, self.finish = end, ntok, reason
        return delta if delta.text or delta.tokens or reason else None

    def _held(self) -> int:
        """How many final characters could begin a stop string (held back)."""
        tail = self.text[max(self.sent, len(self.text) - self.longest + 1):]
        for k in range(len(tail), 0, -1):
            if any(s.startswith(tail[-k:]) for s in self.stops):
                return k
        return 0
