"""TRL's preference formats: which one a row is in, what is wrong with it, and its prompt.

TRL 1.16's ``DPOTrainer`` reads four formats, and so does dpolab:

| format                           | row                                                                          |
| -------------------------------- | ---------------------------------------------------------------------------- |
| standard                         | ``{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}``      |
| conversational                   | ``{"prompt": [{"role": "user", "content": "..."}], "chosen": [{"role":``     |
|                                  | ``"assistant", "content": "..."}], "rejected": [...]}``                      |
| standard, implicit prompt        | ``{"chosen": "The sky is blue.", "rejected": "The sky is green."}``          |
| conversational, implicit prompt  | ``{"chosen": [user, assistant], "rejected": [user, other assistant]}``       |

A standard completion carries its own leading space (``" blue."``): the sequence is ``prompt + completion``,
exactly as given. An implicit prompt is the longest common start of chosen and rejected (:func:`extract_prompt`,
TRL's ``trl.data_utils.extract_prompt``). Every row of a dataset must be in one format: TRL reads all rows in
the format of the first.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "KNOWN_ROLES",
    "is_conversational",
    "row_format",
    "extract_prompt",
    "prompt_of",
    "prompt_key",
    "row_problems",
]

KNOWN_ROLES = ("system", "developer", "user", "assistant", "tool")  # the roles of transformers' chat templates
_COMPLETIONS = ("chosen", "rejected")


def is_conversational(value: Any) -> bool:
    """A list of messages (TRL's conversational format), as opposed to a string."""
    return isinstance(value, list)


def row_format(row: Mapping[str, Any]) -> str:
    """ "standard" or "conversational", with ", implicit prompt" when the row has no ``prompt`` field."""
    kind = "conversational" if is_conversational(row.get("chosen")) else "standard"
    return kind if "prompt" in row else f"{kind}, implicit prompt"


def extract_prompt(chosen, rejected) -> tuple[Any, Any, Any]:
    """``(prompt, chosen, rejected)`` of an implicit-prompt row, as TRL 1.16's ``extract_prompt`` splits it: the
    prompt is the common start of chosen and rejected (characters, or whole messages), ending before a space that
    precedes the first difference, so that the space stays with the completions ("The sky is" + " blue.").
    When one is a prefix of the other, TRL's loop ends one element early; this follows it. (When the very first
    element differs, TRL reads ``chosen[-1]``; here the prompt is empty, which :func:`row_problems` refuses.)"""
    idx = 0
    for idx in range(min(len(chosen), len(rejected))):
        if chosen[idx] != rejected[idx]:
            if idx > 0 and chosen[idx - 1] == " ":  # the space stays with the completions
                idx -= 1
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]


def prompt_of(row: Mapping[str, Any]):
    """The row's prompt: its ``prompt`` field, or the one :func:`extract_prompt` finds."""
    return row["prompt"] if "prompt" in row else extract_prompt(row["chosen"], row["rejected"])[0]


def prompt_key(row: Mapping[str, Any]) -> str:
    """The prompt with whitespace runs collapsed (message roles kept): rows with equal keys share a prompt."""
    prompt = prompt_of(row)
    if is_conversational(prompt):
        return "\n".join(f"{m.get('role')}: {' '.join(str(m.get('content')).split())}" for m in prompt)
    return " ".join(prompt.split())


def _message_problem(messages: list) -> str | None:
    if not messages:
        return "is an empty list of messages"
    for k, message in enumerate(messages, start=1):
        if not isinstance(message, Mapping) or "role" not in message:
            got = type(message).__name__
            return f'message {k} must be an object with "role" and "content" (TRL\'s conversational format), got {got}'
        role, content = message["role"], message.get("content")
        if role not in KNOWN_ROLES:
            return f"message {k} has the unknown role {role!r} (known: {', '.join(KNOWN_ROLES)})"
        if message.get("tool_calls"):  # an assistant turn that calls tools may have no text
            continue
        if not isinstance(content, str):
            return f"message {k} ({role}) must have a string content, got {type(content).__name__}"
        if not content.strip():
            return f"message {k} ({role}) is empty"
    return None


def _value_problem(value: Any) -> str | None:
    if value is None:
        return "is null"
    if isinstance(value, str):
        return None if value.strip() else "is empty"
    if isinstance(value, list):
        return _message_problem(value)
    shown = str(value)[:40]
    return f"must be a string or a list of messages, got {type(value).__name__}: {shown!r}"


def row_problems(row: Any) -> list[tuple[str | None, str]]:
    """(field, message) for everything wrong inside one row: missing, null or empty fields, malformed messages,
    a row mixing strings and messages, chosen equal to rejected, an implicit prompt that cannot be extracted."""
    if not isinstance(row, Mapping):
        return [(None, f"expected a JSON object with fields prompt, chosen, rejected, got {type(row).__name__}")]
    fields = ("prompt", *_COMPLETIONS) if "prompt" in row else _COMPLETIONS
    found = []
    for field in fields:
        problem = "is missing" if field not in row else _value_problem(row[field])
        if problem:
            found.append((field, problem))
    if found:
        return found
    kinds = {field: "a list of messages" if is_conversational(row[field]) else "a string" for field in fields}
    for field in fields[1:]:
        if kinds[field] != kinds[fields[0]]:
            return [(field, f"is {kinds[field]} while {fields[0]!r} is {kinds[fields[0]]}: use one format per row")]
    chosen, rejected = row["chosen"], row["rejected"]
    if chosen == rejected or (isinstance(chosen, str) and chosen.strip() == rejected.strip()):
        return [("rejected", "is equal to chosen")]
    if "prompt" not in row:
        prompt = extract_prompt(chosen, rejected)[0]
        if not prompt or (isinstance(prompt, str) and not prompt.strip()):
            return [
                (
                    "chosen",
                    "shares no leading text with rejected, so there is no prompt to extract (TRL's implicit-prompt "
                    "format); give the row a 'prompt' field",
                )
            ]
    return []
