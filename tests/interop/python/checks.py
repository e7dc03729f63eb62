"""What the cent test scripts share: named checks that report and count each failure instead
of stopping at the first, a bounded wait, and the closing summary with the exit status."""

import sys
import time
import traceback

_counts = {"passed": 0, "failed": 0}


def check(name):
    """Runs the decorated function now as the check `name`: prints `ok NAME` or `FAIL NAME`
    with the traceback, and counts it."""

    def run(fn):
        try:
            fn()
        except Exception:  # noqa: BLE001 - every failure is reported, then counted
            _counts["failed"] += 1
            print(f"FAIL {name}\n{traceback.format_exc()}", flush=True)
        else:
            _counts["passed"] += 1
            print(f"ok {name}", flush=True)
        return fn

    return run


def eventually(what, fn, timeout=5.0):
    """Polls `fn` every 50 ms until it returns a true value (returned), at most `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.05)


def finish():
    """Prints `N passed, M failed` and exits non-zero on any failure."""
    print(f"{_counts['passed']} passed, {_counts['failed']} failed", flush=True)
    sys.exit(1 if _counts["failed"] else 0)
