"""``costream serve`` under cProfile, for the benchmarks' ``BENCH_PROFILE_DIR`` hook.

Started by ``benchlib.start_costream`` in place of ``python -m costream.cli`` when the
environment names a directory in ``BENCH_PROFILE_DIR``; the process's profile goes to
``<dir>/costream-<pid>.prof`` when it exits (SIGTERM from the benchmark: uvicorn shuts
down and ``serve`` returns). Read it with ``python -m pstats``. cProfile slows the
process down, so compare where the time goes, not how fast it is.
"""

from __future__ import annotations

import cProfile
import os
import signal
import sys
from types import FrameType

from costream.cli import main


def _exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


if __name__ == "__main__":
    # uvicorn re-raises the SIGTERM it caught once it has shut down; exit cleanly instead,
    # so the profile is written.
    signal.signal(signal.SIGTERM, _exit)
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        code = main(sys.argv[1:])
    finally:
        profiler.disable()
        directory = os.environ["BENCH_PROFILE_DIR"]
        profiler.dump_stats(os.path.join(directory, f"costream-{os.getpid()}.prof"))
    sys.exit(code)
