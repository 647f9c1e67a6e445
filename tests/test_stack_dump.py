"""SIGUSR1: a running gateway writes every thread's stack to its log and goes on serving."""

from __future__ import annotations

import signal
import smtplib

from tests.conftest import wait_until


def test_sigusr1_dumps_every_threads_stack_and_the_gateway_goes_on(gateway):
    gateway.start()
    gateway.proc.send_signal(signal.SIGUSR1)
    wait_until(lambda: "Current thread" in gateway.output() or "Thread 0x" in gateway.output(),
               timeout=10)
    out = gateway.output()
    assert 'File "' in out and "mailgw" in out  # Python frames of mailgw's own threads
    assert gateway.proc.poll() is None  # still running
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=30) as s:
        assert s.noop()[0] == 250
    assert gateway.stop() == 0
