"""Time the import of compressed CSV files: unpacked in full, then read in parts or in one process.

Run by hand, never in CI, with the interpreter whose Datasette you want to
measure:

    python benchmarks/compressed.py [--rows 1000000] [--runs 5] [--formats gz,bz2,xz,zip] [--save FILE]

It writes the CSV of benchmarks/csv_import.py (write_csv: 0/1 flags, counts
that are mostly zero, blank cells in number columns, codes with leading
zeros, decimals, short text with non-ASCII and quoted commas, and a column
that turns from numbers to text after 90% of the rows; 62 MB at 1,000,000
rows) in a scratch folder removed afterwards, and compresses it with
Python's own modules, as the usual tools do by default:
  - .csv.gz, gzip level 6;
  - .csv.bz2, bzip2 level 9;
  - .csv.xz, xz preset 6;
  - .zip holding data.csv alone, deflated at level 6.

A local compressed file is unpacked in full into the import's work folder
(app_support._unpack), and the unpacked file is then read like any other:
in parts, one process per CPU up to MAX_PROCESSES, when it holds
PARALLEL_MIN_BYTES (16 MB) or more. Each round, for the plain CSV and each
compressed file in turn, it times in a fresh process each:
  - POST /-/import-csv-file into a new file database, as it is (parts);
  - the same with app_support.PARALLEL_MIN_BYTES = 10**12 set in that
    process first, so the unpacked file is read in one process (one);
  - for a compressed file, app_support._unpack alone, with
    LOCAL_FILE_LIMITS, as the import calls it (unpack).
The two imports of a file take turns going first from round to round, so
the machine's drift falls on both, and their ratio is taken within the
round. Each is timed by the clock and by CPU time (user and system, of the
process and of its helper processes, which end before the answer), which
other work on a shared machine disturbs less. Inside each import, _unpack
is timed as well (clock and its thread's CPU), to show how much of the
import is the unpacking.

Every import is checked: 1,000,000 rows (--rows), the declared types of
csv_import.COLUMNS, the same declared types as the plain CSV's import, and
the number of processes that read the file (more than one for parts on a
machine with more than one CPU, one for one), so a fast figure cannot come
from a wrong import or the wrong path. A failed check is reported and the
script exits non-zero. Each child gets the environment the app starts its
server with (csv_import.app_environment), with the scratch folder as its
HOME, so a temporary kept in the real home folder is never opened.
"""

import argparse
import asyncio
import bz2
import gzip
import json
import lzma
import os
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import csv_import  # noqa: E402  (the 9-column file)

TOKEN = csv_import.TOKEN
FORMATS = ("gz", "bz2", "xz", "zip")
MODES = ("parts", "one")


def compress(csv_path, kind):
    """csv_path compressed as kind, beside it; its path."""
    if kind == "zip":
        path = csv_path.with_suffix(".zip")
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as archive:
            archive.write(csv_path, "data.csv")
        return path
    path = csv_path.with_name(csv_path.name + "." + kind)
    opener = {
        "gz": lambda: gzip.open(path, "wb", compresslevel=6),
        "bz2": lambda: bz2.open(path, "wb", compresslevel=9),
        "xz": lambda: lzma.open(path, "wb", preset=6),
    }[kind]
    with open(csv_path, "rb") as src, opener() as out:
        shutil.copyfileobj(src, out, 1024 * 1024)
    return path


def cpu_seconds():
    """User and system CPU time of this process and of its ended children (the helper processes)."""
    return sum(
        usage.ru_utime + usage.ru_stime
        for usage in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    )


def child_import(mode, path, folder):
    """One POST /-/import-csv-file of path into a new file database; prints what it measured."""
    sys.path.insert(0, str(HERE.parent))
    from datasette.app import Datasette
    from datasette.plugins import pm

    import app_support

    if mode == "one":
        app_support.PARALLEL_MIN_BYTES = 10**12
    seen = {"processes": None, "in_parts": False, "unpack_seconds": 0.0, "unpack_cpu": 0.0}
    process_count, stage_in_parts, unpack = app_support._process_count, app_support._stage_in_parts, app_support._unpack

    def counted(size, plan):
        seen["processes"] = process_count(size, plan)
        return seen["processes"]

    def in_parts(*args, **kwargs):
        staged = stage_in_parts(*args, **kwargs)
        seen["in_parts"] = True  # not fallen back to one piece (_SplitFailed)
        return staged

    def timed_unpack(*args, **kwargs):
        start, cpu = time.perf_counter(), time.thread_time()  # it runs in a worker thread
        try:
            return unpack(*args, **kwargs)
        finally:
            seen["unpack_seconds"] += time.perf_counter() - start
            seen["unpack_cpu"] += time.thread_time() - cpu

    app_support._process_count, app_support._stage_in_parts, app_support._unpack = counted, in_parts, timed_unpack
    if not pm.is_registered(app_support):
        pm.register(app_support, name="app_support")
    os.environ["DATASETTE_API_TOKEN"] = TOKEN

    async def run():
        db_path = Path(folder) / "plugin.db"
        db_path.unlink(missing_ok=True)
        sqlite3.connect(db_path).execute("vacuum")
        ds = Datasette([str(db_path)])
        await ds.invoke_startup()
        cpu = cpu_seconds()
        result = await csv_import.timed_import(ds, "/-/import-csv-file", {"path": path, "database": "plugin"})
        if "error" in result:
            return result
        return {
            **result, "cpu": cpu_seconds() - cpu, **seen,
            "processes_used": seen["processes"] if seen["in_parts"] else 1,
        }

    result = asyncio.run(run())
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def child_unpack(path, folder):
    """app_support._unpack alone, as _import_local_file calls it; prints its seconds, CPU and size."""
    sys.path.insert(0, str(HERE.parent))
    import app_support

    work = tempfile.mkdtemp(dir=folder)
    try:
        cpu = cpu_seconds()
        start = time.perf_counter()
        unpacked = app_support._unpack(path, path.lower(), path, app_support.LOCAL_FILE_LIMITS, work)
        elapsed, cpu = time.perf_counter() - start, cpu_seconds() - cpu
        print(json.dumps({"seconds": elapsed, "cpu": cpu, "bytes": os.path.getsize(unpacked)}))
    finally:
        shutil.rmtree(work)


def run_child(what, mode, path, folder):
    out = subprocess.run(
        [sys.executable, __file__, "--child", what, mode, str(path), folder],
        capture_output=True, text=True, env=csv_import.app_environment(folder),
    )
    if out.returncode:
        return {"error": (out.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(out.stdout)


def check(result, rows, mode, reference_types):
    """What is wrong with an import, or None."""
    wrong = csv_import.check(result, rows)
    if wrong:
        return wrong
    if reference_types is not None and result["types"] != reference_types:
        return f"WRONG TYPES: {result['types']}, the plain CSV's {reference_types}"
    if mode == "one" and result["processes_used"] != 1:
        return f"WRONG PATH: read by {result['processes_used']} processes, not one"
    if mode == "parts" and result["processes_used"] < min(os.cpu_count() or 1, 2):
        return f"WRONG PATH: read by {result['processes_used']} process, not in parts"
    return None


def spread(values, unit=" s", places=2):
    """The median of values, and their range."""
    return f"{statistics.median(values):.{places}f}{unit} ({min(values):.{places}f}-{max(values):.{places}f})"


def benchmark(rows, runs, formats, save=None):
    problems = []
    with tempfile.TemporaryDirectory() as folder:
        csv_path = Path(folder) / "data.csv"
        csv_import.write_csv(csv_path, rows)
        csv_import.describe(csv_path, rows)
        paths = {"csv": csv_path}
        for kind in formats:
            start = time.perf_counter()
            paths[kind] = compress(csv_path, kind)
            print(
                f"{paths[kind].name}: {paths[kind].stat().st_size / 1e6:.1f} MB "
                f"({csv_path.stat().st_size / paths[kind].stat().st_size:.1f}x smaller), "
                f"compressed in {time.perf_counter() - start:.1f} s"
            )
        print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
        imports = {(kind, mode): [] for kind in paths for mode in MODES}
        unpacks = {kind: [] for kind in formats}
        for round_number in range(runs):
            for kind, path in paths.items():
                if kind != "csv":
                    unpacks[kind].append(run_child("unpack", "-", path, folder))
                for mode in MODES if round_number % 2 == 0 else MODES[::-1]:
                    imports[kind, mode].append(run_child("import", mode, path, folder))
            print(f"round {round_number + 1} of {runs} done, load average "
                  f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)

        first = imports["csv", "parts"][0]
        reference = first.get("types") if "error" not in first else None
        for (kind, mode), results in imports.items():
            for result in results:
                wrong = check(result, rows, mode, reference)
                if wrong:
                    problems.append(f"{kind} {mode}: {wrong}")
        for kind, results in unpacks.items():
            for result in results:
                if "error" in result or result["bytes"] != csv_path.stat().st_size:
                    problems.append(f"{kind} unpack: {result}")
        for problem in problems:
            print(problem)

        print()
        print(f"Median (min-max) of {runs} runs; CPU is user+sys of the process and its helpers.")
        print("| file | MB | unpack alone: wall / CPU | parts: wall / CPU | one process: wall / CPU "
              "| one/parts per round: wall / CPU | unpacking in the parts import: wall, share |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for kind, path in paths.items():
            good = {mode: [r for r in imports[kind, mode] if "error" not in r] for mode in MODES}
            if not all(good.values()):
                print(f"| {path.name} | failed | | | | | |")
                continue
            pairs = [(p, o) for p, o in zip(imports[kind, "parts"], imports[kind, "one"])
                     if "error" not in p and "error" not in o]
            cells = [path.name, f"{path.stat().st_size / 1e6:.1f}"]
            alone = [u for u in unpacks.get(kind, []) if "error" not in u]
            cells.append(
                f"{spread([u['seconds'] for u in alone])} / {spread([u['cpu'] for u in alone])}" if alone else "-"
            )
            for mode in MODES:
                cells.append(f"{spread([r['seconds'] for r in good[mode]])} / {spread([r['cpu'] for r in good[mode]])}")
            cells.append(
                spread([o["seconds"] / p["seconds"] for p, o in pairs], "x") + " / "
                + spread([o["cpu"] / p["cpu"] for p, o in pairs], "x")
            )
            if kind == "csv":
                cells.append("-")
            else:
                cells.append(
                    spread([r["unpack_seconds"] for r in good["parts"]]) + ", "
                    + spread([100 * r["unpack_seconds"] / r["seconds"] for r in good["parts"]], "%", 0)
                )
            print("| " + " | ".join(cells) + " |")
        print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        if save:  # every run's figures, for a closer look
            with open(save, "w") as f:
                json.dump({"imports": {f"{k} {m}": v for (k, m), v in imports.items()}, "unpacks": unpacks}, f)
    return problems


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--formats", default=",".join(FORMATS), help="comma-separated, of " + ", ".join(FORMATS))
    parser.add_argument("--save", help="write every run's figures to this JSON file")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        what, mode, path, folder = args.child
        child_import(mode, path, folder) if what == "import" else child_unpack(path, folder)
        return
    formats = tuple(kind for kind in args.formats.split(",") if kind)
    if not set(formats) <= set(FORMATS):
        parser.error(f"--formats takes {', '.join(FORMATS)}")
    if benchmark(args.rows, args.runs, formats, args.save):
        sys.exit("Some imports were wrong, so their figures do not count.")


if __name__ == "__main__":
    main()
