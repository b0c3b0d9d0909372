"""Chats: phi-4's chat format and specials, chat templates rendered with jinja2 the way
transformers renders them, and the text spans of assistant turns (what SFT trains on).

phi-4's format is `<|im_start|>role<|im_sep|>text<|im_end|>` per message; `PHI4_TEMPLATE` is the
same format as a jinja chat template (what `render_chat` writes, and what an exported tokenizer's
tokenizer_config.json carries).
"""
from __future__ import annotations

import json
from datetime import datetime
from typing import Callable

from phijax.errors import DataError

EOS, IM_START, IM_SEP, IM_END, PAD = ("<|endoftext|>", "<|im_start|>", "<|im_sep|>", "<|im_end|>",
                                      "<|pad|>")
SPECIALS = (EOS, IM_START, IM_SEP, IM_END, PAD)
ROLES = ("system", "user", "assistant")

PHI4_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '<|im_sep|>' + "
    "message['content'] + '<|im_end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}")

# render(messages, add_generation_prompt) -> the chat as text
Render = Callable[[list, bool], str]


def render_chat(messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """phi-4's chat format as text, and the byte spans the loss is on (assistant replies, each
    with its closing <|im_end|>)."""
    parts, spans, size = [], [], 0
    for m in messages:
        head = f"{IM_START}{m['role']}{IM_SEP}"
        body = f"{m['content']}{IM_END}"
        size += len(head.encode())
        if m["role"] == "assistant":
            spans.append((size, size + len(body.encode())))
        size += len(body.encode())
        parts += [head, body]
    return "".join(parts), spans


def render_phi4(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """`PHI4_TEMPLATE` rendered without jinja."""
    text = render_chat(messages)[0]
    return text + f"{IM_START}assistant{IM_SEP}" if add_generation_prompt else text


def chat_error(messages) -> str | None:
    """Why `messages` is not a chat the template can render, or None."""
    if not isinstance(messages, list) or not messages:
        return "messages is not a non-empty list"
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            return "a message has no string content"
        if m.get("role") not in ROLES:
            return f"a message role is not one of {', '.join(ROLES)}"
    if not any(m["role"] == "assistant" for m in messages):
        return "messages has no assistant reply"
    return None


def assistant_spans(render: Render, messages: list[dict],
                    where: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered chat and the character spans of its assistant turns.

    A turn's span runs from the end of the chat before it rendered with an open assistant turn
    (add_generation_prompt) to the end of the chat rendered through it: the reply and whatever
    the template closes it with. Both renderings must be prefixes of the whole chat's; a
    template that renders earlier turns differently is a DataError naming `where`.
    """
    text = render(messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head, through = render(messages[:i], True), render(messages[:i + 1], False)
        if not (text.startswith(head) and text.startswith(through) and len(head) <= len(through)):
            raise DataError(f"{where}: the chat template does not render a chat's earlier turns "
                            f"as a prefix of the whole chat, so its assistant turns cannot be "
                            f"located for the loss mask")
        spans.append((len(head), len(through)))
    return text, spans


def _jinja_environment():
    """A sandboxed jinja2 environment set up like transformers' for chat templates."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}` renders its body (transformers uses the tag
        to mark assistant text; the spans here come from `assistant_spans`)."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body) \
                .set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def compile_template(source: str, specials: dict[str, str], where: str) -> Render:
    """A chat template as a render function; `specials` (bos_token, eos_token, ...) are the
    template's variables besides messages and add_generation_prompt, as in transformers."""
    import jinja2

    try:
        template = _jinja_environment().from_string(source)
    except jinja2.TemplateError as e:
        raise DataError(f"{where}: chat_template does not compile: {e}") from None

    def render(messages: list, add_generation_prompt: bool = False) -> str:
        try:
            return template.render(messages=messages, tools=None, documents=None,
                                   add_generation_prompt=add_generation_prompt, **specials)
        except jinja2.TemplateError as e:
            raise DataError(f"{where}: chat_template: {e}") from None

    return render
