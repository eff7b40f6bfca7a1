"""The command line's signal handling (jobs.cli._StopOnSignal): the first SIGTERM/SIGINT unwinds
the command (every ``finally`` runs), the next is ignored while it cleans up, one more after that
is the default action (for a cleanup that hangs); the previous handlers come back after. The
whole path with a real Ray run is in tests/test_ray_faults.py."""
from __future__ import annotations

import os
import signal
import time

import pytest

from quadsel.jobs.cli import Stopped, _StopOnSignal


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_first_signal_stops_the_next_is_ignored_then_default(sig):
    before = signal.getsignal(sig)
    cleaned = []
    with _StopOnSignal():
        with pytest.raises(Stopped) as info:
            try:
                os.kill(os.getpid(), sig)
                time.sleep(5)  # interrupted by the handler's exception
            finally:
                os.kill(os.getpid(), sig)  # during the cleanup: ignored
                cleaned.append(True)
        assert info.value.signum == sig and cleaned == [True]
        assert signal.getsignal(sig) == signal.SIG_DFL  # a third one would end the process at once
    assert signal.getsignal(sig) == before
