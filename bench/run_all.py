#!/usr/bin/env python3
"""Run every benchmark, one after the other, and print a summary.

    python bench/run_all.py [--quick] [--only NAME ...]

--quick is passed through (CI: the whole --quick run takes about 1.5 minutes). The exit
status is non-zero only when a benchmark crashed or its verification failed (figures that
cannot be trusted); a missed performance target is reported, never an error.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = ("milter_path", "dispatcher_drain", "end_to_end", "footprint", "claim_cost", "http_kannel",
           "burst_one_number", "file_gc")


def run(name: str, quick: bool) -> tuple[int, list[dict], float]:
    cmd = [sys.executable, str(HERE / f"{name}.py"), *(["--quick"] if quick else [])]
    t0 = time.monotonic()
    results: list[dict] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          stdin=subprocess.DEVNULL) as p:
        assert p.stdout is not None
        # A hung benchmark is stopped (SIGTERM: it cleans up) and counts as failed.
        watchdog = threading.Timer(300 if quick else 3600, p.terminate)
        watchdog.start()
        try:
            for line in p.stdout:
                print(line, end="", flush=True)
                if line.startswith("RESULT "):
                    results.append(json.loads(line[7:]))
            code = p.wait()
        except BaseException:
            p.terminate()  # the benchmark cleans up after itself on SIGTERM
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
            raise
        finally:
            watchdog.cancel()
    return code, results, time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short smoke versions")
    ap.add_argument("--only", nargs="+", choices=BENCHES, help="run only these")
    a = ap.parse_args()
    summary: list[tuple[str, int, list[dict], float]] = []
    for name in a.only or BENCHES:
        code, results, took = run(name, a.quick)
        summary.append((name, code, results, took))
        print(flush=True)
    print("== summary" + (" (--quick)" if a.quick else ""))
    failed = []
    for name, code, results, took in summary:
        if code != 0:
            failed.append(name)
            status = f"FAILED (exit {code})"
        elif not results:
            failed.append(name)
            status = "FAILED (no RESULT line)"
        elif "skipped" in results[-1]:
            status = "skipped: " + str(results[-1]["skipped"])
        else:
            status = "target met" if results[-1].get("met") else "target MISSED"
        figures = {k: v for r in results for k, v in r.items() if k not in ("bench", "met")}
        print(f"   {name:<17} {took:6.1f} s  {status}")
        if figures:
            print(f"   {'':<17} {json.dumps(figures, sort_keys=True)}")
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("run_all: interrupted", file=sys.stderr)
        sys.exit(130)
