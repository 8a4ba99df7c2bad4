"""Beside the outer loop: SIGTERM and Ctrl-C turned into a request to stop after the iteration
in flight, which the loop checkpoints before it exits."""
from __future__ import annotations

import contextlib
import signal
import threading


@contextlib.contextmanager
def stop_requests(enabled: bool):
    """While the loop runs (`enabled`, in the main thread): an Event set by the first SIGTERM
    (unless SIGTERM has a handler other than the default, or is ignored) or the first SIGINT
    (where Python's Ctrl-C handler is installed; a background job ignores SIGINT); a second one
    raises KeyboardInterrupt at once. The previous handlers come back afterwards."""
    stop = threading.Event()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def request_stop(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    signals = [sig for sig, default in ((signal.SIGTERM, signal.SIG_DFL),
                                        (signal.SIGINT, signal.default_int_handler))
               if signal.getsignal(sig) is default]
    previous = {sig: signal.signal(sig, request_stop) for sig in signals}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
