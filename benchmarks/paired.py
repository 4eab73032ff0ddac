"""Time the import of two copies of app_support.py against each other, paired.

Run by hand, never in CI:

    python benchmarks/paired.py OLD_CHECKOUT NEW_CHECKOUT [--rows 1000000] [--runs 7]

For a refactor, or any change that should cost nothing: each round imports
the same file once with each checkout's module, in a fresh process each, in
alternating order, and the ratio of new to old is taken within the round,
so that a machine that changes speed between rounds moves both. Two files:

  - the 9-column file of csv_import.py (flags, counts, blanks, codes with
    leading zeros, 2-place prices, quoted text, a late turn to words);
  - coordinates: id, a name, a city with quoted commas, a whole number, an
    ISO date, and latitude and longitude with 5 to 7 decimal places, the
    decimals people have most.

Each import goes through the engine's import_file into a new file database,
read in parts as usual, and is timed both by the clock and by the CPU time
of its processes (this one and its helpers), which other work on a shared
machine disturbs less; the script checks the row count and declared types
of every import, so a fast figure cannot come from a wrong one.
"""

import argparse
import csv
import json
import random
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

CITIES = ["Paris", "São Paulo", "Washington, D.C.", "Zürich", "Tokyo", "Cape Town, WC", "Reykjavík"]
COORDINATE_TYPES = ["INTEGER", "TEXT", "TEXT", "INTEGER", "TEXT", "REAL", "REAL"]


def write_coordinates(path, rows):
    rng = random.Random(5)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "name", "city", "population", "surveyed", "latitude", "longitude"])
        for i in range(rows):
            places = rng.choice((5, 6, 7))
            writer.writerow([
                i,
                f"Site {i}",
                rng.choice(CITIES),
                rng.randint(0, 9_000_000),
                f"20{rng.randint(10, 25)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
                f"{rng.uniform(-90, 90):.{places}f}",
                f"{rng.uniform(-180, 180):.{places}f}",
            ])


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
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("old", nargs="?")
    parser.add_argument("new", nargs="?")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    with tempfile.TemporaryDirectory() as folder:
        files = {
            "9 columns": (Path(folder) / "nine.csv", csv_import.write_csv, [k for _, k, _ in csv_import.COLUMNS]),
            "coordinates": (Path(folder) / "coordinates.csv", write_coordinates, COORDINATE_TYPES),
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
