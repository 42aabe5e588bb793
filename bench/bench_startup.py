"""Start-up cost per case, as the challenge times it: the same cases in process, in a fresh process per case
and in a fresh container per case (full and slim images), one after another in one run.

    python bench/bench_startup.py --model litemedsam [--cases DIR] [--limit N] [--no-docker] [--out FILE.md]
        [--rows in-process,subprocess,docker-full,docker-slim] [--repeat N]

Rows (each case once per row kind, or ``--repeat`` times with each column's median; the in-process rows
always run, since the others are compared with them):

* ``in-process harness``: the harness's fast path on OpenVINO (``--backend openvino``), model loaded once;
* ``in-process runtime``: the torch-free runtime (``runtime/``) on the same exported graphs, loaded once;
* ``subprocess harness`` / ``subprocess runtime``: ``harness predict`` / ``python -m runtime.predict`` in a
  fresh interpreter per case (interpreter start, imports, model load, the case, the write);
* ``docker full`` / ``docker slim``: the challenge's command (``docker container run -m 8G`` with the
  inputs and outputs mounted, ``/bin/bash -c "sh predict.sh"``) per case, on the full image
  (``harness build --runtime full``) and the slim one (``--runtime slim``), built or reused first.

Columns: the case's own seconds (what the process reports for the case alone), end-to-end seconds (wall
clock around the process or container), their difference (the start-up cost), the part of it that is the
model load where the process logs it (``runtime.predict``: importing OpenVINO and compiling or importing
the graphs), peak memory (RSS of the child, from GNU time; the container's cgroup peak, page cache
included) and the image size.  A summary per row kind gives the means, and end to end minus the harness's
own in-process seconds for the same case (the issue's measure of what a submission adds).  The models'
masks are not compared here (tests/test_runtime_parity.py and tests/test_runtime_image.py hold them); a
row whose run failed says so.  Nothing is asserted: it prints, and writes ``--out`` if given.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ROW_GROUPS = ("in-process", "subprocess", "docker-full", "docker-slim")
CASE_LINE = re.compile(r"^(?P<name>\S+\.npz): (?P<seconds>[0-9.]+)s ->", re.M)
LOAD_LINE = re.compile(r"^loaded \S+ .* in (?P<seconds>[0-9.]+)s$", re.M)  # runtime.predict's model load


def _child(cmd: list[str], env: dict | None = None) -> tuple[float, int, float | None, str]:
    """(wall seconds, exit status, peak RSS MB, output) of one child process.

    The peak is GNU time's ``%M`` where /usr/bin/time exists (started from it, the child's high-water mark
    is its own; a child forked from this large process would inherit this process's at exec), else None."""
    timer = shutil.which("time", path="/usr/bin")
    with tempfile.NamedTemporaryFile("r", suffix=".maxrss") as report:
        wrapped = [timer, "-q", "-f", "%M", "-o", report.name, *cmd] if timer else cmd
        start = time.perf_counter()
        done = subprocess.run(wrapped, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
        wall = time.perf_counter() - start
        text = report.read().strip().splitlines() if timer else []
    peak = float(text[-1]) / 1024.0 if text and text[-1].isdigit() else None
    return wall, done.returncode, peak, done.stdout


def _case_seconds(log: str, name: str) -> float | None:
    for match in CASE_LINE.finditer(log):
        if match.group("name") == name:
            return float(match.group("seconds"))
    return None


def _medians(rows: list[dict]) -> list[dict]:
    """One row per (kind, case) in first-seen order: each numeric column's median over the repetitions, the
    start-up the median of the repetitions' own differences, and the first failure."""
    import statistics

    merged: dict[tuple, list[dict]] = {}
    for row in rows:
        merged.setdefault((row["kind"], row["case"]), []).append(row)
    out = []
    for (kind, case), group in merged.items():
        row = dict(kind=kind, case=case, failed=next((r["failed"] for r in group if r.get("failed")), None))
        for column in ("own", "e2e", "load", "peak", "image"):
            values = [r[column] for r in group if r.get(column) is not None]
            row[column] = statistics.median(values) if values else None
        startups = [r["e2e"] - r["own"] for r in group if r.get("e2e") is not None and r.get("own") is not None]
        row["startup"] = statistics.median(startups) if startups else None
        out.append(row)
    return out


def _load_seconds(log: str) -> float | None:
    match = LOAD_LINE.search(log or "")
    return float(match.group("seconds")) if match else None


def _import_seconds(module: str) -> float:
    """Wall seconds of ``python -c "import <module>"`` (best of 3)."""
    best = float("inf")
    for _ in range(3):
        wall, code, _, out = _child([sys.executable, "-c", f"import {module}"])
        if code != 0:
            raise RuntimeError(f"import {module} failed: {out[-500:]}")
        best = min(best, wall)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="litemedsam")
    parser.add_argument("--weights", type=Path, default=None, help="the model's weights (default: what harness run uses)")
    parser.add_argument("--cases", type=Path, default=ROOT / "harness" / "demo" / "imgs")
    parser.add_argument("--limit", type=int, default=None, help="first N cases by name")
    parser.add_argument("--threads", type=int, default=None, help="threads for every row (default: the machine's)")
    parser.add_argument("--no-docker", action="store_true", help="skip the container rows")
    parser.add_argument("--rows", default=",".join(ROW_GROUPS),
                        help=f"which row groups to run, comma-separated (default: all of {', '.join(ROW_GROUPS)})")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run every case N times per row (the repetitions one after another, each over all "
                             "cases); the table shows each column's median")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    args = parser.parse_args(argv)
    groups = [g.strip() for g in args.rows.split(",") if g.strip()]
    if not groups or set(groups) - set(ROW_GROUPS) or args.repeat < 1:
        parser.error(f"--rows takes some of {', '.join(ROW_GROUPS)}; --repeat is at least 1")
    if args.no_docker:
        groups = [g for g in groups if not g.startswith("docker")]

    from harness.cases import discover_cases, load_case
    from harness.pluginmanager import HarnessPlugins
    from harness.profiling import cpu_name, default_threads
    from harness.plugin_api import LoadOptions
    from runtime.predict import load_segmenter

    cases = discover_cases(args.cases)[: args.limit]
    threads = args.threads or default_threads()
    rows: list[dict] = []
    lines = [f"# Start-up cost per case: {args.model}, {len(cases)} case(s), {threads} threads, {cpu_name()}, "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", ""]
    imports = {m: _import_seconds(m) for m in ("runtime.predict, openvino, cv2", "harness.cli, torch")}
    lines += [f"- `import {m}`: {s:.2f} s" for m, s in imports.items()] + [""]

    # In process: the harness's fast path on openvino, and the runtime on the graphs it exported.
    spec = HarnessPlugins().get(args.model)
    segmenter = spec.load(LoadOptions(weights=args.weights, threads=threads, path="fast", backend="openvino"))
    graphs = Path(segmenter.describe()["export"])
    runtime = load_segmenter(graphs, pipeline=segmenter.describe()["pipeline"], threads=threads)
    for _ in range(args.repeat):  # always run: the other rows are compared with the harness's in-process seconds
        for path in cases:
            case = load_case(path)
            start = time.perf_counter()
            segmenter.segment(case)
            rows.append(dict(kind="in-process harness", case=path.name, own=time.perf_counter() - start))
            start = time.perf_counter()
            runtime.segment(case.imgs, case.boxes)
            rows.append(dict(kind="in-process runtime", case=path.name, own=time.perf_counter() - start))
    del segmenter, runtime

    weights_args = ["--weights", str(args.weights)] if args.weights else []
    commands = {
        "subprocess harness": lambda i, o: [sys.executable, "-m", "harness.cli", "predict", "--model", args.model,
                                            "--backend", "openvino", "--threads", str(threads), *weights_args,
                                            "-i", i, "-o", o],
        "subprocess runtime": lambda i, o: [sys.executable, "-m", "runtime.predict", "--graphs", str(graphs),
                                            "--threads", str(threads), "-i", i, "-o", o],
    }
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        tmp = Path(tmp)
        for kind, command in commands.items() if "subprocess" in groups else ():
            for path in [c for _ in range(args.repeat) for c in cases]:
                inputs, outputs = tmp / "in", tmp / "out"
                shutil.rmtree(inputs, ignore_errors=True)
                shutil.rmtree(outputs, ignore_errors=True)
                inputs.mkdir()
                shutil.copy(path, inputs / path.name)
                wall, code, peak, out = _child(command(str(inputs), str(outputs)))
                rows.append(dict(kind=kind, case=path.name, own=_case_seconds(out, path.name), e2e=wall, peak=peak,
                                 load=_load_seconds(out), failed=None if code == 0 else f"exit {code}: {out[-300:]}"))

        if any(g.startswith("docker") for g in groups):
            from harness.container.client import connect
            from harness.container.slim_image import build_model_image
            from harness.runners.docker import DockerExecutor

            client = connect()
            weights = {"weights": args.weights} if args.weights else {}
            for runtime_kind in [k for k in ("full", "slim") if f"docker-{k}" in groups]:
                info = build_model_image(runtime_kind, args.model, client=client, log=lambda line: None, **weights)
                executor = DockerExecutor(client, info.tag, SimpleNamespace(memory="8g", timeout=None))
                for n, path in enumerate(c for _ in range(args.repeat) for c in cases):
                    case_dir = tmp / f"{runtime_kind}-{n}-{path.stem}"
                    inputs, outputs, work = case_dir / "in", case_dir / "out", case_dir / "work"
                    for folder in (inputs, outputs, work):
                        folder.mkdir(parents=True)
                    outputs.chmod(0o777)  # the images run as uid 1000
                    shutil.copy(path, inputs / path.name)
                    outcome = executor.execute(inputs, outputs, work)
                    rows.append(dict(kind=f"docker {runtime_kind}", case=path.name,
                                     own=_case_seconds(outcome.log, path.name), e2e=outcome.seconds,
                                     load=_load_seconds(outcome.log),
                                     peak=outcome.peak_mb, image=info.size_bytes / 1e6,
                                     failed=outcome.problem))

    rows = _medians(rows)
    if args.repeat > 1:
        lines += [f"Each figure is the median of {args.repeat} runs of the case.", ""]
    lines += ["| run | case | case s | end-to-end s | start-up s | of which model load s | peak MB | image MB |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    fmt = lambda v, f="{:.2f}": "" if v is None else f.format(v)  # noqa: E731
    for row in rows:
        startup = row["startup"]
        note = f" (failed: {row['failed'][:80]})" if row.get("failed") else ""
        lines.append(f"| {row['kind']}{note} | {row['case']} | {fmt(row.get('own'))} | {fmt(row.get('e2e'))} | "
                     f"{fmt(startup)} | {fmt(row.get('load'))} | {fmt(row.get('peak'), '{:.0f}')} | "
                     f"{fmt(row.get('image'), '{:.0f}')} |")
    # Mean start-up cost per row kind
    # Per row kind: the mean start-up cost, its model load (where the log says), and end to end minus the
    # harness's own in-process seconds for the same case (what the challenge's ranking sees beyond the model).
    own_harness = {r["case"]: r["own"] for r in rows if r["kind"] == "in-process harness"}
    lines += ["", "| run | mean start-up s per case | mean model load s | mean end-to-end minus in-process harness s |",
              "| --- | ---: | ---: | ---: |"]
    mean = lambda values: sum(values) / len(values) if values else None  # noqa: E731
    for kind in dict.fromkeys(r["kind"] for r in rows):
        ours = [r for r in rows if r["kind"] == kind and r.get("e2e") is not None and r.get("own") is not None]
        if ours:
            loads = [r["load"] for r in ours if r.get("load") is not None]
            beyond = [r["e2e"] - own_harness[r["case"]] for r in ours if r["case"] in own_harness]
            lines.append(f"| {kind} | {fmt(mean([r['startup'] for r in ours]))} | {fmt(mean(loads))} | "
                         f"{fmt(mean(beyond))} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
