"""A deterministic OpenAI-compatible teacher for tests and `genssd bench engine`, run as its own
process on 127.0.0.1 (standard library only).

Completions depend only on (text continued, seed): the same request always gets the same text.
A text ending in a count ("…, 7, 8," or "…, 9, 1") is counted on, as a model continuing text does. Every
request is appended to a JSONL log (prompt, seed, n, fault) so tests can count repeats. Faults
are injected at a configurable rate: HTTP errors, a malformed or empty body, a reset connection, fewer
choices than asked, and a hang past the client's timeout; with --fault-kinds, replies of the wrong
shape or size too (SHAPE_FAULTS). Whether the k-th identical request
(same prompt and seed) fails is decided by hashing it with --fault-seed, so a run's faults do
not depend on the order in which concurrent requests arrive.

/v1/chat/completions behaves like vLLM's: a final assistant message is continued when the
request says `continue_final_message` (or, with `--prefill prefix`, when the message has `prefix:
true`, as some hosted APIs do); otherwise a new answer to the user message starts. `--reasoning`
hands text before "The answer is" back as `reasoning_content` (its `</think>` dropped, as vLLM's
reasoning parsers do); `--reject-n` answers 400 to n > 1 on both APIs, as many hosted APIs do.
Each word is a token; asked for `logprobs`, every choice lists its tokens (`--no-logprobs`: never).
`--bill-one-choice` bills only the first choice's tokens, as llama.cpp's llama-server does for n > 1;
`--no-usage` sends no usage at all.
`--foreign KIND` answers every request as a misconfigured base_url would: a login page (HTML), a
JSON object of another API, an error object under status 200, an empty body, a redirect.

    python -m genssd_cli.teacher.servers.test_teacher --port P --log requests.jsonl [--ignore-n] [--fault-rate 0.2]
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import random
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# What every genssd request holds, and the chat API's continuation switches.
_USUAL_FIELDS = frozenset({"model", "prompt", "messages", "n", "max_tokens", "seed", "temperature", "top_p", "stop",
                           "logprobs", "continue_final_message", "add_generation_prompt"})  # fmt: skip
FAULTS = ["500", "502", "503", "504", "429", "malformed", "empty", "reset", "fewer", "hang"]
# Replies of the wrong shape or size, drawn instead with --fault-kinds: a choice whose text (or
# message content) is a number, a null choice index, a 400 whose error message is an object, a
# body past the client's size limit (no Content-Length: only counting finds it), a body trickled
# a few bytes at a time (each gap inside the read timeout, the whole past the deadline).
SHAPE_FAULTS = ["wrong-type", "null-index", "error-object", "oversize", "trickle"]


def continuation(prompt: str, seed: int, max_tokens: int, stop: list[str], answers: int = 61) -> tuple[str, str, int]:
    """Words 'wN' as tokens; with some chance the chunk ends the solution with an answer drawn
    from range(answers) (a small range makes some answers right)."""
    count = re.search(r"\d+,\s*(\d+),\s*(\d*)$", prompt)  # "…, 8," or "…, 9, 1": counted on
    if count and (following := str(int(count.group(1)) + 1)).startswith(count.group(2)):
        first = following[len(count.group(2)):] + "," if count.group(2) else f" {following},"
        rest = "".join(f" {int(following) + i}," for i in range(1, max_tokens))
        return first + rest, "length", max_tokens
    rng = random.Random(hashlib.sha256(f"{seed}\x00{prompt}".encode()).digest())
    words = [f" w{rng.randint(0, 99)}" for _ in range(max_tokens)]
    if rng.random() < 0.35 and max_tokens >= 4:
        answer = rng.randrange(answers)
        cut = rng.randint(1, max_tokens - 3)
        text = "".join(words[:cut]) + f" The answer is {answer}.\nQuestion: next"
        for s in stop:
            if s and s in text:
                return text[: text.index(s)], "stop", cut + 4
        return text, "length", max_tokens
    return "".join(words), "length", max_tokens


class Handler(BaseHTTPRequestHandler):
    server: FakeServer

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, body: dict | bytes, headers: dict | None = None) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (a 'hang' fault)
            pass

    def _reply(self, fault: str | None, body: dict) -> None:
        """A 200 reply, spoilt as a shape fault says."""
        first = body["choices"][0] if body["choices"] else {}
        if fault == "wrong-type" and first:
            first["message" if "message" in first else "text"] = 12345
        elif fault == "null-index" and first:
            first["index"] = None
        elif fault in ("oversize", "trickle"):
            return self._stream(fault, json.dumps(body).encode())
        self._send(200, body)

    def _stream(self, fault: str, data: bytes) -> None:
        """oversize: --oversize-bytes of padding, no Content-Length (the body ends at the close);
        trickle: the body 8 bytes at a time, --trickle-gap-s apart."""
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Connection", "close")
            self.end_headers()
            if fault == "oversize":
                self.wfile.write(data[:-1] + b', "padding": "')
                for _ in range(self.server.oversize_bytes // 65536 + 1):
                    self.wfile.write(b"x" * 65536)
                self.wfile.write(b'"}')
            else:
                for at in range(0, len(data), 8):
                    self.wfile.write(data[at : at + 8])
                    self.wfile.flush()
                    time.sleep(self.server.trickle_gap_s)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up, as it should
            pass
        self.close_connection = True

    def _authorised(self) -> bool:
        if self.server.api_key and self.headers.get("Authorization") != f"Bearer {self.server.api_key}":
            self._send(401, {"error": {"message": "invalid api key"}})
            return False
        return True

    def _foreign(self) -> bool:
        """--foreign: answer every request as something that is not the API (and say so)."""
        kind = self.server.foreign
        if kind is None:
            return False
        if kind == "redirect" and self.path != "/login":
            self.send_response(302)
            self.send_header("Location", "/login")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif kind == "html" or self.path == "/login":
            body = b"<!doctype html><html><body><form>Sign in</form></body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            body = {"json": {"status": "ok", "items": []}, "error": {"error": {"message": "quota exceeded"}},
                    "empty": b""}[kind]  # fmt: skip
            self._send(200, body)
        return True

    def do_GET(self) -> None:
        if self._foreign() or not self._authorised():
            return
        if self.path.rstrip("/") == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": self.server.model, "object": "model"}]})
        else:
            self._send(404, {"error": {"message": "not found"}})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        try:
            req = json.loads(self.rfile.read(length))
        except ValueError:  # a client killed mid-request sent half a body
            return self._send(400, {"error": {"message": "the request body is not JSON"}})
        if self._foreign() or not self._authorised():
            return
        if self.server.status:
            self.server.record(req, str(self.server.status))
            message = self.server.error_message or f"forced {self.server.status}"
            return self._send(self.server.status, {"error": {"message": message}})
        if req.get("model") != self.server.model:
            return self._send(404, {"error": {"message": f"model {req.get('model')} not found"}})
        chat = self.path.rstrip("/").endswith("/chat/completions")
        if chat:
            req["prompt"], continued = self.server.chat_text(req)
        if self.server.reject_n and int(req.get("n") or 1) > 1:
            self.server.record(req, "400")
            return self._send(400, {"error": {"message": "n must be 1", "type": "invalid_request_error"}})
        if self.server.max_prompt_words and len(req["prompt"].split()) > self.server.max_prompt_words:
            message = f"This model's maximum context length is {self.server.max_prompt_words} tokens"
            return self._send(400, {"error": {"message": message, "type": "invalid_request_error"}})
        fault = self.server.next_fault(req)
        self.server.record(req, fault)
        if fault == "reset":
            self.connection.close()
            return
        if fault == "malformed":
            return self._send(200, b"{not json")
        if fault == "hang":
            time.sleep(self.server.hang_s)  # past the client's timeout; it has given up by now
        if fault == "empty" or (fault == "fewer" and int(req.get("n") or 1) == 1):
            return self._send(
                200, {"id": "x", "object": "text_completion", "created": 0, "model": self.server.model, "choices": []}
            )
        if fault == "error-object":
            return self._send(400, {"error": {"message": {"detail": "an object where text belongs"}}})
        if fault in ("500", "502", "503", "504", "429"):
            headers = {"Retry-After": "0"} if fault == "429" else {}
            return self._send(int(fault), {"error": {"message": f"injected {fault}"}}, headers)
        n = 1 if self.server.ignore_n else int(req.get("n") or 1)
        if fault == "fewer":
            n -= 1
        seed = int(req.get("seed") or 0)
        max_tokens = int(req["max_tokens"])
        stop = req.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        choices, total, counts = [], 0, []
        for i in range(n):
            text, finish, tokens = continuation(req["prompt"], seed + i, max_tokens, stop, self.server.answers)
            logprobs = self.server.logprobs(req, tokens, chat)
            if chat:
                message = self.server.chat_message(text, continued)
                choices.append({"index": i, "message": message, "finish_reason": finish, "logprobs": logprobs})
            else:
                choices.append({"index": i, "text": text, "finish_reason": finish, "logprobs": logprobs})
            total += tokens
            counts.append(tokens)
        if self.server.latency_per_token:
            time.sleep(self.server.latency_per_token * total)
        self._reply(fault, {
            "id": "chatcmpl-fake" if chat else "cmpl-fake", "object": "chat.completion" if chat else "text_completion",
            "created": 0, "model": self.server.model, "choices": choices, **self.server.usage(req, counts),
        })  # fmt: skip


class FakeServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int, args: argparse.Namespace):
        super().__init__(("127.0.0.1", port), Handler)
        self.model = args.model
        self.ignore_n = args.ignore_n
        self.status = args.status
        self.error_message = args.error_message
        self.latency_per_token = args.latency_per_token
        self.hang_s = args.hang_s
        self.max_prompt_words = args.max_prompt_words
        self.api_key = args.api_key
        self.fault_rate = args.fault_rate
        self.fault_kinds = args.fault_kinds.split(",") if args.fault_kinds else FAULTS
        self.oversize_bytes = args.oversize_bytes
        self.trickle_gap_s = args.trickle_gap_s
        self.answers = args.answer_range
        self.fault_seed = args.fault_seed
        self.prefill = args.prefill
        self.reasoning = args.reasoning
        self.reject_n = args.reject_n
        self.no_logprobs = args.no_logprobs
        self.bill_one_choice = args.bill_one_choice
        self.no_usage = args.no_usage
        self.foreign = args.foreign
        self._seen: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._log = open(args.log, "a", encoding="utf-8") if args.log else None  # noqa: SIM115

    def chat_text(self, req: dict) -> tuple[str, bool]:
        """The text the model goes on from, and whether the final assistant message is continued
        (else a new assistant turn starts after the conversation, as a chat template renders it)."""
        messages = req.get("messages") or []
        last = messages[-1] if messages else {}
        continued = last.get("role") == "assistant" and (
            (self.prefill == "continue_final_message" and req.get("continue_final_message") is True
             and req.get("add_generation_prompt") is False)
            or (self.prefill == "prefix" and last.get("prefix") is True)
        )  # fmt: skip
        turns = messages[:-1] if continued else messages
        text = "".join(f"<{m.get('role')}>{m.get('content')}\n" for m in turns)
        return text + "<assistant>" + (last.get("content") or "" if continued else ""), continued

    def chat_message(self, text: str, continued: bool) -> dict:
        if self.reasoning and " The answer is" in text:
            thinking, _, rest = text.partition(" The answer is")
            return {"role": "assistant", "reasoning_content": thinking, "content": " The answer is" + rest}
        if self.reasoning:
            return {"role": "assistant", "reasoning_content": text, "content": None}
        return {"role": "assistant", "content": text}

    def logprobs(self, req: dict, tokens: int, chat: bool) -> dict | None:
        """The chosen tokens' log-probabilities, when asked for (and not --no-logprobs): what
        lets a client count each choice's tokens."""
        asked = req.get("logprobs")
        if self.no_logprobs or asked is None or asked is False:  # 0 asks: the chosen tokens alone
            return None
        if chat:
            return {"content": [{"token": f"t{k}", "logprob": -1.0, "bytes": None, "top_logprobs": []}
                                for k in range(tokens)]}  # fmt: skip
        return {"tokens": [f"t{k}" for k in range(tokens)], "token_logprobs": [-1.0] * tokens,
                "top_logprobs": None, "text_offset": list(range(tokens))}  # fmt: skip

    def usage(self, req: dict, counts: list[int]) -> dict:
        """The bill: every choice's tokens; with --bill-one-choice the first choice's alone (as
        llama.cpp's llama-server bills n choices); with --no-usage none at all (legal, if rare)."""
        if self.no_usage:
            return {}
        prompt = len(req["prompt"].split())
        billed = counts[0] if self.bill_one_choice and counts else sum(counts)
        return {"usage": {"prompt_tokens": prompt, "completion_tokens": billed, "total_tokens": billed + prompt}}

    def next_fault(self, req: dict) -> str | None:
        key = json.dumps([req["prompt"], req.get("seed")])  # not n: learning n must not change faults
        with self._lock:
            self._seen[key] += 1
            repeat = self._seen[key]
        draw = random.Random(hashlib.sha256(f"{self.fault_seed}\x00{repeat}\x00{key}".encode()).digest())
        return draw.choice(self.fault_kinds) if draw.random() < self.fault_rate else None

    def record(self, req: dict, fault: str | None) -> None:
        if self._log is None:
            return
        line = json.dumps(
            {
                "prompt": req["prompt"],
                "seed": req.get("seed"),
                "n": req.get("n"),
                "max_tokens": req.get("max_tokens"),
                "fault": fault,
                # Fields beyond the ones genssd always sets (teacher.extra_body's, say), so tests see them.
                "extra": {k: v for k, v in req.items() if k not in _USUAL_FIELDS},
            }
        )
        with self._lock:
            self._log.write(line + "\n")
            self._log.flush()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default="fake-teacher")
    parser.add_argument("--log")
    parser.add_argument("--ignore-n", action="store_true", help="answer one choice, like llama.cpp")
    parser.add_argument("--status", type=int, default=0, help="answer every POST with this status")
    parser.add_argument("--error-message", help="the error message of --status answers (any text)")
    parser.add_argument("--fault-rate", type=float, default=0.0)
    parser.add_argument("--fault-seed", type=int, default=0)
    parser.add_argument("--fault-kinds", help=f"comma-separated faults to draw from (default: {','.join(FAULTS)}; "
                        f"also {','.join(SHAPE_FAULTS)})")  # fmt: skip
    parser.add_argument("--oversize-bytes", type=int, default=2**21, help="the padding of an 'oversize' fault")
    parser.add_argument("--trickle-gap-s", type=float, default=0.1, help="the gap between a 'trickle' fault's bytes")
    parser.add_argument("--latency-per-token", type=float, default=0.0)
    parser.add_argument("--hang-s", type=float, default=3.0, help="how long a 'hang' fault stalls")
    parser.add_argument("--max-prompt-words", type=int, default=0, help="400 'context length' beyond")
    parser.add_argument("--api-key", help="require this bearer token (401 otherwise)")
    parser.add_argument("--answer-range", type=int, default=61, help="answers are drawn from 0..N-1")
    parser.add_argument("--prefill", choices=["continue_final_message", "prefix", "none"],
                        default="continue_final_message", help="how a partial assistant message is continued")
    parser.add_argument("--reasoning", action="store_true", help="thinking as reasoning_content, apart")
    parser.add_argument("--reject-n", action="store_true", help="answer 400 to n > 1")
    parser.add_argument("--no-logprobs", action="store_true", help="ignore logprobs, as some servers do")
    parser.add_argument("--bill-one-choice", action="store_true",
                        help="usage bills the first choice's tokens only, as llama.cpp's llama-server does for n > 1")
    parser.add_argument("--no-usage", action="store_true", help="send no usage (token counts) at all")
    parser.add_argument("--foreign", choices=["html", "json", "error", "empty", "redirect"],
                        help="answer everything as no OpenAI-compatible API does (a login page, another JSON, …)")
    args = parser.parse_args()
    FakeServer(args.port, args).serve_forever()


if __name__ == "__main__":
    main()
