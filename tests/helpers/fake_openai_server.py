"""A small OpenAI-compatible chat-completions server for tests and benchmarks (127.0.0.1, random port).

It judges deterministically: it reads `Summary A:` / `Summary B:` from the prompt (the template of
`maxent_rlhf.judges`) and scores each summary +1 if it contains the word `marker`, -1 if it contains
`anti_marker`, else 0; the higher score wins, and on equal scores it prefers A (a position bias the
A/B randomisation must undo). `prefer="A"` always answers A (pure position bias); `prefer="longer"`
prefers the summary with more words (A on equal length). A post containing `garble_word` always
gets a garbled answer. Faults are injected per request, in arrival order, from `faults` (a list of
"429", "500", "503", "slow", "garbled", None) or a callable(request_number, body) -> fault.

    with FakeJudgeServer(marker="good", api_key="sk-test") as server:
        client = AsyncOpenAI(base_url=server.base_url, api_key="sk-test")
"""
from __future__ import annotations

import json
import math
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional, Sequence, Union

_SUMMARIES = re.compile(r"Summary A:\n(.*?)\n\nSummary B:\n(.*?)\n\nFIRST", re.DOTALL)
_POST = re.compile(r"Post:\n(.*?)\n\nSummary A:", re.DOTALL)

# answer styles the judge parser must accept, cycled per request
STYLES = (
    "Comparison: Summary {w} mentions what matters.\nPreferred: {w}",
    'Comparison: {w} is better.\nPreferred: "{w}"',
    "comparison: {w} covers the point.\npreferred: {wl}",
    "**Comparison:** {w} wins.\n**Preferred:** {w}",
)


class FakeJudgeServer:
    def __init__(
        self,
        marker: str = "good",
        anti_marker: str = "bad",
        api_key: Optional[str] = None,
        latency: float = 0.0,
        faults: Union[Sequence[Optional[str]], Callable[[int, dict], Optional[str]], None] = None,
        slow_seconds: float = 2.0,
        retry_after: str = "0",
        garble_word: str = "garble",
        p_preferred: float = 0.8,
        prefer: str = "marker",
    ):
        if prefer not in ("marker", "A", "longer"):
            raise ValueError(f"prefer must be 'marker', 'A' or 'longer', got {prefer!r}")
        self.prefer = prefer
        self.marker = marker
        self.anti_marker = anti_marker
        self.api_key = api_key
        self.latency = latency
        self.faults = faults
        self.slow_seconds = slow_seconds
        self.retry_after = retry_after
        self.garble_word = garble_word
        self.p_preferred = p_preferred
        self.lock = threading.Lock()
        self.requests = 0  # every HTTP request received
        self.statuses: Counter = Counter()  # status codes sent
        self.judged: Counter = Counter()  # (summary_a, summary_b) -> valid answers sent in time
        self.late = 0  # valid answers sent after `slow_seconds` (past the client's timeout: abandoned)
        self.auth_failures = 0
        self.hold_after: Optional[int] = None  # hold every request after this many valid answers
        self.held = 0
        self.release = threading.Event()
        self._httpd: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    # ---- lifecycle -------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def start(self) -> "FakeJudgeServer":
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out as separate writes

            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                server._handle(self)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ---- request handling -----------------------------------------------------------------------
    def _fault(self, n: int, body: dict) -> Optional[str]:
        if callable(self.faults):
            return self.faults(n, body)
        if self.faults and n < len(self.faults):
            return self.faults[n]
        return None

    def _send(self, h: BaseHTTPRequestHandler, status: int, payload: dict, headers: Optional[dict] = None) -> None:
        data = json.dumps(payload).encode()
        try:
            h.send_response(status)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(data)
            h.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            return
        with self.lock:
            self.statuses[status] += 1

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = json.loads(h.rfile.read(length) or b"{}")
        with self.lock:
            n = self.requests
            self.requests += 1
        if self.api_key is not None and h.headers.get("Authorization") != f"Bearer {self.api_key}":
            with self.lock:
                self.auth_failures += 1
            return self._send(h, 401, {"error": {"message": "invalid api key", "type": "invalid_request_error"}})
        if not h.path.rstrip("/").endswith("/chat/completions"):
            return self._send(h, 404, {"error": {"message": f"no route {h.path}"}})
        if self.hold_after is not None:
            with self.lock:
                hold = sum(self.judged.values()) >= self.hold_after
                self.held += hold
            if hold:
                self.release.wait(30)
                return self._send(h, 503, {"error": {"message": "held"}})
        if self.latency:
            time.sleep(self.latency)
        fault = self._fault(n, body)
        if fault == "429":
            return self._send(h, 429, {"error": {"message": "rate limited", "type": "rate_limit"}},
                              {"Retry-After": self.retry_after})
        if fault in ("500", "503"):
            return self._send(h, int(fault), {"error": {"message": "server error"}})
        if fault == "slow":
            time.sleep(self.slow_seconds)
        prompt = body["messages"][-1]["content"]
        m = _SUMMARIES.search(prompt)
        post = _POST.search(prompt)
        if m is None:
            return self._send(h, 400, {"error": {"message": "prompt does not follow the judge template"}})
        a, b = m.group(1), m.group(2)
        if fault == "garbled" or (post and self.garble_word in post.group(1).split()):
            text = "I think both summaries have merit and cannot choose."
            winner = None
        else:
            winner = self.winner(a, b)
            text = STYLES[n % len(STYLES)].format(w=winner, wl=winner.lower())
            with self.lock:
                if fault == "slow":
                    self.late += 1
                else:
                    self.judged[(a, b)] += 1
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        if body.get("logprobs"):
            choice["logprobs"] = {"content": self._logprobs(text, winner)}
        self._send(h, 200, {
            "id": f"chatcmpl-{n}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", "fake"), "choices": [choice],
            "usage": {"prompt_tokens": len(prompt) // 4, "completion_tokens": len(text) // 4,
                      "total_tokens": (len(prompt) + len(text)) // 4},
        })

    def winner(self, a: str, b: str) -> str:
        if self.prefer == "A":
            return "A"
        if self.prefer == "longer":
            return "B" if len(b.split()) > len(a.split()) else "A"
        return "B" if self.score(b) > self.score(a) else "A"

    def score(self, summary: str) -> int:
        words = summary.split()
        return 1 if self.marker in words else -1 if self.anti_marker in words else 0

    def _logprobs(self, text: str, winner: Optional[str]) -> list:
        tokens = re.findall(r"\s*\S+", text)
        out = []
        for tok in tokens:
            entry = {"token": tok, "logprob": 0.0, "bytes": None, "top_logprobs": []}
            if winner and tok.strip().strip('"*').upper() == winner and "referred" in "".join(t["token"] for t in out):
                other = "B" if winner == "A" else "A"
                entry["logprob"] = math.log(self.p_preferred)
                entry["top_logprobs"] = [
                    {"token": tok, "logprob": math.log(self.p_preferred), "bytes": None},
                    {"token": tok.replace(winner, other).replace(winner.lower(), other.lower()),
                     "logprob": math.log(1 - self.p_preferred), "bytes": None},
                ]
            out.append(entry)
        return out


if __name__ == "__main__":  # a standalone server process (benchmarks: no GIL shared with the client)
    import argparse

    ap = argparse.ArgumentParser(description="fake OpenAI-compatible judge server")
    ap.add_argument("--latency", type=float, default=0.0)
    ap.add_argument("--marker", default="good")
    args = ap.parse_args()
    srv = FakeJudgeServer(marker=args.marker, latency=args.latency).start()
    print(srv.base_url, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        srv.stop()
