"""Time app_support's CSV import against the sqlite3 shell's .import.

Run by hand, never in CI, with the interpreter whose Datasette you want to
measure:

    python benchmarks/csv_import.py [--rows 1000000] [--runs 3]
    python benchmarks/csv_import.py --kept [--rows 1000000] [--runs 3]
    python benchmarks/csv_import.py --rss-sweep     # peak RSS at 100k, 1M, 5M rows
    python benchmarks/csv_import.py --json [--rows 1000000] [--runs 3]
    python benchmarks/csv_import.py --json --rss-sweep
    python benchmarks/csv_import.py --xlsx [--rows 1000000] [--runs 3]
    python benchmarks/csv_import.py --xlsx --rss-sweep --sizes 100000,1000000
    python benchmarks/csv_import.py --coordinates [--rows 1000000] [--runs 5]

It writes a CSV shaped like files people really open (see COLUMNS: 0/1
flags, counts that are mostly zero, blank cells in number columns, codes
with leading zeros, decimals, short text with non-ASCII and quoted commas,
and a column that turns from numbers to text after 90% of the rows), then
times --runs rounds of these, one after another, each plugin run in a fresh
process and between two shell runs, and compares each plugin time with the
mean of the shell times just before and after it:
  - `sqlite3 file.db ".import --csv data.csv t"`, which types every column
    TEXT: the baseline;
  - POST /-/import-csv-file into a file database, types detected;
  - POST /-/open-csv-file into `temporary`, types detected;
  - with --kept, the same into `temporary` kept in a file (the app_support
    setting temporary_file, a new file in the scratch folder every run),
    compared also with the in-memory import of its round.
After each plugin import it checks the declared types and the row count
against what the file was built to contain, so a fast figure cannot come
from a wrong import; a run that fails the check is reported as such and
the script exits non-zero. The plugin reads a file this large in parts, one
process per CPU; the helper processes' peak RSS is reported beside its own.
Each plugin run gets the environment the app starts its server with (the
token and the secret, nothing of this shell's), with the scratch folder as
its HOME, so that a temporary kept in the real home folder
(~/.datasette-app/temporary.db) is never opened.

With --json, the same rows are also written as NDJSON and as one JSON array
(one object per line), with JSON's own types: numbers as numbers, codes with
leading zeros as strings, blanks as null, and the late column's integers as
numbers until it turns to words. Each round imports the CSV, the NDJSON and
the array into a file database, each in a fresh process, and compares each
JSON time with the CSV time of the same round; the types and row count are
checked as for CSV.

With --xlsx, LibreOffice (soffice, from Debian's libreoffice-calc-nogui)
saves the same CSV as an Excel workbook, reading the codes with leading
zeros as text, as a person would set them; each round then imports the CSV
and the workbook into a file database.

With --coordinates, the CSV is the coordinates file instead (COORDINATES:
id, a name, a city with quoted commas, a whole number, an ISO date, and
latitude and longitude with 5 decimal places), the file on which exact
REALs once cost 15%; the rounds are as for the 9-column file.
"""

import argparse
import asyncio
import csv
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TOKEN = "benchmark"
TEXT = ["alpha", "beta", "São Paulo", "Zürich", "naïve café", "東京", "Smith, John", 'say "hi"', "Ørsted, Inc."]

# name, intended declared type, what the column holds
COLUMNS = [
    ("id", "INTEGER", "row number"),
    ("active", "INTEGER", "0/1 flag"),
    ("visits", "INTEGER", "count, 40% '0', 5% blank"),
    ("rating", "INTEGER", "1-5, 20% blank"),
    ("zip", "TEXT", "5-digit code with leading zeros, e.g. 01234"),
    ("price", "REAL", "decimal with 2 places, 10% blank"),
    ("city", "TEXT", "short text, some non-ASCII, some quoted commas"),
    ("note", "TEXT", "short text with a number, some quoted commas and quotes"),
    ("late", "TEXT", "integers for the first 90% of rows, then words"),
]

CITIES = ["Paris", "São Paulo", "Washington, D.C.", "Zürich", "Tokyo", "Cape Town, WC", "Reykjavík"]
COORDINATES = [
    ("id", "INTEGER", "row number"),
    ("name", "TEXT", "Site and the row number"),
    ("city", "TEXT", "a city, some non-ASCII, some with a quoted comma"),
    ("population", "INTEGER", "a whole number up to 9,000,000"),
    ("surveyed", "TEXT", "an ISO date"),
    ("latitude", "REAL", "-90 to 90, 5 decimal places"),
    ("longitude", "REAL", "-180 to 180, 5 decimal places"),
]


def write_coordinates(path, rows, places=(5,)):
    """The coordinates file: each row's two decimals have one of places' counts of places."""
    rng = random.Random(5)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow([name for name, _, _ in COORDINATES])
        for i in range(rows):
            digits = rng.choice(places)
            writer.writerow([
                i,
                f"Site {i}",
                rng.choice(CITIES),
                rng.randint(0, 9_000_000),
                f"20{rng.randint(10, 25)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
                f"{rng.uniform(-90, 90):.{digits}f}",
                f"{rng.uniform(-180, 180):.{digits}f}",
            ])


def write_csv(path, rows):
    rng = random.Random(1)
    turn = rows * 9 // 10
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow([name for name, _, _ in COLUMNS])
        for i in range(rows):
            r = rng.random()
            writer.writerow([
                i,
                1 if r < 0.3 else 0,
                "" if r > 0.95 else ("0" if rng.random() < 0.42 else rng.randint(1, 5000)),
                "" if rng.random() < 0.2 else rng.randint(1, 5),
                f"{rng.randint(0, 99999):05d}",
                "" if r > 0.9 else f"{rng.random() * 1000:.2f}",
                rng.choice(TEXT),
                f"{rng.choice(TEXT)} #{i}",
                rng.randint(0, 100000) if i < turn else rng.choice(TEXT),
            ])


def write_json(csv_path, path, ndjson):
    """The rows of the CSV at csv_path as NDJSON or as an array of objects, with JSON types."""
    kinds = {name: kind for name, kind, _ in COLUMNS}
    with open(csv_path, newline="", encoding="utf-8") as f, open(path, "w", encoding="utf-8") as out:
        reader = csv.reader(f)
        names = next(reader)
        out.write("" if ndjson else "[\n")
        for number, row in enumerate(reader):
            item = {}
            for name, cell in zip(names, row):
                if cell == "":
                    item[name] = None
                elif kinds[name] == "INTEGER" or (name == "late" and cell.isdigit()):
                    item[name] = int(cell)
                elif kinds[name] == "REAL":
                    item[name] = float(cell)
                else:
                    item[name] = cell
            separator = "\n" if ndjson or not number else ",\n"
            out.write(("" if ndjson else separator) + json.dumps(item, ensure_ascii=False))
            if ndjson:
                out.write("\n")
        out.write("" if ndjson else "\n]\n")


def write_xlsx(csv_path, path):
    """The CSV at csv_path saved as an Excel workbook by LibreOffice, the zip codes as text."""
    folder = Path(path).parent
    subprocess.run(
        ["soffice", f"-env:UserInstallation=file://{folder}/libreoffice-profile", "--headless",
         "--infilter=CSV:44,34,76,1,5/2", "--convert-to", "xlsx", "--outdir", str(folder), str(csv_path)],
        check=True, capture_output=True, env={**os.environ, "HOME": str(folder)},
    )
    Path(folder, Path(csv_path).stem + ".xlsx").rename(path)


def time_shell(csv_path, folder):
    db = Path(folder) / "shell.db"
    db.unlink(missing_ok=True)
    start = time.perf_counter()
    subprocess.run(["sqlite3", str(db), f".import --csv {csv_path} t"], check=True)
    return time.perf_counter() - start


def app_environment(folder):
    """The environment Datasette Desktop starts its server with: the token, the secret and no
    more, with HOME the scratch folder, so that a kept `temporary` in the real home is never
    opened. Nothing of this shell's reaches it: PYTHONDONTWRITEBYTECODE, which some machines
    set, would make every helper process compile the module from source (0.04 s of its start)."""
    environment = {"DATASETTE_API_TOKEN": TOKEN, "DATASETTE_SECRET": "benchmark-secret", "HOME": folder}
    if os.environ.get("BENCHMARK_MAX_PROCESSES"):
        environment["BENCHMARK_MAX_PROCESSES"] = os.environ["BENCHMARK_MAX_PROCESSES"]
    return environment


def time_plugin(csv_path, folder, target):
    """Run one import in a fresh process so peak RSS is the import's own."""
    out = subprocess.run(
        [sys.executable, __file__, "--child", target, str(csv_path), folder],
        capture_output=True, text=True, env=app_environment(folder),
    )
    if out.returncode:
        return {"error": (out.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(out.stdout)


def _rss_mb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(target, csv_path, folder):
    sys.path.insert(0, str(HERE.parent))
    import sqlite3

    from datasette.app import Datasette
    from datasette.plugins import pm

    import app_support

    if os.environ.get("BENCHMARK_MAX_PROCESSES"):  # --max-processes
        app_support.MAX_PROCESSES = int(os.environ["BENCHMARK_MAX_PROCESSES"])
    if not pm.is_registered(app_support):
        pm.register(app_support, name="app_support")
    os.environ["DATASETTE_API_TOKEN"] = TOKEN

    async def run():
        if target == "file":
            db_path = Path(folder) / "plugin.db"
            db_path.unlink(missing_ok=True)
            sqlite3.connect(db_path).execute("vacuum")
            ds = Datasette([str(db_path)])
            endpoint, body = "/-/import-csv-file", {"path": csv_path, "database": "plugin"}
        elif target == "kept":
            kept = Path(folder) / "kept"
            shutil.rmtree(kept, ignore_errors=True)
            settings = {"temporary_file": str(kept / "temporary.db")}
            ds = Datasette(memory=True, metadata={"plugins": {"app_support": settings}})
            endpoint, body = "/-/open-csv-file", {"path": csv_path}
        else:
            ds = Datasette(memory=True)
            endpoint, body = "/-/open-csv-file", {"path": csv_path}
        await ds.invoke_startup()
        before_mb = _rss_mb("VmRSS")
        return {**await timed_import(ds, endpoint, body), "rss_before_mb": before_mb}

    result = asyncio.run(run())
    result["peak_rss_mb"] = _rss_mb("VmHWM")
    # The largest helper process that read part of the file (kilobytes on Linux).
    result["helper_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps(result))


async def timed_import(ds, endpoint, body):
    """POST an import as the app does; its seconds, and the rows and declared types of the
    table it made and whether that is in memory, or its error."""
    start = time.perf_counter()
    response = await ds.client.post(endpoint, content=json.dumps(body), headers={"Authorization": f"Bearer {TOKEN}"})
    elapsed = time.perf_counter() - start
    data = response.json()
    if not data.get("ok"):
        return {"error": f"{response.status_code} {data.get('error')}"}
    database, table = data["path"].split("/")[1:3]
    db = ds.get_database(database)
    info = (await db.execute(f'pragma table_info("{table}")')).rows
    count = (await db.execute(f'select count(*) from "{table}"')).rows[0][0]
    return {"seconds": elapsed, "rows": count, "types": {row[1]: row[2] for row in info}, "in_memory": db.is_memory}


def check(result, rows, target=None, columns=COLUMNS):
    """What is wrong with an import of a file of these columns, or None."""
    if "error" in result:
        return "failed: " + result["error"]
    if target in ("temporary", "kept") and result["in_memory"] != (target == "temporary"):
        return "WRONG TEMPORARY: " + ("in memory" if result["in_memory"] else "kept in a file")
    intended = {name: kind for name, kind, _ in columns}
    wrong = [f"{c} {result['types'].get(c)} (intended {k})" for c, k in intended.items() if result["types"].get(c) != k]
    if wrong or result["rows"] != rows:
        return f"WRONG IMPORT: {result['rows']:,} rows; " + ", ".join(wrong)
    return None


def describe(csv_path, rows, columns=COLUMNS):
    import datasette.version
    import sqlite3

    print(
        f"Datasette {datasette.version.__version__}, Python {sys.version.split()[0]}, "
        f"SQLite {sqlite3.sqlite_version}, {os.cpu_count()} CPUs"
    )
    print(f"CSV: {rows:,} rows, {len(columns)} columns, {csv_path.stat().st_size / 1e6:.1f} MB")
    for name, kind, what in columns:
        print(f"  {name:<8} {kind:<8} {what}")


def benchmark(rows, runs, kept=False, coordinates=False):
    """Rounds of shell, file database, shell, `temporary`, one after another, and a last shell.

    These machines are shared, and their speed drifts within seconds, so
    each plugin time is compared with the mean of the shell times just
    before and just after it. With kept, each round goes on with `temporary`
    kept in a file and another shell run.
    """
    problems = []
    targets = [("file", "/-/import-csv-file, file db"), ("temporary", "/-/open-csv-file, temporary")]
    if kept:
        targets.append(("kept", "/-/open-csv-file, kept temporary"))
    with tempfile.TemporaryDirectory() as folder:
        csv_path = Path(folder) / "data.csv"
        columns = COORDINATES if coordinates else COLUMNS
        (write_coordinates if coordinates else write_csv)(csv_path, rows)
        describe(csv_path, rows, columns)
        shell_times, results = [time_shell(csv_path, folder)], {target: [] for target, _ in targets}
        for _ in range(runs):
            for target, _ in targets:
                result = time_plugin(str(csv_path), folder, target)
                shell_times.append(time_shell(csv_path, folder))
                result["shell"] = (shell_times[-2] + shell_times[-1]) / 2
                results[target].append(result)
        print(f"sqlite3 .import --csv (all TEXT):    {statistics.median(shell_times):7.2f} s "
              f"(median of {len(shell_times)}: " + ", ".join(f"{t:.2f}" for t in shell_times) + ")")
        for target, label in targets:
            wrong = [w for w in (check(r, rows, target, columns) for r in results[target]) if w]
            good = [r for r in results[target] if "error" not in r]
            line = f"{label + ':':<37}"
            if good:
                seconds = statistics.median(r["seconds"] for r in good)
                ratios = [r["seconds"] / r["shell"] for r in good]
                peak = max(r["peak_rss_mb"] for r in good)
                helper = max(r["helper_peak_rss_mb"] for r in good)
                line += (
                    f"{seconds:7.2f} s; each run {min(ratios):.2f}-{max(ratios):.2f}x the shell runs "
                    f"around it, median {statistics.median(ratios):.2f}x; peak RSS {peak:.0f} MB, "
                    f"helpers {helper:.0f} MB"
                )
            print(line + (f"  [{wrong[0]}]" if wrong else "  [types and rows as intended]"))
            problems += wrong
        if kept:
            ratios = [
                k["seconds"] / m["seconds"]
                for k, m in zip(results["kept"], results["temporary"]) if "error" not in k and "error" not in m
            ]
            if ratios:
                print(
                    f"kept temporary against in memory, each round: {min(ratios):.2f}-{max(ratios):.2f}x, "
                    f"median {statistics.median(ratios):.2f}x (runs in memory "
                    + ", ".join(f"{r['seconds']:.2f}" for r in results["temporary"] if "error" not in r)
                    + "; kept " + ", ".join(f"{r['seconds']:.2f}" for r in results["kept"] if "error" not in r) + ")"
                )
    return problems


def write_format(csv_path, path, kind):
    if kind == "xlsx":
        write_xlsx(csv_path, path)
    else:
        write_json(csv_path, path, ndjson=kind == "ndjson")


def other_formats_benchmark(rows, runs, kinds):
    """Rounds of CSV and other formats' imports into a file database, one after another."""
    problems = []
    with tempfile.TemporaryDirectory() as folder:
        paths = {kind: Path(folder) / f"data.{kind}" for kind in ("csv",) + kinds}
        write_csv(paths["csv"], rows)
        for kind in kinds:
            write_format(paths["csv"], paths[kind], kind)
        describe(paths["csv"], rows)
        for kind in kinds:
            print(f"{kind.upper()}: {paths[kind].stat().st_size / 1e6:.1f} MB")
        results = {kind: [] for kind in paths}
        for _ in range(runs):
            for kind, path in paths.items():
                results[kind].append(time_plugin(str(path), folder, "file"))
        for kind in paths:
            wrong = [w for w in (check(r, rows) for r in results[kind]) if w]
            good = [r for r in results[kind] if "error" not in r]
            line = f"/-/import-csv-file, {kind}, file db:"
            line = f"{line:<37}"
            if good:
                seconds = statistics.median(r["seconds"] for r in good)
                line += f"{seconds:7.2f} s (runs " + ", ".join(f"{r['seconds']:.2f}" for r in good) + ")"
                if kind != "csv":
                    ratios = [
                        r["seconds"] / c["seconds"]
                        for r, c in zip(results[kind], results["csv"]) if "error" not in r and "error" not in c
                    ]
                    line += (
                        f"; {min(ratios):.2f}-{max(ratios):.2f}x the CSV import of its round, "
                        f"median {statistics.median(ratios):.2f}x"
                    )
                line += f"; peak RSS {max(r['peak_rss_mb'] for r in good):.0f} MB"
                line += f", helpers {max(r['helper_peak_rss_mb'] for r in good):.0f} MB"
            print(line + (f"  [{wrong[0]}]" if wrong else "  [types and rows as intended]"))
            problems += wrong
    return problems


def rss_sweep(sizes, kinds=()):
    problems = []
    print("Peak RSS of the plugin process (one run each; RSS before the import in brackets)")
    for rows in sizes:
        with tempfile.TemporaryDirectory() as folder:
            csv_path = Path(folder) / "data.csv"
            write_csv(csv_path, rows)
            runs = [("file", csv_path), ("temporary", csv_path)]
            if kinds:
                runs = [("file", csv_path)]
                for kind in kinds:
                    write_format(csv_path, Path(folder) / f"data.{kind}", kind)
                    runs.append(("file", Path(folder) / f"data.{kind}"))
            line = f"{rows:>10,} rows, {csv_path.stat().st_size / 1e6:6.0f} MB:"
            for target, path in runs:
                result = time_plugin(str(path), folder, target)
                target = f"{target} {path.suffix[1:]}" if kinds else target
                wrong = check(result, rows)
                problems += [wrong] if wrong else []
                if "error" in result:
                    line += f"  {target} {wrong}"
                else:
                    line += f"  {target} {result['peak_rss_mb']:.0f} MB ({result['rss_before_mb']:.0f})"
                    line += f" helpers {result['helper_peak_rss_mb']:.0f} MB"
                    line += f" {result['seconds']:.1f} s" + (" WRONG TYPES" if wrong else "")
            print(line, flush=True)
    return problems


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rss-sweep", action="store_true", help="peak RSS at 100k, 1M and 5M rows")
    parser.add_argument(
        "--sizes", default="100000,1000000,5000000", help="the row counts of --rss-sweep, comma-separated"
    )
    parser.add_argument("--json", action="store_true", help="the same rows as NDJSON and a JSON array")
    parser.add_argument("--xlsx", action="store_true", help="the same rows as an Excel workbook")
    parser.add_argument("--kept", action="store_true", help="also into `temporary` kept in a file")
    parser.add_argument("--coordinates", action="store_true", help="the coordinates file, not the 9 columns")
    parser.add_argument(
        "--max-processes", type=int,
        help="read in parts by at most this many processes; 1 reads every file in one piece",
    )
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.max_processes:
        os.environ["BENCHMARK_MAX_PROCESSES"] = str(args.max_processes)
        print(f"At most {args.max_processes} processes")
    if args.child:
        child(*args.child)
        return
    kinds = ("ndjson", "json") * args.json + ("xlsx",) * args.xlsx
    if (args.kept or args.coordinates) and (kinds or args.rss_sweep):
        parser.error("--kept and --coordinates go with the CSV benchmark alone, not --json, --xlsx or --rss-sweep")
    if args.rss_sweep:
        problems = rss_sweep([int(size) for size in args.sizes.split(",")], kinds)
    elif kinds:
        problems = other_formats_benchmark(args.rows, args.runs, kinds)
    else:
        problems = benchmark(args.rows, args.runs, args.kept, args.coordinates)
    if problems:
        sys.exit("Some imports were wrong, so their figures do not count.")


if __name__ == "__main__":
    main()
