"""Time POST /-/preview-import on large files: it reads only a file's start, so it should answer within a second at any size.

Run by hand, never in CI, with the interpreter whose Datasette you want to
measure:

    python benchmarks/preview.py [--runs 5] [--rows 1000000] [--big-mb 1000] [--ndjson-mb 100]

It writes, in a scratch folder removed afterwards, files of the rows of
benchmarks/csv_import.py, shaped like files people really open (0/1 flags,
counts that are mostly zero, blank cells in number columns, codes with
leading zeros, decimals, short text with non-ASCII and quoted commas, and a
column that turns from numbers to text after 90% of the rows):
  - the CSV of --rows rows (62 MB at 1,000,000 rows);
  - the same generator with enough rows to make about --big-mb MB;
  - the --rows file gzipped (.csv.gz), which the preview unpacks only in part;
  - NDJSON of about --ndjson-mb MB (csv_import.write_json of a CSV of as many
    rows as that takes: JSON's own types, blanks as null).

Then it starts a real `datasette` as Datasette Desktop starts it: the plugin
copied alone into a --plugins-dir, `--setting max_returned_rows 2000`, and
an environment of the API token, the secret and HOME (the scratch folder,
so that no kept temporary in the real home folder is opened). It waits
until /-/versions.json answers, then runs --runs rounds; each round POSTs
/-/preview-import {"path": ...} once for every file, and once with options,
{"delimiter": ",", "types": {"id": "TEXT"}}, for the two plain CSVs, and
once for the big CSV with its pages dropped from the OS's cache just before
(posix_fadvise, as after a reboot), one after another, so the machine's
drift falls on every file alike. Times are the client's wall clock around
each request, from urllib.request.

Every answer is checked: ok true, the nine columns by name with the types
the start of the file holds (those of csv_import.COLUMNS, except `late`,
whose words only come after 90% of the rows, so INTEGER; and `id` TEXT when
the options ask for it), 20 rows, and those rows' cells equal to the file's
first 20 rows. A failed check is reported and the script exits non-zero,
so a fast figure cannot come from a wrong answer. rows_estimate is printed
beside the true row count; a preview that reads part of a compressed file
cannot know the size of the whole, and gives none.
"""

import argparse
import csv
import gzip
import hashlib
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import csv_import  # noqa: E402  (the realistic rows: write_csv, write_json, COLUMNS)

TOKEN = "benchmark"
PREVIEW_ROWS = 20
# What the start of every file holds: `late` turns to words only after 90% of the rows.
START_TYPES = {name: ("INTEGER" if name == "late" else kind) for name, kind, _ in csv_import.COLUMNS}
OPTIONS = {"delimiter": ",", "types": {"id": "TEXT"}}
COLD = "not cached"


def drop_from_page_cache(path):
    """Ask the kernel to forget the file's cached pages, as a reboot would; it is clean, so they go."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
        os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(descriptor)


def unused_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Failed(Exception):
    """A check or a request that failed: the figures do not count."""


class Server:
    """A real datasette process, started as Datasette Desktop starts it.

    The plugin is copied alone into a fresh --plugins-dir, as the tests'
    AppServer and keep_temporary.py do; the process gets the token, the
    secret and HOME, and no PATH.
    """

    def __init__(self, folder):
        self.folder = Path(folder)
        plugins = self.folder / "plugins"
        plugins.mkdir(parents=True)
        shutil.copy(HERE.parent / "app_support.py", plugins / "app_support.py")
        self.plugin_sha = hashlib.sha1((plugins / "app_support.py").read_bytes()).hexdigest()[:12]
        self.environment = {
            "DATASETTE_API_TOKEN": TOKEN, "DATASETTE_SECRET": secrets.token_hex(32), "HOME": str(self.folder),
        }
        self.port = unused_port()
        self.arguments = [
            sys.executable, "-m", "datasette", "--port", str(self.port),
            "--setting", "max_returned_rows", "2000", "--plugins-dir", str(plugins),
        ]
        self.log = self.folder / "datasette.log"
        self.process = None

    def url(self, path):
        return f"http://127.0.0.1:{self.port}{path}"

    def start(self):
        """Start the server; the seconds until /-/versions.json answers."""
        with open(self.log, "ab") as log:
            start = time.perf_counter()
            self.process = subprocess.Popen(
                self.arguments, env=self.environment, stdout=subprocess.DEVNULL, stderr=log
            )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                urllib.request.urlopen(self.url("/-/versions.json"), timeout=1).close()
                return time.perf_counter() - start
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise Failed("datasette did not start: " + self.log.read_text(errors="replace")[-2000:])

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def preview(self, body):
        """POST /-/preview-import as the desktop app makes it: (seconds, status, answer)."""
        request = urllib.request.Request(
            self.url("/-/preview-import"), data=json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
        )
        start = time.perf_counter()
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        seconds = time.perf_counter() - start
        try:
            answer = json.loads(raw)
        except ValueError:
            answer = {"raw": raw[:500].decode(errors="replace")}
        return seconds, status, answer


# ===== The files =====


def csv_bytes(rows, per_row):
    """About how large write_csv makes a file of rows rows: ids and the note's numbers gain a
    digit at 1M and 10M rows, two bytes a row each time."""
    return rows * per_row + 2 * max(0, rows - 1_000_000) + 2 * max(0, rows - 10_000_000)


def rows_for_csv(size_bytes, per_row):
    rows = int(size_bytes / per_row)
    while csv_bytes(rows, per_row) > size_bytes:
        rows -= 10_000
    return rows


def write_files(folder, rows, big_mb, ndjson_mb):
    """{label: (path, true rows, kind)} of the files to preview."""
    folder = Path(folder)
    files = {}
    started = time.perf_counter()
    small = folder / "data.csv"
    csv_import.write_csv(small, rows)
    files[f"CSV, {rows:,} rows"] = (small, rows, "csv")
    # ids below 1M have at most 6 digits: the bytes a row of the small file takes, without them.
    per_row = small.stat().st_size / rows - (2 * (rows > 1_000_000))
    big_rows = rows_for_csv(big_mb * 1e6, per_row)
    big = folder / "big.csv"
    csv_import.write_csv(big, big_rows)
    files[f"CSV, {big_rows:,} rows"] = (big, big_rows, "csv")
    packed = folder / "data.csv.gz"
    with open(small, "rb") as src, gzip.open(packed, "wb", compresslevel=6) as out:
        shutil.copyfileobj(src, out, 1024 * 1024)
    files[f"CSV gzipped, {rows:,} rows"] = (packed, rows, "csv.gz")
    # The bytes an NDJSON row takes, from a sample, then as many rows as make ndjson_mb MB.
    sample_csv, sample_json = folder / "sample.csv", folder / "sample.ndjson"
    csv_import.write_csv(sample_csv, 100_000)
    csv_import.write_json(sample_csv, sample_json, ndjson=True)
    json_rows = int(ndjson_mb * 1e6 / (sample_json.stat().st_size / 100_000)) // 1000 * 1000
    sample_csv.unlink()
    sample_json.unlink()
    json_csv, ndjson = folder / "for-json.csv", folder / "data.ndjson"
    csv_import.write_csv(json_csv, json_rows)
    csv_import.write_json(json_csv, ndjson, ndjson=True)
    json_csv.unlink()
    files[f"NDJSON, {json_rows:,} rows"] = (ndjson, json_rows, "ndjson")
    print(f"(files written in {time.perf_counter() - started:.0f} s)")
    return files


def first_rows(path, kind):
    """The file's first PREVIEW_ROWS rows, as lists of cells in COLUMNS' order."""
    names = [name for name, _, _ in csv_import.COLUMNS]
    if kind == "ndjson":
        with open(path, encoding="utf-8") as f:
            return [[item[name] for name in names] for item, _ in zip(map(json.loads, f), range(PREVIEW_ROWS))]
    opener = gzip.open if kind == "csv.gz" else open
    with opener(path, "rt", newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        if next(reader) != names:
            raise Failed(f"{path} does not start with the header of csv_import.COLUMNS")
        return [row for row, _ in zip(reader, range(PREVIEW_ROWS))]


# ===== Checks =====


def same_cell(value, expected, kind):
    """Whether the preview's value is the file's cell, as a column of kind stores it."""
    if expected in ("", None):
        return value in ("", None)
    if kind == "TEXT":
        return value == str(expected)
    if kind == "INTEGER":
        return type(value) is int and value == int(expected)
    return type(value) in (int, float) and value == float(expected)


def check(answer, status, expected_rows, types):
    """What is wrong with a preview's answer, or None."""
    if status != 200 or answer.get("ok") is not True:
        return f"{status} {json.dumps(answer)[:300]}"
    columns = answer.get("columns") or []
    names = [column.get("name") for column in columns]
    if names != list(types):
        return f"columns {names}, expected {list(types)}"
    got = {column["name"]: column.get("type") for column in columns}
    wrong = [f"{name} {got[name]} (expected {kind})" for name, kind in types.items() if got[name] != kind]
    if wrong:
        return "types: " + ", ".join(wrong)
    rows = answer.get("rows") or []
    if len(rows) != PREVIEW_ROWS:
        return f"{len(rows)} rows, expected {PREVIEW_ROWS}"
    for number, (row, expected) in enumerate(zip(rows, expected_rows)):
        if len(row) != len(types):
            return f"row {number + 1} has {len(row)} cells, expected {len(types)}"
        for value, cell, (name, kind) in zip(row, expected, types.items()):
            if not same_cell(value, cell, kind):
                return f"row {number + 1}, {name}: {value!r}, the file holds {cell!r}"
    return None


# ===== The benchmark =====


def describe(files, server, start_seconds):
    import datasette.version

    print(f"Datasette {datasette.version.__version__}, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"app_support.py as copied into --plugins-dir: sha1 {server.plugin_sha}; "
          f"server up in {start_seconds:.2f} s")
    print(f"Data: {len(csv_import.COLUMNS)} columns, the rows of benchmarks/csv_import.py:")
    for name, kind, what in csv_import.COLUMNS:
        print(f"  {name:<8} {kind:<8} {what}")
    for label, (path, rows, _) in files.items():
        print(f"  {label}: {path.name}, {path.stat().st_size / 1e6:,.1f} MB")


def benchmark(files, runs, folder):
    server = Server(Path(folder) / "server")
    cases = []  # (label, path, true rows, kind, options)
    for label, (path, rows, kind) in files.items():
        cases.append((label, path, rows, kind, None))
    for label, (path, rows, kind) in files.items():
        if kind == "csv":
            cases.append((label + ", with options", path, rows, kind, OPTIONS))
    # The big CSV as after a reboot: its pages dropped from the OS's cache before each run.
    label, (path, rows, kind) = list(files.items())[1]
    cases.append((label + ", not cached", path, rows, kind, COLD))
    expected = {str(path): first_rows(path, kind) for _, path, _, kind, _ in cases}
    results = {case[0]: [] for case in cases}
    problems = []
    try:
        start_seconds = server.start()
        describe(files, server, start_seconds)
        for _ in range(runs):
            for label, path, rows, kind, options in cases:
                types = dict(START_TYPES)
                body = {"path": str(path)}
                if options is COLD:
                    drop_from_page_cache(path)
                elif options:
                    body.update(options)
                    types.update(options["types"])
                seconds, status, answer = server.preview(body)
                wrong = check(answer, status, expected[str(path)], types)
                if wrong:
                    problems.append(f"{label}: {wrong}")
                results[label].append((seconds, answer, wrong))
        rss = _rss_mb(server.process.pid)
    finally:
        server.stop()
    print(f"\n{runs} runs of each, round-robin; the server's RSS at the end {rss:.0f} MB")
    print(f"{'file':<40} {'median':>8} {'max':>8} {'rows_read':>10} {'rows_estimate':>14} {'true rows':>12} "
          f"{'off':>7}  complete")
    for label, path, rows, kind, options in cases:
        good = [(s, a) for s, a, w in results[label] if not w]
        line = f"{label:<40}"
        if good:
            times = [s * 1000 for s, _ in good]
            answer = good[-1][1]
            estimate = answer.get("rows_estimate")
            off = f"{(estimate - rows) / rows:+.1%}" if isinstance(estimate, int) else "-"
            line += (
                f" {statistics.median(times):6.0f}ms {max(times):6.0f}ms {answer.get('rows_read'):>10,} "
                f"{'none' if estimate is None else format(estimate, ','):>14} {rows:>12,} {off:>7}  "
                f"{answer.get('complete')}"
            )
            if max(times) > 1000:
                line += "  OVER 1 s"
        wrong = [w for _, _, w in results[label] if w]
        print(line + (f"  [WRONG: {wrong[0]}]" if wrong else ""))
    print("\nEach run, ms:")
    for label, *_ in cases:
        print(f"  {label:<40} " + ", ".join(f"{s * 1000:.0f}" for s, _, _ in results[label]))
    print("\nWhat each answer said (the last run's):")
    for label, *_ in cases:
        seconds, answer, wrong = results[label][-1]
        if wrong:
            continue
        columns = ", ".join(
            f"{c['name']} {c['type']}" + (f" ({c['why']})" if c.get("why") else "") for c in answer["columns"]
        )
        print(f"  {label}: {answer.get('format')}, {answer.get('encoding')}, delimiter {answer.get('delimiter')!r}; "
              f"{columns}")
    return problems


def _rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the CSV, its gzipped copy")
    parser.add_argument("--big-mb", type=int, default=1000, help="about how large the big CSV is")
    parser.add_argument("--ndjson-mb", type=int, default=100, help="about how large the NDJSON is")
    args = parser.parse_args()
    if args.rows < PREVIEW_ROWS:
        parser.error(f"--rows must be at least {PREVIEW_ROWS}")
    free_mb = shutil.disk_usage(tempfile.gettempdir()).free / 1e6
    needed_mb = args.big_mb + 2 * args.rows * 70 / 1e6 + args.ndjson_mb * 1.5
    if free_mb < needed_mb * 1.2:
        sys.exit(f"{tempfile.gettempdir()} has {free_mb:,.0f} MB free, the files need about {needed_mb:,.0f} MB: "
                 "try a smaller --big-mb")
    with tempfile.TemporaryDirectory(prefix="preview-benchmark-") as folder:
        files = write_files(folder, args.rows, args.big_mb, args.ndjson_mb)
        try:
            problems = benchmark(files, args.runs, folder)
        except Failed as e:
            problems = [str(e)]
    if problems:
        print("\n" + "\n".join(problems[:10]))
        sys.exit("Some previews were wrong, so their figures do not count.")


if __name__ == "__main__":
    main()
