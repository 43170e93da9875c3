"""Run twistd under cProfile: ``python -m bench._profiled_twistd OUT.prof <twistd arguments>``.

Used by :class:`bench.servers.AmatersServer` when ``AMATERS_BENCH_PROFILE=cprofile``; the profile is
written when twistd returns (a graceful stop), not after a SIGKILL.
"""

from __future__ import annotations

import cProfile
import sys
import time


def main() -> None:
    out = sys.argv[1]
    sys.argv = ["twistd", *sys.argv[2:]]
    from twisted.scripts.twistd import run

    # CPU time of the reactor thread: on a shared machine, wall time would charge other processes'
    # time slices to whatever function was running when the kernel preempted it.
    profiler = cProfile.Profile(time.thread_time)
    profiler.enable()
    try:
        run()  # type: ignore[no-untyped-call]
    finally:
        profiler.disable()
        profiler.dump_stats(out)


if __name__ == "__main__":
    main()
