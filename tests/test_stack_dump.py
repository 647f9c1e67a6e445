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


CHURN = r"""
import os, signal, sys, threading, time
from mailgw.signals import dump_stacks_on_sigusr1
dump_stacks_on_sigusr1()
sys.stderr = open(os.devnull, "w")  # the dumps themselves are not the subject
stop = time.monotonic() + float(sys.argv[1])
def churn():
    while time.monotonic() < stop:
        ts = [threading.Thread(target=lambda: None) for _ in range(20)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
def signals():
    while time.monotonic() < stop:
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.0005)
threads = [threading.Thread(target=churn) for _ in range(3)] + [threading.Thread(target=signals)]
for t in threads:
    t.start()
while time.monotonic() < stop:
    time.sleep(0.01)
for t in threads:
    t.join()
print("alive")
"""


def test_sigusr1_while_threads_start_and_end_does_not_crash_the_process():
    """faulthandler's C handler walked the thread states at the instant the signal landed: a
    thread starting or ending then crashed the process (SIGSEGV within seconds here)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", CHURN, "4"], capture_output=True, timeout=120)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert proc.stdout.strip() == b"alive"
