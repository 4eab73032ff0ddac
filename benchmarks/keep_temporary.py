"""Time keeping `temporary` in a file: the switch both ways, and a server start with a kept file.

Run by hand, never in CI, with the interpreter whose Datasette you want to
measure:

    python benchmarks/keep_temporary.py [--size-mb 1000] [--runs 3] [--data scratch.db]

It builds, once, a SQLite file of about --size-mb MB of tables shaped like
files people import (see TABLES: integer ids, coordinates with 5 to 7
decimal places, ZIP-like codes with leading zeros kept as text, text with
quoted commas, quotes and non-ASCII, ISO dates, an index on each table),
with the sqlite3 module; --data keeps it at a path of your choice, to be
reused by the next run. Then --runs rounds of these, one after another:

  - a real `datasette` started as Datasette Desktop starts it: the plugin
    alone in a --plugins-dir, `--setting max_returned_rows 2000`, and an
    environment of the API token and the secret only. Its app_support
    setting temporary_file names a file in a scratch folder, never the home
    folder, so it starts with keeping on: it is turned off, and the file
    restored into the in-memory `temporary` (POST
    /-/restore-temporary-from-file);
  - POST /-/keep-temporary {"keep": true} timed, with the server's RSS
    (VmRSS) before and just after: the in-memory copy should be freed;
  - {"keep": false} timed, with the RSS after;
  - keeping turned on again and the server stopped, leaving the kept file;
    then server starts timed until /-/versions.json answers: with no kept
    file (the setting makes an empty one), with the kept file in the OS's
    page cache as it was just written, and with the file's pages dropped
    from that cache (posix_fadvise), as after a reboot.

After the restore, each switch and each start with the file it counts the
rows of every table through the server's SQL and compares them with the
scratch file's, so a fast figure cannot come from a lost table; a failed
check is reported and the script exits non-zero.
"""

import argparse
import json
import os
import random
import secrets
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import csv_import  # noqa: E402  (its text with quoted commas and non-ASCII)

TOKEN = "benchmark"
CITIES = ["Paris", "São Paulo", "Washington, D.C.", "Zürich", "Tokyo", "Cape Town, WC", "Reykjavík", "東京"]
NAMES = ["Smith, John", "Ørsted, Inc.", 'Jane "JJ" Doe', "Müller, Jörg", "O'Brien", "Nguyễn Văn A", "Lee"]

# name, rows per million rows, columns, what it holds
TABLES = [
    (
        "places", 400_000,
        "id integer primary key, name text, city text, zip text, latitude real, longitude real, "
        "opened text, visits integer",
        "a name with a number, a city (some with quoted commas or non-ASCII), a 5-digit ZIP "
        "code with leading zeros as text, latitude and longitude with 5-7 decimal places, an "
        "ISO date, a count; index on zip",
    ),
    (
        "readings", 450_000,
        "id integer primary key, place_id integer, taken text, value real, note text",
        "a place id, an ISO date and time, a decimal, a note with quoted commas, quotes and "
        "non-ASCII; index on place_id",
    ),
    (
        "people", 150_000,
        "id integer primary key, name text, email text, zip text, born text, city text",
        'a name such as "Smith, John" or Nguyễn Văn A, an email, a ZIP code as text, an ISO '
        "date, a city; index on (zip, born)",
    ),
]
INDEXES = [
    "create index places_zip on places (zip)",
    "create index readings_place on readings (place_id)",
    "create index people_zip_born on people (zip, born)",
]
# About this many bytes of file for every million rows of TABLES, measured.
BYTES_PER_MILLION_ROWS = 83_000_000


def _date(rng):
    return f"{rng.randint(1950, 2025)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"


def _coordinate(rng, low, high):
    return round(rng.uniform(low, high), rng.choice((5, 6, 7)))


def _rows(table, count, rng):
    if table == "places":
        for i in range(count):
            yield (
                i, f"Site {i}", rng.choice(CITIES), f"{rng.randint(0, 99999):05d}",
                _coordinate(rng, -90, 90), _coordinate(rng, -180, 180), _date(rng),
                0 if rng.random() < 0.4 else rng.randint(1, 5000),
            )
    elif table == "readings":
        for i in range(count):
            yield (
                i, rng.randrange(count), f"{_date(rng)}T{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:00",
                round(rng.uniform(0, 1000), 2), f"{rng.choice(csv_import.TEXT)}, reading #{i}",
            )
    else:
        for i in range(count):
            name = rng.choice(NAMES)
            yield (
                i, name, f"user{i}@example.org", f"{rng.randint(0, 99999):05d}", _date(rng),
                rng.choice(CITIES),
            )


def write_data(path, size_mb):
    """A SQLite file of about size_mb MB of TABLES at path; made with journal and syncs off, it is scratch."""
    millions = size_mb * 1e6 / BYTES_PER_MILLION_ROWS
    rng = random.Random(28)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("pragma journal_mode = off")
    conn.execute("pragma synchronous = off")
    conn.execute("begin")
    for table, per_million, columns, _ in TABLES:
        conn.execute(f"create table {table} ({columns})")
        places = columns.count(",") + 1
        conn.executemany(
            f"insert into {table} values ({', '.join('?' * places)})",
            _rows(table, int(per_million * millions), rng),
        )
    for index in INDEXES:
        conn.execute(index)
    conn.execute("commit")
    conn.close()


def table_counts_of_file(path):
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        names = [row[0] for row in conn.execute("select name from sqlite_master where type = 'table' order by name")]
        return {name: conn.execute(f'select count(*) from "{name}"').fetchone()[0] for name in names}
    finally:
        conn.close()


def unused_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Failed(Exception):
    """A check or a request that failed: the run's figures do not count."""


class Server:
    """A real datasette process, started as Datasette Desktop starts it, keeping temporary at kept_path.

    The plugin is copied alone into a fresh --plugins-dir, as the tests'
    AppServer does; the process gets the app's whole environment, the token
    and the secret, and no PATH or HOME.
    """

    ENVIRONMENT = {"DATASETTE_API_TOKEN": TOKEN, "DATASETTE_SECRET": secrets.token_hex(32)}

    def __init__(self, folder, kept_path):
        self.folder = Path(folder)
        plugins = self.folder / "plugins"
        plugins.mkdir(parents=True)
        shutil.copy(HERE.parent / "app_support.py", plugins / "app_support.py")
        metadata = self.folder / "metadata.json"
        metadata.write_text(json.dumps({"plugins": {"app_support": {"temporary_file": str(kept_path)}}}))
        self.port = unused_port()
        self.arguments = [
            sys.executable, "-m", "datasette", "--port", str(self.port),
            "--setting", "max_returned_rows", "2000", "--plugins-dir", str(plugins), "-m", str(metadata),
        ]
        self.log = self.folder / "datasette.log"
        self.process = None
        self.query_path = None

    def url(self, path):
        return f"http://127.0.0.1:{self.port}{path}"

    def start(self):
        """Start the server; the seconds until /-/versions.json answers."""
        with open(self.log, "ab") as log:
            start = time.perf_counter()
            self.process = subprocess.Popen(
                self.arguments, env=self.ENVIRONMENT, stdout=subprocess.DEVNULL, stderr=log
            )
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                with urllib.request.urlopen(self.url("/-/versions.json"), timeout=1) as response:
                    versions = json.loads(response.read())
                seconds = time.perf_counter() - start
                break
            except OSError:
                time.sleep(0.02)
        else:
            self.stop()
            raise Failed("datasette did not start: " + self.log.read_text(errors="replace")[-2000:])
        # 1.0 runs SQL at /db/-/query, 0.65 at /db.
        self.query_path = "/temporary/-/query.json" if versions["datasette"]["version"].startswith("1.") else "/temporary.json"
        return seconds

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def call(self, path, body=None):
        """A request as the desktop app makes it: (seconds, status, answer)."""
        request = urllib.request.Request(
            self.url(path),
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        start = time.perf_counter()
        try:
            with urllib.request.urlopen(request, timeout=900) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        return time.perf_counter() - start, status, json.loads(raw)

    def post_ok(self, path, body):
        seconds, status, answer = self.call(path, body)
        if status != 200 or not answer.get("ok"):
            raise Failed(f"POST {path} {json.dumps(body)}: {status} {answer}")
        return seconds, answer

    def sql(self, query):
        seconds, status, answer = self.call(self.query_path + "?" + urllib.parse.urlencode({"sql": query, "_shape": "array"}))
        if status != 200 or not isinstance(answer, list):
            raise Failed(f"SQL {query}: {status} {answer}")
        return answer

    def counts(self):
        names = [row["name"] for row in self.sql("select name from sqlite_master where type = 'table' order by name")]
        return {name: self.sql(f'select count(*) as n from "{name}"')[0]["n"] for name in names}

    def rss_mb(self):
        with open(f"/proc/{self.process.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        raise Failed("no VmRSS")


def check_counts(server, expected, when):
    counts = server.counts()
    if counts != expected:
        raise Failed(f"{when}: temporary holds {counts}, expected {expected}")


def check_state(answer, keep, path, when):
    if answer.get("keep") is not keep or answer.get("file") != (str(path) if keep else None):
        raise Failed(f"{when}: /-/keep-temporary says {answer}")


def drop_from_page_cache(path):
    """Ask the kernel to forget the file's cached pages, as a reboot would; it is clean, so they go."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
        os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(descriptor)


def timed_start(folder, kept_path, expected):
    """Start a server, check temporary and the switch's state, stop it; the start's seconds."""
    server = Server(folder, kept_path)
    try:
        seconds = server.start()
        _, status, state = server.call("/-/keep-temporary")
        if status != 200:
            raise Failed(f"GET /-/keep-temporary: {status} {state}")
        check_state(state, True, kept_path, f"start with {kept_path.name}")
        check_counts(server, expected, f"after a start with {kept_path.name}")
    finally:
        server.stop()
    return seconds


def one_run(folder, data_path, expected):
    """One round: the switch both ways on a server, then three starts. Its figures, by name."""
    figures = {}
    kept = folder / "kept" / "temporary.db"
    server = Server(folder / "server", kept)
    try:
        server.start()
        _, state = server.post_ok("/-/keep-temporary", {"keep": False})
        check_state(state, False, kept, "keep: false at first")
        figures["rss_idle"] = server.rss_mb()
        figures["restore"], _ = server.post_ok("/-/restore-temporary-from-file", {"path": str(data_path)})
        check_counts(server, expected, "after the restore")
        figures["rss_in_memory"] = server.rss_mb()
        figures["keep_true"], state = server.post_ok("/-/keep-temporary", {"keep": True})
        figures["rss_after_keep_true"] = server.rss_mb()
        check_state(state, True, kept, "keep: true")
        check_counts(server, expected, "after keep: true")
        figures["kept_file_mb"] = kept.stat().st_size / 1e6
        time.sleep(2)
        figures["rss_2s_after_keep_true"] = server.rss_mb()
        figures["keep_false"], state = server.post_ok("/-/keep-temporary", {"keep": False})
        figures["rss_after_keep_false"] = server.rss_mb()
        check_state(state, False, kept, "keep: false")
        check_counts(server, expected, "after keep: false")
        if os.path.lexists(kept):
            raise Failed("keep: false left the kept file")
        _, state = server.post_ok("/-/keep-temporary", {"keep": True})
        check_state(state, True, kept, "keep: true again")
    finally:
        server.stop()
    empty = folder / "empty" / "temporary.db"
    figures["start_no_file"] = timed_start(folder / "start-empty", empty, {})
    figures["start_warm"] = timed_start(folder / "start-warm", kept, expected)
    drop_from_page_cache(kept)
    figures["start_cold"] = timed_start(folder / "start-cold", kept, expected)
    return figures


LABELS = [
    ("rss_idle", "MB", "RSS of the server, temporary empty and in memory"),
    ("restore", "s", "restore the file into the in-memory temporary (for reference)"),
    ("rss_in_memory", "MB", "RSS with the data in memory"),
    ("keep_true", "s", 'POST /-/keep-temporary {"keep": true}'),
    ("rss_after_keep_true", "MB", "RSS just after it"),
    ("rss_2s_after_keep_true", "MB", "RSS 2 s later"),
    ("kept_file_mb", "MB", "the kept file"),
    ("keep_false", "s", '{"keep": false}'),
    ("rss_after_keep_false", "MB", "RSS just after it"),
    ("start_no_file", "s", "start, no kept file (an empty one is made)"),
    ("start_warm", "s", "start with the kept file, in the page cache"),
    ("start_cold", "s", "start with the kept file, dropped from the cache"),
]


def describe(data_path, expected):
    import datasette.version

    print(f"Datasette {datasette.version.__version__}, Python {sys.version.split()[0]}, "
          f"SQLite {sqlite3.sqlite_version}, {os.cpu_count()} CPUs")
    print(f"Data: {data_path.stat().st_size / 1e6:,.0f} MB, {sum(expected.values()):,} rows")
    for table, _, _, holds in TABLES:
        print(f"  {table:<9} {expected.get(table, 0):>10,} rows: id, {holds}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=int, default=1000, help="about how large the data is")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--data", help="where to keep the generated data for the next run; made if missing")
    args = parser.parse_args()
    problems = []
    with tempfile.TemporaryDirectory(prefix="keep-temporary-") as scratch:
        data_path = Path(args.data) if args.data else Path(scratch) / "data.db"
        if not data_path.exists():
            start = time.perf_counter()
            write_data(data_path, args.size_mb)
            print(f"(data written in {time.perf_counter() - start:.0f} s)")
        expected = table_counts_of_file(data_path)
        describe(data_path, expected)
        results = []
        for run in range(args.runs):
            folder = Path(scratch) / f"run{run}"
            try:
                figures = one_run(folder, data_path, expected)
            except Failed as e:
                problems.append(f"run {run + 1}: {e}")
                print(f"run {run + 1}: FAILED: {e}", flush=True)
                continue
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            results.append(figures)
            print(f"run {run + 1}: " + ", ".join(
                f"{name} {figures[name]:.2f}" if unit == "s" else f"{name} {figures[name]:.0f}"
                for name, unit, _ in LABELS
            ), flush=True)
        if results:
            print(f"Median of {len(results)} runs (range), rows of every table checked after each step:")
            for name, unit, label in LABELS:
                values = [figures[name] for figures in results]
                shown = "{:.2f}" if unit == "s" else "{:.0f}"
                print(f"  {label + ':':<62} {shown.format(statistics.median(values)):>7} {unit} "
                      f"({shown.format(min(values))}-{shown.format(max(values))})")
    if problems:
        sys.exit("Some checks failed, so their figures do not count:\n" + "\n".join(problems))


if __name__ == "__main__":
    main()
