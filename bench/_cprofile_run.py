"""Run `sms-milter ARGS...` under cProfile, every thread included, and dump merged stats.

    python bench/_cprofile_run.py OUT.prof milter -c CONFIG

cProfile alone sees only the main thread (the milter's accept loop); here each thread
gets its own profiler and all of them are merged into OUT.prof when the command exits.
Used by milter_path.py --profile when py-spy is not installed.
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import threading
from typing import Any


def main() -> int:
    out = sys.argv[1]
    profiles: list[cProfile.Profile] = []
    lock = threading.Lock()
    original_run = threading.Thread.run

    def profiled_run(self: threading.Thread) -> Any:
        p = cProfile.Profile()
        with lock:
            profiles.append(p)
        p.enable()
        try:
            return original_run(self)
        finally:
            p.disable()

    threading.Thread.run = profiled_run  # type: ignore[method-assign]
    from sms_milter.cli import main as cli_main

    main_prof = cProfile.Profile()
    main_prof.enable()
    try:
        rc = cli_main(sys.argv[2:])
    finally:
        main_prof.disable()
        with lock:
            done = [main_prof, *profiles]
        stats = pstats.Stats(done[0])
        for p in done[1:]:
            try:
                stats.add(p)
            except (TypeError, ValueError):
                continue  # a thread still running: its stats are incomplete
        stats.dump_stats(out)
    return rc


if __name__ == "__main__":
    sys.exit(main())
