"""TRL's preference formats: which one a row is in, what is wrong with it, and its prompt.

TRL 1.16's ``DPOTrainer`` reads four formats, and so does dpolab:

| format                           | row                                                                          |
| -------------------------------- | ---------------------------------------------------------------------------- |
| standard                         | ``{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}``      |
| conversational                   | ``{"prompt": [{"role": "user", "content": "..."}], "chosen": [{"role":``     |
|                                  | ``"assistant", "content": "..."}], "rejected": [...]}``                      |
| standard, implicit prompt        | ``{"chosen": "The sky is blue.", "rejected": "The sky is green."}``          |
| conversational, implicit prompt  | ``{"chosen": [user, assistant], "rejected": [user, other assistant]}``       |

dpolab also reads rankings of K >= 2 completions of one prompt (TRL has no listwise format; this one follows its
fields): ``{"prompt": "The sky is", "completions": [" blue.", " grey.", " green."]}``, best first, or with
``"scores": [0.9, 0.1, 0.5]`` (higher is better; the order is then the scores', and the completions may come in any
order). Completions are strings (standard) or lists of messages (conversational, one assistant turn each, as
``chosen``); a ranking always names its prompt. Refused, by row and field: fewer than 2 completions, two equal ones,
a score count other than the completions', a score that is not a finite number, and tied scores: Plackett-Luce
(eq. 5.1) ranks strictly, so two completions that score the same have no order to learn from, and ordering them by
their place in the list would teach the model a preference nobody stated. Every ranking of a dataset has the same
K (a batch is B x K). A standard completion carries its own leading space (``" blue."``): the sequence is
``prompt + completion``, exactly as given. An implicit prompt is the longest common start of chosen and rejected (:func:`extract_prompt`,
TRL's ``trl.data_utils.extract_prompt``). Every row of a dataset must be in one format: TRL reads all rows in
the format of the first.
"""

from __future__ import annotations

import math
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
    "is_listwise",
    "ranked_completions",
]

KNOWN_ROLES = ("system", "developer", "user", "assistant", "tool")  # the roles of transformers' chat templates
_COMPLETIONS = ("chosen", "rejected")
LISTWISE_FIELD = "completions"  # a row holding this field is a ranking, best first (or ordered by "scores")


def is_conversational(value: Any) -> bool:
    """A list of messages (TRL's conversational format), as opposed to a string."""
    return isinstance(value, list)


def is_listwise(row: Mapping[str, Any]) -> bool:
    """A ranking ``{"prompt", "completions"}`` (module docstring), as opposed to a pair."""
    return LISTWISE_FIELD in row


def row_format(row: Mapping[str, Any]) -> str:
    """ "standard" or "conversational", with ", implicit prompt" when the row has no ``prompt`` field, or
    ", listwise" for a ranking."""
    if is_listwise(row):
        first = (row[LISTWISE_FIELD] or [None])[0] if isinstance(row[LISTWISE_FIELD], list) else None
        return f"{'conversational' if is_conversational(first) else 'standard'}, listwise"
    kind = "conversational" if is_conversational(row.get("chosen")) else "standard"
    return kind if "prompt" in row else f"{kind}, implicit prompt"


def ranked_completions(row: Mapping[str, Any]) -> list:
    """A valid ranking's completions, best first: as listed, or by descending ``scores`` (untied, see
    :func:`row_problems`)."""
    completions, scores = list(row[LISTWISE_FIELD]), row.get("scores")
    if scores is None:
        return completions
    return [completions[k] for k in sorted(range(len(completions)), key=lambda k: -float(scores[k]))]


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


def _same(a: Any, b: Any) -> bool:
    """Two completions that are the same text (up to surrounding whitespace) or the same messages."""
    return a == b or (isinstance(a, str) and isinstance(b, str) and a.strip() == b.strip())


def _score_problems(scores: Any, k: int) -> list[tuple[str, str]]:
    if not isinstance(scores, list):
        return [("scores", f"must be a list of {k} numbers (one per completion), got {type(scores).__name__}")]
    if len(scores) != k:
        return [("scores", f"holds {len(scores)} scores for {k} completions: give one score per completion")]
    for i, score in enumerate(scores, start=1):
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            return [("scores", f"item {i} must be a number, got {type(score).__name__}: {str(score)[:40]!r}")]
        if not math.isfinite(score):
            return [("scores", f"item {i} is {score}, not a finite number")]
    seen: dict[float, int] = {}
    for i, score in enumerate(scores, start=1):
        if score in seen:
            return [
                (
                    "scores",
                    f"ties items {seen[score]} and {i} (both {score}): Plackett-Luce ranks strictly, so tied "
                    "completions have no order to learn; break the tie or drop one of them",
                )
            ]
        seen[score] = i
    return []


def _listwise_problems(row: Mapping[str, Any]) -> list[tuple[str | None, str]]:
    """:func:`row_problems` of a ranking (module docstring)."""
    both = [field for field in _COMPLETIONS if field in row]
    if both:
        return [
            (both[0], f"is given beside {LISTWISE_FIELD!r}: a row is a pair (chosen, rejected) or a ranking, not both")
        ]
    if "prompt" not in row:
        return [("prompt", "is missing: a ranking (a 'completions' row) names its prompt")]
    completions = row[LISTWISE_FIELD]
    if not isinstance(completions, list):
        got = type(completions).__name__
        return [(LISTWISE_FIELD, f"must be a list of K >= 2 completions (best first), got {got}")]
    if len(completions) < 2:
        return [(LISTWISE_FIELD, f"holds {len(completions)} completion(s): a ranking needs at least 2")]
    problem = _value_problem(row["prompt"])
    if problem:
        return [("prompt", problem)]
    for i, completion in enumerate(completions, start=1):
        problem = _value_problem(completion)
        if problem:
            return [(LISTWISE_FIELD, f"item {i} {problem}")]
        if is_conversational(completion) != is_conversational(row["prompt"]):
            kind = "a list of messages" if is_conversational(completion) else "a string"
            return [(LISTWISE_FIELD, f"item {i} is {kind} while 'prompt' is not: use one format per row")]
    for i in range(len(completions)):
        for j in range(i + 1, len(completions)):
            if _same(completions[i], completions[j]):
                return [(LISTWISE_FIELD, f"items {i + 1} and {j + 1} are equal: a ranking orders distinct completions")]
    scores = row.get("scores")
    return [] if scores is None else _score_problems(scores, len(completions))


def row_problems(row: Any) -> list[tuple[str | None, str]]:
    """(field, message) for everything wrong inside one row: missing, null or empty fields, malformed messages,
    a row mixing strings and messages, chosen equal to rejected, an implicit prompt that cannot be extracted; for a
    ranking, what the module docstring lists."""
    if not isinstance(row, Mapping):
        return [(None, f"expected a JSON object with fields prompt, chosen, rejected, got {type(row).__name__}")]
    if is_listwise(row):
        return _listwise_problems(row)
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
    if _same(chosen, rejected):
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
