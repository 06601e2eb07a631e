"""pytest plugin for ``bench/gpu_check.py``'s test step: each failure's reason is printed the moment it lands
(``FAILNOW <test id>: <the error's last lines>``), so a run cut off by the step's time cap still says why
each test failed. The H200 run of 2026-11-27 timed out at 98 %, and ``--tb=line`` (printed at the end)
and the junit file (written at the end) both named nothing. Load it with ``-p bench.failnow``."""

from __future__ import annotations

import sys


def pytest_runtest_logreport(report):
    if not report.failed:
        return
    lines = [ln for ln in str(report.longreprtext).splitlines() if ln.strip()]
    tail = " | ".join(ln.strip() for ln in lines[-6:])
    print(f"\nFAILNOW {report.nodeid} ({report.when}): {tail[:1500]}", file=sys.stdout, flush=True)
