"""Time the import of two copies of app_support.py against each other, paired.

Run by hand, never in CI:

    python benchmarks/paired.py OLD_CHECKOUT NEW_CHECKOUT [--rows 1000000] [--runs 7]
    python benchmarks/paired.py --inexact [CHECKOUT] [--places 5] [--runs 7]

For a refactor, or any change that should cost nothing: each round imports
the same file once with each checkout's module, in a fresh process each, in
alternating order, and the ratio of new to old is taken within the round,
so that a machine that changes speed between rounds moves both. Two files:

  - the 9-column file of csv_import.py (flags, counts, blanks, codes with
    leading zeros, 2-place prices, quoted text, a late turn to words);
  - coordinates: id, a name, a city with quoted commas, a whole number, an
    ISO date, and latitude and longitude with 5 to 7 decimal places, the
    decimals people have most.

Each import runs in the environment the app starts its server with
(csv_import.app_environment), goes through the engine's import_file into a
new file database, read in parts as usual, and is timed both by the clock
and by the CPU time of its processes (this one and its helpers), which
other work on a shared machine disturbs less; the script checks the row
count and declared types of every import, so a fast figure cannot come from
a wrong one.

With --inexact, OLD is a copy of the checkout's module (this one's by
default) told that SQLite reads every decimal exactly, so that it stores
decimals with SQLite's own conversion alone, as on SQLite 3.43 and later:
new/old is then what exact REALs cost on this machine's SQLite. --places
sets the coordinates' decimal places (5,6,7 by default, a count per row).
"""

import argparse
import json
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import csv_import  # noqa: E402  (the 9-column file)

COORDINATE_TYPES = [kind for _, kind, _ in csv_import.COORDINATES]
# Where the module remembers whether this SQLite reads decimals exactly.
EXACT_CASTS = "_exact_real_casts = []"


def inexact_copy(checkout, folder):
    """A copy of checkout's module that takes SQLite's conversion of decimals as exact."""
    source = (Path(checkout) / "app_support.py").read_text(encoding="utf-8")
    if source.count(EXACT_CASTS) != 1:
        sys.exit(f"{checkout}/app_support.py does not say {EXACT_CASTS!r} once, so --inexact cannot patch it.")
    copy = Path(folder) / "inexact"
    copy.mkdir()
    (copy / "app_support.py").write_text(source.replace(EXACT_CASTS, "_exact_real_casts = [True]"), encoding="utf-8")
    return str(copy)


def child(checkout, csv_path, folder):
    """One import with the module of checkout; prints its seconds, rows and declared types."""
    sys.path.insert(0, checkout)
    import app_support

    assert Path(app_support.__file__).resolve().parent == Path(checkout).resolve()
    db_path = Path(folder) / "target.db"
    db_path.unlink(missing_ok=True)
    conn = sqlite3.connect(db_path, isolation_level=None)
    cpu_before = cpu_seconds()
    start = time.perf_counter()
    (result,) = app_support.import_file(conn, csv_path, "t")
    seconds = time.perf_counter() - start
    cpu = cpu_seconds() - cpu_before
    count = conn.execute('select count(*) from "t"').fetchone()[0]
    types = [row[2] for row in conn.execute('pragma table_info("t")')]
    conn.close()
    print(json.dumps({"seconds": seconds, "cpu": cpu, "rows": count, "types": types}))


def cpu_seconds():
    """User and system CPU time of this process and of its ended children (the helper processes)."""
    return sum(
        usage.ru_utime + usage.ru_stime
        for usage in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    )


def run_once(checkout, csv_path, folder):
    out = subprocess.run(
        [sys.executable, __file__, "--child", checkout, str(csv_path), folder],
        capture_output=True, text=True, check=True, env=csv_import.app_environment(folder),
    )
    return json.loads(out.stdout)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("old", nargs="?")
    parser.add_argument("new", nargs="?")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--inexact", action="store_true", help="OLD: the module with SQLite's decimals taken as exact")
    parser.add_argument("--places", default="5,6,7", help="the coordinates' decimal places, comma-separated")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    if args.inexact:
        args.new = args.new or args.old or str(HERE.parent)
    elif not (args.old and args.new):
        parser.error("give OLD and NEW checkouts, or --inexact")
    places = tuple(int(n) for n in args.places.split(","))
    with tempfile.TemporaryDirectory() as folder:
        if args.inexact:
            args.old = inexact_copy(args.new, folder)
        files = {
            "9 columns": (Path(folder) / "nine.csv", csv_import.write_csv, [k for _, k, _ in csv_import.COLUMNS]),
            f"coordinates, {args.places} places": (
                Path(folder) / "coordinates.csv",
                lambda path, rows: csv_import.write_coordinates(path, rows, places),
                COORDINATE_TYPES,
            ),
        }
        for name, (path, write, types) in files.items():
            write(path, args.rows)
            size = path.stat().st_size / 1024**2
            times = {"old": [], "new": []}
            cpu = {"old": [], "new": []}
            ratios, cpu_ratios = [], []
            for round_number in range(args.runs):
                order = ["old", "new"] if round_number % 2 == 0 else ["new", "old"]
                got, got_cpu = {}, {}
                for which in order:
                    result = run_once(getattr(args, which), path, folder)
                    if result["rows"] != args.rows or result["types"] != types:
                        sys.exit(f"{which} imported {name} wrongly: {result}")
                    got[which], got_cpu[which] = result["seconds"], result["cpu"]
                    times[which].append(result["seconds"])
                    cpu[which].append(result["cpu"])
                ratios.append(got["new"] / got["old"])
                cpu_ratios.append(got_cpu["new"] / got_cpu["old"])
            print(
                f"{name} ({args.rows:,} rows, {size:.0f} MB): old {statistics.median(times['old']):.3f} s, "
                f"new {statistics.median(times['new']):.3f} s, new/old per round: median "
                f"{statistics.median(ratios):.3f} (from {min(ratios):.3f} to {max(ratios):.3f}); CPU time "
                f"old {statistics.median(cpu['old']):.3f} s, new {statistics.median(cpu['new']):.3f} s, "
                f"new/old per round: median {statistics.median(cpu_ratios):.3f} "
                f"(from {min(cpu_ratios):.3f} to {max(cpu_ratios):.3f})"
            )


if __name__ == "__main__":
    main()
