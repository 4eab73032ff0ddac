"""Tests of app_support, through datasette.client, real SQLite files and real processes.

Every section of this file opens with a banner, `# ===== ... =====`; grep for
it to list them. The helpers that several sections use come first, in groups:
a Datasette with the plugin; requests and answers; files and databases; large
files; work folders and small disks; the HTTP server for URL tests; the real
server, started as the app starts it; the plugin directory's lists; small
files to import; reading in parts. Then one section per endpoint, in the
order of app_support.ROUTES, each with its happy paths first and its table of
bad inputs after them: startup; authentication, methods and bodies for every
endpoint; /-/auth-app-user; /-/open-database-file;
/-/new-empty-database-file; /-/open-csv-file and /-/import-csv-file; the
import engine itself; /-/open-csv-from-url; the reading options at those
three endpoints, with replacing and appending; /-/preview-import;
/-/import-again; /-/dump-temporary-to-file and
/-/restore-temporary-from-file; GET /-/import-progress; POST
/-/cancel-import; POST /-/refresh-plugin-directory, with the plugin
directory and the welcome section; the pages. The import panel, the plugin
directory, the welcome section and the reading dialog in a real browser
come last.

A helper that only one section uses is in that section, at its start or
beside the tests that use it: the generated CSV and JSON files and their
slow references open the import engine's section, the workbooks LibreOffice
writes open "/-/open-csv-file: Excel workbooks", and the Chromium client
opens the browser's.
"""

import ast
import asyncio
import base64
import bz2
import collections
import contextlib
import csv
import datetime
import decimal
import functools
import gzip
import html
import http.server
import io
import json
import lzma
import math
import os
import pwd
import random
import re
import shutil
import site
import socket
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
import time
import types
import unicodedata
import urllib.request
import uuid
import venv
import zipfile
from pathlib import Path
from xml.etree import ElementTree

import pytest
from datasette.app import Datasette
from datasette.plugins import pm

import app_support

if not pm.is_registered(app_support):
    pm.register(app_support, name="app_support")

TOKEN = "5f1e0c9a7b3d2e4f6a8b0c1d2e3f4a5b"
IS_DATASETTE_1 = not __import__("datasette.version").version.__version__.startswith("0.")


# ===== Helpers: a Datasette with the plugin, and the token the app holds =====


@pytest.fixture(autouse=True)
def api_token(monkeypatch):
    """The token the app gives datasette, in this process's environment."""
    monkeypatch.setenv("DATASETTE_API_TOKEN", TOKEN)


@pytest.fixture(autouse=True)
def home(monkeypatch, tmp_path_factory):
    """A home folder of the test's own, so that no Datasette here finds the user's kept temporary."""
    folder = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(folder))
    return folder


@pytest.fixture
async def ds():
    """A fresh Datasette with the plugin, started up: its temporary database and no _memory."""
    datasette = Datasette(memory=True)
    await datasette.invoke_startup()
    yield datasette


async def with_settings(**settings):
    """A fresh Datasette with these app_support plugin settings."""
    ds = Datasette(memory=True, metadata={"plugins": {"app_support": settings}})
    await ds.invoke_startup()
    return ds


class EventCollector:
    """A plugin that records the events Datasette 1.0 tracks."""

    def __init__(self):
        self.events = []

    @app_support.hookimpl
    def track_event(self, datasette, event):
        self.events.append(event)


@pytest.fixture
def events():
    """The events tracked while the test runs."""
    collector = EventCollector()
    pm.register(collector, name="test_event_collector")
    yield collector.events
    pm.unregister(name="test_event_collector")


# ===== Helpers: requests and answers =====


async def post(ds, path, body, token=TOKEN, headers=None):
    """POST the way the desktop app does: raw JSON, no Content-Type, a Bearer token."""
    all_headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    all_headers.update(headers or {})
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return await ds.client.post(path, content=content, headers=all_headers)


async def root_cookie(ds):
    """Sign in through /-/auth-app-user as the app does; the cookie it sets."""
    response = await post(ds, "/-/auth-app-user", {"redirect": "/"})
    return {"ds_actor": response.cookies["ds_actor"]}


def assert_error(response, status, text):
    """The response is a JSON error with this status, and its message contains text."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    data = response.json()
    assert data["ok"] is False
    assert text in data["error"], data["error"]


async def assert_refused(ds, folder, endpoint, body, status, error, **kwargs):
    """POST, expect a JSON error, and prove nothing changed on disk or in any database."""
    before = (snapshot(folder), user_databases(ds), await tables(ds))
    response = await post(ds, endpoint, body, **kwargs)
    assert_error(response, status, error)
    assert "set-cookie" not in response.headers
    assert (snapshot(folder), user_databases(ds), await tables(ds)) == before
    return response


async def fetch_rows(ds, path):
    """A table's rows as dicts, without the rowid that Datasette 1.0 adds."""
    response = await ds.client.get(path + ".json?_shape=array")
    assert response.status_code == 200, response.text
    return [{k: v for k, v in row.items() if k != "rowid"} for row in response.json()]


async def progress(ds, **kwargs):
    """The imports GET /-/import-progress lists, newest first; with the token unless told otherwise."""
    kwargs.setdefault("headers", {"Authorization": f"Bearer {TOKEN}"})
    response = await ds.client.get("/-/import-progress", **kwargs)
    assert response.status_code == 200, response.text
    return response.json()["imports"]


def page_assets(html):
    """The plugin's script and style tags in a page, and its config."""
    tags = [
        line.strip() for line in html.splitlines()
        if ("app-support" in line or "appSupport" in line) and line.strip().startswith(("<link", "<script"))
    ]
    return tags, page_global(html, "appSupport")


def page_global(html, name):
    """The value a page's script gives window.<name>, or None."""
    if f"window.{name} = " not in html:
        return None
    return json.JSONDecoder().raw_decode(html.split(f"window.{name} = ", 1)[1])[0]


# ===== Helpers: files and databases =====


def user_databases(ds):
    """Attached databases, leaving out _internal (listed there on Datasette 0.65) and the plugin directory."""
    return set(ds.databases) - {"_internal", app_support.PLUGIN_DIRECTORY}


async def tables(ds, database="temporary"):
    return await ds.get_database(database).table_names()


async def rows(ds, database, sql, params=None):
    return [tuple(r) for r in (await ds.get_database(database).execute(sql, params or [])).rows]


def column_types(conn_or_path, table):
    """{column: declared type} of a table, from a connection or a file's path."""
    conn = sqlite3.connect(conn_or_path) if isinstance(conn_or_path, (str, Path)) else conn_or_path
    return {r[1]: r[2] for r in conn.execute(f'pragma table_info("{table}")')}


def assert_none_differ(problems, what):
    """Assert that no generated file or document had a problem; show the first ten that did."""
    found = [problem for problem in problems if problem]
    shown = "\n".join(found[:10])
    assert not found, f"{len(found)} of {len(problems)} {what} differ:\n{shown}"


def stored_table(conn, table):
    """A table's column names, declared types, and rows in rowid order."""
    info = list(conn.execute(f'pragma table_info("{table}")'))
    names = [r[1] for r in info]
    declared = [r[2] for r in info]
    stored = [tuple(r) for r in conn.execute(f'select * from "{table}" order by rowid')]
    return names, declared, stored


def reference_names(keys):
    """Column names for keys: NFC, and a repeat (ignoring case) gets _2, _3."""
    names, seen = [], set()
    for key in keys:
        base = unicodedata.normalize("NFC", key)
        name, suffix = base, 2
        while name.lower() in seen:
            name, suffix = f"{base}_{suffix}", suffix + 1
        seen.add(name.lower())
        names.append(name)
    return names


def make_db(path, table="t", values=(1, 2, 3)):
    """A SQLite file at path with one table of integers."""
    conn = sqlite3.connect(path)
    conn.execute(f'create table "{table}" (id integer)')
    conn.executemany(f'insert into "{table}" values (?)', [(v,) for v in values])
    conn.commit()
    conn.close()
    return path


def cut_short(path, size=None):
    """A database of 20,000 rows cut to size bytes, or to just over half."""
    make_db(path, values=range(20_000))
    with open(path, "r+b") as f:
        f.truncate(size or os.path.getsize(path) // 2 + 100)
    return path


def write(path, content):
    """Write text (as UTF-8) or bytes to path; return path."""
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


def snapshot(folder):
    """Every file below folder with its bytes, to prove nothing changed."""
    return {
        str(p): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()
    }


# ===== Helpers: large files, and imports that take a while =====


def write_big_csv(path, count):
    """A CSV file of count rows of id, name and score."""
    with open(path, "w") as f:
        f.write("id,name,score\n")
        for i in range(count):
            f.write(f"{i},name {i},{i * 1.5}\n")
    return path


async def start_big_import(ds, tmp_path, database, count=1_000_000):
    """Start a CSV import that takes a second or more; return (task, progress item)."""
    if database != "temporary":
        await post(ds, "/-/new-empty-database-file", {"path": str(tmp_path / f"{database}.db")})
    path = write_big_csv(tmp_path / "big.csv", count)
    task = asyncio.ensure_future(post(ds, "/-/import-csv-file", {"path": str(path), "database": database}))
    while not task.done():
        items = await progress(ds)
        if items and items[0]["state"] == "running" and items[0]["rows"]:
            return task, items[0]
        await asyncio.sleep(0.005)
    raise AssertionError("the import finished before it was seen running: " + (await task).text)


# ===== Helpers: work folders and small disks =====


def work_folders(folder=None):
    """This process's staging and download folders in folder, the temp directory by default."""
    prefix = f"{app_support.WORK_FOLDER_PREFIX}{os.getpid()}_"
    folder = folder or app_support.tempfile.gettempdir()
    return sorted(p.name for p in Path(folder).iterdir() if p.name.startswith(prefix))


@pytest.fixture
def temp_dir(tmp_path, monkeypatch):
    """tempfile.gettempdir() as a fresh folder, to see what downloads leave behind."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@pytest.fixture
def small_disk(tmp_path):
    """A tiny file system of its own (tmpfs), so a full disk never touches the real one."""
    mounts = []

    def mount(name="small", size="2m"):
        folder = tmp_path / name
        folder.mkdir()
        if os.geteuid() != 0 or not shutil.which("mount"):
            pytest.skip("a small disk needs root to mount a tmpfs")
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
            capture_output=True, text=True,
        )
        if result.returncode != 0:
            pytest.skip(f"could not mount a tmpfs: {result.stderr.strip()}")
        mounts.append(folder)
        return folder

    yield mount
    for folder in reversed(mounts):
        subprocess.run(["umount", "-l", str(folder)], check=False)


def read_only(folder):
    """Remount a small disk read-only."""
    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)


# ===== Helpers: the HTTP server for URL tests =====


class Handler(http.server.BaseHTTPRequestHandler):
    """Answers GETs from routes: path -> (status, headers, body), or a function of the handler giving one.

    A body may be a function that writes it to the connection, for answers that trickle or never end.
    """

    routes = {}

    def do_GET(self):
        route = self.routes.get(self.path.split("?")[0])
        if route is None:
            self.send_error(404, "Not Found")
            return
        status, headers, body = route(self) if callable(route) else route
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        if body is not None and not callable(body):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if callable(body):
            body(self.wfile)
        elif body:
            self.wfile.write(body)

    def log_message(self, *args):
        pass


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # The plugin hangs up on slow and oversized answers on purpose.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@pytest.fixture
def server():
    """A real HTTP server on 127.0.0.1: (its base URL, the routes it answers, to fill in)."""
    httpd = Server(("127.0.0.1", 0), Handler)
    Handler.routes = {}
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", Handler.routes
    httpd.shutdown()
    httpd.server_close()


CSV_BODY = b"id,name\n1,Cleo\n2,Pancakes\n"


# ===== Helpers: the real server, started as the app starts it =====


def unused_port():
    """A port nothing listens on: bound once to find it, then released."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args):
        return None


class AppServer:
    """A real datasette process, started as the desktop app starts it.

    The plugin is copied alone into a --plugins-dir, and the process gets the
    app's arguments and its whole environment: the token, the secret and the
    default plugins, and no PATH or HOME. Like the app's, it runs from a venv
    in an app folder, folder/.datasette-app/venv, which is where it keeps
    temporary when asked. stop() and then start() again keep the port and
    the secret, as the app's restart does.
    """

    # main.js's serverEnv() and serverArgs(), without --host 0.0.0.0.
    ENVIRONMENT = {
        "DATASETTE_API_TOKEN": TOKEN, "DATASETTE_SECRET": "s" * 64,
        "DATASETTE_DEFAULT_PLUGINS": "datasette datasette-app-support datasette-vega datasette-cluster-map "
        "datasette-pretty-json datasette-edit-schema datasette-configure-fts datasette-leaflet",
    }
    ARGUMENTS = [
        "--version-note", "xyz-for-datasette-app", "--setting", "sql_time_limit_ms", "10000",
        "--setting", "max_returned_rows", "2000", "--setting", "facet_time_limit_ms", "3000",
        "--setting", "max_csv_mb", "0",
    ]

    def __init__(self, folder, settings=None, environment=None):
        """settings: app_support plugin settings, given in a metadata file (-m);
        environment: variables added to the app's."""
        self.folder = folder
        self.plugins_dir = folder / "plugins"
        self.plugins_dir.mkdir(parents=True)
        shutil.copy(app_support.__file__, self.plugins_dir / "app_support.py")
        self.arguments = []
        if settings is not None:
            metadata = folder / "metadata.json"
            metadata.write_text(json.dumps({"plugins": {"app_support": settings}}))
            self.arguments = ["-m", str(metadata)]
        self.environment = {**self.ENVIRONMENT, **(environment or {})}
        self.app_folder = folder / ".datasette-app"
        self.python = app_venv(self.app_folder / "venv")
        self.log = folder / "datasette.log"
        self.port = unused_port()
        self.process = None
        self.cgroup_procs = None  # a cgroup's cgroup.procs file, to start the server in

    def url(self, path=""):
        return f"http://127.0.0.1:{self.port}{path}"

    def start(self):
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [self.python, "-m", "datasette", "--port", str(self.port), *self.ARGUMENTS,
                 "--plugins-dir", str(self.plugins_dir), *self.arguments],
                env=self.environment, stdout=subprocess.DEVNULL, stderr=log,
                preexec_fn=self._join_cgroup if self.cgroup_procs else None,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                urllib.request.urlopen(self.url("/-/versions.json"), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise AssertionError("datasette did not start: " + self.log.read_text(errors="replace"))

    def _join_cgroup(self):
        with open(self.cgroup_procs, "w") as f:
            f.write(str(os.getpid()))

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def page(self, path):
        """A page as the desktop user sees it, signed in through /-/auth-app-user."""
        _, headers, _ = self.call("/-/auth-app-user", {"redirect": path})
        cookie = headers["Set-Cookie"].split(";", 1)[0]
        request = urllib.request.Request(self.url(path), headers={"Cookie": cookie})
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.read().decode("utf-8")

    def call(self, path, body=None, timeout=30):
        """A request as the desktop app makes it, with the token: (status, headers, body); no redirects followed."""
        request = urllib.request.Request(
            self.url(path),
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        try:
            with urllib.request.build_opener(_NoRedirect).open(request, timeout=timeout) as response:
                return response.status, response.headers, response.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read()


def app_venv(folder):
    """A venv at folder, as the app makes ~/.datasette-app/venv, that sees this interpreter's packages; its python."""
    venv.EnvBuilder(symlinks=True).create(folder)
    python = folder / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    # The packages of the venv the tests run in, with their .pth files (an editable install's).
    lines = "".join(f"import site; site.addsitedir({path!r})\n" for path in site.getsitepackages())
    Path(purelib, "test_packages.pth").write_text(lines)
    return str(python)


def server_work_files(server):
    """The files in the work folders of a datasette process this test started."""
    folders = Path(tempfile.gettempdir()).glob(f"{app_support.WORK_FOLDER_PREFIX}{server.process.pid}_*")
    return [path.name for folder in folders for path in folder.glob("*")]


@pytest.fixture
def app_server(tmp_path):
    """A real datasette process started as the app starts it, stopped at the end of the test."""
    server = AppServer(tmp_path / "app")
    server.start()
    yield server
    server.stop()


# ===== Helpers: the plugin directory's lists =====


def refused_download(url):
    """What a download from url says when nothing listens there."""
    return (
        f"Could not download {url}: {urllib.parse.urlsplit(url).netloc} refused the connection: "
        "no web server is answering there. Check the address, and that the server is running."
    )


class ListServer:
    """A real HTTP server on 127.0.0.1 for the plugin list and the example CSVs.

    Its paths are unique to the test, so no other test or run shares its
    lists' copies on disk. stop() takes it offline; start() brings it back
    on the same port.
    """

    def __init__(self):
        self.prefix = "/" + uuid.uuid4().hex
        self.lists = {"plugins": [], "examples": []}
        self.requests = []
        self.port = 0
        self.httpd = None
        self.start()

    def url(self, name):
        return f"http://127.0.0.1:{self.port}{self.prefix}/{name}.json"

    def settings(self):
        return {"plugin_directory_url": self.url("plugins"), "example_csvs_url": self.url("examples")}

    def start(self):
        server = self

        class ListHandler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                name = self.path[len(server.prefix) + 1:].split(".json")[0]
                if not self.path.startswith(server.prefix + "/") or name not in server.lists:
                    self.send_error(404, "Not Found")
                    return
                body = json.dumps(server.lists[name]).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = Server(("127.0.0.1", self.port), ListHandler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self):
        if self.httpd:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None

    def copies(self):
        return list_copies(self.url(name) for name in self.lists)


def list_copies(urls):
    """Where the copies of the lists at urls are kept, by this process and by a server started with no TMPDIR."""
    folders = {os.path.join(folder, app_support.LIST_COPIES_FOLDER) for folder in (tempfile.gettempdir(), "/tmp")}
    return [Path(app_support._list_copy_path(folder, url)) for folder in folders for url in urls]


@pytest.fixture
def lists():
    """A ListServer, stopped at the end of the test, its copies on disk removed."""
    server = ListServer()
    yield server
    server.stop()
    for copy in server.copies():
        copy.unlink(missing_ok=True)


WORDS = ["maps", "charts", "export", "search", "auth", "tables", "images", "graphs", "sql", "yaml", "markdown"]


def generated_plugins(seed=20_2026, count=30):
    """A plugin list like datasette.io's: every fifth plugin's description mentions GeoJSON."""
    rng = random.Random(seed)
    plugins = []
    for i in range(count):
        words = rng.sample(WORDS, 3)
        description = "Plugin for " + " and ".join(words) + (", reads GeoJSON" if i % 5 == 0 else "")
        plugins.append({
            "name": f"datasette-{words[0]}-{i}", "full_name": f"someone/datasette-{words[0]}-{i}",
            "owner": "someone", "description": description, "stargazers_count": rng.randrange(1000),
            "tag_name": f"0.{rng.randrange(20)}", "downloads_this_week": rng.randrange(10_000),
            "latest_release_at": f"2024-{rng.randrange(1, 13):02}-{rng.randrange(1, 29):02}T10:00:00Z",
            "openGraphImageUrl": "https://example.com/image.png", "usesCustomOpenGraphImage": False,
            "topics": ["datasette-plugin", words[0]],
        })
    return plugins


LISTED = [
    {"name": "datasette-fake-old", "tag_name": "0.10", "description": "Installed, and upgradeable", "stargazers_count": 5000},
    {"name": "datasette-fake-default", "tag_name": "1.0a2", "description": "Installed by the app itself", "stargazers_count": 4000},
    {"name": "datasette-cluster-map", "tag_name": "0.18", "description": "Maps in GeoJSON", "stargazers_count": 3000},
]


# ===== Helpers: small files to import: JSON, and workbooks written by hand =====
#
# make_xlsx writes a workbook from its XML parts: the edge cases LibreOffice
# would not write, and the workbooks other endpoints' tests import. The random
# workbooks LibreOffice writes, and their reference, are at the start of
# "/-/open-csv-file: Excel workbooks".


DOGS = [{"id": 1, "name": "Cleo"}, {"id": 2, "name": "Pancakes"}]
DOGS_JSON = json.dumps(DOGS).encode()
DOGS_NDJSON = b"".join(json.dumps(dog).encode() + b"\n" for dog in DOGS)


XLSX_PARTS = {
    "[Content_Types].xml": (
        '<?xml version="1.0" encoding="UTF-8"?><Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
        '<Default Extension="xml" ContentType="application/xml"/></Types>'
    ),
}
XLSX_MAIN = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
XLSX_RELATIONSHIPS = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"


def make_xlsx(path, sheets, strings=(), date1904=False, number_formats=(), styles=(), extra=None, prefix=""):
    """Write a workbook by hand: sheets are (name, sheetData XML); strings the shared strings' text.

    styles are the number format ids of cell styles 1, 2, ... (style 0 is General);
    number_formats are (id, code) pairs of custom formats. prefix writes the
    main namespace with a prefix, as some programs do.
    """
    p = f"{prefix}:" if prefix else ""
    xmlns = f'xmlns{":" + prefix if prefix else ""}="{XLSX_MAIN}"'
    sheet_list = "".join(
        f'<{p}sheet name="{html.escape(name)}" sheetId="{n}" r:id="rId{n}"/>' for n, (name, _) in enumerate(sheets, 1)
    )
    parts = dict(XLSX_PARTS)
    parts["xl/workbook.xml"] = (
        f'<?xml version="1.0" encoding="UTF-8"?><{p}workbook {xmlns} xmlns:r="{XLSX_RELATIONSHIPS}">'
        f'<{p}workbookPr date1904="{"1" if date1904 else "0"}"/><{p}sheets>{sheet_list}</{p}sheets></{p}workbook>'
    )
    relationships = "".join(
        f'<Relationship Id="rId{n}" Type="{XLSX_RELATIONSHIPS}/worksheet" Target="worksheets/sheet{n}.xml"/>'
        for n in range(1, len(sheets) + 1)
    )
    parts["xl/_rels/workbook.xml.rels"] = (
        '<?xml version="1.0" encoding="UTF-8"?><Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
        f"{relationships}</Relationships>"
    )
    formats = "".join(f'<{p}numFmt numFmtId="{n}" formatCode="{html.escape(code)}"/>' for n, code in number_formats)
    xfs = "".join(f'<{p}xf numFmtId="{n}"/>' for n in (0, *styles))
    parts["xl/styles.xml"] = (
        f'<?xml version="1.0" encoding="UTF-8"?><{p}styleSheet {xmlns}><{p}numFmts>{formats}</{p}numFmts>'
        f"<{p}cellXfs>{xfs}</{p}cellXfs></{p}styleSheet>"
    )
    items = "".join(f"<{p}si><{p}t>{html.escape(s)}</{p}t></{p}si>" for s in strings)
    parts["xl/sharedStrings.xml"] = f'<?xml version="1.0" encoding="UTF-8"?><{p}sst {xmlns}>{items}</{p}sst>'
    parts.update(extra or {})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in parts.items():
            archive.writestr(name, content)
        for n, (_, data) in enumerate(sheets, 1):
            # A sheet's data may be an iterable of XML strings, written as they come.
            with archive.open(f"xl/worksheets/sheet{n}.xml", "w") as out:
                out.write(f'<?xml version="1.0" encoding="UTF-8"?><{p}worksheet {xmlns} xmlns:r="{XLSX_RELATIONSHIPS}"><{p}sheetData>'.encode())
                for piece in [data] if isinstance(data, str) else data:
                    out.write(piece.encode())
                out.write(f"</{p}sheetData></{p}worksheet>".encode())
    return path


def large_sheet(count):
    """A sheet of count numbered rows, with a shared string saying whether each is odd, as it is written."""
    yield '<row r="1"><c r="A1" t="inlineStr"><is><t>n</t></is></c><c r="B1" t="inlineStr"><is><t>parity</t></is></c></row>'
    for start in range(2, count + 2, 10_000):
        yield "".join(
            f'<row r="{n}"><c r="A{n}"><v>{n - 2}</v></c><c r="B{n}" t="s"><v>{n % 2}</v></c></row>'
            for n in range(start, min(start + 10_000, count + 2))
        )


def pets_workbook(path):
    dogs = '<row r="1"><c r="A1" t="s"><v>0</v></c></row><row r="2"><c r="A2" t="s"><v>1</v></c></row><row r="3"><c r="A3" t="s"><v>2</v></c></row>'
    cats = '<row r="1"><c r="A1" t="s"><v>0</v></c></row><row r="2"><c r="A2" t="s"><v>3</v></c></row>'
    return make_xlsx(path, [("Dogs", dogs), ("Cats", cats)], ["name", "Cleo", "Pancakes", "Milo"])


# ===== Helpers: reading in parts =====
#
# The in_parts fixture makes the engine read any file in three parts, so that
# small generated files exercise the split points, the helper processes and
# the merging of their types and widths.


def read_in_parts(monkeypatch, parts=3):
    """Read CSV files in parts however small they are: one part here, and parts - 1 helper processes."""
    monkeypatch.setattr(app_support, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(app_support, "_cpu_count", lambda: parts)


@pytest.fixture
def in_parts(monkeypatch):
    """Read CSV files in three parts, however small they are."""
    read_in_parts(monkeypatch)


@pytest.fixture
def helpers(monkeypatch):
    """The helper processes this test's imports start, as they are started."""
    started = []
    start = app_support._Helper.__init__

    def recording_start(self, job):
        start(self, job)
        started.append(self.process)

    monkeypatch.setattr(app_support._Helper, "__init__", recording_start)
    return started


# ===== Startup =====


async def test_startup_adds_temporary_removes_memory_and_is_idempotent(ds, tmp_path):
    csv_path = tmp_path / "keep.csv"
    csv_path.write_text("a\n1\n")
    await post(ds, "/-/open-csv-file", {"path": str(csv_path)})
    temporary = ds.databases["temporary"]
    await ds.invoke_startup()
    app_support.startup(ds)
    # Repeated startups add no temporary_2 and keep the same database and its tables.
    assert user_databases(ds) == {"temporary"}
    assert ds.databases["temporary"] is temporary
    assert temporary.is_mutable and temporary.is_memory
    assert await tables(ds) == ["keep"]


async def test_internal_database_hidden_from_everyone_even_root(ds):
    # Root as /-/auth-app-user signs it in, and the same actor signed here.
    signed_root = {"ds_actor": ds.sign({"a": {"id": "root"}}, "actor")}
    for who in ({}, signed_root, await root_cookie(ds)):
        listing = (await ds.client.get("/-/databases.json", cookies=who)).json()
        listing = listing["databases"] if isinstance(listing, dict) else listing
        if IS_DATASETTE_1:  # 0.65 lists it there, but will not show it
            assert "_internal" not in {d["name"] for d in listing}
        assert "_internal" not in json.dumps((await ds.client.get("/.json", cookies=who)).json())
        assert (await ds.client.get("/_internal", cookies=who)).status_code in (403, 404)


async def test_two_instances_do_not_share_temporary(tmp_path):
    csv_path = tmp_path / "demo.csv"
    csv_path.write_text("a\n1\n")
    first, second = Datasette(memory=True), Datasette(memory=True)
    await first.invoke_startup()
    await second.invoke_startup()
    assert (await post(first, "/-/open-csv-file", {"path": str(csv_path)})).json()["ok"]
    assert await tables(second) == []


async def test_startup_removes_work_folders_of_dead_processes_only(temp_dir):
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        names = {
            "dead": f"app_support_{dead.pid}_x1y2",
            "mine": f"app_support_{os.getpid()}_a1b2",
            "alive": f"app_support_{alive.pid}_c3d4",
            "init": "app_support_1_e5f6",
            "no pid": "app_support_latin1_fallback",
            "other": "someone_else",
        }
        for name in names.values():
            (temp_dir / name).mkdir()
            (temp_dir / name / "staging.db").write_bytes(b"x" * 1000)
        (temp_dir / f"app_support_{dead.pid}_file").write_text("a file, not a work folder")
        ds = Datasette(memory=True)
        await ds.invoke_startup()
    finally:
        alive.kill()
        alive.wait()
    left = {p.name for p in temp_dir.iterdir() if p.name.startswith(("app_support_", "someone"))}
    assert names["dead"] not in left
    assert left == set(names.values()) - {names["dead"]} | {f"app_support_{dead.pid}_file"}


# ===== Authentication, methods and bodies, for every endpoint =====


# The routes only the desktop app may call, with its token.
APP_ENDPOINTS = [route.path for route in app_support.ROUTES if route.caller == app_support.APP]


def good_bodies(tmp_path):
    """A body each app endpoint would accept, naming files made in tmp_path."""
    csv_path = tmp_path / "auth.csv"
    csv_path.write_text("a,b\n1,2\n")
    db_path = make_db(tmp_path / "auth.db")
    return {
        "/-/auth-app-user": {"redirect": "/"},
        "/-/open-database-file": {"path": str(db_path)},
        "/-/new-empty-database-file": {"path": str(tmp_path / "new.db")},
        "/-/open-csv-file": {"path": str(csv_path)},
        "/-/import-csv-file": {"path": str(csv_path), "database": "temporary"},
        "/-/open-csv-from-url": {"url": "http://127.0.0.1:9/x.csv"},
        "/-/dump-temporary-to-file": {"path": str(tmp_path / "dump.db")},
        "/-/restore-temporary-from-file": {"path": str(db_path)},
    }


BAD_AUTH = {
    "no header": None,
    "wrong token": {"Authorization": "Bearer " + "0" * len(TOKEN)},
    "prefix of token": {"Authorization": "Bearer " + TOKEN[:-1]},
    "extension of token": {"Authorization": "Bearer " + TOKEN + "0"},
    "no scheme": {"Authorization": TOKEN},
    "basic scheme": {"Authorization": "Basic " + TOKEN},
    "empty bearer": {"Authorization": "Bearer "},
}


@pytest.mark.parametrize("endpoint", list(APP_ENDPOINTS))
@pytest.mark.parametrize("case", list(BAD_AUTH))
async def test_bad_token_refused_without_side_effects(ds, tmp_path, endpoint, case):
    body = good_bodies(tmp_path)[endpoint]
    await assert_refused(ds, tmp_path, endpoint, body, 401, "API token", token=None, headers=BAD_AUTH[case])


@pytest.mark.parametrize("endpoint", list(APP_ENDPOINTS))
@pytest.mark.parametrize("configured", ["", None])
async def test_no_token_configured_refuses_everything(ds, tmp_path, monkeypatch, endpoint, configured):
    if configured is None:
        monkeypatch.delenv("DATASETTE_API_TOKEN")
    else:
        monkeypatch.setenv("DATASETTE_API_TOKEN", configured)
    body = good_bodies(tmp_path)[endpoint]
    for token in ("", TOKEN):
        await assert_refused(ds, tmp_path, endpoint, body, 401, "DATASETTE_API_TOKEN", token=token)


CROSS_SITE = [
    {"Sec-Fetch-Site": "cross-site"},
    {"Origin": "https://evil.example"},
    {"Sec-Fetch-Site": "same-site", "Origin": "https://sub.localhost"},
]


@pytest.mark.parametrize("endpoint", list(APP_ENDPOINTS))
@pytest.mark.parametrize("headers", CROSS_SITE, ids=["sec-fetch-site", "origin", "same-site"])
async def test_cross_site_browser_post_is_refused_as_json(ds, tmp_path, endpoint, headers):
    body = good_bodies(tmp_path)[endpoint]
    cookie = {"Cookie": "ds_actor=" + ds.sign({"a": {"id": "root"}}, "actor")}
    if IS_DATASETTE_1:  # Datasette's own CSRF check refuses, in JSON
        await assert_refused(ds, tmp_path, endpoint, body, 403, "cross-site", token=None, headers={**cookie, **headers})
        # A stolen token does not help a page whose browser adds the cookie.
        await assert_refused(ds, tmp_path, endpoint, body, 403, "cross-site", headers={**cookie, **headers})
    else:  # 0.65 skips CSRF here (skip_csrf): no token, no entry
        await assert_refused(ds, tmp_path, endpoint, body, 401, "API token", token=None, headers={**cookie, **headers})


async def test_csrf_does_not_turn_cookie_requests_into_html(ds):
    # A browser with a ds_actor cookie and no Bearer token still gets JSON.
    response = await ds.client.post(
        "/-/open-csv-file", content=b"{}", cookies={"ds_actor": "x", "ds_csrftoken": "y"}
    )
    assert_error(response, 401, "API token")


@pytest.mark.parametrize("endpoint", list(APP_ENDPOINTS))
async def test_get_is_405_json(ds, endpoint):
    response = await ds.client.get(endpoint, headers={"Authorization": f"Bearer {TOKEN}"})
    assert_error(response, 405, "POST")


BAD_BODIES = [
    (b"", "empty"),
    (b"   ", "empty"),
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b'"path"', "must be a JSON object"),
    (b'{"path": 5}', "path must be a string"),
    (b'{"path": ["a"]}', "path must be a string"),
    (b'{"path": "/x", "nope": 1}', "The request has a key this endpoint does not take: nope. It takes path"),
]


@pytest.mark.parametrize("endpoint", [e for e in APP_ENDPOINTS if e != "/-/auth-app-user" and e != "/-/open-csv-from-url"])
@pytest.mark.parametrize("body,error", BAD_BODIES)
async def test_bad_bodies_are_400(ds, tmp_path, endpoint, body, error):
    await assert_refused(ds, tmp_path, endpoint, body, 400, error)


# The keys each endpoint takes, as its refusals of a missing or unknown key say them.
READING = ", encoding, delimiter, quoting, header, skip_lines, types, sheet, json_path and if_exists."
KEYS_TAKEN = {
    "/-/auth-app-user": "It takes only redirect, which is optional.",
    "/-/open-database-file": "It takes path.",
    "/-/new-empty-database-file": "It takes path.",
    "/-/open-csv-file": "It takes path, and optionally table_name, detect_types" + READING,
    "/-/import-csv-file": "It takes path and database, and optionally table_name, detect_types" + READING,
    "/-/open-csv-from-url": "It takes url, and optionally table_name, database, detect_types" + READING,
    "/-/preview-import": "It takes only path, url, table_name" + READING.replace(".", ", which are all optional."),
    "/-/import-again": "It takes id, and optionally encoding, delimiter, quoting, header, skip_lines, types, sheet and json_path.",
    "/-/dump-temporary-to-file": "It takes path.",
    "/-/restore-temporary-from-file": "It takes path.",
    "/-/keep-temporary": "It takes keep.",
    "/-/cancel-import": "It takes id.",
    "/-/refresh-plugin-directory": "It takes no keys: send {}.",
}


@pytest.mark.parametrize("endpoint", list(KEYS_TAKEN))
async def test_unknown_key_is_a_sentence_listing_the_keys_taken(ds, tmp_path, endpoint):
    assert {route.path for route in app_support.ROUTES if route.method == "POST"} == set(KEYS_TAKEN)
    response = await assert_refused(ds, tmp_path, endpoint, {"nope": 1}, 400, "")
    assert response.json()["error"] == "The request has a key this endpoint does not take: nope. " + KEYS_TAKEN[endpoint]


LONG = "a" * 300_000


@pytest.mark.parametrize(
    "endpoint,body,status,error",
    [
        ("/-/open-csv-file", b'{"path": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "nested too deeply"),
        ("/-/open-csv-file", b"[" * 100_000, 400, "nested too deeply"),
        ("/-/open-csv-file", lambda: b'{"path": "' + b"x" * 100_000_000 + b'"}', 413, "larger than 2 MB"),
        ("/-/open-csv-file", {"path": "/" + LONG}, 400, "File not found: /aaa"),
        ("/-/open-csv-from-url", {"url": "ftp://" + LONG}, 400, "Only http:// and https://"),
        ("/-/open-csv-from-url", {"url": "http://127.0.0.1:9/" + LONG}, 400, "Could not download"),
        ("/-/open-csv-file", {"path": "/tmp/\ud800.csv"}, 400, "path contains a lone surrogate"),
        ("/-/dump-temporary-to-file", {"path": "/tmp/\udfff.db"}, 400, "path contains a lone surrogate"),
        ("/-/open-csv-from-url", {"url": "http://127.0.0.1:9/x.csv", "table_name": "a\ud800"}, 400, "table_name contains a lone surrogate"),
        ("/-/import-csv-file", {"path": "/tmp/x.csv", "database": "\ud800"}, 400, "database contains a lone surrogate"),
        ("/-/open-csv-from-url", {"url": "http://127.0.0.1:9/x.csv", "table_name": "x\u0000y"}, 400, "table_name must not contain a NUL character."),
    ],
    ids=["deep object", "deep array", "100 MB body", "long path", "long url", "long http url",
         "surrogate path", "surrogate dump path", "surrogate table name", "surrogate database", "NUL table name"],
)
async def test_hostile_bodies_are_short_json_sentences(ds, tmp_path, endpoint, body, status, error):
    if callable(body):
        body = body()  # built here, not held for the whole session
    if isinstance(body, dict):
        body = json.dumps(body).encode()  # ensure_ascii: lone surrogates as \ud800 escapes
    response = await assert_refused(ds, tmp_path, endpoint, body, status, error)
    assert len(response.content) < 1000
    if len(body) > 300_000 and status == 400:
        assert "…" in response.json()["error"]


async def test_content_type_is_ignored(ds, tmp_path):
    csv_path = tmp_path / "ct.csv"
    csv_path.write_text("a\n1\n")
    response = await post(
        ds, "/-/open-csv-file", {"path": str(csv_path)},
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.json()["ok"] is True


def module_messages():
    """Each string literal of app_support.py as a pattern: where an f-string or a format template puts a value, any text.

    Literals with fewer than six characters of their own are left out: they
    would match almost anything.
    """
    patterns = set()
    for node in ast.walk(ast.parse(Path(app_support.__file__).read_text())):
        if isinstance(node, ast.JoinedStr):
            own = [part.value for part in node.values if isinstance(part, ast.Constant)]
            pieces = [re.escape(p.value) if isinstance(p, ast.Constant) else "(.+?)" for p in node.values]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            own, pieces = [node.value], [re.escape(node.value)]
        else:
            continue
        if len("".join(own)) >= 6:
            # A str.format template's fields ({need}, {}) are values too.
            patterns.add(re.sub(r"\\\{[a-z_]*\\\}", "(.+?)", "".join(pieces)))
    return [re.compile(pattern, re.S) for pattern in patterns]


def readme_messages():
    """The sentences the README and docs/how-it-reads.md quote in backticks: what the plugin says, with examples for its values."""
    here = Path(__file__).parent
    text = "\n".join((here / name).read_text() for name in ("README.md", "docs/how-it-reads.md"))
    spans = re.findall(r"`([^`\n]+)`", text)
    return sorted({
        span for span in spans
        if re.match(r"[A-Z…]|[a-z_]+ must", span) and span.count(" ") >= 2
        and (span.endswith(".") or ": " in span) and not re.search(r"[{}=$]", span)
    })


def said_by_the_module(message, patterns, parts=2):
    """Whether message is one of the module's messages, or two of them end to end (as "{damaged}: {why}" builds)."""
    if any(pattern.fullmatch(message) for pattern in patterns):
        return True
    return parts > 1 and any(
        any(pattern.fullmatch(message[:cut]) for pattern in patterns)
        and said_by_the_module(message[cut:], patterns, parts - 1)
        for cut in range(1, len(message))
    )


def test_every_message_the_readme_quotes_is_the_modules():
    messages = readme_messages()
    assert len(messages) >= 50, messages  # the README's error lists are all still found
    patterns = module_messages()
    assert [message for message in messages if not said_by_the_module(message, patterns)] == []


def test_the_modules_contents_list_names_every_section_as_headed():
    source = Path(app_support.__file__).read_text()
    banners = re.findall(r"^# ===== (.+) =====$", source, re.M)
    contents = app_support.__doc__.split("Contents.")[1].split("Where is")[0]
    listed = [re.split(r"\s{2,}", line.strip())[0] for line in contents.splitlines()[3:] if line.strip()]
    assert len(banners) > 20 and listed == banners


# A test plugin (a module, as Datasette 0.65 expects): a route with a real bug.
async def broken(datasette, data):
    return {"ok": True, "value": data["missing"]}


faulty_route = types.ModuleType("test_faulty_route")
faulty_route.register_routes = app_support.hookimpl(
    lambda: [(r"^/-/test-broken$", app_support._view([app_support.Route("/-/test-broken", "POST", app_support.APP, broken)]))]
)


async def test_genuine_server_fault_is_500_json():
    pm.register(faulty_route, name="test_faulty_route")
    try:
        ds = Datasette(memory=True)
        await ds.invoke_startup()
        response = await post(ds, "/-/test-broken", {})
    finally:
        pm.unregister(name="test_faulty_route")
    assert_error(response, 500, "Unexpected server error: KeyError: 'missing'")
    assert "Traceback" not in response.text


# ===== /-/auth-app-user =====


async def test_auth_app_user_sets_root_cookie_and_redirects(ds):
    response = await post(ds, "/-/auth-app-user", {"redirect": "/temporary?sql=select+1"})
    assert response.status_code == 302
    assert response.headers["location"] == "/temporary?sql=select+1"
    cookie = response.headers["set-cookie"]
    assert "httponly" in cookie.lower() and "samesite=lax" in cookie.lower()
    value = response.cookies["ds_actor"]
    assert ds.unsign(value, "actor") == {"a": {"id": "root"}}
    actor = await ds.client.get("/-/actor.json", cookies={"ds_actor": value})
    assert actor.json()["actor"] == {"id": "root"}


@pytest.mark.parametrize(
    "redirect",
    ["//evil.example", "/\\evil.example", "https://evil.example/", "javascript:alert(1)",
     "", None, "evil", "/\t/evil.example", "/ok\r\nSet-Cookie: x=1"],
)
async def test_auth_app_user_only_follows_same_site_paths(ds, redirect):
    response = await post(ds, "/-/auth-app-user", {"redirect": redirect})
    assert response.status_code == 302
    assert response.headers["location"] == "/"


async def test_auth_app_user_without_redirect_key(ds):
    response = await post(ds, "/-/auth-app-user", {})
    assert response.status_code == 302 and response.headers["location"] == "/"


@pytest.mark.parametrize("body,error", [(b"", "empty"), (b"[]", "JSON object"), (b'{"redirect": 3}', "redirect must be a string")])
async def test_auth_app_user_bad_bodies(ds, body, error):
    response = await post(ds, "/-/auth-app-user", body)
    assert_error(response, 400, error)
    assert "set-cookie" not in response.headers


# ===== /-/open-database-file =====


async def test_open_database_file(ds, tmp_path):
    path = make_db(tmp_path / "my data.db")
    response = await post(ds, "/-/open-database-file", {"path": str(path)})
    assert response.json() == {"ok": True, "path": ds.urls.database("my data")}
    assert await fetch_rows(ds, response.json()["path"] + "/t") == [{"id": 1}, {"id": 2}, {"id": 3}]


async def test_open_database_file_same_name_different_folders(ds, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = make_db(tmp_path / "a" / "data.db", values=[1])
    second = make_db(tmp_path / "b" / "data.db", values=[2])
    r1 = (await post(ds, "/-/open-database-file", {"path": str(first)})).json()
    r2 = (await post(ds, "/-/open-database-file", {"path": str(second)})).json()
    assert r1["path"] != r2["path"]
    for result, value in ((r1, 1), (r2, 2)):
        assert await fetch_rows(ds, result["path"] + "/t") == [{"id": value}]


@pytest.mark.parametrize("name", ["it's.db", 'say "hi".db', "sp ace.db", "semi;colon.db"])
async def test_open_database_file_awkward_names(ds, tmp_path, name):
    path = make_db(tmp_path / name, values=[42])
    response = await post(ds, "/-/open-database-file", {"path": str(path)})
    assert response.json()["ok"] is True
    assert await fetch_rows(ds, response.json()["path"] + "/t") == [{"id": 42}]


@pytest.mark.parametrize(
    "setup,error",
    [
        (lambda p: p / "missing.db", "File not found"),
        (lambda p: p, "folder, not a file"),
        (lambda p: write(p / "zero.db", b""), "File is empty"),
        (lambda p: write(p / "text.db", "hello, world\n" * 10), "Not a SQLite database"),
        (lambda p: write(p / "fake.db", b"SQLite format 3\x00" + b"\x01" * 200), "Not a valid SQLite database"),
        (lambda p: make_db(p / "a?b.db"), "contains ?"),
        (lambda p: make_db(p / "a#b.db"), "contains #"),
        (lambda p: make_db(p / "100%.db"), "contains %"),
        (lambda p: p / "a?b.db", "File not found"),
        (lambda p: cut_short(p / "cut.db", 5000), "is cut short (it holds 5,000 of its "),
        (lambda p: "data.db", "path must be a full path, such as /Users/me/data.csv, not data.db"),
        (lambda p: "../data.db", "a relative path would be looked for in the server's own working folder"),
        (lambda p: "~/no-such-folder-for-app-support/x.db", "File not found: {home}/no-such-folder-for-app-support/x.db"),
    ],
    ids=["missing", "folder", "empty", "text", "fake header", "?", "#", "%", "missing ?", "cut short", "relative", "parent", "home"],
)
async def test_open_database_file_errors(ds, tmp_path, setup, error, home):
    path = setup(tmp_path)
    error = error.replace("{home}", str(home))  # "~" is the test's own home folder
    # The snapshot proves no file "a" is created for "a?b.db".
    await assert_refused(ds, tmp_path, "/-/open-database-file", {"path": str(path)}, 400, error)


def _locked(tmp_path):
    path = make_db(tmp_path / "locked.db")
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("pragma locking_mode = exclusive")
    holder.execute("begin exclusive")
    holder.execute("insert into t values (9)")
    return path, holder


async def test_open_database_file_locked(ds, tmp_path):
    path, holder = _locked(tmp_path)
    try:
        response = await post(ds, "/-/open-database-file", {"path": str(path)})
        assert_error(response, 400, "locked")
    finally:
        holder.close()
    assert user_databases(ds) == {"temporary"}


async def test_open_database_file_already_open_even_through_symlink(ds, tmp_path):
    path = make_db(tmp_path / "real.db")
    link = tmp_path / "link.db"
    link.symlink_to(path)
    assert (await post(ds, "/-/open-database-file", {"path": str(path)})).json()["ok"]
    for again in (path, link):
        response = await post(ds, "/-/open-database-file", {"path": str(again)})
        assert_error(response, 400, "already open")
    assert user_databases(ds) == {"temporary", "real"}


# ===== /-/new-empty-database-file =====


async def test_new_empty_database_file(ds, tmp_path):
    path = tmp_path / "fresh.db"
    response = await post(ds, "/-/new-empty-database-file", {"path": str(path)})
    assert response.json() == {"ok": True, "path": "/fresh"}
    assert path.read_bytes().startswith(b"SQLite format 3\x00")
    assert (await ds.client.get("/fresh")).status_code == 200
    # Reopening the file after a restart must pass open-database-file's checks.
    app_support._check_sqlite_file(str(path))


@pytest.mark.parametrize(
    "setup,error",
    [
        (lambda p: make_db(p / "exists.db"), "File already exists"),
        (lambda p: write(p / "notes.txt", "keep me"), "File already exists"),
        (lambda p: p / "no-such-folder" / "x.db", "Folder not found"),
        (lambda p: p, "folder, not a file"),
        (lambda p: p / "a?b.db", "contains ?"),
    ],
)
async def test_new_empty_database_file_errors(ds, tmp_path, setup, error):
    path = setup(tmp_path)
    await assert_refused(ds, tmp_path, "/-/new-empty-database-file", {"path": str(path)}, 400, error)


# ===== /-/open-csv-file and /-/import-csv-file =====


async def import_bytes(ds, tmp_path, content, name="data.csv", **options):
    """Import content through /-/open-csv-file: (answer, {column: type}, stored rows)."""
    path = tmp_path / name
    path.write_bytes(content)
    response = await post(ds, "/-/open-csv-file", {"path": str(path), **options})
    assert response.status_code == 200, response.text
    table = response.json()["path"].split("/")[-1]
    db = ds.get_database("temporary")
    types = await db.execute_fn(lambda conn: column_types(conn, table))
    stored = await rows(ds, "temporary", f'select * from "{table}"')
    return response.json(), types, stored


def _columns(count):
    """A CSV header line of count columns: c0,c1,..."""
    return ",".join(f"c{i}" for i in range(count)).encode() + b"\n"


async def test_open_csv_file(ds, tmp_path):
    path = tmp_path / "demo.csv"
    path.write_text("name,age\nCleo,5\nPancakes,4\n")
    response = await post(ds, "/-/open-csv-file", {"path": str(path)})
    assert response.json() == {"ok": True, "path": "/temporary/demo", "rows": 2, "format": "csv"}
    assert await fetch_rows(ds, "/temporary/demo") == [
        {"name": "Cleo", "age": 5},
        {"name": "Pancakes", "age": 4},
    ]


async def test_open_csv_file_never_writes_into_existing_table(ds, tmp_path):
    path = tmp_path / "demo.csv"
    path.write_text("a\n1\n")
    paths = [(await post(ds, "/-/open-csv-file", {"path": str(path)})).json()["path"] for _ in range(3)]
    assert paths == ["/temporary/demo", "/temporary/demo_2", "/temporary/demo_3"]
    for table in ("demo", "demo_2", "demo_3"):
        assert await rows(ds, "temporary", f"select a from {table}") == [(1,)]


async def test_import_csv_file_into_named_database(ds, tmp_path):
    db_path = make_db(tmp_path / "target.db", table="people")
    await post(ds, "/-/open-database-file", {"path": str(db_path)})
    csv_path = tmp_path / "people.csv"
    csv_path.write_text("name\nAlex\n")
    response = await post(ds, "/-/import-csv-file", {"path": str(csv_path), "database": "target"})
    assert response.json() == {"ok": True, "path": "/target/people_2", "rows": 1, "format": "csv"}
    assert (await ds.client.get("/target/people_2")).status_code == 200
    assert sqlite3.connect(db_path).execute("select name from people_2").fetchall() == [("Alex",)]
    assert sqlite3.connect(db_path).execute("select count(*) from people").fetchone() == (3,)


async def test_open_csv_file_null_optional_key(ds, tmp_path):
    csv_path = tmp_path / "n.csv"
    csv_path.write_text("a\n01\n")
    response = await post(ds, "/-/open-csv-file", {"path": str(csv_path), "detect_types": None})
    assert response.json()["ok"] is True


@pytest.mark.parametrize(
    "body,error",
    [
        ({"database": "nope"}, "Database not found: nope"),
        ({"database": None}, "The request has no database, which this endpoint needs. " + KEYS_TAKEN["/-/import-csv-file"]),
        ({}, "The request has no database, which this endpoint needs. " + KEYS_TAKEN["/-/import-csv-file"]),
        ({"database": "immutable"}, "read-only"),
        ({"database": "temporary", "path": "/no/such/file.csv"}, "File not found"),
        ({"database": "temporary", "detect_types": "yes"}, "detect_types must be a boolean"),
    ],
)
async def test_import_csv_file_errors(tmp_path, body, error):
    immutable = make_db(tmp_path / "immutable.db")
    ds = Datasette([], immutables=[str(immutable)])
    await ds.invoke_startup()
    csv_path = tmp_path / "x.csv"
    csv_path.write_text("a\n1\n")
    body = {"path": str(csv_path), **body}
    await assert_refused(ds, tmp_path, "/-/import-csv-file", body, 400, error)


BAD_FILES = [
    ("empty", b"", "File is empty"),
    ("only blank lines", b"\n\n  \n", "File is empty"),
    ("binary", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4, "binary file"),
    ("a folder", None, "folder"),
    ("NUL byte in a row of the first batch", b"a,b\n1,2\n" + b"x" * 9000 + b"\n3,\x004\n", "NUL byte on line 4"),
    ("NUL byte alone in the first batch", b"a,b\n1,2\n" + b"x" * 9000 + b"\n\x00\n", "NUL byte on line 4"),
    ("NUL byte late in the file", b"a,b\n" + b"1,2\n" * 7000 + b"3,\x004\n", "line 7002"),
    # Inconsistent read without quotes too (the comma), so the quote is not merely stray.
    ("quote never closed, opened on line 2", b'a,b\n1,"oops, no\n3,4\n5,6\n7,8\n', r"\bline 2\b"),
    ("quote never closed, opened after the first batch", b"a,b\n" + b"1,2\n" * 7000 + b'3,"oops, no\n' + b"5,6\n" * 10, r"\bline 7,?002\b"),
    ("more than 2,000 columns", _columns(2001) + b",".join([b"1"] * 2001) + b"\n", r"\b2,?000\b"),
    ("a row past 2,000 columns in the first batch", b"a,b\n1,2\n" + b",".join([b"1"] * 2001) + b"\n", r"\b2,?000\b"),
    ("a row past 2,000 columns after the first batch", b"a,b\n" + b"1,2\n" * 7000 + b",".join([b"1"] * 2001) + b"\n", r"\b2,?000\b"),
]


@pytest.mark.parametrize("name,content,error", BAD_FILES, ids=[b[0] for b in BAD_FILES])
async def test_csv_bad_files_refused_with_a_clear_400(ds, tmp_path, name, content, error):
    """Both endpoints refuse the file with a sentence (error is a pattern), and leave every database as it was."""
    target = make_db(tmp_path / "target.db", table="keep")
    await post(ds, "/-/open-database-file", {"path": str(target)})
    path = tmp_path if content is None else write(tmp_path / "bad.csv", content)
    for endpoint, body in [
        ("/-/open-csv-file", {"path": str(path)}),
        ("/-/import-csv-file", {"path": str(path), "database": "target"}),
    ]:
        response = await assert_refused(ds, tmp_path, endpoint, body, 400, "")
        assert re.search(error, response.json()["error"]), response.json()["error"]
        assert await tables(ds) == [] and await tables(ds, "target") == ["keep"]
    assert sqlite3.connect(target).execute("select count(*) from keep").fetchone() == (3,)


# ===== /-/open-csv-file: encodings, delimiters and line endings =====


ENCODINGS = [
    ("utf-8", "São Paulo,Zürich\n".encode("utf-8"), "São Paulo"),
    ("utf-8 with BOM", b"\xef\xbb\xbf" + "city\nSão Paulo\n".encode("utf-8"), "city"),
    ("latin-1", b"city\nS\xe3o Paulo\n", "São Paulo"),
    ("cp1252 quotes", b"q\n\x93hi\x94 \x80\n", "\u201chi\u201d \u20ac"),
    ("cp1252 undefined byte", b"q\nA\x81B\n", "A\x81B"),
    ("utf-16", "city\nSão Paulo\n".encode("utf-16"), "São Paulo"),
    ("utf-8 then latin-1 late", b"city\n" + b"plain\n" * 20000 + b"S\xe3o\n", "São"),
]


@pytest.mark.parametrize("name,content,expected", ENCODINGS, ids=[e[0] for e in ENCODINGS])
async def test_csv_encodings(ds, tmp_path, name, content, expected):
    result, types, stored = await import_bytes(ds, tmp_path, content)
    flat = [c for row in stored for c in row] + list(types)
    assert expected in flat


JAPANESE_PROSE = ["鬱蒼とした森の奥に佇む祠", "蝋燭の灯りが揺らめいている", "新型のiPhoneを購入しました", "明日は雨が降るでしょう",
                  "吾輩は猫である", "どこで生れたかとんと見当がつかぬ", "Windows10へ更新します", "ｶﾀｶﾅの品名", "第２四半期の売上"]
WESTERN_CAPITALS = ["ÀÉÎÕÜ", "ÉTÉ À PARIS", "ÜBER GRÖßE", "SEÑOR ÑANDÚ", "ÇA VA", "ÅRHUS ØST", "Ærø", "façade Noël"]


@pytest.mark.parametrize("seed", range(4))
def test_csv_japanese_prose_in_cp932_is_read_as_written_and_western_text_never_is(tmp_path, seed):
    rng = random.Random(seed)
    for words, encoding in [(JAPANESE_PROSE, "cp932"), (WESTERN_CAPITALS, "cp1252")]:
        rows = [["id", "note", "memo"]] + [[str(i), rng.choice(words), " ".join(rng.sample(words, 2))] for i in range(rng.randint(1, 40))]
        text = written(rows, lineterminator="\r\n")  # as Excel saves it
        _, names, _, stored = import_text_in(tmp_path / f"{encoding}.csv", text, encoding)
        assert [names] + [[str(v) for v in row] for row in stored] == rows, encoding


def import_text_in(path, text, encoding):
    """import_text, with the text written in encoding."""
    path.write_bytes(text.encode(encoding))
    conn = sqlite3.connect(":memory:", isolation_level=None)
    try:
        (result,) = app_support.import_file(conn, str(path), "t", detect_types=False)
        return (result.answer, *stored_table(conn, result.table))
    finally:
        conn.close()


async def test_csv_bom_is_stripped_from_first_column(ds, tmp_path):
    _, types, _ = await import_bytes(ds, tmp_path, b"\xef\xbb\xbfid,name\n1,a\n")
    assert list(types) == ["id", "name"]


TRUNCATED_UTF8 = [
    ("small", "city\nSão Paulo\nZürich 東".encode()[:-1], [("São Paulo",), ("Zürich \ufffd",)]),
    (
        "past the sniffed start",
        ("city\n" + "São Paulo\n" * 20000 + "Zürich 東").encode()[:-2],
        [("São Paulo",)] * 20000 + [("Zürich \ufffd",)],
    ),
]


@pytest.mark.parametrize("name,content,expected", TRUNCATED_UTF8, ids=[t[0] for t in TRUNCATED_UTF8])
async def test_csv_utf8_with_a_truncated_last_character(ds, tmp_path, name, content, expected):
    result, types, stored = await import_bytes(ds, tmp_path, content)
    assert list(types) == ["city"]
    assert stored == expected


DELIMITERS = [
    ("comma", b"a,b\n1,2\n", ["a", "b"]),
    ("tab in a .csv", b"a\tb\n1\t2\n", ["a", "b"]),
    ("semicolon with decimal commas", b"a;b\n1,5;2\n", ["a", "b"]),
    ("pipe", b"a|b|c\n1|2|3\n", ["a", "b", "c"]),
    ("single column", b"name\nalice\nbob\n", ["name"]),
    ("single column with commas in values", b"name\nSmith, John\nDoe, Jane\n", ["name"]),
    ("single column of letters", b"word\nthe\nstreet\n", ["word"]),
]


@pytest.mark.parametrize("name,content,columns", DELIMITERS, ids=[d[0] for d in DELIMITERS])
async def test_csv_delimiters(ds, tmp_path, name, content, columns):
    _, types, stored = await import_bytes(ds, tmp_path, content)
    assert list(types) == columns
    assert all(len(row) == len(columns) for row in stored)


LINE_ENDING_FILES = [
    ("CR only", b"a,b\r1,x\r3,y\r"),
    ("CR only, no final newline", b"a,b\r1,x\r3,y"),
    ("mixed CR, LF and CRLF", b"a,b\r\n1,x\r3,y\n"),
    ("mixed, tab-separated", b"a\tb\r1\tx\n3\ty\r\n"),
    ("CR only with a quoted CR", b'a,b\r1,x\r3,"y"\r'),
]


@pytest.mark.parametrize("name,content", LINE_ENDING_FILES, ids=[f[0] for f in LINE_ENDING_FILES])
async def test_csv_cr_and_mixed_line_endings(ds, tmp_path, name, content):
    _, types, stored = await import_bytes(ds, tmp_path, content)
    assert types == {"a": "INTEGER", "b": "TEXT"}
    assert stored == [(1, "x"), (3, "y")]


async def test_csv_quoted_newlines_doubled_quotes_and_huge_fields(ds, tmp_path):
    big = "x" * 300_000
    content = f'a,b\n"line one\nline two","say ""hi"""\n"{big}",2\n'.encode()
    _, _, stored = await import_bytes(ds, tmp_path, content)
    assert stored == [("line one\nline two", 'say "hi"'), (big, "2")]


@pytest.mark.parametrize("blank", [b"\n" * 20_000, b"\r\n" * 10_000, b" \n" * 10_000])
async def test_csv_long_run_of_blank_lines_before_the_header(ds, tmp_path, blank):
    _, types, stored = await import_bytes(ds, tmp_path, blank + b"a,b\n1,x\n")
    assert types == {"a": "INTEGER", "b": "TEXT"}
    assert stored == [(1, "x")]


# ===== /-/open-csv-file: column names, row widths and table names =====


HEADERS = [
    ("duplicates and blanks", b"a,a,,b, a \n1,2,3,4,5\n", ["a", "a_2", "column_3", "b", "a_3"]),
    ("case-insensitive duplicates", b"Name,name\n1,2\n", ["Name", "name_2"]),
    ("whitespace stripped", b"  x  ,\ty\t\n1,2\n", ["x", "y"]),
    ("suffix already taken", b"a,a_2,a\n1,2,3\n", ["a", "a_2", "a_3"]),
    ("SQL in names", b'"x""];drop table t;--",\'q\'\n1,2\n', ['x"];drop table t;--', "'q'"]),
]


@pytest.mark.parametrize("name,content,columns", HEADERS, ids=[h[0] for h in HEADERS])
async def test_csv_headers(ds, tmp_path, name, content, columns):
    _, types, _ = await import_bytes(ds, tmp_path, content)
    assert list(types) == columns


async def test_csv_header_only_gives_empty_table(ds, tmp_path):
    result, types, stored = await import_bytes(ds, tmp_path, b"a,b\n")
    assert result["rows"] == 0 and stored == [] and list(types) == ["a", "b"]
    assert (await ds.client.get(result["path"])).status_code == 200


RAGGED = [
    ("short rows padded with NULL", b"a,b,c\n1,2\n3\n", ["a", "b", "c"], [(1, 2, None), (3, None, None)]),
    ("long row keeps extras", b"a,b\n1,2\n3,4,5,6\n", ["a", "b", "column_3", "column_4"], [(1, 2, None, None), (3, 4, 5, 6)]),
    ("long row after the first batch", b"a,b\n" + b"1,2\n" * 6000 + b"3,4,x\n", ["a", "b", "column_3"], None),
    ("blank lines skipped", b"a,b\n1,2\n\n3,4\n", ["a", "b"], [(1, 2), (3, 4)]),
]


@pytest.mark.parametrize("name,content,columns,expected", RAGGED, ids=[r[0] for r in RAGGED])
async def test_csv_ragged_rows(ds, tmp_path, name, content, columns, expected):
    result, types, stored = await import_bytes(ds, tmp_path, content)
    assert list(types) == columns
    if expected is not None:
        assert stored == expected
    else:
        assert result["rows"] == 6001
        assert stored[-1] == (3, 4, "x")
        assert stored[0] == (1, 2, None)


async def test_csv_two_thousand_columns_import(ds, tmp_path):
    result, types, stored = await import_bytes(ds, tmp_path, _columns(2000) + b",".join([b"1"] * 2000) + b"\n")
    assert len(types) == 2000 and stored == [(1,) * 2000]


@pytest.mark.parametrize(
    "wanted",
    ["demo]", 'de"mo', "de'mo", "x; drop table y", "sqlite_master", "[weird]", "名前"],
)
async def test_csv_table_names_are_safe(ds, tmp_path, wanted):
    path = tmp_path / f"{wanted}.csv"
    path.write_text("a\n1\n")
    response = (await post(ds, "/-/open-csv-file", {"path": str(path)})).json()
    assert response["ok"] is True
    assert await fetch_rows(ds, response["path"]) == [{"a": 1}]
    names = await tables(ds)
    assert len(names) == 1 and names[0].lstrip("_") == wanted.replace("]", "_")
    assert (await ds.client.get("/temporary")).status_code == 200


async def test_csv_nfd_file_name_gives_nfc_table_name(ds, tmp_path):
    nfd = "cafe\u0301"
    assert unicodedata.normalize("NFC", nfd) == "café" != nfd
    path = write(tmp_path / (nfd + ".csv"), b"a\n1\n")
    response = await post(ds, "/-/open-csv-file", {"path": str(path)})
    assert response.json()["ok"] is True
    names = await tables(ds)
    assert names == ["café"], ascii(names)
    assert await rows(ds, "temporary", 'select a from "café"') == [(1,)]


async def test_csv_nfc_and_nfd_file_names_give_two_distinct_nfc_tables(ds, tmp_path):
    for folder, name in [("nfc", "café.csv"), ("nfd", "cafe\u0301.csv")]:
        (tmp_path / folder).mkdir()
        path = write(tmp_path / folder / name, b"a\n1\n")
        assert (await post(ds, "/-/open-csv-file", {"path": str(path)})).json()["ok"]
    names = sorted(await tables(ds))
    assert names == ["café", "café_2"], ascii(names)


# ===== /-/open-csv-file: column types =====


TYPES = [
    ("integers", b"n\n1\n-20\n300\n", "INTEGER", [1, -20, 300]),
    ("reals", b"n\n1.5\n-2\n.25\n", "REAL", [1.5, -2.0, 0.25]),
    ("empty cells are NULL in numbers", b"n,m\n1,1.5\n,\n3,\n", "INTEGER", [1, None, 3]),
    ("leading zeros stay text", b"zip\n02134\n10001\n", "TEXT", ["02134", "10001"]),
    ("zero alone is a number", b"n\n0\n10\n", "INTEGER", [0, 10]),
    ("leading zero before a decimal point", b"n\n0.5\n10.25\n", "REAL", [0.5, 10.25]),
    ("words and numbers mixed", b"n\n1\nN/A\n", "TEXT", ["1", "N/A"]),
    ("minus zero is text", b"n\n-0\n5\n", "TEXT", ["-0", "5"]),
    ("explicit plus sign is text", b"n\n+5\n6\n", "TEXT", ["+5", "6"]),
    ("surrounding spaces are text", b"n\n 5\n6\n", "TEXT", [" 5", "6"]),
    ("exponent is text", b"n\n1e5\n6\n", "TEXT", ["1e5", "6"]),
    ("two dots is text", b"n\n1.2.3\n6\n", "TEXT", ["1.2.3", "6"]),
    ("hyphenated is text", b"n\n1-2\n6\n", "TEXT", ["1-2", "6"]),
    ("lone minus is text", b"n\n-\n6\n", "TEXT", ["-", "6"]),
    ("too big for 64 bits is text", b"n\n12345678901234567890\n1\n", "TEXT", ["12345678901234567890", "1"]),
    ("eighteen digits is an integer", b"n\n123456789012345678\n", "INTEGER", [123456789012345678]),
    ("more digits than a double holds is text", b"n\n101004116451.80003357\n1.5\n", "TEXT", ["101004116451.80003357", "1.5"]),
    ("reals are the nearest double", b"n\n0.337006\n-151.3907387\n-77.179786\n", "REAL", [0.337006, -151.3907387, -77.179786]),
    ("quoted newline between digits is text", b'n\n"1\n2"\n3\n', "TEXT", ["1\n2", "3"]),
    ("all empty is text", b"n,m\n,1\n,2\n", "TEXT", ["", ""]),
    ("ints then reals after the first batch", b"n\n" + b"7\n" * 6000 + b"7.5\n", "REAL", None),
    ("numbers then a word after the first batch", b"n\n" + b"7\n" * 6000 + b"oops\n", "TEXT", None),
    ("numbers then leading zero after the first batch", b"n\n" + b"7\n" * 6000 + b"007\n", "TEXT", None),
]


@pytest.mark.parametrize("name,content,declared,values", TYPES, ids=[t[0] for t in TYPES])
async def test_csv_types(ds, tmp_path, name, content, declared, values):
    _, types, stored = await import_bytes(ds, tmp_path, content)
    assert list(types.values())[0] == declared
    column = [row[0] for row in stored]
    if values is not None:
        assert column == values
    else:
        assert len(column) == 6001
        last = content.rsplit(b"\n", 2)[-2].decode()
        assert str(column[-1]) == last
        assert column[0] == (7.0 if declared == "REAL" else "7")


async def test_csv_repeated_zeros_stay_integer(ds, tmp_path):
    _, types, stored = await import_bytes(ds, tmp_path, b"flag,count,x\n1,0,0.0\n0,0,0.0\n0,5,1.5\n")
    assert types == {"flag": "INTEGER", "count": "INTEGER", "x": "REAL"}
    assert stored == [(1, 0, 0.0), (0, 0, 0.0), (0, 5, 1.5)]


@pytest.mark.parametrize("endpoint", ["/-/open-csv-file", "/-/import-csv-file"])
async def test_csv_types_change_after_the_first_batch_of_a_large_file(ds, tmp_path, endpoint):
    """Large enough that the staging database spills to disk before the change."""
    await post(ds, "/-/new-empty-database-file", {"path": str(tmp_path / "target.db")})
    path = tmp_path / "late.csv"
    count = 150_000
    with open(path, "w") as f:
        f.write("id,count,score,name\n")
        for i in range(count):
            f.write(f"{i},{i % 7},{i * 3},name {i}\n")
        f.write(f"{count},2.5,many,last\n")
    body = {"path": str(path), **({"database": "target"} if "import" in endpoint else {})}
    response = await post(ds, endpoint, body)
    assert response.status_code == 200, response.text
    assert response.json()["rows"] == count + 1
    database = response.json()["path"].split("/")[1]
    db = ds.get_database(database)
    types = await db.execute_fn(lambda conn: column_types(conn, "late"))
    assert types == {"id": "INTEGER", "count": "REAL", "score": "TEXT", "name": "TEXT"}
    first_last = await rows(ds, database, "select * from late where id in (0, 1, ?) order by id", [count])
    assert first_last == [(0, 0.0, "0", "name 0"), (1, 1.0, "3", "name 1"), (count, 2.5, "many", "last")]


async def test_csv_detect_types_false_keeps_text(ds, tmp_path):
    _, types, stored = await import_bytes(ds, tmp_path, b"n,x\n1,2.5\n", detect_types=False)
    assert types == {"n": "TEXT", "x": "TEXT"}
    assert stored == [("1", "2.5")]


# ===== /-/open-csv-file: JSON, NDJSON and GeoJSON =====


JSON_SHAPES = [
    ("array", "dogs.json", DOGS_JSON, "json", None),
    ("ndjson with a blank line", "dogs.ndjson", DOGS_NDJSON.replace(b"\n", b"\n\n", 1), "ndjson", None),
    ("ndjson named .csv", "dogs.csv", DOGS_NDJSON, "ndjson", None),
    ("object holding the array", "dogs.json", b'{"meta": {"next": null}, "results": ' + DOGS_JSON + b"}", "json", "results"),
    ("largest array deeper down", "dogs.json",
     b'{"page": {"items": ' + DOGS_JSON + b'}, "links": [{"href": "/next"}]}', "json", "page.items"),
    ("array after a BOM and blank lines", "dogs.txt", b"\xef\xbb\xbf\n\n  " + DOGS_JSON, "json", None),
]


@pytest.mark.parametrize("name,filename,content,fmt,json_path", JSON_SHAPES, ids=[s[0] for s in JSON_SHAPES])
async def test_open_csv_file_json_shapes(ds, tmp_path, name, filename, content, fmt, json_path):
    path = write(tmp_path / filename, content)
    response = await post(ds, "/-/open-csv-file", {"path": str(path)})
    expected = {"ok": True, "path": "/temporary/dogs", "rows": 2, "format": fmt}
    if json_path:
        expected["json_path"] = json_path
    assert response.json() == expected
    assert await rows(ds, "temporary", "select id, name from dogs") == [(1, "Cleo"), (2, "Pancakes")]
    types = await ds.get_database("temporary").execute_fn(lambda conn: column_types(conn, "dogs"))
    assert types == {"id": "INTEGER", "name": "TEXT"}


async def test_open_csv_file_geojson(ds, tmp_path):
    collection = {
        "type": "FeatureCollection",
        "features": [
            {"type": "Feature", "id": "a1", "properties": {"name": "Cleo", "id": 7},
             "geometry": {"type": "Point", "coordinates": [-122.4, 37.8]}},
            {"type": "Feature", "properties": {"name": "Pancakes", "legs": 4}, "geometry": None},
        ],
    }
    path = write(tmp_path / "places.geojson", json.dumps(collection))
    response = await post(ds, "/-/open-csv-file", {"path": str(path)})
    assert response.json() == {"ok": True, "path": "/temporary/places", "rows": 2, "format": "geojson"}
    types = await ds.get_database("temporary").execute_fn(lambda conn: column_types(conn, "places"))
    assert types == {"id": "TEXT", "name": "TEXT", "id_2": "INTEGER", "geometry": "TEXT", "legs": "INTEGER"}
    assert await rows(ds, "temporary", "select * from places") == [
        ("a1", "Cleo", 7, '{"type":"Point","coordinates":[-122.4,37.8]}', None),
        (None, "Pancakes", None, None, 4),
    ]
    # Geometry is JSON that SQLite's json functions read.
    assert await rows(ds, "temporary", "select json_extract(geometry, '$.coordinates[0]') from places") == [(-122.4,), (None,)]


async def test_open_csv_file_json_values_keep_their_types(ds, tmp_path):
    items = [
        {"zip": "02134", "n": 1, "x": 0.1, "big": 2**63 - 1, "huge": 1, "flag": True, "tags": ["a", "é"], "when": None},
        {"zip": "12", "n": -2, "x": 1e300, "big": -(2**63), "huge": 10**30, "flag": False, "tags": {"k": [1, 2.5]}},
    ]
    path = write(tmp_path / "values.json", json.dumps(items, ensure_ascii=True))
    assert (await post(ds, "/-/open-csv-file", {"path": str(path)})).json()["rows"] == 2
    types = await ds.get_database("temporary").execute_fn(lambda conn: column_types(conn, "values"))
    assert types == {
        "zip": "TEXT", "n": "INTEGER", "x": "REAL", "big": "INTEGER", "huge": "TEXT", "flag": "INTEGER",
        "tags": "TEXT", "when": "TEXT",
    }
    assert await rows(ds, "temporary", 'select * from "values"') == [
        ("02134", 1, 0.1, 2**63 - 1, "1", 1, '["a","é"]', None),
        ("12", -2, 1e300, -(2**63), "1" + "0" * 30, 0, '{"k":[1,2.5]}', None),
    ]


@pytest.mark.parametrize("shape", ["array", "ndjson"])
async def test_open_csv_file_json_in_utf16_reads_as_its_bom_says(ds, tmp_path, shape):
    # The CSV reader's text, BOM and NUL handling serve JSON too: UTF-16 is
    # full of NUL bytes that are not binary.
    items = [{"name": "Zoë", "city": "東京", "n": i} for i in range(3)]
    text = json.dumps(items, ensure_ascii=False) if shape == "array" else "\n".join(map(json.dumps, items)) + "\n"
    path = tmp_path / "wide.json"
    path.write_bytes(text.encode("utf-16"))
    answer = (await post(ds, "/-/open-csv-file", {"path": str(path)})).json()
    assert answer == {"ok": True, "path": "/temporary/wide", "rows": 3, "format": "json" if shape == "array" else "ndjson"}
    assert await rows(ds, "temporary", "select name, city, n from wide") == [tuple(item.values()) for item in items]


def too_many_keys():
    return json.dumps([{f"k{i}": i for i in range(2001)}])


JSON_REFUSED = [
    ("array of numbers", "dogs.json", "[1, 2, 3]", "dogs.json holds an array of numbers, which cannot be imported as a table. JSON can be imported when it is an array of objects"),
    ("array of arrays", "dogs.json", "[[1, 2], [3, 4]]", "holds an array of arrays"),
    ("object with no array of objects", "dogs.json", '{"name": "Cleo", "tags": [1, 2]}', "holds an object with no array of objects in it"),
    ("empty array", "dogs.json", "[]", "dogs.json holds an empty JSON array: there is nothing to import."),
    ("invalid JSON", "dogs.json", '[{"a": 1},\n{"a": 2},\n{"a": 3 "b": 4}]', "dogs.json is not valid JSON: line 3, column 9: Expecting ',' delimiter."),
    ("cut short", "dogs.json", '[{"a": 1},\n{"a": 2', "dogs.json is not valid JSON: line 2"),
    ("trailing comma", "dogs.json", '[{"a": 1},\n{"a": 2},\n]', "dogs.json is not valid JSON: line 3, column 1: Expecting value."),
    ("an item that is not an object", "dogs.json", '[{"a": 1},\n2]', "dogs.json: the array holds a number on line 2, not an object."),
    ("an NDJSON line that is not an object", "dogs.ndjson", '{"a": 1}\n{"a": 2}\n[3]\n', "dogs.ndjson: line 3 holds an array, not an object."),
    # Deep in a file, where lines of objects are decoded many at a time.
    ("an item that is not an object, line 700", "dogs.json", "[" + ",\n".join(['{"a": 1}'] * 699 + ["null"] + ['{"a": 1}'] * 300) + "]", "dogs.json: the array holds a null on line 700, not an object."),
    ("an NDJSON line that is not an object, line 700", "dogs.ndjson", "\n".join(['{"a": 1}'] * 699 + ['"x"'] + ['{"a": 1}'] * 300), "dogs.ndjson: line 700 holds a string, not an object."),
    ("more than 2,000 keys", "wide.json", too_many_keys(), "wide.json has more than 2,000 different keys"),
    ("a web page", "dogs.json", "<!DOCTYPE html>\n<html><body>Dogs</body></html>", "dogs.json is a web page (HTML), not CSV, TSV or JSON data."),
    ("a web page after a BOM", "page.csv", "\ufeff\n  <html lang='en'><head></head></html>", "page.csv is a web page (HTML)"),
    ("an XML document", "dogs.csv", '<?xml version="1.0"?>\n<dogs/>', "dogs.csv is an XML document, not CSV, TSV or JSON data."),
    # A file that is one JSON scalar holds no table.
    ("a null", "value.json", "null", "value.json holds a single JSON null, which cannot be imported as a table. JSON can be imported when it is an array of objects"),
    ("a boolean", "value.json", "\ufeff true\n", "value.json holds a single JSON boolean, which cannot"),
    ("a number", "value.json", "-12.5e3", "value.json holds a single JSON number, which cannot"),
    ("a string", "value.json", '"text with, a comma"', "value.json holds a single JSON string, which cannot"),
]


@pytest.mark.parametrize("name,filename,content,error", JSON_REFUSED, ids=[r[0] for r in JSON_REFUSED])
async def test_open_csv_file_refuses_json_it_cannot_import(ds, tmp_path, name, filename, content, error):
    write(tmp_path / filename, content)
    await post(ds, "/-/new-empty-database-file", {"path": str(tmp_path / "target.db")})
    for endpoint, body in [
        ("/-/open-csv-file", {"path": str(tmp_path / filename)}),
        ("/-/import-csv-file", {"path": str(tmp_path / filename), "database": "target"}),
    ]:
        await assert_refused(ds, tmp_path, endpoint, body, 400, error)
        assert await tables(ds, "target") == []
    assert work_folders() == []


def bracketed_rows(seed, count=200):
    """Rows whose cells look like JSON arrays, as DuckDB's test files have: [248.128.0.120], [a], []."""
    rng = random.Random(seed)
    cell = lambda: rng.choice([
        lambda: "[" + ".".join(str(rng.randrange(256)) for _ in range(4)) + "]",
        lambda: "[" + rng.choice(["note", "true", "null", "1, 2", '"x"', ""]) + "]",
        lambda: str(rng.randrange(1000)),
        lambda: rng.choice(["alpha", "beta, gamma", 'say "hi"']),
    ])()
    return [[cell() for _ in range(3)] for _ in range(count)]


@pytest.mark.parametrize("seed", range(6))
async def test_open_csv_file_reads_csv_that_only_looks_like_json_as_csv(ds, tmp_path, seed):
    rows_written = bracketed_rows(seed)
    # Its first line begins as a JSON array would.
    first = ["[248.128.0.120]", "[note]", "[true]", "[null]", "[]", "[0.5.1]"][seed]
    rows_written[0][0] = first
    with open(tmp_path / "ips.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows_written)
    response = await post(ds, "/-/open-csv-file", {"path": str(tmp_path / "ips.csv"), "detect_types": False})
    assert response.json()["format"] == "csv", response.text
    with open(tmp_path / "ips.csv", newline="") as f:
        expected = list(csv.reader(f))
    stored = await rows(ds, "temporary", f'select * from "{response.json()["path"].split("/")[-1]}"')
    assert [list(row) for row in stored] == expected[1:]


async def test_import_csv_file_json_into_a_file_database(ds, tmp_path):
    await post(ds, "/-/new-empty-database-file", {"path": str(tmp_path / "target.db")})
    path = write(tmp_path / "dogs.ndjson", DOGS_NDJSON)
    response = await post(ds, "/-/import-csv-file", {"path": str(path), "database": "target", "detect_types": False})
    assert response.json() == {"ok": True, "path": "/target/dogs", "rows": 2, "format": "ndjson"}
    conn = sqlite3.connect(tmp_path / "target.db")
    assert conn.execute("select id, name from dogs").fetchall() == [("1", "Cleo"), ("2", "Pancakes")]
    assert column_types(conn, "dogs") == {"id": "TEXT", "name": "TEXT"}


# ===== /-/open-csv-file: Excel workbooks =====


# Helpers: workbooks, written by LibreOffice and by hand
#
# Random workbooks, from a fixed seed, are written as flat OpenDocument
# (.fods) and saved as .xlsx by LibreOffice, a real spreadsheet program;
# LibreOffice's own CSV export of each sheet is then the oracle for every
# cell the engine stores. Edge cases LibreOffice would not write, or writes
# its own way, are built by hand from their XML parts, by make_xlsx in the
# helpers at the top.

SOFFICE = shutil.which("soffice")
needs_libreoffice = pytest.mark.skipif(
    not SOFFICE and not os.environ.get("CI"),
    reason="needs LibreOffice (apt-get install libreoffice-calc-nogui); with CI set, its absence fails instead",
)
XLSX_SEED = 21_2026
XLSX_WORKBOOKS = 12
LO_CSV_EXPORT = "csv:Text - txt - csv (StarCalc):44,34,76,1,,0,false,true,false,false,false,-1"


def libreoffice(folder, *arguments):
    """Run LibreOffice headless, with a profile of its own in folder, as this test's own process."""
    if not SOFFICE:
        pytest.fail("CI is set, so the workbook tests must run, but LibreOffice is not installed")
    profile = Path(folder) / "libreoffice-profile"
    result = subprocess.run(
        [SOFFICE, f"-env:UserInstallation=file://{profile}", "--headless", *map(str, arguments)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HOME": str(folder)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


FODS_START = """<?xml version="1.0" encoding="UTF-8"?>
<office:document xmlns:office="urn:oasis:names:tc:opendocument:xmlns:office:1.0"
 xmlns:table="urn:oasis:names:tc:opendocument:xmlns:table:1.0" xmlns:text="urn:oasis:names:tc:opendocument:xmlns:text:1.0"
 xmlns:style="urn:oasis:names:tc:opendocument:xmlns:style:1.0" xmlns:number="urn:oasis:names:tc:opendocument:xmlns:datastyle:1.0"
 xmlns:fo="urn:oasis:names:tc:opendocument:xmlns:xsl-fo-compatible:1.0" xmlns:of="urn:oasis:names:tc:opendocument:xmlns:of:1.2"
 office:version="1.2" office:mimetype="application/vnd.oasis.opendocument.spreadsheet">
<office:automatic-styles>
 <number:date-style style:name="D"><number:year number:style="long"/><number:text>-</number:text><number:month number:style="long"/><number:text>-</number:text><number:day number:style="long"/></number:date-style>
 <number:date-style style:name="DT"><number:year number:style="long"/><number:text>-</number:text><number:month number:style="long"/><number:text>-</number:text><number:day number:style="long"/><number:text> </number:text><number:hours number:style="long"/><number:text>:</number:text><number:minutes number:style="long"/><number:text>:</number:text><number:seconds number:style="long"/></number:date-style>
 <number:time-style style:name="T"><number:hours number:style="long"/><number:text>:</number:text><number:minutes number:style="long"/><number:text>:</number:text><number:seconds number:style="long"/></number:time-style>
 <style:style style:name="date" style:family="table-cell" style:data-style-name="D"/>
 <style:style style:name="datetime" style:family="table-cell" style:data-style-name="DT"/>
 <style:style style:name="time" style:family="table-cell" style:data-style-name="T"/>
 <style:style style:name="bold" style:family="text"><style:text-properties fo:font-weight="bold"/></style:style>
</office:automatic-styles>
<office:body><office:spreadsheet>
"""
FODS_END = "</office:spreadsheet></office:body></office:document>\n"
XLSX_WORDS = ["Cleo", "Pancakes & co", 'say "hi"', "<tag>", "naïve café", "東京", "02134", "12", "1e5", " padded ", "TRUE"]
XLSX_SHEET_NAMES = ["Dogs", "Cats 2024", "Ünïcode", "data & notes", "Sheet1"]


def fods_cell(rng, kind, row_number):
    """One cell of a column of the given kind, as flat OpenDocument XML."""
    if rng.random() < 0.1:
        return "<table:table-cell/>"  # a gap
    if kind == "int":
        value = rng.randint(-10**9, 10**9)
        return f'<table:table-cell office:value-type="float" office:value="{value}"/>'
    if kind == "decimal":
        value = rng.choice([round(rng.uniform(-10**5, 10**5), rng.randint(1, 4)), rng.randint(0, 99)])
        return f'<table:table-cell office:value-type="float" office:value="{value!r}"/>'
    if kind == "text":
        word = html.escape(rng.choice(XLSX_WORDS), quote=False)
        if rng.random() < 0.2:  # rich text: two runs
            return f'<table:table-cell office:value-type="string"><text:p>{word}<text:span text:style-name="bold">!</text:span></text:p></table:table-cell>'
        return f'<table:table-cell office:value-type="string"><text:p>{word}</text:p></table:table-cell>'
    if kind == "bool":
        value = rng.choice(["true", "false"])
        return f'<table:table-cell office:value-type="boolean" office:boolean-value="{value}"/>'
    if kind in ("date", "datetime"):
        moment = datetime.datetime(1900, 3, 1) + datetime.timedelta(seconds=rng.randint(0, 200 * 365 * 86400))
        value = moment.date().isoformat() if kind == "date" else moment.isoformat()
        return f'<table:table-cell table:style-name="{kind}" office:value-type="date" office:date-value="{value}"/>'
    if kind == "time":
        seconds = rng.randint(0, 86399)
        value = f"PT{seconds // 3600:02d}H{seconds // 60 % 60:02d}M{seconds % 60:02d}S"
        return f'<table:table-cell table:style-name="time" office:value-type="time" office:time-value="{value}"/>'
    if kind == "formula":
        choice = rng.random()
        if choice < 0.5:
            return f'<table:table-cell table:formula="of:={rng.randint(1, 99)}*{rng.randint(1, 99)}" office:value-type="float" office:value="0"/>'
        if choice < 0.7:
            return '<table:table-cell table:formula="of:=&quot;a&quot;&amp;&quot;b&quot;" office:value-type="string" office:string-value=""/>'
        return f'<table:table-cell table:formula="of:={rng.choice(["1/0", "NA()"])}"/>'
    raise ValueError(kind)


def random_fods(seed, index):
    """A random workbook as flat OpenDocument text, and the parameters that made it."""
    rng = random.Random(f"{seed}:{index}")
    names = rng.sample(XLSX_SHEET_NAMES, rng.randint(1, 4))
    params = {"seed": seed, "index": index, "sheets": []}
    tables = []
    for name in names:
        if rng.random() < 0.15:
            params["sheets"].append((name, "empty"))
            tables.append(f'<table:table table:name="{html.escape(name)}"><table:table-row><table:table-cell/></table:table-row></table:table>')
            continue
        kinds = [rng.choice(["int", "decimal", "text", "bool", "date", "datetime", "time", "formula", "int", "text"]) for _ in range(rng.randint(1, 7))]
        above, left = rng.choice([0, 0, 0, 2]), rng.choice([0, 0, 1])
        rows = ["<table:table-row><table:table-cell/></table:table-row>"] * above
        blank = "<table:table-cell/>" * left
        header = "".join(f'<table:table-cell office:value-type="string"><text:p>col {i}</text:p></table:table-cell>' for i in range(len(kinds)))
        rows.append(f"<table:table-row>{blank}{header}</table:table-row>")
        for number in range(rng.choice([0, 1, 3, 10, 40])):
            if rng.random() < 0.05:
                rows.append("<table:table-row><table:table-cell/></table:table-row>")  # an empty row between
            cells = "".join(fods_cell(rng, kind, number) for kind in kinds)
            rows.append(f"<table:table-row>{blank}{cells}</table:table-row>")
        params["sheets"].append((name, kinds, above, left))
        tables.append(f'<table:table table:name="{html.escape(name)}">{"".join(rows)}</table:table>')
    return FODS_START + "".join(tables) + FODS_END, params


def libreoffice_sheets(folder, workbook):
    """LibreOffice's CSV export of each sheet of the workbook: {sheet name: rows}."""
    out = Path(folder) / f"{workbook.stem}-csv"
    libreoffice(folder, "--convert-to", LO_CSV_EXPORT, "--outdir", out, workbook)
    sheets = {}
    for path in out.glob("*.csv"):
        with open(path, newline="", encoding="utf-8") as f:
            sheets[path.stem[len(workbook.stem) + 1 :]] = list(csv.reader(f))
    return sheets


LO_ERRORS = {"#DIV/0!", "#N/A", "#VALUE!", "#NAME?", "#REF!", "#NUM!", "#NULL!"}


def libreoffice_cell(text):
    """A cell as LibreOffice's CSV export shows it, in the form the engine stores it as text."""
    if text in LO_ERRORS or text.startswith("Err:"):
        return ""
    clock = re.fullmatch(r"(\d\d):(\d\d):(\d\d) (AM|PM)", text)
    if clock:  # LibreOffice shows a time read back from .xlsx on a 12-hour clock
        hour = int(clock[1]) % 12 + (12 if clock[4] == "PM" else 0)
        return f"{hour:02d}:{clock[2]}:{clock[3]}"
    return text


def stored_cell(value):
    """A stored value as the text LibreOffice's CSV export shows for it."""
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value).removesuffix(".0") if value.is_integer() else repr(value)
    return str(value)


def same_number(value, text):
    try:
        return isinstance(value, (int, float)) and float(text) == value
    except ValueError:
        return False


def same_moment(got, shown):
    """Whether two ISO 8601 dates or times are the same to a second.

    A time is stored as a fraction of a day, so 12:11:07 comes back as
    12:11:06.99999...; the engine rounds that to the nearest second, where
    LibreOffice's CSV export cuts it off.
    """
    for form in ("%Y-%m-%d %H:%M:%S", "%H:%M:%S"):
        try:
            difference = datetime.datetime.strptime(got, form) - datetime.datetime.strptime(shown, form)
        except ValueError:
            continue
        return abs(difference.total_seconds()) <= 1
    return False


def reference_xlsx_type(values):
    """A column's declared type by the rule, value by value: whole numbers INTEGER, any other number REAL."""
    kinds = {"INTEGER" if isinstance(v, int) else "REAL" if isinstance(v, float) else "TEXT" for v in values if v is not None}
    return next((kind for kind in ("TEXT", "REAL", "INTEGER") if kind in kinds), "TEXT")


def compare_with_libreoffice(where, lo_rows, names, declared, stored):
    """The first difference between a stored sheet and LibreOffice's export of it, or None."""
    while lo_rows and not any(lo_rows[0]):
        lo_rows = lo_rows[1:]  # empty rows above the header
    while lo_rows and not any(lo_rows[-1]):
        lo_rows = lo_rows[:-1]
    header = [libreoffice_cell(cell) for cell in lo_rows[0]]
    width = max(map(len, lo_rows))
    if names != reference_names([name or f"column_{n}" for n, name in enumerate(header + [""] * (width - len(header)), 1)]):
        return f"{where}: columns {names} (LibreOffice: {header})"
    if len(stored) != len(lo_rows) - 1:
        return f"{where}: {len(stored)} rows (LibreOffice: {len(lo_rows) - 1})"
    for number, (row, lo_row) in enumerate(zip(stored, lo_rows[1:]), 1):
        lo_row = [libreoffice_cell(cell) for cell in lo_row] + [""] * (len(row) - len(lo_row))
        got = [stored_cell(value) for value in row]
        for got_cell, lo_cell, value in zip(got, lo_row, row):
            if not (got_cell == lo_cell or same_number(value, lo_cell) or same_moment(got_cell, lo_cell)):
                return f"{where}: row {number} stored {row!r} (LibreOffice: {lo_row!r})"
    for column, kind in enumerate(declared):
        expected = reference_xlsx_type([row[column] for row in stored])
        if kind != expected:
            return f"{where}: column {names[column]} declared {kind} (the rule: {expected})"
    return None


def reference_sheet_rows(sheet_xml, strings, date_styles=None, date1904=False):
    """The rows of a worksheet's XML as ElementTree reads them, value by value: the slow reference
    for the engine's pattern-cut reading. Rows are lists, gaps None, trailing gaps left out."""
    root = ElementTree.fromstring(sheet_xml)
    local = lambda element: element.tag.rpartition("}")[2]  # noqa: E731
    data = next(child for child in root if local(child) == "sheetData")
    rows, expected = [], 1
    for row in data:
        number = int(row.get("r") or expected)
        rows.extend([] for _ in range(expected, number))
        expected = number + 1
        cells, column = [], -1
        for cell in row:
            kind, style = cell.get("t", "n"), cell.get("s")
            # A cell without a reference follows the cell before it, empty or not.
            reference = cell.get("r")
            column = app_support._column_number(reference.rstrip("0123456789").encode()) if reference else column + 1
            if kind == "inlineStr":
                item = next((child for child in cell if local(child) == "is"), None)
                value = "" if item is None else "".join(
                    text.text or "" for part in item if local(part) in ("t", "r")
                    for text in ([part] if local(part) == "t" else [t for t in part if local(t) == "t"])
                )
                value = re.sub(r"_x([0-9A-Fa-f]{4})_", lambda m: chr(int(m.group(1), 16)), value)
            else:
                text = next((child.text for child in cell if local(child) == "v"), None)
                if not text or kind == "e":
                    continue
                if kind == "s":
                    value = strings[int(text)]
                elif kind == "b":
                    value = text == "1"
                elif kind in ("str", "d"):
                    value = re.sub(r"_x([0-9A-Fa-f]{4})_", lambda m: chr(int(m.group(1), 16)), text)
                elif (date_styles or {}).get(style):
                    value = app_support._excel_date(float(text), date_styles[style], date1904)
                else:
                    number = float(text)
                    value = int(number) if number.is_integer() and abs(number) < 2**63 else number
            cells.extend([None] * (column + 1 - len(cells)))
            cells[column] = value
        while cells and cells[-1] is None:
            cells.pop()
        rows.append(cells)
    return rows


def random_sheet_xml(rng, strings):
    """Random worksheet XML in the ways programs write it: prefixes, attribute orders, quotes,
    formulas, inline and rich strings, gaps, and rows and cells without references."""
    prefix = rng.choice(["", "", "x:"])
    quote = rng.choice(['"', '"', "'"])
    rows = []
    number = 0
    for _ in range(rng.randint(1, 25)):
        step = rng.choice([1, 1, 1, 2, 5])
        number += step
        cells, column = [], 0
        for _ in range(rng.randint(0, 8)):
            column += rng.choice([1, 1, 1, 2])
            letters = ""
            n = column
            while n:
                n, rest = divmod(n - 1, 26)
                letters = chr(65 + rest) + letters
            attributes = {"r": f"{letters}{number}"} if rng.random() < 0.9 else {}
            kind = rng.choice(["n", "n", "s", "b", "e", "str", "inlineStr", "none", "d"])
            if rng.random() < 0.3:
                attributes["s"] = str(rng.randint(0, 3))
            inner = ""
            if kind == "n":
                value = rng.choice([str(rng.randint(-10**6, 10**6)), repr(rng.uniform(-1e6, 1e6)), "3.0", "1E+20", "-0", "4.2000000000000002"])
                inner = f"<{prefix}v>{value}</{prefix}v>"
                if rng.random() < 0.5:
                    attributes["t"] = "n"
            elif kind == "s":
                attributes["t"] = "s"
                inner = f"<{prefix}v>{rng.randrange(len(strings))}</{prefix}v>"
            elif kind == "b":
                attributes["t"] = "b"
                inner = f"<{prefix}v>{rng.choice('01')}</{prefix}v>"
            elif kind == "e":
                attributes["t"] = "e"
                inner = f"<{prefix}v>{rng.choice(['#N/A', '#DIV/0!'])}</{prefix}v>"
            elif kind == "str":
                attributes["t"] = "str"
                text = html.escape(rng.choice(XLSX_WORDS + ["line_x000D_break", "a &amp; b"]), quote=False)
                text = rng.choice([text, text, "two\r\nlines", "old\rMac", "kept&#13;CR", "nul_x0000_here"])
                inner = f"<{prefix}f>A1&amp;B1</{prefix}f><{prefix}v>{text}</{prefix}v>"
            elif kind == "d":
                attributes["t"] = "d"
                inner = f"<{prefix}v>2024-03-01T14:30:00</{prefix}v>"
            elif kind == "inlineStr":
                attributes["t"] = "inlineStr"
                words = [html.escape(rng.choice(XLSX_WORDS), quote=False) for _ in range(rng.randint(1, 3))]
                # Text as programs other than Excel write it: CR LF kept, CDATA, entities.
                words = [rng.choice([w, w, w, "a\r\nb", "c\rd", "<![CDATA[x < y & z]]>", "<![CDATA[a]]>&amp;b", "e&#xD;f", "_x0000_"]) for w in words]
                if len(words) == 1 and rng.random() < 0.5:
                    inner = f"<{prefix}is><{prefix}t>{words[0]}</{prefix}t></{prefix}is>"
                else:
                    runs = "".join(f"<{prefix}r><{prefix}rPr><{prefix}b/></{prefix}rPr><{prefix}t xml:space={quote}preserve{quote}>{w}</{prefix}t></{prefix}r>" for w in words)
                    phonetic = f"<{prefix}rPh sb=\"0\" eb=\"1\"><{prefix}t>ふりがな</{prefix}t></{prefix}rPh>" if rng.random() < 0.3 else ""
                    inner = f"<{prefix}is>{runs}{phonetic}</{prefix}is>"
            order = list(attributes.items())
            if rng.random() < 0.2:
                rng.shuffle(order)
            attrs = "".join(f" {k}={quote}{v}{quote}" for k, v in order)
            if rng.random() < 0.1:
                attrs += f' cm={quote}1{quote}'
            if inner:
                cells.append(f"<{prefix}c{attrs}>{inner}</{prefix}c>")
            else:
                cells.append(f"<{prefix}c{attrs}/>")
        # A row without r is the one after the row before it.
        row_attributes = "" if step == 1 and rng.random() < 0.15 else f" r={quote}{number}{quote}"
        row_attributes += ' spans="1:8" ht="12.8"' if rng.random() < 0.5 else ""
        rows.append(f"<{prefix}row{row_attributes}>{''.join(cells)}</{prefix}row>" if cells else f"<{prefix}row{row_attributes}/>")
    return prefix, "".join(rows)


@needs_libreoffice
async def test_open_csv_file_matches_libreoffice_on_generated_workbooks(ds, tmp_path):
    books = tmp_path / "books"
    books.mkdir()
    made = []
    for index in range(XLSX_WORKBOOKS):
        text, params = random_fods(XLSX_SEED, index)
        (books / f"book{index}.fods").write_text(text, encoding="utf-8")
        made.append(params)
    # LibreOffice saves every workbook as .xlsx, then exports each sheet of each as CSV.
    libreoffice(tmp_path, "--convert-to", "xlsx", "--outdir", tmp_path / "xlsx", *sorted(books.glob("*.fods")))
    libreoffice(tmp_path, "--convert-to", LO_CSV_EXPORT, "--outdir", tmp_path / "csv", *sorted((tmp_path / "xlsx").glob("*.xlsx")))
    db = ds.get_database("temporary")
    problems = []
    for params in made:
        stem = f"book{params['index']}"
        where = f"seed {XLSX_SEED} workbook {params['index']} {params}"
        response = await post(ds, "/-/open-csv-file", {"path": str(tmp_path / "xlsx" / f"{stem}.xlsx")})
        answer = response.json()
        sheets = [sheet[0] for sheet in params["sheets"] if sheet[1] != "empty"]
        if not sheets:
            problems.append(None if "no data" in answer.get("error", "") else f"{where}: {response.text}")
            continue
        if response.status_code != 200 or answer["format"] != "xlsx" or len(answer["tables"]) != len(sheets):
            problems.append(f"{where}: {response.status_code} {response.text}")
            continue
        for entry, sheet in zip(answer["tables"], sheets):
            with open(tmp_path / "csv" / f"{stem}-{sheet}.csv", newline="", encoding="utf-8") as f:
                lo_rows = list(csv.reader(f))
            got = await db.execute_fn(lambda conn: stored_table(conn, entry["table"]))
            problem = compare_with_libreoffice(f"{where} sheet {sheet}", lo_rows, *got)
            if not problem and entry["rows"] != len(got[2]):
                problem = f"{where} sheet {sheet}: answered rows {entry['rows']}"
            problems.append(problem)
    assert_none_differ(problems, "sheets")


def test_xlsx_sheet_reading_matches_elementtree_on_generated_xml(tmp_path):
    rng = random.Random(XLSX_SEED)
    strings = ["Cleo", "02134", "a & b", "東京", "<tag>", ""]
    problems = []
    for index in range(300):
        prefix, data = random_sheet_xml(rng, strings)
        path = make_xlsx(tmp_path / f"sheet{index}.xlsx", [("Data", data)], strings, prefix=prefix.rstrip(":"))
        with zipfile.ZipFile(path) as archive:
            expected = reference_sheet_rows(archive.read("xl/worksheets/sheet1.xml"), strings)
        plan = app_support.plan_file(str(path))
        (_, reader), = plan.readers(str(path))
        try:
            got = list(reader._rows())
        finally:
            reader.close()
        if got != expected or [[type(v) for v in row] for row in got] != [[type(v) for v in row] for row in expected]:
            problems.append(f"sheet {index}: {got} (ElementTree: {expected})\n{data}")
        else:
            problems.append(None)
    assert_none_differ(problems, "sheets")


EXCEL_DATES = [
    # serial, number format, 1900 system, 1904 system
    (1, 14, "1900-01-01", "1904-01-02"),
    (59, 14, "1900-02-28", "1904-02-29"),
    (60, 14, "1900-02-29", "1904-03-01"),  # 1900's fictitious day
    (61, 14, "1900-03-01", "1904-03-02"),
    (45352, 14, "2024-03-01", "2028-03-02"),
    (45352.604166666664, 22, "2024-03-01 14:30:00", "2028-03-02 14:30:00"),
    (0.604224537037037, 21, "14:30:05", "14:30:05"),
    (1.5, 46, "36:00:00", "36:00:00"),  # [h]:mm:ss, elapsed
    (45352, 165, "2024-03-01", "2028-03-02"),  # yyyy\-mm\-dd
    (45352.25, 166, "2024-03-01 06:00:00", "2028-03-02 06:00:00"),  # d/m/yy h:mm
    (45352, 167, "2024-03-01", "2028-03-02"),  # mmm-yy
    (0.75, 168, "18:00:00", "18:00:00"),  # [$-409]h:mm AM/PM
    (45352.5, 169, 45352.5, 45352.5),  # "days" 0.0: quoted text is not a date
    (45352.5, 2, 45352.5, 45352.5),  # 0.00
    (-1, 14, -1, -1),  # no date: Excel shows none either
    (1, 170, 1, 1),  # [Magenta]0.00: a colour, not minutes
    (2.5, 171, 2.5, 2.5),  # [Red][<=100]0.0;[Blue]0.0
    (0.5, 172, "12:00:00", "12:00:00"),  # [mm]:ss, elapsed
]
EXCEL_CUSTOM_FORMATS = [
    (165, "yyyy\\-mm\\-dd"), (166, "d/m/yy h:mm"), (167, "mmm\\-yy"), (168, "[$-409]h:mm AM/PM"), (169, '"days" 0.0'),
    (170, "[Magenta]0.00"), (171, "[Red][<=100]0.0;[Blue]0.0"), (172, "[mm]:ss"),
]


@pytest.mark.parametrize("date1904", [False, True], ids=["1900", "1904"])
async def test_open_csv_file_xlsx_dates_in_both_date_systems(ds, tmp_path, date1904):
    formats = [number_format for _, number_format, _, _ in EXCEL_DATES]
    styles = list(dict.fromkeys(formats))
    sheet = '<row r="1"><c r="A1" t="inlineStr"><is><t>when</t></is></c></row>' + "".join(
        f'<row r="{n}"><c r="A{n}" s="{styles.index(number_format) + 1}"><v>{serial!r}</v></c></row>'
        for n, (serial, number_format, _, _) in enumerate(EXCEL_DATES, 2)
    )
    path = make_xlsx(tmp_path / "dates.xlsx", [("Dates", sheet)], date1904=date1904, number_formats=EXCEL_CUSTOM_FORMATS, styles=styles)
    answer = (await post(ds, "/-/open-csv-file", {"path": str(path)})).json()
    assert answer["path"] == "/temporary/dates", answer
    # A number among dates is kept as its text: the column is TEXT.
    expected = [str(row[3] if date1904 else row[2]) for row in EXCEL_DATES]
    assert await rows(ds, "temporary", 'select "when" from dates') == [(value,) for value in expected]
    types = await ds.get_database("temporary").execute_fn(lambda conn: column_types(conn, "dates"))
    assert types == {"when": "TEXT"}


SPARSE_SHEET = (
    '<row r="2"><c r="B2" t="s"><v>0</v></c><c r="C2" t="s"><v>1</v></c><c r="E2" t="inlineStr"><is><t>rich</t></is></c></row>'
    '<row r="3"><c r="B3"><v>1</v></c><c r="C3" t="s"><v>2</v></c><c r="D3" t="b"><v>1</v></c><c r="E3" t="e"><v>#N/A</v></c><c r="F3" s="1"/></row>'
    '<row r="4"><c r="B4"><v>2.0</v></c><c r="C4" t="inlineStr"><is><r><t>Pan</t></r><r><rPr><b/></rPr><t xml:space="preserve">cakes</t></r><rPh sb="0" eb="1"><t>パ</t></rPh></is></c><c r="D4" t="b"><v>0</v></c><c r="E4" t="str"><f>C4&amp;"!"</f><v>Pancakes!</v></c></row>'
    '<row r="6"><c r="B6"><f>B3+B4</f><v>3</v></c><c r="C6" t="s"><v>3</v></c><c r="E6" t="e"><f>1/0</f><v>#DIV/0!</v></c></row>'
    '<row r="7"><c r="G7" s="1"/></row><row r="9"/>'
)


async def test_open_csv_file_xlsx_cells_go_where_their_references_say(ds, tmp_path):
    path = make_xlsx(tmp_path / "sparse.xlsx", [("Only", SPARSE_SHEET)], ["id", "name", "Cleo", "02134"], styles=[2])
    response = await post(ds, "/-/open-csv-file", {"path": str(path)})
    assert response.json() == {
        "ok": True, "path": "/temporary/sparse", "rows": 4, "format": "xlsx",
        "tables": [{"table": "sparse", "path": "/temporary/sparse", "rows": 4}],
    }
    types = await ds.get_database("temporary").execute_fn(lambda conn: column_types(conn, "sparse"))
    # Column A is empty but stays where the references put B; empty trailing rows and cells go.
    assert types == {"column_1": "TEXT", "id": "INTEGER", "name": "TEXT", "column_4": "INTEGER", "rich": "TEXT"}
    assert await rows(ds, "temporary", "select * from sparse") == [
        (None, 1, "Cleo", 1, None),
        (None, 2, "Pancakes", 0, "Pancakes!"),
        (None, None, None, None, None),  # row 5, between others: kept empty
        (None, 3, "02134", None, None),
    ]


async def test_open_csv_file_xlsx_whole_numbers_and_numbers_as_text(ds, tmp_path):
    sheet = '<row r="1"><c r="A1" t="inlineStr"><is><t>whole</t></is></c><c r="B1" t="inlineStr"><is><t>mixed</t></is></c><c r="C1" t="inlineStr"><is><t>text</t></is></c><c r="D1" t="inlineStr"><is><t>big</t></is></c></row>' + "".join(
        f'<row r="{n}"><c r="A{n}"><v>{whole}</v></c><c r="B{n}"><v>{mixed}</v></c><c r="C{n}" t="s"><v>{n - 2}</v></c><c r="D{n}"><v>{big}</v></c></row>'
        for n, (whole, mixed, big) in enumerate([("3.0", "1", "1E+20"), ("-7", "0.1", "2"), ("1E+3", "4.2000000000000002", "3")], 2)
    )
    path = make_xlsx(tmp_path / "numbers.xlsx", [("Only", sheet)], ["12", "007", "3.5"])
    assert (await post(ds, "/-/open-csv-file", {"path": str(path)})).json()["rows"] == 3
    types = await ds.get_database("temporary").execute_fn(lambda conn: column_types(conn, "numbers"))
    assert types == {"whole": "INTEGER", "mixed": "REAL", "text": "TEXT", "big": "REAL"}
    assert await rows(ds, "temporary", "select * from numbers") == [
        (3, 1.0, "12", 1e20), (-7, 0.1, "007", 2.0), (1000, 4.2, "3.5", 3.0),
    ]


async def test_open_csv_file_xlsx_many_sheets_in_one_transaction(ds, tmp_path):
    names = [f"Sheet {n}" for n in range(1, 29)] + ["Data", "data"]
    sheets = [(name, f'<row r="1"><c r="A1" t="inlineStr"><is><t>n</t></is></c></row><row r="2"><c r="A2"><v>{i}</v></c></row>') for i, name in enumerate(names)]
    sheets.insert(3, ("Chart-ish", ""))  # empty: no table
    path = make_xlsx(tmp_path / "book.xlsx", sheets)
    answer = (await post(ds, "/-/open-csv-file", {"path": str(path)})).json()
    tables = [entry["table"] for entry in answer["tables"]]
    assert tables == [f"book_Sheet {n}" for n in range(1, 29)] + ["book_Data", "book_data_2"]
    assert answer["path"] == ds.urls.table("temporary", "book_Sheet 1") and answer["rows"] == 1
    for i, table in enumerate(tables):
        assert await rows(ds, "temporary", f'select n from "{table}"') == [(i,)]


def ole2_file(path):
    path.write_bytes(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(range(256)) * 40)
    return path


def xlsb_file(path):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("[Content_Types].xml", "<Types/>")
        archive.writestr("xl/workbook.bin", b"\x83\x01\x00")
    return path


def zip_bomb_workbook(path):
    sheet = "<row r='1'><c r='A1'><v>1</v></c></row>" + "<row/>" * 3_000_000
    return make_xlsx(path, [("Bomb", sheet)])


def bad_string_workbook(path):
    good = '<row r="1"><c r="A1" t="inlineStr"><is><t>n</t></is></c></row><row r="2"><c r="A2"><v>1</v></c></row>'
    bad = '<row r="1"><c r="A1" t="s"><v>7</v></c></row>'
    return make_xlsx(path, [("Good", good), ("Bad", bad)], ["only one"])


def damaged_sheet_workbook(path, damage):
    """A workbook of two good sheets' worth of rows whose second sheet is damaged: cut short, or not XML."""
    rows = "".join(f'<row r="{n}"><c r="A{n}"><v>{n}</v></c></row>' for n in range(1, 2000))
    make_xlsx(path, [("Good", rows), ("Damaged", rows)])
    with zipfile.ZipFile(path) as archive:
        parts = {name: archive.read(name) for name in archive.namelist()}
    sheet = parts["xl/worksheets/sheet2.xml"]
    parts["xl/worksheets/sheet2.xml"] = sheet[: len(sheet) // 2] if damage == "cut" else b"\x00\x01 not XML"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in parts.items():
            archive.writestr(name, content)
    return path


def bad_crc_workbook(path):
    """A workbook whose second sheet's packed bytes were changed after it was written."""
    rows = "".join(f'<row r="{n}"><c r="A{n}"><v>{n}</v></c></row>' for n in range(1, 2000))
    make_xlsx(path, [("Good", rows), ("Damaged", rows)])
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("xl/worksheets/sheet2.xml")
    data = bytearray(path.read_bytes())
    middle = info.header_offset + 30 + len(info.filename) + info.compress_size // 2
    data[middle] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


XLSX_REFUSED = [
    ("Excel 97-2003", lambda p: ole2_file(p / "old.xls"), "old.xls is an Excel 97-2003 workbook (.xls) or an encrypted workbook, which cannot be read here. Open it in Excel or LibreOffice, save it as an Excel workbook (.xlsx)"),
    ("encrypted, named .xlsx", lambda p: ole2_file(p / "secret.xlsx"), "secret.xlsx is an Excel 97-2003 workbook (.xls) or an encrypted workbook"),
    ("binary workbook", lambda p: xlsb_file(p / "book.xlsb"), "book.xlsb is an Excel binary workbook (.xlsb), which cannot be read here."),
    ("no data", lambda p: make_xlsx(p / "empty.xlsx", [("One", ""), ("Two", '<row r="1"><c r="A1" s="1"/></row>')]), "empty.xlsx is a workbook with no data in any of its sheets."),
    ("zip bomb", lambda p: zip_bomb_workbook(p / "bomb.xlsx"), "expands more than 200 times"),
    ("a missing shared string, in the second sheet", lambda p: bad_string_workbook(p / "bad.xlsx"), "bad.xlsx is a damaged Excel workbook: sheet Bad names shared string 7, which it does not have."),
    ("not a workbook's parts", lambda p: make_xlsx(p / "broken.xlsx", [("One", "")], extra={"xl/workbook.xml": "<workbook"}), "broken.xlsx is a damaged Excel workbook: xl/workbook.xml is not valid XML"),
    # All the sheets or none: a damaged second sheet leaves the first unimported too.
    ("a sheet cut short", lambda p: damaged_sheet_workbook(p / "cut.xlsx", "cut"), "cut.xlsx is a damaged Excel workbook: xl/worksheets/sheet2.xml is cut short or is not a workbook's XML, so none of its sheets were imported."),
    ("a sheet that is not XML", lambda p: damaged_sheet_workbook(p / "junk.xlsx", "junk"), "junk.xlsx is a damaged Excel workbook: xl/worksheets/sheet2.xml is cut short or is not a workbook's XML"),
    ("a sheet whose packed bytes changed", lambda p: bad_crc_workbook(p / "crc.xlsx"), "crc.xlsx is a damaged Excel workbook ("),
]


def renamed_workbook(path, naming):
    """A workbook whose parts are named, and related, as other producers do:
    "absolute": the workbook at xl/book.xml by _rels/.rels, absolute targets, SharedStrings.xml by relationship;
    "cased": relationship targets in another case than the zip's names."""
    sheet = '<row r="1"><c r="A1" t="s"><v>0</v></c><c r="B1" t="s"><v>1</v></c></row><row r="2"><c r="A2" t="s"><v>2</v></c><c r="B2"><v>5</v></c></row>'
    make_xlsx(path, [("Pets", sheet)], ["name", "age", "Cleo"])
    with zipfile.ZipFile(path) as archive:
        parts = {name: archive.read(name) for name in archive.namelist()}
    relationship = '<Relationship Id="{}" Type="{}/{}" Target="{}"/>'.format
    if naming == "absolute":
        parts["xl/book.xml"] = parts.pop("xl/workbook.xml")
        parts["xl/worksheets/data.xml"] = parts.pop("xl/worksheets/sheet1.xml")
        parts["xl/SharedStrings.xml"] = parts.pop("xl/sharedStrings.xml")
        parts["xl/Styles.xml"] = parts.pop("xl/styles.xml")
        del parts["xl/_rels/workbook.xml.rels"]
        targets = [("rId1", "worksheet", "/xl/worksheets/data.xml"), ("rId2", "sharedStrings", "/xl/SharedStrings.xml"), ("rId3", "styles", "Styles.xml")]
        rels_name, package_target = "xl/_rels/book.xml.rels", "/xl/book.xml"
    else:
        targets = [("rId1", "worksheet", "Worksheets/Sheet1.XML"), ("rId2", "sharedStrings", "SHAREDSTRINGS.xml")]
        parts["xl/sharedStrings.xml"] = parts.pop("xl/sharedStrings.xml")
        rels_name, package_target = "xl/_rels/workbook.xml.rels", "xl/workbook.xml"
    rels = '<?xml version="1.0"?><Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">{}</Relationships>'.format
    parts[rels_name] = rels("".join(relationship(i, XLSX_RELATIONSHIPS, kind, target) for i, kind, target in targets))
    parts["_rels/.rels"] = rels(relationship("rId1", XLSX_RELATIONSHIPS, "officeDocument", package_target))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in parts.items():
            archive.writestr(name, content)
    return path


async def test_open_csv_file_xlsx_parts_are_bounded_by_the_size_setting(tmp_path):
    sheet = "".join(f'<row r="{n}"><c r="A{n}"><v>{n}</v></c><c r="B{n}" t="inlineStr"><is><t>row {n}</t></is></c></row>' for n in range(1, 20_000))
    path = make_xlsx(tmp_path / "big.xlsx", [("Big", sheet)])
    size = zipfile.ZipFile(path).getinfo("xl/worksheets/sheet1.xml").file_size
    assert 1024 * 1024 < size < 8 * 1024 * 1024  # over the limit below, and no bomb
    limited = await with_settings(url_size_limit_mb=1)
    assert_error(await post(limited, "/-/open-csv-file", {"path": str(path)}), 400, (
        f"{path} holds a part that unpacks to more than 1 MB (xl/worksheets/sheet1.xml), more than can be "
        "read here. The app_support setting url_size_limit_mb changes this limit."
    ))
    assert await tables(limited) == []
    roomy = await with_settings(url_size_limit_mb=3)
    assert (await post(roomy, "/-/open-csv-file", {"path": str(path)})).json()["rows"] == 19_998


@pytest.mark.parametrize("naming", ["absolute", "cased"])
async def test_open_csv_file_xlsx_parts_found_through_their_relationships(ds, tmp_path, naming):
    path = renamed_workbook(tmp_path / "pets.xlsx", naming)
    response = await post(ds, "/-/open-csv-file", {"path": str(path)})
    assert response.json() == {"ok": True, "path": "/temporary/pets", "rows": 1, "format": "xlsx",
                               "tables": [{"table": "pets", "path": "/temporary/pets", "rows": 1}]}, response.text
    assert await rows(ds, "temporary", "select name, age from pets") == [("Cleo", 5)]


async def test_open_csv_file_xlsx_nul_characters_in_names_and_strings(ds, tmp_path):
    sheet = (
        '<row r="1"><c r="A1" t="inlineStr"><is><t>na_x0000_me</t></is></c><c r="B1" t="inlineStr"><is><t>n</t></is></c></row>'
        '<row r="2"><c r="A2" t="inlineStr"><is><t>x_x0000_y</t></is></c><c r="B2"><v>1</v></c></row>'
    )
    path = make_xlsx(tmp_path / "nul.xlsx", [("Data", sheet)])
    response = await post(ds, "/-/open-csv-file", {"path": str(path)})
    assert response.status_code == 200, response.text
    assert await rows(ds, "temporary", 'select name, n from nul') == [("x\x00y", 1)]


@pytest.mark.parametrize("name,setup,error", XLSX_REFUSED, ids=[r[0] for r in XLSX_REFUSED])
async def test_open_csv_file_refuses_workbooks_it_cannot_read(ds, tmp_path, name, setup, error):
    path = setup(tmp_path)
    await post(ds, "/-/new-empty-database-file", {"path": str(tmp_path / "target.db")})
    for endpoint, body in [
        ("/-/open-csv-file", {"path": str(path)}),
        ("/-/import-csv-file", {"path": str(path), "database": "target"}),
    ]:
        await assert_refused(ds, tmp_path, endpoint, body, 400, error)
        assert await tables(ds, "target") == []
    assert work_folders() == []


async def test_open_csv_file_xlsm_macros_are_never_run(ds, tmp_path):
    path = make_xlsx(
        tmp_path / "macros.xlsm",
        [("Dogs", '<row r="1"><c r="A1" t="inlineStr"><is><t>name</t></is></c></row><row r="2"><c r="A2" t="inlineStr"><is><t>Cleo</t></is></c></row>')],
        extra={"xl/vbaProject.bin": b"Attribute VB_Name = \"Evil\"\nShell \"touch pwned\""},
    )
    response = await post(ds, "/-/open-csv-file", {"path": str(path)})
    assert response.json()["path"] == "/temporary/macros"
    assert await rows(ds, "temporary", "select name from macros") == [("Cleo",)]


async def test_open_csv_file_xlsx_large_sheet(ds, tmp_path):
    count = 1_000_000
    path = make_xlsx(tmp_path / "large.xlsx", [("Big", large_sheet(count))], ["even", "odd"])
    response = await post(ds, "/-/open-csv-file", {"path": str(path)})
    assert response.json()["rows"] == count, response.text
    assert await rows(ds, "temporary", "select count(*), sum(n), min(n), max(n), sum(parity = 'odd') from large") == [
        (count, count * (count - 1) // 2, 0, count - 1, count // 2)
    ]
    assert await rows(ds, "temporary", "select n, parity from large where rowid in (1, 500000, 1000000) order by rowid") == [
        (0, "even"), (499_999, "odd"), (999_999, "odd"),
    ]


# ===== /-/open-csv-file and /-/import-csv-file: compressed files =====
#
# A .gz, .bz2 or .xz file, or a zip holding one data file, imports as the
# file it holds, from disk as from a URL; the cells are checked against what
# Python's csv module reads from the uncompressed text.


PACKINGS = ["gz", "bz2", "xz", "zip"]


def packed(kind, name, data):
    """data packed as a file of this kind would hold it: (the file's name, its bytes)."""
    if kind == "zip":
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.writestr(name, data)
        return name.rsplit(".", 1)[0] + ".zip", buffer.getvalue()
    compress = {"gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress}[kind]
    return f"{name}.{kind}", compress(data)


def generated_points(seed, count=500):
    """CSV shaped like real files: (its bytes, its rows). Coordinates with 5 to 7 places,
    codes with leading zeros, quoted text with commas, quotes and line breaks."""
    rng = random.Random(seed)
    rows = [["id", "lat", "lon", "zip", "note"]] + [
        [str(i), f"{rng.uniform(-90, 90):.{rng.randint(5, 7)}f}", f"{rng.uniform(-180, 180):.{rng.randint(5, 7)}f}",
         f"{rng.randrange(100_000):05d}", rng.choice(["", "Smith, John", 'say "hi"', "two\nlines", "Zürich", "東京"])]
        for i in range(count)
    ]
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    return buffer.getvalue().encode("utf-8"), rows


async def import_packed(ds, tmp_path, server, endpoint, name, content):
    """Import a compressed file through endpoint: from tmp_path, or from the test's HTTP server."""
    if endpoint == "/-/open-csv-from-url":
        base, routes = server
        routes["/" + name] = (200, {}, content)
        return await post(ds, endpoint, {"url": f"{base}/{name}", "detect_types": False})
    path = write(tmp_path / name, content)
    body = {"path": str(path), "detect_types": False}
    if endpoint == "/-/import-csv-file":
        await post(ds, "/-/new-empty-database-file", {"path": str(tmp_path / "target.db")})
        body["database"] = "target"
    return await post(ds, endpoint, body)


@pytest.mark.parametrize("endpoint", ["/-/open-csv-file", "/-/import-csv-file", "/-/open-csv-from-url"])
@pytest.mark.parametrize("kind", PACKINGS)
async def test_compressed_files_import_as_the_file_they_hold(ds, tmp_path, server, temp_dir, endpoint, kind):
    data, expected = generated_points(PACKINGS.index(kind))
    name, content = packed(kind, "points.csv", data)
    response = await import_packed(ds, tmp_path, server, endpoint, name, content)
    database = "target" if endpoint == "/-/import-csv-file" else "temporary"
    assert response.json() == {"ok": True, "path": f"/{database}/points", "rows": len(expected) - 1, "format": "csv"}
    assert await rows(ds, database, "select * from points") == [tuple(row) for row in expected[1:]]
    assert work_folders(temp_dir) == []


async def test_compressed_file_from_disk_is_read_in_parts_once_unpacked(ds, tmp_path, in_parts, helpers):
    data, expected = generated_points(11, count=3000)
    name, content = packed("xz", "points.csv", data)
    response = await post(ds, "/-/open-csv-file", {"path": str(write(tmp_path / name, content))})
    assert response.json()["rows"] == 3000
    assert len(helpers) == 2
    stored = await rows(ds, "temporary", "select id, zip, note from points")
    assert stored == [(int(row[0]), row[3], row[4]) for row in expected[1:]]


@pytest.mark.parametrize("endpoint", ["/-/open-csv-file", "/-/import-csv-file"])
async def test_compressed_files_from_disk_that_cannot_be_read_are_refused_leaving_nothing(ds, tmp_path, server, temp_dir, bombs, endpoint):
    cases = {
        "bomb.csv.gz": (bombs["gz"], "Stopped unpacking {path}: it expands more than 200 times, which no real data file does, so it looks like a decompression bomb."),
        "bomb.zip": (bombs["zip"], "Stopped unpacking {path}: it expands more than 200 times"),
        "cut.csv.gz": (cut_in_half(gzip.compress), "Could not gunzip {path}: Compressed file ended before the end-of-stream marker was reached."),
        "cut.csv.bz2": (cut_in_half(bz2.compress), "Could not bunzip2 {path}: Compressed file ended before the end-of-stream marker was reached."),
        "cut.csv.xz": (cut_in_half(lzma.compress), "Could not unxz {path}: Compressed file ended before the end-of-stream marker was reached."),
        "bad.csv.bz2": (b"BZh9" + b"\x00" * 100, "Could not bunzip2 {path}: Invalid data stream"),
        "bad.csv.xz": (b"\xfd7zXZ\x00" + b"\x00" * 100, "Could not unxz {path}: Corrupt input data. The file may be cut short or damaged: copy or download it again."),
        "two.zip": (two_file_zip(), "{path} is a zip file holding 2 CSV, TSV or JSON files; it must hold exactly one."),
    }
    await post(ds, "/-/new-empty-database-file", {"path": str(tmp_path / "target.db")})
    for name, (content, error) in cases.items():
        path = write(tmp_path / name, content)
        body = {"path": str(path)}
        if endpoint == "/-/import-csv-file":
            body["database"] = "target"
        response = await post(ds, endpoint, body)
        assert_error(response, 400, error.format(path=path))
        assert await tables(ds) == [] and await tables(ds, "target") == [] and work_folders(temp_dir) == []


def cut_in_half(compress):
    """A compressed CSV of 20,000 rows, cut short halfway, as an interrupted copy leaves it."""
    rng = random.Random(3)
    packed_bytes = compress("".join(f"{i},{rng.random()}\n" for i in range(20_000)).encode())
    return packed_bytes[: len(packed_bytes) // 2]


def two_file_zip():
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("a.csv", "a\n1\n")
        archive.writestr("b.csv", "b\n2\n")
    return buffer.getvalue()


# ===== /-/import-csv-file: full disks, locks and databases that go away =====


async def open_file_database(ds, path):
    """Attach a SQLite file through /-/open-database-file; return its database's name."""
    response = await post(ds, "/-/open-database-file", {"path": str(path)})
    assert response.json()["ok"], response.text
    return response.json()["path"].strip("/")


def big_csv(tmp_path, megabytes=4):
    """A CSV file of about megabytes of one repeated row."""
    path = tmp_path / "big.csv"
    line = b"12345,some words here,67.5\n"
    path.write_bytes(b"a,b,c\n" + line * (megabytes * 1024 * 1024 // len(line)))
    return path


async def test_import_into_a_file_database_on_a_full_disk(ds, tmp_path, small_disk):
    disk = small_disk(size="2m")
    name = await open_file_database(ds, make_db(disk / "target.db"))
    body = {"path": str(big_csv(tmp_path)), "database": name}
    response = await post(ds, "/-/import-csv-file", body)
    assert_error(response, 400, "The disk is full")
    assert await tables(ds, name) == ["t"]
    assert sorted(p.name for p in disk.iterdir()) == ["target.db"]


async def test_staging_an_import_for_temporary_on_a_full_disk(ds, tmp_path, small_disk, monkeypatch):
    disk = small_disk(size="2m")
    monkeypatch.setattr(tempfile, "tempdir", str(disk))
    response = await post(ds, "/-/open-csv-file", {"path": str(big_csv(tmp_path))})
    assert_error(response, 400, "The disk is full")
    assert await tables(ds) == [] and list(disk.iterdir()) == []


async def test_import_into_a_database_locked_by_another_program(ds, tmp_path):
    path = make_db(tmp_path / "target.db")
    name = await open_file_database(ds, path)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("begin exclusive")
    try:
        # The other program holds its lock until after the answer: an import
        # that waited for it would never answer.
        response = await post(ds, "/-/import-csv-file", {"path": str(big_csv(tmp_path, 1)), "database": name})
        assert_error(response, 400, "is locked by another program")
        assert "Close it there and try again." in response.json()["error"]
    finally:
        other.execute("rollback")
        other.close()
    assert await tables(ds, name) == ["t"]


async def test_import_into_a_database_on_a_read_only_disk(ds, tmp_path, small_disk):
    disk = small_disk(size="1m")
    name = await open_file_database(ds, make_db(disk / "target.db"))
    read_only(disk)
    response = await post(ds, "/-/import-csv-file", {"path": str(big_csv(tmp_path, 1)), "database": name})
    assert_error(response, 400, "is read-only")
    assert await tables(ds, name) == ["t"]


async def test_detaching_the_target_during_an_import_is_not_a_server_fault(ds, tmp_path):
    name = await open_file_database(ds, make_db(tmp_path / "target.db"))
    task = asyncio.ensure_future(
        post(ds, "/-/import-csv-file", {"path": str(big_csv(tmp_path, 8)), "database": name})
    )
    while not any(item["state"] == "running" for item in await progress(ds)):
        await asyncio.sleep(0.01)
    ds.remove_database(name)
    response = await task
    assert response.status_code in (200, 400), response.text
    assert response.headers["content-type"].startswith("application/json")


# ===== /-/open-csv-file and /-/restore-temporary-from-file: more than memory can hold =====


def memory_cgroup_parents():
    """Where this process's memory cgroups are (v1, then v2), with their limit files."""
    with open("/proc/self/cgroup") as f:
        lines = [line.rstrip("\n").split(":", 2) for line in f]
    for _, controllers, path in lines:
        if "memory" in controllers.split(","):
            folder = os.path.join("/sys/fs/cgroup/memory", path.lstrip("/"))
            yield (folder if os.path.isdir(folder) else "/sys/fs/cgroup/memory"), "memory.limit_in_bytes"
        elif controllers == "":
            yield os.path.join("/sys/fs/cgroup", path.lstrip("/")), "memory.max"


@pytest.fixture
def memory_cgroup():
    """limit(bytes): a memory cgroup of this test's own, limited so; its cgroup.procs file."""
    made = []

    def limit(size):
        for parent, limit_file in memory_cgroup_parents() if os.path.exists("/proc/self/cgroup") else []:
            folder = os.path.join(parent, f"app_support_test_{uuid.uuid4().hex}")
            try:
                os.mkdir(folder)
                made.append(folder)
                with open(os.path.join(folder, limit_file), "w") as f:
                    f.write(str(size))
            except OSError:
                continue
            return os.path.join(folder, "cgroup.procs")
        pytest.skip("this machine lets only root, or a delegated user, make a memory cgroup")

    yield limit
    for folder in made:
        with contextlib.suppress(OSError):
            os.rmdir(folder)


def write_backup(path, megabytes):
    """A valid database of about this many megabytes."""
    conn = sqlite3.connect(path)
    conn.execute(
        "create table saved as with recursive n(i) as (select 1 union all select i + 1 from n where i < ?) "
        "select i, randomblob(1000) as b from n", [megabytes * 1000]
    )
    conn.commit()
    conn.close()
    return path


def write_wide_csv(path, megabytes):
    """A CSV file of about this many megabytes, in rows of 250 bytes."""
    with open(path, "w") as f:
        f.write("id,text\n")
        for block in range(megabytes * 4):
            f.write("".join(f"{block * 1000 + i},{'x' * 240}\n" for i in range(1000)))
    return path


def test_files_too_big_for_memory_leave_temporary_as_it_was(tmp_path, memory_cgroup):
    """A server in a 300 MB memory cgroup, started as the app starts it.

    Without the check, the 300 MB file and the 300 MB backup each make the
    kernel end the server, and every table in temporary with it.
    """
    server = AppServer(tmp_path / "server")
    server.cgroup_procs = memory_cgroup(300 * 2**20)
    server.start()
    try:
        small = write_wide_csv(tmp_path / "small.csv", 20)
        status, _, body = server.call("/-/open-csv-file", {"path": str(small)}, timeout=300)
        assert status == 200, body
        big = write_wide_csv(tmp_path / "big.csv", 300)
        status, _, body = server.call("/-/open-csv-file", {"path": str(big)}, timeout=600)
        assert status == 400, body
        assert re.fullmatch(
            r"big\.csv needs about \d+ MB of memory to open in the temporary database, and the server's "
            r"memory limit \(its cgroup\) leaves about \d+ MB free\. Create a database file "
            r"\(File → New Empty Database…\) and use Import CSV on it instead\.",
            json.loads(body)["error"],
        ), body
        # Staged, then measured: its rows were read before it was refused.
        assert json.loads(server.call("/-/import-progress")[2])["imports"][0]["rows"] > 0
        # A file that cannot fit whatever it holds is refused from its size, before a row is read.
        huge = write_wide_csv(tmp_path / "huge.csv", 1000)
        status, _, body = server.call("/-/open-csv-file", {"path": str(huge)}, timeout=600)
        assert status == 400 and json.loads(body)["error"].startswith("huge.csv needs about "), body
        assert json.loads(server.call("/-/import-progress")[2])["imports"][0]["rows"] == 0
        huge.unlink()
        backup = write_backup(tmp_path / "backup.db", 300)
        status, _, body = server.call("/-/restore-temporary-from-file", {"path": str(backup)}, timeout=300)
        assert status == 400, body
        assert json.loads(body)["error"].startswith(f"The backup {backup} needs about "), body
        assert "so nothing was restored. Open it as a database file instead" in json.loads(body)["error"]
        status, _, body = server.call("/temporary/small.json?_shape=array&_size=1")
        assert status == 200 and json.loads(body)[0]["id"] == 0, body
        status, _, body = server.call("/temporary.json")
        assert [t["name"] for t in json.loads(body)["tables"]] == ["small"], body
        assert server_work_files(server) == []
    finally:
        server.stop()


# ===== The import engine: column types and names, checked against the slow references =====


def engine_problem(path, where, check, **options):
    """Import path through the engine into a new in-memory database; return what check(conn,
    result) finds wrong, or what went wrong on the way, after where; None when all is well."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    try:
        (result,) = app_support.import_file(conn, str(path), path.stem, **options)
        return check(conn, result)
    except Exception as e:
        return f"{where}: {type(e).__name__}: {e}"
    finally:
        conn.close()


# Helpers: generated CSV files and the slow references
#
# reference_type is the type rule spelled out one value at a time; the engine's
# batch-wide column_type must agree with it on generated columns. Whole random
# CSV files, generated from a fixed seed, are imported and every stored cell
# is compared with what Python's csv module reads from the same file.


REFERENCE_INTEGER = re.compile(r"-?(0|[1-9][0-9]{0,17})")
REFERENCE_REAL = re.compile(r"-?(0|[1-9][0-9]*)?\.[0-9]*")


def reference_value_type(value):
    """The narrowest type for one non-empty value."""
    if REFERENCE_INTEGER.fullmatch(value) and value != "-0":
        return "INTEGER"
    if REFERENCE_REAL.fullmatch(value) and re.search("[0-9]", value):
        return "REAL"
    return "TEXT"


def significant_digits(value):
    return len(re.sub("[^0-9]", "", value).lstrip("0"))


def reference_type(values):
    """The declared type of a column: the widest of its values' types, TEXT when all are empty.

    A REAL column whose values have more significant digits than a double holds is TEXT.
    """
    values = [v for v in values if v is not None and v != ""]
    kinds = {reference_value_type(v) for v in values}
    if kinds == {"REAL"} or kinds == {"REAL", "INTEGER"}:
        return "TEXT" if max(map(significant_digits, values)) > 17 else "REAL"
    for kind in ("TEXT", "INTEGER"):
        if kind in kinds:
            return kind
    return "TEXT"


TYPE_SEED = 9_2026


# Pieces a generated column is made of: the values that decide types.
TYPE_ATOMS = [
    "0", "0", "0", "1", "1", "-1", "7", "10", "-0", "00", "007", "0.0", "-0.0", "0.5", "-0.5",
    ".5", "-.5", "5.", "0.", "00.5", "01.5", "10.25", "-10.25", ".", "-.", "-", "", "", "",
    "1e5", "1E5", "+5", " 5", "5 ", "1.2.3", "1-2", "5-", "--5", "é", "x",
    "9" * 18, "-" + "9" * 18, "1" + "0" * 17, "9" * 19, "-" + "9" * 19, "1" + "0" * 18,
    "9" * 19 + ".5", "0" * 18, "0" + "9" * 17, "9" * 17 + ".", "9" * 18 + ".", "0." + "9" * 17,
    "0." + "9" * 18, "-0.000" + "1" * 17, "-0.000" + "1" * 18, "1." + "0" * 17, "1." + "0" * 16,
]


def random_type_atom(rng):
    """One generated value: a listed atom, a random integer or a number-like string."""
    roll = rng.random()
    if roll < 0.6:
        return rng.choice(TYPE_ATOMS)
    if roll < 0.8:
        return str(rng.randint(-10**rng.randint(1, 19), 10**rng.randint(1, 19)))
    sign = rng.choice(["", "", "-"])
    whole = rng.choice(["", "0", "00", str(rng.randint(1, 10**6)), "0" + str(rng.randint(1, 99))])
    return sign + whole + rng.choice([".", ".", ""]) + rng.choice(["", "0", str(rng.randint(0, 10**4))])


def generated_type_columns(seed=TYPE_SEED, count=20_000):
    """Generated columns: one value repeated, 0/1 flags with blanks, or mixed values."""
    rng = random.Random(seed)
    for _ in range(count):
        shape = rng.random()
        length = rng.choice([1, 1, 2, 2, 3, 4, 5, 8, 20])
        if shape < 0.15:  # one repeated value: "0", "0", ...
            column = [rng.choice(TYPE_ATOMS)] * length
        elif shape < 0.3:  # 0/1 flags with blanks
            column = [rng.choice(["0", "1", "0", ""]) for _ in range(length)]
        else:
            column = [random_type_atom(rng) for _ in range(length)]
        yield column


CSV_SEED = 9_9_2026
DIFFERENTIAL_FILES = 3000  # through engine_import
DIFFERENTIAL_ENDPOINT_FILES = 300  # through POST /-/open-csv-file
LINE_ENDINGS = {"LF": ["\n"], "CRLF": ["\r\n"], "CR": ["\r"], "mixed": ["\n", "\r\n", "\r"]}
UNICODE_WORDS = ["São Paulo", "東京", "naïve", "emoji 😀", "e\u0301", "Ελλάδα", "\u2028sep", "tab\there"]
# Non-ASCII letters that cp1252 encodes at 0xC0-0xFF: no UTF-8 continuation
# bytes, so a cp1252 file is never accidentally valid UTF-8.
LATIN_WORDS = ["café", "Zürich", "Ærø", "niño", "façade", "Øst", "ÀÉÎ"]


def engine_import(conn, path, table, detect_types=True):
    """Import through the engine's pure function; return the table it created."""
    (result,) = app_support.import_file(conn, str(path), table, detect_types=detect_types)
    return result.table


def random_cell(rng, kind, delimiter, latin):
    """One cell of a column whose values are mostly of the given kind."""
    if rng.random() < 0.12:
        return ""
    if rng.random() < 0.03:  # a stray value of any kind
        kind = rng.choice(["int", "real", "zip", "flag", "count", "text", "awkward"])
    if kind == "int":
        return str(rng.randint(-10**rng.randint(1, 18) + 1, 10**rng.randint(1, 18) - 1))
    if kind == "real":
        return rng.choice(["", "-"]) + rng.choice(["0", str(rng.randint(1, 99999)), ""]) + "." + str(rng.randint(0, 999))
    if kind == "zip":
        return f"{rng.randint(0, 99999):05d}"
    if kind == "flag":
        return rng.choice("01")
    if kind == "count":
        return "0" if rng.random() < 0.5 else str(rng.randint(1, 500))
    if kind == "text":
        words = LATIN_WORDS if latin else UNICODE_WORDS + LATIN_WORDS
        return rng.choice(["alpha", "beta gamma", rng.choice(words), f"item {rng.randint(0, 99)}"])
    # awkward: quotes, delimiters and line breaks inside the cell, numbers-ish text
    return rng.choice([
        'say "hi"', '"', '""', "a,b", "a;b", "a|b", "a\tb", f"x{delimiter}y", "line\nbreak",
        "cr\rbreak", "crlf\r\nbreak", "\n", " ", "1e5", "+5", " 5", "007", "-0", "0.0", ".", "NULL",
    ])


def render_cell(cell, delimiter, quote_all):
    """A cell as it is written in the file: quoted when it must be, or when every cell is."""
    if quote_all or any(c in cell for c in (delimiter, '"', "\r", "\n")):
        return '"' + cell.replace('"', '""') + '"'
    return cell


def random_csv(seed, index):
    """A random CSV file as bytes, the parameters that made it, and its rows as written."""
    rng = random.Random(f"{seed}:{index}")
    encoding = rng.choice(["utf-8", "utf-8", "utf-8-sig", "utf-16", "cp1252"])
    params = {
        "seed": seed,
        "index": index,
        "delimiter": rng.choice([",", "\t", ";", "|"]),
        "quoting": rng.choice(["minimal", "minimal", "all"]),
        "line_ending": rng.choice(list(LINE_ENDINGS)),
        "encoding": encoding,
        "width": rng.choice([2, 2, 3, 4, 6, 10]),
        "rows": rng.choice([0, 1, 2, 3, 5, 10, 30, 100]) if index % 300 != 17 else 6000 + rng.randint(0, 500),
        "ragged": rng.random() < 0.3,
        "trailing_newline": rng.random() < 0.85,
        "blank_lines": rng.random() < 0.15,
    }
    kinds = [rng.choice(["int", "real", "zip", "flag", "count", "text", "awkward"]) for _ in range(params["width"])]
    params["kinds"] = kinds
    latin = encoding == "cp1252"
    header = [f"c{i}" for i in range(params["width"])]
    rows = []
    for _ in range(params["rows"]):
        row = [random_cell(rng, kind, params["delimiter"], latin) for kind in kinds]
        if params["ragged"] and rng.random() < 0.2:
            row = row[: rng.randint(1, len(row) - 1)]
        rows.append(row)
    # A late type change: the last row of a long file breaks a number column.
    if params["rows"] > 5000 and rng.random() < 0.7:
        rows[-1] = [random_cell(rng, "awkward", params["delimiter"], latin) for _ in kinds]
    if latin:
        rows.append([rng.choice(LATIN_WORDS) for _ in kinds])  # make cp1252 matter
    endings = LINE_ENDINGS[params["line_ending"]]
    lines = [params["delimiter"].join(render_cell(c, params["delimiter"], params["quoting"] == "all") for c in header)]
    for row in rows:
        if params["blank_lines"] and rng.random() < 0.1:
            lines.append("")
        if len(row) == 1 and row[0] == "":
            lines.append('""')  # an unquoted lone empty cell would be a blank line
        else:
            lines.append(params["delimiter"].join(render_cell(c, params["delimiter"], params["quoting"] == "all") for c in row))
    text = ""
    for number, line in enumerate(lines):
        if number or text:
            text += rng.choice(endings)
        text += line
    if params["trailing_newline"]:
        text += rng.choice(endings)
    return text.encode(encoding), params, rows


def csv_module_rows(path, params):
    """What Python's csv module reads from the file with its known dialect."""
    with open(path, newline="", encoding=params["encoding"]) as f:
        rows = [row for row in csv.reader(f, delimiter=params["delimiter"]) if row]
    return rows[0], rows[1:]


def expected_table(header, rows, detect_types=True):
    """Declared types and stored rows that the type rule asks for."""
    width = len(header)
    declared = [
        reference_type([row[i] for row in rows if i < len(row)]) if detect_types else "TEXT"
        for i in range(width)
    ]
    convert = {"INTEGER": int, "REAL": float, "TEXT": str}
    stored = []
    for row in rows:
        out = []
        for i in range(width):
            if i >= len(row):
                out.append(None)
            elif row[i] == "" and declared[i] != "TEXT":
                out.append(None)
            else:
                out.append(convert[declared[i]](row[i]))
        stored.append(tuple(out))
    return declared, stored


def compare_import(params, header, rows, names, declared, stored, detect_types=True):
    """The first difference between an import and the csv module's reading, or None."""
    where = f"seed {params['seed']} file {params['index']} {params}"
    expected = (header, *expected_table(header, rows, detect_types))
    return first_difference(where, (names, declared, stored), expected)


def first_difference(where, got, expected):
    """The first difference between (names, declared types, rows) got and expected, or None.

    Cells differ when their values or their types do.
    """
    for what, got_part, expected_part in zip(("columns", "types"), got, expected):
        if got_part != expected_part:
            return f"{where}: {what} {got_part[:12]} (expected {expected_part[:12]})"
    stored, expected_stored = got[2], expected[2]
    if len(stored) != len(expected_stored):
        return f"{where}: {len(stored)} rows (expected {len(expected_stored)})"
    for number, (row, want) in enumerate(zip(stored, expected_stored), 1):
        if row != want or [type(v) for v in row] != [type(v) for v in want]:
            return f"{where}: data row {number} stored {row!r} (expected {want!r})"
    return None


def check_generated_file(tmp_path, index, seed=CSV_SEED):
    """Write one generated file; return it, its parameters and the csv module's reading."""
    content, params, written = random_csv(seed, index)
    path = tmp_path / f"f{index}.csv"
    path.write_bytes(content)
    header, rows = csv_module_rows(path, params)
    # The generator and the csv module must agree before the engine is judged.
    assert header == [f"c{i}" for i in range(params["width"])], params
    assert rows == written, params
    return path, params, header, rows


# Messy files, generated from fixed seeds: tables written by the csv module
# under lines a table never starts with, with stray quotes, or quoted with '
# or escaped with \\. The oracle is the table as written, or the csv module
# reading the whole file with the dialect the rule in the issue picks.


MESSY_SEED = 22_2_2026
MESSY_FILES = 400
TITLES = ["Sales report", "Exported from Bank of Examples", "Table 3: population by region", "Résumé des ventes"]


def random_table(rng, width, rows, number_columns=1):
    """A header of names and rows of cells; the last number_columns columns hold numbers."""
    header = [f"{rng.choice(['name', 'city', 'count', 'note'])} {i}" for i in range(width)]
    table = []
    for _ in range(rows):
        row = [rng.choice(["alpha", "beta, gamma", "São Paulo", "x", "", "12 Main St"]) for _ in range(width - number_columns)]
        row += [str(rng.randint(-999, 99999)) for _ in range(number_columns)]
        table.append(row)
    return header, table


def random_preamble(rng, width, delimiter):
    """Lines a table never starts with: titles, dates, # comments, lines of one or two fields."""
    lines = []
    for _ in range(rng.randint(1, 6)):
        kind = rng.choice(["title", "date", "comment", "fields"]) if width >= 3 else "comment"
        if kind == "title":
            line = rng.choice(TITLES)
        elif kind == "date":
            line = rng.choice([f"{rng.randint(2000, 2030)}-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}", "Generated: 5 March 2024"])
        elif kind == "comment":
            fields = rng.choice([n for n in (1, 2, 3, 5) if n != width])
            line = "# " + delimiter.join(rng.choice(["COLUMN a", "produced by X", "units: km"]) for _ in range(fields))
        else:
            fields = rng.randint(1, min(2, width - 2))
            line = delimiter.join(["Period", "2024 Q1"][:fields])
        lines.append(line)
        if rng.random() < 0.2:
            lines.append("")
    return lines


def written(rows, **dialect):
    """rows as the csv module writes them."""
    out = io.StringIO()
    csv.writer(out, **dialect).writerows(rows)
    return out.getvalue()


def random_titled_csv(seed, index, rows=None):
    """A table under lines above its header: (text, params, preamble's lines, header, rows)."""
    rng = random.Random(f"{seed}:{index}")
    params = {
        "seed": seed, "index": index, "delimiter": rng.choice([",", "\t", ";", "|"]),
        "width": rng.choice([2, 3, 4, 6]), "line_ending": rng.choice(["\n", "\r\n"]),
    }
    header, table = random_table(rng, params["width"], rows or rng.randint(2, 40))
    preamble = random_preamble(rng, params["width"], params["delimiter"])
    text = params["line_ending"].join(preamble) + params["line_ending"]
    text += written([header] + table, delimiter=params["delimiter"], lineterminator=params["line_ending"])
    return text, params, [line for line in preamble if line], header, table


def usual_and_unquoted(text, delimiter):
    """The csv module's readings of text with the usual quotes and with none, and whether the
    usual reading's rows (blank lines aside) have one width and its quotes close."""
    usual = list(csv.reader(io.StringIO(text + "\nEND", newline=""), delimiter=delimiter))
    closed = usual[-1] == ["END"]
    usual = [row for row in usual[:-1] if row] if closed else usual
    unquoted = [row for row in csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=csv.QUOTE_NONE) if row]
    return usual, unquoted, closed and len(usual) > 1 and len({len(row) for row in usual}) == 1


def oracle_table(rows):
    """(names, declared types, stored rows) for rows read by the csv module, the first the header."""
    header = [name.strip() or f"column_{i}" for i, name in enumerate(rows[0], 1)]
    return (reference_names(header), *expected_table(rows[0], rows[1:]))


def random_stray_quote_csv(seed, index):
    """A table with no quoting in which a few cells start with a quote that nothing closes on
    purpose: (text, params). Its cells hold no delimiter, so it reads without quotes."""
    rng = random.Random(f"{seed}:{index}")
    params = {"seed": seed, "index": index, "delimiter": rng.choice([",", "\t", ";"]), "width": rng.choice([2, 3, 5])}
    header, table = random_table(rng, params["width"], rng.randint(2, 60))
    rows = [header] + [[cell.replace(",", "") for cell in row] for row in table]
    for _ in range(rng.randint(1, 3)):
        row = rng.randrange(len(rows))
        cell = rng.randrange(params["width"])
        rows[row][cell] = '"' + rng.choice(['12 inch', 'quoted', 'x"y', 'a, b' if params["delimiter"] != "," else "a b"])
    if rng.random() < 0.2:  # inconsistent without quotes too
        rows[rng.randrange(1, len(rows))].append("extra")
    text = written(rows, delimiter=params["delimiter"], quoting=csv.QUOTE_NONE, escapechar=None, quotechar=None)
    return text, params


def random_quoted_csv(seed, index):
    """A table quoted with ' or escaped with \\ , or an ordinary one with apostrophes in
    its text and some short rows: (text, params, dialect the csv module reads it with)."""
    rng = random.Random(f"{seed}:{index}")
    kind = rng.choice(["single", "escaped", "apostrophes"])
    params = {"seed": seed, "index": index, "kind": kind, "delimiter": rng.choice([",", "\t", ";"])}
    header, table = random_table(rng, rng.choice([2, 3, 4]), rng.randint(3, 40))
    d = params["delimiter"]
    words = {
        "single": [f"x{d}y", "O'Brien", "'tis", f"it's{d} fine", "plain"],
        "escaped": [f'say "hi"{d} ok', '"quoted"', f"a{d}b", "plain"],
        "apostrophes": ["O'Brien", "'tis the season", "it's", "rock 'n' roll", "plain"],
    }[kind]
    for row in table:
        row[0] = rng.choice(words)
    if kind == "single":
        table[0][0] = f"x{d}y"  # at least one cell that needs its quotes
        dialect = {"delimiter": d, "quotechar": "'", "doublequote": True}
    elif kind == "escaped":
        table[0][0] = f'say "hi"{d} ok'
        dialect = {"delimiter": d, "escapechar": "\\", "doublequote": False}
    else:
        for row in table[1::3]:
            del row[-1]  # short rows: the file is ragged, so other readings are looked at
        dialect = {"delimiter": d}
    return written([header] + table, **dialect), params, dialect


# Helpers: generated JSON documents and their slow reference
#
# Random JSON documents, from a fixed seed, in every shape the engine reads;
# every stored cell and declared type is compared with what Python's json
# module reads from the same document and a value-by-value type rule.


JSON_SEED = 18_2026
JSON_ENGINE_DOCUMENTS = 600  # through import_file
JSON_ENDPOINT_DOCUMENTS = 150  # through POST /-/open-csv-file
JSON_PARTS_DOCUMENTS = 30  # through import_file, in three parts

# Keys: distinct even ignoring case, NFC, not blank, so that the names the
# engine gives are the keys themselves (name cleaning has its own tests).
JSON_KEYS = ["id", "name", "São Paulo", "東京", "price", "count", "flag", "note", "zip", "meta", "tags", "x y"]
JSON_STRINGS = [
    "", "Cleo", "02134", "12", "-0", "1e5", "naïve café", "東京", "emoji 😀", 'say "hi"', "back\\slash",
    "line\nbreak", "tab\there", "\u2028", "null", "true", " padded ",
]
JSON_FLOATS = [0.1, -0.0, 0.0, 1e300, -1e-300, 2.5, 1 / 3, 123456.789, 5e-324, 0.30000000000000004]
JSON_INTEGERS = [0, 1, -1, 42, 2**53 + 1, 2**63 - 1, -(2**63), 2**63, -(2**63) - 1, 2**64, 10**30]


def random_json_value(rng, kind, depth=0):
    if rng.random() < 0.1:
        return None
    if rng.random() < 0.04:  # a stray value of another kind
        kind = rng.choice(["int", "float", "str", "bool", "nested"])
    if kind == "int":
        return rng.choice(JSON_INTEGERS) if rng.random() < 0.2 else rng.randint(-10**6, 10**6)
    if kind == "float":
        return rng.choice(JSON_FLOATS) if rng.random() < 0.3 else rng.uniform(-1e6, 1e6)
    if kind == "str":
        return rng.choice(JSON_STRINGS)
    if kind == "bool":
        return rng.random() < 0.5
    if depth > 1 or rng.random() < 0.5:
        return [random_json_value(rng, rng.choice(["int", "str", "float"]), depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(JSON_KEYS): random_json_value(rng, "nested", depth + 1) for _ in range(rng.randint(0, 3))}


def random_json_document(seed, index, shapes=("array", "ndjson", "nested", "geojson")):
    """A random JSON document as bytes, the parameters that made it, and its objects as written."""
    rng = random.Random(f"{seed}:{index}")
    params = {
        "seed": seed,
        "index": index,
        "shape": rng.choice(shapes),
        "layout": rng.choice(["line per object", "line per object", "one line", "indented"]),
        "rows": rng.choice([1, 2, 3, 5, 10, 30, 100]),
        "line_ending": rng.choice(["\n", "\n", "\r\n"]),
        "blank_lines": rng.random() < 0.15,
    }
    if params["shape"] == "ndjson":
        params["rows"] = max(params["rows"], 2)  # one object alone is not NDJSON, but an object
    keys = rng.sample(JSON_KEYS, rng.randint(1, 8))
    kinds = {key: rng.choice(["int", "float", "str", "bool", "nested", "int", "float"]) for key in keys}
    objects = []
    for _ in range(params["rows"]):
        present = [key for key in keys if rng.random() < 0.85] or keys[:1]
        if rng.random() < 0.2:
            rng.shuffle(present)  # key order that varies
        objects.append({key: random_json_value(rng, kinds[key]) for key in present})
    if params["shape"] == "geojson":
        features = []
        for number, properties in enumerate(objects):
            feature = {"type": "Feature", "properties": properties,
                       "geometry": {"type": "Point", "coordinates": [rng.uniform(-180, 180), rng.uniform(-90, 90)]}}
            if rng.random() < 0.7:
                feature = {"id": number, **feature}
            features.append(feature)
        objects = features
    end = params["line_ending"]
    if params["shape"] == "ndjson":
        lines = []
        for item in objects:
            lines.append(json.dumps(item, ensure_ascii=rng.random() < 0.5))
            if params["blank_lines"] and rng.random() < 0.2:
                lines.append("")
        text = end.join(lines) + (end if rng.random() < 0.8 else "")
        return text.encode(), params, objects
    if params["layout"] == "indented":
        items = json.dumps(objects, indent=2, ensure_ascii=False)
    elif params["layout"] == "one line":
        items = json.dumps(objects, ensure_ascii=False)
    else:
        items = "[" + ("," + end).join(json.dumps(item, ensure_ascii=False) for item in objects) + "]"
    if params["shape"] in ("nested", "geojson"):
        if params["shape"] == "geojson":
            text = '{"type": "FeatureCollection", "features": ' + items + "}"
        else:
            # A smaller array of objects beside it, which must not be taken.
            decoy = json.dumps([{"decoy": 1}] * (len(objects) // 2))
            text = '{"meta": {"count": %d, "also": %s}, "data": {"results": %s}, "more": %s}' % (
                len(objects), decoy, items, decoy)
    else:
        text = items
    return (text.replace("\n", end) + end).encode(), params, objects


def reference_json_rows(params, document):
    """What Python's json module reads from the document: its rows as dicts, in order."""
    if params["shape"] == "ndjson":
        # Only LF ends a line: str.splitlines would also split at U+2028 inside a string.
        return [json.loads(line) for line in document.decode().split("\n") if line.strip()]
    data = json.loads(document)
    if params["shape"] == "nested":
        return data["data"]["results"]
    if params["shape"] == "geojson":
        rows = []
        for feature in data["features"]:
            row = {"\0id": feature["id"]} if "id" in feature else {}
            row.update(feature["properties"])
            row["\0geometry"] = feature["geometry"]
            rows.append(row)
        return rows
    return data


REFERENCE_JSON_TYPE_ORDER = ["TEXT", "REAL", "INTEGER"]


def reference_json_value_type(value):
    """The declared type one JSON value asks for, by the rule spelled out value by value."""
    if isinstance(value, bool):
        return "INTEGER"
    if isinstance(value, int):
        return "INTEGER" if -(2**63) <= value < 2**63 else "TEXT"
    if isinstance(value, float):
        return "REAL"
    return "TEXT"  # strings, objects, arrays


def reference_json_text(value):
    """A JSON value as the text a TEXT column holds."""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    if isinstance(value, float):
        return repr(value)
    return str(value)


def expected_json_table(objects, detect_types=True):
    """Column keys, declared types and stored rows that the rules ask for."""
    keys = []
    for item in objects:
        for key in item:
            if key not in keys:
                keys.append(key)
    declared = []
    for key in keys:
        kinds = {reference_json_value_type(item[key]) for item in objects if item.get(key) is not None}
        kind = next((k for k in REFERENCE_JSON_TYPE_ORDER if k in kinds), "TEXT") if detect_types else "TEXT"
        declared.append(kind)
    stored = []
    for item in objects:
        row = []
        for key, kind in zip(keys, declared):
            value = item.get(key)
            if value is None:
                row.append(None)
            elif kind == "INTEGER":
                row.append(int(value))
            elif kind == "REAL":
                row.append(float(value))
            else:
                row.append(reference_json_text(value))
        stored.append(tuple(row))
    return reference_names([key.lstrip("\0") for key in keys]), declared, stored


def compare_json_import(params, objects, names, declared, stored, detect_types=True):
    """The first difference between an import and the json module's reading, or None."""
    where = f"seed {params['seed']} document {params['index']} {params}"
    # == for floats: SQLite stores a whole REAL as an integer, so -0.0 comes back as 0.0.
    return first_difference(where, (names, declared, stored), expected_json_table(objects, detect_types))


def stored_json_table(conn, table):
    info = list(conn.execute(f'pragma table_info("{table}")'))
    return (
        [r[1] for r in info], [r[2] for r in info],
        [tuple(r) for r in conn.execute(f'select * from "{table}" order by rowid')],
    )


def generated_json_file(tmp_path, index, seed=JSON_SEED, **kwargs):
    content, params, written = random_json_document(seed, index, **kwargs)
    objects = reference_json_rows(params, content)
    if params["shape"] not in ("geojson",):
        assert objects == written, params  # the generator and the json module agree
    path = tmp_path / f"doc{index}.{'ndjson' if params['shape'] == 'ndjson' else 'json'}"
    path.write_bytes(content)
    return path, params, objects


def import_counting_parts(conn, path, folder, table="t", detect_types=True):
    """Import through the engine; return how many parts read the file, and the new table."""
    folder.mkdir(exist_ok=True)
    db_encoding = conn.execute("PRAGMA encoding").fetchone()[0]
    staged = app_support.stage_file(
        str(path), str(folder / "staging.db"), detect_types=detect_types, db_encoding=db_encoding
    )
    (result,) = app_support.copy_in(conn, staged, table)
    return len(staged[0].tables), result.table


def test_column_type_pure():
    assert app_support.column_type(["1", "", "-3"]) == "INTEGER"
    assert app_support.column_type(["1", "2.5"]) == "REAL"
    assert app_support.column_type(["", ""]) is None
    assert app_support.column_type(["07"]) == "TEXT"
    assert app_support.column_type(["é"]) == "TEXT"
    # None: the cells a short row lacks.
    assert app_support.column_type(["1", None, "", "-3"]) == "INTEGER"
    assert app_support.column_type(["007", None]) == "TEXT"
    assert app_support.column_type([None, None]) is None


@pytest.mark.parametrize(
    "values", [["0", "0"], ["0.0", "0.0"], ["1", "0", "0"], ["0", "0", "1.5"], ["-0.5", "-0.5"]]
)
def test_column_type_repeated_zeros(values):
    assert app_support.column_type(values) == reference_type(values)


def test_reference_type_follows_the_rule():
    integers = ["0", "5", "-5", "10", "123456789012345678", "-123456789012345678"]
    reals = [
        "0.5", "-0.5", ".5", "-.5", "5.", "10.25", "0.0", "-0.0", "0.", "12345678901234567.",
        "0.00012345678901234567", "-1.2345678901234567", "1.5000000000000000",
    ]
    texts = [
        "007", "00", "-0", "00.5", "01.5", "-00.5", ".", "-.", "-", "", "1e5", "+5", " 5", "5 ",
        "1234567890123456789", "1.2.3", "1-2", "5-", "é", "١", "１", "0x10", "inf", "nan",
        "12345678901234567890.5", "101004116451.80003357", "-0.123456789012345678", "1.50000000000000000",
    ]
    for value in integers:
        assert reference_type([value]) == "INTEGER", value
    for value in reals:
        assert reference_type([value]) == "REAL", value
    for value in texts:
        assert reference_type([value]) == "TEXT", value
    assert reference_type(["1", "2.5"]) == "REAL"
    assert reference_type(["1", "", None]) == "INTEGER"
    assert reference_type(["1", "x", "2.5"]) == "TEXT"
    assert reference_type(["1234567890123456789", "1.5"]) == "TEXT"
    assert reference_type(["123456789012345678", "1.5"]) == "TEXT"  # 18 digits: a double cannot hold them
    assert reference_type(["12345678901234567", "1.5"]) == "REAL"
    assert reference_type([None, ""]) == "TEXT"


def test_column_type_matches_reference_on_generated_columns():
    wrong = []
    for column in generated_type_columns():
        got = app_support.column_type(column) or "TEXT"  # None: every value empty
        if got != reference_type(column):
            wrong.append((column, got, reference_type(column)))
    shown = "\n".join(f"{c!r}: column_type {g}, reference {r}" for c, g, r in wrong[:15])
    assert not wrong, f"{len(wrong)} of 20,000 columns (seed {TYPE_SEED}) differ:\n{shown}"


DECIMAL_SEED = 22_1_2026


def random_decimals(seed=DECIMAL_SEED, count=20_000):
    """Decimal texts as files hold them: 1 to 17 significant digits, and 17-digit ones
    just below and above halfway between two neighbouring doubles, the hardest to round."""
    rng = random.Random(seed)
    texts = []
    while len(texts) < count:
        if rng.random() < 0.5:
            whole = str(rng.randint(0, 10 ** rng.randint(0, 9)))
            fraction = str(rng.randint(0, 10 ** rng.randint(1, 17 - len(whole) + (whole == "0"))))
            texts.append(rng.choice(["", "-"]) + whole + "." + fraction)
            continue
        x = rng.uniform(-1000, 1000) * 10 ** rng.randint(-8, 9)
        halfway = (decimal.Decimal(x) + decimal.Decimal(math.nextafter(x, math.inf))) / 2
        for rounding in (decimal.ROUND_DOWN, decimal.ROUND_UP):
            texts.append(format(halfway.normalize(decimal.Context(prec=17, rounding=rounding)), "f"))
    return texts


def test_sqlite_is_trusted_with_decimals_only_when_it_reads_them_exactly():
    conn = sqlite3.connect(":memory:")
    texts = random_decimals(count=2000) + list(app_support._HARD_DECIMALS)
    exact = all(conn.execute("select cast(? as real)", [t]).fetchone()[0] == float(t) for t in texts)
    if app_support._sqlite_reads_decimals_exactly(conn):
        assert exact, "the engine trusts a SQLite that reads some decimals wrongly"
    else:  # this SQLite must really get one of the engine's probes wrong
        assert not all(
            conn.execute("select cast(? as real)", [t]).fetchone()[0] == float(t)
            for t in app_support._HARD_DECIMALS
        )


def random_short_decimals(seed=DECIMAL_SEED, count=100_000):
    """Decimals of 1 to 4 places and at most 15 digits, half of them the nearest such to halfway between two doubles."""
    rng = random.Random(seed)
    texts = []
    while len(texts) < count:
        places = rng.randint(1, app_support.SHORT_DECIMAL_PLACES)
        x = rng.uniform(0, 1) * 10 ** rng.randint(0, app_support.EXACT_DIGITS - places)
        if rng.random() < 0.5:
            x = (decimal.Decimal(x) + decimal.Decimal(math.nextafter(x, math.inf))) / 2
        text = format(decimal.Decimal(x).quantize(decimal.Decimal(1).scaleb(-places)), "f")
        if len(text) - 1 <= app_support.EXACT_DIGITS:
            texts.append(rng.choice(["", "-"]) + text)
    return texts


def test_sqlite_is_trusted_with_short_decimals_only_when_it_reads_them_exactly():
    conn = sqlite3.connect(":memory:")
    texts = random_short_decimals()
    wrong = [t for t in texts if conn.execute("select cast(? as real)", [t]).fetchone()[0] != float(t)]
    if app_support._sqlite_reads_short_decimals_exactly(conn):
        assert wrong == [], "the engine trusts a SQLite that reads some short decimals wrongly"
    else:
        assert not all(
            conn.execute("select cast(? as real)", [t]).fetchone()[0] == float(t)
            for t in app_support._short_hard_decimals()
        )


@pytest.mark.parametrize("parts", [1, 3])
def test_csv_reals_are_pythons_float_of_their_text(tmp_path, monkeypatch, parts):
    texts = random_decimals()
    long = [t + "1" if significant_digits(t) == 17 else t for t in texts[:200]]
    # A column of short decimals only is left to SQLite where it reads them exactly.
    short = random_short_decimals(count=len(texts))
    path = tmp_path / "decimals.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["decimal", "with_blanks", "long", "short"])
        for i, text in enumerate(texts):
            writer.writerow([text, "" if i % 7 == 3 else text, long[i % len(long)], short[i]])
    if parts > 1:
        read_in_parts(monkeypatch, parts)
    conn = sqlite3.connect(":memory:", isolation_level=None)
    count, table = import_counting_parts(conn, path, tmp_path / "work")
    names, declared, stored = stored_table(conn, table)
    assert count == parts
    assert declared == ["REAL", "REAL", "TEXT", "REAL"]
    wrong = [
        (text, got) for text, short_text, got in zip(texts, short, stored)
        if got[0] != float(text) or type(got[0]) is not float or got[1] not in (None, float(text))
        or got[3] != float(short_text)
    ]
    assert not wrong, f"{len(wrong)} of {len(texts)} decimals (seed {DECIMAL_SEED}) differ: {wrong[:10]}"
    assert [row[2] for row in stored] == [long[i % len(long)] for i in range(len(texts))]


def test_exact_quotient_is_pythons_float_of_every_decimal_it_takes():
    # The decimals of the tests above, and the engine's own hardest, with their own places
    # and with the most their digits before the point allow, as a column may give them.
    texts = random_decimals() + random_short_decimals(count=20_000)
    texts += list(app_support._HARD_DECIMALS) + app_support._hard_decimals()
    by_places = collections.defaultdict(list)
    for text in texts:
        whole, _, fraction = text.lstrip("-").partition(".")
        if len(whole) + len(fraction) <= app_support.EXACT_DIGITS:
            by_places[len(fraction)].append(text)
            by_places[app_support.EXACT_DIGITS - len(whole)].append(text)
    conn = sqlite3.connect(":memory:")
    conn.execute("create table decimals (value text)")
    wrong, checked = [], 0
    for places, group in sorted(by_places.items()):
        conn.execute("delete from decimals")
        conn.executemany("insert into decimals values (?)", [(text,) for text in group])
        got = conn.execute(f"select {app_support._exact_quotient('value', places)} from decimals order by rowid")
        wrong += [(text, places, value) for text, (value,) in zip(group, got) if value != float(text)]
        checked += len(group)
    assert checked > 40_000
    assert not wrong, f"{len(wrong)} of {checked} (seed {DECIMAL_SEED}) differ: {wrong[:10]}"


def random_coordinates(rng, count, places, whole):
    """Decimals of places places (a count or a range), below 10^whole, a sixth of them negative."""
    texts = []
    for _ in range(count):
        digits = places if isinstance(places, int) else rng.randint(*places)
        text = f"{rng.uniform(0, 10 ** whole):.{digits}f}"
        texts.append("-" + text if rng.random() < 1 / 6 else text)
    return texts


def test_column_digits_match_a_plain_count_on_generated_batches():
    rng = random.Random(DECIMAL_SEED)
    wrong, counted = [], 0
    for _ in range(3000):
        size = rng.randint(1, 40)
        if rng.random() < 0.3:
            batch = [str(rng.randint(-(10 ** rng.randint(0, 19)), 10 ** rng.randint(0, 19))) for _ in range(size)]
        else:
            batch = [
                str(rng.randint(0, 10 ** rng.randint(0, 6))) if rng.random() < 0.1
                else rng.choice(["", "-"]) + str(rng.randint(0, 10 ** rng.randint(0, 8)))
                + "." + str(rng.randint(0, 10 ** rng.randint(0, 9)))[: rng.randint(0, 9)]
                for _ in range(size)
            ]
        batch = [value if rng.random() > 0.1 else "" for value in batch]
        numbers = [value.lstrip("-").partition(".") for value in batch if value]
        most = (max((len(w) for w, _, _ in numbers), default=0), max((len(f) for _, _, f in numbers), default=0))
        for start in ((0, 0), (rng.randint(0, 3), rng.randint(0, 3))):
            kind, *got = app_support._column_type(batch, *start)
            assert kind == reference_type(batch) or (kind is None and reference_type(batch) == "TEXT")
            if kind not in ("INTEGER", "REAL"):
                continue
            counted += 1
            expected = [max(most[0], start[0]), max(most[1], start[1]) if kind == "REAL" else start[1]]
            if got != expected:
                wrong.append((batch, start, got, expected))
    assert counted > 2000
    assert not wrong, f"{len(wrong)} batches (seed {DECIMAL_SEED}) differ: {wrong[:3]}"


TYPE_TURNS_SEED = 4_12_2026


def turning_value(rng, kind):
    """A cell of a kind a number column starts with, or may turn to."""
    return {
        "integer": lambda: str(rng.randint(-10**6, 10**6)),
        "decimal": lambda: f"{rng.uniform(-1000, 1000):.{rng.randint(1, 3)}f}",
        "coordinate": lambda: f"{rng.uniform(-180, 180):.{rng.randint(5, 7)}f}",
        "long decimal": lambda: f"{rng.uniform(1e8, 1e9):.7f}",  # 16 or 17 digits: float() reads it
        "blank": lambda: "",
        "text": lambda: rng.choice(["N/A", "-", "1,5", "x", "zürich", "東京"]),
        "leading zero": lambda: f"0{rng.randint(0, 999)}",
        "long integer": lambda: str(rng.randint(10**18, 10**19 - 1)),
    }[kind]()


def random_turning_csv(rng, rows):
    """The lines of a file of number columns, each of which may turn to another kind of value
    somewhere, some with blank cells, and short rows in some files."""
    starts = ["integer", "decimal", "coordinate", "long decimal", "blank"]
    turns = [None, *starts, "text", "leading zero", "long integer"]
    columns = [
        (rng.choice(starts), rng.choice(turns), rng.randrange(rows), rng.choice([0, 0.1]))
        for _ in range(rng.randint(2, 5))
    ]
    short_rows = rng.choice([0, 0.002])
    lines = [[f"c{i}" for i in range(len(columns))]]
    for number in range(rows):
        cells = [
            "" if rng.random() < blanks else
            turning_value(rng, turn if turn and number >= at and (number == at or rng.random() < 0.2) else start)
            for start, turn, at, blanks in columns
        ]
        if len(cells) > 1 and rng.random() < short_rows:
            cells = cells[: rng.randrange(1, len(cells))]
        lines.append(cells)
    return lines


def import_staged_tables(path, folder, db_encoding="UTF-8"):
    """Import path through the engine into a new database of that text encoding; return its table as
    stored_table gives it, each value with its type's name, and the staged tables copied in."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.execute(f"PRAGMA encoding = '{db_encoding}'")
    folder.mkdir()
    staged = app_support.stage_file(str(path), str(folder / "staging.db"), db_encoding=db_encoding)
    (result,) = app_support.copy_in(conn, staged, "t")
    _, declared, stored = stored_table(conn, result.table)
    return (declared, [[(type(value).__name__, value) for value in row] for row in stored]), staged[0].tables


@pytest.mark.parametrize("parts", [1, 3])
def test_number_columns_staged_in_their_types_import_as_when_staged_as_text(tmp_path, monkeypatch, parts):
    """Number columns staged in their types (see _StagedRows) give every value and type that the
    rows staged as the file has them, then converted, give, however and wherever a column turns."""
    if parts > 1:
        read_in_parts(monkeypatch, parts)
    rng, problems, converted = random.Random(TYPE_TURNS_SEED + parts), [], []
    for index in range(60 if parts == 1 else 12):
        path = tmp_path / f"turns{index}.csv"
        with open(path, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows(random_turning_csv(rng, rng.randint(600, 2600)))
        encoding = rng.choice(app_support.SQLITE_ENCODINGS)  # kept values go back to text in each
        monkeypatch.setattr(app_support, "STAGE_TYPED", True)
        typed, tables = import_staged_tables(path, tmp_path / f"typed{index}", encoding)
        monkeypatch.setattr(app_support, "STAGE_TYPED", False)
        as_text, _ = import_staged_tables(path, tmp_path / f"text{index}", encoding)
        assert len(tables) == parts
        converted.append(any(table.endswith("_typed") for _, table in tables))
        rows = [(n, a, b) for n, (a, b) in enumerate(zip(typed[1], as_text[1]), 1) if a != b]
        problems.append(
            f"file {index}: declared {typed[0]} and {as_text[0]}; first rows that differ {rows[:2]}"
            if typed != as_text else None
        )
    assert_none_differ(problems, "files")
    # Both kinds of file: ones whose types held, copied in as staged, and ones converted after.
    assert 0 < sum(converted) < len(converted), converted


@pytest.mark.parametrize("parts", [1, 3])
def test_csv_coordinates_are_exact_with_no_sql_call_of_pythons_float_per_value(tmp_path, monkeypatch, parts):
    # As where SQLite reads some decimals wrongly, as before 3.43. A batch of
    # decimals with no empty cell is bound as Python's float() of each; one
    # with an empty cell is read by SQLite and corrected in SQL, or, for too
    # many digits, read by float() called from SQL for each value.
    monkeypatch.setattr(app_support, "_exact_real_casts", [False])
    rng = random.Random(DECIMAL_SEED)
    rows = 120_000
    columns = {
        "latitude": random_coordinates(rng, rows, (5, 7), 2),
        "longitude": random_coordinates(rng, rows, 5, 3),
        "elevation": random_coordinates(rng, rows, (1, 12), 3),  # 3 digits and 12 places: 15
        # 9 digits before the point and 7 after, in different values: Python's float() it stays.
        "wide": random_coordinates(rng, rows, (1, 7), 9),
    }
    # An empty cell in every other batch of latitudes and of the wide column.
    columns["latitude"][7::1000] = [""] * len(columns["latitude"][7::1000])
    columns["wide"][3::1000] = [""] * len(columns["wide"][3::1000])
    columns["elevation"][11::997] = ["12"] * len(columns["elevation"][11::997])
    # Those SQLite before 3.43 reads wrongly, with at most 3 digits before the point and 12 after.
    hard = [t for t in app_support._HARD_DECIMALS if re.fullmatch(r"-?\d{1,3}\.\d{1,12}", t)]
    assert len(hard) >= 14
    columns["elevation"][::4001] = (hard * rows)[: len(columns["elevation"][::4001])]
    path = tmp_path / "coordinates.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(zip(*columns.values()))
    if parts > 1:
        read_in_parts(monkeypatch, parts)
    calls = []
    open_staging = app_support._open_staging

    def counting_staging(*args):
        conn = open_staging(*args)
        conn.create_function("app_support_real", 1, lambda text: calls.append(text) or float(text))
        return conn

    monkeypatch.setattr(app_support, "_open_staging", counting_staging)
    conn = sqlite3.connect(":memory:", isolation_level=None)
    count, table = import_counting_parts(conn, path, tmp_path / "work")
    names, declared, stored = stored_table(conn, table)
    assert (count, declared) == (parts, ["REAL"] * 4)
    wrong = [
        (name, text, got)
        for name, texts, got_column in zip(columns, columns.values(), zip(*stored))
        for text, got in zip(texts, got_column)
        if got != (float(text) if text else None)
    ]
    assert not wrong, f"{len(wrong)} decimals (seed {DECIMAL_SEED}) differ: {wrong[:10]}"
    if parts == 1:  # the helper processes call their own
        size = app_support.BATCH_ROWS
        batches = [columns["wide"][start : start + size] for start in range(0, rows, size)]
        expected = [text for batch in batches if "" in batch for text in batch if text]
        assert calls == expected, (
            "float() was called from SQL for other values than the wide column's batches with an empty cell"
        )


def test_clean_headers_pure():
    assert app_support.clean_headers(["a", "a", ""], 4) == ["a", "a_2", "column_3", "column_4"]


def test_csv_engine_matches_csv_module_on_generated_files(tmp_path):
    problems = []
    for index in range(DIFFERENTIAL_FILES):
        path, params, header, rows = check_generated_file(tmp_path, index)
        problems.append(engine_problem(path, f"seed {CSV_SEED} file {index} {params}", lambda conn, result: (
            compare_import(params, header, rows, *stored_table(conn, result.table))
        )))
        path.unlink()
    assert_none_differ(problems, "files")


async def test_open_csv_file_matches_csv_module_on_generated_files(ds, tmp_path):
    problems = []
    db = ds.get_database("temporary")
    for index in range(DIFFERENTIAL_FILES, DIFFERENTIAL_FILES + DIFFERENTIAL_ENDPOINT_FILES):
        path, params, header, rows = check_generated_file(tmp_path, index)
        detect_types = index % 10 != 3
        response = await post(ds, "/-/open-csv-file", {"path": str(path), "detect_types": detect_types})
        if response.status_code != 200 or not response.json()["ok"]:
            problems.append(f"seed {CSV_SEED} file {index} {params}: {response.status_code} {response.text}")
            continue
        table = response.json()["path"].split("/")[-1]
        got = await db.execute_fn(lambda conn: stored_table(conn, table))
        problem = compare_import(params, header, rows, *got, detect_types=detect_types)
        if not problem and response.json()["rows"] != len(rows):
            problem = f"seed {CSV_SEED} file {index} {params}: answered rows {response.json()['rows']}"
        problems.append(problem)
        await db.execute_write(f'drop table "{table}"')
    assert_none_differ(problems, "files")


def test_csv_columns_a_whole_batch_lacks_keep_their_type(tmp_path):
    # One early row is wider; every row of the next batch is short, so the
    # extra column is all NULL there, which says nothing about its type.
    lines = ["a,b", "1,2,3"] + [f"{i},{i}" for i in range(app_support.BATCH_ROWS * 2)]
    path = tmp_path / "short.csv"
    path.write_text("\n".join(lines) + "\n")
    conn = sqlite3.connect(":memory:", isolation_level=None)
    names, declared, stored = stored_table(conn, engine_import(conn, path, "t"))
    assert names == ["a", "b", "column_3"]
    assert declared == ["INTEGER", "INTEGER", "INTEGER"]
    assert stored[0] == (1, 2, 3) and stored[1] == (0, 0, None)


def import_text(path, text, **options):
    """Write text to path as UTF-8 and import it through the engine: (answer, names, declared, stored)."""
    path.write_bytes(text.encode("utf-8"))
    conn = sqlite3.connect(":memory:", isolation_level=None)
    try:
        (result,) = app_support.import_file(conn, str(path), "t", **options)
        return (result.answer, *stored_table(conn, result.table))
    finally:
        conn.close()


def assert_skips_exactly_the_lines_above(tmp_path, generate):
    """For each file generate(seed, index) makes, the engine skips exactly its lines above the
    table and stores the table as written."""
    problems = []
    for index in range(MESSY_FILES):
        text, params, preamble, header, rows = generate(MESSY_SEED, index)
        where = f"seed {MESSY_SEED} file {index} {params}"
        try:
            answer, *got = import_text(tmp_path / "titled.csv", text)
        except app_support.ReadError as e:
            problems.append(f"{where}: {e}")
            continue
        if answer.get("skipped_lines") != preamble:
            problems.append(f"{where}: skipped {answer.get('skipped_lines')} (expected {preamble})")
            continue
        problems.append(first_difference(where, got, (header, *expected_table(header, rows))))
    assert_none_differ(problems, "files")


def test_csv_engine_skips_exactly_the_lines_above_generated_tables(tmp_path):
    assert_skips_exactly_the_lines_above(tmp_path, random_titled_csv)


PROSE = ["Sales report", "Prepared by the finance team", "All figures in US dollars", "Source: the national office"]


def random_noted_csv(seed, index):
    """A table under notes a person sees at once are not the table: comments that start with
    #, ! or %, of any width, and lines of words with no delimiter, some blank between.
    (text, params, the notes, header, rows)."""
    rng = random.Random(f"{seed}:{index}")
    params = {
        "seed": seed, "index": index, "delimiter": rng.choice([",", "\t", ";", "|"]),
        "width": rng.choice([2, 3, 4, 6]), "numbers": rng.choice([0, 1]),
    }
    width, delimiter = params["width"], params["delimiter"]
    header, table = random_table(rng, width, rng.randint(2, 40), number_columns=params["numbers"])
    notes = []
    for _ in range(rng.randint(1, 6)):
        kind = rng.choice(["comment", "prose"])
        if kind == "comment":
            # As wide as the table only where its header names a column of numbers.
            fields = rng.choice([n for n in (1, 2, 3, 5, width) if n != width or params["numbers"]])
            words = [rng.choice(["COLUMN a", "produced by X", "units: km", "Year", "exported"]) for _ in range(fields)]
            notes.append(rng.choice("#!%") + rng.choice(["", " "]) + delimiter.join(words))
        else:
            notes.append(rng.choice(PROSE))
        if rng.random() < 0.3:
            notes.append("")
    text = "\n".join(notes) + "\n" + written([header] + table, delimiter=delimiter, lineterminator="\n")
    return text, params, [line for line in notes if line], header, table


def test_csv_engine_skips_comments_and_notes_above_generated_tables(tmp_path):
    assert_skips_exactly_the_lines_above(tmp_path, random_noted_csv)


def test_csv_engine_skips_the_comments_above_wikipedias_example(tmp_path):
    """Wikipedia's CSV example, under comment lines and a blank line, one of them as wide as the table."""
    text = (
        "# Example from https://en.wikipedia.org/wiki/Comma-separated_values\n"
        "# Columns: Year, Make, Model, Description, Price\n# Prices in US dollars\n# Fetched 2024\n\n"
        "Year,Make,Model,Description,Price\n1997,Ford,E350,\"ac, abs, moon\",3000.00\n"
        "1999,Chevy,\"Venture \"\"Extended Edition\"\"\",\"\",4900.00\n"
        "1999,Chevy,\"Venture \"\"Extended Edition, Very Large\"\"\",,5000.00\n"
        "1996,Jeep,Grand Cherokee,\"MUST SELL!\nair, moon roof, loaded\",4799.00\n"
    )
    answer, names, declared, stored = import_text(tmp_path / "cars.csv", text)
    assert answer["skipped_lines"] == text.split("\n\n")[0].split("\n")
    assert names == ["Year", "Make", "Model", "Description", "Price"]
    expected = list(csv.reader(io.StringIO(text.split("\n\n", 1)[1], newline="")))[1:]
    assert [tuple(str(v) if v is not None else "" for v in row) for row in stored] == [
        tuple(row[:4]) + (str(float(row[4])),) for row in expected
    ]


NOT_TITLES = [
    ("header one field short of its rows", "id,name\n1,a,2\n3,b,4\n5,c,6\n"),
    ("header one field longer than its rows", "id,name,n,extra\n1,a,2\n3,b,4\n5,c,6\n"),
    ("a one-column file with commas in its values", "address\n1 Main St, Springfield, IL\n2 Oak Ave, Dover, DE\n"),
    ("a one-column file of numbers with commas", "total\n1,234,567\n2,345,678\n"),
    ("short rows below the header", "a,b,c,d\nx\ny,1\n1,2,3,4\n5,6,7,8\n"),
    ("a header of two fields over text", "name,city\nAda,London\nBob\nCy,Paris,France\n"),
    ("a header that names a column #", "#,name,n\n1,a,2\n3,b\n"),
    ("a title over a table of text only", "People\nname,city,country\nAda,London,UK\nBob,Paris,FR\n"),
    ("a header whose first name starts with #", "# of items,name,n\n3,a,5\n4,b,6\n"),
    ("a header that names columns # and !", "#,!,n\n1,a,2\n3,b,4\n"),
    ("a one-column file under a word", "name\nCleo\nPancakes\n"),
]


@pytest.mark.parametrize("name,text", NOT_TITLES, ids=[n[0] for n in NOT_TITLES])
def test_csv_engine_never_skips_a_line_of_the_table(tmp_path, name, text):
    answer, names, _, stored = import_text(tmp_path / "x.csv", text)
    assert "skipped_lines" not in answer
    lines = [line for line in text.splitlines() if line]
    expected_rows = len(lines) - 1
    assert len(stored) == expected_rows
    if len(names) == 1:  # read one value per line
        assert names == [lines[0]] and [row[0] for row in stored] == lines[1:]
    else:
        assert names[: len(lines[0].split(","))] == lines[0].split(",")


def test_csv_engine_reads_generated_files_with_stray_quotes_as_the_rule_says(tmp_path):
    problems, unquoted_files = [], 0
    for index in range(MESSY_FILES):
        text, params = random_stray_quote_csv(MESSY_SEED, index)
        where = f"seed {MESSY_SEED} file {index} {params}"
        usual, unquoted, consistent = usual_and_unquoted(text, params["delimiter"])
        one_width = len({len(row) for row in unquoted}) == 1
        try:
            answer, *got = import_text(tmp_path / "stray.csv", text)
        except app_support.ReadError as e:
            if consistent or one_width or "never closed" not in str(e):
                problems.append(f"{where}: {e}")
            continue
        if consistent or not one_width:  # read with quotes: as a table, or ragged
            if answer.get("quoting"):
                problems.append(f"{where}: answer {answer}")
            elif consistent:
                problems.append(first_difference(where, got, oracle_table(usual)))
            continue
        unquoted_files += 1
        if answer.get("quoting") != "none":
            problems.append(f"{where}: answer {answer}")
            continue
        problems.append(first_difference(where, got, oracle_table(unquoted)))
    assert_none_differ(problems, "files")
    assert unquoted_files > MESSY_FILES // 4


def test_csv_engine_reads_single_quotes_and_escapes_only_where_rows_need_them(tmp_path):
    problems = []
    for index in range(MESSY_FILES):
        text, params, dialect = random_quoted_csv(MESSY_SEED, index)
        where = f"seed {MESSY_SEED} file {index} {params}"
        rows = [row for row in csv.reader(io.StringIO(text, newline=""), **dialect) if row]
        expected_answer = {
            "single": {"quotechar": "'"}, "escaped": {"escapechar": "\\"}, "apostrophes": {},
        }[params["kind"]]
        try:
            answer, *got = import_text(tmp_path / "quoted.csv", text)
        except app_support.ReadError as e:
            problems.append(f"{where}: {e}")
            continue
        answer.pop("format")
        if answer != expected_answer:
            problems.append(f"{where}: answer {answer} (expected {expected_answer})")
        elif params["kind"] != "apostrophes":  # ragged ones widen: their cells were checked by the answer alone
            problems.append(first_difference(where, got, (rows[0], *expected_table(rows[0], rows[1:]))))
        elif [row[0] for row in got[2]] != [row[0] for row in rows[1:]]:
            problems.append(f"{where}: first cells {got[2][:3]} (expected {rows[1:4]})")
    assert_none_differ(problems, "files")


# Words in each language, and the encodings Windows and Excel save it in.
LANGUAGE_WORDS = {
    "French": "café élève garçon déjà où être naïve hôtel crème brûlée façade noël forêt château",
    "German": "Straße Müller Größe Äpfel schön über Übung Öl Bäcker grün Fuß weiß Zürich",
    "Spanish": "niño año señor está corazón información canción mañana pequeño árbol jamás",
    "Portuguese": "ação informação não são coração também órgão pães cães avô irmã lições situação",
    "Japanese": "日本 東京 大阪 こんにちは ありがとう データ 株式会社 売上 合計 商品 名前 住所 電話 番号 さくら",
    "Chinese (simplified)": "中国 北京 上海 数据 销售 合计 产品 名称 地址 电话 号码 公司 我们 这个 发展 经济",
    "Chinese (traditional)": "臺灣 台北 資料 銷售 合計 產品 名稱 地址 電話 號碼 公司 我們 這個 發展 經濟 學校",
    "Korean": "한국 서울 부산 데이터 판매 합계 제품 이름 주소 전화 번호 회사 우리 안녕하세요 감사합니다",
}
LANGUAGE_ENCODINGS = {
    "French": ["cp1252", "latin-1"], "German": ["cp1252", "latin-1"], "Spanish": ["cp1252", "latin-1"],
    "Portuguese": ["cp1252", "latin-1"], "Japanese": ["cp932", "shift_jis"],
    "Chinese (simplified)": ["gb18030", "gbk", "gb2312"], "Chinese (traditional)": ["cp950", "big5"],
    "Korean": ["cp949", "euc_kr"],
}
ENCODING_SEED = 22_4_2026
ENCODING_FILES = 400


def test_csv_engine_reads_east_asian_and_western_code_pages_as_written(tmp_path):
    rng = random.Random(ENCODING_SEED)
    problems = []
    for index in range(ENCODING_FILES):
        language = rng.choice(list(LANGUAGE_WORDS))
        encoding = rng.choice(LANGUAGE_ENCODINGS[language])
        words = LANGUAGE_WORDS[language].split()
        header = ["id", rng.choice(words), "amount"]
        rows = [
            [str(i), " ".join(rng.choice(words) for _ in range(rng.randint(1, 3))), f"{rng.randint(0, 999)}.{rng.randint(0, 99)}"]
            # A Chinese file of a row or two can read as Korean: see the table in docs/how-it-reads.md.
            for i in range(rng.randint(5 if language.startswith("Chinese") else 1, 60))
        ]
        text = written([header] + rows)
        where = f"seed {ENCODING_SEED} file {index} ({language} in {encoding}, {len(rows)} rows)"
        path = write(tmp_path / "coded.csv", text.encode(encoding))
        problems.append(engine_problem(path, where, lambda conn, result: first_difference(
            where, stored_table(conn, result.table), (header, *expected_table(header, rows))
        )))
    assert_none_differ(problems, "files")


def test_json_engine_matches_json_module_on_generated_documents(tmp_path):
    problems = []
    for index in range(JSON_ENGINE_DOCUMENTS):
        path, params, objects = generated_json_file(tmp_path, index)
        detect_types = index % 7 != 3
        expected_answer = {"format": {"ndjson": "ndjson", "geojson": "geojson"}.get(params["shape"], "json")}
        if params["shape"] == "nested":
            expected_answer["json_path"] = "data.results"

        where = f"seed {JSON_SEED} document {index} {params}"

        def check(conn, result):
            if result.answer != expected_answer:
                return f"{where}: answer {result.answer} (expected {expected_answer})"
            return compare_json_import(params, objects, *stored_json_table(conn, result.table), detect_types)

        problems.append(engine_problem(path, where, check, detect_types=detect_types))
        path.unlink()
    assert_none_differ(problems, "documents")


async def test_open_csv_file_matches_json_module_on_generated_documents(ds, tmp_path):
    problems = []
    db = ds.get_database("temporary")
    for index in range(JSON_ENGINE_DOCUMENTS, JSON_ENGINE_DOCUMENTS + JSON_ENDPOINT_DOCUMENTS):
        path, params, objects = generated_json_file(tmp_path, index)
        response = await post(ds, "/-/open-csv-file", {"path": str(path)})
        if response.status_code != 200:
            problems.append(f"{params}: {response.status_code} {response.text}")
            continue
        answer = response.json()
        table = answer["path"].split("/")[-1]
        got = await db.execute_fn(lambda conn: stored_json_table(conn, table))
        problem = compare_json_import(params, objects, *got)
        if not problem and answer["rows"] != len(objects):
            problem = f"{params}: answered rows {answer['rows']}"
        problems.append(problem)
        await db.execute_write(f'drop table "{table}"')
    assert_none_differ(problems, "documents")


# ===== The import engine: reading large files in parts, by helper processes =====


PARTS_SEED = 21_11_2026
PARTS_FILES = 40


def split_points(path):
    """Where the engine would cut path into parts; [] when it reads the file whole."""
    plan = app_support.plan_file(str(path))
    processes = app_support._process_count(path.stat().st_size, plan)
    return app_support._split_points(str(path), processes, plan) if processes > 1 else []


def test_csv_engine_in_parts_matches_csv_module_on_generated_files(tmp_path, in_parts, helpers):
    problems, files, index = [], 0, 0
    while files < PARTS_FILES:
        content, params, _ = random_csv(PARTS_SEED, index)
        index += 1
        # Files that can be cut at an LF: UTF-16 and CR-only files are read whole.
        if params["encoding"] == "utf-16" or params["line_ending"] == "CR" or params["rows"] < 10:
            continue
        files += 1
        path, params, header, rows = check_generated_file(tmp_path, index - 1, PARTS_SEED)
        problems.append(parts_problem(path, f"seed {PARTS_SEED} file {index - 1} {params}", lambda conn, table: (
            compare_import(params, header, rows, *stored_table(conn, table))
        )))
    assert_none_differ(problems, "files")
    assert helpers and all(helper.poll() is not None for helper in helpers)


def test_csv_in_parts_merges_late_types_and_wider_rows(tmp_path, in_parts):
    lines = ["id,code,amount"] + [f"{i},{i % 7},{i}.25" for i in range(3000)]
    lines[2990] = "2989,seven,,extra,more"  # in the last part only: TEXT, and two more columns
    path = tmp_path / "late.csv"
    path.write_text("\n".join(lines) + "\n")
    conn = sqlite3.connect(":memory:", isolation_level=None)
    parts, table = import_counting_parts(conn, path, tmp_path / "work")
    names, declared, stored = stored_table(conn, table)
    assert parts == 3
    assert names == ["id", "code", "amount", "column_4", "column_5"]
    assert declared == ["INTEGER", "TEXT", "REAL", "TEXT", "TEXT"]
    assert stored[0] == (0, "0", 0.25, None, None)
    assert stored[2989] == (2989, "seven", None, "extra", "more")
    assert len(stored) == 3000 and [row[0] for row in stored] == list(range(2989)) + [2989] + list(range(2990, 3000))


@pytest.mark.parametrize("processes", [2, 3, 4])
def test_the_first_part_is_longer_by_the_head_start_helpers_need(tmp_path, monkeypatch, processes):
    # This process reads the first part at once; each helper starts later.
    monkeypatch.setattr(app_support, "HEAD_START_BYTES", 50_000)
    path = tmp_path / "rows.csv"
    path.write_text("id,name\n" + "".join(f"{i},name {i}\n" for i in range(200_000)))
    size = path.stat().st_size
    starts = [0, *app_support._split_points(str(path), processes, app_support.plan_file(str(path))), size]
    lengths = [end - start for start, end in zip(starts, starts[1:])]
    share = (size - 50_000) / processes
    # Each part starts at the first line start at or past its aim: at most 18
    # bytes past it, as no line is longer than 19.
    assert -1 < lengths[0] - 50_000 - share <= 18
    assert all(abs(length - share) < 20 for length in lengths[1:])


def test_csv_in_parts_reads_the_file_whole_when_a_stray_quote_misleads_the_split(tmp_path, monkeypatch):
    read_in_parts(monkeypatch, parts=2)
    # 12" is a quote inside an unquoted cell: counting quotes, the line breaks
    # inside the long quoted cell below look as if they were outside it.
    cell = "\n".join(f"line {i} of a long note" for i in range(300))
    lines = ["id,note", '1,12" pipe'] + [f"{i},plain" for i in range(2, 100)] + [f'100,"{cell}"', "101,last"]
    path = tmp_path / "stray.csv"
    path.write_text("\n".join(lines) + "\n")
    content = path.read_text()
    (split,) = split_points(path)
    assert content.index(cell) < split < content.index(cell) + len(cell), "the split is not misled"
    conn = sqlite3.connect(":memory:", isolation_level=None)
    parts, table = import_counting_parts(conn, path, tmp_path / "work")
    assert parts == 1
    _, _, stored = stored_table(conn, table)
    with open(path, newline="") as f:
        expected = [(int(i), note) for i, note in list(csv.reader(f))[1:]]
    assert stored == expected
    assert stored[99] == (100, cell) and stored[0] == (1, '12" pipe')


def test_csv_in_parts_skips_lines_above_the_header_and_reads_stray_quotes_unquoted(tmp_path, in_parts, helpers):
    problems = []
    for index in range(8):
        text, params, preamble, header, rows = random_titled_csv(MESSY_SEED, index, rows=3000)
        if index % 2:  # a cell on the first line starts a quote nothing closes
            text = text.replace(params["line_ending"] + header[0], params["line_ending"] + '"' + header[0], 1)
            header = ['"' + header[0]] + header[1:]
            rows = [[cell.replace(params["delimiter"], " ") for cell in row] for row in rows]
            text = preamble_and(text, params, preamble, header, rows)
        path = write(tmp_path / f"titled{index}.csv", text)
        where = f"seed {MESSY_SEED} file {index} {params}"

        def check(conn, table):
            return first_difference(where, stored_table(conn, table), (header, *expected_table(header, rows)))

        problems.append(parts_problem(path, where, check, at_least=3))
        plan = app_support.plan_file(str(path))
        if plan.answer().get("skipped_lines") != preamble or (plan.quotechar is None) != bool(index % 2):
            problems.append(f"{where}: answer {plan.answer()}")
    assert_none_differ(problems, "files")
    assert helpers


def preamble_and(text, params, preamble, header, rows):
    """The file again: the preamble's lines, then header and rows written with no quoting at all."""
    ending, delimiter = params["line_ending"], params["delimiter"]
    lines = preamble + [delimiter.join(header)] + [delimiter.join(row) for row in rows]
    return ending.join(lines) + ending


def parts_problem(path, where, check, at_least=2):
    """Import path through the engine, in parts; return what check(conn, table) finds
    wrong, or that it was read in too few parts, or what went wrong on the way, after where."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    try:
        parts, table = import_counting_parts(conn, path, path.with_suffix(".work"))
        return check(conn, table) or (f"{where}: read in {parts} parts" if parts < at_least else None)
    except Exception as e:
        return f"{where}: {type(e).__name__}: {e}"
    finally:
        conn.close()


def stage_error(path, folder):
    folder.mkdir(exist_ok=True)
    with pytest.raises(app_support.ReadError) as error:
        app_support.stage_file(str(path), str(folder / "staging.db"))
    return error.value.message


@pytest.mark.parametrize("line", [600, 1500, 2950])  # in the first, second and third part
@pytest.mark.parametrize("case", ["unclosed quote", "NUL byte", "too many columns"])
def test_csv_in_parts_errors_name_the_same_line_as_in_one_piece(tmp_path, monkeypatch, case, line):
    rows = [f"{i},row number {i}" for i in range(3000)]
    rows[line] = {
        "unclosed quote": f'{line},"never, closed',
        "NUL byte": f"{line},nul\x00here",
        "too many columns": ",".join(["x"] * 2001),
    }[case]
    path = tmp_path / "bad.csv"
    # Mixed line endings: each part counts the lines before it as csv does.
    path.write_bytes("".join(row + ("\r\n" if i % 3 else "\n") for i, row in enumerate(["id,name"] + rows)).encode())
    whole = stage_error(path, tmp_path / "whole")
    read_in_parts(monkeypatch)
    # Quotes are counted to place the splits: past a quote that never closes,
    # or a NUL byte, there are none.
    splits = {600: 0, 1500: 1, 2950: 2}[line] if case != "too many columns" else 2
    assert len(split_points(path)) == splits
    assert stage_error(path, tmp_path / "parts") == whole
    assert f"line {line + 2}" in whole or case == "too many columns"


def bytes_read_by_this_process():
    """What this process has read from files and pipes so far (Linux's rchar)."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="counts reads with Linux's /proc/self/io")
@pytest.mark.parametrize("shape", ["csv", "ndjson", "json array"])
def test_a_bad_byte_deep_in_a_huge_file_is_found_without_reading_the_rest(tmp_path, helpers, shape):
    # Valid rows, then 64 GB of NUL bytes: a sparse file, as a download
    # the disk preallocated looks. The first bad byte is at offset N, and
    # the refusal must cost a read of about N bytes, not of the file.
    rows = [f"{i},name {i}" for i in range(100_000)] if shape == "csv" else [json.dumps({"id": i, "name": f"name {i}"}) for i in range(100_000)]
    text = {"csv": "id,name\n" + "\n".join(rows) + "\n", "ndjson": "\n".join(rows) + "\n", "json array": "[" + ",\n".join(rows) + ",\n"}[shape]
    path = tmp_path / "huge.data"
    with open(path, "wb") as f:
        f.write(text.encode())
        f.truncate(64 * 2**30)
    assert path.stat().st_blocks * 512 < 64 * 2**20, "this file system has no sparse files"
    before = bytes_read_by_this_process()
    error = stage_error(path, tmp_path / "work")
    assert "NUL byte" in error and f"line {text.count(chr(10)) + 1}" in error
    assert bytes_read_by_this_process() - before < 16 * len(text) + 64 * 2**20
    assert helpers == []  # nothing to split at: no part past the NUL bytes


@pytest.mark.parametrize("python", ["/nonexistent/python3", "/bin/false"])
def test_csv_in_parts_reads_the_file_whole_when_helpers_cannot_run(tmp_path, in_parts, monkeypatch, python):
    # /bin/false starts, and ends without a word: a helper that dies.
    monkeypatch.setattr(sys, "executable", python)
    path = tmp_path / "data.csv"
    path.write_text("a,b\n" + "".join(f"{i},{i * 2}\n" for i in range(2000)))
    assert len(split_points(path)) == 2, "the file would not be read in parts anyway"
    conn = sqlite3.connect(":memory:", isolation_level=None)
    parts, table = import_counting_parts(conn, path, tmp_path / "work")
    assert parts == 1
    assert stored_table(conn, table)[1:] == (["INTEGER", "INTEGER"], [(i, i * 2) for i in range(2000)])


def test_csv_in_parts_helpers_need_no_datasette(tmp_path, in_parts, monkeypatch):
    python = "/usr/bin/python3"
    check = subprocess.run([python, "-c", "import datasette"], capture_output=True) if os.path.exists(python) else None
    if check is None or check.returncode == 0:
        pytest.skip(f"{python} is missing, or has datasette")
    monkeypatch.setattr(sys, "executable", python)
    path = tmp_path / "data.csv"
    path.write_text("a,b\n" + "".join(f"{i},{i * 2}.5\n" for i in range(2000)))
    conn = sqlite3.connect(":memory:", isolation_level=None)
    parts, table = import_counting_parts(conn, path, tmp_path / "work")
    assert parts == 3
    assert stored_table(conn, table)[1:] == (["INTEGER", "REAL"], [(i, i * 2 + 0.5) for i in range(2000)])


@pytest.mark.parametrize("database", ["temporary", "target"])
async def test_import_csv_file_in_parts(ds, tmp_path, in_parts, helpers, database):
    if database != "temporary":
        await post(ds, "/-/new-empty-database-file", {"path": str(tmp_path / "target.db")})
    path = tmp_path / "people.csv"
    path.write_text("id,zip,score\n" + "".join(f"{i},{i:05d},{i / 4}\n" for i in range(5000)))
    response = await post(ds, "/-/import-csv-file", {"path": str(path), "database": database})
    assert response.status_code == 200, response.text
    assert response.json()["rows"] == 5000
    assert len(helpers) == 2, "the file was not read in parts"
    db = ds.get_database(database)
    _, declared, stored = await db.execute_fn(lambda conn: stored_table(conn, "people"))
    assert declared == ["INTEGER", "TEXT", "REAL"]
    assert stored == [(i, f"{i:05d}", i / 4) for i in range(5000)]
    (final,) = await progress(ds)
    assert (final["state"], final["rows"]) == ("done", 5000)
    assert work_folders() == [] and all(helper.poll() is not None for helper in helpers)


@pytest.mark.skipif(app_support._cpu_count() < 2, reason="one CPU: large files are read in one part")
def test_large_csv_read_in_parts_by_a_server_started_as_the_app_starts_it(app_server, tmp_path):
    big = write_big_csv(tmp_path / "big.csv", 1_400_000)
    assert big.stat().st_size >= app_support.PARALLEL_MIN_BYTES
    # The app's whole environment (AppServer.ENVIRONMENT): no PATH and no HOME for the helpers to rely on.
    answer, seen = [], set()
    thread = threading.Thread(target=lambda: answer.append(app_server.call("/-/open-csv-file", {"path": str(big)})))
    thread.start()
    while thread.is_alive():
        seen.update(server_work_files(app_server))
        time.sleep(0.02)
    status, _, body = answer[0]
    assert status == 200, body
    assert json.loads(body)["rows"] == 1_400_000
    # A helper process stages its part in a database of its own.
    assert "staging.db-1" in seen, f"no helper process read a part of the file: {sorted(seen)}"
    assert server_work_files(app_server) == []
    status, _, body = app_server.call("/-/dump-temporary-to-file", {"path": str(tmp_path / "dump.db")})
    assert status == 200, body
    conn = sqlite3.connect(tmp_path / "dump.db")
    sums = conn.execute("select count(*), sum(id), sum(score), max(name) from big").fetchone()
    assert sums == (1_400_000, sum(range(1_400_000)), sum(i * 1.5 for i in range(1_400_000)), "name 999999")
    conn.close()


def test_json_engine_in_parts_matches_json_module(tmp_path, in_parts, helpers):
    problems, done, index = [], 0, 0
    while done < JSON_PARTS_DOCUMENTS:
        content, params, _ = random_json_document(JSON_SEED + 1, index, shapes=("array", "ndjson"))
        index += 1
        if params["rows"] < 10 or params["layout"] == "one line":
            continue  # no line breaks between objects: read whole
        done += 1
        path, params, objects = generated_json_file(tmp_path, index - 1, JSON_SEED + 1, shapes=("array", "ndjson"))
        # An indented array may have a line break before an object in a nested
        # array where a part would start; then it is read whole, rightly.
        problems.append(parts_problem(
            path, f"seed {JSON_SEED + 1} document {index - 1} {params}",
            lambda conn, table: compare_json_import(params, objects, *stored_json_table(conn, table)),
            at_least=1 if params["layout"] == "indented" else 2,
        ))
    assert_none_differ(problems, "documents")
    assert helpers and all(helper.poll() is not None for helper in helpers)


# ===== /-/open-csv-from-url =====


def zipped(members):
    """A zip archive holding {name: content}."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return buffer.getvalue()


URL_CASES = [
    ("plain", "/dogs.csv", {"/dogs.csv": (200, {}, CSV_BODY)}, "dogs"),
    ("redirect", "/old.csv", {"/old.csv": (302, {"Location": "/new/dogs.csv"}, b""), "/new/dogs.csv": (200, {}, CSV_BODY)}, "dogs"),
    ("gzip by header", "/z.csv", {"/z.csv": (200, {"Content-Encoding": "gzip"}, gzip.compress(CSV_BODY))}, "z"),
    ("gzip by extension", "/g.csv.gz", {"/g.csv.gz": (200, {}, gzip.compress(CSV_BODY))}, "g"),
    ("zip with one csv", "/a.zip", {"/a.zip": (200, {}, zipped({"inner.csv": CSV_BODY, "README": b"x"}))}, "a"),
    ("latin-1 with charset", "/l.csv", {"/l.csv": (200, {"Content-Type": "text/csv; charset=latin-1"}, b"id,name\n1,Cleo\n2,S\xe3o\n")}, "l"),
    ("no path segment", "/", {"/": (200, {}, CSV_BODY)}, "data"),
    ("NUL in the name", "/a%00b.csv", {"/a%00b.csv": (200, {}, CSV_BODY)}, "a_b"),
]


@pytest.mark.parametrize("name,url_path,routes,table", URL_CASES, ids=[c[0] for c in URL_CASES])
async def test_open_csv_from_url(ds, server, name, url_path, routes, table):
    base, server_routes = server
    server_routes.update(routes)
    response = await post(ds, "/-/open-csv-from-url", {"url": base + url_path})
    assert response.json() == {"ok": True, "path": f"/temporary/{table}", "rows": 2, "format": "csv"}, response.text
    stored = await rows(ds, "temporary", f'select id, name from "{table}"')
    assert stored[0] == (1, "Cleo")
    if name.startswith("latin"):
        assert stored[1] == (2, "São")
    assert (await ds.client.get(f"/temporary/{table}")).status_code == 200


async def test_open_csv_from_url_table_name_and_database(ds, server, tmp_path):
    base, routes = server
    routes["/dogs.csv"] = (200, {}, CSV_BODY)
    db_path = make_db(tmp_path / "target.db", table="my table")
    await post(ds, "/-/open-database-file", {"path": str(db_path)})
    body = {"url": base + "/dogs.csv", "table_name": "my table", "database": "target"}
    response = await post(ds, "/-/open-csv-from-url", body)
    assert response.json() == {"ok": True, "path": ds.urls.table("target", "my table_2"), "rows": 2, "format": "csv"}
    null_options = {"url": base + "/dogs.csv", "table_name": None, "database": None}
    assert (await post(ds, "/-/open-csv-from-url", null_options)).json()["path"] == "/temporary/dogs"


async def test_open_csv_from_url_honours_declared_charset(ds, server):
    base, routes = server
    routes["/greek.csv"] = (200, {"Content-Type": "text/csv; charset=iso-8859-7"}, b"word\n\xe1\xe2\n")
    routes["/mislabelled.csv"] = (
        200, {"Content-Type": "text/csv; charset=ISO-8859-1"}, "word\nSão\n".encode("utf-8"),
    )
    for path, expected in (("/greek.csv", "αβ"), ("/mislabelled.csv", "São")):
        response = (await post(ds, "/-/open-csv-from-url", {"url": base + path})).json()
        table = response["path"].split("/")[-1]
        assert await rows(ds, "temporary", f"select word from {table}") == [(expected,)]


async def test_open_csv_from_url_encodes_non_ascii_as_a_browser_does(ds, server):
    base, routes = server
    routes["/caf%C3%A9%20menu.csv"] = (200, {}, CSV_BODY)
    response = await post(ds, "/-/open-csv-from-url", {"url": base + "/café menu.csv"})
    assert response.json() == {"ok": True, "path": ds.urls.table("temporary", "café menu"), "rows": 2, "format": "csv"}
    assert app_support._check_url("https://bücher.example/ä.csv?q=é") == (
        "https://xn--bcher-kva.example/%C3%A4.csv?q=%C3%A9"
    )


def closes_early(handler):
    """A route that promises 100,000 bytes, sends a few hundred and hangs up."""

    def body(wfile):
        wfile.write(b"a,b\n" + b"1,2\n" * 100)
        handler.close_connection = True

    return 200, {"Content-Length": "100000"}, body


@pytest.mark.parametrize(
    "url,routes,error",
    [
        ("{base}/missing.csv", {}, "returned HTTP 404 Not Found: there is no file at that address. Check the URL and try again."),
        ("{base}/private.csv", {"/private.csv": (403, {}, b"no")}, "returned HTTP 403 Forbidden: the site wants a sign-in or refuses to share the file. Download it in a browser, then open the downloaded file."),
        ("{base}/busy.csv", {"/busy.csv": (429, {}, b"slow down")}, "returned HTTP 429 Too Many Requests: the site is getting too many requests. Wait a minute and try again."),
        ("{base}/down.csv", {"/down.csv": (503, {}, b"down")}, "returned HTTP 503 Service Unavailable: the site failed to answer. Try again later."),
        ("{base}/odd.csv", {"/odd.csv": (499, {}, b"odd")}, "returned HTTP 499: the site refused the request. Check the URL and try again."),
        ("{base}/to-file", {"/to-file": (302, {"Location": "file:///etc/passwd"}, b"")}, "not an http or https URL"),
        ("{base}/loop", {"/loop": (302, {"Location": "/loop"}, b"")}, "redirect"),
        ("{base}/two.zip", {"/two.zip": (200, {}, zipped({"a.csv": CSV_BODY, "b.csv": CSV_BODY}))}, "exactly one"),
        ("{base}/empty.csv", {"/empty.csv": (200, {}, b"")}, "empty"),
        ("{base}/bad.gz", {"/bad.gz": (200, {"Content-Encoding": "gzip"}, b"\x1f\x8bnot gzip")}, "marked its answer as gzip-compressed, but it is not"),
        ("{base}/cut.csv", {"/cut.csv": closes_early}, "connection closed"),
        ("file:///etc/passwd", {}, "Only http:// and https://"),
        ("ftp://example.com/x.csv", {}, "Only http:// and https://"),
        ("data:text/csv,a%0A1", {}, "Only http:// and https://"),
        ("javascript:alert(1)", {}, "Only http:// and https://"),
        ("/relative.csv", {}, "Only http:// and https://"),
        ("", {}, "Only http:// and https://"),
        (None, {}, "The request has no url, which this endpoint needs. " + KEYS_TAKEN["/-/open-csv-from-url"]),
    ],
    ids=[
        "404", "403", "429", "503", "a status of the server's own", "redirect to a file URL", "redirect loop", "zip of two files", "empty body", "bad gzip",
        "connection closed early", "file", "ftp", "data", "javascript", "relative", "empty url", "no url",
    ],
)
async def test_open_csv_from_url_errors(ds, server, tmp_path, temp_dir, url, routes, error):
    base, server_routes = server
    server_routes.update(routes)
    body = {"url": url.format(base=base) if url else url}
    await assert_refused(ds, tmp_path, "/-/open-csv-from-url", body, 400, error)
    assert await tables(ds) == [] and work_folders(temp_dir) == []


@pytest.mark.parametrize(
    "url,error",
    [
        ("http://no-such-host.invalid/dogs.csv", "the host no-such-host.invalid could not be found. Check the address, and that this computer is online."),
        ("http://127.0.0.1:{port}/dogs.csv", "refused the connection: no web server is answering there."),
        ("https://{host}/dogs.csv", "the secure (https) connection to 127.0.0.1 failed"),
    ],
    ids=["unknown host", "refused", "https to an http server"],
)
async def test_open_csv_from_url_network_failures_in_words(ds, server, tmp_path, url, error):
    base, _ = server
    url = url.format(port=unused_port(), host=urllib.parse.urlsplit(base).netloc)
    response = await assert_refused(ds, tmp_path, "/-/open-csv-from-url", {"url": url}, 400, f"Could not download {url}: ")
    assert error in response.json()["error"] and "Errno" not in response.json()["error"]


async def test_open_csv_from_url_timeout_from_plugin_config(server):
    base, routes = server

    released = threading.Event()

    def slow(handler):
        def body(wfile):
            wfile.write(b"a\n1\n")
            wfile.flush()
            released.wait(30)

        return 200, {}, body

    routes["/slow.csv"] = slow
    ds = await with_settings(url_timeout=0.5)
    response = await post(ds, "/-/open-csv-from-url", {"url": base + "/slow.csv"})
    released.set()
    # Without the setting the read would wait out the server's 30 s and succeed.
    assert_error(response, 400, "127.0.0.1 did not answer within 0.5 seconds.")
    assert await tables(ds) == []


async def test_open_csv_from_url_connect_timeout(tmp_path):
    # A listener whose backlog is full never completes another connect.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        while True:
            filler = socket.socket()
            filler.settimeout(0.3)
            fillers.append(filler)
            filler.connect(("127.0.0.1", port))
    except OSError:
        pass
    ds = await with_settings(url_timeout=0.5)
    try:
        response = await post(ds, "/-/open-csv-from-url", {"url": f"http://127.0.0.1:{port}/x.csv"})
        # The setting's 0.5 s, not the system's connect timeout of about two minutes.
        assert_error(response, 400, "127.0.0.1 did not answer within 0.5 seconds.")
    finally:
        for s in fillers + [listener]:
            s.close()


async def test_open_csv_from_url_large_body_keeps_server_responsive(ds, server):
    base, routes = server
    line = b"1,some text here,2.5\n"

    def large(handler):
        def body(wfile):
            wfile.write(b"a,b,c\n")
            for _ in range(200):
                wfile.write(line * 2000)
                time.sleep(0.005)

        return 200, {}, body

    routes["/large.csv"] = large
    task = asyncio.ensure_future(post(ds, "/-/open-csv-from-url", {"url": base + "/large.csv"}))
    statuses = []
    while not task.done():
        statuses.append((await ds.client.get("/temporary.json")).status_code)
        await asyncio.sleep(0.02)
    assert (await task).json()["rows"] == 400_000
    assert len(statuses) >= 10 and set(statuses) == {200}


JSON_URLS = [
    ("json", "/dogs.json", {"/dogs.json": (200, {"Content-Type": "application/json"}, DOGS_JSON)}, "dogs", "json"),
    ("gzip encoding", "/dogs.json", {"/dogs.json": (200, {"Content-Encoding": "gzip"}, gzip.compress(DOGS_JSON))}, "dogs", "json"),
    (".json.gz", "/dogs.json.gz", {"/dogs.json.gz": (200, {}, gzip.compress(DOGS_NDJSON))}, "dogs", "ndjson"),
    ("zip holding one json file", "/dogs.json.zip", {"/dogs.json.zip": (200, {}, zipped({"dogs.json": DOGS_JSON, "README": b"x"}))}, "dogs", "json"),
    ("geojson", "/places.geojson", {"/places.geojson": (200, {}, json.dumps({"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {"id": 1, "name": "Cleo"}, "geometry": None}, {"type": "Feature", "properties": {"id": 2, "name": "Pancakes"}, "geometry": None}]}).encode())}, "places", "geojson"),
]


@pytest.mark.parametrize("name,url_path,routes,table,fmt", JSON_URLS, ids=[u[0] for u in JSON_URLS])
async def test_open_csv_from_url_json(ds, server, name, url_path, routes, table, fmt):
    base, server_routes = server
    server_routes.update(routes)
    response = await post(ds, "/-/open-csv-from-url", {"url": base + url_path})
    assert response.json() == {"ok": True, "path": f"/temporary/{table}", "rows": 2, "format": fmt}, response.text
    assert await rows(ds, "temporary", f'select id, name from "{table}"') == [(1, "Cleo"), (2, "Pancakes")]


async def test_open_csv_from_url_refuses_a_web_page_naming_the_final_url(ds, server):
    base, routes = server
    page = b"<!DOCTYPE HTML>\n<html><body>Not data</body></html>"
    routes["/dogs.csv"] = (302, {"Location": "/login"}, b"")
    routes["/login"] = (200, {"Content-Type": "text/html; charset=utf-8"}, page)
    routes["/sniffed.csv"] = (200, {"Content-Type": "application/octet-stream"}, page)
    for url_path, final in (("/dogs.csv", "/login"), ("/sniffed.csv", "/sniffed.csv")):
        response = await post(ds, "/-/open-csv-from-url", {"url": base + url_path})
        assert_error(response, 400, f"{base}{final} is a web page (HTML), not CSV, TSV or JSON data.")
    assert await tables(ds) == [] and work_folders() == []


async def test_open_csv_from_url_xlsx(ds, server, tmp_path):
    base, routes = server
    content = pets_workbook(tmp_path / "pets.xlsx").read_bytes()
    routes["/files/pets.xlsx"] = (
        200, {"Content-Type": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"}, content,
    )
    # A workbook is a zip, but never unpacked as a zip holding one data file.
    routes["/download"] = (200, {"Content-Type": "application/octet-stream"}, content)
    for url_path, wanted in (("/files/pets.xlsx", "pets"), ("/download", "animals")):
        body = {"url": base + url_path, **({"table_name": wanted} if wanted == "animals" else {})}
        answer = (await post(ds, "/-/open-csv-from-url", body)).json()
        assert answer == {
            "ok": True, "path": f"/temporary/{wanted}_Dogs", "rows": 2, "format": "xlsx",
            "tables": [
                {"table": f"{wanted}_Dogs", "path": f"/temporary/{wanted}_Dogs", "rows": 2},
                {"table": f"{wanted}_Cats", "path": f"/temporary/{wanted}_Cats", "rows": 1},
            ],
        }
        assert await rows(ds, "temporary", f'select name from "{wanted}_Cats"') == [("Milo",)]


async def test_open_csv_from_url_refuses_a_directory_listing(ds, tmp_path):
    (tmp_path / "dogs.csv").write_bytes(b"id\n1\n")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/"
        response = await post(ds, "/-/open-csv-from-url", {"url": url})
        assert_error(response, 400, f"{url} is a web page (HTML), not CSV, TSV or JSON data.")
        # The same server's file still imports.
        assert (await post(ds, "/-/open-csv-from-url", {"url": url + "dogs.csv"})).json()["rows"] == 1
    finally:
        httpd.shutdown()
        httpd.server_close()


# ===== /-/open-csv-from-url: limits on what a download may cost =====


def gzip_bomb(megabytes):
    """A small gzip stream that expands to megabytes of one repeated CSV line."""
    line = b"0,0,0,0,0,0,0,0,0,0,0,0,0,0,0\n"
    block = line * (1024 * 1024 // len(line))
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=9) as out:
        out.write(b"a,b,c,d,e,f,g,h,i,j,k,l,m,n,o\n")
        for _ in range(megabytes):
            out.write(block)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def bombs():
    gz = gzip_bomb(64)  # 64 MB from a few hundred KB: bounded even if nothing stops it
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open("bomb.csv", "w") as member:
            member.write(gzip.decompress(gz))
    return {"gz": gz, "zip": buffer.getvalue()}


@pytest.mark.parametrize("kind", ["gz file", "gzip encoding", "zip file"])
async def test_open_csv_from_url_refuses_decompression_bombs(ds, server, temp_dir, bombs, kind):
    base, routes = server
    url_path, route = {
        "gz file": ("/bomb.csv.gz", (200, {}, bombs["gz"])),
        "gzip encoding": ("/bomb.csv", (200, {"Content-Encoding": "gzip"}, bombs["gz"])),
        "zip file": ("/bomb.zip", (200, {}, bombs["zip"])),
    }[kind]
    routes[url_path] = route
    response = await post(ds, "/-/open-csv-from-url", {"url": base + url_path})
    assert_error(response, 400, "decompression bomb")
    assert await tables(ds) == [] and work_folders(temp_dir) == []


def endless(chunked):
    """A route that sends CSV rows for ever: until 64 MB, as the test's own safety stop."""

    def route(handler):
        def body(wfile):
            row = b"1,2,3\n" * 10_000
            wfile.write((b"%x\r\n" % 6 + b"a,b,c\n\r\n") if chunked else b"a,b,c\n")
            for _ in range(64 * 1024 * 1024 // len(row)):
                try:
                    wfile.write((b"%x\r\n" % len(row) + row + b"\r\n") if chunked else row)
                except OSError:
                    return
            handler.close_connection = True

        return 200, {"Transfer-Encoding": "chunked"} if chunked else {}, body

    return route


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "until closed"])
async def test_open_csv_from_url_endless_body_stops_at_size_limit(server, temp_dir, chunked):
    base, routes = server
    routes["/endless.csv"] = endless(chunked)
    ds = await with_settings(url_size_limit_mb=2)
    response = await post(ds, "/-/open-csv-from-url", {"url": base + "/endless.csv"})
    assert_error(response, 400, "larger than 2 MB uncompressed. The app_support setting url_size_limit_mb")
    assert await tables(ds) == [] and work_folders(temp_dir) == []


async def test_open_csv_from_url_trickle_stops_at_time_limit(server, temp_dir):
    base, routes = server

    def trickle(handler):
        def body(wfile):
            for byte in b"a,b\n" + b"1,2\n" * 10:  # 44 seconds at most: the safety stop
                try:
                    wfile.write(bytes([byte]))
                    wfile.flush()
                except OSError:
                    return
                time.sleep(1)

        return 200, {"Content-Length": "44"}, body

    routes["/trickle.csv"] = trickle
    ds = await with_settings(url_time_limit=1.5, url_timeout=5)
    # Each byte comes within url_timeout, so only the whole-download limit can stop it.
    response = await post(ds, "/-/open-csv-from-url", {"url": base + "/trickle.csv"})
    assert_error(response, 400, "longer than 1.5 seconds. The app_support setting url_time_limit")
    assert await tables(ds) == [] and work_folders(temp_dir) == []


async def test_open_csv_from_url_refuses_to_start_on_a_full_temp_disk(ds, server, small_disk, monkeypatch):
    base, routes = server
    routes["/dogs.csv"] = (200, {}, CSV_BODY)
    disk = small_disk(size="2m")
    monkeypatch.setattr(tempfile, "tempdir", str(disk))
    response = await post(ds, "/-/open-csv-from-url", {"url": base + "/dogs.csv"})
    assert_error(response, 400, "The disk is nearly full")
    assert await tables(ds) == [] and work_folders(disk) == []


async def test_open_csv_from_url_stops_when_the_temp_disk_fills(ds, server, small_disk, monkeypatch):
    base, routes = server
    routes["/big.csv"] = (200, {}, b"a,b\n" + b"12345,67890\n" * (1024 * 1024))  # 12 MB
    disk = small_disk(size="16m")
    monkeypatch.setattr(tempfile, "tempdir", str(disk))
    monkeypatch.setattr(app_support, "DISK_MARGIN_BYTES", 8 * 1024 * 1024)
    response = await post(ds, "/-/open-csv-from-url", {"url": base + "/big.csv"})
    assert_error(response, 400, "The disk is nearly full")
    assert await tables(ds) == [] and work_folders(disk) == []


async def test_download_limit_settings_must_be_numbers(server):
    ds = await with_settings(url_time_limit="soon")
    response = await post(ds, "/-/open-csv-from-url", {"url": server[0] + "/x.csv"})
    assert_error(response, 400, "url_time_limit must be a number")


# ===== Reading options: the import endpoints, read as the user says =====
#
# Generated files from a fixed seed, each imported with a random set of
# reading options, and checked cell by cell against Python's csv module
# reading the same bytes with the same options: in one process, in parts,
# and as the preview shows them.


OPTIONS_SEED = 29_2026
OPTIONS_FILES = 120
PREAMBLES = ["Sales report 2024", "Exported: a,b;c|d", "", "# id,name", "Région; Zürich", "1,2,3"]


def random_options_csv(seed, index):
    """A CSV file as bytes, the reading options to import it with, and the csv module's options for it."""
    rng = random.Random(f"{seed}:{index}")
    delimiter = rng.choice([",", ";", "\t", "|"])
    quoting = rng.choice(["standard", "standard", "none"])
    encoding = rng.choice(["utf-8", "utf-8", "cp1252", "utf-16"])
    width = rng.randint(1, 6)
    count = rng.choice([0, 1, 2, 5, 30, 80]) if index % 40 != 7 else 3000
    kinds = [rng.choice(["int", "real", "zip", "flag", "count", "text", "awkward"]) for _ in range(width)]
    latin = encoding == "cp1252"
    rows = [[random_cell(rng, kind, delimiter, latin) for kind in kinds] for _ in range(count)]
    if quoting == "none":  # nothing to quote a delimiter or a line break with: quotes are text
        rows = [[c if not any(x in c for x in (delimiter, "\r", "\n")) else 'a "quote' for c in row] for row in rows]
        rows = [row if row != [""] else ["x"] for row in rows]  # it would be a blank line
    header = [f"h{i}" for i in range(width)]
    preamble = rng.sample(PREAMBLES, rng.randint(0, 3))
    ending = rng.choice(["\n", "\r\n"])
    buffer = io.StringIO(newline="")
    dialect = {"delimiter": delimiter, "lineterminator": ending}
    dialect.update({"quoting": csv.QUOTE_NONE, "quotechar": None, "escapechar": None} if quoting == "none" else {})
    csv.writer(buffer, **dialect).writerows([header] + rows)
    text = "".join(line + ending for line in preamble) + buffer.getvalue()
    options = {"delimiter": delimiter, "skip_lines": len(preamble)}
    if not preamble and rng.random() < 0.5:
        del options["skip_lines"]
    if quoting == "none" or rng.random() < 0.3:
        options["quoting"] = quoting
    header_given = rng.random() < 0.4
    if header_given or rng.random() < 0.3:
        options["header"] = not header_given
    if rng.random() < 0.4:
        options["encoding"] = encoding
    types = {name: "TEXT" for name in header if rng.random() < 0.25}
    if types and options.get("header", True):
        options["types"] = types
    return text.encode("utf-16" if encoding == "utf-16" else encoding), options, encoding


def csv_module_reading(path, options, encoding):
    """(column names, declared types, stored rows) that the csv module's reading with options asks for."""
    with open(path, newline="", encoding=encoding) as f:
        lines = f.readlines()[options.get("skip_lines", 0):]
    dialect = {"delimiter": options["delimiter"]}
    if options.get("quoting") == "none":
        dialect.update(quoting=csv.QUOTE_NONE)
    rows = [row for row in csv.reader(lines, **dialect) if row]
    if options.get("header", True) is not False:
        names, rows = rows[0], rows[1:]
    else:
        names = [f"column_{i}" for i in range(1, len(rows[0]) + 1)]
    declared, stored = expected_table(names, rows)
    forced = [i for i, name in enumerate(names) if options.get("types", {}).get(name) == "TEXT"]
    for i in forced:
        declared[i] = "TEXT"
    stored = [
        tuple(row[i] if i in forced and i < len(row) else value for i, value in enumerate(values))
        for row, values in zip(rows, stored)
    ]
    return names, declared, stored


async def import_with_options(ds, path, options, database):
    response = await post(ds, "/-/import-csv-file", {"path": str(path), "database": database, **options})
    assert response.status_code == 200, (options, response.text)
    return response.json()


async def test_reading_options_differ_from_the_csv_module_in_no_cell(ds, tmp_path):
    db_path = tmp_path / "options.db"
    await post(ds, "/-/new-empty-database-file", {"path": str(db_path)})
    problems = []
    for index in range(OPTIONS_FILES):
        content, options, encoding = random_options_csv(OPTIONS_SEED, index)
        path = write(tmp_path / f"o{index}.csv", content)
        expected = csv_module_reading(path, options, encoding)
        answer = await import_with_options(ds, path, options, "options")
        table = answer["path"].rsplit("/", 1)[1]
        with sqlite3.connect(db_path) as conn:
            got = stored_table(conn, urllib.parse.unquote(table))
        problems.append(first_difference(f"file {index} {options}", got, expected))
        # The preview of a file it reads whole shows the first rows and the types of that table.
        preview = (await post(ds, "/-/preview-import", {"path": str(path), **options})).json()
        assert preview["complete"] is True, preview
        shown = ([c["name"] for c in preview["columns"]], [c["type"] for c in preview["columns"]],
                 [tuple(row) for row in preview["rows"]])
        problems.append(first_difference(f"preview {index} {options}", shown, (got[0], got[1], got[2][:20])))
    assert_none_differ(problems, "generated files and previews")


async def test_reading_options_in_parts_as_in_one_process(ds, tmp_path, monkeypatch, helpers):
    whole = []
    files = [random_options_csv(OPTIONS_SEED, index) for index in range(0, OPTIONS_FILES, 4)]
    for index, (content, options, encoding) in enumerate(files):
        path = write(tmp_path / f"w{index}.csv", content)
        answer = await import_with_options(ds, path, {**options, "table_name": f"w{index}"}, "temporary")
        whole.append(await rows(ds, "temporary", f'select * from "{answer["path"].rsplit("/", 1)[1]}" order by rowid'))
    read_in_parts(monkeypatch)
    for index, (content, options, encoding) in enumerate(files):
        path = tmp_path / f"w{index}.csv"
        answer = await import_with_options(ds, path, {**options, "table_name": f"p{index}"}, "temporary")
        parts = await rows(ds, "temporary", f'select * from "{answer["path"].rsplit("/", 1)[1]}" order by rowid')
        assert parts == whole[index], (index, options)
        assert column_types_of(ds, f"p{index}") == column_types_of(ds, f"w{index}")
    assert len(helpers) >= 10  # most files were read in parts, by helper processes


def column_types_of(ds, table):
    conn = ds.get_database("temporary").connect()
    try:
        return column_types(conn, table)
    finally:
        conn.close()

async def test_json_path_and_types_differ_from_the_json_module_in_no_cell(ds, tmp_path):
    problems = []
    for index in range(60):
        content, params, _ = random_json_document(OPTIONS_SEED, index, shapes=("nested",))
        path = write(tmp_path / f"j{index}.json", content)
        data = json.loads(content)
        rng = random.Random(f"{OPTIONS_SEED}:json:{index}")
        json_path = rng.choice(["data.results", "meta.also"]) if data["meta"]["also"] else "data.results"
        objects = data["data"]["results"] if json_path == "data.results" else data["meta"]["also"]
        names, declared, stored = expected_json_table(objects)
        forced = [i for i in range(len(names)) if rng.random() < 0.3]
        for i in forced:
            declared[i] = "TEXT"
        keys = list(dict.fromkeys(key for item in objects for key in item))
        stored = [
            tuple(reference_json_text(item[keys[i]]) if i in forced and item.get(keys[i]) is not None else value
                  for i, value in enumerate(row))
            for item, row in zip(objects, stored)
        ]
        options = {"json_path": json_path, "types": {names[i]: "TEXT" for i in forced}}
        answer = (await post(ds, "/-/open-csv-file", {"path": str(path), "table_name": f"j{index}", **options})).json()
        assert answer["json_path"] == json_path, answer
        got = await rows(ds, "temporary", f'select * from "j{index}" order by rowid')
        got_types = column_types_of(ds, f"j{index}")
        problems.append(first_difference(
            f"document {index} {options}", (list(got_types), list(got_types.values()), got), (names, declared, stored)
        ))
    assert_none_differ(problems, "generated documents")


async def test_a_type_the_values_do_not_fit_refuses_the_import_naming_column_row_and_value(ds, tmp_path, monkeypatch):
    text = "zip,amount\n" + "".join(f"{i:05d},{i}.5\n" for i in range(30_000)) + "2134-0001,3\n"
    path = write(tmp_path / "codes.csv", text)
    error = "The column 'zip' of {} must be INTEGER (as types asks), but row 30,001 holds '2134-0001', which is not a whole number."
    for reading in ("whole", "parts"):
        if reading == "parts":
            read_in_parts(monkeypatch)
        response = await assert_refused(
            ds, tmp_path, "/-/open-csv-file", {"path": str(path), "types": {"ZIP": "INTEGER"}}, 400, error.format(path)
        )
        assert "Nothing was imported" in response.json()["error"]
    # What fits is stored as the type says: leading zeros go, as they do in any INTEGER column.
    write(path, "zip,amount\n02134,1\n00501,2.5\n")
    answer = (await post(ds, "/-/open-csv-file", {"path": str(path), "types": {"zip": "INTEGER", "amount": "TEXT"}})).json()
    assert await rows(ds, "temporary", f"select zip, typeof(zip), amount from {answer['path'].rsplit('/', 1)[1]}") == [
        (2134, "integer", "1"), (501, "integer", "2.5")
    ]


async def test_types_force_real_exactly_and_refuse_what_is_no_number(ds, tmp_path):
    path = write(tmp_path / "r.csv", "v\n0.1\n12\n1e3\n-77.179786\n\n")
    answer = (await post(ds, "/-/open-csv-file", {"path": str(path), "types": {"v": "REAL"}})).json()
    assert await rows(ds, "temporary", "select v from r order by rowid") == [(0.1,), (12.0,), (1000.0,), (-77.179786,)]
    assert column_types_of(ds, "r") == {"v": "REAL"}
    write(path, "v\n1.5\nnan\n")
    await assert_refused(ds, tmp_path, "/-/open-csv-file", {"path": str(path), "types": {"v": "REAL"}}, 400,
                         "but row 2 holds 'nan', which is not a number.")
    assert answer["ok"]


def write_xlsx(path, sheets):
    """A workbook of {sheet name: rows}, text as inline strings and numbers as numbers."""
    def cell(ref, value):
        if isinstance(value, str):
            return f'<c r="{ref}" t="inlineStr"><is><t>{html.escape(value)}</t></is></c>'
        return f'<c r="{ref}"><v>{value}</v></c>'

    return make_xlsx(path, [
        (name, "".join(
            f'<row r="{n}">' + "".join(cell(f"{chr(65 + i)}{n}", v) for i, v in enumerate(row)) + "</row>"
            for n, row in enumerate(rows, 1)
        ))
        for name, rows in sheets.items()
    ])


async def test_json_path_chooses_the_array_and_sheet_the_worksheet(ds, tmp_path):
    path = write(tmp_path / "nested.json", json.dumps({
        "meta": {"people": [{"name": "a"}, {"name": "b"}]}, "data": {"rows": [{"x": 1}, {"x": 2}, {"x": 3}]},
    }))
    answer = (await post(ds, "/-/open-csv-file", {"path": str(path)})).json()
    assert answer["json_path"] == "data.rows"
    answer = (await post(ds, "/-/open-csv-file", {"path": str(path), "json_path": "meta.people", "table_name": "people"})).json()
    assert (answer["json_path"], answer["rows"]) == ("meta.people", 2)
    assert await rows(ds, "temporary", "select name from people") == [("a",), ("b",)]
    await assert_refused(ds, tmp_path, "/-/open-csv-file", {"path": str(path), "json_path": "meta"}, 400,
                         "has no array of objects at the json_path 'meta'. It has them at 'meta.people' and 'data.rows'.")
    book = write_xlsx(tmp_path / "book.xlsx", {"First": [["a"], [1]], "Second": [["b", "c"], [2, "x"], [3, "y"]]})
    answer = (await post(ds, "/-/open-csv-file", {"path": str(book), "sheet": "Second", "table_name": "second"})).json()
    assert (answer["path"], answer["rows"]) == ("/temporary/second", 2)
    assert await rows(ds, "temporary", "select * from second") == [(2, "x"), (3, "y")]
    await assert_refused(ds, tmp_path, "/-/open-csv-file", {"path": str(book), "sheet": "Third"}, 400,
                         "has no worksheet named 'Third'. Its worksheets are 'First' and 'Second'.")


async def test_an_option_given_as_null_is_an_option_left_out(ds, tmp_path):
    path = write(tmp_path / "n.csv", "a;b\n1;2\n")
    nulls = {key: None for key in app_support.READING_OPTIONS}
    answer = (await post(ds, "/-/open-csv-file", {"path": str(path), "table_name": None, **nulls})).json()
    assert answer == {"ok": True, "path": "/temporary/n", "rows": 1, "format": "csv"}
    assert await rows(ds, "temporary", "select * from n") == [(1, 2)]


async def test_csv_options_read_a_file_that_looks_like_json_as_csv(ds, tmp_path):
    path = write(tmp_path / "looks.csv", '{"a": 1}\n{"a": 2}\n')
    answer = (await post(ds, "/-/open-csv-file", {"path": str(path), "header": False, "delimiter": "|"})).json()
    assert answer["format"] == "csv"
    assert await rows(ds, "temporary", "select column_1 from looks") == [('{"a": 1}',), ('{"a": 2}',)]


@pytest.mark.parametrize(
    "options,error",
    [
        ({"encoding": "klingon"}, "encoding must be a text encoding Python knows"),
        ({"encoding": "rot13"}, "encoding must be a text encoding Python knows"),
        ({"encoding": 8}, "encoding must be a string."),
        ({"delimiter": ";;"}, "delimiter must be one character"),
        ({"delimiter": '"'}, "delimiter must be one character"),
        ({"delimiter": "\n"}, "delimiter must be one character"),
        ({"quoting": "all"}, 'quoting must be "standard" or "none", not \'all\'.'),
        ({"header": "no"}, "header must be a boolean (true or false)."),
        ({"skip_lines": -1}, "skip_lines must be a whole number, 0 or more, not -1."),
        ({"skip_lines": 1.5}, "skip_lines must be a whole number."),
        ({"skip_lines": True}, "skip_lines must be a whole number."),
        ({"types": ["a"]}, "types must be a JSON object."),
        ({"types": {"a": "DATE"}}, "types must give each column one of TEXT, INTEGER or REAL: 'a' has \"DATE\"."),
        ({"types": {"nope": "TEXT"}}, "types names a column that {path} does not have: 'nope'. Its columns are 'a' and 'b'."),
        ({"sheet": "Sheet1"}, "{path} is not an Excel workbook, so the option sheet does not apply to it."),
        ({"sheet": ""}, "sheet must not be empty"),
        ({"json_path": "data"}, "{path} is read as CSV, not JSON, so the option json_path does not apply to it."),
        ({"json_path": "data", "delimiter": ","}, "json_path and delimiter cannot go together"),
        ({"if_exists": "overwrite"}, 'if_exists must be "rename", "replace" or "append", not \'overwrite\'.'),
        ({"if_exists": "replace"}, 'if_exists "replace" needs table_name: the name of the table to replace.'),
        ({"if_exists": "append", "table_name": " "}, 'if_exists "append" needs table_name'),
        ({"encoding": "ascii", "path": "accents"}, "is not valid ascii text"),
        ({"encoding": "utf-8", "path": "latin"}, None),
        ({"skip_lines": 9}, "{path} has no rows below the 9 lines skip_lines skips."),
    ],
)
async def test_bad_reading_options_are_refused_naming_the_option(ds, tmp_path, options, error):
    files = {"plain": "a,b\n1,2\n", "accents": "a,b\n\u00e9,\u20ac\n".encode("utf-8"), "latin": "a,b\nx,\u00e9\n".encode("cp1252")}
    path = write(tmp_path / "f.csv", files[options.pop("path", "plain")])
    if error is None:  # UTF-8 as asked, a stray byte kept as it reads in cp1252
        answer = (await post(ds, "/-/open-csv-file", {"path": str(path), **options})).json()
        assert await rows(ds, "temporary", "select b from f") == [("\u00e9",)], answer
        return
    await assert_refused(ds, tmp_path, "/-/open-csv-file", {"path": str(path), **options}, 400, error.format(path=path))
    await assert_refused(ds, tmp_path, "/-/preview-import", {"path": str(path), **options}, 400, error.format(path=path)) if "if_exists" not in options else None


@pytest.mark.parametrize("reading", ["whole", "parts"])
async def test_integers_too_long_for_a_real_keep_their_column_text_when_decimals_come_later(ds, tmp_path, monkeypatch, reading):
    # 600 rows: the long integer and the decimal are in different batches, and in parts in different parts.
    values = ["-237343545453729084"] + [str(i) for i in range(598)] + ["-.470"]
    path = write(tmp_path / "long.csv", "v\n" + "\n".join(values) + "\n")
    if reading == "parts":
        read_in_parts(monkeypatch)
    await post(ds, "/-/open-csv-file", {"path": str(path)})
    assert column_types_of(ds, "long") == {"v": "TEXT"}
    assert await rows(ds, "temporary", "select v from long order by rowid limit 1") == [("-237343545453729084",)]


# ===== Reading options: replacing and appending to a table =====


async def test_replace_drops_and_recreates_the_table_in_temporary_and_in_a_file(ds, tmp_path):
    first = write(tmp_path / "dogs.csv", "id,name\n1,Cleo\n2,Pancakes\n")
    second = write(tmp_path / "dogs2.csv", "id;name;age\n7;Rex;3\n")
    db_path = tmp_path / "pets.db"
    await post(ds, "/-/new-empty-database-file", {"path": str(db_path)})
    for database in ("temporary", "pets"):
        await post(ds, "/-/import-csv-file", {"path": str(first), "database": database})
        await ds.get_database(database).execute_write("create view dog_names as select name from dogs")
        answer = (await post(ds, "/-/import-csv-file", {
            "path": str(second), "database": database, "table_name": "DOGS", "if_exists": "replace",
        })).json()
        assert (answer["path"], answer["rows"]) == (f"/{database}/dogs", 1)
        assert await rows(ds, database, "select * from dogs") == [(7, "Rex", 3)]
        assert await rows(ds, database, "select * from dog_names") == [("Rex",)]  # the view reads the new table
        assert sorted(await tables(ds, database)) == ["dogs"]
        # Replacing a table that is not there makes it.
        answer = (await post(ds, "/-/import-csv-file", {
            "path": str(first), "database": database, "table_name": "cats", "if_exists": "replace",
        })).json()
        assert (answer["path"], answer["rows"]) == (f"/{database}/cats", 2)


async def test_a_failed_or_cancelled_replace_leaves_the_old_table_as_it_was(ds, tmp_path):
    old = write(tmp_path / "big.csv", "id,name\n1,Cleo\n")
    await post(ds, "/-/open-csv-file", {"path": str(old)})
    before = await rows(ds, "temporary", "select * from big")
    bad = write(tmp_path / "bad.csv", "id,name\nx,Rex\n")
    await assert_refused(ds, tmp_path, "/-/open-csv-file", {
        "path": str(bad), "table_name": "big", "if_exists": "replace", "types": {"id": "INTEGER"},
    }, 400, "row 1 holds 'x'")
    write_big_csv(tmp_path / "big2.csv", 1_500_000)
    task = asyncio.ensure_future(post(ds, "/-/open-csv-file", {
        "path": str(tmp_path / "big2.csv"), "table_name": "big", "if_exists": "replace",
    }))
    while not task.done():
        items = await progress(ds)
        if items and items[0]["state"] == "running" and items[0]["rows"]:
            break
        await asyncio.sleep(0.005)
    await post(ds, "/-/cancel-import", {"id": items[0]["id"]})
    assert_error(await task, 400, "Import cancelled")
    assert await rows(ds, "temporary", "select * from big") == before
    assert await tables(ds) == ["big"]


async def test_append_adds_rows_by_column_name_as_the_table_stores_them(ds, tmp_path, events):
    db_path = tmp_path / "shop.db"
    with sqlite3.connect(db_path) as conn:
        conn.execute("create table sales (zip text, amount real, note text, n integer)")
        conn.execute("insert into sales values ('02134', 1.5, 'first', 1)")
    await post(ds, "/-/open-database-file", {"path": str(db_path)})
    more = write(tmp_path / "more.csv", "AMOUNT,zip,n\n2,00501,7\n3.25,10001,\n")
    answer = (await post(ds, "/-/import-csv-file", {
        "path": str(more), "database": "shop", "table_name": "sales", "if_exists": "append",
    })).json()
    assert (answer["path"], answer["rows"]) == ("/shop/sales", 2)
    assert await rows(ds, "shop", "select zip, amount, typeof(amount), note, n from sales order by rowid") == [
        ("02134", 1.5, "real", "first", 1), ("00501", 2.0, "real", None, 7), ("10001", 3.25, "real", None, None),
    ]
    if IS_DATASETTE_1:  # rows added to a table that was there: no CreateTableEvent for it
        assert [e.name for e in events if getattr(e, "table", None) == "sales"] == ["insert-rows"]
    extra = write(tmp_path / "extra.csv", "zip,colour\n1,red\n")
    await assert_refused(ds, tmp_path, "/-/import-csv-file", {
        "path": str(extra), "database": "shop", "table_name": "sales", "if_exists": "append",
    }, 400, "has a column 'colour' that the table sales does not have, so its rows cannot be appended.")
    misfit = write(tmp_path / "misfit.csv", "zip,n\n1,2\n2,lots\n")
    await assert_refused(ds, tmp_path, "/-/import-csv-file", {
        "path": str(misfit), "database": "shop", "table_name": "sales", "if_exists": "append",
    }, 400, "The column 'n' of {} must be INTEGER (as the table sales stores it), but row 2 holds 'lots'".format(misfit))
    await ds.get_database("shop").execute_write("create view v as select * from sales")
    for if_exists in ("append", "replace"):
        await assert_refused(ds, tmp_path, "/-/import-csv-file", {
            "path": str(more), "database": "shop", "table_name": "v", "if_exists": if_exists,
        }, 400, "v is a view in that database, not a table, so it cannot be")


async def test_append_into_temporary_and_to_a_table_that_is_not_there(ds, tmp_path):
    path = write(tmp_path / "a.csv", "x\n1\n")
    for _ in range(3):
        answer = (await post(ds, "/-/open-csv-file", {"path": str(path), "table_name": "log", "if_exists": "append"})).json()
        assert answer["path"] == "/temporary/log"
    assert await rows(ds, "temporary", "select x from log") == [(1,), (1,), (1,)]

# A test plugin (a module, as Datasette 0.65 expects) that refuses the desktop user one table.
locked_table = types.ModuleType("test_locked_table")
locked_table.permission_allowed = app_support.hookimpl(
    lambda action, resource: False if resource == ("temporary", "locked") and action in ("insert-row", "drop-table") else None
)


@pytest.mark.parametrize("if_exists", ["replace", "append"])
async def test_replace_and_append_refuse_a_table_datasette_will_not_let_the_user_write(tmp_path, if_exists):
    path = write(tmp_path / "a.csv", "x\n1\n")
    if IS_DATASETTE_1:  # per-table permissions in the configuration
        denied = {"permissions": {"insert-row": {"id": "nobody"}, "drop-table": {"id": "nobody"}}}
        ds = Datasette(memory=True, config={"databases": {"temporary": {"tables": {"locked": denied}}}})
    else:  # 0.65 has none: a plugin's permission_allowed hook refuses
        pm.register(locked_table, name="test_locked_table")
        ds = Datasette(memory=True)
    try:
        await ds.invoke_startup()
        await post(ds, "/-/open-csv-file", {"path": str(path), "table_name": "locked"})
        await post(ds, "/-/open-csv-file", {"path": str(path), "table_name": "free"})
        action = "drop-table" if if_exists == "replace" else "insert-row"
        doing = "replace" if if_exists == "replace" else "append to"
        await assert_refused(ds, tmp_path, "/-/open-csv-file", {"path": str(path), "table_name": "locked", "if_exists": if_exists}, 400,
                             f"Datasette's permissions do not let the desktop user {doing} the table locked in temporary ({action}), so nothing was imported.")
        answer = (await post(ds, "/-/open-csv-file", {"path": str(path), "table_name": "free", "if_exists": if_exists})).json()
        assert answer["path"] == "/temporary/free"
    finally:
        if pm.is_registered(locked_table):
            pm.unregister(name="test_locked_table")


async def test_replace_or_append_with_a_workbook_of_several_sheets_asks_for_one(ds, tmp_path):
    book = write_xlsx(tmp_path / "book.xlsx", {"First": [["a"], [1]], "Second": [["a"], [2]]})
    await assert_refused(ds, tmp_path, "/-/open-csv-file", {
        "path": str(book), "table_name": "t", "if_exists": "replace",
    }, 400, "has 2 worksheets with data. To replace a table, choose one of them with sheet.")


# ===== /-/preview-import =====


async def test_preview_shows_the_reading_types_and_first_rows_and_writes_nothing(ds, tmp_path, temp_dir):
    path = write(tmp_path / "sales.csv", (
        "Sales report 2024\n\nzip;amount;city\n" + "".join(f"{i:05d};{i}.5;Z\u00fcrich\n" for i in range(1, 40))
    ).encode("cp1252"))
    before = (snapshot(tmp_path), user_databases(ds), await tables(ds))
    response = await post(ds, "/-/preview-import", {"path": str(path)})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert list(answer) == ["ok", *app_support.PREVIEW_ANSWER_ORDER]
    assert {k: v for k, v in answer.items() if k not in ("rows", "columns")} == {
        "ok": True, "format": "csv", "encoding": "cp1252", "delimiter": ";", "quoting": "standard",
        "header": True, "skipped_lines": ["Sales report 2024"], "sheets": None, "json_path": None,
        "table_name": "sales", "rows_read": 39, "rows_estimate": 39, "complete": True,
    }
    assert answer["columns"] == [
        {"name": "zip", "type": "TEXT", "why": "leading zeros (00001)"},
        {"name": "amount", "type": "REAL", "why": None},
        {"name": "city", "type": "TEXT", "why": None},
    ]
    assert answer["rows"][:2] == [["00001", 1.5, "Z\u00fcrich"], ["00002", 2.5, "Z\u00fcrich"]]
    assert len(answer["rows"]) == 20
    assert (snapshot(tmp_path), user_databases(ds), await tables(ds)) == before
    assert work_folders(temp_dir) == []
    # With options: the same file as the import would read it with them.
    answer = (await post(ds, "/-/preview-import", {
        "path": str(path), "types": {"zip": "INTEGER"}, "table_name": "codes",
    })).json()
    assert (answer["table_name"], answer["columns"][0], answer["rows"][0][0]) == (
        "codes", {"name": "zip", "type": "INTEGER", "why": "as types asks"}, 1
    )


async def test_preview_of_a_large_file_reads_only_its_start(ds, tmp_path):
    path = write_big_csv(tmp_path / "big.csv", 1_000_000)
    answer = (await post(ds, "/-/preview-import", {"path": str(path)})).json()
    assert answer["complete"] is False
    assert answer["rows_read"] < 200_000
    assert 800_000 < answer["rows_estimate"] < 1_250_000
    assert [c["type"] for c in answer["columns"]] == ["INTEGER", "TEXT", "REAL"]
    assert answer["rows"][1] == [1, "name 1", 1.5]
    # A compressed file is unpacked only in part.
    packed = tmp_path / "big.csv.gz"
    with open(path, "rb") as src, gzip.open(packed, "wb", compresslevel=1) as out:
        shutil.copyfileobj(src, out)
    answer = (await post(ds, "/-/preview-import", {"path": str(packed)})).json()
    assert (answer["table_name"], answer["complete"], answer["rows_estimate"]) == ("big", False, None)
    assert answer["rows"][0] == [0, "name 0", 0.0]


async def test_preview_of_a_compressed_json_object_finds_its_arrays_past_the_start(ds, tmp_path, monkeypatch):
    monkeypatch.setattr(app_support, "PREVIEW_UNPACK_BYTES", 64 * 1024)
    rows = [{"id": i, "name": f"name {i}"} for i in range(20_000)]
    packed = tmp_path / "nested.json.gz"
    packed.write_bytes(gzip.compress(json.dumps({"meta": {"n": 1}, "data": {"rows": rows}}).encode()))
    answer = (await post(ds, "/-/preview-import", {"path": str(packed)})).json()
    assert (answer["json_path"], answer["rows"][:2]) == ("data.rows", [[0, "name 0"], [1, "name 1"]]), answer
    # A file that is damaged past its start is still refused, as its import would be.
    packed.write_bytes(gzip.compress(json.dumps({"data": {"rows": rows}}).encode()[:-200_000]))
    await assert_refused(ds, tmp_path, "/-/preview-import", {"path": str(packed)}, 400, "is not valid JSON")


async def test_preview_of_a_workbook_lists_its_sheets_and_shows_one(ds, tmp_path):
    book = write_xlsx(tmp_path / "book.xlsx", {
        "Empty": [], "Dogs": [["name", "age"], ["Cleo", 5], ["Rex", 3]], "Cats": [["name"], ["Milo"]],
    })
    answer = (await post(ds, "/-/preview-import", {"path": str(book)})).json()
    assert answer["sheets"] == [
        {"name": "Empty", "rows_estimate": None}, {"name": "Dogs", "rows_estimate": None},
        {"name": "Cats", "rows_estimate": None},
    ]
    assert (answer["format"], answer["sheet"], answer["rows"]) == ("xlsx", "Dogs", [["Cleo", 5], ["Rex", 3]])
    answer = (await post(ds, "/-/preview-import", {"path": str(book), "sheet": "Cats"})).json()
    assert (answer["sheet"], answer["columns"], answer["rows"]) == ("Cats", [{"name": "name", "type": "TEXT", "why": None}], [["Milo"]])
    assert [s["name"] for s in answer["sheets"]] == ["Empty", "Dogs", "Cats"]


def test_sheet_sizes_come_from_each_sheets_dimension(tmp_path):
    rows = "".join(f'<row r="{n}"><c r="A{n}"><v>{n}</v></c></row>' for n in range(1, 101))
    book = make_xlsx(tmp_path / "d.xlsx", [("A", '</sheetData><dimension ref="A1:C100"/><sheetData>' + rows), ("B", rows)])
    plan = app_support.plan_file(str(book))
    assert app_support._sheet_sizes(str(book), plan.all_sheets) == [
        {"name": "A", "rows_estimate": 99}, {"name": "B", "rows_estimate": None},
    ]


async def test_preview_of_a_url_keeps_the_download_for_the_import(ds, server):
    url, routes = server
    fetched = []

    def dogs(handler):
        fetched.append(handler.path)
        return 200, {"Content-Type": "text/csv"}, CSV_BODY

    routes["/dogs.csv"] = dogs
    answer = (await post(ds, "/-/preview-import", {"url": url + "/dogs.csv"})).json()
    assert (answer["table_name"], answer["rows"]) == ("dogs", [[1, "Cleo"], [2, "Pancakes"]])
    answer = (await post(ds, "/-/open-csv-from-url", {"url": url + "/dogs.csv"})).json()
    assert (answer["path"], fetched) == ("/temporary/dogs", ["/dogs.csv"])
    routes["/missing.csv"] = (404, {}, b"")
    assert_error(await post(ds, "/-/preview-import", {"url": url + "/missing.csv"}), 400, "there is no file at that address")


async def test_preview_takes_the_desktop_users_cookie_and_refuses_others(ds, tmp_path):
    path = write(tmp_path / "a.csv", "a\n1\n")
    cookies, headers = await page_csrf(ds, await root_cookie(ds))
    response = await ds.client.post(
        "/-/preview-import", content=json.dumps({"path": str(path)}).encode(), cookies=cookies, headers=headers
    )
    assert response.status_code == 200, response.text
    assert_error(await post(ds, "/-/preview-import", {"path": str(path)}, token=None), 401, "")
    assert_error(await post(ds, "/-/preview-import", {}), 400, "Send either path, the full path of a file, or url")
    assert_error(await post(ds, "/-/preview-import", {"path": str(path), "url": "http://x"}), 400, "Send either")


# ===== /-/import-again =====


async def test_import_again_replaces_the_table_an_import_made(ds, tmp_path):
    path = write(tmp_path / "semi.csv", "id;name\n1;Cleo\n2;Pancakes\n")
    await post(ds, "/-/open-csv-file", {"path": str(path), "delimiter": ","})
    assert await rows(ds, "temporary", "select * from semi") == [("1;Cleo",), ("2;Pancakes",)]
    (item,) = await progress(ds)
    answer = (await post(ds, "/-/import-again", {"id": item["id"], "delimiter": ";", "types": {"id": "TEXT"}})).json()
    assert (answer["path"], answer["rows"]) == ("/temporary/semi", 2)
    assert await rows(ds, "temporary", "select * from semi") == [("1", "Cleo"), ("2", "Pancakes")]
    assert await tables(ds) == ["semi"]


async def test_import_again_after_a_failure_makes_a_new_table(ds, tmp_path):
    path = write(tmp_path / "odd.csv", "a,b\n1,2\n")
    assert_error(await post(ds, "/-/open-csv-file", {"path": str(path), "types": {"c": "TEXT"}}), 400, "types names a column")
    (item,) = await progress(ds)
    answer = (await post(ds, "/-/import-again", {"id": item["id"]})).json()
    assert answer["path"] == "/temporary/odd"
    assert_error(await post(ds, "/-/import-again", {"id": 99}), 400, "No import has the id 99")
    task, running = await start_big_import(ds, tmp_path, "temporary")
    assert_error(await post(ds, "/-/import-again", {"id": running["id"]}), 400, "is still running")
    await task


# ===== /-/dump-temporary-to-file and /-/restore-temporary-from-file =====


async def fill_temporary(ds, megabytes):
    """Tables in temporary whose dump takes about megabytes: random, so it never compresses."""

    def fill(conn):
        conn.execute("create table big (b blob)")
        conn.executemany("insert into big values (randomblob(1024 * 1024))", [()] * megabytes)
        conn.commit()

    await ds.get_database("temporary").execute_write_fn(fill, block=True)


async def test_dump_and_restore_temporary(ds, tmp_path):
    csv_path = tmp_path / "dogs.csv"
    csv_path.write_text("name\nCleo\n")
    await post(ds, "/-/open-csv-file", {"path": str(csv_path)})
    dump = tmp_path / "it's a backup.db"
    response = await post(ds, "/-/dump-temporary-to-file", {"path": str(dump)})
    assert response.json() == {"ok": True, "path": str(dump)}
    assert column_types(dump, "dogs") == {"name": "TEXT"}

    fresh = Datasette(memory=True)
    await fresh.invoke_startup()
    response = await post(fresh, "/-/restore-temporary-from-file", {"path": str(dump)})
    assert response.json() == {
        "ok": True, "path": str(dump), "restored_tables": ["dogs"], "backup_tables": ["dogs"],
    }
    assert await rows(fresh, "temporary", "select name from dogs") == [("Cleo",)]
    assert (await fresh.client.get("/temporary/dogs")).status_code == 200


@pytest.mark.parametrize(
    "setup,error",
    [
        (lambda p: make_db(p / "exists.db"), "File already exists"),
        (lambda p: p / "nope" / "dump.db", "Folder not found"),
        (lambda p: p, "folder, not a file"),
    ],
)
async def test_dump_temporary_errors(ds, tmp_path, setup, error):
    path = setup(tmp_path)
    await assert_refused(ds, tmp_path, "/-/dump-temporary-to-file", {"path": str(path)}, 400, error)


async def test_dump_temporary_to_a_full_disk_leaves_nothing(ds, small_disk):
    disk = small_disk(size="2m")
    await fill_temporary(ds, 3)
    path = disk / "backup.db"
    response = await post(ds, "/-/dump-temporary-to-file", {"path": str(path)})
    assert_error(response, 400, "The disk is full: could not save the temporary database to")
    assert "Free some space and try again." in response.json()["error"]
    assert list(disk.iterdir()) == []
    # The retry is not refused by a leftover: with room it works.
    await ds.get_database("temporary").execute_write("drop table big", block=True)
    assert (await post(ds, "/-/dump-temporary-to-file", {"path": str(path)})).json()["ok"] is True
    assert sorted(p.name for p in disk.iterdir()) == ["backup.db"]


async def test_dump_temporary_to_a_read_only_disk(ds, small_disk):
    disk = small_disk(size="1m")
    read_only(disk)
    response = await post(ds, "/-/dump-temporary-to-file", {"path": str(disk / "backup.db")})
    assert_error(response, 400, "is read-only")
    assert list(disk.iterdir()) == []


def test_dump_never_moves_over_a_file_that_appeared(tmp_path):
    partial, path = tmp_path / "partial", tmp_path / "backup.db"
    partial.write_bytes(b"new")
    path.write_bytes(b"someone else's")
    with pytest.raises(app_support.APIError, match="File already exists"):
        app_support._move_into_place(str(partial), str(path), app_support.DUMP_ACTION)
    assert path.read_bytes() == b"someone else's"


def corrupt_middle_page(path):
    """A database of 20,000 rows with a page in its middle overwritten."""
    make_db(path, values=range(20_000))
    with open(path, "r+b") as f:
        f.seek(4096 * (os.path.getsize(path) // 4096 // 2))
        f.write(b"\xde\xad\xbe\xef" * 1024)
    return path


def utf16_db(path):
    """A database that stores its text as UTF-16le."""
    conn = sqlite3.connect(path)
    conn.execute("pragma encoding = 'UTF-16le'")
    conn.execute("create table t (a text)")
    conn.execute("insert into t values ('x')")
    conn.commit()
    conn.close()
    return path


@pytest.mark.parametrize(
    "setup,error",
    [
        (lambda p: p / "missing.db", "File not found"),
        (lambda p: p, "folder, not a file"),
        (lambda p: write(p / "notes.txt", "hello"), "Not a SQLite database"),
        (lambda p: write(p / "zero.db", b""), "File is empty"),
        (lambda p: corrupt_middle_page(p / "backup.db"), "is damaged, so nothing was restored"),
        (lambda p: utf16_db(p / "backup.db"), "stores its text as UTF-16le; only UTF-8 databases can be restored"),
        (lambda p: cut_short(p / "backup.db"), "is damaged, so nothing was restored: the file is cut short (it holds "),
        (lambda p: cut_short(p / "backup.db", 5000), "is damaged, so nothing was restored: the file is cut short (it holds 5,000 of its "),
        (lambda p: cut_short(p / "backup.db", 60), "is damaged, so nothing was restored: the file is cut short (it holds 60 bytes, less than a database header)."),
    ],
    ids=["missing", "folder", "not SQLite", "empty", "corrupt middle page", "UTF-16", "cut short", "head -c 5000", "cut in the header"],
)
async def test_restore_temporary_errors(ds, tmp_path, setup, error):
    csv_path = tmp_path / "keep.csv"
    csv_path.write_text("a\n1\n")
    await post(ds, "/-/open-csv-file", {"path": str(csv_path)})
    path = setup(tmp_path)
    await assert_refused(ds, tmp_path, "/-/restore-temporary-from-file", {"path": str(path)}, 400, error)
    assert await tables(ds) == ["keep"]
    assert await rows(ds, "temporary", "select a from keep") == [(1,)]
    assert (await ds.client.get("/temporary/keep.json")).status_code == 200


@pytest.mark.parametrize("journal_mode,page_size", [("delete", 8192), ("wal", 1024), ("delete", 65536)])
async def test_restore_temporary_from_other_page_sizes_and_wal(ds, tmp_path, journal_mode, page_size):
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute(f"pragma page_size = {page_size}")
    conn.execute(f"pragma journal_mode = {journal_mode}")
    conn.execute("create table t (a)")
    conn.executemany("insert into t values (?)", [(i,) for i in range(1000)])
    conn.commit()
    conn.close()
    await fill_temporary(ds, 1)  # temporary has pages of its own size
    response = await post(ds, "/-/restore-temporary-from-file", {"path": str(path)})
    assert response.json()["restored_tables"] == ["t"], response.text
    assert await rows(ds, "temporary", "select count(*) from t") == [(1000,)]


def test_restart_cycle_with_real_datasette_process(app_server, tmp_path):
    """The app dumps temporary, restarts datasette on the same port with the same secret, and restores it."""
    csv_path = tmp_path / "dogs.csv"
    csv_path.write_text("name,age\nCleo,5\nPancakes,4\n")
    status, _, body = app_server.call("/-/open-csv-file", {"path": str(csv_path)})
    assert status == 200 and json.loads(body)["path"] == "/temporary/dogs"
    status, headers, _ = app_server.call("/-/auth-app-user", {"redirect": "/temporary/dogs"})
    assert status == 302 and headers["Location"] == "/temporary/dogs"
    cookie = headers["Set-Cookie"].split(";")[0]
    backup = tmp_path / "backup.db"
    status, _, body = app_server.call("/-/dump-temporary-to-file", {"path": str(backup)})
    assert status == 200, body

    app_server.stop()
    app_server.start()
    status, _, body = app_server.call("/-/restore-temporary-from-file", {"path": str(backup)})
    assert status == 200 and json.loads(body)["restored_tables"] == ["dogs"]
    status, _, body = app_server.call("/temporary/dogs.json?_shape=array")
    assert [(r["name"], r["age"]) for r in json.loads(body)] == [("Cleo", 5), ("Pancakes", 4)]
    # The cookie alone, without the token, as the app's window sends it.
    request = urllib.request.Request(app_server.url("/-/actor.json"), headers={"Cookie": cookie})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert json.loads(response.read())["actor"] == {"id": "root"}


# ===== /-/keep-temporary: temporary kept in a file =====
#
# Every check compares what SQLite holds, object by object and row by row,
# with what it held before: the generated tables are their own oracle.


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def contents(conn):
    """Every schema object's SQL, and every table's rows in rowid order."""
    schema = sorted(tuple(r) for r in conn.execute("select type, name, tbl_name, sql from sqlite_master"))
    rows_by_table = {
        name: [tuple(r) for r in conn.execute(f'select * from "{name}" order by rowid')]
        for kind, name, _, _ in schema if kind == "table"
    }
    return schema, rows_by_table


async def temporary_contents(ds):
    return await ds.get_database("temporary").execute_fn(contents)


def file_contents(path):
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return contents(conn)
    finally:
        conn.close()


def random_value(rng):
    """A value as real files hold them: coordinates, codes with leading zeros, quoted text, blobs, NULL."""
    return rng.choice([
        lambda: None,
        lambda: rng.randrange(-10**15, 10**15),
        lambda: round(rng.uniform(-180, 180), rng.randint(5, 7)),
        lambda: f"{rng.randrange(10**5):05d}",
        lambda: "".join(rng.choice('ab, "\n\té€😀') for _ in range(rng.randrange(30))),
        lambda: bytes(rng.randrange(256) for _ in range(rng.randrange(40))),
    ])()


def fill(conn, seed, prefix="t"):
    """Tables of generated rows, with an index, a view and a trigger, made in conn."""
    rng = random.Random(seed)
    for t in range(3):
        conn.execute(f'create table "{prefix}{t}" (id integer primary key, a, b text, c real, d blob)')
        conn.executemany(
            f'insert into "{prefix}{t}" (a, b, c, d) values (?, ?, ?, ?)',
            [[random_value(rng) for _ in range(4)] for _ in range(rng.randint(50, 400))],
        )
    conn.execute(f'create index "{prefix}_b" on "{prefix}0" (b)')
    conn.execute(f'create view "{prefix}_view" as select a, b from "{prefix}0" where c is not null')
    conn.execute(f'create table "{prefix}_log" (id integer)')
    conn.execute(
        f'create trigger "{prefix}_trigger" after insert on "{prefix}1" '
        f'begin insert into "{prefix}_log" values (new.id); end'
    )
    conn.commit()


async def fill_generated(ds, seed):
    await ds.get_database("temporary").execute_write_fn(lambda conn: fill(conn, seed), block=True)


def welcome_section(page):
    """The home page's welcome section: in the page on Datasette 1.0, in the page script's settings on 0.65."""
    if IS_DATASETTE_1:
        return page.split('<section class="app-support-welcome">', 1)[1].split("</section>", 1)[0]
    return page_global(page, "appSupportDirectory")["welcomeHtml"]


async def keep(ds, value, **kwargs):
    return await post(ds, "/-/keep-temporary", {"keep": value}, **kwargs)


def kept_file(home):
    return home / ".datasette-app" / "temporary.db"


async def test_keep_temporary_moves_every_table_view_index_and_trigger_into_the_file_and_back(ds, home):
    await fill_generated(ds, 1)
    make_db(home / "pets.db")
    await post(ds, "/-/open-database-file", {"path": str(home / "pets.db")})
    order = list(ds.databases)
    before = await temporary_contents(ds)
    kept = kept_file(home)
    on = {"ok": True, "keep": True, "file": str(kept)}
    assert (await ds.client.get("/-/keep-temporary", headers=AUTH)).json() == {"ok": True, "keep": False, "file": None}
    response = await keep(ds, True)
    assert response.json() == on
    assert (await ds.client.get("/-/keep-temporary", headers=AUTH)).json() == on
    db = ds.get_database("temporary")
    assert (db.path, db.is_mutable, db.is_memory) == (str(kept), True, False)
    assert file_contents(kept) == before == await temporary_contents(ds)
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert stat.S_IMODE(kept.parent.stat().st_mode) == 0o700
    assert [p.name for p in kept.parent.iterdir()] == ["temporary.db"]  # no partial copy left
    # The same URLs, now read from the file; writes go there, through the trigger too.
    page = await ds.client.get("/temporary/t0.json?_shape=array&_size=max")
    assert [row["id"] for row in page.json()] == [row[0] for row in before[1]["t0"]]
    await db.execute_write("insert into t1 (a) values ('new')", block=True)
    assert file_contents(kept)[1]["t_log"] == [(len(before[1]["t1"]) + 1,)]
    during = file_contents(kept)
    # On again changes nothing; off brings it all back into memory and removes the file.
    assert (await keep(ds, True)).json() == on and ds.get_database("temporary") is db
    assert list(ds.databases) == order  # the home page lists them as before
    assert (await keep(ds, False)).json() == {"ok": True, "keep": False, "file": None}
    assert ds.get_database("temporary").is_memory
    assert await temporary_contents(ds) == during
    assert list(kept.parent.iterdir()) == []
    assert (await keep(ds, False)).json() == {"ok": True, "keep": False, "file": None}
    assert (await ds.client.get("/temporary/t_view.json")).status_code == 200


async def test_keep_temporary_imports_go_into_the_file_in_one_transaction(ds, home, tmp_path):
    await keep(ds, True)
    csv_path = write(tmp_path / "dogs.csv", "name,code\nCleo,02134\nPancakes,00501\n")
    response = await post(ds, "/-/open-csv-file", {"path": str(csv_path)})
    assert response.json()["path"] == "/temporary/dogs"
    assert file_contents(kept_file(home))[1]["dogs"] == [("Cleo", "02134"), ("Pancakes", "00501")]
    # A failed import leaves the file as it was.
    before = file_contents(kept_file(home))
    bad = write(tmp_path / "bad.csv", b"a,b\n1,2\n\x00\x01\x02" * 10)
    assert (await post(ds, "/-/open-csv-file", {"path": str(bad)})).status_code == 400
    assert file_contents(kept_file(home)) == before


@pytest.mark.parametrize("switch_to", [True, False])
async def test_keep_temporary_during_an_import_puts_its_table_where_temporary_now_is(ds, home, tmp_path, switch_to):
    if not switch_to:
        await keep(ds, True)
    task, item = await start_big_import(ds, tmp_path, "temporary", count=300_000)
    response = await keep(ds, switch_to)
    assert response.json()["keep"] is switch_to, response.text
    assert (await task).json()["rows"] == 300_000
    db = ds.get_database("temporary")
    assert db.is_memory is not switch_to
    assert (await rows(ds, "temporary", "select count(*), sum(id) from big")) == [(300_000, sum(range(300_000)))]
    assert kept_file(home).exists() is switch_to


async def test_keep_temporary_guard_and_bodies(ds, home):
    for body, error in [
        ({}, "The request has no keep, which this endpoint needs. It takes keep."),
        ({"keep": None}, "The request has no keep, which this endpoint needs. It takes keep."),
        ({"keep": "yes"}, "keep must be a boolean (true or false)."),
        ({"keep": 1}, "keep must be a boolean (true or false)."),
    ]:
        assert_error(await post(ds, "/-/keep-temporary", body), 400, error)
    assert_error(await keep(ds, True, token="0" * 32), 401, "Missing or invalid API token.")
    assert_error(await ds.client.get("/-/keep-temporary"), 401, "Missing or invalid API token.")
    someone = {"ds_actor": ds.sign({"a": {"id": "someone"}}, "actor")}
    response = await ds.client.post("/-/keep-temporary", content=b'{"keep": true}', cookies=someone)
    # Datasette 0.65's CSRF check refuses a cookie without its token first.
    assert_error(response, 403, "Only the desktop user of Datasette Desktop can do this."
                 if IS_DATASETTE_1 else app_support.MISSING_CSRF_TOKEN_REFUSAL)
    assert_error(await ds.client.get("/-/keep-temporary", cookies=someone), 403, "Only the desktop user")
    response = await ds.client.post(
        "/-/keep-temporary", content=b'{"keep": true}', cookies=await root_cookie(ds),
        headers={"Sec-Fetch-Site": "cross-site", "Origin": "https://elsewhere.example"},
    )
    assert_error(response, 403, app_support.CROSS_SITE_REFUSAL)
    assert not (home / ".datasette-app").exists() and ds.get_database("temporary").is_memory
    response = await ds.client.put("/-/keep-temporary", headers=AUTH)
    assert_error(response, 405, "Use GET or POST for /-/keep-temporary.")
    # The desktop user's page turns it on with the cookie and the page's CSRF token.
    cookies, headers = await page_csrf(ds, await root_cookie(ds))
    response = await ds.client.post("/-/keep-temporary", content=b'{"keep": true}', cookies=cookies, headers=headers)
    assert response.json() == {"ok": True, "keep": True, "file": str(kept_file(home))}
    assert (await ds.client.get("/-/keep-temporary", cookies=cookies)).json()["keep"] is True


async def test_keep_temporary_removes_the_copy_a_killed_server_left_and_nothing_else(ds, home):
    folder = home / ".datasette-app"
    folder.mkdir()
    left = write(folder / ".app_support-keep-0123456789ab.partial", b"half a copy")
    others = [write(folder / name, b"x") for name in (".app_support-0123456789ab.partial", "notes.txt")]
    assert (await keep(ds, True)).json()["keep"] is True
    assert not left.exists() and all(path.exists() for path in others)


async def test_keep_temporary_never_overwrites_a_file_at_its_place(ds, home):
    await fill_generated(ds, 2)
    before = await temporary_contents(ds)
    kept = kept_file(home)
    kept.parent.mkdir()
    make_db(kept)
    original = kept.read_bytes()
    assert_error(await keep(ds, True), 400, (
        "There is already a file at ~/.datasette-app/temporary.db, so nothing was changed: "
        "move it away or delete it, then turn keeping on again."
    ))
    assert kept.read_bytes() == original and [p.name for p in kept.parent.iterdir()] == ["temporary.db"]
    assert ds.get_database("temporary").is_memory and await temporary_contents(ds) == before


async def test_keep_temporary_on_a_read_only_or_full_disk_changes_nothing(tmp_path, small_disk):
    folder = small_disk("small", "2m")
    ds = await with_settings(temporary_file=str(folder / "kept.db"))
    await keep(ds, False)
    await ds.get_database("temporary").execute_write_fn(
        lambda conn: conn.execute("create table big as select randomblob(3000000) as b"), block=True
    )
    assert_error(await keep(ds, True), 400, f"The disk is full: could not keep the temporary database in {folder}/kept.db.")
    assert os.listdir(folder) == [] and ds.get_database("temporary").is_memory
    await ds.get_database("temporary").execute_write("drop table big", block=True)
    read_only(folder)
    assert_error(await keep(ds, True), 400, f"Could not keep the temporary database in {folder}/kept.db: it is read-only")
    assert os.listdir(folder) == [] and ds.get_database("temporary").is_memory


async def test_keep_temporary_setting_starts_it_on_in_that_place(tmp_path):
    path = tmp_path / "folder" / "kept.db"
    ds = await with_settings(temporary_file=str(path))
    assert (await ds.client.get("/-/keep-temporary", headers=AUTH)).json() == {"ok": True, "keep": True, "file": str(path)}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    await fill_generated(ds, 3)
    assert file_contents(path) == await temporary_contents(ds)
    assert (await keep(ds, False)).json()["keep"] is False and not path.exists()


async def test_keep_temporary_setting_that_is_not_a_full_path_leaves_temporary_in_memory(tmp_path):
    ds = await with_settings(temporary_file="kept.db")
    error = "The app_support setting temporary_file must be a full path, such as /Users/me/temporary.db, so temporary is in memory."
    assert (await ds.client.get("/-/keep-temporary", headers=AUTH)).json() == {"ok": True, "keep": False, "file": None, "error": error}
    assert_error(await keep(ds, True), 400, error)


# Files that are no usable kept temporary: how each is made at a path, and what the start says of it.
DAMAGED_KEPT_FILES = {
    "not a database": (lambda path: write(path, "name,age\nCleo,5\n"), "Not a SQLite database: {path}."),
    "cut short": (cut_short, "Not a valid SQLite database: {path} is cut short (it holds"),
    "damaged pages": (corrupt_middle_page, "The file is damaged: "),
    "a folder": (lambda path: path.mkdir(), "That is a folder, not a file: {path}."),
}


@pytest.mark.parametrize("damage", list(DAMAGED_KEPT_FILES))
async def test_keep_temporary_damaged_file_at_start_is_left_untouched_and_temporary_starts_in_memory(home, damage):
    kept = kept_file(home)
    kept.parent.mkdir()
    make, refusal = DAMAGED_KEPT_FILES[damage]
    make(kept)
    before = snapshot(kept.parent)
    ds = Datasette(memory=True)
    await ds.invoke_startup()
    state = (await ds.client.get("/-/keep-temporary", headers=AUTH)).json()
    assert (state["ok"], state["keep"], state["file"]) == (True, False, None)
    assert state["error"].startswith(
        "Temporary is in memory this time, because the kept file ~/.datasette-app/temporary.db could not be used. "
        + refusal.format(path=kept)
    ), state["error"]
    assert state["error"].endswith("The file was left as it is: move it away or delete it, then turn keeping on again.")
    assert ds.get_database("temporary").is_memory
    await fill_generated(ds, 4)  # temporary works, in memory
    page = (await ds.client.get("/", cookies=await root_cookie(ds))).text
    assert html.escape(state["error"], quote=False) in welcome_section(page)
    assert snapshot(kept.parent) == before
    assert kept.is_dir() or os.listdir(kept.parent) == ["temporary.db"]


@pytest.mark.parametrize("disk", ["full", "read-only"])
async def test_keep_temporary_file_on_a_full_or_read_only_disk_at_start(small_disk, disk):
    folder = small_disk("kept", "2m")
    kept = make_db(folder / "kept.db")
    if disk == "full":
        with contextlib.suppress(OSError), open(folder / "filler", "wb") as f:
            while True:
                f.write(b"\0" * 65536)
    else:
        read_only(folder)
    before = snapshot(folder)
    ds = await with_settings(temporary_file=str(kept))
    state = (await ds.client.get("/-/keep-temporary", headers=AUTH)).json()
    assert state["keep"] is False and ds.get_database("temporary").is_memory
    assert (f"The disk is full: {kept} could not take any more tables." if disk == "full"
            else f"Could not open {kept}: it is read-only") in state["error"], state["error"]
    assert snapshot(folder) == before


async def test_keep_temporary_file_locked_by_another_program_at_start(home):
    kept = kept_file(home)
    kept.parent.mkdir()
    make_db(kept)
    other = sqlite3.connect(kept, isolation_level=None)
    other.execute("begin exclusive")
    try:
        ds = Datasette(memory=True)
        await ds.invoke_startup()
    finally:
        other.execute("rollback")
        other.close()
    state = (await ds.client.get("/-/keep-temporary", headers=AUTH)).json()
    assert state["keep"] is False
    assert f"Database is locked by another program: {kept}. Close it there and try again." in state["error"]
    assert file_contents(kept)[1] == {"t": [(1,), (2,), (3,)]}


async def test_keep_temporary_second_server_for_the_same_user_keeps_its_tables_in_memory(ds, home):
    await fill_generated(ds, 5)
    await keep(ds, True)
    kept = kept_file(home)
    before = file_contents(kept)
    second = Datasette(memory=True)
    await second.invoke_startup()
    state = (await second.client.get("/-/keep-temporary", headers=AUTH)).json()
    assert state == {"ok": True, "keep": False, "file": None, "error": (
        "Temporary is in memory this time: another Datasette server is keeping its tables in "
        "~/.datasette-app/temporary.db. Quit that one and start Datasette Desktop again to see them here."
    )}
    assert await tables(second) == []
    assert_error(await keep(second, True), 400, "There is already a file at ~/.datasette-app/temporary.db")
    await second.get_database("temporary").execute_write("create table mine (a)", block=True)
    assert file_contents(kept) == before
    # The first lets go of it with nothing lost.
    assert (await keep(ds, False)).json()["keep"] is False
    assert await temporary_contents(ds) == before and not kept.exists()


async def test_dump_and_restore_with_temporary_kept(ds, home, tmp_path):
    await fill_generated(ds, 8)
    await keep(ds, True)
    kept = kept_file(home)
    before = file_contents(kept)
    dump = tmp_path / "dump.db"
    assert (await post(ds, "/-/dump-temporary-to-file", {"path": str(dump)})).status_code == 200
    assert file_contents(dump) == before
    # A restore of a dump of this same file changes nothing, and temporary stays kept.
    response = await post(ds, "/-/restore-temporary-from-file", {"path": str(dump)})
    assert response.status_code == 200, response.text
    assert file_contents(kept) == before and ds.get_database("temporary").path == str(kept)
    # A damaged backup is refused with the file as it was; another one replaces the content.
    damaged = corrupt_middle_page(tmp_path / "damaged.db")
    assert_error(await post(ds, "/-/restore-temporary-from-file", {"path": str(damaged)}), 400, "is damaged, so nothing was restored")
    assert file_contents(kept) == before
    other = make_db(tmp_path / "other.db", values=range(5000))
    response = await post(ds, "/-/restore-temporary-from-file", {"path": str(other)})
    assert response.json()["restored_tables"] == ["t"]
    assert file_contents(kept) == file_contents(other)
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600


def test_kept_temporary_takes_a_file_bigger_than_memory_and_stays_kept_when_it_cannot_come_back(tmp_path, memory_cgroup):
    """A server in a 300 MB memory cgroup, started as the app starts it, with temporary kept."""
    server = AppServer(tmp_path / "server")
    server.cgroup_procs = memory_cgroup(300 * 2**20)
    kept = server.app_folder / "temporary.db"
    server.start()
    try:
        assert json.loads(server.call("/-/keep-temporary", {"keep": True})[2])["keep"] is True
        big = write_wide_csv(tmp_path / "big.csv", 320)
        status, _, body = server.call("/-/open-csv-file", {"path": str(big)}, timeout=600)
        assert status == 200 and json.loads(body)["rows"] == 320 * 4000, body
        status, _, body = server.call("/-/keep-temporary", {"keep": False}, timeout=120)
        assert status == 400, body
        assert re.fullmatch(
            rf"The tables kept in {re.escape(str(kept))} need about \d+ MB of memory to move back into memory, "
            r"and the server's memory limit \(its cgroup\) leaves about \d+ MB free, so they stay kept in the file\.",
            json.loads(body)["error"],
        ), body
        assert json.loads(server.call("/-/keep-temporary")[2]) == {"ok": True, "keep": True, "file": str(kept)}
        conn = sqlite3.connect(f"file:{kept}?mode=ro", uri=True)
        assert conn.execute("select count(*), sum(id) from big").fetchone() == (320 * 4000, sum(range(320 * 4000)))
        conn.close()
    finally:
        server.stop()


def server_rss(server):
    """The resident memory of a server this test started, in bytes, from /proc."""
    with open(f"/proc/{server.process.pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads a server's memory from /proc")
def test_kept_temporary_gives_the_memory_of_the_copy_back(tmp_path):
    """Switching on, and on, off and on again, the server keeps none of the 300 MB it held in memory."""
    server = AppServer(tmp_path / "app")
    server.start()
    try:
        backup = write_backup(tmp_path / "backup.db", 300)
        assert server.call("/-/restore-temporary-from-file", {"path": str(backup)}, timeout=300)[0] == 200
        held = server_rss(server)
        for keep in (True, False, True):
            status, _, body = server.call("/-/keep-temporary", {"keep": keep}, timeout=300)
            assert status == 200 and json.loads(body)["keep"] is keep, body
        assert server_rss(server) < held - 200 * 2**20, (held, server_rss(server))
    finally:
        server.stop()


def test_keep_temporary_finds_the_app_folder_without_home(tmp_path):
    """The app's server has no HOME: the folder comes from its venv's place, or else the password database."""
    script = "import app_support; print(app_support._app_folder())"
    environment = {"PYTHONPATH": str(Path(app_support.__file__).parent)}
    elsewhere = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True, check=True)
    assert elsewhere.stdout.strip() == os.path.join(pwd.getpwuid(os.getuid()).pw_dir, ".datasette-app")
    python = app_venv(tmp_path / ".datasette-app" / "venv")
    in_the_app = subprocess.run([python, "-c", script], env=environment, capture_output=True, text=True, check=True)
    assert in_the_app.stdout.strip() == str(tmp_path / ".datasette-app")


def writing_into(path, thread):
    """Wait while thread runs for a transaction to have written a megabyte into the database at path; whether one did."""
    journal, size = Path(str(path) + "-journal"), path.stat().st_size
    while thread.is_alive():
        with contextlib.suppress(OSError):
            if journal.exists() and path.stat().st_size > size + 2**20:
                return True
        time.sleep(0.001)
    return False


def test_kept_temporary_survives_kill_restart_and_the_apps_restore_cycle(tmp_path):
    """The whole life of a kept temporary on a real server, every table's rows checked after each step."""
    server = AppServer(tmp_path / "app")
    kept = server.app_folder / "temporary.db"
    server.start()
    try:
        first = write(tmp_path / "first.csv", "code,lat\n02134,42.3601004\n00501,40.8154003\n")
        assert server.call("/-/open-csv-file", {"path": str(first)})[0] == 200
        status, _, body = server.call("/-/keep-temporary", {"keep": True})
        assert json.loads(body) == {"ok": True, "keep": True, "file": str(kept)}, body
        second = write_big_csv(tmp_path / "second.csv", 1000)
        assert server.call("/-/open-csv-file", {"path": str(second)})[0] == 200
        expected = file_contents(kept)
        assert sorted(expected[1]) == ["first", "second"] and expected[1]["first"] == [("02134", 42.3601004), ("00501", 40.8154003)]
        # kill -9 while the import writes into the file.
        big = write_big_csv(tmp_path / "big.csv", 1_000_000)
        answers = []

        def import_big():
            try:
                answers.append(server.call("/-/open-csv-file", {"path": str(big)}, timeout=120))
            except OSError as e:  # the server died mid-answer
                answers.append(e)

        call = threading.Thread(target=import_big)
        call.start()
        assert writing_into(kept, call), f"the import never wrote into the file: {answers}"
        server.process.kill()
        call.join()
        assert isinstance(answers[0], OSError), answers
        server.process.wait()
        assert Path(str(kept) + "-journal").exists()  # half-written: the next start must roll it back
        server.start()  # as the app restarts it: the choice was remembered
        assert json.loads(server.call("/-/keep-temporary")[2])["keep"] is True
        assert file_contents(kept) == expected
        assert not Path(str(kept) + "-journal").exists()
        # The app's cycle around a plugin install: dump, restart, restore.
        backup = tmp_path / "backup.db"
        assert server.call("/-/dump-temporary-to-file", {"path": str(backup)})[0] == 200
        server.stop()
        server.start()
        status, _, body = server.call("/-/restore-temporary-from-file", {"path": str(backup)})
        assert status == 200, body
        assert file_contents(kept) == expected
        status, _, body = server.call("/temporary/first.json?_shape=array")
        assert [row["code"] for row in json.loads(body)] == ["02134", "00501"]
        # Off: back in memory, the file gone, every row still there.
        status, _, body = server.call("/-/keep-temporary", {"keep": False})
        assert json.loads(body) == {"ok": True, "keep": False, "file": None}, body
        assert not kept.exists()
        backup2 = tmp_path / "backup2.db"
        assert server.call("/-/dump-temporary-to-file", {"path": str(backup2)})[0] == 200
        assert file_contents(backup2) == expected
        server.stop()
        server.start()
        assert json.loads(server.call("/-/keep-temporary")[2])["keep"] is False
        assert json.loads(server.call("/temporary.json")[2])["tables"] == []
    finally:
        server.stop()


def test_kept_temporary_damaged_at_start_on_a_real_server(tmp_path):
    server = AppServer(tmp_path / "app")
    kept = server.app_folder / "temporary.db"
    cut_short(kept)
    before = kept.read_bytes()
    server.start()
    try:
        state = json.loads(server.call("/-/keep-temporary")[2])
        assert state["keep"] is False and str(kept) in state["error"], state
        assert html.escape(state["error"], quote=False) in welcome_section(server.page("/"))
        csv_path = write(tmp_path / "a.csv", "a\n1\n")
        assert server.call("/-/open-csv-file", {"path": str(csv_path)})[0] == 200
    finally:
        server.stop()
    assert kept.read_bytes() == before


# ===== GET /-/import-progress =====


@pytest.mark.parametrize("database", ["temporary", "target"])
async def test_import_progress_while_a_large_import_runs(ds, tmp_path, database):
    await post(ds, "/-/new-empty-database-file", {"path": str(tmp_path / "target.db")})
    path = write_big_csv(tmp_path / "big.csv", 300_000)
    source = f"{tmp_path}/./big.csv"  # reported exactly as the request gave it
    body = {"path": source, "database": database}
    task = asyncio.ensure_future(post(ds, "/-/import-csv-file", body))
    seen = []
    while not task.done():
        items = await progress(ds)
        if items:
            seen.append(items[0])
        await asyncio.sleep(0.01)
    assert (await task).json()["rows"] == 300_000
    running = [item for item in seen if item["state"] == "running"]
    assert len(running) >= 5, "the import finished before progress could be polled"
    size = path.stat().st_size
    for before, after in zip(running, running[1:]):
        assert after["bytes_read"] >= before["bytes_read"]
        assert after["rows"] >= before["rows"]
    assert all(item["bytes_read"] <= item["bytes_total"] == size for item in running)
    assert running[-1]["rows"] > running[0]["rows"]
    final = (await progress(ds))[0]
    assert final["state"] == "done" and final["error"] is None
    assert (final["source"], final["database"], final["table"]) == (source, database, "big")
    assert (final["rows"], final["bytes_read"], final["bytes_total"]) == (300_000, size, size)
    assert final["started"].endswith("Z") and final["finished"] >= final["started"]


async def test_import_progress_failed_import(ds, tmp_path):
    path = tmp_path / "bad.csv"
    path.write_bytes(b"a,b\n" + b"1,2\n" * 7000 + b"\x00\n")
    response = await post(ds, "/-/open-csv-file", {"path": str(path)})
    assert_error(response, 400, "NUL")
    (item,) = await progress(ds)
    assert item["state"] == "failed"
    assert item["error"] == response.json()["error"]
    assert item["table"] is None and item["finished"] is not None


async def test_import_progress_for_url_counts_download_bytes(ds, server):
    base, routes = server
    body = b"id,name\n" + b"1,Cleo\n" * 5000
    routes["/dogs.csv"] = (200, {}, body)
    await post(ds, "/-/open-csv-from-url", {"url": base + "/dogs.csv"})
    (item,) = await progress(ds)
    assert item["source"] == base + "/dogs.csv"
    assert (item["state"], item["rows"], item["table"]) == ("done", 5000, "dogs")
    assert item["bytes_read"] == item["bytes_total"] == len(body)


async def test_import_progress_history_is_bounded(ds, tmp_path):
    path = tmp_path / "tiny.csv"
    path.write_text("a\n1\n")
    for _ in range(app_support.PROGRESS_HISTORY + 5):
        await post(ds, "/-/open-csv-file", {"path": str(path)})
    items = await progress(ds)
    assert len(items) == app_support.PROGRESS_HISTORY
    ids = [item["id"] for item in items]
    assert ids == sorted(ids, reverse=True) and ids[0] == app_support.PROGRESS_HISTORY + 5


async def test_import_progress_authentication(ds):
    root = await root_cookie(ds)
    other = {"ds_actor": ds.sign({"a": {"id": "someone"}}, "actor")}
    assert await progress(ds, headers={}, cookies=root) == []
    assert await progress(ds) == []
    for kwargs, status in [
        ({}, 401),
        ({"headers": {"Authorization": "Bearer nope"}}, 401),
        ({"headers": {"Authorization": TOKEN}}, 401),
        ({"cookies": other}, 403),
        ({"cookies": {"ds_actor": "forged"}}, 401),
    ]:
        response = await ds.client.get("/-/import-progress", **kwargs)
        assert_error(response, status, "")
    response = await ds.client.post("/-/import-progress", headers={"Authorization": f"Bearer {TOKEN}"})
    assert_error(response, 405, "Use GET")


async def test_progress_carries_what_the_panel_needs(ds, tmp_path):
    csv_path = write(tmp_path / "dogs.csv", "id,name\n1,Cleo\n2,Pancakes\n")
    titled = write(tmp_path / "titled.csv", "Dogs\n# as of today\nid,name,age\n1,Cleo,5\n")
    await post(ds, "/-/open-csv-file", {"path": str(csv_path)})
    await post(ds, "/-/open-csv-file", {"path": str(csv_path)})
    await post(ds, "/-/open-csv-file", {"path": str(titled)})
    with_title, newest, first = await progress(ds)
    assert newest == {
        "id": 2, "source": str(csv_path), "database": "temporary", "table": "dogs_2",
        "state": "done", "rows": 2, "bytes_read": 26, "bytes_total": 26,
        "started": newest["started"], "finished": newest["finished"], "error": None,
        "skipped_lines": 0, "path": "/temporary/dogs_2",
    }
    assert first["path"] == "/temporary/dogs"
    assert with_title["skipped_lines"] == 2 and with_title["rows"] == 1
    assert (await ds.client.get(newest["path"])).status_code == 200


async def test_import_progress_and_events_for_json(ds, tmp_path, events):
    path = write(tmp_path / "dogs.ndjson", DOGS_NDJSON * 3000)
    response = await post(ds, "/-/open-csv-file", {"path": str(path)})
    assert response.json()["rows"] == 6000
    (item,) = await progress(ds)
    assert (item["state"], item["rows"], item["table"]) == ("done", 6000, "dogs")
    assert item["bytes_read"] == item["bytes_total"] == path.stat().st_size
    if IS_DATASETTE_1:
        assert [(e.name, e.table) for e in events] == [("create-table", "dogs"), ("insert-rows", "dogs")]
        assert events[1].num_rows == 6000


async def test_import_progress_for_a_workbook_counts_every_sheet(ds, tmp_path):
    sheets = [(f"S{n}", large_sheet(20_000)) for n in range(3)]
    path = make_xlsx(tmp_path / "three.xlsx", sheets, ["even", "odd"])
    task = asyncio.ensure_future(post(ds, "/-/open-csv-file", {"path": str(path)}))
    seen = []
    while not task.done():
        seen += [item for item in await progress(ds) if item["state"] == "running"]
        await asyncio.sleep(0.005)
    assert (await task).json()["rows"] == 20_000
    for before, after in zip(seen, seen[1:]):
        assert after["rows"] >= before["rows"] and after["bytes_read"] >= before["bytes_read"]
    (final,) = await progress(ds)
    assert (final["state"], final["table"], final["rows"]) == ("done", "three_S0", 60_000)
    assert final["bytes_read"] == final["bytes_total"] == path.stat().st_size


# ===== POST /-/cancel-import =====


async def cancel_with_token(ds, import_id):
    """POST /-/cancel-import as the app does, with the token."""
    return await post(ds, "/-/cancel-import", {"id": import_id})


async def page_csrf(ds, cookies):
    """What a same-origin page sends with its POSTs: the cookies and the page's csrftoken."""
    page = await ds.client.get("/", cookies=cookies)
    config = page_global(page.text, "appSupport")
    cookies = {**cookies, **{k: v for k, v in page.cookies.items() if k == "ds_csrftoken"}}
    return cookies, {"x-csrftoken": config["csrftoken"], "Sec-Fetch-Site": "same-origin"}


async def cancel_with_cookie(ds, import_id):
    """POST /-/cancel-import as the panel does: from a page, with the cookie and the page's csrftoken."""
    cookies, headers = await page_csrf(ds, await root_cookie(ds))
    return await ds.client.post(
        "/-/cancel-import", content=json.dumps({"id": import_id}).encode(), cookies=cookies, headers=headers
    )


@pytest.mark.parametrize("database", ["temporary", "target"])
@pytest.mark.parametrize("cancel", [cancel_with_token, cancel_with_cookie])
async def test_cancel_import_stops_it_and_leaves_nothing(ds, tmp_path, database, cancel):
    task, item = await start_big_import(ds, tmp_path, database)
    response = await cancel(ds, item["id"])
    assert response.status_code == 200, response.text
    cancelled = response.json()["import"]
    assert (cancelled["id"], cancelled["state"], cancelled["path"]) == (item["id"], "cancelled", None), cancelled
    assert_error(await task, 400, "Import cancelled: " + item["source"])
    (final,) = await progress(ds)
    assert final["state"] == "cancelled" and final["error"] == "Import cancelled: " + item["source"]
    assert final["rows"] < 1_000_000 and final["finished"] is not None
    assert await tables(ds, database) == []
    # The home page cancel_with_cookie reads starts a fetch of the example CSVs in the background,
    # with a work folder of its own until it ends: not the import's to leave behind.
    await wait_for_fetch(ds, "examples")
    assert work_folders() == []


async def test_cancel_import_of_a_download(ds, server):
    base, routes = server
    started = threading.Event()

    def trickle(out):
        # About 3 MB a second: the download reports progress every megabyte.
        out.write(b"id,name\n")
        started.set()
        for _ in range(1000):  # 20 seconds, unless the reader hangs up first
            out.write(b"1,Cleo\n" * 10_000)
            time.sleep(0.02)

    routes["/slow.csv"] = (200, {"Content-Length": "70000008"}, trickle)
    task = asyncio.ensure_future(post(ds, "/-/open-csv-from-url", {"url": base + "/slow.csv"}))
    while not (await progress(ds)):
        await asyncio.sleep(0.01)
    await asyncio.to_thread(started.wait, 5)
    response = await cancel_with_token(ds, 1)
    assert response.json()["import"]["state"] == "cancelled", response.text
    assert_error(await task, 400, f"Import cancelled: {base}/slow.csv")
    assert await tables(ds) == [] and work_folders() == []


@pytest.mark.parametrize("database", ["temporary", "target"])
async def test_cancel_import_in_parts_stops_the_helpers(ds, tmp_path, in_parts, helpers, database):
    task, item = await start_big_import(ds, tmp_path, database)
    assert len(helpers) == 2 and all(helper.poll() is None for helper in helpers)
    response = await cancel_with_token(ds, item["id"])
    assert response.status_code == 200, response.text
    assert_error(await task, 400, "Import cancelled: " + item["source"])
    assert await tables(ds, database) == []
    assert work_folders() == [] and all(helper.poll() is not None for helper in helpers)


async def test_cancel_import_refused_from_another_site(ds, tmp_path):
    task, item = await start_big_import(ds, tmp_path, "temporary")
    cookies = await root_cookie(ds)
    # A cross-site page holds the cookie but cannot read the page's csrftoken;
    # Datasette 0.65 refuses it for that, 1.0 for its Sec-Fetch-Site header.
    response = await ds.client.post(
        "/-/cancel-import", content=json.dumps({"id": item["id"]}).encode(), cookies=cookies,
        headers={"Sec-Fetch-Site": "cross-site", "Origin": "https://elsewhere.example"},
    )
    assert response.status_code == 403
    assert (await task).json()["ok"] is True
    assert (await progress(ds))[0]["state"] == "done"


@pytest.mark.parametrize(
    "headers,refusal",
    [
        ({"Sec-Fetch-Site": "cross-site"}, app_support.CROSS_SITE_REFUSAL),
        ({}, app_support.MISSING_CSRF_TOKEN_REFUSAL),
        ({"x-csrftoken": "stale"}, app_support.STALE_CSRF_TOKEN_REFUSAL),
    ],
    ids=["cross-site", "no token", "stale token"],
)
async def test_cancel_import_refusals_say_what_is_missing(ds, headers, refusal):
    response = await ds.client.post(
        "/-/cancel-import", content=b'{"id": 99}', cookies=await root_cookie(ds), headers=headers
    )
    if IS_DATASETTE_1 and refusal != app_support.CROSS_SITE_REFUSAL:
        # 1.0 checks only where a request comes from, and this one is same-origin.
        assert_error(response, 400, "No import has the id 99.")
    else:
        assert_error(response, 403, refusal)


async def test_cancel_import_errors(ds, tmp_path):
    csv_path = write(tmp_path / "done.csv", "a\n1\n")
    await post(ds, "/-/open-csv-file", {"path": str(csv_path)})
    other = {"ds_actor": ds.sign({"a": {"id": "someone"}}, "actor")}
    for body, kwargs, status, error in [
        ({"id": 99}, {}, 400, "No import has the id 99."),
        ({"id": 1}, {}, 400, f"Import 1 has already finished (done): {csv_path}"),
        ({}, {}, 400, "The request has no id, which this endpoint needs. It takes id."),
        ({"id": "1"}, {}, 400, "id must be a whole number."),
        ({"id": True}, {}, 400, "id must be a whole number."),
        ({"id": 1.0}, {}, 400, "id must be a whole number."),
        ({"id": 1, "all": True}, {}, 400, "The request has a key this endpoint does not take: all. It takes id."),
        ({"id": 1}, {"token": None}, 401, "API token"),
        ({"id": 1}, {"token": "nope"}, 401, "API token"),
    ]:
        assert_error(await post(ds, "/-/cancel-import", body, **kwargs), status, error)
    response = await ds.client.post(
        "/-/cancel-import", content=b'{"id": 1}', cookies=other, headers={"x-csrftoken": "x"}
    )
    assert response.status_code == 403
    assert_error(await ds.client.get("/-/cancel-import", headers={"Authorization": f"Bearer {TOKEN}"}), 405, "Use POST")
    assert (await progress(ds))[0]["state"] == "done"


async def test_cancel_after_the_table_is_committed_changes_nothing(ds):
    log = app_support._import_log(ds)
    with log.track("late.csv", "temporary") as item:
        item.update(rows=10)
        cancel = asyncio.ensure_future(cancel_with_token(ds, item.id))
        await asyncio.sleep(0.2)  # the Cancel is waiting for the import to stop
        # The engine has committed and calls no further update: done wins.
        log.done(item, [app_support.ImportResult("late", 10, ["a"], ["TEXT"])])
    assert_error(await cancel, 400, "The import finished before it could be cancelled: late.csv")
    assert (await progress(ds))[0]["state"] == "done"
    assert_error(await cancel_with_token(ds, item.id), 400, "Import 1 has already finished (done): late.csv")


def big_ndjson(path):
    with open(path, "w") as f:
        for i in range(600_000):
            f.write(json.dumps({"id": i, "name": f"name {i}", "score": i * 1.5}) + "\n")
    return path


@pytest.mark.parametrize("database", ["temporary", "target"])
@pytest.mark.parametrize("make", [
    lambda folder: big_ndjson(folder / "big.ndjson"),
    lambda folder: make_xlsx(folder / "big.xlsx", [("One", large_sheet(300_000)), ("Two", large_sheet(300_000))], ["even", "odd"]),
], ids=["ndjson", "workbook"])
async def test_cancel_import_of_json_and_workbooks(ds, tmp_path, database, make):
    if database != "temporary":
        await post(ds, "/-/new-empty-database-file", {"path": str(tmp_path / "target.db")})
    path = make(tmp_path)
    task = asyncio.ensure_future(post(ds, "/-/import-csv-file", {"path": str(path), "database": database}))
    while True:
        items = await progress(ds)
        if items and items[0]["rows"]:
            break
        assert not task.done(), (await task).text
        await asyncio.sleep(0.005)
    response = await cancel_with_token(ds, items[0]["id"])
    assert response.json()["import"]["state"] == "cancelled", response.text
    assert_error(await task, 400, f"Import cancelled: {path}")
    assert await tables(ds, database) == [] and work_folders() == []


# ===== POST /-/refresh-plugin-directory: the plugin directory and the welcome section =====


async def with_lists(lists):
    return await with_settings(**lists.settings())


def reference_versions(rng):
    """Versions in PEP 440's order, built so: for each release, its dev, pre-, final and post-releases."""
    releases = sorted({tuple(rng.randrange(12) for _ in range(rng.randrange(1, 4))) for _ in range(15)},
                      key=lambda r: tuple(reversed([*reversed(r)][next((i for i, n in enumerate(reversed(r)) if n), len(r)):])) or (0,))
    versions = []
    for release in releases:
        spelled = lambda: ".".join(map(str, release)) + ".0" * rng.randrange(2)  # 1.2 is 1.2.0
        stages = [[".dev1"], ["a1.dev1", "a1", "a1.post1", "a2"], ["b1", "rc1"], [""], [".post1.dev1", ".post1", ".post2"]]
        group = []
        for suffixes in stages:
            group += [[spelled() + suffix for _ in range(2)] for suffix in suffixes]
        versions.append(group)
    return versions


def test_version_key_orders_generated_versions_as_pep_440():
    rng = random.Random(2026_20)
    assert app_support.version_key("0.10") > app_support.version_key("0.9")
    assert app_support.version_key("1.0a2") < app_support.version_key("1.0")
    assert app_support.version_key("1.0") == app_support.version_key("1.0.0") == app_support.version_key("v1")
    for text in ("", "latest", "1.0 beta", None, "1..0"):
        assert app_support.version_key(text) is None
    ranked = [(r, s, spelling) for r, group in enumerate(reference_versions(rng))
              for s, spellings in enumerate(group) for spelling in spellings]
    # Alternative spellings PEP 440 allows, kept in their place.
    respell = {"a1": "-alpha1", "b1": ".beta.1", "rc1": "c1", ".post1": "-1", ".dev1": "-dev1"}
    for _ in range(5000):
        (r1, s1, a), (r2, s2, b) = rng.choice(ranked), rng.choice(ranked)
        if rng.random() < 0.3:
            for old, new in respell.items():
                if a.endswith(old):
                    a = a[: -len(old)] + new
                    break
        expected = (r1, s1) > (r2, s2)
        assert (app_support.version_key(a) > app_support.version_key(b)) == expected, (a, b)
        assert (app_support.version_key(a) == app_support.version_key(b)) == ((r1, s1) == (r2, s2)), (a, b)


def test_plugin_rows_mark_installed_upgrades_and_defaults():
    installed = {"datasette-fake-old": "0.9", "datasette-fake-default": "1.0", "datasette-local": None}
    plugins = LISTED + [{"name": "Datasette_Local", "tag_name": "2.0", "extra": {"a": [1]}}, {"no": "name"}]
    columns, rows = app_support.plugin_rows(plugins, installed, {"datasette-fake-default"})
    assert columns == ["name", "installed", "installed_version", "upgrade", "is_default",
                       *app_support.PLUGIN_LIST_COLUMNS[1:], "extra"]
    table = [dict(zip(columns, row)) for row in rows]
    assert [(r["name"], r["installed"], r["installed_version"], r["upgrade"], r["is_default"]) for r in table] == [
        ("datasette-fake-old", "installed", "0.9", "upgrade available", 0),
        ("datasette-fake-default", "installed", "1.0", None, 1),
        ("datasette-cluster-map", "not installed", None, None, 0),
        ("Datasette_Local", "installed", None, None, 0),  # a --plugins-dir module has no version
    ]
    assert table[3]["extra"] == '{"a": [1]}'
    assert app_support.plugin_rows([], {}, set())[1] == []


async def wait_for_fetch(ds, which="plugins"):
    remote = getattr(app_support._lists(ds), which)
    while remote.fetching:
        await asyncio.sleep(0.01)
    return remote


async def directory_config(ds, cookies):
    page = await ds.client.get("/plugin_directory/plugins", cookies=cookies)
    assert page.status_code == 200
    return page_global(page.text, "appSupportDirectory")


async def test_plugin_directory_exists_before_any_list_and_says_why_there_is_none(lists):
    lists.stop()  # offline from the start
    ds = await with_lists(lists)
    for cookies in ({}, await root_cookie(ds)):
        page = await ds.client.get("/plugin_directory/plugins?_sort_desc=stargazers_count&_facet=installed&_facet=upgrade", cookies=cookies)
        assert page.status_code == 200
    rows_json = await ds.client.get("/plugin_directory/plugins.json?_shape=array")
    assert rows_json.json() == []
    # The desktop user's view started a fetch in the background; the page did not wait for it.
    cookies = await root_cookie(ds)
    status = (await directory_config(ds, cookies))["directory"]
    assert status["hasCopy"] is False
    await wait_for_fetch(ds)
    response = await post(ds, "/-/refresh-plugin-directory", {})
    assert_error(response, 502, refused_download(lists.url('plugins')))
    status = (await directory_config(ds, cookies))["directory"]
    assert status["message"] == "There is no copy of the plugin list yet: it comes from 127.0.0.1."
    assert status["error"].startswith("The last attempt to fetch it failed. Could not download")


async def test_refresh_plugin_directory_fills_the_table_and_keeps_a_copy(lists):
    lists.lists["plugins"] = generated_plugins()
    ds = await with_lists(lists)
    response = await post(ds, "/-/refresh-plugin-directory", {})
    assert response.json() == {"ok": True, "plugins": 30, "path": "/plugin_directory/plugins"}
    names = [r["name"] for r in await fetch_rows(ds, "/plugin_directory/plugins")]
    assert names == [p["name"] for p in lists.lists["plugins"]]
    copy = next(path for path in lists.copies() if path.exists())
    assert json.loads(copy.read_text())["items"] == lists.lists["plugins"]
    assert not [p for p in copy.parent.iterdir() if p.name.startswith(".partial-")]
    # Another server with the same settings shows the copy at startup, offline.
    lists.stop()
    again = await with_lists(lists)
    rows_again = await fetch_rows(again, "/plugin_directory/plugins")
    assert [r["name"] for r in rows_again] == names
    assert lists.requests == [lists.prefix + "/plugins.json"]
    status = (await directory_config(again, await root_cookie(again)))["directory"]
    assert status == {**status, "hasCopy": True, "fetching": False, "error": None,
                      "message": "30 plugins, listed by 127.0.0.1 just now."}


def not_an_array(handler):
    return 200, {"Content-Type": "application/json"}, b'{"plugins": []}'


REFRESH_FAILURES = [
    ("missing", (404, {}, b"gone"), "{url} returned HTTP 404 Not Found: there is no file at that address. Check the URL and try again."),
    ("web page", (200, {"Content-Type": "text/html"}, b"<html></html>"), "{url} is a web page (HTML), not CSV, TSV or JSON data."),
    ("not JSON", (200, {}, b"{oops"), "The plugin list at {url} is not JSON."),
    ("not an array", not_an_array, "The plugin list at {url} is not a JSON array of objects."),
    ("array of numbers", (200, {}, b"[1, 2]"), "The plugin list at {url} is not a JSON array of objects."),
]


@pytest.mark.parametrize("name,route,error", REFRESH_FAILURES, ids=[c[0] for c in REFRESH_FAILURES])
async def test_refresh_plugin_directory_failure_keeps_the_last_copy(server, name, route, error):
    url, routes = server
    routes["/plugins.json"] = (200, {}, json.dumps(LISTED).encode())
    ds = await with_settings(plugin_directory_url=url + "/plugins.json?run=" + uuid.uuid4().hex)
    assert (await post(ds, "/-/refresh-plugin-directory", {})).status_code == 200
    before = await fetch_rows(ds, "/plugin_directory/plugins")
    routes["/plugins.json"] = route
    response = await post(ds, "/-/refresh-plugin-directory", {})
    assert_error(response, 502, error.format(url=app_support._lists(ds).plugins.url))
    assert await fetch_rows(ds, "/plugin_directory/plugins") == before
    status = (await directory_config(ds, await root_cookie(ds)))["directory"]
    assert status["hasCopy"] and status["error"].endswith(response.json()["error"])
    for path in list_copies([app_support._lists(ds).plugins.url]):
        path.unlink(missing_ok=True)


async def test_refresh_plugin_directory_is_for_the_app_and_its_user_only(lists):
    ds = await with_lists(lists)
    other = {"ds_actor": ds.sign({"a": {"id": "someone"}}, "actor")}
    assert_error(await ds.client.post("/-/refresh-plugin-directory", content=b"{}"), 401, "Missing or invalid API token.")
    response = await ds.client.post("/-/refresh-plugin-directory", content=b"{}", cookies=other)
    # Datasette 0.65's CSRF check refuses it first: the request sent no token.
    assert_error(response, 403, "Only the desktop user of Datasette Desktop can do this." if IS_DATASETTE_1 else app_support.MISSING_CSRF_TOKEN_REFUSAL)
    assert_error(await post(ds, "/-/refresh-plugin-directory", {"x": 1}), 400, "The request has a key this endpoint does not take: x. It takes no keys: send {}.")
    assert lists.requests == []


async def test_plugin_directory_cells_and_pages_for_visitors(lists):
    lists.lists["plugins"] = LISTED
    ds = await with_lists(lists)
    await post(ds, "/-/refresh-plugin-directory", {})
    anonymous = await ds.client.get("/plugin_directory/plugins")
    # Data for the page script, but no buttons and no script, for anyone but the desktop user.
    assert 'data-name="datasette-cluster-map"' in anonymous.text and "app-support-button" not in anonymous.text
    assert page_assets(anonymous.text) == ([], None)
    page = await ds.client.get("/plugin_directory", cookies=await root_cookie(ds))
    assert page_assets(page.text)[1]["importDatabase"] is None
    if IS_DATASETTE_1:
        response = await ds.client.post("/plugin_directory/plugins/-/insert", json={"row": {"name": "x"}})
        assert response.status_code == 403


async def test_welcome_section_only_for_the_desktop_user(lists):
    lists.lists["examples"] = [{"name": "Dogs <3", "table_name": "dogs", "url": "https://example.com/dogs.csv",
                                "description": "Good dogs", "source": "Kennel", "source_url": "javascript:alert(1)"}]
    ds = await with_lists(lists)
    cookies = await root_cookie(ds)
    await ds.client.get("/", cookies=cookies)
    await wait_for_fetch(ds, "examples")
    page = (await ds.client.get("/", cookies=cookies)).text
    welcome = page if IS_DATASETTE_1 else page_global(page, "appSupportDirectory")["welcomeHtml"]
    assert "Welcome to Datasette Desktop" in welcome and ">Run SQL</a>" in welcome
    assert "<h3>Dogs &lt;3</h3>" in welcome and 'data-tablename="dogs"' in welcome
    assert "javascript:" not in welcome  # a link from the list that is not a web address is left out
    for visitor in ({}, {"ds_actor": ds.sign({"a": {"id": "someone"}}, "actor")}):
        assert "Welcome to Datasette Desktop" not in (await ds.client.get("/", cookies=visitor)).text


# ===== The pages: the page the app opens the moment an endpoint answers =====


async def listed_tables(ds, database):
    """The tables the database page lists, as the app would show them right now."""
    response = await ds.client.get(f"/{database}.json")
    assert response.status_code == 200, response.text
    return {t["name"] for t in response.json()["tables"]}


async def test_opened_database_lists_its_tables_on_the_first_request(ds, tmp_path):
    path = make_db(tmp_path / "shop.db", table="orders")
    sqlite3.connect(path).execute("create table customers (id integer)").connection.close()
    # A page load first: Datasette 1.0 then skips catalog refreshes for a second.
    assert (await ds.client.get("/")).status_code == 200
    response = await post(ds, "/-/open-database-file", {"path": str(path)})
    assert response.json()["path"] == "/shop"
    assert await listed_tables(ds, "shop") == {"orders", "customers"}


async def test_every_new_table_is_listed_on_the_first_request(ds, tmp_path, server):
    base, routes = server
    routes["/cats.csv"] = (200, {}, b"name\nMilo\n")
    csv_path = write(tmp_path / "dogs.csv", "name,age\nCleo,5\n")
    assert (await ds.client.get("/")).status_code == 200
    response = await post(ds, "/-/new-empty-database-file", {"path": str(tmp_path / "new.db")})
    assert response.json()["path"] == "/new"
    assert await listed_tables(ds, "new") == set()
    steps = [
        ("/-/import-csv-file", {"path": str(csv_path), "database": "new"}, "new", "dogs"),
        ("/-/open-csv-file", {"path": str(csv_path)}, "temporary", "dogs"),
        ("/-/open-csv-from-url", {"url": base + "/cats.csv"}, "temporary", "cats"),
    ]
    for endpoint, body, database, table in steps:
        response = await post(ds, endpoint, body)
        assert response.json()["path"] == f"/{database}/{table}", response.text
        assert table in await listed_tables(ds, database), endpoint
        page = await ds.client.get(response.json()["path"] + ".json?_shape=array")
        assert page.status_code == 200 and len(page.json()) == 1, endpoint


async def test_restored_temporary_lists_its_tables_on_the_first_request(ds, tmp_path):
    backup = make_db(tmp_path / "backup.db", table="saved")
    assert (await ds.client.get("/")).status_code == 200
    response = await post(ds, "/-/restore-temporary-from-file", {"path": str(backup)})
    assert response.json()["ok"] is True
    assert await listed_tables(ds, "temporary") == {"saved"}


# ===== The pages: other readers never wait for an import =====


async def test_csv_import_stays_responsive_and_never_locks_the_schema(ds, tmp_path):
    """Import a large file into temporary while polling pages next to it."""
    path = tmp_path / "big.csv"
    with open(path, "w") as f:
        f.write("id,name,score\n")
        for i in range(300_000):
            f.write(f"{i},name {i},{i * 1.5}\n")
    small = tmp_path / "small.csv"
    small.write_text("a\n1\n")
    await post(ds, "/-/open-csv-file", {"path": str(small)})

    task = asyncio.ensure_future(post(ds, "/-/open-csv-file", {"path": str(path)}))
    statuses, during = [], []
    while not task.done():
        for page in ("/", "/temporary", "/temporary.json", "/temporary/small.json"):
            before = (await progress(ds))[0]["state"] == "running"
            statuses.append(((await ds.client.get(page)).status_code, page))
            if before and (await progress(ds))[0]["state"] == "running":
                during.append(page)  # loaded while the import ran, whatever the machine's speed
        await asyncio.sleep(0.01)
    assert (await task).json()["rows"] == 300_000
    # Importing straight into temporary, without staging, makes every page
    # loaded during the import a 500.
    assert set(during) == {"/", "/temporary", "/temporary.json", "/temporary/small.json"}, during
    assert all(status == 200 for status, _ in statuses), [s for s in statuses if s[0] != 200]


def poll_during(work, pollers, interval=0.05):
    """Run work() while calling each poller every interval; return its result and {name: [(answer, start, end)]}."""
    done = threading.Event()
    polls = {name: [] for name in pollers}

    def poll(name):
        while not done.is_set():
            start = time.monotonic()
            answer = pollers[name]()
            polls[name].append((answer, start, time.monotonic()))
            done.wait(max(0.0, interval - (time.monotonic() - start)))

    threads = [threading.Thread(target=poll, args=(name,)) for name in pollers]
    for thread in threads:
        thread.start()
    try:
        result = work()
    finally:
        done.set()
        for thread in threads:
            thread.join()
    return result, polls


def page_loader(app_server, page):
    """Load page as a browser would: its status, or the status and the end of its body when it fails."""

    def load():
        try:
            with urllib.request.urlopen(app_server.url(page), timeout=60) as r:
                r.read()
                return r.status
        except urllib.error.HTTPError as e:
            body = re.sub(rb"\s+", b" ", e.read())[-600:]
            return f"{e.code}: {body!r}"

    return load


def read_without_waiting(path):
    """Read a table of path as another program would, but fail at once on a lock instead of waiting."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=0)
    try:
        conn.execute("select count(*) from t").fetchone()
        return None
    except sqlite3.OperationalError as e:
        return str(e)
    finally:
        conn.close()


def reading_window(polls):
    """The span in which every answer of `/-/import-progress` said the import was still reading its rows.

    Each answer was true at some moment between its request and its answer, so
    the span from the first such answer to the last such request lies inside
    the reading phase, whatever the machine's speed.
    """
    seen = [(start, end) for reading, start, end in polls if reading]
    assert len(seen) >= 2, "the import progress never answered twice while the import read its rows"
    return seen[0][1], seen[-1][0]


def still_reading(app_server, rows):
    status, _, body = app_server.call("/-/import-progress")
    assert status == 200, body
    latest = json.loads(body)["imports"][0]
    return latest["state"] == "running" and latest["rows"] < rows


@pytest.mark.parametrize("database", ["target", "temporary"])
def test_pages_and_the_target_file_never_wait_for_a_large_import(app_server, tmp_path, database):
    """Importing straight into the file held its lock for the whole import: seconds of stalled pages.

    Nothing here is timed, since the machines are shared. Pages, the import's
    progress and another program's reads of the target file are polled while
    the import runs. A page stalled by the import, or an event loop blocked by
    it, leaves no page load inside the span where progress still said
    "reading"; a lock on the target fails the other program's read at once.
    How long pages take is measured by benchmarks/page_latency.py.
    """
    for name in ("target", "elsewhere"):
        status, _, body = app_server.call("/-/open-database-file", {"path": str(make_db(tmp_path / f"{name}.db"))})
        assert status == 200, body
    small = write(tmp_path / "small.csv", "a\n1\n")
    assert app_server.call("/-/open-csv-file", {"path": str(small)})[0] == 200
    other = "t" if database == "target" else "small"
    pages = ["/", "/-/databases.json", f"/{database}", f"/{database}/{other}", "/elsewhere/t"]
    # Loads are back to back, so a span of reading longer than two of a page's
    # loads holds a whole one, unless the import stalls it. A busy machine
    # slows the loads as much as the reading: then a larger file decides.
    for rows in (500_000, 1_000_000, 2_000_000):
        big = write_big_csv(tmp_path / f"big{rows}.csv", rows)
        pollers = {page: page_loader(app_server, page) for page in pages}
        pollers["reading"] = functools.partial(still_reading, app_server, rows)
        pollers["target file"] = lambda: read_without_waiting(tmp_path / "target.db")
        endpoint, body = (
            ("/-/import-csv-file", {"path": str(big), "database": database})
            if database != "temporary"
            else ("/-/open-csv-file", {"path": str(big)})
        )
        (status, _, answer), polls = poll_during(lambda: app_server.call(endpoint, body), pollers)
        assert status == 200 and json.loads(answer)["rows"] == rows, answer
        first, last = reading_window(polls.pop("reading"))
        inside = {
            name: [answer for answer, start, end in answers if first <= start and end <= last]
            for name, answers in polls.items()
        }
        failures = {page: [a for a, _, _ in polls[page] if a != 200] for page in pages}
        assert not any(failures.values()), failures
        assert inside["target file"] and not any(inside["target file"]), inside["target file"]
        slowest = {page: round(max(end - start for _, start, end in polls[page]), 2) for page in pages}
        if last - first >= 2 * max(slowest.values()):
            break
    assert all(inside[page] for page in pages), (
        f"no load inside {last - first:.2f} s of reading: {({p: len(inside[p]) for p in pages})}, slowest {slowest}"
    )


# ===== The pages: the panel's script and style, and the Import CSV button =====


async def test_page_script_only_for_the_desktop_user(ds, tmp_path):
    other = {"ds_actor": ds.sign({"a": {"id": "someone"}}, "actor")}
    for cookies in ({}, other):
        for path in ("/", "/temporary", "/-/metadata"):
            page = await ds.client.get(path, cookies=cookies)
            assert page_assets(page.text) == ([], None), path
    page = await ds.client.get("/", cookies=await root_cookie(ds))
    tags, config = page_assets(page.text)
    version = app_support.ASSET_VERSION
    assert tags[:2] == [
        f'<link rel="stylesheet" href="/-/app-support.css?v={version}">',
        f'<script src="/-/app-support.js?v={version}"></script>',
    ]
    assert config["progressUrl"] == "/-/import-progress" and config["cancelUrl"] == "/-/cancel-import"
    script = await ds.client.get(f"/-/app-support.js?v={version}")
    assert script.headers["content-type"].startswith("application/javascript")
    assert script.text == app_support.PAGE_SCRIPT
    style = await ds.client.get("/-/app-support.css")
    assert style.headers["content-type"].startswith("text/css") and style.text == app_support.PAGE_STYLE


async def test_import_csv_button_only_for_mutable_database_pages(ds, tmp_path):
    await post(ds, "/-/new-empty-database-file", {"path": str(tmp_path / "mine.db")})
    ds.add_database(
        app_support.Database(ds, path=str(make_db(tmp_path / "fixed.db")), is_mutable=False), name="fixed"
    )
    await post(ds, "/-/open-csv-file", {"path": str(write(tmp_path / "dogs.csv", "a\n1\n"))})
    cookies = await root_cookie(ds)
    for path, target in [
        ("/mine", "mine"),
        ("/temporary", "temporary"),
        ("/fixed", None),
        ("/", None),
        ("/temporary/dogs", None),
        ("/temporary/dogs/1", None),
        ("/temporary?sql=select+1", None),
    ] + [("/temporary/-/query?sql=select+1", None)] * IS_DATASETTE_1:
        page = await ds.client.get(path, cookies=cookies)
        if page.status_code == 302:  # Datasette 1.0 moved ?sql= to /-/query
            page = await ds.client.get(page.headers["location"], cookies=cookies)
        assert page.status_code == 200, path
        assert page_assets(page.text)[1]["importDatabase"] == target, path


async def test_page_config_cannot_close_its_script_element(ds, tmp_path):
    name = "x</script><b>"
    ds.add_database(app_support._memory_database(ds, "app_support_test_closing"), name=name)
    page = await ds.client.get(ds.urls.database(name), cookies=await root_cookie(ds))
    assert page.status_code == 200
    tags, config = page_assets(page.text)
    assert config["importDatabase"] == name
    assert "</script><b>" not in page.text.split("window.appSupport = ", 1)[1].split("</script>")[0]


# ===== The pages: Datasette 1.0 gives the app user its powers, and imports emit events =====


needs_datasette_1 = pytest.mark.skipif(
    not IS_DATASETTE_1, reason="Datasette 0.65 has no write API, events or SQL permissions"
)


@needs_datasette_1
async def test_root_can_create_insert_drop_and_run_sql(ds):
    cookies = await root_cookie(ds)
    create = await ds.client.post(
        "/temporary/-/create",
        json={"table": "dogs", "columns": [{"name": "id", "type": "integer"}, {"name": "name"}], "pk": "id"},
        cookies=cookies,
    )
    assert create.status_code == 201, create.text
    insert = await ds.client.post(
        "/temporary/dogs/-/insert", json={"rows": [{"id": 1, "name": "Cleo"}]}, cookies=cookies
    )
    assert insert.status_code == 201, insert.text
    query = await ds.client.get(
        "/temporary/-/query.json?sql=select+name+from+dogs&_shape=array", cookies=cookies
    )
    assert query.json() == [{"name": "Cleo"}]
    drop = await ds.client.post("/temporary/dogs/-/drop", json={"confirm": True}, cookies=cookies)
    assert drop.status_code == 200, drop.text
    assert await tables(ds) == []


@needs_datasette_1
async def test_anonymous_keeps_datasette_defaults(ds, tmp_path):
    csv_path = tmp_path / "dogs.csv"
    csv_path.write_text("id,name\n1,Cleo\n")
    await post(ds, "/-/open-csv-file", {"path": str(csv_path)})
    create = await ds.client.post("/temporary/-/create", json={"table": "x", "columns": [{"name": "a"}]})
    insert = await ds.client.post("/temporary/dogs/-/insert", json={"rows": [{"id": 2, "name": "x"}]})
    drop = await ds.client.post("/temporary/dogs/-/drop", json={"confirm": True})
    assert [r.status_code for r in (create, insert, drop)] == [403, 403, 403]
    assert await tables(ds) == ["dogs"]
    assert await rows(ds, "temporary", "select count(*) from dogs") == [(1,)]
    # Viewing stays allowed, as Datasette's defaults say.
    assert (await ds.client.get("/temporary/dogs")).status_code == 200


@needs_datasette_1
async def test_imports_emit_create_table_and_insert_rows_events(ds, tmp_path, server, events):
    base, routes = server
    routes["/dogs.csv"] = (200, {}, CSV_BODY)
    csv_path = tmp_path / "dogs.csv"
    csv_path.write_bytes(b"id,name\n" + b"1,x\n" * 12_345)
    db_path = make_db(tmp_path / "target.db")
    await post(ds, "/-/open-database-file", {"path": str(db_path)})
    for endpoint, body, database, table, count in [
        ("/-/open-csv-file", {"path": str(csv_path)}, "temporary", "dogs", 12_345),
        ("/-/import-csv-file", {"path": str(csv_path), "database": "target"}, "target", "dogs", 12_345),
        ("/-/open-csv-from-url", {"url": base + "/dogs.csv"}, "temporary", "dogs_2", 2),
    ]:
        events.clear()
        assert (await post(ds, endpoint, body)).json()["ok"]
        assert [e.name for e in events] == ["create-table", "insert-rows"]
        create, insert = events
        assert (create.database, create.table) == (database, table)
        assert create.schema == (await rows(ds, database, "select sql from sqlite_master where name = ?", [table]))[0][0]
        assert (insert.database, insert.table, insert.num_rows) == (database, table, count)
        assert create.actor == {"id": "root"}


@needs_datasette_1
async def test_workbook_imports_emit_events_for_each_table(ds, tmp_path, events):
    path = pets_workbook(tmp_path / "pets.xlsx")
    assert (await post(ds, "/-/open-csv-file", {"path": str(path)})).json()["ok"]
    assert [(e.name, e.table) for e in events] == [
        ("create-table", "pets_Dogs"), ("insert-rows", "pets_Dogs"),
        ("create-table", "pets_Cats"), ("insert-rows", "pets_Cats"),
    ]
    assert [e.num_rows for e in events if e.name == "insert-rows"] == [2, 1]


@needs_datasette_1
async def test_failed_import_emits_no_events(ds, tmp_path, events):
    csv_path = tmp_path / "bad.csv"
    csv_path.write_bytes(b"a,b\n" + b"1,2\n" * 6000 + b"\x00\n")
    assert_error(await post(ds, "/-/open-csv-file", {"path": str(csv_path)}), 400, "NUL")
    assert events == []


@needs_datasette_1
async def test_auth_app_user_emits_login_event(ds, events):
    await root_cookie(ds)
    assert [(e.name, e.actor) for e in events] == [("login", {"id": "root"})]


async def test_events_are_quietly_absent_on_0_65(ds, tmp_path):
    # On 0.65 there is nothing to listen with; an import must still succeed.
    csv_path = tmp_path / "e.csv"
    csv_path.write_text("a\n1\n")
    assert (await post(ds, "/-/open-csv-file", {"path": str(csv_path)})).json()["ok"]
    assert (app_support.datasette_events is None) == (not IS_DATASETTE_1)


# ===== The browser: the import panel in headless Chromium, driven over the DevTools protocol =====
#
# The client comes first: Browser starts Chromium with --remote-debugging-pipe
# and speaks the protocol's JSON over two pipes. The desktop fixture opens a
# window on a real server; the tests then drive it as the app's user would.


CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(
    not CHROMIUM and not os.environ.get("CI"),
    reason="needs Chromium (apt-get install chromium); with CI set, its absence fails instead",
)


class Browser:
    """Headless Chromium driven over --remote-debugging-pipe: fds 3 and 4, NUL-separated JSON."""

    def __init__(self, profile):
        if not CHROMIUM:
            pytest.fail("CI is set, so the browser tests must run, but chromium is not installed")
        to_browser, self._commands = os.pipe()
        self._replies, from_browser = os.pipe()
        self.process = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"],
            pass_fds=(3, 4), preexec_fn=lambda: (os.dup2(to_browser, 3), os.dup2(from_browser, 4)),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        os.close(to_browser)
        os.close(from_browser)
        self.ids = iter(range(1, 1_000_000))
        self.messages = {}
        self.events = []
        self.changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        target = self.browser_command("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.browser_command("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.command(f"{domain}.enable")
        self.command("Emulation.setDeviceMetricsOverride", width=1000, height=640, deviceScaleFactor=1, mobile=False)

    def _read(self):
        buffer = b""
        while True:
            chunk = os.read(self._replies, 1 << 16)
            if not chunk:
                return
            *messages, buffer = (buffer + chunk).split(b"\0")
            with self.changed:
                for message in map(json.loads, messages):
                    if "id" in message:
                        self.messages[message["id"]] = message
                    else:
                        self.events.append(message)
                self.changed.notify_all()

    def send(self, method, params, session):
        message = {"id": next(self.ids), "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        return message["id"]

    def reply(self, message_id, timeout=30):
        with self.changed:
            assert self.changed.wait_for(lambda: message_id in self.messages, timeout), "no reply"
            message = self.messages.pop(message_id)
        assert "error" not in message, message["error"]
        return message["result"]

    def command(self, method, /, **params):
        """A command to the page."""
        return self.reply(self.send(method, params, self.session))

    def browser_command(self, method, /, **params):
        return self.reply(self.send(method, params, None))

    def event(self, method, after=0, timeout=30):
        """The first event named method among those received after the first `after`."""
        def find():
            return next((e for e in self.events[after:] if e["method"] == method), None)
        with self.changed:
            assert self.changed.wait_for(find, timeout), f"no {method} event"
            return find()["params"]

    def navigate(self, url):
        after = len(self.events)
        self.command("Page.navigate", url=url)
        self.event("Page.loadEventFired", after)

    def sign_in(self, base, redirect):
        """POST /-/auth-app-user from the window, with no Content-Type, as the desktop app does."""
        self.command("Fetch.enable", patterns=[{"urlPattern": "*/-/auth-app-user"}])
        after = len(self.events)
        navigation = self.send("Page.navigate", {"url": base + "/-/auth-app-user"}, self.session)
        paused = self.event("Fetch.requestPaused", after)
        self.command(
            "Fetch.continueRequest", requestId=paused["requestId"], method="POST",
            postData=base64.b64encode(json.dumps({"redirect": redirect}).encode()).decode(),
            headers=[{"name": "Authorization", "value": f"Bearer {TOKEN}"}],
        )
        self.reply(navigation)
        self.event("Page.loadEventFired", after)
        self.command("Fetch.disable")

    def evaluate(self, expression):
        result = self.command("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def wait_for(self, expression, timeout=15):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for: {expression}")

    def click(self, selector):
        """A real mouse click in the middle of the element."""
        box = self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
            " e.scrollIntoView({block: 'center', inline: 'center'}); const r = e.getBoundingClientRect();"
            " return {x: r.x + r.width / 2, y: r.y + r.height / 2}; })()"
        )
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.command("Input.dispatchMouseEvent", type=kind, button="left", clickCount=1, **box)

    def screenshot(self, path):
        Path(path).write_bytes(base64.b64decode(self.command("Page.captureScreenshot", format="png")["data"]))

    def errors(self):
        """Console errors, uncaught exceptions and failed loads the page reported."""
        return [
            e["params"] for e in self.events
            if e["method"] == "Runtime.exceptionThrown"
            or (e["method"] == "Runtime.consoleAPICalled" and e["params"]["type"] == "error")
            or (e["method"] == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")
        ]

    def requests(self, fragment):
        return [
            e["params"]["request"]["url"] for e in self.events
            if e["method"] == "Network.requestWillBeSent" and fragment in e["params"]["request"]["url"]
        ]

    def close(self):
        try:
            self.send("Browser.close", {}, None)
            self.process.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        os.close(self._commands)
        os.close(self._replies)


@pytest.fixture
def desktop(app_server, tmp_path):
    """A real datasette process with the plugin, and a browser window on it."""
    browser = Browser(tmp_path / "profile")
    yield app_server, browser
    browser.close()


def in_background(app_server, path, body):
    """Call an endpoint in a thread; the returned list receives (status, JSON body)."""
    result = []

    def run():
        status, _, content = app_server.call(path, body)
        result.append((status, json.loads(content)))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def imports(app_server):
    return json.loads(app_server.call("/-/import-progress")[2])["imports"]


PANEL = ".app-support-panel"
# What the desktop app's preload script gives its windows, as a stand-in
# that records each call: its function, arguments, and the link's dataset.
DATASETTE_APP = """window.appCalls = [];
window.datasetteApp = {
  importCsv: (database) => { window.importedInto = database; },
  importCsvFromUrl: (url, link) => appCalls.push(["importCsvFromUrl", url, link.tagName, {...link.dataset}]),
  installPlugin: (plugin, link) => appCalls.push(["installPlugin", plugin, link.tagName]),
  uninstallPlugin: (plugin, link) => appCalls.push(["uninstallPlugin", plugin, link.tagName]),
};"""


@needs_chromium
def test_browser_panel_shows_progress_and_cancels(desktop, tmp_path):
    app_server, browser = desktop
    base = app_server.url()
    browser.navigate(base + "/temporary")
    # Anonymous: no script, so no polling and no Import CSV button.
    assert browser.evaluate("typeof window.appSupport") == "undefined"
    assert browser.requests("/-/import-progress") == []
    browser.sign_in(base, "/temporary")
    # In a plain browser, with no window.datasetteApp, there is no Import CSV button.
    assert browser.evaluate("!!window.appSupport && !document.querySelector('.app-support-import-csv')")
    browser.command("Page.addScriptToEvaluateOnNewDocument", source=DATASETTE_APP)
    path = write_big_csv(tmp_path / "big.csv", 3_000_000)
    thread, result = in_background(app_server, "/-/import-csv-file", {"path": str(path), "database": "temporary"})
    while not (imports(app_server) and imports(app_server)[0]["rows"]):
        assert thread.is_alive(), result
        time.sleep(0.02)
    browser.navigate(base + "/temporary")
    status = f"{PANEL} .app-support-running .app-support-status"
    text = browser.wait_for(f"document.querySelector('{status}')?.textContent")
    assert text.startswith("Importing: ") and text.endswith("%"), text
    panel = browser.evaluate(
        f"""(() => {{ const p = document.querySelector('{PANEL}');
        return {{source: p.querySelector('.app-support-source').textContent,
                 live: p.querySelector('[aria-live]').getAttribute('aria-live'),
                 bar: p.querySelector('progress').hasAttribute('value'),
                 buttons: [...p.querySelectorAll('button')].map(b => b.textContent),
                 position: getComputedStyle(p).position}}; }})()"""
    )
    assert panel == {"source": "big.csv", "live": "polite", "bar": True, "buttons": ["Cancel"], "position": "fixed"}
    browser.wait_for(f"document.querySelector('{status}').textContent !== {json.dumps(text)}")  # it moves
    browser.screenshot(os.environ.get("APP_SUPPORT_SCREENSHOT") or tmp_path / "panel.png")
    browser.click(f"{PANEL} button")
    thread.join(10)
    assert result[0][0] == 400 and result[0][1]["error"] == f"Import cancelled: {path}"
    message = browser.wait_for(f"document.querySelector('{PANEL} .app-support-cancelled .app-support-status')?.textContent")
    assert message == f"Import cancelled: {path}"
    assert imports(app_server)[0]["state"] == "cancelled"
    assert json.loads(app_server.call("/temporary.json")[2])["tables"] == []
    browser.click(f"{PANEL} button")  # Dismiss
    browser.wait_for(f"document.querySelector('{PANEL}').hidden")
    assert browser.errors() == []


# Records the panel's decisions, so a test checks them rather than counting
# polls in a window of wall-clock time: each timer set for poll() (its delay,
# whether it fired or was cleared) and how many fetches are under way.
POLL_TIMERS = """
window.pollTimers = [];
window.fetchesUnderWay = 0;
window.fetchesStarted = 0;
(() => {
  const set = window.setTimeout, clear = window.clearTimeout, fetch = window.fetch;
  window.setTimeout = function (callback, delay, ...rest) {
    if (callback && callback.name === "poll") {
      const timer = { delay: delay, fired: false, cleared: false };
      timer.id = set.call(window, () => { timer.fired = true; callback(); }, delay);
      window.pollTimers.push(timer);
      return timer.id;
    }
    return set.call(window, callback, delay, ...rest);
  };
  window.clearTimeout = function (id) {
    window.pollTimers.forEach((timer) => { if (timer.id === id) timer.cleared = true; });
    return clear.call(window, id);
  };
  window.fetch = function (...args) {
    window.fetchesUnderWay += 1;
    window.fetchesStarted += 1;
    return fetch.apply(window, args).finally(() => { window.fetchesUnderWay -= 1; });
  };
})();
"""
PENDING_POLLS = "window.pollTimers.filter((t) => !t.fired && !t.cleared)"


@needs_chromium
def test_browser_panel_follows_a_finished_import_to_its_table(desktop, server, tmp_path):
    app_server, browser = desktop
    base = app_server.url()
    url, routes = server
    chunk = b"1,Cleo,5\n" * 2000
    started = threading.Event()

    def trickle(out):  # twelve seconds: the idle page's next poll sees it running
        out.write(b"Dogs at the shelter\nid,name,age\n")  # a title line above the header
        started.set()
        for _ in range(20):
            time.sleep(0.6)
            out.write(chunk)

    routes["/dogs.csv"] = (200, {}, trickle)  # no Content-Length: the size is unknown
    browser.command("Page.addScriptToEvaluateOnNewDocument", source=DATASETTE_APP + POLL_TIMERS)
    browser.sign_in(base, "/temporary")
    browser.click(".app-support-import-csv")
    assert browser.evaluate("window.importedInto") == "temporary"
    # Idle, the page polls slowly: one timer at a time, at the idle delay.
    browser.wait_for("window.pollTimers.length > 0")
    assert browser.evaluate(f"{PENDING_POLLS}.map((t) => t.delay)") == [5000]
    thread, result = in_background(app_server, "/-/open-csv-from-url", {"url": url + "/dogs.csv"})
    started.wait(10)
    browser.wait_for(f"!!document.querySelector('{PANEL} .app-support-running')", timeout=10)
    # An indeterminate bar, and no percentage, while the size is unknown.
    assert browser.evaluate(f"document.querySelector('{PANEL} progress').hasAttribute('value')") is False
    assert browser.evaluate(f"document.querySelector('{PANEL} .app-support-status').textContent") == "Importing: 0 rows"
    browser.wait_for(f"{PENDING_POLLS}.length === 1")
    assert browser.evaluate(f"{PENDING_POLLS}[0].delay") == 750
    # A hidden page does not poll at all, and polls at once when shown again.
    visibility = "Object.defineProperty(document, 'hidden', {{value: {}, configurable: true}});" \
        "document.dispatchEvent(new Event('visibilitychange'));"
    browser.evaluate(visibility.format("true"))
    # Once a poll under way has answered, no timer is left to poll again.
    browser.wait_for(f"window.fetchesUnderWay === 0 && {PENDING_POLLS}.length === 0")
    fetches = browser.evaluate("window.fetchesStarted")
    browser.evaluate(visibility.format("false"))
    # No timer was pending, so this poll is the one a page shown again makes at once.
    browser.wait_for(f"window.fetchesStarted > {fetches}")
    assert imports(app_server)[0]["state"] == "running"
    open_link = browser.wait_for(f"document.querySelector('{PANEL} .app-support-open')?.textContent", timeout=20)
    thread.join(10)
    assert result == [(200, {
        "ok": True, "path": "/temporary/dogs", "rows": 40_000, "format": "csv",
        "skipped_lines": ["Dogs at the shelter"],
    })]
    assert open_link == "Open dogs"
    assert browser.evaluate(f"document.querySelector('{PANEL} .app-support-status').textContent") == (
        "Imported 40,000 rows into dogs. Skipped 1 line above the header."
    )
    browser.screenshot(os.environ.get("APP_SUPPORT_SCREENSHOT_DONE") or tmp_path / "done.png")
    after = len(browser.events)
    browser.click(f"{PANEL} .app-support-open")
    browser.event("Page.loadEventFired", after)
    assert browser.evaluate("location.pathname") == "/temporary/dogs"
    assert "dogs" in browser.evaluate("document.querySelector('h1').textContent")
    assert browser.evaluate("document.querySelectorAll('table.rows-and-columns tbody tr').length") > 0
    # The table the import has just filled shows its line again, as the app
    # opens that table at once: with the way to change how it was read.
    browser.wait_for(f"!!document.querySelector('{PANEL} .app-support-change')")
    assert browser.evaluate(f"[...document.querySelectorAll('{PANEL} .app-support-source')].map(e => e.textContent)") == [
        url + "/dogs.csv"
    ]
    # Another page shows nothing for imports that finished before it opened.
    browser.navigate(base + "/temporary")
    browser.wait_for(f"!!document.querySelector('{PANEL}')")
    time.sleep(0.5)
    assert browser.evaluate(f"document.querySelector('{PANEL}').hidden") is True
    assert browser.errors() == []


# ===== The browser: the plugin directory and the welcome section =====


# Installed as the list's versions say: 0.10 is newer than 0.9, 1.0a2 older than 1.0.
INSTALLED = {"datasette-fake-old": "0.9", "datasette-fake-default": "1.0"}


DEFAULT_PLUGINS = "datasette datasette-app-support datasette-fake-default"


def install_plugins(folder, plugins=INSTALLED):
    """Plugins laid out as pip installs them, a module and its dist-info, in folder: for PYTHONPATH."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, version in plugins.items():
        module = name.replace("-", "_")
        (folder / f"{module}.py").write_text("")
        info = folder / f"{module}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text(f"[datasette]\n{module} = {module}\n")
    return str(folder)


PLUGINS_PAGE = "/plugin_directory/plugins?_sort_desc=stargazers_count&_facet=installed&_facet=upgrade"


@pytest.fixture
def directory(tmp_path, lists):
    """A real datasette with two plugins installed, its lists from a ListServer, and a browser window on it."""
    lists.lists["plugins"] = LISTED + generated_plugins()
    app_server = AppServer(
        tmp_path / "app", settings=lists.settings(),
        environment={"PYTHONPATH": install_plugins(tmp_path / "site"), "DATASETTE_DEFAULT_PLUGINS": DEFAULT_PLUGINS},
    )
    app_server.start()
    browser = Browser(tmp_path / "profile")
    yield app_server, browser, lists
    browser.close()
    app_server.stop()


def loads(browser):
    return sum(1 for e in list(browser.events) if e["method"] == "Page.loadEventFired")


def open_directory(browser, base, path=PLUGINS_PAGE):
    """Open the plugin page; with no copy of the list yet, wait for the page script to fetch one and reload."""
    before = loads(browser)
    browser.navigate(base + path)
    if browser.evaluate("!document.querySelector('.app-support-plugin')"):
        deadline = time.monotonic() + 20
        while loads(browser) < before + 2:
            assert time.monotonic() < deadline, "the page did not reload with the list"
            time.sleep(0.05)


def in_the_app(directory):
    """The desktop user in the app's window, with the preload stand-in, on the plugin page: (server, browser, lists, base URL)."""
    app_server, browser, lists = directory
    base = app_server.url()
    browser.command("Page.addScriptToEvaluateOnNewDocument", source=DATASETTE_APP)
    browser.sign_in(base, "/")
    open_directory(browser, base)
    return app_server, browser, lists, base


def cells(browser, column):
    return browser.evaluate(f"[...document.querySelectorAll('table.rows-and-columns td.col-{column}')].map(td => td.textContent.trim())")


def facet(browser, column):
    return browser.evaluate(
        f"[...document.querySelectorAll('#facet-{column} li')].map(li => li.textContent.trim().replace(/\\s+/g, ' '))"
    )


def status_line(browser):
    return browser.evaluate("document.querySelector('.app-support-directory-status p').textContent")


@needs_chromium
def test_browser_plugin_directory_facets_sort_and_search(directory):
    app_server, browser, lists, base = in_the_app(directory)
    plugins = lists.lists["plugins"]
    assert status_line(browser) == f"{len(plugins)} plugins, listed by 127.0.0.1 just now. Refresh"
    assert cells(browser, "name")[:3] == [p["name"] for p in LISTED]  # the most stars
    assert facet(browser, "installed") == [f"not installed {len(plugins) - 2}", "installed 2"]
    assert facet(browser, "upgrade") == ["upgrade available 1"]
    # The README's picture: the status line, the facets and the first rows, in a wide window.
    browser.command("Emulation.setDeviceMetricsOverride", width=1280, height=1000, deviceScaleFactor=1, mobile=False)
    browser.evaluate("window.scrollTo(0, document.querySelector('.app-support-directory-status').getBoundingClientRect().top + window.scrollY - 16)")
    browser.screenshot(os.environ.get("APP_SUPPORT_SCREENSHOT_DIRECTORY") or app_server.folder / "directory.png")
    browser.command("Emulation.clearDeviceMetricsOverride")
    for column in ("stargazers_count", "downloads_this_week", "latest_release_at"):
        browser.navigate(base + f"/plugin_directory/plugins?_sort_desc={column}&_size=max")
        values = [p[column] for p in plugins if column in p]
        expected = [str(v) for v in sorted(values, reverse=True)] + [""] * (len(plugins) - len(values))
        assert [v.replace("\xa0", "") for v in cells(browser, column)] == expected, column
    browser.navigate(base + PLUGINS_PAGE)
    after = len(browser.events)
    browser.click("#facet-installed li:last-child a")  # "installed"
    browser.event("Page.loadEventFired", after)
    assert browser.evaluate("location.search").endswith("&installed=installed")
    assert sorted(cells(browser, "name")) == ["datasette-fake-default", "datasette-fake-old"]
    browser.navigate(base + "/plugin_directory/plugins?_search=geojson&_size=max")
    words = lambda p: set(re.findall(r"[a-z0-9]+", (p["name"] + " " + p["description"]).lower()))
    assert sorted(cells(browser, "name")) == sorted(p["name"] for p in plugins if "geojson" in words(p))
    assert browser.errors() == []


@needs_chromium
def test_browser_plugin_buttons_call_the_preload_functions(directory):
    app_server, browser, lists, base = in_the_app(directory)
    buttons = browser.evaluate(
        "Object.fromEntries([...document.querySelectorAll('.app-support-plugin')].map(c =>"
        " [c.dataset.name, [c.firstChild.textContent, ...[...c.querySelectorAll('button')].map(b => b.textContent)]]))"
    )
    assert buttons["datasette-fake-old"] == ["installed 0.9", "Upgrade to 0.10", "Uninstall"]
    assert buttons["datasette-fake-default"] == ["installed 1.0"]  # a default plugin, and 1.0a2 is older
    assert buttons["datasette-cluster-map"] == ["not installed", "Install"]
    assert all(b == ["not installed", "Install"] for name, b in buttons.items() if name.startswith("datasette-") and "fake" not in name)
    row = "[data-name='{}'] button:nth-of-type({})"
    for selector, busy in [
        (row.format("datasette-cluster-map", 1), "Installing…"),
        (row.format("datasette-fake-old", 1), "Upgrading…"),
    ]:
        browser.click(selector)
        assert browser.evaluate(f"(b => [b.disabled, b.textContent])(document.querySelector(\"{selector}\"))") == [True, busy]
    assert browser.evaluate("appCalls") == [
        ["installPlugin", "datasette-cluster-map", "BUTTON"],
        ["installPlugin", "datasette-fake-old==0.10", "BUTTON"],
    ]
    open_directory(browser, base)  # the app reloads the page once pip is done
    browser.click(row.format("datasette-fake-old", 2))
    assert browser.evaluate("appCalls") == [["uninstallPlugin", "datasette-fake-old", "BUTTON"]]
    browser.navigate(base + PLUGINS_PAGE)
    assert browser.evaluate("appCalls") == []
    assert browser.errors() == []


@needs_chromium
def test_browser_plugin_directory_is_read_only_for_others(directory):
    app_server, browser, lists = directory
    base = app_server.url()
    assert app_server.call("/-/refresh-plugin-directory", {})[0] == 200
    browser.command("Page.addScriptToEvaluateOnNewDocument", source=DATASETTE_APP)
    someone = Datasette(secret=AppServer.ENVIRONMENT["DATASETTE_SECRET"]).sign({"a": {"id": "someone"}}, "actor")
    for cookie in (None, someone):
        if cookie:
            browser.command("Network.setCookie", name="ds_actor", value=cookie, url=base)
        browser.navigate(base + PLUGINS_PAGE)
        assert len(cells(browser, "name")) == len(lists.lists["plugins"])
        assert browser.evaluate("document.querySelectorAll('.app-support-plugin button, .app-support-directory-status').length") == 0
        assert browser.requests("/-/app-support") == []
    # The desktop user in a plain browser, without the app's preload functions: the status, no buttons.
    browser.command("Page.removeScriptToEvaluateOnNewDocument", identifier="1")
    browser.sign_in(base, PLUGINS_PAGE)
    browser.wait_for("!!document.querySelector('.app-support-directory-status')")
    assert browser.evaluate("typeof window.datasetteApp") == "undefined"
    assert browser.evaluate("document.querySelectorAll('.app-support-plugin button').length") == 0
    assert browser.errors() == []


@needs_chromium
def test_browser_plugin_directory_offline_keeps_its_copy_and_refresh_picks_up_a_changed_list(directory):
    app_server, browser, lists = directory
    base = app_server.url()
    browser.sign_in(base, "/")
    open_directory(browser, base)
    count = len(lists.lists["plugins"])
    lists.stop()
    browser.click(".app-support-directory-status button")
    error = browser.wait_for("(e => !e.hidden && e.textContent)(document.querySelector('.app-support-error'))")
    assert error == refused_download(lists.url('plugins'))
    assert browser.evaluate("document.querySelector('.app-support-directory-status button').textContent") == "Refresh"
    browser.navigate(base + PLUGINS_PAGE)
    assert len(cells(browser, "name")) == count
    assert browser.evaluate("document.querySelector('.app-support-error').textContent") == (
        "The last attempt to fetch it failed. " + error
    )
    lists.lists["plugins"] = lists.lists["plugins"] + [{"name": "datasette-brand-new", "tag_name": "0.1", "stargazers_count": 9999}]
    lists.start()
    after = loads(browser)
    browser.click(".app-support-directory-status button")
    browser.wait_for("document.readyState === 'complete' && !!document.querySelector('[data-name=datasette-brand-new]')")
    assert loads(browser) > after
    assert cells(browser, "name")[0] == "datasette-brand-new"
    assert browser.evaluate("document.querySelector('.app-support-error').hidden") is True
    assert status_line(browser) == f"{count + 1} plugins, listed by 127.0.0.1 just now. Refresh"


@needs_chromium
def test_browser_plugin_directory_offline_with_no_copy_offers_retry(directory):
    app_server, browser, lists = directory
    base = app_server.url()
    lists.stop()
    browser.sign_in(base, PLUGINS_PAGE)
    error = browser.wait_for("(e => !e.hidden && e.textContent)(document.querySelector('.app-support-error'))")
    assert error == refused_download(lists.url('plugins'))
    assert status_line(browser).startswith("Fetching the plugin list from 127.0.0.1…")
    browser.navigate(base + PLUGINS_PAGE)
    assert status_line(browser) == "There is no copy of the plugin list yet: it comes from 127.0.0.1. Retry"
    assert cells(browser, "name") == []
    lists.start()
    browser.click(".app-support-directory-status button")
    browser.wait_for("document.readyState === 'complete' && document.querySelectorAll('.app-support-plugin').length > 0")
    assert len(cells(browser, "name")) == len(lists.lists["plugins"])
    assert browser.errors() == [] or all("502" in str(e) for e in browser.errors())


@needs_chromium
def test_browser_plugin_directory_survives_the_restart_cycle(directory, tmp_path):
    app_server, browser, lists = directory
    base = app_server.url()
    assert app_server.call("/-/refresh-plugin-directory", {})[0] == 200
    backup = tmp_path / "backup.db"
    assert app_server.call("/-/dump-temporary-to-file", {"path": str(backup)})[0] == 200
    app_server.stop()
    lists.stop()  # offline from now on
    app_server.start()
    assert app_server.call("/-/restore-temporary-from-file", {"path": str(backup)})[0] == 200
    browser.command("Page.addScriptToEvaluateOnNewDocument", source=DATASETTE_APP)
    browser.sign_in(base, PLUGINS_PAGE)
    assert len(cells(browser, "name")) == len(lists.lists["plugins"])
    assert status_line(browser) == f"{len(lists.lists['plugins'])} plugins, listed by 127.0.0.1 just now. Refresh"
    assert browser.evaluate("document.querySelector('.app-support-error').hidden") is True
    assert facet(browser, "installed") == [f"not installed {len(lists.lists['plugins']) - 2}", "installed 2"]
    assert lists.requests == [lists.prefix + "/plugins.json"]
    assert browser.errors() == []


@needs_chromium
def test_browser_welcome_page_imports_examples_and_links_imported_ones(directory, server):
    app_server, browser, lists = directory
    base = app_server.url()
    url, routes = server
    routes["/dogs.csv"] = (200, {}, CSV_BODY)
    lists.lists["examples"] = [
        {"name": "Dogs", "table_name": "good_dogs", "url": url + "/dogs.csv", "description": "Some good dogs",
         "source": "The kennel", "source_url": "https://example.com/kennel"},
        {"name": "Cats", "table_name": "cats", "url": url + "/cats.csv", "description": "Cats", "source": "x", "source_url": "https://example.com/"},
    ]
    browser.command("Page.addScriptToEvaluateOnNewDocument", source=DATASETTE_APP)
    browser.sign_in(base, "/")
    assert browser.evaluate("!!document.querySelector('.app-support-run-sql a[href=\"/temporary\"]')")
    # The examples were fetched in the background; the next visit shows them.
    deadline = time.monotonic() + 20
    while not browser.evaluate("!!document.querySelector('.app-support-examples')"):
        assert time.monotonic() < deadline, "no examples"
        time.sleep(0.2)
        browser.navigate(base + "/")
    shown = browser.evaluate(
        "[...document.querySelectorAll('.app-support-examples li')].map(li => [li.querySelector('h3').textContent,"
        " li.querySelector('p').textContent, li.querySelector('a').href, li.querySelector('button').textContent])"
    )
    assert shown == [["Dogs", "Some good dogs", "https://example.com/kennel", "Import"],
                     ["Cats", "Cats", "https://example.com/", "Import"]]
    browser.click(".app-support-examples li:first-child button")
    assert browser.evaluate("appCalls") == [
        ["importCsvFromUrl", url + "/dogs.csv", "BUTTON", {"csvurl": url + "/dogs.csv", "name": "Dogs", "tablename": "good_dogs"}]
    ]
    assert browser.evaluate("document.querySelector('.app-support-examples li:first-child button').disabled") is True
    # What the app does next: it imports the URL under that table name.
    status, _, body = app_server.call("/-/open-csv-from-url", {"url": url + "/dogs.csv", "table_name": "good_dogs"})
    assert status == 200, body
    browser.navigate(base + "/")
    imported = "document.querySelector('.app-support-examples li:first-child p:last-of-type')"
    assert browser.evaluate(f"{imported}.textContent") == "Already imported: good_dogs"
    assert browser.evaluate(f"{imported}.querySelector('a').getAttribute('href')") == "/temporary/good_dogs"
    assert browser.evaluate("document.querySelectorAll('.app-support-examples li:first-child button').length") == 0
    assert browser.evaluate("!document.querySelector('.app-support-run-sql')")
    assert browser.errors() == []


# ===== The browser: keeping temporary =====


KEEP_LINE = "document.querySelector('.app-support-keep p').textContent"
KEEP_ERROR = "(e => e.hidden ? null : e.textContent)(document.querySelector('.app-support-keep .app-support-error'))"


def click_and_wait_for_reload(browser, selector):
    after = loads(browser)
    browser.click(selector)
    deadline = time.monotonic() + 30
    while loads(browser) <= after:
        assert time.monotonic() < deadline, "the page did not reload"
        time.sleep(0.05)
    browser.wait_for("document.readyState === 'complete'")


@needs_chromium
def test_browser_keep_temporary_switch_on_the_home_page_and_the_temporary_page(desktop, tmp_path):
    """The desktop user turns keeping on from the home page and off from temporary's page, on a server with no HOME."""
    app_server, browser = desktop
    base = app_server.url()
    kept = app_server.app_folder / "temporary.db"
    dogs = write(tmp_path / "dogs.csv", "name,zip\nCleo,02134\n")
    assert app_server.call("/-/open-csv-file", {"path": str(dogs)})[0] == 200
    browser.command("Page.addScriptToEvaluateOnNewDocument", source=DATASETTE_APP)
    browser.sign_in(base, "/")
    browser.wait_for("!!document.querySelector('.app-support-keep')")
    assert browser.evaluate(KEEP_LINE) == "Keep these tables after Datasette Desktop quits: Turn on"
    assert browser.evaluate("document.querySelectorAll('.app-support-keep').length") == 1
    click_and_wait_for_reload(browser, ".app-support-keep button")
    # The server has no HOME, and the app folder here is not in the user's home: the whole path.
    assert browser.evaluate(KEEP_LINE) == f"These tables are kept in {kept}: Turn off"
    assert json.loads(app_server.call("/-/keep-temporary")[2]) == {"ok": True, "keep": True, "file": str(kept)}
    browser.navigate(base + "/temporary/dogs")
    assert browser.evaluate("[...document.querySelectorAll('td.col-zip')].map(td => td.textContent.trim())") == ["02134"]
    browser.navigate(base + "/temporary")
    assert browser.evaluate(KEEP_LINE) == f"These tables are kept in {kept}: Turn off"
    # Below the header and the Import CSV button.
    assert browser.evaluate(
        "document.querySelector('.app-support-import-csv-row').nextElementSibling.className"
    ) == "app-support-keep"
    click_and_wait_for_reload(browser, ".app-support-keep button")
    assert browser.evaluate(KEEP_LINE) == "Keep these tables after Datasette Desktop quits: Turn on"
    assert not kept.exists()
    # A refusal shows as its sentence in the line, and the button can be pressed again.
    kept.write_bytes(b"someone else's file")
    browser.click(".app-support-keep button")
    error = browser.wait_for(KEEP_ERROR)
    assert error == (
        f"There is already a file at {kept}, so nothing was changed: move it away or delete it, "
        "then turn keeping on again."
    )
    assert browser.evaluate("(b => [b.disabled, b.textContent])(document.querySelector('.app-support-keep button'))") == [False, "Turn on"]
    assert kept.read_bytes() == b"someone else's file"
    kept.unlink()
    # Others see no switch.
    browser.command("Network.clearBrowserCookies")
    for path in ("/", "/temporary"):
        browser.navigate(base + path)
        assert browser.evaluate("document.querySelectorAll('.app-support-keep').length") == 0
    # The one error: the browser's own note of the refused request's 400.
    assert [(e["entry"]["url"], e["entry"]["text"]) for e in browser.errors()] == [
        (base + "/-/keep-temporary", "Failed to load resource: the server responded with a status of 400 (Bad Request)")
    ]


@needs_chromium
def test_browser_keep_temporary_says_why_a_kept_file_was_not_used(tmp_path):
    server = AppServer(tmp_path / "app")
    kept = server.app_folder / "temporary.db"
    write(kept, "name,age\nCleo,5\n")
    server.start()
    browser = Browser(tmp_path / "profile")
    try:
        browser.sign_in(server.url(), "/")
        browser.wait_for("!!document.querySelector('.app-support-keep')")
        assert browser.evaluate(KEEP_ERROR) == (
            f"Temporary is in memory this time, because the kept file {kept} could not be used. "
            f"Not a SQLite database: {kept}. The file was left as it is: move it away or delete it, "
            "then turn keeping on again."
        )
        browser.navigate(server.url("/temporary"))
        assert browser.evaluate(KEEP_ERROR).startswith("Temporary is in memory this time")
        assert browser.errors() == []
    finally:
        browser.close()
        server.stop()
    assert kept.read_text() == "name,age\nCleo,5\n"


# ===== The browser: the dialog that changes how an import read its file =====
#
# The desktop user imports a file, sees it read wrong, and fixes it from the
# import panel's line: "Change how it was read…" opens a dialog that previews
# the file as each choice reads it, and "Import again" replaces the table.


DIALOG = ".app-support-dialog"
# The text a control's label gives it, without the text of the control itself
# (a select's options, inside the label with it).
LABEL_TEXT = "(l => [...l.childNodes].filter(n => n.nodeType === 3).map(n => n.textContent).join('').trim())"
DIALOG_COLUMNS = (
    f"[...document.querySelectorAll('{DIALOG} table.app-support-preview thead label.app-support-column')]"
    f".map(l => [{LABEL_TEXT}(l), l.querySelector('select').value])"
)
DIALOG_ROWS = (
    f"[...document.querySelectorAll('{DIALOG} table.app-support-preview tbody tr')]"
    ".map(tr => [...tr.children].map(td => td.textContent))"
)
DIALOG_ERROR = f"(e => e.hidden ? null : e.textContent)(document.querySelector('{DIALOG} .app-support-error'))"
SUMMARY = f"document.querySelector('{DIALOG} .app-support-summary').textContent"
# The import panel's lines, [import id, status] each, once the panel shows any.
PANEL_LINES = (
    f"(lines => lines.length ? lines : null)([...document.querySelectorAll('{PANEL} .app-support-import')]"
    ".map(b => [b.dataset.id, b.querySelector('.app-support-status').textContent]))"
)


def dialog_control(label):
    """An expression for the dialog's control whose label reads label: a field, or a column's type."""
    return (
        f"[...document.querySelectorAll('{DIALOG} select, {DIALOG} input')]"
        f".find(c => [...c.labels].some(l => {LABEL_TEXT}(l) === {json.dumps(label)}))"
    )


def wait_for_preview(browser):
    """Wait until the dialog has read the file again: its preview drawn, or its error shown."""
    browser.wait_for(f"{SUMMARY} !== 'Reading…' && ({SUMMARY} !== '' || {DIALOG_ERROR} !== null)")


def choose(browser, label, value, wait=True):
    """Set the labelled control to value as the user would (a checkbox takes true or false), and wait for the preview."""
    prop = "checked" if isinstance(value, bool) else "value"
    browser.evaluate(
        f"(c => {{ c.focus(); c.{prop} = {json.dumps(value)}; c.dispatchEvent(new Event('change', {{bubbles: true}})); }})"
        f"({dialog_control(label)})"
    )
    if wait:
        wait_for_preview(browser)


def open_dialog(browser, source):
    """On a page that shows the panel's line for the import of source, open its dialog and wait for the preview."""
    line = (
        f"[...document.querySelectorAll('{PANEL} .app-support-import')]"
        f".find(b => b.querySelector('.app-support-source').textContent === {json.dumps(source)})"
    )
    browser.wait_for(f"!!{line}?.querySelector('.app-support-change')")
    browser.evaluate(f"{line}.querySelector('.app-support-change').id = 'change-under-test'")
    browser.click("#change-under-test")
    browser.wait_for(f"!!document.querySelector('{DIALOG}')?.open")
    wait_for_preview(browser)


def import_again_and_land(browser):
    """Click Import again and wait for the page the import answers with; its path."""
    browser.evaluate("window.beforeImportAgain = true")  # gone once the page is replaced
    after = len(browser.events)
    browser.click(f"{DIALOG} .app-support-import-again")
    deadline = time.monotonic() + 30
    while not any(e["method"] == "Page.loadEventFired" for e in list(browser.events)[after:]):
        # A refusal leaves the page where it is: fail at once, with what the dialog shows.
        refusal = browser.evaluate(
            f"window.beforeImportAgain ? (document.querySelector('{DIALOG}') ? {DIALOG_ERROR} : 'the dialog is gone') : null"
        )
        assert refusal is None and time.monotonic() < deadline, f"Import again did not open the table: {refusal}"
        time.sleep(0.05)
    browser.wait_for("document.readyState === 'complete'")
    return browser.evaluate("location.pathname")


def press(browser, key, code, modifiers=0):
    """A real key press: key down, then up."""
    for kind in ("keyDown", "keyUp"):
        browser.command(
            "Input.dispatchKeyEvent", type=kind, key=key, code=key, windowsVirtualKeyCode=code, modifiers=modifiers
        )


def accessible_names(browser, selector):
    """(role, name) of each element the selector finds, from Chromium's accessibility tree."""
    found = browser.command(
        "Runtime.evaluate", expression=f"[...document.querySelectorAll({json.dumps(selector)})]"
    )["result"]["objectId"]
    names = []
    for item in browser.command("Runtime.getProperties", objectId=found, ownProperties=True)["result"]:
        if item["name"].isdigit():
            node = browser.command("Accessibility.getPartialAXTree", objectId=item["value"]["objectId"], fetchRelatives=False)["nodes"][0]
            names.append((node["role"]["value"], node.get("name", {}).get("value", "")))
    return names


def query(app_server, sql):
    """The rows of a read-only query of temporary, as the app's token sees them."""
    status, headers, body = app_server.call(
        "/temporary.json?" + urllib.parse.urlencode({"sql": sql, "_shape": "array"})
    )
    if status == 302:  # Datasette 1.0 answers queries at /temporary/-/query.json
        status, _, body = app_server.call(headers["Location"])
    assert status == 200, body
    return json.loads(body)


def table_columns(app_server, table):
    return [(r["name"], r["type"]) for r in query(app_server, f"select name, type from pragma_table_info('{table}')")]


def temporary_tables(app_server):
    return [r["name"] for r in query(app_server, "select name from sqlite_master where type = 'table' order by name")]


def bad_requests(base, *paths):
    """What browser.errors() holds when the page's only errors are the browser's own notes of these 400s."""
    return [(base + path, "Failed to load resource: the server responded with a status of 400 (Bad Request)") for path in paths]


def error_entries(browser):
    return [(e["entry"]["url"], e["entry"]["text"]) if "entry" in e else e for e in browser.errors()]


# A European CSV: semicolons between values, commas in the numbers. Every
# line has as many commas as semicolons, and the engine prefers the comma.
EUROPEAN = "Name;Weight, kg;Height, m\nCleo;4,2;0,35\nPancakes;12,5;0,6\n"


@needs_chromium
def test_browser_dialog_reads_a_semicolon_file_again_into_the_same_table(desktop, tmp_path):
    app_server, browser = desktop
    base = app_server.url()
    path = write(tmp_path / "dogs.csv", EUROPEAN)
    status, _, body = app_server.call("/-/open-csv-file", {"path": str(path)})
    assert status == 200 and json.loads(body)["path"] == "/temporary/dogs", body
    assert table_columns(app_server, "dogs") == [("Name;Weight", "TEXT"), ("kg;Height", "TEXT"), ("m", "INTEGER")]
    # The app opens the table at once; the page shows the import's line.
    browser.sign_in(base, "/temporary/dogs")
    open_dialog(browser, "dogs.csv")
    assert browser.evaluate(f"document.querySelector('{DIALOG} h2').textContent") == "Change how dogs.csv is read"
    assert browser.evaluate(f"{dialog_control('Delimiter')}.value") == ","
    assert browser.evaluate(DIALOG_COLUMNS) == [["Name;Weight", "TEXT"], ["kg;Height", "TEXT"], ["m", "INTEGER"]]
    choose(browser, "Delimiter", ";")
    assert browser.evaluate(DIALOG_ERROR) is None
    assert browser.evaluate(DIALOG_COLUMNS) == [["Name", "TEXT"], ["Weight, kg", "TEXT"], ["Height, m", "TEXT"]]
    assert browser.evaluate(DIALOG_ROWS) == [["Cleo", "4,2", "0,35"], ["Pancakes", "12,5", "0,6"]]
    assert browser.evaluate(SUMMARY) == "The first 2 of 2 rows, as CSV in utf-8."
    # The redrawn select keeps the keyboard, and says what was chosen.
    assert browser.evaluate(f"document.activeElement === {dialog_control('Delimiter')}") is True
    assert browser.evaluate(f"{dialog_control('Delimiter')}.selectedOptions[0].textContent") == "Semicolon (;)"
    browser.screenshot(os.environ.get("APP_SUPPORT_SCREENSHOT_DIALOG") or tmp_path / "dialog.png")
    assert import_again_and_land(browser) == "/temporary/dogs"
    assert temporary_tables(app_server) == ["dogs"]  # replaced, not dogs_2
    assert table_columns(app_server, "dogs") == [("Name", "TEXT"), ("Weight, kg", "TEXT"), ("Height, m", "TEXT")]
    assert query(app_server, "select * from dogs") == [
        {"Name": "Cleo", "Weight, kg": "4,2", "Height, m": "0,35"},
        {"Name": "Pancakes", "Weight, kg": "12,5", "Height, m": "0,6"},
    ]
    assert browser.evaluate("document.querySelectorAll('table.rows-and-columns th.col-Name').length") == 1
    assert browser.evaluate(f"document.querySelectorAll('{DIALOG}').length") == 0
    # The page it lands on shows one line for the table: the import that made it as it is now.
    assert browser.wait_for(PANEL_LINES) == [[str(imports(app_server)[0]["id"]), "Imported 2 rows into dogs."]]
    assert browser.errors() == []


@needs_chromium
def test_browser_dialog_forces_a_zip_code_column_to_text(desktop, tmp_path):
    app_server, browser = desktop
    base = app_server.url()
    path = write(tmp_path / "shelters.csv", "name,zip\nNorth,12345\nSouth,94110\n")
    assert app_server.call("/-/open-csv-file", {"path": str(path)})[0] == 200
    assert query(app_server, "select zip, typeof(zip) as kind from shelters") == [
        {"zip": 12345, "kind": "integer"}, {"zip": 94110, "kind": "integer"},
    ]
    browser.sign_in(base, "/temporary/shelters")
    open_dialog(browser, "shelters.csv")
    assert browser.evaluate(DIALOG_COLUMNS) == [["name", "TEXT"], ["zip", "INTEGER"]]
    assert browser.evaluate(f"[...{dialog_control('zip')}.options].map(o => o.value)") == ["TEXT", "INTEGER", "REAL"]
    choose(browser, "zip", "TEXT")
    assert browser.evaluate(DIALOG_ERROR) is None
    assert browser.evaluate(DIALOG_COLUMNS) == [["name", "TEXT"], ["zip", "TEXT"]]
    assert browser.evaluate(DIALOG_ROWS) == [["North", "12345"], ["South", "94110"]]
    assert browser.evaluate(f"document.activeElement === {dialog_control('zip')}") is True
    assert import_again_and_land(browser) == "/temporary/shelters"
    assert temporary_tables(app_server) == ["shelters"]
    assert table_columns(app_server, "shelters") == [("name", "TEXT"), ("zip", "TEXT")]
    assert query(app_server, "select zip, typeof(zip) as kind from shelters") == [
        {"zip": "12345", "kind": "text"}, {"zip": "94110", "kind": "text"},
    ]
    assert browser.errors() == []


@needs_chromium
def test_browser_dialog_turns_the_header_off(desktop, tmp_path):
    app_server, browser = desktop
    base = app_server.url()
    path = write(tmp_path / "ages.csv", "Cleo,5\nPancakes,4\nBuster,7\n")
    assert app_server.call("/-/open-csv-file", {"path": str(path)})[0] == 200
    assert table_columns(app_server, "ages") == [("Cleo", "TEXT"), ("5", "INTEGER")]
    browser.sign_in(base, "/temporary/ages")
    open_dialog(browser, "ages.csv")
    header = dialog_control("First row is a header")
    assert browser.evaluate(f"[{header}.type, {header}.checked]") == ["checkbox", True]
    assert browser.evaluate(DIALOG_ROWS) == [["Pancakes", "4"], ["Buster", "7"]]
    choose(browser, "First row is a header", False)
    assert browser.evaluate(DIALOG_ERROR) is None
    assert browser.evaluate(f"{dialog_control('First row is a header')}.checked") is False
    assert browser.evaluate(DIALOG_COLUMNS) == [["column_1", "TEXT"], ["column_2", "INTEGER"]]
    assert browser.evaluate(DIALOG_ROWS) == [["Cleo", "5"], ["Pancakes", "4"], ["Buster", "7"]]
    assert browser.evaluate(SUMMARY) == "The first 3 of 3 rows, as CSV in utf-8."
    assert import_again_and_land(browser) == "/temporary/ages"
    assert temporary_tables(app_server) == ["ages"]
    assert table_columns(app_server, "ages") == [("column_1", "TEXT"), ("column_2", "INTEGER")]
    assert query(app_server, "select * from ages") == [
        {"column_1": "Cleo", "column_2": 5}, {"column_1": "Pancakes", "column_2": 4}, {"column_1": "Buster", "column_2": 7},
    ]
    assert browser.errors() == []


@needs_chromium
def test_browser_dialog_refuses_a_bad_type_and_leaves_the_table_as_it_was(desktop, tmp_path):
    app_server, browser = desktop
    base = app_server.url()
    path = write(tmp_path / "dogs.csv", "id,name\n1,Cleo\n2,Pancakes\n")
    assert app_server.call("/-/open-csv-file", {"path": str(path)})[0] == 200
    before = (table_columns(app_server, "dogs"), query(app_server, "select * from dogs"))
    browser.sign_in(base, "/temporary/dogs")
    open_dialog(browser, "dogs.csv")
    choose(browser, "name", "INTEGER")
    refusal = (
        f"The column 'name' of {path} must be INTEGER (as types asks), but row 1 holds 'Cleo', "
        "which is not a whole number. Nothing was imported. Choose another type for the column, "
        "or correct the file, and try again."
    )
    assert browser.evaluate(DIALOG_ERROR) == refusal
    assert browser.evaluate(f"document.querySelector('{DIALOG} .app-support-error').getAttribute('role')") == "alert"
    # The refused choice stays on screen, to be changed back.
    assert browser.evaluate(f"{dialog_control('name')}.value") == "INTEGER"
    # Import again, if it can be pressed, is refused with the same sentence, and the dialog stays open.
    if not browser.evaluate(f"document.querySelector('{DIALOG} .app-support-import-again').disabled"):
        loads_before = sum(1 for e in list(browser.events) if e["method"] == "Page.loadEventFired")
        browser.click(f"{DIALOG} .app-support-import-again")
        browser.wait_for(
            f"(b => !b || (!b.disabled && b.textContent === 'Import again'))(document.querySelector('{DIALOG} .app-support-import-again'))"
        )
        browser.evaluate("new Promise((resolve) => setTimeout(resolve, 200))")  # a close event on its way, if any
        assert browser.evaluate(f"(d => d ? [d.open, d.matches(':modal')] : 'gone')(document.querySelector('{DIALOG}'))") == [True, True]
        assert browser.evaluate(DIALOG_ERROR) == refusal
        assert sum(1 for e in list(browser.events) if e["method"] == "Page.loadEventFired") == loads_before
        refused = ["/-/preview-import", "/-/import-again"]
    else:
        refused = ["/-/preview-import"]
    assert browser.evaluate("location.pathname") == "/temporary/dogs"
    assert (table_columns(app_server, "dogs"), query(app_server, "select * from dogs")) == before
    assert temporary_tables(app_server) == ["dogs"]
    # A type that fits clears the sentence.
    choose(browser, "name", "TEXT")
    assert browser.evaluate(DIALOG_ERROR) is None
    assert browser.evaluate(DIALOG_COLUMNS) == [["id", "INTEGER"], ["name", "TEXT"]]
    assert error_entries(browser) == bad_requests(base, *refused)


@needs_chromium
def test_browser_dialog_imports_a_failed_import_again_into_a_new_table(desktop, tmp_path):
    app_server, browser = desktop
    base = app_server.url()
    path = write(tmp_path / "dogs.csv", "id,name\n1,Cleo\n2,Pancakes\n")
    status, _, body = app_server.call("/-/open-csv-file", {"path": str(path), "types": {"name": "INTEGER"}})
    assert status == 400, body
    assert temporary_tables(app_server) == []
    browser.sign_in(base, "/temporary")
    line = f"{PANEL} .app-support-failed .app-support-status"
    assert browser.wait_for(f"document.querySelector('{line}')?.textContent") == json.loads(body)["error"]
    open_dialog(browser, "dogs.csv")
    # The dialog starts from the file as the engine reads it, not from the failed choice.
    assert browser.evaluate(DIALOG_COLUMNS) == [["id", "INTEGER"], ["name", "TEXT"]]
    assert import_again_and_land(browser) == "/temporary/dogs"
    assert temporary_tables(app_server) == ["dogs"]
    assert query(app_server, "select * from dogs") == [{"id": 1, "name": "Cleo"}, {"id": 2, "name": "Pancakes"}]
    assert browser.errors() == []


def kennel_workbook(path):
    """A workbook of two sheets: Dogs (id, name) and Cats (name)."""
    dogs = (
        '<row r="1"><c r="A1" t="s"><v>0</v></c><c r="B1" t="s"><v>1</v></c></row>'
        '<row r="2"><c r="A2"><v>1</v></c><c r="B2" t="s"><v>2</v></c></row>'
        '<row r="3"><c r="A3"><v>2</v></c><c r="B3" t="s"><v>3</v></c></row>'
    )
    cats = '<row r="1"><c r="A1" t="s"><v>1</v></c></row><row r="2"><c r="A2" t="s"><v>4</v></c></row>'
    return make_xlsx(path, [("Dogs", dogs), ("Cats", cats)], ["id", "name", "Cleo", "Pancakes", "Milo"])


@needs_chromium
def test_browser_dialog_reads_a_workbook_sheet_again_into_its_own_table(desktop, tmp_path):
    app_server, browser = desktop
    base = app_server.url()
    path = kennel_workbook(tmp_path / "kennel.xlsx")
    status, _, body = app_server.call("/-/open-csv-file", {"path": str(path)})
    assert status == 200 and json.loads(body)["path"] == "/temporary/kennel_Dogs", body
    cats = query(app_server, "select * from kennel_Cats")
    browser.sign_in(base, "/temporary/kennel_Dogs")
    open_dialog(browser, "kennel.xlsx")
    fields = f"[...document.querySelectorAll('{DIALOG} .app-support-fields label')].map({LABEL_TEXT})"
    assert browser.evaluate(fields) == ["Sheet"]  # no encoding, delimiter or header for a workbook
    sheet = dialog_control("Sheet")
    assert browser.evaluate(f"[[...{sheet}.options].map(o => o.value), {sheet}.value]") == [["Dogs", "Cats"], "Dogs"]
    assert browser.evaluate(DIALOG_COLUMNS) == [["id", "INTEGER"], ["name", "TEXT"]]
    # The sheet the table came from, read with another type: that table is replaced.
    choose(browser, "id", "TEXT")
    assert browser.evaluate(DIALOG_ERROR) is None
    assert import_again_and_land(browser) == "/temporary/kennel_Dogs"
    assert temporary_tables(app_server) == ["kennel_Cats", "kennel_Dogs"]
    assert query(app_server, "select id, typeof(id) as kind, name from kennel_Dogs") == [
        {"id": "1", "kind": "text", "name": "Cleo"}, {"id": "2", "kind": "text", "name": "Pancakes"},
    ]
    assert query(app_server, "select * from kennel_Cats") == cats
    # Another sheet previews as itself, and lands in its own table, never in the first sheet's.
    open_dialog(browser, "kennel.xlsx")
    choose(browser, "Sheet", "Cats")
    assert browser.evaluate(DIALOG_COLUMNS) == [["name", "TEXT"]]
    assert browser.evaluate(DIALOG_ROWS) == [["Milo"]]
    assert import_again_and_land(browser) == "/temporary/kennel_Cats"
    assert query(app_server, "select name from kennel_Dogs") == [{"name": "Cleo"}, {"name": "Pancakes"}]
    assert query(app_server, "select * from kennel_Cats") == [{"name": "Milo"}]
    assert temporary_tables(app_server) == ["kennel_Cats", "kennel_Dogs"]
    assert browser.errors() == []


@needs_chromium
def test_browser_dialog_shows_the_last_choice_when_previews_answer_out_of_order(desktop, tmp_path):
    """A keyboard user arrowing through a select asks for a preview at each step; the slowest may answer last."""
    app_server, browser = desktop
    base = app_server.url()
    path = write(tmp_path / "dogs.csv", EUROPEAN)
    assert app_server.call("/-/open-csv-file", {"path": str(path)})[0] == 200
    browser.sign_in(base, "/temporary/dogs")
    open_dialog(browser, "dogs.csv")
    browser.command("Fetch.enable", patterns=[{"urlPattern": "*/-/preview-import", "requestStage": "Response"}])
    after = len(browser.events)
    choose(browser, "Delimiter", ";", wait=False)
    first = browser.event("Fetch.requestPaused", after)
    after = len(browser.events)
    choose(browser, "First row is a header", False, wait=False)
    second = browser.event("Fetch.requestPaused", after)
    assert json.loads(second["request"]["postData"]) == {"path": str(path), "delimiter": ";", "header": False}
    browser.command("Fetch.continueRequest", requestId=second["requestId"])
    browser.wait_for(f"JSON.stringify({DIALOG_COLUMNS}) === JSON.stringify([['column_1', 'TEXT'], ['column_2', 'TEXT'], ['column_3', 'TEXT']])")
    after = len(browser.events)
    browser.command("Fetch.continueRequest", requestId=first["requestId"])
    deadline = time.monotonic() + 15
    while not any(
        e["method"] == "Network.loadingFinished" and e["params"]["requestId"] == first["networkId"]
        for e in list(browser.events)[after:]
    ):
        assert time.monotonic() < deadline, "the held preview never finished"
        time.sleep(0.05)
    browser.evaluate("new Promise((resolve) => setTimeout(resolve, 200))")  # the page reads the answer
    browser.command("Fetch.disable")
    assert browser.evaluate(f"{dialog_control('First row is a header')}.checked") is False
    assert browser.evaluate(DIALOG_COLUMNS) == [["column_1", "TEXT"], ["column_2", "TEXT"], ["column_3", "TEXT"]]
    assert browser.evaluate(DIALOG_ROWS)[0] == ["Name", "Weight, kg", "Height, m"]
    assert browser.errors() == []


@needs_chromium
def test_browser_dialog_keyboard_focus_labels_and_escape(desktop, tmp_path):
    app_server, browser = desktop
    base = app_server.url()
    path = write(tmp_path / "dogs.csv", "id,name\n1,Cleo\n2,Pancakes\n")
    assert app_server.call("/-/open-csv-file", {"path": str(path)})[0] == 200
    browser.sign_in(base, "/temporary/dogs")
    open_dialog(browser, "dogs.csv")
    dialog = f"document.querySelector('{DIALOG}')"
    assert browser.evaluate(f"{dialog}.contains(document.activeElement)") is True
    assert browser.evaluate(f"document.getElementById({dialog}.getAttribute('aria-labelledby')).textContent") == (
        "Change how dogs.csv is read"
    )
    # Every control is named by a label: the fields, then each column's type.
    names = browser.evaluate(
        f"[...{dialog}.querySelectorAll('select, input, textarea')].map(c =>"
        f" c.labels.length ? {LABEL_TEXT}(c.labels[0]) : c.getAttribute('aria-label'))"
    )
    assert names == ["Encoding", "Delimiter", "First row is a header", "Lines to skip", "id", "name"]
    # And so a screen reader names each one, as Chromium's accessibility tree says.
    assert accessible_names(browser, f"{DIALOG} select, {DIALOG} input, {DIALOG} button") == [
        ("combobox", "Encoding"), ("combobox", "Delimiter"), ("checkbox", "First row is a header"),
        ("spinbutton", "Lines to skip"), ("combobox", "id"), ("combobox", "name"),
        ("button", "Import again"), ("button", "Close"),
    ]
    assert accessible_names(browser, DIALOG) == [("dialog", "Change how dogs.csv is read")]
    # Focus starts on Close; Shift+Tab walks back through every control, in the order they read.
    assert browser.evaluate("document.activeElement.textContent") == "Close"
    reached = []
    for _ in range(7):
        press(browser, "Tab", 9, modifiers=8)  # Shift
        reached.append(browser.evaluate(
            f"(c => {dialog}.contains(c) ? (c.labels && c.labels.length ? {LABEL_TEXT}(c.labels[0]) : c.textContent) : null)"
            "(document.activeElement)"
        ))
    assert reached == ["Import again", "name", "id", "Lines to skip", "First row is a header", "Delimiter", "Encoding"]
    press(browser, "Escape", 27)
    browser.wait_for(f"document.querySelectorAll('{DIALOG}').length === 0")
    # Close does as Escape does, and the panel's button opens the dialog again.
    open_dialog(browser, "dogs.csv")
    browser.click(f"{DIALOG} .app-support-dialog-buttons button:last-child")
    browser.wait_for(f"document.querySelectorAll('{DIALOG}').length === 0")
    assert browser.requests("/-/import-again") == []
    assert query(app_server, "select * from dogs") == [{"id": 1, "name": "Cleo"}, {"id": 2, "name": "Pancakes"}]
    assert browser.errors() == []
