"""Request parameters, validated as OpenAI validates them, and OpenAI-style error bodies.

Every function here reads a parsed JSON body and either returns the value to use or raises an
`APIError` whose body names the offending parameter (`param`) and says why (`code`):
`invalid_type`, `invalid_value`, `missing_required_parameter`, `unsupported_parameter`,
`model_not_found`. Known parameters this server cannot honour (suffix, logit_bias, penalties,
tools...) are refused when set to anything but their neutral value.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

MAX_N = 128                   # choices per prompt
MAX_PROMPTS = 256             # prompts in one completions request
MAX_STOP = 64                 # stop strings
MAX_LOGPROBS = 5              # completions `logprobs`
MAX_TOP_LOGPROBS = 20         # chat `top_logprobs`
COMPLETIONS_MAX_TOKENS = 16   # OpenAI's default for /v1/completions
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class APIError(Exception):
    """An error answered with an OpenAI-style body: {"error": {message, type, param, code}}."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 code: str | None = None, type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = (message, status, param,
                                                                        code, type)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def missing(key: str) -> APIError:
    return APIError(f"you must provide a {key} parameter", param=key,
                    code="missing_required_parameter")


def _type_name(value) -> str:
    return {bool: "a boolean", int: "an integer", float: "a decimal", str: "a string",
            list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


def bad_type(key: str, expected: str, value) -> APIError:
    return APIError(f"Invalid type for '{key}': expected {expected}, but got "
                    f"{_type_name(value)} instead.", param=key, code="invalid_type")


def bad_value(key: str, message: str) -> APIError:
    return APIError(f"Invalid '{key}': {message}", param=key, code="invalid_value")


def unsupported(key: str, what: str = "") -> APIError:
    return APIError(f"'{key}' is not supported by this server{what}.", param=key,
                    code="unsupported_parameter")


# ---------------------------------------------------------------------------------------------
# Scalars


def integer(body: dict, key: str, default, lo: int | None = None, hi: int | None = None):
    """body[key] as an int within [lo, hi] (a whole float counts), or `default` if absent."""
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_type(key, "an integer", value)
    if lo is not None and value < lo:
        raise bad_value(key, f"integer below minimum value. Expected a value >= {lo}, but got "
                             f"{value} instead.")
    if hi is not None and value > hi:
        raise bad_value(key, f"integer above maximum value. Expected a value <= {hi}, but got "
                             f"{value} instead.")
    return value


def number(body: dict, key: str, default: float, lo: float, hi: float,
           lo_open: bool = False) -> float:
    """body[key] as a float within [lo, hi] (or (lo, hi] with `lo_open`), else `default`."""
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad_type(key, "a decimal", value)
    value = float(value)
    if not (lo < value if lo_open else lo <= value):
        raise bad_value(key, f"decimal below minimum value. Expected a value "
                             f"{'>' if lo_open else '>='} {lo:g}, but got {value:g} instead.")
    if not value <= hi:
        raise bad_value(key, f"decimal above maximum value. Expected a value <= {hi:g}, but got "
                             f"{value:g} instead.")
    return value


def boolean(body: dict, key: str, default: bool) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_type(key, "a boolean", value)
    return value


def stop_strings(body: dict) -> list[str]:
    """`stop`: a string or up to MAX_STOP non-empty strings."""
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise bad_type("stop", "a string or an array of strings", stop)
    if len(stop) > MAX_STOP:
        raise bad_value("stop", f"array too long. Expected an array with maximum length "
                                f"{MAX_STOP}, but got an array with length {len(stop)} instead.")
    if any(s == "" for s in stop):
        raise bad_value("stop", "stop strings must not be empty.")
    return stop


# ---------------------------------------------------------------------------------------------
# Whole requests


def check_model(body: dict, model_name: str) -> None:
    model = body.get("model")
    if model is None:
        raise missing("model")
    if not isinstance(model, str):
        raise bad_type("model", "a string", model)
    if model != model_name:
        raise APIError(f"The model `{model}` does not exist. This server serves "
                       f"`{model_name}`.", 404, param="model", code="model_not_found")


def streaming(body: dict) -> tuple[bool, bool]:
    """(`stream`, `stream_options.include_usage`); stream_options only with stream."""
    stream = boolean(body, "stream", False)
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, dict):
        raise bad_type("stream_options", "an object", options)
    if not stream:
        raise bad_value("stream_options", "only allowed when 'stream' is true.")
    return stream, boolean(options, "include_usage", False)


def refuse_unsupported(body: dict, chat: bool) -> None:
    """Refuse known parameters set to values this server cannot honour."""
    for key in ("presence_penalty", "frequency_penalty"):
        if number(body, key, 0.0, -2.0, 2.0) != 0.0:
            raise unsupported(key, " (only 0)")
    if body.get("logit_bias"):
        raise unsupported("logit_bias")
    (_refuse_chat_only if chat else _refuse_completions_only)(body)


def _refuse_chat_only(body: dict) -> None:
    for key in ("tools", "functions", "audio", "prediction"):
        if body.get(key):
            raise unsupported(key)
    for key in ("tool_choice", "function_call"):
        if body.get(key) not in (None, "none", "auto"):
            raise unsupported(key)
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise unsupported("response_format", " (only {\"type\": \"text\"})")
    if body.get("modalities") not in (None, ["text"]):
        raise unsupported("modalities", " (only [\"text\"])")


def _refuse_completions_only(body: dict) -> None:
    if body.get("suffix"):
        raise unsupported("suffix")
    best_of = integer(body, "best_of", None, 1, MAX_N)
    if best_of is not None and best_of != integer(body, "n", 1):
        raise unsupported("best_of", " (other than n)")


def chat_logprobs(body: dict) -> int | None:
    """Chat's `logprobs` flag and `top_logprobs`: None without log-probs, else how many of the
    most likely tokens to list per token."""
    logprobs = boolean(body, "logprobs", False)
    top = integer(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS)
    if top is not None and not logprobs:
        raise bad_value("top_logprobs", "requires logprobs to be true.")
    return (top or 0) if logprobs else None


def chat_messages(messages) -> list[dict]:
    """`messages` -> [{role, content}] with our role names and text content parts joined."""
    if not isinstance(messages, list) or not messages:
        if messages is None:
            raise missing("messages")
        raise bad_value("messages", "expected a non-empty array of messages.")
    out = []
    for i, m in enumerate(messages):
        key = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_type(key, "an object", m)
        role = CHAT_ROLES.get(m.get("role"))
        if role is None:
            raise bad_value(f"{key}.role", f"expected one of {', '.join(CHAT_ROLES)}, got "
                                           f"{m.get('role')!r}.")
        out.append({"role": role, "content": _message_text(key, m.get("content"))})
    return out


def _message_text(key: str, content) -> str:
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise bad_value(f"{key}.content", "only text content parts are supported.")
            parts.append(part["text"])
        content = "".join(parts)
    if not isinstance(content, str):
        raise bad_type(f"{key}.content", "a string or an array of text parts", content)
    return content


@dataclass(frozen=True)
class Sampling:
    """The sampling parameters of a request, validated."""
    n: int
    temperature: float
    top_p: float
    top_k: int            # 0 = off
    seed: int             # in [0, 2**31)
    stops: list[str]
    max_tokens: int | None  # None: the endpoint's default


def sampling(body: dict, max_tokens_keys: tuple[str, ...], prompts: int,
             min_tokens: int = 1) -> Sampling:
    """The sampling parameters; `max_tokens_keys` in order of preference (at least
    `min_tokens`), `prompts` the number of prompts (n times it is bounded). A missing seed is
    drawn at random."""
    n = integer(body, "n", 1, 1, MAX_N)
    temperature = number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    top_k = max(integer(body, "top_k", 0, -1), 0)  # -1 = off, as in vLLM
    seed = integer(body, "seed", None, -(1 << 63), (1 << 63) - 1)
    if seed is None:
        seed = random.SystemRandom().randrange(1 << 31)
    stops = stop_strings(body)
    max_tokens = None
    for key in max_tokens_keys:
        max_tokens = integer(body, key, None, min_tokens)
        if max_tokens is not None:
            break
    if prompts * n > MAX_N * 8:
        raise bad_value("n", f"n times the number of prompts is at most {MAX_N * 8}.")
    return Sampling(n, temperature, top_p, top_k, seed % (1 << 31), stops, max_tokens)


# ---------------------------------------------------------------------------------------------
# Response pieces


def finite(x: float) -> float:
    """A log-prob JSON can carry: -inf (and nan) become -9999.0."""
    x = float(x)
    return x if math.isfinite(x) else -9999.0


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
