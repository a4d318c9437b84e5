"""dpolab.judge: the endpoint judge against a real HTTP server on 127.0.0.1 (order-dependent canned answers,
a malformed answer, a timeout, a 500), resuming from the results file, a dead endpoint, the API key kept
out of every record and log; the offline judge on examples whose winner is known."""

from __future__ import annotations

import base64
import json
import logging
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from dpolab.judge import (
    EndpointJudge,
    JudgeUnavailableError,
    OfflineJudge,
    default_judge,
    judge_pairwise,
    parse_verdict,
)

API_KEY = "sk-test-DO-NOT-LEAK-1234567890"
TIMEOUT = 0.5  # seconds per attempt; the slow answer takes longer
PROMPTS = ["p0", "p1", "p2", "p3"]
# quality of each method's continuation per prompt; the canned judge prefers the higher one
QUALITY = {
    "dpo": [3, 2, 3, 1],
    "sft": [1, 2, 2, 3],
    "ref": [2, 2, 1, 2],
}
GENERATIONS = {m: [f"{p} {m} q{q}" for p, q in zip(PROMPTS, qs)] for m, qs in QUALITY.items()}
# special answers for one order of one pair (A's text, B's text)
SPECIAL = {
    ("p2 dpo q3", "p2 sft q2"): ("answer", "Both are fine, but A is slightly better."),  # malformed
    ("p1 sft q2", "p1 ref q2"): ("answer", " tie\n"),
    ("p1 ref q2", "p1 sft q2"): ("answer", "Tie."),
    ("p3 sft q3", "p3 ref q2"): ("sleep", 3 * TIMEOUT),  # beyond the timeout, every attempt
    ("p3 ref q2", "p3 dpo q1"): ("status", 500),  # a server error, every attempt
}
# Expected, counted by hand from QUALITY and SPECIAL (equal quality: the server answers "A", a pure
# position bias that the two orders cancel):
#   dpo vs sft: p0 2/2, p1 1/2, p2 1/1 (AB malformed), p3 0/2        -> 4/7
#   dpo vs ref: p0 2/2, p1 1/2, p2 2/2, p3 0/1 (BA: 500)             -> 5/7
#   sft vs ref: p0 0/2, p1 two ties = 1/2, p2 2/2, p3 1/1 (AB: slow) -> 4/7
EXPECTED_WIN_RATE = np.array([[np.nan, 4 / 7, 5 / 7], [3 / 7, np.nan, 4 / 7], [2 / 7, 3 / 7, np.nan]])
EXPECTED_N_VALID = np.array([[0, 7, 7], [7, 0, 7], [7, 7, 0]])
#   decisive verdicts: 24 - 1 malformed - 2 failed - 2 ties = 19, of which "A": p0 3, p1 4, p2 2, p3 1
EXPECTED_FIRST_POSITION_RATE = 10 / 19


class CannedJudgeServer(ThreadingHTTPServer):
    """POST /v1/chat/completions: the better (higher q) continuation wins, equal quality answers "A",
    SPECIAL overrides. Records every request's (A, B) texts and Authorization header."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), CannedJudgeHandler)
        self.requests: list[tuple[str, str]] = []
        self.authorizations: set[str] = set()
        self.queries: set[str] = set()
        self.healthy = False  # True: SPECIAL sleeps and errors are off (the endpoint was fixed)
        self.every: tuple[str, object] | None = None  # while not healthy: this answer to every request
        self.lock = threading.Lock()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class CannedJudgeHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output quiet
        pass

    def _send(self, status: int, body, content_type: str = "application/json"):
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        path, _, query = self.path.partition("?")
        if path != "/v1/chat/completions":
            return self._send(404, {"error": {"message": f"no route {self.path}"}})
        user = body["messages"][-1]["content"]
        a, b = re.search(r"Continuation A: (.*)\n\nContinuation B: (.*)\n\n", user).groups()
        server: CannedJudgeServer = self.server
        with server.lock:
            server.requests.append((a, b))
            server.authorizations.add(self.headers.get("Authorization", ""))
            server.queries.add(query)
        kind, value = SPECIAL.get((a, b), ("default", None))
        if server.every and not server.healthy:
            kind, value = server.every
        if server.healthy and kind in ("sleep", "status"):
            kind = "default"
        if kind == "raw":  # a 200 with this body, whatever it is
            return self._send(200, value[1], content_type=value[0])
        if kind == "sleep":
            time.sleep(value)
        if kind == "status":
            return self._send(value, {"error": {"message": "internal error", "type": "server_error"}})
        if kind == "choices":  # a 200 whose choices are these
            return self._send(200, {"id": "cmpl-1", "object": "chat.completion", "choices": value})
        if kind == "answer":
            answer = value
        else:
            q_a, q_b = int(a[-1]), int(b[-1])
            answer = "A" if q_a >= q_b else "B"  # equal quality: position bias towards A
        try:
            self._send(
                200,
                {
                    "id": "cmpl-1",
                    "object": "chat.completion",
                    "created": 0,
                    "model": body["model"],
                    "choices": [
                        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": answer}}
                    ],
                },
            )
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
            pass


@pytest.fixture
def server():
    server = CannedJudgeServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def endpoint_env(monkeypatch, server):
    monkeypatch.setenv("DPOLAB_JUDGE_BASE_URL", server.base_url)
    monkeypatch.setenv("DPOLAB_JUDGE_MODEL", "canned-judge")
    monkeypatch.setenv("DPOLAB_JUDGE_API_KEY", API_KEY)
    monkeypatch.setenv("DPOLAB_JUDGE_TIMEOUT", str(TIMEOUT))
    monkeypatch.setenv("DPOLAB_JUDGE_MAX_RETRIES", "1")


def all_ordered_pairs() -> set[tuple[str, str]]:
    return {
        (GENERATIONS[a][i], GENERATIONS[b][i]) for i in range(len(PROMPTS)) for a in QUALITY for b in QUALITY if a != b
    }


def test_endpoint_judge_win_rates_counts_and_resume(endpoint_env, server, tmp_path, caplog):
    judge = EndpointJudge.from_env()
    results = tmp_path / "judgments.jsonl"
    with caplog.at_level(logging.DEBUG):
        rates = judge_pairwise(PROMPTS, GENERATIONS, judge, results)

    assert rates.methods == ["dpo", "sft", "ref"]
    np.testing.assert_allclose(rates.win_rate, EXPECTED_WIN_RATE)
    np.testing.assert_array_equal(rates.n_valid, EXPECTED_N_VALID)
    assert (rates.n_malformed, rates.n_failed, rates.n_judgments) == (1, 2, 24)
    assert rates.first_position_rate == pytest.approx(EXPECTED_FIRST_POSITION_RATE)
    # both orders of every pair were sent; the 500 was retried once (max_retries=1)
    assert set(server.requests) == all_ordered_pairs()
    assert server.requests.count(("p3 ref q2", "p3 dpo q1")) == 2
    # the key reached the server, and nowhere else
    assert server.authorizations == {f"Bearer {API_KEY}"}
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(records) == 24 and API_KEY not in results.read_text()
    assert API_KEY not in caplog.text and API_KEY not in repr(judge)
    failed = sorted(r["raw"].split(":")[0] for r in records if r["status"] == "failed")
    assert failed == ["APITimeoutError", "InternalServerError"]
    assert [r["raw"] for r in records if r["status"] == "malformed"] == ["Both are fine, but A is slightly better."]

    # rerun after the endpoint is fixed: the two failed judgments and the malformed one are asked again (no
    # non-answer is final); the wordy answer is canned, so it stays malformed
    server.healthy, server.requests = True, []
    again = judge_pairwise(PROMPTS, GENERATIONS, EndpointJudge.from_env(), results)
    asked = [("p3 sft q3", "p3 ref q2"), ("p3 ref q2", "p3 dpo q1"), ("p2 dpo q3", "p2 sft q2")]
    assert sorted(server.requests) == sorted(asked)
    assert (again.n_malformed, again.n_failed) == (1, 0)
    assert again.win_rate[0, 2] == pytest.approx(5 / 8)  # the recovered p3 BA: ref q2 beats dpo q1
    assert again.win_rate[1, 2] == pytest.approx(5 / 8)  # the recovered p3 AB: sft q3 beats ref q2


def test_dead_endpoint_is_a_clear_error_and_keeps_what_was_judged(monkeypatch, tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("DPOLAB_JUDGE_API_KEY", API_KEY)
    judge = EndpointJudge(f"http://127.0.0.1:{port}/v1", "nobody", timeout=1.0, max_retries=0)
    results = tmp_path / "judgments.jsonl"
    with pytest.raises(JudgeUnavailableError, match=r"failed 3 times in a row .*APIConnectionError.*rerun to resume"):
        judge_pairwise(PROMPTS, GENERATIONS, judge, results, max_consecutive_failures=3)
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["status"] for r in records] == ["failed"] * 3


def test_endpoint_judge_from_env_names_what_is_missing(monkeypatch):
    monkeypatch.delenv("DPOLAB_JUDGE_BASE_URL", raising=False)
    monkeypatch.delenv("DPOLAB_JUDGE_MODEL", raising=False)
    with pytest.raises(ValueError, match="DPOLAB_JUDGE_BASE_URL and DPOLAB_JUDGE_MODEL"):
        EndpointJudge.from_env()


def test_default_judge_is_the_endpoint_only_when_configured(endpoint_env, monkeypatch):
    from helpers import tiny_gpt2, word_tokenizer

    tokenizer = word_tokenizer()
    reference = tiny_gpt2(vocab_size=len(tokenizer))
    assert isinstance(default_judge(reference, tokenizer), EndpointJudge)
    monkeypatch.delenv("DPOLAB_JUDGE_BASE_URL")
    assert isinstance(default_judge(reference, tokenizer), OfflineJudge)


@pytest.mark.parametrize(
    "answer, verdict",
    [
        ("A", "A"),
        (" b\n", "B"),
        ("tie", "tie"),
        ("TIE.", "tie"),
        ("Response A", None),
        ("A or B", None),
        ("A. Because it is fluent.", None),
        ("", None),
        ("AB", None),
    ],
)
def test_parse_verdict_is_strict(answer, verdict):
    assert parse_verdict(answer) == verdict


def test_judge_pairwise_checks_its_inputs(tmp_path):
    with pytest.raises(ValueError, match="at least two methods"):
        judge_pairwise(["p"], {"dpo": ["x"]}, None, tmp_path / "r.jsonl")
    with pytest.raises(ValueError, match=r"one continuation per prompt \(2\); got \{'sft': 1\}"):
        judge_pairwise(["p", "q"], {"dpo": ["x", "y"], "sft": ["x"]}, None, tmp_path / "r.jsonl")


# ---------------------------------------------------------------------------------------- offline judge


@pytest.fixture(scope="module")
def offline_judge():
    from dpolab.models import load_model

    reference, tokenizer, _ = load_model("smollm2-135m")
    return OfflineJudge(reference, tokenizer)


PROMPT = "After class, my roommate and I walked"
FLUENT_PENN = " across the University of Pennsylvania campus to grab dinner."
FLUENT_OTHER = " to the park to grab dinner before it got dark."
REPETITIVE_PENN = " Penn Penn Penn Penn Penn Penn Penn Penn Penn Penn Penn Penn"


@pytest.mark.slow
@pytest.mark.parametrize(
    "a, b, verdict",
    [
        (FLUENT_PENN, FLUENT_OTHER, "A"),  # the alignment goal decides between two fluent continuations
        (FLUENT_OTHER, FLUENT_PENN, "B"),
        (REPETITIVE_PENN, FLUENT_PENN, "B"),  # both name Penn: fluency and repetition decide
        (REPETITIVE_PENN, FLUENT_OTHER, "B"),  # a degenerate Penn mention loses to fluent text
        ("", FLUENT_OTHER, "B"),  # an empty continuation scores 0
        (FLUENT_OTHER, FLUENT_OTHER, "tie"),
    ],
)
def test_offline_judge_known_winners(offline_judge, a, b, verdict):
    assert offline_judge.compare(PROMPT, a, b).verdict == verdict


@pytest.mark.slow
def test_offline_judge_win_rates_are_order_independent(offline_judge, tmp_path):
    prompts = [PROMPT, "The museum was quiet on Sunday, so we"]
    generations = {
        "aligned": [FLUENT_PENN, " wandered through the Penn Museum's Egyptian wing for hours."],
        "fluent": [FLUENT_OTHER, " wandered through the galleries for hours."],
        "collapsed": [REPETITIVE_PENN, " Penn Penn Penn Penn Penn Penn Penn Penn Penn Penn"],
    }
    rates = judge_pairwise(prompts, generations, offline_judge, tmp_path / "offline.jsonl")
    np.testing.assert_array_equal(rates.win_rate[0, 1:], [1.0, 1.0])  # aligned beats both, in both orders
    np.testing.assert_array_equal(rates.win_rate[1, 2], 1.0)  # fluent beats collapsed
    assert rates.first_position_rate == 0.5  # a per-continuation score cannot prefer a position
    assert (rates.n_malformed, rates.n_failed, rates.n_judgments) == (0, 0, 12)


NON_ANSWERS = {  # what an endpoint may send back instead of A, B or tie, each as a 200
    "html page": ("raw", ("text/html", "<html><body><h1>Welcome to nginx!</h1></body></html>")),
    "body that is not json": ("raw", ("application/json", '{"choices": [{"message": ')),
    "no choices": ("choices", []),
    "null content": ("choices", [{"index": 0, "message": {"role": "assistant", "content": None}}]),
    "empty content": ("choices", [{"index": 0, "message": {"role": "assistant", "content": "  "}}]),
    "choices not a list": ("choices", "A"),
    "always wordy": ("answer", "Response A is more fluent, so A."),
}


@pytest.mark.parametrize("kind", NON_ANSWERS, ids=list(NON_ANSWERS))
def test_non_answers_end_with_a_clear_error_and_are_asked_again(endpoint_env, server, tmp_path, kind):
    """Non-answers count toward the failure limit like failed calls; none is cached as final."""
    server.every = NON_ANSWERS[kind]
    results = tmp_path / "judgments.jsonl"
    with pytest.raises(JudgeUnavailableError) as caught:
        judge_pairwise(PROMPTS, GENERATIONS, EndpointJudge.from_env(), results, max_consecutive_failures=3)
    message = str(caught.value)
    assert "gave no usable answer 3 times in a row (last: " in message
    assert "it must answer exactly A, B or tie" in message and "rerun to resume" in message
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["status"] for r in records] == ["malformed"] * 3
    first_three = list(server.requests)
    # the endpoint is fixed: every judgment is made, the three non-answers included
    server.healthy, server.requests = True, []
    rates = judge_pairwise(PROMPTS, GENERATIONS, EndpointJudge.from_env(), results, max_consecutive_failures=3)
    assert set(first_three) <= set(server.requests) and len(server.requests) == 24
    assert rates.n_malformed == 1 and rates.n_failed == 0  # the one canned wordy answer of SPECIAL


def test_credentials_in_the_url_reach_the_endpoint_and_nothing_written(monkeypatch, server, tmp_path):
    """User and password (HTTP basic auth) and a query key work, and appear in no record, id, repr or error."""
    port = server.server_address[1]
    monkeypatch.setenv("DPOLAB_JUDGE_BASE_URL", f"http://alice:pw-SECRET-1@127.0.0.1:{port}/v1?api-key=Q-SECRET-2")
    monkeypatch.setenv("DPOLAB_JUDGE_MODEL", "canned-judge")
    monkeypatch.setenv("DPOLAB_JUDGE_TIMEOUT", str(TIMEOUT))
    monkeypatch.setenv("DPOLAB_JUDGE_MAX_RETRIES", "0")
    monkeypatch.delenv("DPOLAB_JUDGE_API_KEY", raising=False)
    judge = EndpointJudge.from_env()
    results = tmp_path / "judgments.jsonl"
    rates = judge_pairwise(PROMPTS, GENERATIONS, judge, results)
    assert rates.n_valid.sum() > 0 and server.queries == {"api-key=Q-SECRET-2"}
    assert server.authorizations == {"Basic " + base64.b64encode(b"alice:pw-SECRET-1").decode()}
    assert judge.id == f"endpoint:canned-judge@http://127.0.0.1:{port}/v1"
    server.server_close()  # the endpoint goes away: its errors must not carry the URL's secrets either
    with pytest.raises(JudgeUnavailableError) as caught:
        judge_pairwise(["p9"], {m: ["x"] for m in QUALITY}, judge, results, max_consecutive_failures=2)
    written = "\n".join([results.read_text(), json.dumps(rates.to_dict()), judge.id, repr(judge), str(caught.value)])
    for secret in ("alice", "pw-SECRET-1", "Q-SECRET-2"):
        assert secret not in written


def test_the_offline_judges_id_holds_no_home_folder(monkeypatch, tmp_path):
    """The id is written into every judgment record, win_rates.json and the report."""
    from helpers import tiny_gpt2, word_tokenizer

    monkeypatch.setenv("HOME", str(tmp_path / "ada"))
    monkeypatch.delenv("DPOLAB_CACHE", raising=False)
    reference = tiny_gpt2(vocab_size=len(word_tokenizer()))
    reference.config.name_or_path = str(tmp_path / "ada" / ".cache" / "dpolab" / "smollm2-fp32")
    judge = OfflineJudge(reference, word_tokenizer())
    assert judge.id.startswith("offline:~/.cache/dpolab/smollm2-fp32:OfflineJudgeWeights(")
