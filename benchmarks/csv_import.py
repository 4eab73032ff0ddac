"""Time app_support's CSV import against the sqlite3 shell's .import.

Run by hand, never in CI:

    python benchmarks/csv_import.py [--rows 1000000] [--runs 3]

It writes a CSV of mixed-type columns with quoted cells and non-ASCII text,
then times, median of --runs:
  - `sqlite3 file.db ".import --csv data.csv t"`;
  - POST /-/import-csv-file into a file database, in-process via datasette.client,
    with type detection on;
and prints both, their ratio, and the plugin's peak RSS (a fresh process per run).
"""

import argparse
import asyncio
import csv
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORDS = ["alpha", "beta", "São Paulo", "Zürich", "naïve café", "東京", "comma, inside", 'say "hi"', "multi\nline"]


def write_csv(path, rows):
    random.seed(1)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "name", "score", "zip", "city", "amount", "note"])
        for i in range(rows):
            writer.writerow([
                i, f"name {i}", random.randint(-1000, 100000), f"{random.randint(0, 99999):05d}",
                random.choice(WORDS), f"{random.random() * 10000:.2f}", random.choice(WORDS) + f" #{i}",
            ])


def time_shell(csv_path, folder):
    db = Path(folder) / "shell.db"
    db.unlink(missing_ok=True)
    start = time.perf_counter()
    subprocess.run(["sqlite3", str(db), f".import --csv {csv_path} t"], check=True)
    return time.perf_counter() - start


def time_plugin(csv_path, folder):
    """Run one import in a fresh process so peak RSS is the import's own."""
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(csv_path), folder],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout)


def child(csv_path, folder):
    sys.path.insert(0, str(HERE.parent))
    import sqlite3

    from datasette.app import Datasette
    from datasette.plugins import pm

    import app_support

    if not pm.is_registered(app_support):
        pm.register(app_support, name="app_support")
    os.environ["DATASETTE_API_TOKEN"] = "benchmark"
    db_path = Path(folder) / "plugin.db"
    db_path.unlink(missing_ok=True)
    sqlite3.connect(db_path).execute("vacuum")

    async def run():
        ds = Datasette([str(db_path)])
        await ds.invoke_startup()
        body = json.dumps({"path": csv_path, "database": "plugin"})
        start = time.perf_counter()
        response = await ds.client.post(
            "/-/import-csv-file", content=body, headers={"Authorization": "Bearer benchmark"}
        )
        elapsed = time.perf_counter() - start
        assert response.json()["ok"], response.text
        return elapsed, response.json()["rows"]

    elapsed, rows = asyncio.run(run())
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": elapsed, "rows": rows, "peak_rss_mb": peak_kb / 1024}))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--child", nargs=2)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    with tempfile.TemporaryDirectory() as folder:
        csv_path = Path(folder) / "data.csv"
        write_csv(csv_path, args.rows)
        size_mb = csv_path.stat().st_size / 1e6
        shell = [time_shell(csv_path, folder) for _ in range(args.runs)]
        plugin = [time_plugin(str(csv_path), folder) for _ in range(args.runs)]
    shell_s = statistics.median(shell)
    plugin_s = statistics.median(p["seconds"] for p in plugin)
    print(f"CSV: {args.rows:,} rows, 7 columns, {size_mb:.1f} MB")
    print(f"sqlite3 .import --csv:   {shell_s:.2f} s (median of {args.runs})")
    print(f"app_support import:      {plugin_s:.2f} s (median of {args.runs}, types detected)")
    print(f"ratio:                   {plugin_s / shell_s:.2f}x")
    print(f"plugin peak RSS:         {max(p['peak_rss_mb'] for p in plugin):.0f} MB")


if __name__ == "__main__":
    main()
