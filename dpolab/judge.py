"""Pairwise judging of continuations from several methods, in both orders, into a win-rate matrix.

For every prompt and every pair of methods (m, m'), the judge sees the two continuations twice: m's as
"A" and m''s as "B", then swapped. A judge that prefers whatever comes first then gives each method one win,
and the two orders cancel its position bias. Win rate of m against m':

    W[m, m'] = (wins of m + 0.5 * ties) / (valid judgments of the pair, both orders)      W[m, m'] + W[m', m] = 1

Ties count half a win for each side. Malformed answers and failed calls are not valid judgments: they are
left out of W and counted (``WinRates.n_malformed``, ``n_failed``).

Two judges share one interface (:class:`Judge`):

- :class:`OfflineJudge` (the default) needs no network. It is a fixed scoring rule, not a language-model
  judge, and it measures exactly this, per continuation y of prompt x:

      s(x, y) = (1 - repeated-bigram rate of y)                                  (repetition discounts all)
              * [ w_penn * 1[y names Penn]                                       (the alignment goal)
                + w_fluency * clip(1 - NLL_ref(y|x) / nll_scale, 0, 1)           (frozen reference's mean NLL)
                + w_relevance * max(0, cos(MiniLM(x), MiniLM(y))) ]              (on topic)

  and the higher score wins (a tie within ``tie_margin``). Repetition multiplies rather than adds because
  likelihood rewards it (a reference model finds "Penn Penn Penn ..." quite predictable): with a sum, a
  collapsed Penn mention would beat a fluent sentence without one; with the product it loses, as it does
  with the article's GPT-4 judge. The rule favours text the reference model finds likely (so, text like the
  reference's own) and text semantically close to the prompt; it knows nothing of factuality or style.
  Being a function of each continuation alone, it is order-independent by construction; it still runs
  both orders so that every judge goes through the same pipeline.
- :class:`EndpointJudge`: any OpenAI-compatible chat-completions endpoint, configured by environment
  variables (``DPOLAB_JUDGE_BASE_URL``, ``DPOLAB_JUDGE_MODEL``, ``DPOLAB_JUDGE_API_KEY``,
  ``DPOLAB_JUDGE_TIMEOUT``, ``DPOLAB_JUDGE_MAX_RETRIES``). It must answer exactly ``A``, ``B`` or ``tie``;
  anything else (an explanation, an empty answer, a body without ``choices[0].message.content``, an HTML
  page instead of JSON) is counted as malformed; the body is parsed here, defensively, never trusted. The
  API key is read from the environment only; it is never stored in the results, in logs or in ``repr``, and
  the URL is written without its user, password and query (:func:`dpolab.files.redact_url`).

Failures and resuming: a call that still fails after the client's retries (timeout, HTTP error, connection
refused) is recorded as a *failed* judgment and the run goes on; a malformed answer likewise.
``max_consecutive_failures`` non-answers (failed or malformed) in a row mean the endpoint is down or is not
a judge that answers A, B or tie, and raise :class:`JudgeUnavailableError`. Every judgment is appended to a
JSONL file as soon as it is made (one ``write`` of one line, flushed and fsync'ed), keyed by a hash of the
judge, the prompt and the two texts in order; a rerun reuses every ``ok`` judgment and asks the failed and
malformed ones again, so nothing already judged is lost or paid for twice, and no non-answer is final.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from .files import portable_text, redact_url

__all__ = [
    "JudgeAnswer",
    "Judge",
    "OfflineJudge",
    "OfflineJudgeWeights",
    "EndpointJudge",
    "JudgeUnavailableError",
    "default_judge",
    "WinRates",
    "judge_pairwise",
    "parse_verdict",
    "answer_of",
    "JUDGE_SYSTEM_PROMPT",
]

log = logging.getLogger(__name__)

Verdict = Literal["A", "B", "tie"]
Status = Literal["ok", "malformed", "failed"]


class JudgeUnavailableError(RuntimeError):
    """The judge failed too many times in a row (endpoint down, wrong URL or key)."""


@dataclass(frozen=True)
class JudgeAnswer:
    """One judgment: ``verdict`` is set only when ``status == "ok"``."""

    status: Status  # "ok", "malformed" (no answer, or one outside A/B/tie) or "failed" (the call failed)
    verdict: Verdict | None = None  # which response is better, or "tie"
    raw: str = ""  # the judge's answer, or the error, for the record (truncated)


class Judge(Protocol):
    """What :func:`judge_pairwise` needs from a judge."""

    id: str  # identifies the judge in the results file: another judge never reuses these verdicts

    def prepare(self, items: Sequence[tuple[str, str]]) -> None:
        """Called once with every (prompt, continuation) about to be judged: a chance to batch work."""

    def compare(self, prompt: str, response_a: str, response_b: str) -> JudgeAnswer:
        """Judge response A against response B as continuations of ``prompt``."""


# ------------------------------------------------------------------------------------------ offline judge


@dataclass(frozen=True)
class OfflineJudgeWeights:
    """Weights of the offline judge's score (module docstring)."""

    penn: float = 1.0  # names the University of Pennsylvania
    fluency: float = 0.5  # 1 - NLL_ref / nll_scale, clipped to [0, 1]
    relevance: float = 0.5  # MiniLM cosine(prompt, continuation), negatives clipped to 0
    nll_scale: float = 10.0  # nats per token at which the fluency term reaches 0
    tie_margin: float = 0.02  # |s_A - s_B| at or below this is a tie

    def __post_init__(self):
        if min(self.penn, self.fluency, self.relevance, self.tie_margin) < 0:
            raise ValueError(f"weights and tie_margin must be >= 0: {self}")
        if not self.nll_scale > 0:
            raise ValueError(f"nll_scale must be > 0, got {self.nll_scale}")


class OfflineJudge:
    """The score-based judge of the module docstring; needs the frozen reference model and its tokenizer."""

    def __init__(self, reference_model, tokenizer, embedder=None, weights: OfflineJudgeWeights = OfflineJudgeWeights()):
        self.reference_model, self.tokenizer, self.weights = reference_model, tokenizer, weights
        self._embedder = embedder
        self._scores: dict[tuple[str, str], dict[str, float]] = {}
        name = portable_text(reference_model.config.name_or_path or type(reference_model).__name__)
        self.id = f"offline:{name}:{weights}"

    def __repr__(self) -> str:
        return f"OfflineJudge({self.id})"

    def prepare(self, items: Sequence[tuple[str, str]]) -> None:
        from dpolab.eval.likelihood import completion_logps, encode_continuations
        from dpolab.eval.metrics import default_embedder, penn_flags, relevance, repeated_ngram_rate

        new = [(x, y) for x, y in dict.fromkeys(items) if (x, y) not in self._scores and y.strip()]
        if not new:
            return
        prompts, texts = [x for x, _ in new], [y for _, y in new]
        nll = -completion_logps(
            self.reference_model,
            *encode_continuations(self.tokenizer, prompts, texts),
            pad_token_id=self.tokenizer.pad_token_id,
            reduction="mean",
        )
        cosine = relevance(prompts, texts, self._embedder or default_embedder())
        for i, (x, y, penn) in enumerate(zip(prompts, texts, penn_flags(texts))):
            repeated = repeated_ngram_rate(y, 2)
            self._scores[(x, y)] = {
                "penn": float(penn),
                "fluency": min(1.0, max(0.0, 1.0 - float(nll[i]) / self.weights.nll_scale)),
                "non_repetition": 1.0 - (0.0 if math.isnan(repeated) else repeated),
                "relevance": max(0.0, float(cosine[i])),
            }

    def components(self, prompt: str, continuation: str) -> dict[str, float]:
        """The four terms of the score, each in [0, 1]; an empty continuation scores 0 on all of them."""
        if not continuation.strip():
            return dict.fromkeys(("penn", "fluency", "non_repetition", "relevance"), 0.0)
        if (prompt, continuation) not in self._scores:
            self.prepare([(prompt, continuation)])
        return self._scores[(prompt, continuation)]

    def score(self, prompt: str, continuation: str) -> float:
        """s(x, y) of the module docstring."""
        terms, w = self.components(prompt, continuation), self.weights
        quality = w.penn * terms["penn"] + w.fluency * terms["fluency"] + w.relevance * terms["relevance"]
        return terms["non_repetition"] * quality

    def compare(self, prompt: str, response_a: str, response_b: str) -> JudgeAnswer:
        s_a, s_b = self.score(prompt, response_a), self.score(prompt, response_b)
        verdict = "tie" if abs(s_a - s_b) <= self.weights.tie_margin else ("A" if s_a > s_b else "B")
        return JudgeAnswer("ok", verdict, f"s_A={s_a:.4f} s_B={s_b:.4f}")


# ----------------------------------------------------------------------------------------- endpoint judge

JUDGE_SYSTEM_PROMPT = (
    "You compare two continuations of the same sentence opening. The better continuation mentions the "
    "University of Pennsylvania naturally while staying fluent, coherent, non-repetitive and relevant to the "
    "opening. Answer with exactly one of these three words and nothing else: A, B, tie."
)
JUDGE_USER_TEMPLATE = (
    "Sentence opening: {prompt}\n\nContinuation A: {a}\n\nContinuation B: {b}\n\n"
    "Which continuation is better? Answer exactly A, B or tie."
)
_VERDICTS = {"a": "A", "b": "B", "tie": "tie"}


def parse_verdict(answer: str) -> Verdict | None:
    """The strict answer format: ``A``, ``B`` or ``tie`` (any case, surrounding whitespace and one final
    full stop allowed); anything else — an explanation, "Response A", "A or B" — is malformed (None)."""
    text = answer.strip()
    text = text[:-1] if text.endswith(".") else text
    return _VERDICTS.get(text.lower())


def _env_number(name: str, default: float) -> float:
    value = os.environ.get(name)
    try:
        return float(value) if value else default
    except ValueError:
        raise ValueError(f"${name} must be a number, got {value!r}") from None


class EndpointJudge:
    """A chat model behind an OpenAI-compatible ``/chat/completions`` endpoint, judging with temperature 0.

    The API key is read from the environment variable ``api_key_env`` (never passed as an argument, so it
    cannot end up in a config file); endpoints that need no key (local servers) get a placeholder.
    ``timeout`` (seconds per attempt) and ``max_retries`` go to the ``openai`` client, which retries
    timeouts, connection errors, 408/409/429 and 5xx with exponential backoff.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str = "DPOLAB_JUDGE_API_KEY",
        timeout: float = 60.0,
        max_retries: int = 3,
        max_tokens: int = 5,
    ):
        from openai import OpenAI  # imported lazily: only the endpoint judge needs it

        self.base_url, self.model, self.max_tokens = redact_url(base_url), model, max_tokens
        self.id = f"endpoint:{model}@{self.base_url}"
        self._secrets = [x for x in (os.environ.get(api_key_env), base_url, *_url_secrets(base_url)) if x]
        parts = urllib.parse.urlsplit(base_url)  # a query (e.g. an api-version or a key) goes as a query, not a path
        self._client = OpenAI(
            base_url=urllib.parse.urlunsplit(parts._replace(query="", fragment="")),
            default_query=dict(urllib.parse.parse_qsl(parts.query)) or None,
            api_key=os.environ.get(api_key_env) or "no-key",
            timeout=timeout,
            max_retries=max_retries,
        )

    @classmethod
    def from_env(cls) -> EndpointJudge:
        """Configured by DPOLAB_JUDGE_BASE_URL and DPOLAB_JUDGE_MODEL (required), DPOLAB_JUDGE_API_KEY,
        DPOLAB_JUDGE_TIMEOUT (seconds, default 60) and DPOLAB_JUDGE_MAX_RETRIES (default 3)."""
        missing = [name for name in ("DPOLAB_JUDGE_BASE_URL", "DPOLAB_JUDGE_MODEL") if not os.environ.get(name)]
        if missing:
            raise ValueError(f"the endpoint judge needs {' and '.join(missing)} set in the environment")
        return cls(
            os.environ["DPOLAB_JUDGE_BASE_URL"],
            os.environ["DPOLAB_JUDGE_MODEL"],
            timeout=_env_number("DPOLAB_JUDGE_TIMEOUT", 60.0),
            max_retries=int(_env_number("DPOLAB_JUDGE_MAX_RETRIES", 3)),
        )

    def __repr__(self) -> str:
        return f"EndpointJudge(base_url={self.base_url!r}, model={self.model!r})"

    def _redact(self, text: str) -> str:
        """``text`` without the API key, the URL as given, or any credential or query value inside it."""
        for secret in sorted(self._secrets, key=len, reverse=True):
            text = text.replace(secret, self.base_url if secret.startswith(("http:", "https:")) else "[redacted]")
        return text

    def prepare(self, items: Sequence[tuple[str, str]]) -> None:
        pass

    def compare(self, prompt: str, response_a: str, response_b: str) -> JudgeAnswer:
        import openai

        messages = [
            {"role": "system", "content": JUDGE_SYSTEM_PROMPT},
            {"role": "user", "content": JUDGE_USER_TEMPLATE.format(prompt=prompt, a=response_a, b=response_b)},
        ]
        try:  # the raw body: parsed below, so that no body can raise outside this method
            response = self._client.chat.completions.with_raw_response.create(
                model=self.model, messages=messages, temperature=0.0, max_tokens=self.max_tokens
            )
            body = response.text
        except openai.OpenAIError as err:  # timeouts, connection errors, HTTP errors (after the client's retries)
            return JudgeAnswer("failed", None, self._redact(f"{type(err).__name__}: {err}")[:300])
        answer, problem = answer_of(body)
        if answer is None:
            return JudgeAnswer("malformed", None, self._redact(problem)[:300])
        verdict = parse_verdict(answer)
        return JudgeAnswer("ok" if verdict else "malformed", verdict, self._redact(answer)[:300])


def answer_of(body: str) -> tuple[str | None, str]:
    """The answer text of a chat-completions response body, or (None, what the body holds instead)."""
    try:
        data = json.loads(body)
    except ValueError:
        return None, f"the response is not JSON: {' '.join(body.split())[:120]!r}"
    try:
        content = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return None, f"the response holds no choices[0].message.content: {' '.join(body.split())[:160]!r}"
    if not isinstance(content, str) or not content.strip():
        return None, f"the answer is empty ({content!r})"
    return content, ""


def _url_secrets(url: str) -> list[str]:
    """The user, password and query values of ``url``: text that must not be written."""
    parts = urllib.parse.urlsplit(url)
    query = [value for _, value in urllib.parse.parse_qsl(parts.query)]
    return [x for x in (parts.username, parts.password, parts.query, parts.fragment, *query) if x and len(x) > 2]


def default_judge(reference_model, tokenizer) -> Judge:
    """The endpoint judge when ``$DPOLAB_JUDGE_BASE_URL`` is set, otherwise the offline judge scored with the
    frozen reference model."""
    if os.environ.get("DPOLAB_JUDGE_BASE_URL"):
        return EndpointJudge.from_env()
    return OfflineJudge(reference_model, tokenizer)


# ------------------------------------------------------------------------------------------ the pipeline


@dataclass
class WinRates:
    """The outcome of :func:`judge_pairwise`."""

    methods: list[str]
    win_rate: np.ndarray  # (M, M): W[i, j] = share of valid judgments of i vs j that i won, ties half; NaN diagonal
    n_valid: np.ndarray  # (M, M) number of valid judgments of each pair (both orders), symmetric
    n_malformed: int  # answers outside A/B/tie
    n_failed: int  # calls that failed after the retries
    n_judgments: int  # all judgments: prompts x pairs x 2 orders
    first_position_rate: float  # share of decisive valid verdicts that picked response A (0.5 = no position bias)
    results_path: str = ""
    per_judgment: list[dict] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        return {
            "methods": self.methods,
            "win_rate": [[None if math.isnan(v) else v for v in row] for row in self.win_rate.tolist()],
            "n_valid": self.n_valid.tolist(),
            "n_malformed": self.n_malformed,
            "n_failed": self.n_failed,
            "n_judgments": self.n_judgments,
            "first_position_rate": self.first_position_rate,
            "results_path": self.results_path,
        }


def _key(judge_id: str, prompt: str, response_a: str, response_b: str) -> str:
    return hashlib.sha256(json.dumps([judge_id, prompt, response_a, response_b]).encode()).hexdigest()[:24]


def _read_results(path: Path) -> dict[str, dict]:
    """Records by key, the last one winning; a torn last line (a crash mid-write) is skipped with a warning."""
    records: dict[str, dict] = {}
    if not path.exists():
        return records
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):  # "\n" only, as JSON Lines
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            records[record["key"]] = record
        except (json.JSONDecodeError, KeyError, TypeError):
            log.warning("%s line %d is not a judgment record; skipped", path, number)
    return records


def _append(path: Path, record: dict) -> None:
    """Append one JSON line with a single write on an O_APPEND descriptor, then fsync."""
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def _unavailable(judge_id: str, statuses: list[str], last: str, kept: int, path: Path) -> str:
    n = len(statuses)
    if all(status == "failed" for status in statuses):
        what = f"failed {n} times in a row (last: {last}); check the endpoint, its URL and key"
    else:
        what = (
            f"gave no usable answer {n} times in a row (last: {last}); it must answer exactly A, B or tie: check "
            "DPOLAB_JUDGE_MODEL and the endpoint"
        )
    kept_in = f"the {kept} judgments made so far are kept in {path}"
    return f"judge {judge_id} {what}; {kept_in}: fix the judge and rerun to resume"


def _check_inputs(prompts: Sequence[str], generations: Mapping[str, Sequence[str]]) -> None:
    if len(generations) < 2:
        raise ValueError(f"pairwise judging needs at least two methods, got {list(generations)}")
    wrong = {m: len(texts) for m, texts in generations.items() if len(texts) != len(prompts)}
    if wrong:
        raise ValueError(f"every method needs one continuation per prompt ({len(prompts)}); got {wrong}")


def _tally(records: Sequence[dict], methods: list[str]):
    """Wins (ties half) and valid counts per ordered pair, and the status / position counts."""
    index = {m: i for i, m in enumerate(methods)}
    wins, n_valid = np.zeros((len(methods),) * 2), np.zeros((len(methods),) * 2, dtype=int)
    counts = {"malformed": 0, "failed": 0, "A": 0, "B": 0, "tie": 0}
    for record in records:
        if record["status"] != "ok":
            counts[record["status"]] += 1
            continue
        a, b, verdict = index[record["method_a"]], index[record["method_b"]], record["verdict"]
        counts[verdict] += 1
        n_valid[a, b] += 1
        n_valid[b, a] += 1
        if verdict == "tie":
            wins[a, b] += 0.5
            wins[b, a] += 0.5
        else:
            winner, loser = (a, b) if verdict == "A" else (b, a)
            wins[winner, loser] += 1
    return wins, n_valid, counts


def judge_pairwise(
    prompts: Sequence[str],
    generations: Mapping[str, Sequence[str]],
    judge: Judge,
    results_path: str | os.PathLike,
    *,
    max_consecutive_failures: int = 5,
) -> WinRates:
    """Judge every pair of methods on every prompt in both orders; return the win-rate matrix.

    Args:
        prompts: N prompts.
        generations: method name -> its N continuations, aligned with ``prompts``.
        judge: an :class:`OfflineJudge`, an :class:`EndpointJudge` or anything with the :class:`Judge` interface.
        results_path: the JSONL file judgments are appended to (created if missing; reused to resume).
        max_consecutive_failures: this many non-answers (failed calls or malformed answers) in a row raise
            :class:`JudgeUnavailableError`.
    """
    _check_inputs(prompts, generations)
    path = Path(results_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    final = {k: r for k, r in _read_results(path).items() if r["status"] == "ok"}  # non-answers are asked again
    methods = list(generations)
    judge.prepare([(x, generations[m][i]) for i, x in enumerate(prompts) for m in methods])
    records, recent = [], []  # recent: the statuses of the non-answers in a row so far
    for i, prompt in enumerate(prompts):
        for first, second in itertools.combinations(methods, 2):
            for a, b in ((first, second), (second, first)):  # both orders cancel position bias
                text_a, text_b = generations[a][i], generations[b][i]
                key = _key(judge.id, prompt, text_a, text_b)
                if key in final:
                    answer = JudgeAnswer(final[key]["status"], final[key]["verdict"], final[key]["raw"])
                else:
                    answer = judge.compare(prompt, text_a, text_b)
                    record = {
                        "key": key,
                        "judge": judge.id,
                        "prompt_index": i,
                        "method_a": a,
                        "method_b": b,
                        "status": answer.status,
                        "verdict": answer.verdict,
                        "raw": answer.raw,
                        "time": time.time(),
                    }
                    _append(path, record)
                    if answer.status == "ok":
                        final[key] = record
                        recent = []
                    else:
                        recent.append(answer.status)
                    if len(recent) >= max_consecutive_failures:
                        raise JudgeUnavailableError(_unavailable(judge.id, recent, answer.raw, len(final), path))
                records.append(
                    {
                        "prompt_index": i,
                        "method_a": a,
                        "method_b": b,
                        "status": answer.status,
                        "verdict": answer.verdict,
                        "raw": answer.raw,
                    }
                )
    wins, n_valid, counts = _tally(records, methods)
    with np.errstate(invalid="ignore", divide="ignore"):
        win_rate = np.where(n_valid > 0, wins / n_valid, np.nan)
    decisive = counts["A"] + counts["B"]
    return WinRates(
        methods,
        win_rate,
        n_valid,
        counts["malformed"],
        counts["failed"],
        len(records),
        counts["A"] / decisive if decisive else math.nan,
        str(path),
        records,
    )
