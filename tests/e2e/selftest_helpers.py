"""Self-test of botapi_helpers.py (webhook receiver, signatures, SSE reader), no component needed.

Run:  python3 tests/e2e/selftest_helpers.py   (or: python3 -m pytest -q tests/e2e/selftest_helpers.py)
"""

from __future__ import annotations

import http.client
import json
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from botapi_helpers import (
    Delivery,
    SseStream,
    WebhookReceiver,
    delivery_problems,
    new_webhook_secret,
    sign,
    verify_delivery,
)


def post(receiver: WebhookReceiver, envelope: dict, *, secret: str | None = None, conn=None, timestamp=None,
         signature: str | None = None):
    """POST one delivery the way docs/bot-api.md describes; returns (status, body, conn)."""
    body = json.dumps(envelope).encode()
    ts = str(timestamp if timestamp is not None else int(time.time()))
    headers = {
        "content-type": "application/json",
        "webhook-id": envelope["id"],
        "webhook-timestamp": ts,
        "webhook-signature": signature or sign(secret or receiver.secret, envelope["id"], ts, body),
    }
    conn = conn or http.client.HTTPConnection("127.0.0.1", receiver.port, timeout=5)
    conn.request("POST", receiver.path, body=body, headers=headers)
    resp = conn.getresponse()
    return resp.status, resp.read(), conn


def envelope(seq: int, kind: str = "message.received", tunnel: str | None = "t1", body: str | None = None) -> dict:
    data = {} if body is None else {"body": body}
    return {"id": f"evt_{seq:016x}", "seq": seq, "type": kind, "bot": "b@bots.localhost",
            "occurred_at": "2026-01-01T00:00:00Z", "tunnel_id": tunnel, "peer": "alice@localhost/x", "data": data}


# --------------------------------------------------------------------------- tests


def test_standard_webhooks_vector():
    """The published Standard Webhooks test vector."""
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"test": 2432232314}'
    assert sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body) == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    headers = {"webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek", "webhook-timestamp": "1614265330",
               "webhook-signature": "v1,bm9wZQ== v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
               "content-type": "application/json"}
    problems = verify_delivery(secret, headers, body, now=1614265330)
    assert problems == ["webhook-id 'msg_p5jXN8AQM9LWM0D4loKWxJek' is not the event id of the body"], problems
    assert any("more than" in p for p in verify_delivery(secret, headers, body, now=1614265330 + 301))
    bad = dict(headers, **{"webhook-signature": "v1,bm9wZQ=="})
    assert any("mismatch" in p for p in verify_delivery(secret, bad, body, now=1614265330))


def test_receiver_records_verifies_and_replies():
    replies = lambda e: {"body": "re: " + e["data"]["body"]} if e["type"] == "message.received" else None  # noqa: E731
    with WebhookReceiver(reply=replies) as hook:
        status, body, conn = post(hook, envelope(1, body="hi"))
        assert status == 200 and json.loads(body) == {"reply": {"body": "re: hi"}}, (status, body)
        status, body, conn = post(hook, envelope(2, "tunnel.closed"), conn=conn)  # same keep-alive connection
        assert status == 200 and body == b"", (status, body)
        status, _, conn = post(hook, envelope(3, body="x"), conn=conn, secret=new_webhook_secret())
        assert status == 401
        hook.status = 500
        status, body, conn = post(hook, envelope(4, body="y"), conn=conn)
        assert status == 500 and body == b""
        ds = hook.deliveries
        assert [(d.seq, d.status) for d in ds] == [(1, 200), (2, 200), (3, 401), (4, 500)]
        assert ds[0].event_id == "evt_0000000000000001" and ds[0].tunnel_id == "t1" and ds[0].type == "message.received"
        assert ds[2].problems and not ds[0].problems
        assert [d.seq for d in hook.acked()] == [1, 2] and hook.acked_bodies() == ["hi"]
        assert [d.seq for d in hook.invalid()] == [3]
        assert hook.wait_for(lambda h: len(h.deliveries) == 4, 1)


def test_receiver_down_and_up_on_the_same_port():
    with WebhookReceiver() as hook:
        port = hook.port
        status, _, conn = post(hook, envelope(1, body="a"))
        assert status == 200
        hook.stop()
        try:  # the kept-alive connection is gone too
            post(hook, envelope(2, body="b"), conn=conn)
            raise AssertionError("a kept-alive connection still reached the stopped receiver")
        except (OSError, http.client.HTTPException):
            pass
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            raise AssertionError("the stopped receiver still accepts connections")
        except ConnectionRefusedError:
            pass
        hook.start()
        assert hook.port == port
        status, _, _ = post(hook, envelope(2, body="b"))
        assert status == 200 and [d.seq for d in hook.acked()] == [1, 2]


def test_delivery_problems_finds_order_and_duplicate_violations():
    def d(n, seq, status, answered, tunnel="t1", event=None):
        env = envelope(seq, tunnel=tunnel, body=str(seq))
        if event:
            env["id"] = event
        return Delivery(n=n, arrived=0.0, event_id=env["id"], timestamp="0", headers={}, body=b"",
                        envelope=env, problems=[], status=status, answered_n=answered)

    good = [d(1, 1, 500, 2), d(3, 1, 200, 4), d(5, 2, 200, 6), d(7, 5, 200, 8, tunnel="t2"), d(9, 3, 200, 10)]
    assert delivery_problems(good) == [], delivery_problems(good)
    early = [d(1, 1, 200, 4), d(2, 2, 200, 5)]  # seq 2 arrived before seq 1 was answered
    assert any("before seq 1" in p for p in delivery_problems(early)), delivery_problems(early)
    twice = [d(1, 1, 200, 2), d(3, 1, 200, 4)]
    assert any("acknowledged twice" in p for p in delivery_problems(twice))
    skipped = [d(1, 2, 200, 2), d(3, 1, 200, 4)]
    assert any("out of seq order" in p for p in delivery_problems(skipped))


class _SseHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen_last_event_id: list = []

    def log_message(self, *a):
        pass

    def do_GET(self):  # noqa: N802
        try:
            self._stream()
        except OSError:  # the reader closed early (the last case of test_sse_reader)
            self.close_connection = True

    def _stream(self):
        _SseHandler.seen_last_event_id.append(self.headers.get("Last-Event-ID"))
        if self.headers.get("Authorization") != "Bearer tok":
            self.send_response(401)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"no")
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def chunk(text: str) -> None:
            raw = text.encode()
            self.wfile.write(f"{len(raw):x}\r\n".encode() + raw + b"\r\n")
            self.wfile.flush()

        chunk(": keep-alive\n\n")
        chunk('id: 5\nevent: message.received\ndata: {"seq": 5,\ndata:  "x": 1}\n\n')
        time.sleep(0.05)
        chunk("id: 6\nev")  # an event split across chunks
        chunk("ent: tunnel.closed\r\ndata: {\"seq\": 6}\r\n\r\n")
        time.sleep(0.3)
        chunk("data: tail\n\n")
        self.wfile.write(b"0\r\n\r\n")


def test_sse_reader():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SseHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with SseStream(base, "/v1/bots/b/events", "tok", last_event_id=4, timeout=5) as sse:
            assert sse.status == 200 and sse.headers["content-type"] == "text/event-stream"
            first, second = sse.take(2, timeout=5)
            assert (first.id, first.event, first.json) == ("5", "message.received", {"seq": 5, "x": 1})
            assert (second.id, second.event, second.json) == ("6", "tunnel.closed", {"seq": 6})
            third = sse.next(timeout=5)
            assert (third.id, third.event, third.data) == ("6", "message", "tail")  # id persists (SSE rules)
            assert sse.comments == 1
            try:
                sse.next(timeout=5)
                raise AssertionError("no EOF after the last chunk")
            except EOFError:
                pass
        with SseStream(base, "/x", "wrong") as refused:
            assert refused.status == 401 and refused.error_body == b"no"
        with SseStream(base, "/v1/bots/b/events", "tok") as sse:  # close() while the reader blocks
            sse.next(timeout=5)
        assert _SseHandler.seen_last_event_id[0] == "4" and _SseHandler.seen_last_event_id[-1] is None
    finally:
        server.shutdown()
        server.server_close()


if __name__ == "__main__":
    import pytest

    sys.exit(pytest.main([__file__, "-q"]))
