"""The quick start on a busy machine: `trainingmgr serve --demo` (what `make run` runs) N times in a row, with every
CPU kept busy by spinning processes, in a fresh data folder. Prints, per run and in total: did the demo pass, seconds
until the demo ended, and seconds from SIGTERM until every process of the run was gone.

    .venv/bin/python bench/quickstart_bench.py            # 20 runs, the CPUs kept busy
    .venv/bin/python bench/quickstart_bench.py --runs 5 --no-load
"""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.processes import free_port, listening  # noqa: E402

BURN = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"
DONE_MARKS = ("the service keeps serving", "demo FAILED")


def one_run(work: Path, number: int, timeout: float) -> tuple[bool, float, float]:
    port = free_port()
    log = work / f"run-{number}.log"
    env = {**os.environ, "TM_DATA_DIR": str(work / "data"), "TM_PORT": str(port), "TM_HOST": "127.0.0.1",
           "TM_DATABASE_URL": ""}
    began = time.monotonic()
    with log.open("wb") as out:
        demo = subprocess.Popen([sys.executable, "-m", "trainingmgr", "serve", "--demo"], cwd=work, env=env,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        text = ""
        while time.monotonic() - began < timeout and demo.poll() is None:
            text = log.read_text(errors="replace")
            if any(mark in text for mark in DONE_MARKS):
                break
            time.sleep(0.2)
        demo_seconds = time.monotonic() - began
        passed = "demo succeeded" in text and demo.poll() is None
        stopping = time.monotonic()
        demo.send_signal(signal.SIGTERM)
        demo.wait(60)
        while listening(port) and time.monotonic() - stopping < 60:
            time.sleep(0.05)
        return passed, demo_seconds, time.monotonic() - stopping
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=300, help="seconds one run may take to end its demo")
    parser.add_argument("--no-load", action="store_true", help="do not keep the CPUs busy")
    args = parser.parse_args()
    burners = [] if args.no_load else [
        subprocess.Popen([sys.executable, "-c", BURN.format(seconds=args.runs * (args.timeout + 60))])
        for _ in range(os.cpu_count() or 2)]
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="tm-quickstart-") as tmp:
            for number in range(1, args.runs + 1):
                passed, demo_s, stop_s = one_run(Path(tmp), number, args.timeout)
                results.append((passed, demo_s, stop_s))
                print(f"run {number:2d}: {'passed' if passed else 'FAILED'}  demo ended after {demo_s:5.1f} s  "
                      f"stopped {stop_s:4.1f} s after SIGTERM", flush=True)
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
    demo_times = [r[1] for r in results]
    stop_times = [r[2] for r in results]
    print(f"\n{sum(r[0] for r in results)}/{len(results)} passed "
          f"({'CPUs kept busy by ' + str(len(burners)) + ' spinning processes' if burners else 'no extra load'}); "
          f"demo {min(demo_times):.1f}/{statistics.median(demo_times):.1f}/{max(demo_times):.1f} s, "
          f"stop {min(stop_times):.1f}/{statistics.median(stop_times):.1f}/{max(stop_times):.1f} s (min/median/max)")


if __name__ == "__main__":
    main()
