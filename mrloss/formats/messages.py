"""messages (chat): ``{"messages": [{"role", "content", "weight", "type"}], "tools", "chat_template_kwargs"}``,
rendered with the tokenizer's chat template.

Also read: TRL's conversational prompt-completion (``"prompt"`` and ``"completion"``, lists of messages),
``tools`` (a list, or its JSON string as TRL allows) and ``chat_template_kwargs`` (TRL's per-sample keyword
arguments of ``apply_chat_template``, e.g. ``enable_thinking``).

Weights: an assistant message is learned at weight 1.0 (in prompt-completion: every completion message, none
of the prompt), every other message 0; a message's ``weight`` and ``type`` (region type, default its role)
override that. A message with weight > 0 also learns its end of turn: the template text after its content up
to and including the first special token there (the tokenizer's EOS if present, e.g. ``<|im_end|>``), so the
model learns to stop. ``<LEARN weight=.. type=..>`` tags (the tag_based syntax) mark regions inside a
content. Role headers, system prompts the template adds and everything else it writes have weight 0.

Exact character offsets without guessing at the template: it renders the conversation once with a unique
sentinel in place of each content, the sentinels are located, and putting the real contents back must give
exactly the template's rendering of the real conversation (a template that strips, escapes or branches on
content is an error naming the message).
"""

from __future__ import annotations

import json

from mrloss.formats.errors import FormatError
from mrloss.formats.regions import Region, RegionText, check_list, check_mapping, check_str, check_weight
from mrloss.formats.spec import FormatSpec
from mrloss.formats.tag_based import parse_tag_based

ROLES = ("system", "user", "assistant", "tool")
# our keys, then those chat templates read (tool calls, reasoning), passed to the template unchanged
MESSAGE_KEYS = ("role", "content", "weight", "type", "name", "tool_calls", "tool_call_id", "reasoning_content")
SENTINEL = "\ue000mrloss-content-{}\ue001"  # private-use characters: no template or text transforms them


def is_chat_sample(sample: dict) -> bool:
    """Whether ``sample`` is a chat sample by its keys.

    Args:
        sample: a raw sample (dict).

    Returns:
        True for ``messages``, or TRL's ``prompt`` and ``completion`` (both, or either as a list of messages).
    """
    turns = [sample[key] for key in ("prompt", "completion") if key in sample]
    return "messages" in sample or len(turns) == 2 or any(isinstance(value, list) for value in turns)


def parse_messages(sample: dict, *, tokenizer=None, sample_id=None) -> RegionText:
    """RegionText of a chat sample: the chat template's rendering.

    Args:
        sample: ``{"messages", "tools", "chat_template_kwargs"}`` or TRL's ``{"prompt", "completion", ...}``
            (top-level keys checked by the dispatcher).
        tokenizer: a tokenizer with a chat template (any object with ``apply_chat_template``).
        sample_id: named in errors.

    Returns:
        The RegionText of the rendered text (``has_special_tokens``: encode adds none).
    """
    messages, learned_by_default = _messages(sample, sample_id)
    if tokenizer is None:
        raise FormatError(
            "the messages format needs the tokenizer, whose chat template renders the text (parse(..., tokenizer=...); "
            "mrloss show / prepare: --tokenizer DIR; mrloss train: model.path, a local chat model)",
            sample_id=sample_id,
            field="messages",
        )
    if not getattr(tokenizer, "chat_template", None):
        raise FormatError(
            f"the tokenizer ({type(tokenizer).__name__}) has no chat template: use a chat model's tokenizer "
            "(`mrloss show` / `prepare`: --tokenizer DIR; `mrloss train`: model.path) or set tokenizer.chat_template",
            sample_id=sample_id,
            field="messages",
        )
    parts = [
        _message(message, index, learned, sample_id)
        for index, (message, learned) in enumerate(zip(messages, learned_by_default))
    ]
    contents, weights, types, template_messages = (list(column) for column in zip(*parts))
    options = _template_options(sample, sample_id)
    text, starts = _render_located(tokenizer, template_messages, contents, options, sample_id)
    return RegionText(
        text,
        _regions(tokenizer, text, starts, contents, weights, types),
        0.0,
        has_special_tokens=True,
    )


def _message(message, index: int, learned_by_default: bool, sample_id) -> tuple[RegionText, float | None, str, dict]:
    """(content with its LEARN regions, weight or None for untyped context, region type, the message as the chat
    template gets it) of ``messages[index]``."""
    name = f"messages[{index}]"
    check_mapping(message, name, MESSAGE_KEYS, sample_id)
    if "role" not in message:
        raise FormatError("missing", sample_id=sample_id, field=f"{name}.role")
    role = message["role"]
    if role not in ROLES:
        raise FormatError(
            f"unknown role {role!r} (allowed: {', '.join(ROLES)})", sample_id=sample_id, field=f"{name}.role"
        )
    if "content" not in message:
        raise FormatError("missing", sample_id=sample_id, field=f"{name}.content")
    raw = message["content"]
    if not isinstance(raw, str):
        raise FormatError(
            f"must be a string, got {type(raw).__name__} (content parts / multimodal content are not supported)",
            sample_id=sample_id,
            field=f"{name}.content",
        )
    weight = check_weight(
        message.get("weight", 1.0 if learned_by_default else 0.0), f"{name}.weight", sample_id=sample_id
    )
    region_type = check_str(message.get("type", role), f"{name}.type", sample_id, allow_empty=False)
    try:
        content = parse_tag_based({"text": raw, "default_weight": weight})
    except FormatError as error:
        field = f"{name}.content" + (error.field[len("text") :] if error.field else "")
        raise FormatError(error.reason, sample_id=sample_id, field=field, position=error.position) from None
    template_message = {key: value for key, value in message.items() if key not in ("weight", "type")}
    return content, (weight if (weight > 0 or "type" in message) else None), region_type, template_message


def _messages(sample: dict, sample_id) -> tuple[list, list[bool]]:
    """(messages, learned by default per message) of ``messages`` or TRL's prompt + completion."""
    if "messages" in sample:
        for key in ("prompt", "completion"):
            if key in sample:
                raise FormatError(
                    f"give either 'messages' or 'prompt' + 'completion', not both ({key!r})",
                    sample_id=sample_id,
                    field=key,
                )
        messages = _message_list(sample["messages"], "messages", sample_id)
        return messages, [isinstance(m, dict) and m.get("role") == "assistant" for m in messages]
    for key in ("prompt", "completion"):
        if key not in sample:
            raise FormatError(
                "missing (chat samples need 'messages', or 'prompt' and 'completion')", sample_id=sample_id, field=key
            )
        if isinstance(sample[key], str):
            raise FormatError(
                "must be a list of messages (conversational prompt-completion); for plain text write a tag_based "
                "sample, text = prompt + <LEARN>completion</LEARN>",
                sample_id=sample_id,
                field=key,
            )
    prompt = _message_list(sample["prompt"], "prompt", sample_id, allow_empty=True)
    completion = _message_list(sample["completion"], "completion", sample_id)
    return prompt + completion, [False] * len(prompt) + [True] * len(completion)


def _message_list(value, field: str, sample_id, allow_empty: bool = False) -> list:
    messages = check_list(value, field, sample_id)
    if not messages and not allow_empty:
        raise FormatError("must not be empty", sample_id=sample_id, field=field)
    return messages


def _template_options(sample: dict, sample_id) -> dict:
    """Keyword arguments of ``apply_chat_template`` from ``tools`` and ``chat_template_kwargs``."""
    options = {}
    if "tools" in sample:
        tools = sample["tools"]
        if isinstance(tools, str):
            try:
                tools = json.loads(tools)
            except json.JSONDecodeError as error:
                raise FormatError(
                    f"invalid JSON: {error.msg}", sample_id=sample_id, field="tools", position=error.pos
                ) from None
        options["tools"] = check_list(tools, "tools", sample_id)
    extra = sample.get("chat_template_kwargs", {})
    if not isinstance(extra, dict):
        raise FormatError(
            f"must be an object, got {type(extra).__name__}", sample_id=sample_id, field="chat_template_kwargs"
        )
    reserved = [key for key in extra if key in ("tokenize", "conversation", "messages", "tools", "chat_template")]
    if reserved:
        raise FormatError(
            f"{reserved[0]!r} cannot be set here", sample_id=sample_id, field=f"chat_template_kwargs.{reserved[0]}"
        )
    return {**extra, **options}


def _render(tokenizer, messages: list[dict], options: dict, sample_id) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, **options)
    except Exception as error:  # the template's own checks (jinja2 TemplateError: roles must alternate, ...)
        raise FormatError(
            f"the chat template failed: {type(error).__name__}: {error}", sample_id=sample_id, field="messages"
        ) from None
    if not isinstance(text, str):
        raise FormatError(
            f"the chat template gave {type(text).__name__}, not a string", sample_id=sample_id, field="messages"
        )
    return text


def _render_located(tokenizer, messages, contents: list[RegionText], options, sample_id) -> tuple[str, list[int]]:
    """(the template's rendering of ``messages``, start of each content in it), checked exactly."""
    sentinels = [SENTINEL.format(index) for index in range(len(messages))]
    with_sentinels = _render(tokenizer, [{**m, "content": s} for m, s in zip(messages, sentinels)], options, sample_id)
    rendered = _render(tokenizer, [{**m, "content": c.text} for m, c in zip(messages, contents)], options, sample_id)
    pieces, starts, cursor, length = [], [], 0, 0
    for index, (sentinel, content) in enumerate(zip(sentinels, contents)):
        found = with_sentinels.find(sentinel, cursor)
        if found < 0 or with_sentinels.count(sentinel) != 1:
            raise FormatError(
                f"the chat template renders this content {with_sentinels.count(sentinel)} times, or out of order "
                "(each content must appear exactly once, in message order)",
                sample_id=sample_id,
                field=f"messages[{index}].content",
            )
        pieces.append(with_sentinels[cursor:found])
        length += found - cursor
        starts.append(length)
        pieces.append(content.text)
        length += len(content.text)
        cursor = found + len(sentinel)
    pieces.append(with_sentinels[cursor:])
    expected = "".join(pieces)
    if expected != rendered:
        shorter = min(len(expected), len(rendered))
        first = next((k for k, (a, b) in enumerate(zip(expected, rendered)) if a != b), shorter)
        index = max([k for k, start in enumerate(starts) if start <= first] or [0])
        raise FormatError(
            "the chat template changes this content (strips, escapes or branches on it), so its characters cannot "
            f"be located exactly in the rendered text (first difference at rendered character {first})",
            sample_id=sample_id,
            field=f"messages[{index}].content",
            position=max(first - starts[index], 0) if starts else None,
        )
    return rendered, starts


def _regions(tokenizer, text: str, starts, contents: list[RegionText], weights, types) -> list[Region]:
    """Regions of the rendered text: each learned (or typed) content, its LEARN regions inside, and the end of
    turn of each message with weight > 0."""
    regions: list[Region] = []
    for index, (start, content, weight, region_type) in enumerate(zip(starts, contents, weights, types)):
        if weight is None:  # context (weight 0, no type): only its LEARN regions
            regions += [Region(start + r.start, start + r.end, r.weight, r.type) for r in content.regions]
            continue
        cursor = start
        for r in content.regions:
            if r.start + start > cursor:
                regions.append(Region(cursor, start + r.start, weight, region_type))
            regions.append(Region(start + r.start, start + r.end, r.weight, r.type))
            cursor = start + r.end
        end = start + len(content.text)
        if end > cursor:
            regions.append(Region(cursor, end, weight, region_type))
        if weight > 0:
            limit = starts[index + 1] if index + 1 < len(starts) else len(text)
            turn_end = _end_of_turn(tokenizer, text, end, limit)
            if turn_end > end:
                last = regions[-1] if regions else None
                if last is not None and last.end == end and (last.weight, last.type) == (weight, region_type):
                    regions[-1] = Region(last.start, turn_end, weight, region_type)
                else:
                    regions.append(Region(end, turn_end, weight, region_type))
    return regions


def _end_of_turn(tokenizer, text: str, start: int, limit: int) -> int:
    """End of the first special token in ``text[start:limit]`` (the EOS token first, if it is there), else
    ``start`` (nothing to learn)."""
    eos = getattr(tokenizer, "eos_token", None)
    if eos and (found := text.find(eos, start, limit)) >= 0:
        return found + len(eos)
    specials = {str(token) for token in getattr(tokenizer, "all_special_tokens", []) if str(token)}
    specials |= {
        str(token) for token in getattr(tokenizer, "added_tokens_decoder", {}).values() if getattr(token, "special", 0)
    }
    found = [(position, token) for token in specials if (position := text.find(token, start, limit)) >= 0]
    if not found:
        return start
    position, token = min(found, key=lambda item: (item[0], -len(item[1])))
    return position + len(token)


FORMAT = FormatSpec(
    name="messages",
    keys=("messages", "prompt", "completion", "tools", "chat_template_kwargs"),
    parse=parse_messages,
    detect=is_chat_sample,
    detect_first=True,  # plain-text samples may carry TRL's prompt / completion as metadata: chat is tried first
    marking_keys=("messages",),  # a chat sample's "prompt" or "tools" next to plain text are only unknown keys
    text_field="messages",
    parse_options=("tokenizer",),
)
