"""Instruction data: how a JSONL record becomes the text a model trains on, with a loss flag
per part, and how sampling wraps a prompt or a chat the same way.

prepare.py turns each record into parts, each encoded on its own (so the flags fall on token
boundaries) and written one document per record: [eot] parts... [eot] ...

    {"text": "..."}                             the whole document is in the loss
    {"prompt": "...", "response": "..."}        user turn, assistant marker | response, end
    {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}
                                                system and user turns, each assistant marker
                                                | each assistant reply and its end marker

(| : the parts after it are in the loss.) A prompt/response record ends at its boundary token,
which is in the loss, so generation learns to stop there; a chat's assistant turns end with
the "end" marker (text), since a boundary would cut the conversation into documents. The
template's strings are stored in meta.json and in the checkpoint, so sample.py and app.py
wrap a prompt (prompt_ids) or a chat history (chat_ids) exactly as the training data was.
"""
import json

import numpy as np

ROLES = ("system", "user", "assistant")
# the default template: markers on their own line, readable in the prepared data
TEMPLATE = {
    "system": "<|system|>\n{content}\n",
    "user": "<|user|>\n{content}\n",
    "assistant": "<|assistant|>\n",  # what precedes an answer; the model writes from here
    "end": "<|end|>\n",  # closes each assistant turn of a chat (in the loss)
}
KINDS = ("text", "prompt_response", "messages")


def _type_name(value) -> str:
    return {str: "string", list: "list", dict: "object", bool: "boolean", type(None): "null",
            int: "number", float: "number"}.get(type(value), type(value).__name__)


def record_kind(record) -> str:
    """Which of KINDS a parsed JSON line is; ValueError says what is wrong with it."""
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a JSON object, got a {_type_name(record)}")
    keys = [k for k in ("text", "prompt", "response", "messages") if k in record]
    if not keys:
        known = ('ShareGPT\'s "conversations": rename it "messages", each turn\'s "from" and "value" "role" and '
                 '"content", and "human" and "gpt" "user" and "assistant"' if "conversations" in record else
                 'Alpaca\'s instruction, input and output: "prompt" is the instruction (and the input after it), '
                 '"response" the output' if "instruction" in record and "output" in record else
                 'a .jsonl file that is no instruction data (a JSON log, say) is read as plain text with --format=text')
        raise ValueError(f'the record has none of "text", "prompt" and "response", or "messages" (its keys: '
                         f'{", ".join(map(repr, list(record)[:8])) or "none"}); {known}')
    kind = "messages" if "messages" in record else "text" if "text" in record else "prompt_response"
    wanted = {"text": ("text",), "prompt_response": ("prompt", "response"), "messages": ("messages",)}[kind]
    extra = [k for k in keys if k not in wanted]
    if extra:
        raise ValueError(f'the record mixes "{kind}" fields with {", ".join(map(repr, extra))}; '
                         f'give "text", or "prompt" and "response", or "messages"')
    missing = [k for k in wanted if k not in record]
    if missing:  # only prompt_response has two fields
        raise ValueError(f'the record has "{keys[0]}" but no "{missing[0]}"')
    if kind == "messages":
        _check_messages(record["messages"])
    else:
        for key in wanted:
            if not isinstance(record[key], str):
                raise ValueError(f'"{key}" must be a string, got a {_type_name(record[key])}')
    return kind


def _check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f'"messages" must be a non-empty list, got {_type_name(messages)}'
                         f'{" (empty)" if messages == [] else ""}')
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be an object with role and content, got a {_type_name(m)}")
        if m.get("role") not in ROLES:
            got = (f"no role but {', '.join(map(repr, list(m)[:4]))} (ShareGPT's from/value: rename them role/content, "
                   f"human/gpt to user/assistant)" if "role" not in m else repr(m.get("role")))
            raise ValueError(f"messages[{i}].role must be system, user or assistant, got {got}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}].content must be a string, got "
                             f"{'nothing' if 'content' not in m else 'a ' + _type_name(m['content'])}")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError('"messages" has no assistant turn, so nothing would be in the loss')


def fill(template: dict, role: str, content: str) -> str:
    """A system or user turn as text (str.replace, so braces in content stay as they are)."""
    return template[role].replace("{content}", content)


def record_parts(record: dict, kind: str, template: dict) -> list[tuple[str, bool]]:
    """The record as [(text, in the loss)], in order; see the module docstring. Line ends inside
    its strings ("\\r\\n", "\\r": data written on Windows) are "\\n", as in every text a tool reads."""
    return [(text.replace("\r\n", "\n").replace("\r", "\n"), trained)
            for text, trained in _parts(record, kind, template)]


def _parts(record: dict, kind: str, template: dict) -> list[tuple[str, bool]]:
    if kind == "text":
        return [(record["text"], True)]
    if kind == "prompt_response":
        return [(fill(template, "user", record["prompt"]), False), (template["assistant"], False),
                (record["response"], True)]
    parts = []
    for m in record["messages"]:
        if m["role"] == "assistant":
            parts += [(template["assistant"], False), (m["content"] + template["end"], True)]
        else:
            parts.append((fill(template, m["role"], m["content"]), False))
    return parts


def encode_parts(tokenizer, parts: list[tuple[str, bool]]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (uint32) of the parts, each encoded on its own, and a uint8 flag per id."""
    ids, mask = [np.zeros(0, np.uint32)], [np.zeros(0, np.uint8)]
    for text, trained in parts:
        part = tokenizer.encode_to_numpy(text)
        ids.append(part)
        mask.append(np.full(len(part), trained, dtype=np.uint8))
    return np.concatenate(ids), np.concatenate(mask)


def prompt_ids(tokenizer, template: dict, prompt: str, drop_unknown: bool = False) -> list[int]:
    """A prompt wrapped as a prompt/response record's start: [eot] user turn, assistant marker."""
    parts = [fill(template, "user", prompt), template["assistant"]]
    return [tokenizer.eot_id] + [i for p in parts for i in tokenizer.encode(p, drop_unknown=drop_unknown)]


def chat_ids(tokenizer, template: dict, turns: list[tuple[str, str]], budget: int,
             drop_unknown: bool = False) -> tuple[list[int], int]:
    """A chat so far, [(role, content), ...] ending with the user's new turn, as ids that end
    with the assistant marker, and how many of the oldest turns were left out so that it fits
    in budget tokens. A leading system turn is kept; then turns go, oldest first (an answer
    never without its question); the newest user turn always stays (the model's window
    slides if even that is too long)."""
    def turn(role, content):
        if role == "assistant":
            return (tokenizer.encode(template["assistant"], drop_unknown=drop_unknown)
                    + tokenizer.encode(content + template["end"], drop_unknown=drop_unknown))
        return tokenizer.encode(fill(template, role, content), drop_unknown=drop_unknown)

    system = [turn(*t) for t in turns[:1] if t[0] == "system"]
    rest = [turn(*t) for t in turns[len(system):]]
    tail = tokenizer.encode(template["assistant"], drop_unknown=drop_unknown)
    dropped = 0
    size = lambda: 1 + sum(map(len, system + rest[dropped:])) + len(tail)  # noqa: E731 (+1: the eot)
    roles = [role for role, _ in turns[len(system):]]
    while size() > budget and dropped < len(rest) - 1:
        dropped += 1
        while roles[dropped] == "assistant" and dropped < len(rest) - 1:  # no answer without its question
            dropped += 1
    ids = [tokenizer.eot_id] + [i for t in system + rest[dropped:] for i in t] + tail
    return ids, dropped


def chat_template(template: dict) -> str:
    """template as a Jinja chat template (tokenizer_config.json's chat_template), for
    transformers' apply_chat_template and llama.cpp: the text chat_ids encodes, boundary token
    (eos_token) first; add_generation_prompt ends it with the assistant marker. chat_ids (and
    prepare.py) encode turn by turn, a template renders one string: the ids are the same
    (tested with transformers) except where a message ends in whitespace, which encoded on its
    own merges with the template's line end into one token and rendered in one string does not."""
    def text(role: str, content: str) -> str:  # a Jinja expression: the literal pieces around content
        pieces = [json.dumps(piece) for piece in template[role].split("{content}")]
        return "{{ " + f" ~ {content} ~ ".join(pieces) + " }}"

    turn = "message['content']"
    return ("{{ eos_token }}{% for message in messages %}"
            "{% if message['role'] == 'assistant' %}" + text("assistant", "''") + "{{ message['content'] }}"
            + text("end", "''") + "{% elif message['role'] == 'system' %}" + text("system", turn)
            + "{% else %}" + text("user", turn) + "{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}" + text("assistant", "''") + "{% endif %}")


def stop_strings(template: dict) -> list[str]:
    """Where an answer ends in text: the end marker (without its trailing line end), and the
    start of a next user turn, should the model write one instead."""
    stops = [template["end"].rstrip(), template["user"].split("{content}")[0].rstrip()]
    return [s for s in stops if s]  # a user turn with nothing before its content marks nothing
