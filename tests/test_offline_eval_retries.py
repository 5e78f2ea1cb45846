"""Offline evaluation waits for a slow policy (growing timeouts) and fails with a clear message, on real
ZeroMQ sockets: a ROUTER that answers late, or never."""

from __future__ import annotations

import time

import pytest
from conftest import free_endpoint, wait_for

from bench.harness import StandInServer
from common.tools.offline_eval import Patience, PolicyTooSlow, patiently
from common.wire.policy_client import PolicyClient
from common.wire.protocol import KIND_REPLY, Message
from common.wire.transport import RouterServer, SocketFactory


class SlowPolicy(StandInServer):
    """A serial server (like the policy node) whose first request takes ``delay_s``; later ones are quick.
    Requests sent meanwhile wait behind it, so a retry must outlast the backlog, not only its own work."""

    def __init__(self, factory: SocketFactory, endpoint: str, delay_s: float) -> None:
        super().__init__(factory, endpoint, name="slow-policy")
        self.delay_s = delay_s
        self.requests = 0

    def answer(self, request: Message) -> Message:
        self.requests += 1
        if self.requests == 1:
            time.sleep(self.delay_s)
        return Message(kind=KIND_REPLY, src="slow", seq=request.seq, meta={"op": "ping"})


def test_a_slow_policy_is_waited_for_with_growing_timeouts(caplog: pytest.LogCaptureFixture) -> None:
    factory = SocketFactory()
    endpoint = free_endpoint()
    policy = SlowPolicy(factory, endpoint, delay_s=1.0)
    policy.start()
    client = PolicyClient(factory, endpoint, client_id="eval", retries=1)
    try:
        patience = Patience(first_timeout_s=0.2, attempts=4)
        assert patience.timeouts() == [0.2, 0.4, 0.8, 1.6]
        started = time.monotonic()
        patiently(lambda timeout: client.ping(timeout_s=timeout), patience, endpoint, "ping")
        # Attempt 1 (0.2 s) is the slow request; attempt 2 (sent at 0.2 s, 0.4 s) waits behind it until 1.0 s;
        # attempt 3 (sent at 0.6 s, 0.8 s) is answered right after, at about 1.0 s.
        assert 1.0 <= time.monotonic() - started < 1.4
        # Each attempt is a new connection and the server takes them in turn, so attempt 3 can be answered
        # before attempt 2 is read: all three reach it, in whichever order.
        wait_for(lambda: policy.requests == 3, timeout_s=2.0, message=f"{policy.requests} requests, expected 3")
        assert "retrying with 0.4 s" in caplog.text and "retrying with 0.8 s" in caplog.text
    finally:
        client.close()
        policy.stop.set()
        policy.join()


def test_a_policy_that_never_answers_ends_with_a_clear_error() -> None:
    factory = SocketFactory()
    endpoint = free_endpoint()
    silent = RouterServer(factory, endpoint)  # bound, never answers
    client = PolicyClient(factory, endpoint, client_id="eval", retries=1)
    try:
        with pytest.raises(PolicyTooSlow) as info:
            patiently(lambda timeout: client.ping(timeout_s=timeout), Patience(0.05, attempts=3), endpoint,
                      "infer for episode 2 frame 17", "1 of 3 episode(s) and 150 frame(s) were scored")
        text = str(info.value)
        for part in (endpoint, "infer for episode 2 frame 17", "3 attempt(s)", "0.05, 0.1, 0.2 s",
                     "1 of 3 episode(s) and 150 frame(s) were scored", "ready/policy.json", "--attempts"):
            assert part in text
    finally:
        client.close()
        silent.close()
