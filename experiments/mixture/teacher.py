"""A scripted teacher that knows the toy world, behind an OpenAI-compatible chat endpoint on
loopback: the experiment's pipelines (tools.pipeline) talk to it as to any teacher.

It answers the prompts of the stages the mixture pipelines use:

  rewrite (reasoning / exercise)   a web seed -> "### Problem / ### Solution": a problem of one
                                   of the world's families anchored on a fact the seed states,
                                   with a worked solution; wrong with probability `error_rate`
  difficulty ("Solve the ...")     each of the k answers is right with probability
                                   (1 - error_rate) ** steps, so long problems split the votes
  web rewrite ("Rewrite the ...")  the seed's facts restated plainly; with probability
                                   `error_rate` one value is wrong
  critique / revise (self_revise)  the teacher checks a restatement against the world: REVISE
                                   a wrong one, and the revision restates the seed correctly

Answers are deterministic per (prompt, choice), so the pipeline's cache and reruns agree.
"""
from __future__ import annotations

import hashlib
import json
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from experiments.mixture.world import FAMILIES, Fact, World, problem, restatement

REWRITE_PROMPT = "Rewrite the passage below as a clear reference text"
ANCHOR_FAMILIES = {"price": ("purchase", "change"), "born": ("age",), "road": ("road",)}


def _between(text: str, start: str, end: str) -> str:
    return text.split(start, 1)[-1].split(end, 1)[0].strip()


class ScriptedTeacher:
    """`(messages, n, i) -> str`: the answer to choice i of n."""

    def __init__(self, world: World, docs: list[dict], error_rate: float = 0.1):
        self.world, self.error_rate = world, error_rate
        self.facts = {f.id: f for f in world.facts}
        self.docs = {d["text"]: d for d in docs}
        self.problems: dict[str, dict] = {}  # problem text -> its problem record
        self.wrong: set[str] = set()  # restatements with a wrong value
        self._lock = threading.Lock()

    def _rng(self, prompt: str, i: int) -> random.Random:
        return random.Random(hashlib.sha256(f"{i}\0{prompt}".encode()).digest())

    def _doc(self, passage: str) -> dict:
        doc = self.docs.get(passage.strip())
        if doc is None:
            raise ValueError(f"not a seed of this world: {passage[:60]!r}")
        return doc

    def __call__(self, messages: list[dict], n: int, i: int) -> str:
        prompt = messages[-1]["content"]
        rng = self._rng(prompt, i)
        if prompt.startswith("Turn the passage below into"):
            return self._exercise(prompt, rng)
        if prompt.startswith("Solve the following problem."):
            return self._solve(_between(prompt, "Problem:\n", "\0"), rng)
        if prompt.startswith(REWRITE_PROMPT):
            return self._restate(self._doc(_between(prompt, "Passage:\n", "\n\nReply")), rng)
        if prompt.startswith("You are a meticulous reviewer."):
            answer = _between(prompt, "Answer:\n", "\n\nEnd your reply")
            if answer in self.wrong:
                return "One stated value contradicts the passage.\nVERDICT: REVISE"
            return "Every statement matches the passage.\nVERDICT: ACCEPT"
        if prompt.startswith("Revise the answer below"):
            doc = self._doc(_between(prompt, "Question:\n", "\n\nPrevious answer:"))
            return restatement([self.facts[f] for f in doc["facts"]])
        raise ValueError(f"unexpected prompt: {prompt[:80]!r}")

    def _exercise(self, prompt: str, rng: random.Random) -> str:
        doc = self._doc(_between(prompt, "Passage:\n", "\n\nReply"))
        anchors = [self.facts[f] for f in doc["facts"] if self.facts[f].relation in ANCHOR_FAMILIES]
        anchor = rng.choice(anchors) if anchors else None
        family = rng.choice(ANCHOR_FAMILIES[anchor.relation] if anchor else FAMILIES)
        p = problem(self.world, family, rng, anchor)
        with self._lock:
            self.problems[p["prompt"]] = p
        solution = p["solution"]
        if rng.random() < self.error_rate:  # a slip in the last step
            wrong = str(int(p["answer"]) + rng.choice((-1, 1)) * rng.randint(1, 9))
            solution = solution.replace(f"= {p['answer']}", f"= {wrong}").replace(
                f"\\boxed{{{p['answer']}}}", f"\\boxed{{{wrong}}}")
        return f"### Problem\n{p['prompt']}\n### Solution\n{solution}"

    def _solve(self, text: str, rng: random.Random) -> str:
        p = self.problems.get(text)
        if p is None:
            raise ValueError(f"not a problem this teacher set: {text[:60]!r}")
        if rng.random() < (1 - self.error_rate) ** p["steps"]:
            return p["solution"]
        return f"I think the total is \\boxed{{{int(p['answer']) + rng.randint(1, 9)}}}"

    def _restate(self, doc: dict, rng: random.Random) -> str:
        facts = [self.facts[f] for f in doc["facts"]]
        if rng.random() >= self.error_rate:
            return restatement(facts)
        k = rng.randrange(len(facts))
        f = facts[k]
        value = str(int(f.value) + rng.randint(1, 9)) if f.value.isdigit() else \
            rng.choice([g.value for g in self.world.facts if g.relation == f.relation
                        and g.value != f.value] or [f.value + "s"])
        text = restatement(facts[:k] + [Fact(f.id, f.relation, f.subject, value, f.place)]
                           + facts[k + 1:])
        with self._lock:
            self.wrong.add(text)
        return text


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _send(self, code: int, doc: dict) -> None:
        body = json.dumps(doc).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path.rstrip("/") != "/v1/models":
            return self._send(404, {"error": {"message": "not found", "type": "not_found"}})
        self._send(200, {"object": "list", "data": [
            {"id": "scripted", "object": "model", "created": 0, "owned_by": "phijax"}]})

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
        n = int(req.get("n") or 1)
        try:
            contents = [self.server.teacher(req["messages"], n, i) for i in range(n)]
        except ValueError as e:
            return self._send(400, {"error": {"message": str(e), "type": "invalid_request_error"}})
        self._send(200, {
            "id": "scripted", "object": "chat.completion", "created": 0, "model": "scripted",
            "choices": [{"index": i, "message": {"role": "assistant", "content": c},
                         "finish_reason": "stop", "logprobs": None}
                        for i, c in enumerate(contents)],
            "usage": {"prompt_tokens": 1, "completion_tokens": sum(len(c) // 4 for c in contents),
                      "total_tokens": 1 + sum(len(c) // 4 for c in contents)}})


class TeacherServer:
    """The scripted teacher on 127.0.0.1 (a free port), served from a background thread until
    `close()`; `url` ends in /v1."""

    def __init__(self, teacher: ScriptedTeacher):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.teacher = teacher
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> "TeacherServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
