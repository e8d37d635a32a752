"""Chat records into text: the chat templates, and the spans of a conversation that are trained or masked.

A chat record is ``{"messages": [{"role": ..., "content": ...}, ...]}`` with roles ``system``, ``user`` and
``assistant`` and at least one assistant message (:func:`check_messages`). :func:`message_spans` renders it as a
list of spans, each a text and whether the loss covers it (a text of None stands for the EOS token), so that masked
and trained parts are encoded separately and the loss mask has exact boundaries.

Chat templates (``data.chat_template``)
    ``lmforge`` (the default): lmforge's own plain-text template, which any tokenizer encodes. Each message is
    rendered as ``"<|{role}|>\\n{content}\\n"``, except that an assistant message's content is followed by the EOS
    *token* (an id, not text) and then ``"\\n"``::

        <|system|>
        You name the subject.
        <|user|>
        The brave fox sees the river.
        <|assistant|>
        fox<EOS>

    The loss is computed only on the assistant contents and the EOS after each; the role headers, the system and
    user text and the newline after each EOS are masked. Text after the last assistant message carries no loss
    and is left out.

    ``tokenizer``: the model's own Jinja template (``chat_template`` in its tokenizer_config.json, or
    ``chat_template.jinja``; carried by :class:`lmforge.tokenizers.HFTokenizer` and its checkpoints), or a path to a
    ``.jinja`` file. It is rendered as transformers' ``apply_chat_template`` renders it (:class:`ChatTemplate`): in
    a sandboxed Jinja environment (``ImmutableSandboxedEnvironment``, ``trim_blocks`` and ``lstrip_blocks``) with
    ``messages``, ``add_generation_prompt``, the tokenizer's ``bos_token`` / ``eos_token``, ``raise_exception``
    and ``strftime_now``. For each assistant message ``i``, ``messages[:i]`` is rendered with
    ``add_generation_prompt=True`` (the prompt the model would be given) and ``messages[:i+1]`` without; the
    assistant part is the text the second adds to the first, so the loss covers the assistant's text exactly as
    the template writes it, its end-of-turn token (``<|im_end|>``, ``<|eot_id|>``...) and whatever else the template
    puts in that turn. The pieces are encoded separately (:class:`ChatEncoder`); special tokens written in the text
    become their ids. lmforge adds no EOS (the template decides). A template whose render of ``messages[:i]`` does
    not start its render of ``messages[:i+1]`` (one that rewrites earlier turns) cannot be masked this way and is
    an error naming the record.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import datetime
from pathlib import Path
from typing import Any

from lmforge.data.examples import encode
from lmforge.data.records import Record, fields_of
from lmforge.data.sources import CorpusError

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
Span = tuple[str | None, bool]
"""A piece of an example: its text (None: the EOS token) and whether the loss covers it."""


class ChatTemplate:
    """A Jinja chat template, rendered as transformers' ``apply_chat_template`` renders it, in a sandbox.

    Args:
        source: The template text.
        name: How messages name it (``the tokenizer's chat template``, a file path).
        tokenizer: Gives the ``bos_token`` / ``eos_token`` variables (when it has them).
    """

    def __init__(self, source: str, name: str, tokenizer: Any) -> None:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        class Generation(jinja2.ext.Extension):
            """``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask marker): renders its body."""

            tags = {"generation"}

            def parse(self, parser):
                next(parser.stream)
                return parser.parse_statements(("name:endgeneration",), drop_needle=True)

        class Namespace(jinja2.utils.Namespace):
            """``namespace()`` that refuses underscore attributes, as transformers' does."""

            def __init__(*args, **kwargs):
                self, args = args[0], args[1:]
                attrs = dict(*args, **kwargs)
                for key in attrs:
                    Namespace._check(key)
                jinja2.utils.Namespace.__init__(self, attrs)

            def __setitem__(self, key, value):
                Namespace._check(key)
                jinja2.utils.Namespace.__setitem__(self, key, value)

            @staticmethod
            def _check(key):
                if isinstance(key, str) and key.startswith("_"):
                    raise jinja2.exceptions.SecurityError(f"namespace attribute {key!r} starts with an underscore")

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            # transformers' filter: Jinja's own escapes HTML characters
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        now = datetime.now()  # one instant per setup, so the renders of a record (and of all records) agree

        def strftime_now(format):
            return now.strftime(format)

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
        )
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = strftime_now
        env.globals["namespace"] = Namespace
        self.name = name
        try:
            self.template = env.from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as err:
            raise CorpusError(
                f"sft: {name}: not a valid Jinja template (line {err.lineno}: {_one_line(err.message)}); fix it or "
                "set data.chat_template: lmforge"
            ) from None
        self.variables = {}
        for key in ("bos_token", "eos_token"):
            value = getattr(tokenizer, key, None)
            if isinstance(value, str):
                self.variables[key] = value
        if "bos_token" in source and "bos_token" not in self.variables:
            log.warning(
                "sft: %s uses bos_token, but the tokenizer adds no beginning-of-text token: it renders as empty",
                name,
            )

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """The text of ``messages``, with the assistant's header after them when ``add_generation_prompt``."""
        return self.template.render(
            messages=messages,
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **self.variables,
        )


def load_template(chat_template: str, tokenizer: Any) -> ChatTemplate | None:
    """The Jinja template that ``data.chat_template`` names for ``tokenizer`` (None: lmforge's own)."""
    if chat_template == "lmforge":
        return None
    if chat_template == "tokenizer":
        source = getattr(tokenizer, "chat_template", None)
        if not isinstance(source, str) or not source.strip():
            raise CorpusError(
                "sft: data.chat_template: tokenizer, but the tokenizer has no chat template (none in its "
                "tokenizer_config.json or chat_template.jinja); give the path of a .jinja file in "
                "data.chat_template or set data.chat_template: lmforge"
            )
        return ChatTemplate(source, "the tokenizer's chat template", tokenizer)
    file = Path(chat_template).expanduser()
    if not file.is_file():
        raise CorpusError(
            f"sft: data.chat_template={chat_template!r} is not lmforge, tokenizer or an existing file; "
            "give the path of a .jinja template (relative to the current directory)"
        )
    return ChatTemplate(file.read_text(encoding="utf-8"), f"chat template {chat_template}", tokenizer)


def _one_line(text: str | None) -> str:
    return " ".join(str(text).split())


class ChatEncoder:
    """Encodes rendered chat text piece by piece, as the whole text would be encoded.

    Special tokens written in the text (the tokenizer's added special tokens, its EOS and bos) become their ids:
    a Hugging Face tokenizer splits its added tokens off itself, and any that ``encode`` would spell out as
    ordinary text (the byte tokenizer's ``<|endoftext|>``) are split off here. A piece that continues the text is
    encoded after a newline that is then removed (as transformers encodes chat pieces), for tokenizers that treat
    the start of a text differently (SentencePiece's prefix space); other tokenizers encode it as it is.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        special = dict(tokenizer.special_tokens()) if hasattr(tokenizer, "special_tokens") else {}
        for key in ("eos", "bos"):
            text, i = getattr(tokenizer, f"{key}_token", None), getattr(tokenizer, f"{key}_id", None)
            if isinstance(text, str) and text and i is not None:
                special.setdefault(text, int(i))
        self.special = {t: int(i) for t, i in special.items() if t and encode(tokenizer, t) != [int(i)]}
        longest_first = sorted(self.special, key=len, reverse=True)
        self.split = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")") if self.special else None
        self.newline = encode(tokenizer, "\n")
        if "\n" not in tokenizer.decode(self.newline):  # a tokenizer that cannot spell a newline: no trick
            self.newline = []
        self.mid_text = any(self._after_newline(p) not in (None, encode(tokenizer, p)) for p in ("a", "Hello"))

    def _after_newline(self, text: str) -> list[int] | None:
        ids = encode(self.tokenizer, "\n" + text)
        n = len(self.newline)
        return ids[n:] if n and ids[:n] == self.newline else None

    def encode(self, text: str, start: bool) -> list[int]:
        """The ids of ``text``; ``start``: it begins the sequence (else it continues the text before it)."""
        ids: list[int] = []
        parts = self.split.split(text) if self.split is not None else [text]
        for k, part in enumerate(parts):
            if k % 2:
                ids.append(self.special[part])
            elif part:
                after = None if (start and k == 0) or not self.mid_text else self._after_newline(part)
                ids += encode(self.tokenizer, part) if after is None else after
        return ids


# -- conversations into spans -----------------------------------------------------------------------------------


def message_spans(record: Record, messages: list[dict], template: ChatTemplate | None) -> list[Span]:
    """A record's messages (checked by :func:`check_messages`) as masked and trained spans: rendered by
    ``template``, or by lmforge's template (None)."""
    if template is not None:
        return _template_spans(record, messages, template)
    spans: list[Span] = []
    masked = ""
    for msg in messages:
        role, content = msg["role"], msg["content"]
        masked += f"<|{role}|>\n"
        if role == "assistant":
            spans += [(masked, False), (content, True), (None, True)]
            masked = "\n"
        else:
            masked += f"{content}\n"
    return spans


def check_messages(record: Record) -> list[dict]:
    """The record's messages, checked: roles, text contents, non-empty answers, at least one answer."""
    if "messages" not in record.data:
        raise CorpusError(
            f"sft: {record.where}: no field 'messages' (the record has {fields_of(record.data)}); "
            'give chat records as {"messages": [{"role": ..., "content": ...}]} or set data.format'
        )
    messages = record.data["messages"]
    if not isinstance(messages, list) or not messages:
        raise CorpusError(f"sft: {record.where}: 'messages' must be a non-empty list of {{role, content}} objects")
    has_answer = False
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            got = fields_of(msg) if isinstance(msg, dict) else type(msg).__name__
            raise CorpusError(f"sft: {record.where}: messages[{i}] needs 'role' and 'content' (it has {got})")
        role, content = msg["role"], msg["content"]
        if role not in ROLES:
            raise CorpusError(f"sft: {record.where}: messages[{i}] has role {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise CorpusError(f"sft: {record.where}: messages[{i}] content is {type(content).__name__}, not text")
        if role == "assistant":
            if not content.strip():
                raise CorpusError(
                    f"sft: {record.where}: messages[{i}] (assistant) is empty; "
                    "give every assistant message a content or remove the record"
                )
            has_answer = True
    if not has_answer:
        raise CorpusError(
            f"sft: {record.where}: no assistant message; the loss is on assistant messages, give at least one"
        )
    return messages


def _template_spans(record: Record, messages: list[dict], template: ChatTemplate) -> list[Span]:
    """Masked and trained text: for each answer, what the prompt render adds, then what the answer adds."""

    def render(i: int, prompt: bool) -> str:
        try:
            return template.render(messages[:i], add_generation_prompt=prompt)
        except Exception as err:  # the template's own code failed (raise_exception, a bad key, a type...)
            raise CorpusError(
                f"sft: {record.where}: {template.name} fails on messages[:{i}]: "
                f"{type(err).__name__}: {_one_line(str(err))}"
            ) from None

    spans: list[Span] = []
    done = ""  # the text so far: the render up to the previous answer
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prompt, full = render(i, True), render(i + 1, False)
        if not prompt.startswith(done):
            raise CorpusError(
                f"sft: {record.where}: {template.name} renders messages[:{i}] (with the generation prompt) as text "
                "that does not extend its render up to the previous assistant message (it rewrites earlier "
                "turns), so the answers cannot be masked; use data.chat_template: lmforge or another template"
            )
        if not full.startswith(prompt) or full == prompt:
            raise CorpusError(
                f"sft: {record.where}: {template.name} renders messages[:{i + 1}] as text that does not "
                f"{'add to' if full == prompt else 'start with'} its render of messages[:{i}] with "
                f"add_generation_prompt, so the assistant part of messages[{i}] cannot be told apart; "
                "use data.chat_template: lmforge or another template"
            )
        spans += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
        done = full
    return [(text, train) for text, train in spans if text]
