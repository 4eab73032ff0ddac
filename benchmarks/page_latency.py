"""How long Datasette's pages take while a large CSV imports: p50, p99, max.

Run by hand, never in CI, with the interpreter whose Datasette you want to
measure:

    python benchmarks/page_latency.py [--rows 1000000]

It starts a real `datasette` the way Datasette Desktop does, with the plugin
in --plugins-dir and two file databases opened through the API, and imports
the realistic CSV of benchmarks/csv_import.py (flags, zeros, blanks, codes
with leading zeros, a column that turns to text after 90% of the rows) into
a file database and then into `temporary`. Meanwhile it loads five pages
every 50 ms each: `/`, `/-/databases.json`, the target database's page,
another table of the target, and a table of another database. Each page
is first loaded once on the idle server, so that figure is printed too.
"""

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

os.environ.setdefault("DATASETTE_API_TOKEN", "5f1e0c9a7b3d2e4f6a8b0c1d2e3f4a5b")

import csv_import  # noqa: E402
import test_app_support as t  # noqa: E402


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def measure(database, rows, folder):
    server = t.AppServer(folder / "app")
    server.start()
    try:
        for name in ("target", "elsewhere"):
            status, _, body = server.call("/-/open-database-file", {"path": str(t.make_db(folder / f"{name}.db"))})
            assert status == 200, body
        assert server.call("/-/open-csv-file", {"path": str(t.write(folder / "small.csv", "a\n1\n"))})[0] == 200
        csv_path = folder / "data.csv"
        csv_import.write_csv(csv_path, rows)
        other = "t" if database == "target" else "small"
        pages = ["/", "/-/databases.json", f"/{database}", f"/{database}/{other}", "/elsewhere/t"]
        if database == "temporary":
            endpoint, body = "/-/open-csv-file", {"path": str(csv_path)}
        else:
            endpoint, body = "/-/import-csv-file", {"path": str(csv_path), "database": database}
        pollers = {page: t.page_loader(server, page) for page in pages}
        # A page's first load compiles its templates, import or not: load
        # each once on the idle server, so the figures are the import's.
        cold = []
        for page in pages:
            start = time.monotonic()
            assert pollers[page]() == 200, page
            cold.append(time.monotonic() - start)
        (status, _, answer), polls = t.poll_during(lambda: server.call(endpoint, body), pollers)
        assert status == 200 and json.loads(answer)["rows"] == rows, answer
    finally:
        server.stop()
    seconds = [end - start for page in pages for _, start, end in polls[page]]
    statuses = {status for page in pages for status, _, _ in polls[page]}
    return len(seconds), statuses, percentile(seconds, 0.5), percentile(seconds, 0.99), max(seconds), max(cold)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    import datasette.version

    print(f"datasette {datasette.version.__version__}, {args.rows:,} rows, pages polled every 50 ms")
    for database in ("target", "temporary"):
        with tempfile.TemporaryDirectory() as folder:
            loads, statuses, p50, p99, worst, cold = measure(database, args.rows, Path(folder))
        print(
            f"into {database:9}  {loads} page loads, statuses {sorted(statuses)}: "
            f"p50 {p50 * 1000:.0f} ms  p99 {p99 * 1000:.0f} ms  max {worst * 1000:.0f} ms"
            f"  (first loads before the import, idle: up to {cold * 1000:.0f} ms)"
        )


if __name__ == "__main__":
    main()
