"""`on_stop_signals`: SIGINT and SIGTERM routed to one handler, and put back afterwards."""

from __future__ import annotations

import os
import signal
import threading

from evomerge.stop_signals import on_stop_signals


def test_both_signals_reach_the_handler_an_ignored_one_stays_ignored_and_all_come_back():
    received: list[int] = []
    before_int = signal.getsignal(signal.SIGINT)
    before_term = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with on_stop_signals(lambda signum, _: received.append(signum)) as again:
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN  # ignored by the process
            os.kill(os.getpid(), signal.SIGINT)
            signal.signal(signal.SIGINT, signal.default_int_handler)  # as ray.init does SIGTERM
            again()
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)  # ignored: nothing arrives
        assert received == [signal.SIGINT, signal.SIGINT]
        assert signal.getsignal(signal.SIGINT) is before_int
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, before_term)


def test_off_the_main_thread_nothing_changes():
    outcome: list[object] = []

    def run() -> None:
        with on_stop_signals(lambda *_: None) as again:
            again()
            outcome.append(signal.getsignal(signal.SIGTERM))

    before = signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=10)
    assert outcome == [before]
