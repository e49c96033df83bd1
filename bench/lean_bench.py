"""Issue 12 in one run: every figure it sets a target for, measured here and printed beside the target.

Usage: .venv/bin/python bench/lean_bench.py [--quick] [--skip reads,idle,lifecycle,memory]

  memory     the default `trainingmgr serve` (SQLite, default settings) of this checkout: RSS and PSS of each of its
             processes from /proc, idle after start, then after the bundled demo (`trainingmgr demo --url`) has
             trained and retrained the example, with and without the warm launcher (which ends after 15 minutes
             without a request)
  idle       statements per second the default `serve` sends to an idle PostgreSQL (bench/idle_bench.py: a private
             cluster with log_statement=all)
  lifecycle  POST -> FINISHED overhead, the runner's start-up and the jobs FINISHED within 1 s of their run's end,
             for 1 and 10 concurrent jobs (bench/lifecycle_bench.py)
  reads      GET one job, its status, one feature group and the default job list under gunicorn 2 x 4 against
             10,000 jobs on PostgreSQL, beside the limit proxy: rate ratio and server CPU per request from /proc
             (bench/http_bench.py, wrk, 3 interleaved rounds; --quick: 1 round of 3 s)

Every process it starts is stopped, and every database it creates dropped, also on error or Ctrl-C (each part's
own script sees to it).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from tests.processes import assert_ready, children, free_port, served  # noqa: E402

TARGETS = {
    "read_ratio": 0.8, "read_cpu_ms": 1.0, "list_cpu_ms": 3.0, "serve_rss_mb": 200.0, "idle_per_s": 1.0,
    "run_start_ms": 100.0, "overhead_ms": 150.0,
}


def log(message: str) -> None:
    print(f"[lean_bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- memory
def _memory_of(pid: int) -> tuple[float, float]:
    rss = pss = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            pss = int(line.split()[1]) / 1024
    return rss, pss


def _role(command: str) -> str:
    if "run_launcher" in command:
        return "warm launcher"
    if "worker --supervised" in command:
        return "step runner"
    return "web worker"


def serve_processes(master: int) -> list[tuple[str, int, float, float]]:
    """(role, pid, RSS MB, PSS MB) of the master and every process below it (runs forked for a job are not kept:
    they end with their run)."""
    found = [("master", master, *_memory_of(master))]
    todo = [master]
    while todo:
        for pid, command in children(todo.pop()).items():
            try:
                found.append((_role(command), pid, *_memory_of(pid)))
            except OSError:  # it ended while we looked
                continue
            todo.append(pid)
    return found


def show_memory(label: str, processes: list[tuple[str, int, float, float]]) -> tuple[float, float]:
    rss, pss = sum(p[2] for p in processes), sum(p[3] for p in processes)
    print(f"  {label}: RSS {rss:6.1f} MB, PSS {pss:6.1f} MB in total")
    for role, pid, one_rss, one_pss in processes:
        print(f"    {role:14s} pid {pid:<8d} RSS {one_rss:6.1f} MB  PSS {one_pss:6.1f} MB")
    return rss, pss


def memory() -> dict[str, float]:
    print("Memory of the default `trainingmgr serve` (SQLite, TM_WORKERS and TM_THREADS at their defaults):")
    with tempfile.TemporaryDirectory(prefix="tm-lean-") as tmp:
        tmp_path = Path(tmp)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        env = {"TM_DATA_DIR": str(tmp_path / "data"), "TM_DATABASE_URL": "", "TM_LOG_LEVEL": "WARNING",
               "TM_AUTH": "none"}
        for name in ("TM_WORKERS", "TM_THREADS", "TM_EMBEDDED_WORKER"):
            os.environ.pop(name, None)  # the defaults are what is measured
        with served(tmp_path, port, env) as server:
            assert_ready(base, server, 180, tmp_path / "server.log")
            time.sleep(3.0)
            idle_rss, _ = show_memory("idle after start", serve_processes(server.pid))
            demo = subprocess.run([sys.executable, "-m", "trainingmgr", "demo", "--url", base], cwd=tmp_path,
                                  env={**os.environ, **env}, stdin=subprocess.DEVNULL, capture_output=True,
                                  text=True, timeout=900)
            if demo.returncode != 0:
                raise RuntimeError(f"the demo failed: {demo.stdout[-2000:]}{demo.stderr[-2000:]}")
            time.sleep(1.0)
            after = serve_processes(server.pid)
            after_rss, _ = show_memory("after the demo (trained and retrained the example)", after)
            lasting = [p for p in after if p[0] != "warm launcher"]
            lasting_rss, _ = show_memory("the same without the warm launcher (it ends 15 min after its last request)",
                                         lasting)
    return {"serve_idle_rss_mb": idle_rss, "serve_after_demo_rss_mb": after_rss,
            "serve_after_launcher_end_rss_mb": lasting_rss}


# ----------------------------------------------------------------------------------------------- the others
def idle(seconds: float) -> dict[str, float]:
    from idle_bench import idle_statements

    counted = idle_statements(ROOT, seconds)
    total = sum(counted.values())
    print(f"Idle default `serve` on PostgreSQL: {total} statements in {seconds:.0f} s "
          f"({', '.join(f'{k} {v}' for k, v in counted.most_common()) or 'none'})")
    return {"idle_per_s": total / seconds}


def run_script(script: str, argv: list[str], out: Path) -> object:
    log(f"running bench/{script} {' '.join(argv)}")
    done = subprocess.run([sys.executable, str(ROOT / "bench" / script), *argv, "--json", str(out)], cwd=ROOT,
                          stdin=subprocess.DEVNULL, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"bench/{script} failed ({done.returncode})")
    return json.loads(out.read_text())


def lifecycle(tmp: Path) -> dict[str, float]:
    figures = run_script("lifecycle_bench.py", ["--jobs", "1,10"], tmp / "lifecycle.json")
    one = next(f for f in figures if f["jobs"] == 1)
    ten = next(f for f in figures if f["jobs"] == 10)
    return {"overhead_ms": one["overhead_median_ms"], "first_overhead_ms": one["first_job_overhead_ms"],
            "run_start_ms": one["startup_median_ms"],
            "run_start_ten_ms": ten["startup_median_ms"], "ten_within_1s": ten["finished_within_1s"]}


def reads(tmp: Path, quick: bool) -> dict[str, object]:
    argv = ["--workers", "2", "--threads", "4", "--connections", "1,16", "--no-hello"]
    argv += ["--rounds", "1", "--duration", "3"] if quick else ["--rounds", "3", "--duration", "10"]
    rows = run_script("http_bench.py", argv, tmp / "reads.json")["rows"]
    return {"rows": rows}


# ----------------------------------------------------------------------------------------------- summary
def summary(figures: dict[str, object]) -> None:
    print()
    print("Issue 12 targets")
    line = "  {:58s} {:>22s} {:>10s}  {}"
    print(line.format("figure", "measured", "target", ""))

    def row(name: str, value: float | None, target: float, unit: str, higher_is_better: bool = False) -> None:
        if value is None:
            print(line.format(name, "not measured", f"{target:g} {unit}", ""))
            return
        met = value >= target if higher_is_better else value <= target
        print(line.format(name, f"{value:.2f} {unit}", f"{'>=' if higher_is_better else '<'} {target:g}",
                          "met" if met else "MISSED"))

    for scenario in ("GET one job", "GET job status", "GET one feature group"):
        for r in (r for r in figures.get("rows", []) if r["scenario"] == scenario):
            row(f"{scenario}, c{r['connections']}: rate / limit proxy", r["ratio"], TARGETS["read_ratio"], "x",
                higher_is_better=True)
            row(f"{scenario}, c{r['connections']}: server CPU per request", r["cpu_ms"], TARGETS["read_cpu_ms"], "ms")
    for r in (r for r in figures.get("rows", []) if r["scenario"].startswith("GET job list (10,000")):
        row(f"default job list page, c{r['connections']}: server CPU per request", r["cpu_ms"],
            TARGETS["list_cpu_ms"], "ms")
    for r in (r for r in figures.get("rows", []) if r["scenario"].startswith("GET job list, random pages")):
        # Pages whose jobs were mostly not rendered by this process yet: no target, for the record.
        print(line.format(f"random job list pages, c{r['connections']}: server CPU per request",
                          f"{r['cpu_ms']:.2f} ms", "-", ""))
    for key, name in (("serve_idle_rss_mb", "default serve RSS, idle"),
                      ("serve_after_launcher_end_rss_mb", "default serve RSS, after a job, launcher ended")):
        row(name, figures.get(key), TARGETS["serve_rss_mb"], "MB")
    if figures.get("serve_after_demo_rss_mb") is not None:  # the heavy process at work: no target, for the record
        print(line.format("default serve RSS, while the warm launcher lives",
                          f"{figures['serve_after_demo_rss_mb']:.2f} MB", "-", ""))
    row("idle statements per second (PostgreSQL)", figures.get("idle_per_s"), TARGETS["idle_per_s"], "/s")
    row("run start (claimed -> kfp.local's first line), 1 job", figures.get("run_start_ms"), TARGETS["run_start_ms"],
        "ms")
    row("POST -> FINISHED overhead, 1 job", figures.get("overhead_ms"), TARGETS["overhead_ms"], "ms")
    if figures.get("first_overhead_ms") is not None:  # a process's very first job: nothing compiled yet
        print(line.format("the same for the first job of a new process", f"{figures['first_overhead_ms']:.2f} ms",
                          "-", ""))
    row("10 concurrent jobs FINISHED within 1 s of their run's end", figures.get("ten_within_1s"), 10, "of 10",
        higher_is_better=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one short round of reads (a smoke run)")
    parser.add_argument("--skip", default="", help="parts to leave out: reads, idle, lifecycle, memory")
    parser.add_argument("--idle", type=float, default=20.0, help="seconds of idle counted")
    args = parser.parse_args()
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    figures: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="tm-lean-out-") as out:
        out_path = Path(out)
        if "memory" not in skip:
            figures.update(memory())
        if "idle" not in skip:
            figures.update(idle(args.idle))
        if "lifecycle" not in skip:
            figures.update(lifecycle(out_path))
        if "reads" not in skip:
            figures.update(reads(out_path, args.quick))
    summary(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
