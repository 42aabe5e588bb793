"""What fanning a run out over Ray costs and gives: the native runner and a local Ray instance side by side.

For each model (``--models``, default ``boxfill,litemedsam``) the cases of ``--data`` (default: the bundled
demo set) run twice in this one invocation, each into its own temporary output folder: natively (in this
process, the model loaded once, ``--threads`` or all CPUs) and on a local Ray instance started for it
(``--workers`` actors, one CPU and one thread each by default). Both go through the runners' public
interface as ``harness run`` drives them (``Runner.targets``, ``Target.open``, ``Session.run``, each record
appended to ``results.jsonl``), so that the phases can be timed apart:

* total: from ``targets()`` to ``close()`` (Ray's start-up and shutdown included);
* Ray start-up: starting the local instance (``ray.init``), on its own;
* model load: ``open()`` less the start-up (every worker loads the model, in parallel);
* cases: from the first dispatch to the last record; wall/case is that over the number of cases;
* shutdown: closing the session and the runner (stopping the workers and the local instance);
* overhead/case: the time a worker spends per case beyond segmenting it:
  ``cases wall x workers / cases - mean segmentation seconds`` (native: 1 "worker"). Natively that is
  reading the case, writing the segs and scoring them; on Ray the driver does those while the workers
  segment, and the figure is shipping the case and the segs, dispatch, and a worker's idle time while
  the last cases finish on the others (with few, uneven cases, mostly the latter);
* busy: the share of the workers' time spent segmenting (``sum of seconds / (cases wall x workers)``).

Prints a markdown table with the CPU model (``/proc/cpuinfo``) and the date, and whether the segs of both
runners are identical (``np.array_equal``, case by case).

Usage::

    pip install -e ".[ray]"
    python bench/bench_ray.py [--data DIR] [--models boxfill,litemedsam] [--workers 2] [--limit N]
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness.cases import discover_cases  # noqa: E402
from harness.pluginmanager import HarnessPlugins  # noqa: E402
from harness.profiling import default_threads, pin_threads  # noqa: E402
from harness.results import ResultsStore  # noqa: E402
from harness.profiling import cpu_name  # noqa: E402
from harness.run import RunConfig  # noqa: E402
from harness.runners.ray import RayRunner  # noqa: E402


def timed_run(runner, config: RunConfig, plugins: HarnessPlugins, cases: list[Path], threads: int) -> dict:
    """One model through ``runner`` as the driver runs it, with the phases timed apart."""
    spec = plugins.get(config.models[0])
    runner.check(config)
    pin_threads(threads)
    lines: list[str] = []
    times: dict = {"first_dispatch": None}
    start = time.perf_counter()
    try:
        target = runner.targets([spec], config, plugins, threads, lines.append)[0]
        opened = time.perf_counter()
        session = target.open()
        loaded = time.perf_counter()

        def started(case_path: Path) -> None:
            if times["first_dispatch"] is None:
                times["first_dispatch"] = time.perf_counter()

        records = []
        with ResultsStore(config.out_dir) as store:
            for record in session.run(cases, started):
                store.append(record)
                records.append(record)
        finished = time.perf_counter()
        session.close()
    finally:
        runner.close()
    closed = time.perf_counter()
    bad = [r for r in records if r["status"] != "ok"]
    if bad:
        raise SystemExit(f"{target.entry}: {len(bad)} case(s) failed, e.g. {bad[0]['case']}: {bad[0]['error']}")
    startup = getattr(runner, "startup_seconds", None) or 0.0
    return {
        "entry": target.entry,
        "records": {r["case"]: r for r in records},
        "total": closed - start,
        "startup": startup if isinstance(runner, RayRunner) else None,
        "load": (loaded - opened) - startup,
        "cases_wall": finished - (times["first_dispatch"] or loaded),
        "shutdown": closed - finished,
        "seg_mean": sum(r["seconds"] for r in records) / len(records),
        "n": len(records),
    }


def identical(native: dict, ray: dict, native_out: Path, ray_out: Path) -> bool:
    for case, theirs in native["records"].items():
        mine = ray["records"][case]
        if mine["dsc"] != theirs["dsc"] or mine["nsd"] != theirs["nsd"]:
            return False
        if not np.array_equal(np.load(ray_out / mine["segs"])["segs"], np.load(native_out / theirs["segs"])["segs"]):
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT / "harness" / "demo", help="cases folder (imgs/, gts/)")
    parser.add_argument("--models", default="boxfill,litemedsam")
    parser.add_argument("--workers", type=int, default=2, help="Ray workers of the local instance (default 2)")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=None,
                        help="native runner's threads (default: all CPUs this process may use)")
    parser.add_argument("--limit", type=int, default=None, help="first N cases only")
    args = parser.parse_args(argv)

    cases = discover_cases(args.data, args.limit)
    if not cases:
        raise SystemExit(f"{args.data}: no cases")
    plugins = HarnessPlugins()
    native_threads = args.threads or default_threads()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        for model in [m.strip() for m in args.models.split(",") if m.strip()]:
            native_out, ray_out = Path(tmp) / f"native-{model}", Path(tmp) / f"ray-{model}"
            native_cfg = RunConfig(models=[model], data_dir=args.data, out_dir=native_out, progress=False,
                                   threads=native_threads)
            ray_cfg = RunConfig(models=[model], data_dir=args.data, out_dir=ray_out, progress=False, runner="ray",
                                runner_options={"ray": {"workers": args.workers,
                                                        "cpus_per_worker": args.cpus_per_worker}})
            native = timed_run(plugins.get_runner("native"), native_cfg, plugins, cases, native_threads)
            print(f"{model}: native done in {native['total']:.1f} s", file=sys.stderr, flush=True)
            ray = timed_run(RayRunner(), ray_cfg, plugins, cases, native_threads)
            print(f"{model}: ray done in {ray['total']:.1f} s", file=sys.stderr, flush=True)
            same = identical(native, ray, native_out, ray_out)
            for label, result, workers, threads in (
                    ("native", native, 1, native_threads),
                    (f"ray, {args.workers} workers", ray, args.workers, max(1, int(args.cpus_per_worker)))):
                rows.append((model, f"{label} ({threads} thread{'s' if threads > 1 else ''} each)"
                             if label != "native" else f"native ({threads} threads)", result, workers,
                             "yes" if same else "NO"))

    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    command = "python bench/bench_ray.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"`{command.strip()}`, {date}, {cpu_name()} ({os.cpu_count()} CPUs), "
          f"{len(cases)} cases of {args.data.name}\n")
    print("| model | runner | cases | total s | Ray start-up s | model load s | cases wall s | wall/case s "
          "| segmentation s/case | overhead/case s | busy | shutdown s | segs identical |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for model, label, r, workers, same in rows:
        overhead = r["cases_wall"] * workers / r["n"] - r["seg_mean"]
        busy = r["seg_mean"] * r["n"] / (r["cases_wall"] * workers) if r["cases_wall"] > 0 else 0.0
        startup = f"{r['startup']:.2f}" if r["startup"] is not None else "-"
        print(f"| {model} | {label} | {r['n']} | {r['total']:.2f} | {startup} | {r['load']:.2f} | "
              f"{r['cases_wall']:.2f} | {r['cases_wall'] / r['n']:.3f} | {r['seg_mean']:.3f} | {overhead:.3f} | "
              f"{busy:.0%} | {r['shutdown']:.2f} | {same} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
