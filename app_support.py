"""app_support: the Datasette plugin behind Datasette Desktop.

The Electron app starts `datasette` with DATASETTE_API_TOKEN and
DATASETTE_SECRET set, then drives it through the JSON endpoints of ROUTES:
it attaches SQLite files, imports CSV, JSON and Excel files from disk or
URLs, signs the desktop user in as root, and carries the in-memory
`temporary` database across restarts, or keeps it in a file when the user
asks. On the desktop user's pages it adds the import panel, an Import CSV
button, the switch that keeps temporary, the plugin directory's status and
buttons, and a welcome section on the home page.

Every endpoint but GET /-/import-progress and GET /-/keep-temporary is a
POST that reads a JSON object from the raw body. The app's calls carry
`Authorization: Bearer <token>`; the few routes the pages call also take
the desktop user's cookie. Each answers `{"ok": true, ...}` or
`{"ok": false, "error": "<a sentence for a dialog>"}`.

This file imports only the standard library and datasette, so it works when
copied alone into a --plugins-dir, vendored, or installed with pip.

Contents. Each section opens with a banner, `# ===== Name =====`, so that
`grep -n "^# =====" app_support.py` lists them:

    Constants                     plugin-wide names, the settings' defaults
    Errors                        APIError and its kinds, _error_response
    Requests and their guards     token, cookie, body, CSRF refusals
    Datasette 0.65 and 1.0        adapters, and Datasette's private parts
    Files and databases           paths, SQLite files, table names
    Work folders                  folders for staging and downloads
    Memory for temporary          refusing what temporary cannot hold
    Keeping temporary             in a file the user can switch on
    The import engine             the path every import takes:
    Reading options                 what the user says of how to read a file
    Readers                         plan_file, the seam of the formats
    Readers: text encodings
    Readers: CSV
    Readers: JSON
    Readers: Excel workbooks
    Column names and types
    Staging
    Copying into the target
    Reading large files in parts    the only one that cuts files, starts processes
    Running an import             the engine for the handlers
    Downloads
    Previews                      what an import would do, from the file's start
    Import progress
    Pages for the desktop user
    The plugin directory and the welcome section
    Endpoints                     one handler per route, in ROUTES order
    Routes                        ROUTES, the route table, and _view
    Hooks
    Page assets                   the page scripts and style, as strings

Where is
    the CSV dialect (delimiter, quotes, lines above the header): plan_csv
        and _messy_plan, in Readers: CSV;
    column types: column_type and typed_column_type, in Column names and
        types; number columns staged in their types: _StagedRows, in
        Staging; exact REALs: doubles from float() in _StagedRows._stage_typed,
        or _number_sql and _exact_quotient for a batch with an empty cell, in
        Staging, from the digits _column_type counts;
    the plugin directory: its list, table and HTML in The plugin directory
        and the welcome section, its buttons in DIRECTORY_SCRIPT;
    keeping temporary in a file: _start_keeping and _stop_keeping, with
        the lock of _temporary_held, in Keeping temporary; opening the kept
        file at start: _open_temporary, called by the startup hook;
    the user's say in how a file is read: ReadOptions, in Reading options,
        used by plan_file, chosen_types (Column names and types) and
        copy_in's if_exists (Copying into the target); the preview in
        Previews; the dialog, openReadingDialog in PAGE_SCRIPT;
    the page scripts: PAGE_SCRIPT (the import panel and its dialog, Import
        CSV and the switch that keeps temporary) and DIRECTORY_SCRIPT, in
        Page assets, added by the extra_js_urls and extra_body_script hooks.

Names without a leading underscore are the engine's entry points, the
handlers and the hooks. The tests call them, and some private helpers too:
to hold fast code to slow references, and to make small files read in parts.
"""

import asyncio
import bz2
import codecs
import collections
import contextlib
import csv
import ctypes
import dataclasses
import decimal
import errno
import functools
import gzip
import hashlib
import hmac
import html
import http
import http.client
import inspect
import io
import itertools
import json
import lzma
import math
import os
import posixpath
import queue
import re
import shutil
import socket
import sqlite3
import ssl
import stat
import string
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
import uuid
import weakref
import zipfile
import zlib
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from xml.etree import ElementTree

from datasette import hookimpl, hookspecs
from datasette.database import Database
from datasette.utils.asgi import Response

try:  # POSIX: a lock on the kept temporary's folder
    import fcntl
except ImportError:  # Windows
    fcntl = None

try:  # Datasette 1.0: events, and permissions as SQL, on resources
    from datasette import events as datasette_events
    from datasette.permissions import PermissionSQL
    from datasette.resources import TableResource
except ImportError:  # Datasette 0.65 has none of them
    datasette_events = PermissionSQL = TableResource = None


# ===== Constants =====
#
# Plugin-wide names, and the defaults of the plugin's settings. Every other
# constant sits with the code that uses it.


TEMPORARY = "temporary"
PLUGIN_NAME = "app_support"
# The desktop user, who owns the machine and the data. Requests carrying the
# API token come from the desktop app acting for that user.
ROOT_ACTOR = {"id": "root"}
# The app's Plugins menu opens /plugin_directory/plugins.
PLUGIN_DIRECTORY = "plugin_directory"
PLUGINS_TABLE = "plugins"
# Defaults of the plugin settings url_timeout (seconds to connect, and for
# each read), url_time_limit (seconds for a whole download) and
# url_size_limit_mb (megabytes a download may take, uncompressed).
URL_TIMEOUT_SECONDS = 30
URL_TIME_LIMIT_SECONDS = 600
URL_SIZE_LIMIT_MB = 1024
# Where a kept temporary lives unless the plugin setting temporary_file says:
# Datasette Desktop's own folder, the one its venv is in, in the user's home.
APP_FOLDER = ".datasette-app"
KEPT_FILE_NAME = "temporary.db"
# Defaults of the plugin settings plugin_directory_url and example_csvs_url.
PLUGIN_DIRECTORY_URL = "https://datasette.io/content/plugins.json?_shape=array&_size=max"
EXAMPLE_CSVS_URL = "https://datasette.io/content/example_csvs.json?_shape=array"


# ===== Errors =====
#
# One error type, APIError, with its status; ReadError (a file that cannot be
# imported) and ImportCancelled are kinds of it. Raised anywhere, each is
# turned into {"ok": false, "error": ...} in one place, _error_response.


class APIError(Exception):
    """A failure to report to the desktop app as {"ok": false, "error": ...}."""

    def __init__(self, message, status=400):
        super().__init__(message)
        self.message = message
        self.status = status


class ReadError(APIError):
    """A file that cannot be imported; the message names the file and the line."""


class ImportCancelled(APIError):
    """An import stopped because the user pressed Cancel."""


def _error_response(message, status):
    return Response.json({"ok": False, "error": message}, status=status)


def _server_fault(exception):
    """An unexpected exception as a 500 APIError, its traceback in the server log."""
    traceback.print_exception(type(exception), exception, exception.__traceback__)
    return APIError(
        f"Unexpected server error: {type(exception).__name__}: {exception}", status=500
    )


# User values in error sentences are shortened to about this many characters.
MAX_VALUE_IN_MESSAGE = 200


def _shorten(value, limit=MAX_VALUE_IN_MESSAGE):
    """A user value fit for an error sentence: long ones cut in the middle with an ellipsis."""
    value = str(value)
    if len(value) <= limit:
        return value
    half = (limit - 1) // 2
    return value[:half] + "…" + value[-half:]


def _amount(size):
    """A size in words: 21 GB, 850 MB."""
    if size >= 10 * 1024**3:
        return f"{size / 1024**3:.0f} GB"
    if size >= 1024**3:
        return f"{size / 1024**3:.1f} GB"
    return f"{max(1, round(size / 1024**2))} MB"


def _sqlite_failure(error, action, path):
    """An APIError that says why SQLite (or the OS) could not `action` the file at path.

    action completes "Could not ...", e.g. "save the temporary database to".
    """
    text = str(error).lower()
    number = getattr(error, "errno", None)
    shown = _shorten(path)
    if "disk is full" in text or number == errno.ENOSPC:
        return APIError(
            f"The disk is full: could not {action} {shown}. Free some space and try again."
        )
    if "readonly" in text or "read-only" in text or number in (errno.EROFS, errno.EPERM, errno.EACCES):
        return APIError(
            f"Could not {action} {shown}: it is read-only (a read-only drive, folder or file). "
            "Make it writable or choose another place, and try again."
        )
    if "locked" in text or "busy" in text:
        return APIError(
            f"Could not {action} {shown}: it is locked by another program. "
            "Close it there and try again."
        )
    return APIError(f"Could not {action} {shown}: {_shorten(getattr(error, 'strerror', None) or error)}")


@contextlib.contextmanager
def _sqlite_failures(action, path):
    """Report SQLite's and the OS's errors while doing action to path as sentences."""
    try:
        yield
    except (sqlite3.Error, OSError) as e:
        raise _sqlite_failure(e, action, path) from e


# ===== Requests and their guards =====
#
# Who may call a route, reading and checking its JSON body, and Datasette's
# CSRF refusals turned into JSON.


def _check_token(request):
    expected = os.environ.get("DATASETTE_API_TOKEN") or ""
    if not expected:
        raise APIError(
            "This server has no DATASETTE_API_TOKEN set, so it refuses all app requests.",
            status=401,
        )
    scheme, _, supplied = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        supplied.strip().encode("utf-8"), expected.encode("utf-8")
    ):
        raise APIError("Missing or invalid API token.", status=401)


def _is_app_user(request):
    return bool(request and request.actor and request.actor.get("id") == ROOT_ACTOR["id"])


def _check_token_or_app_user(request):
    """The API token, or the cookie /-/auth-app-user gives the desktop user."""
    if _is_app_user(request):
        return
    if request.actor and "authorization" not in request.headers:
        raise APIError("Only the desktop user of Datasette Desktop can do this.", status=403)
    _check_token(request)


# Who may call a route: the desktop app, with the API token; the app or the
# desktop user's pages, which send the cookie /-/auth-app-user gives; anyone.
APP, APP_OR_USER, ANYONE = "app", "app or desktop user", "anyone"
_AUTHENTICATE = {
    APP: _check_token,
    APP_OR_USER: _check_token_or_app_user,
    ANYONE: lambda request: None,
}
# Request bodies hold a path or a URL: far less than this.
MAX_BODY_BYTES = 2 * 1024 * 1024


async def _read_body(request, limit=MAX_BODY_BYTES):
    """The raw body, refused with 413 past limit bytes, without reading the rest.

    Read from the ASGI channel, not request.post_body(): 0.65 has no cap and
    1.0 raises its own PayloadTooLarge, which is not an APIError.
    """
    too_large = APIError(
        f"The request body is larger than {_amount(limit)}; "
        "these endpoints take a small JSON object.",
        status=413,
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size, more_body = [], 0, True
    while more_body:
        message = await request.receive()
        if message["type"] != "http.request":
            raise APIError("The request ended before its body was sent.")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
        more_body = message.get("more_body", False)
    return b"".join(chunks)


async def _read_json_object(request):
    body = await _read_body(request)
    if not body.strip():
        raise APIError("The request body is empty: send a JSON object.")
    try:
        data = json.loads(body)
    except RecursionError:
        raise APIError("The request body is JSON nested too deeply: send a flat JSON object.")
    except (ValueError, UnicodeDecodeError):
        raise APIError("The request body is not valid JSON.")
    if not isinstance(data, dict):
        raise APIError("The request body must be a JSON object.")
    return data


def _checked_body(data, required, optional):
    """The body's values by key, None for absent or null, once every key is known and of its type.

    required and optional map each key the endpoint takes to its type.
    """
    allowed = {**required, **optional}
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise APIError(
            f"The request has a key this endpoint does not take: {_shorten(unknown[0])}. "
            + _keys_taken(required, optional)
        )
    values = {}
    for key, kind in allowed.items():
        value = data.get(key)
        if value is None and key in required:
            raise APIError(
                f"The request has no {key}, which this endpoint needs. " + _keys_taken(required, optional)
            )
        # type(), not isinstance(): JSON's true and false are not integers here.
        if value is not None and type(value) is not kind:
            raise APIError(f"{key} must be a {_TYPE_NAMES[kind]}.")
        if isinstance(value, str) and not _is_unicode_text(value):
            raise APIError(
                f"{key} contains a lone surrogate (such as \\ud800), which is not text."
            )
        values[key] = value
    return values


def _keys_taken(required, optional):
    """The keys an endpoint takes, as a sentence: "It takes path, and optionally detect_types." """
    if not required and not optional:
        return "It takes no keys: send {}."
    if not required:
        return f"It takes only {_listed(optional)}, which {'is' if len(optional) == 1 else 'are all'} optional."
    if not optional:
        return f"It takes {_listed(required)}."
    return f"It takes {_listed(required)}, and optionally {_listed(optional)}."


def _listed(names, conjunction="and"):
    """Names in words: "a", "a and b", "a, b and c"; or "a, b or c"."""
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + f" {conjunction} " + names[-1]


def _is_unicode_text(value):
    """False for strings holding lone surrogates, which JSON allows and files cannot."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_TYPE_NAMES = {
    str: "string", bool: "boolean (true or false)", int: "whole number", dict: "JSON object",
}
CROSS_SITE_REFUSAL = (
    "Refused: this is a cross-site request, from a page on another origin (its "
    "Sec-Fetch-Site or Origin header says so), which Datasette's CSRF protection does "
    "not allow. The desktop app sends its token and no cookie."
)
MISSING_CSRF_TOKEN_REFUSAL = (
    "Refused: this request carries the desktop user's cookie but no CSRF token. A page "
    "must send the value of its ds_csrftoken cookie in an x-csrftoken header, as the "
    "import panel does; the desktop app sends its token instead."
)
STALE_CSRF_TOKEN_REFUSAL = (
    "Refused: the request's x-csrftoken header does not match its ds_csrftoken cookie, "
    "or the cookie is missing. Reload the page and try again."
)


def _csrf_refusal(scope):
    """Why Datasette's CSRF check refused this request, as a sentence."""
    headers = {name.lower(): value for name, value in scope.get("headers") or []}
    site = headers.get(b"sec-fetch-site", b"").decode("latin-1")
    origin = headers.get(b"origin", b"").decode("latin-1")
    host = headers.get(b"host", b"").decode("latin-1")
    if site not in ("", "same-origin", "none") or (
        origin and urllib.parse.urlsplit(origin).netloc != host
    ):
        return CROSS_SITE_REFUSAL
    if b"x-csrftoken" not in headers:
        return MISSING_CSRF_TOKEN_REFUSAL
    return STALE_CSRF_TOKEN_REFUSAL


def _csrf_refusals_as_json(app, paths):
    """ASGI middleware: Datasette's HTML "CSRF check failed" page, on the plugin's paths, as JSON.

    The asgi_wrapper hook wraps Datasette's CSRF layer, so the refusal is
    Datasette's own decision; only its form changes. Datasette 1.0 checks the
    request's origin, 0.65 its CSRF token, and only on the routes the desktop
    user's pages call (skip_csrf leaves the app's routes to the token check).
    """

    async def wrapped(scope, receive, send):
        if scope["type"] != "http" or scope.get("path") not in paths:
            await app(scope, receive, send)
            return
        refused = False

        async def send_json_refusal(message):
            nonlocal refused
            if message["type"] == "http.response.start" and message["status"] == 403:
                headers = dict(message.get("headers") or [])
                refused = headers.get(b"content-type", b"").startswith(b"text/html")
            if not refused:
                await send(message)
            elif message["type"] == "http.response.start":
                await _error_response(_csrf_refusal(scope), 403).asgi_send(send)
            # the HTML page's body messages are dropped

        await app(scope, receive, send_json_refusal)

    return wrapped


# ===== Datasette 0.65 and 1.0 =====
#
# Each difference between the two lines, and each private part of Datasette
# the plugin uses, in a small helper of its own, with a note on what would
# replace it.


async def _write_outside_transaction(db, fn):
    """Run fn(conn) in db's write thread with no transaction opened around it.

    Datasette 1.0 wraps writes in BEGIN IMMEDIATE unless told otherwise; 0.65
    never does. Callers here manage their own transactions (VACUUM, ATTACH
    and the backup API cannot run inside one).
    """
    if "transaction" in inspect.signature(db.execute_write_fn).parameters:
        return await db.execute_write_fn(fn, block=True, transaction=False)
    return await db.execute_write_fn(fn, block=True)


async def _refresh_catalog(datasette):
    """Make the very next page list a database or table that was just added.

    Datasette 1.0 refreshes its schema catalog at most once a second, and both
    lines skip a refresh while another runs, which may have started before
    the change.
    """
    # Polled, not awaited: on Python 3.9 the lock belongs to the loop that
    # was current when Datasette was created, not always the one serving.
    while _schema_refresh_running(datasette):
        await asyncio.sleep(0.005)
    if "force" in inspect.signature(datasette.refresh_schemas).parameters:
        await datasette.refresh_schemas(force=True)
    else:
        await datasette.refresh_schemas()


def _schema_refresh_running(datasette):
    """Whether Datasette is refreshing its schema catalog now.

    Private: Datasette's _refresh_schemas_lock. A public refresh that waits
    for one under way (or a documented lock) would replace it.
    """
    lock = getattr(datasette, "_refresh_schemas_lock", None)
    return lock is not None and lock.locked()


async def _track_event(datasette, event_class, **fields):
    """Report an event to listening plugins; Datasette 0.65 has no events."""
    if datasette_events is None:
        return
    event = getattr(datasette_events, event_class)(actor=ROOT_ACTOR, **fields)
    await datasette.track_event(event)


async def _root_may(datasette, action, database, table):
    """Whether Datasette lets the desktop user do action ("insert-row", "drop-table") to a table.

    1.0 asks its permission rules, which the configuration can set per
    table; 0.65 has no such rules, only plugins' permission_allowed hooks,
    and allows what none of them refuses.
    """
    if TableResource is not None:
        return await datasette.allowed(action=action, resource=TableResource(database, table), actor=ROOT_ACTOR)
    return await datasette.permission_allowed(ROOT_ACTOR, action, resource=(database, table), default=True)


def _file_database(datasette, path):
    return Database(datasette, path=path, is_mutable=True)


def _memory_database(datasette, memory_name):
    return Database(datasette, memory_name=memory_name)


def _temporary_database(datasette, path=None):
    """A Database to be temporary: the kept file at path, or in memory under a name of its own.

    A memory name of its own, so two Datasette instances in one process never
    share their tables. Not id(datasette): ids are reused, and the
    shared-cache database outlives its instance while a write thread still
    holds a connection to it.
    """
    place = {"path": path, "is_mutable": True} if path else {"memory_name": f"{TEMPORARY}_{uuid.uuid4().hex}"}
    db = Database(datasette, **place)
    if hasattr(db, "_thread_local_id"):  # Datasette 1.0 keeps read connections per object
        return db
    return _ReadsKeptPerObject(datasette, **place)


class _ReadsKeptPerObject(Database):
    """Datasette 0.65's Database, with each thread's read connection kept per object, as 1.0 keeps it.

    0.65 keeps them under the database's name, so a new Database named
    temporary would go on reading the one it replaced. Private: execute_fn's
    workings, ds.executor and ds._prepare_connection, as in 0.65.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._reads = threading.local()
        self._read_connections = []

    async def execute_fn(self, fn):
        if self.ds.executor is None:
            return await super().execute_fn(fn)

        def in_thread():
            conn = getattr(self._reads, "conn", None)
            if conn is None:
                conn = self.connect()
                self.ds._prepare_connection(conn, self.name)
                self._reads.conn = conn
                self._read_connections.append(conn)
            return fn(conn)

        return await asyncio.get_running_loop().run_in_executor(self.ds.executor, in_thread)

    async def close_connections(self):
        """Close every connection, which frees an in-memory database; later writes fail, not vanish."""
        if self._write_thread is not None:
            await self.execute_write_fn(lambda conn: conn.close(), block=True)
        for conn in self._read_connections:
            conn.close()
        self.close()  # a file's connections


def _welcome_in_page_script():
    """Whether the page script must place the welcome section on the home page.

    Datasette 1.0 has a top_homepage hook for it; 0.65 has none.
    """
    return not hasattr(hookspecs, "top_homepage")


def _csrftoken(request):
    """Datasette 0.65's CSRF token, for the x-csrftoken header; "" on 1.0, which ignores it.

    Private: asgi-csrf's csrftoken in the request's scope, which Datasette's
    templates call. 1.0 checks Sec-Fetch-Site and Origin instead, and a
    token given to plugins' hooks would replace it.
    """
    csrftoken = request.scope.get("csrftoken")
    return csrftoken() if csrftoken else ""


def _listed_plugins(datasette):
    """The plugins /-/plugins.json lists: name and version of each.

    Private: Datasette's _plugins(), the list behind that page. A documented
    list of installed plugins would replace it.
    """
    return datasette._plugins()


def _shared_by_copies(datasette, name, make):
    """The value kept on the Datasette object as _app_support_<name>, made by make() the first time.

    Kept there rather than in this module, so that two copies of the module
    loaded into one server (pip-installed and in --plugins-dir) share it.
    An attribute of our own on the Datasette object: a documented place for
    a plugin's state per instance would replace it.
    """
    attribute = "_app_support_" + name
    value = datasette.__dict__.get(attribute)
    if value is None:
        value = make()
        setattr(datasette, attribute, value)
    return value


# ===== Files and databases =====
#
# Paths from requests, the SQLite files they name, and table names.


SQLITE_HEADER = b"SQLite format 3\x00"
# Characters that SQLite reads as URI syntax in a file: URI. Datasette builds
# file: URIs from database paths without escaping them.
URI_SPECIAL_CHARACTERS = "?#%"
LOCKED_TIMEOUT_SECONDS = 2


def _resolve_path(raw):
    if not raw.strip():
        raise APIError("path must not be empty.")
    if "\x00" in raw:
        raise APIError("path must not contain a NUL character.")
    # "~" is the user's home folder, from the password database when, as in
    # the app, the server has no HOME.
    expanded = os.path.expanduser(raw)
    if not os.path.isabs(expanded):
        raise APIError(
            f"path must be a full path, such as /Users/me/data.csv, not {_shorten(raw)}: "
            "a relative path would be looked for in the server's own working folder."
        )
    return os.path.normpath(expanded)


def _existing_file(raw):
    path = _resolve_path(raw)
    if not os.path.exists(path):
        raise APIError(f"File not found: {_shorten(path)}")
    if os.path.isdir(path):
        raise APIError(f"That is a folder, not a file: {_shorten(path)}")
    if os.path.getsize(path) == 0:
        raise APIError(f"File is empty: {_shorten(path)}")
    return path


def _new_file(raw):
    path = _resolve_path(raw)
    if os.path.isdir(path):
        raise APIError(f"That is a folder, not a file: {_shorten(path)}")
    if os.path.lexists(path):
        raise APIError(f"File already exists: {_shorten(path)}")
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise APIError(f"Folder not found: {_shorten(folder)}")
    return path


def _refuse_uri_characters(path):
    found = [c for c in URI_SPECIAL_CHARACTERS if c in path]
    if found:
        raise APIError(
            f"Datasette cannot open a database file whose path contains {' or '.join(found)}: "
            f"{_shorten(path)}. Rename the file or its folder and try again."
        )


def _refuse_already_open(datasette, path):
    real = os.path.realpath(path)
    for db in datasette.databases.values():
        if db.path and os.path.realpath(db.path) == real:
            raise APIError(f"That file is already open as the database {_shorten(db.name)}: {_shorten(path)}")


def _writable_database(datasette, name):
    if name not in datasette.databases:
        raise APIError(f"Database not found: {_shorten(name)}")
    db = datasette.databases[name]
    if not db.is_mutable:
        raise APIError(f"Database {_shorten(name)} is read-only, so nothing can be imported into it.")
    return db


def _quote(identifier):
    """Quote an SQL identifier: the only way a name enters SQL text."""
    return '"' + identifier.replace('"', '""') + '"'


def _free_table_name(conn, wanted):
    """A table name close to wanted that no table, view or index in conn uses.

    Names are NFC, as typed on a keyboard: macOS reports file names in NFD.
    """
    wanted = _table_name(wanted)
    taken = {
        row[0].lower()
        for row in conn.execute("select name from sqlite_master where name is not null")
    }
    name, suffix = wanted, 2
    while name.lower() in taken:
        name = f"{wanted}_{suffix}"
        suffix += 1
    return name


def _table_name(wanted):
    """wanted as a name a new table can have."""
    wanted = unicodedata.normalize("NFC", wanted)
    # Datasette 0.65 puts table names in [brackets] when it reads a schema, so
    # one "]" would break every page; the same name is used on 1.0 too.
    # SQLite cannot take a NUL in SQL text, and a URL's "%00" decodes to one.
    wanted = wanted.replace("]", "_").replace("\x00", "_").strip() or "data"
    if wanted.lower().startswith("sqlite_"):
        wanted = "_" + wanted  # SQLite reserves sqlite_* names
    return wanted


def _connect_readonly(path):
    uri = "file:" + urllib.parse.quote(path) + "?mode=ro"
    return sqlite3.connect(uri, uri=True, timeout=LOCKED_TIMEOUT_SECONDS)


def _table_names(conn):
    return [
        row[0]
        for row in conn.execute(
            "select name from sqlite_master where type = 'table' order by name"
        )
    ]


def _check_sqlite_file(path, damaged=None):
    """Raise APIError unless path is a readable SQLite database file.

    damaged, when given, begins the sentence for a file cut short.
    """
    with open(path, "rb") as f:
        header = f.read(100)
    if not header.startswith(SQLITE_HEADER):
        raise APIError(f"Not a SQLite database: {_shorten(path)}")
    shortfall = _cut_short(header, os.path.getsize(path))
    if shortfall and damaged:
        raise APIError(f"{damaged}: the file is cut short (it {shortfall}).")
    if shortfall:
        raise APIError(
            f"Not a valid SQLite database: {_shorten(path)} is cut short (it {shortfall}), "
            "as an unfinished copy or download leaves a file."
        )
    try:
        conn = _connect_readonly(path)
        try:
            conn.execute("select count(*) from sqlite_master").fetchone()
        finally:
            conn.close()
    except sqlite3.OperationalError as e:
        if "locked" in str(e):
            raise APIError(
                f"Database is locked by another program: {_shorten(path)}. Close it there and try again."
            )
        raise APIError(f"Could not read the SQLite database {_shorten(path)}: {e}")
    except sqlite3.DatabaseError as e:
        raise APIError(f"Not a valid SQLite database ({e}): {_shorten(path)}")


def _cut_short(header, size):
    """What a database file of size bytes holds, when that is less than its header says; else None.

    The header's page count is trusted only when its version-valid-for
    number matches its change counter, as SQLite itself does.
    """
    if len(header) < 100:
        return f"holds {size:,} bytes, less than a database header"
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    if header[92:96] != header[24:28]:
        return None
    expected = int.from_bytes(header[28:32], "big") * page_size
    if size >= expected:
        return None
    return f"holds {size:,} of its {expected:,} bytes"


# No real data file expands more than this when gunzipped or unzipped; a file
# that does is a decompression bomb. Checked once past a few megabytes, where
# a real file's ratio has settled.
MAX_EXPANSION_RATIO = 200
EXPANSION_CHECK_AFTER_BYTES = 8 * 1024 * 1024


def _looks_like_a_bomb(size, packed_size):
    """Whether size bytes unpacked from packed_size expand more than any real data file does."""
    return size > EXPANSION_CHECK_AFTER_BYTES and size > MAX_EXPANSION_RATIO * max(packed_size, 1)


def _create_empty_database(path, mode=0o644):
    # O_EXCL: never touch a file that appeared since the request was checked.
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode))
    except FileExistsError:
        raise APIError(f"File already exists: {path}")
    except OSError as e:
        raise APIError(f"Could not create {path}: {e.strerror}")
    try:
        conn = sqlite3.connect(path)
        try:
            # VACUUM writes a header, so the file is a valid database, not 0 bytes.
            conn.execute("vacuum")
        finally:
            conn.close()
    except sqlite3.Error as e:
        os.remove(path)
        raise APIError(f"Could not create a SQLite database at {path}: {e}")


# ===== Work folders =====


# Work folders (staging databases, downloads) are named
# app_support_<pid>_<random> in the temp directory, so a later start can
# remove the ones whose process died without cleaning up.
WORK_FOLDER_PREFIX = "app_support_"


def _work_folder():
    """A temporary folder for staging and downloads, named for this process."""
    return tempfile.TemporaryDirectory(prefix=f"{WORK_FOLDER_PREFIX}{os.getpid()}_")


@contextlib.asynccontextmanager
async def _work_folder_off_loop():
    """_work_folder for handlers: a staging database can be hundreds of MB to delete."""
    folder = await asyncio.to_thread(_work_folder)
    try:
        yield folder.name
    finally:
        await asyncio.to_thread(folder.cleanup)


_WORK_FOLDER_NAME = re.compile(re.escape(WORK_FOLDER_PREFIX) + r"([0-9]+)_")


def _remove_leftover_work_folders():
    """Remove the work folders of processes that died without cleaning up (kill -9, a crash)."""
    if os.name != "posix":
        return  # os.kill(pid, 0) would end the process on Windows
    folder = tempfile.gettempdir()
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        match = _WORK_FOLDER_NAME.match(name)
        if not match or _process_alive(int(match.group(1))):
            continue
        path = os.path.join(folder, name)
        try:
            info = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid():
            shutil.rmtree(path, ignore_errors=True)


def _process_alive(pid):
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # another user's process, or no such pid number
        return True
    return True


# ===== Memory for temporary =====
#
# temporary is in memory, so a table too large for it would make the kernel
# end the server, and every table in temporary with it. Imports and restores
# into it first compare what they need with what this process may still use.


# The temporary database lives in memory: an import or restore into it must
# leave this much memory free, besides what its tables take. A table takes
# about a tenth more in memory than on disk, for SQLite's page cache: a
# 148 MB table grew the process by 161 MB.
MEMORY_MARGIN_BYTES = 64 * 1024 * 1024
MEMORY_PER_TABLE_BYTE = 1.1


@dataclass
class FreeMemory:
    bytes: int
    sentence: str  # how to say so, with {} for the amount


def _free_memory():
    """The memory this process may still use, as a FreeMemory; None when unknown."""
    free = _available_on_linux()
    if free is None:
        try:  # elsewhere, all the standard library can learn is the physical memory
            total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
        return FreeMemory(total, "this computer has {} of memory in all") if total > 0 else None
    limited = _cgroup_room()
    if limited is not None and limited < free:
        return FreeMemory(limited, "the server's memory limit (its cgroup) leaves about {} free")
    return FreeMemory(free, "this computer has about {} free")


def _available_on_linux():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_room():
    """What this process's memory cgroups (v1 or v2) still allow it, page cache aside; None without a limit."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = [line.rstrip("\n").split(":", 2) for line in f]
    except OSError:
        return None
    rooms = []
    for _, controllers, path in (line for line in lines if len(line) == 3):
        if controllers == "":  # v2
            mount, files = "/sys/fs/cgroup", ("memory.max", "memory.current", "")
        elif "memory" in controllers.split(","):
            mount, files = "/sys/fs/cgroup/memory", ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_")
        else:
            continue
        # In a container the cgroup's own folder may be the mount itself.
        folder = os.path.join(mount, path.lstrip("/"))
        if not os.path.isdir(folder):
            folder = mount
        while folder.startswith(mount):
            room = _cgroup_folder_room(folder, *files)
            if room is not None:
                rooms.append(room)
            if folder == mount:
                break
            folder = os.path.dirname(folder)
    return min(rooms) if rooms else None


def _cgroup_folder_room(folder, limit_file, usage_file, stat_prefix):
    """What one cgroup folder's limit leaves; its usage counts the page cache, which the kernel can drop."""
    try:
        with open(os.path.join(folder, limit_file)) as f:
            limit = f.read().strip()
        with open(os.path.join(folder, usage_file)) as f:
            usage = int(f.read())
        reclaimable = 0
        with open(os.path.join(folder, "memory.stat")) as f:
            for line in f:
                key, _, value = line.partition(" ")
                # Files' pages only: tmpfs files (shmem) stay in memory.
                if key in (stat_prefix + "active_file", stat_prefix + "inactive_file"):
                    reclaimable += int(value)
    except (OSError, ValueError):
        return None
    if limit == "max" or int(limit) >= 2**60:  # no limit
        return None
    return max(0, int(limit) - usage + reclaimable)


def _check_room_in_memory(need, refusal):
    """Refuse what would not fit in memory with MEMORY_MARGIN_BYTES to spare.

    refusal is a sentence with {need} and {free} to fill in.
    """
    free = _free_memory()
    if free is not None and need + MEMORY_MARGIN_BYTES > free.bytes:
        raise APIError(
            refusal.format(need=_amount(need), free=free.sentence.format(_amount(free.bytes)))
        )


def _table_bytes(path, table):
    """The bytes a table's pages take in the database at path; the whole file's size without dbstat."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute("select sum(pgsize) from dbstat where name = ?", [table]).fetchone()[0] or 0
    except sqlite3.OperationalError:  # SQLite built without the dbstat table
        return os.path.getsize(path)
    finally:
        conn.close()


# ===== Keeping temporary =====
#
# The desktop user may keep temporary in a file, so that its tables outlive
# the server. The file's presence is the remembered choice: a server that
# finds it at start opens it as temporary. Turning keeping on copies
# temporary into the file with VACUUM INTO and puts the file in its place;
# turning it off copies the file back into memory with the backup API and
# removes it. The swaps, restores and the last step of every import into
# temporary take turns under one lock, so none of them writes into a
# temporary that has just been replaced.


# The copy that becomes the kept file is written beside it under this
# prefix first. Only the server holding the folder's lock writes one, so
# that server removes any it finds: left by a server killed while copying.
KEPT_PARTIAL_PREFIX = ".app_support-keep-"
# A kept file on a disk with less room than this is not opened at start:
# the first import would fail, and the next start find a file it cannot open.
KEPT_FILE_MIN_FREE_BYTES = 1024 * 1024


@dataclass
class _Keeper:
    """Where this server keeps temporary, or would, and what became of the file at start."""

    path: str  # the kept file's full path; None when no home folder could be found
    always: bool = False  # the temporary_file setting keeps it from every start
    error: str = None  # why the file there could not be used at start, as a sentence
    folder_lock: int = None  # a descriptor of the file's folder, locked while this server keeps it
    _lock: asyncio.Lock = None

    def lock(self):
        """The lock for changing what temporary is, made on the loop that serves requests."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock


def _keeper(datasette):
    return _shared_by_copies(datasette, "keeper", lambda: _new_keeper(datasette))


def _new_keeper(datasette):
    try:
        setting = _kept_file_setting(datasette)
    except APIError as e:
        return _Keeper(None, error=e.message)
    if setting:
        return _Keeper(setting, always=True)
    folder = _app_folder()
    return _Keeper(folder and os.path.join(folder, KEPT_FILE_NAME))


def _kept_file_setting(datasette):
    """The temporary_file setting as a full path; None when it is not set."""
    raw = (datasette.plugin_config(PLUGIN_NAME) or {}).get("temporary_file")
    if raw is None or raw == "":
        return None
    expanded = os.path.expanduser(raw) if isinstance(raw, str) else ""
    if not os.path.isabs(expanded) or "\x00" in expanded:
        raise APIError(
            "The app_support setting temporary_file must be a full path, such as "
            "/Users/me/temporary.db, so temporary is in memory."
        )
    return os.path.normpath(expanded)


def _app_folder():
    """Datasette Desktop's folder, ~/.datasette-app, found without HOME, which the app's server lacks.

    The app runs the server from that folder's venv, so the interpreter's
    prefix names it; anywhere else it is in the home folder, which
    expanduser takes from HOME or, without it, from the password database.
    """
    prefix = Path(sys.prefix)
    if prefix.name == "venv" and prefix.parent.name == APP_FOLDER:
        return str(prefix.parent)
    home = os.path.expanduser("~")
    return os.path.join(home, APP_FOLDER) if os.path.isabs(home) else None


def _shown_path(path):
    """A path as the user knows it: ~/.datasette-app/temporary.db."""
    home = os.path.expanduser("~")
    if os.path.isabs(home) and path.startswith(home.rstrip(os.sep) + os.sep):
        return "~" + path[len(home.rstrip(os.sep)):]
    return path


async def _open_temporary(datasette):
    """Add temporary at start: the kept file when there is one or the setting asks for it; else in memory."""
    keeper = _keeper(datasette)
    path = None
    try:
        path = await asyncio.to_thread(_open_kept_file, keeper)
    except APIError as e:
        keeper.error = e.message
    datasette.add_database(_temporary_database(datasette, path), name=TEMPORARY)


def _open_kept_file(keeper):
    """The kept file's path, when there is one to open, checked and its folder locked for this server; else None.

    With the temporary_file setting, a missing file is created.
    """
    path = keeper.path
    if path is None or not (keeper.always or os.path.lexists(path)):
        return None
    shown = _shorten(_shown_path(path))
    _make_private_folder(os.path.dirname(path))
    _lock_folder(keeper, (
        f"Temporary is in memory this time: another Datasette server is keeping its tables "
        f"in {shown}. Quit that one and start Datasette Desktop again to see them here."
    ))
    try:
        if not os.path.lexists(path):
            _create_empty_database(path, mode=0o600)
        else:
            _check_kept_file(path)
    except APIError as e:
        _unlock_folder(keeper)
        reason = e.message if e.message.endswith(".") else e.message + "."
        raise APIError(
            f"Temporary is in memory this time, because the kept file {shown} could not be "
            f"used. {reason} The file was left as it is: move it away or delete it, then "
            "turn keeping on again."
        )
    return path


def _check_kept_file(path):
    """Raise APIError unless the database file at path takes reads and writes, with room to grow."""
    if os.path.isdir(path):
        raise APIError(f"That is a folder, not a file: {_shorten(path)}")
    with open(path, "rb") as f:
        if not f.read(len(SQLITE_HEADER)) == SQLITE_HEADER:
            raise APIError(f"Not a SQLite database: {_shorten(path)}")
    # What a killed server left half-written is rolled back by the first
    # writing connection; only then do the file's header and pages tell the truth.
    if os.path.lexists(path + "-journal"):
        with _sqlite_failures("open", path):
            _check_writable(path)
    _check_sqlite_file(path)
    # SQLite opens a file it cannot write read-only, without a word.
    if not (os.access(path, os.W_OK) and os.access(os.path.dirname(path), os.W_OK)):
        raise _sqlite_failure(OSError(errno.EROFS, "read-only"), "open", path)
    with _sqlite_failures("open", path):
        _check_writable(path)
        # Every page is checked, as writing into a damaged file spreads the
        # damage. quick_check reads pages in the tree's order, so the file is
        # read straight through first: 1 GB not in the OS's cache took 17 s
        # to check, and 5 s so.
        _read_through(path)
        conn = _connect_readonly(path)
        try:
            problems = [row[0] for row in conn.execute("pragma quick_check(3)")]
        except sqlite3.DatabaseError as e:
            if isinstance(e, sqlite3.OperationalError):
                raise
            problems = [str(e)]
        finally:
            conn.close()
    if problems != ["ok"]:
        raise APIError(f"The file is damaged: {_shorten(problems[0])}.")
    disk = os.statvfs(os.path.dirname(path))
    if disk.f_bavail * disk.f_frsize < KEPT_FILE_MIN_FREE_BYTES:
        raise APIError(f"The disk is full: {_shorten(path)} could not take any more tables.")


def _read_through(path):
    """Read the file at path from start to end, so that the OS holds it in its cache."""
    with open(path, "rb", buffering=0) as f:
        while f.read(READ_BUFFER_BYTES * 4):
            pass


def _make_private_folder(folder):
    """Create folder, readable by the user alone, when it is missing."""
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
    except OSError as e:
        raise _sqlite_failure(e, "create the folder", folder)


def _lock_folder(keeper, refusal):
    """Lock the kept file's folder for this server, so a second server never uses or removes the file.

    The lock is the OS's, on the folder, so it ends with the process however
    that ends. Without flock (Windows), SQLite's own locks are all there is.
    """
    if fcntl is None or keeper.folder_lock is not None:
        return
    descriptor = os.open(os.path.dirname(keeper.path), os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(descriptor)
        raise APIError(refusal)
    keeper.folder_lock = descriptor
    folder = os.path.dirname(keeper.path)
    for name in os.listdir(folder):
        if name.startswith(KEPT_PARTIAL_PREFIX) and name.endswith(".partial"):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, name))


def _unlock_folder(keeper):
    if keeper.folder_lock is not None:
        os.close(keeper.folder_lock)  # closing it releases the lock
        keeper.folder_lock = None


@contextlib.asynccontextmanager
async def _temporary_held(datasette, name):
    """While held, the database named temporary stays the one it is; for other names, nothing."""
    if name != TEMPORARY:
        yield
        return
    async with _keeper(datasette).lock():
        yield


def _kept_state(datasette):
    """What GET and POST /-/keep-temporary answer."""
    db = datasette.get_database(TEMPORARY)
    state = {"ok": True, "keep": not db.is_memory, "file": None if db.is_memory else db.path}
    error = _keeper(datasette).error
    if db.is_memory and error:
        state["error"] = error
    return state


async def _start_keeping(datasette, keeper):
    """Copy temporary into the kept file, atomically, and make that file temporary."""
    if keeper.path is None:
        raise APIError(keeper.error or (
            "Could not find your home folder to keep the tables in: set the app_support "
            "setting temporary_file to a full path."
        ))
    path, shown = keeper.path, _shorten(_shown_path(keeper.path))
    await asyncio.to_thread(_make_private_folder, os.path.dirname(path))
    if os.path.lexists(path):
        raise APIError(
            f"There is already a file at {shown}, so nothing was changed: move it away "
            "or delete it, then turn keeping on again."
        )
    await asyncio.to_thread(_lock_folder, keeper, (
        f"Another Datasette server is keeping its tables in {shown}, so nothing was "
        "changed: quit that one first."
    ))
    action = "keep the temporary database in"
    partial = os.path.join(os.path.dirname(path), f"{KEPT_PARTIAL_PREFIX}{uuid.uuid4().hex[:12]}.partial")

    def copy_out(conn):
        conn.execute("vacuum into ?", [partial])
        _sync(partial)
        _move_into_place(partial, path, action)
        _sync(os.path.dirname(path))
        # Writes still queued for the old temporary fail rather than vanish.
        conn.execute("pragma query_only = 1")

    try:
        await asyncio.to_thread(_create_partial, partial, path, action, 0o600)
        with _sqlite_failures(action, path):
            await _write_outside_transaction(datasette.get_database(TEMPORARY), copy_out)
    except BaseException:
        _unlock_folder(keeper)
        raise
    finally:
        await asyncio.to_thread(_remove_partial, partial)
    keeper.error = None
    await _swap_temporary(datasette, _temporary_database(datasette, path))


async def _stop_keeping(datasette, keeper):
    """Copy the kept file back into an in-memory temporary, when it fits, then remove the file."""
    old = datasette.get_database(TEMPORARY)
    path, shown = old.path, _shorten(_shown_path(old.path))
    size = await asyncio.to_thread(os.path.getsize, path)
    await asyncio.to_thread(_check_room_in_memory, MEMORY_PER_TABLE_BYTE * size, (
        f"The tables kept in {shown} need about {{need}} of memory to move back into "
        "memory, and {free}, so they stay kept in the file."
    ))
    new = _temporary_database(datasette)
    action = "move the kept tables back into memory from"

    def load(conn):
        source = _connect_readonly(path)
        try:
            page_size = source.execute("pragma page_size").fetchone()[0]
            # PRAGMA takes no bound parameters; page_size is SQLite's own integer.
            conn.execute(f"pragma page_size = {int(page_size)}")
            source.backup(conn)
        finally:
            source.close()

    # Writes queued for the file meanwhile fail rather than vanish.
    await _write_outside_transaction(old, lambda conn: conn.execute("pragma query_only = 1"))
    try:
        with _sqlite_failures(action, path):
            await _write_outside_transaction(new, load)
    except BaseException:
        await _write_outside_transaction(old, lambda conn: conn.execute("pragma query_only = 0"))
        await _close_database(new)
        raise
    await _swap_temporary(datasette, new)
    await asyncio.to_thread(_remove_kept_file, path)
    _unlock_folder(keeper)


async def _close_database(db):
    """Close a Database that was never attached: 1.0's close(), or 0.65's connections one by one."""
    if isinstance(db, _ReadsKeptPerObject):
        await db.close_connections()
    else:
        await asyncio.to_thread(db.close)
    await asyncio.to_thread(_return_freed_memory)


async def _swap_temporary(datasette, new):
    """Make new the database named temporary, at the same URL, and close the one it replaces."""
    old = datasette.get_database(TEMPORARY)
    order = list(datasette.databases)
    datasette.remove_database(TEMPORARY)  # Datasette 1.0 closes old here
    datasette.add_database(new, name=TEMPORARY)
    # Where it was, not last, so that the home page keeps its order. A new
    # dict, not a changed one, as add_database and remove_database do.
    databases = dict(datasette.databases)
    datasette.databases = {**{name: databases.pop(name) for name in order if name in databases}, **databases}
    if isinstance(old, _ReadsKeptPerObject):
        await old.close_connections()
    await asyncio.to_thread(_return_freed_memory)
    await _refresh_catalog(datasette)


def _return_freed_memory():
    """Hand the memory of a closed in-memory database back to the operating system.

    SQLite frees it, but the C allocator keeps freed pages for reuse, and on
    Datasette 0.65, whose write threads never end, in arenas of threads that
    never allocate again: a gigabyte kept, switch after switch. glibc's
    malloc_trim and macOS's malloc_zone_pressure_relief give it back; a
    system with neither keeps it.
    """
    try:
        c_library = ctypes.CDLL(None)
    except OSError:
        return
    for name, arguments in (("malloc_trim", (0,)), ("malloc_zone_pressure_relief", (None, 0))):
        function = getattr(c_library, name, None)
        if function is not None:
            function(*arguments)
            return


def _sync(path):
    """Make what was written to the file or folder at path survive a power cut."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _remove_kept_file(path):
    for leftover in (path, path + "-journal", path + "-wal", path + "-shm"):
        if os.path.lexists(leftover):
            os.remove(leftover)
    _sync(os.path.dirname(path))


# ===== The import engine =====
#
# Every import takes one path. A reader turns the file into a header and
# batches of rows; for CSV each cell is the exact string the csv module gives.
# The rows go into a staging database of their own while the column types are
# learned batch by batch: number columns in their types where the first batch
# says so, the rest as they are. SQLite then converts what needs it to the
# final types inside the staging database, and a last INSERT ... SELECT *
# copies them into the target, which SQLite does record by record without
# decoding one. Only that last copy touches the user's database, so its readers wait
# for a fraction of a second, never for the whole import.
#
# The sections below follow that path: readers, column names and types,
# staging, copying in. Large files are also read in parts by several
# processes at once. That speed-up has a section of its own after them, the
# only one that cuts files into parts or starts processes: a reader just
# reads the bytes it is given.


# Small batches stay in the CPU cache: 500 rows ran faster than 5,000 or 20,000.
BATCH_ROWS = 500
# SQLite's default SQLITE_MAX_COLUMN.
MAX_COLUMNS = 2000
# How much of a file is read at a time.
READ_BUFFER_BYTES = 256 * 1024


# ===== Reading options =====
#
# What the user says of how to read a file, at the import endpoints and the
# preview: each option overrides one of the engine's own choices, and None
# leaves that choice to the engine. Checked once, here, into ReadOptions;
# the plans, the staging and copy_in each take the part they use.


# The keys of a request body that are reading options, and their JSON types.
READING_OPTIONS = {
    "encoding": str, "delimiter": str, "quoting": str, "header": bool, "skip_lines": int,
    "types": dict, "sheet": str, "json_path": str, "if_exists": str,
}
QUOTINGS = ("standard", "none")
IF_EXISTS = ("rename", "replace", "append")
IF_EXISTS_VERBS = {"replace": "replace", "append": "append to"}  # "… the table to replace"
COLUMN_TYPES = ("TEXT", "INTEGER", "REAL")
# The options that only a CSV or TSV file takes: given one, the file is read as one.
CSV_OPTIONS = ("delimiter", "quoting", "header", "skip_lines")


@dataclass(frozen=True)
class ReadOptions:
    encoding: str = None  # a Python codec name
    delimiter: str = None
    quoting: str = None  # "standard" or "none"
    header: bool = None
    skip_lines: int = None  # lines above the header, counted from the file's first line
    types: dict = None  # column name: TEXT, INTEGER or REAL
    sheet: str = None
    json_path: str = None  # keys joined with dots, as the import's answer gives them
    if_exists: str = "rename"
    # For if_exists "append", set by the import: {"name": the table, "columns":
    # {_column_key(column): the type it stores values as, None for as they come}}.
    table_columns: dict = None

    def given(self, names):
        """The first of these options that was given, or None."""
        return next((name for name in names if getattr(self, name) is not None), None)


NO_OPTIONS = ReadOptions()


def _reading_options(values):
    """The reading options among a checked request body's values, each value checked."""
    options = {key: values.get(key) for key in READING_OPTIONS if values.get(key) is not None}
    if "encoding" in options:
        try:  # as named: not _codec's reading of a declared charset, which widens latin-1 and ascii
            codec = codecs.lookup(options["encoding"].strip()).name
        except (LookupError, ValueError):
            codec = None
        if codec == "utf-8":
            codec = "utf-8-sig"  # which reads a byte order mark too
        if codec is None or not codecs.lookup(codec)._is_text_encoding:
            raise APIError(
                f"encoding must be a text encoding Python knows, such as utf-8, cp1252, "
                f"shift_jis or utf-16, not {_shorten(options['encoding'])!r}."
            )
        options["encoding"] = codec
    delimiter = options.get("delimiter")
    if delimiter is not None and (len(delimiter) != 1 or delimiter in '\r\n"\x00'):
        raise APIError(
            "delimiter must be one character, such as \",\", \";\", \"|\" or \"\\t\" for a tab, "
            f"and not a quote or a line break: {_shorten(delimiter)!r} is not."
        )
    for key, allowed in (("quoting", QUOTINGS), ("if_exists", IF_EXISTS)):
        if key in options and options[key] not in allowed:
            raise APIError(
                f"{key} must be {_listed(map(json.dumps, allowed), 'or')}, not {_shorten(options[key])!r}."
            )
    if options.get("skip_lines", 0) < 0:
        raise APIError(f"skip_lines must be a whole number, 0 or more, not {options['skip_lines']}.")
    for key in ("sheet", "json_path"):
        if options.get(key) == "":
            raise APIError(f"{key} must not be empty: leave it out to let the import choose.")
    if "types" in options:
        options["types"] = _column_types_option(options["types"])
    return ReadOptions(**options)


def _column_types_option(types):
    checked = {}
    for name, kind in types.items():
        if not isinstance(kind, str) or kind.upper() not in COLUMN_TYPES:
            raise APIError(
                f"types must give each column one of {_listed(COLUMN_TYPES, 'or')}: "
                f"{_shorten(name)!r} has {_shorten(json.dumps(kind))}."
            )
        checked[name] = kind.upper()
    return checked


# ===== Readers =====
#
# plan_file looks at a file's content, never its name, and returns a plan:
# how to read the file (CSVPlan, JSONPlan, XLSXPlan). A plan has
#   format and answer(): what the import's answer says of the file;
#   source and kind: the file's name and the kind of text it is, for messages;
#   readers(path): (sheet, reader) for each table the file gives, one after
#     another: one table with no sheet name, or a workbook's worksheets;
#   splittable: whether rows may start after LF bytes, so that the file can
#     be read in parts. If so, quote_byte and row_start(window, quotes) find
#     where a row may start, and open(path, start, end) reads a byte range.
# A reader has
#   batches(): lists of rows, each a list of cells;
#   header: the column names, complete once the batches are;
#   keys: None when columns are known by position (CSV), else each column's
#     key (JSON), by which parts of a file are matched up;
#   typed_cells: False when every cell is text to learn a type from (CSV),
#     True when cells are typed values (JSON);
#   bytes_read and close().
# A reader given a range that ends inside a row raises _RangeEndsMidRow.
# CSV and JSON text is opened by _open_text, which refuses NUL bytes.


BINARY_SNIFF_BYTES = 8192


def _file_head(path, source):
    """The file's first bytes, from the first chunk that is not all blank on."""
    with open(path, "rb") as f:
        head = f.read(BINARY_SNIFF_BYTES)
        while head and not head.strip():
            head = f.read(BINARY_SNIFF_BYTES)  # blank lines before the header
    if not head:
        raise ReadError(f"File is empty: {source}")
    return head


_WEB_PAGE = re.compile(r"(<!doctype\s+html|<html)[\s>]", re.IGNORECASE)
_XML_DOCUMENT = re.compile(r"<\?xml\s")
# An array whose first item has begun, or an object whose first key has.
_JSON_START = re.compile(r'\[\s*[\[{"0-9tfn\]-]|\{\s*["}]')


def plan_file(path, charset=None, source=None, unpacked_limit_mb=URL_SIZE_LIMIT_MB, options=NO_OPTIONS):
    """Decide from the file's start, not its name, how to read it; return the plan of its reader.

    charset is a declared text encoding, such as a download's Content-Type
    gives. source names the file in messages: its path, or the URL it came
    from. unpacked_limit_mb bounds each part of a workbook, unpacked.
    options are the user's ReadOptions: an encoding is used as given, and an
    option only CSV takes reads the file as CSV, whatever its start.
    """
    source = _shorten(source or path)
    head = _file_head(path, source)
    if head.startswith(_OLE2_MAGIC):
        raise _save_as_advice(source, "an Excel 97-2003 workbook (.xls) or an encrypted workbook")
    if head.startswith(_ZIP_MAGIC) and _is_workbook(path):
        _refuse_options(options, ("encoding",) + CSV_OPTIONS + ("json_path",), source, "an Excel workbook")
        return plan_xlsx(path, source, unpacked_limit_mb, options.sheet)
    _refuse_options(options, ("sheet",), source, "not an Excel workbook")
    encoding = options.encoding or sniff_encoding(head, charset)
    if b"\x00" in head and not _is_wide(encoding):
        raise ReadError(f"This looks like a binary file, not CSV, TSV or JSON text: {source}")
    text = head.decode(encoding, "replace").lstrip("\ufeff \t\r\n")
    if _WEB_PAGE.match(text + " "):
        raise ReadError(f"{source} is a web page (HTML), not CSV, TSV or JSON data.")
    if _XML_DOCUMENT.match(text + " "):
        raise ReadError(f"{source} is an XML document, not CSV, TSV or JSON data.")
    as_csv = options.given(CSV_OPTIONS)
    if as_csv and options.json_path is not None:
        raise ReadError(f"json_path and {as_csv} cannot go together: {as_csv} reads {source} as CSV.")
    if _JSON_START.match(text) and not as_csv:
        try:
            return plan_json(path, encoding, source, options.json_path)
        except _NotJSON:
            pass  # only its start looked like JSON: CSV lines such as [248.128.0.120]
    elif _JSON_SCALAR_START.match(text) and not as_csv:
        _refuse_json_scalar(path, encoding, source)
    _refuse_options(options, ("json_path",), source, "read as CSV, not JSON")
    return plan_csv(path, encoding, source, options)


def _refuse_options(options, names, source, what):
    """Refuse the first of these options given for a file they do not apply to: source is what."""
    name = options.given(names)
    if name is not None:
        raise ReadError(f"{source} is {what}, so the option {name} does not apply to it. Leave it out.")


# A file this small that is one JSON value is JSON, not a CSV of one cell.
MAX_JSON_SCALAR_BYTES = 64 * 1024
_JSON_SCALAR_START = re.compile(r'["0-9-]|true\b|false\b|null\b')


def _refuse_json_scalar(path, encoding, source):
    """Refuse a file that is a single JSON string, number, boolean or null, which holds no table."""
    if os.path.getsize(path) > MAX_JSON_SCALAR_BYTES:
        return
    with open(path, "rb") as f:
        text = f.read().decode(encoding, "replace").lstrip("\ufeff")
    try:
        value = json.loads(text)
    except ValueError:
        return
    if not isinstance(value, (dict, list)):
        raise _not_a_table(source, f"a single JSON {_json_kind(value)}")


class _NotJSON(Exception):
    """A file whose first value, though it began like JSON, is not JSON: read it as CSV."""


class _NulGuard(io.RawIOBase):
    """A raw file, or the bytes start to end of it, that refuses NUL bytes.

    Python 3.11's csv module accepts them. plan gives the file's name in
    messages and the kind of text it should be.
    """

    def __init__(self, path, plan, start=0, end=None):
        self.path = path
        self.plan = plan
        self.raw = open(path, "rb", buffering=0)
        self.raw.seek(start)
        self.start = start
        self.left = end - start if end is not None else None
        self.lines = 0

    def readable(self):
        return True

    def readinto(self, buffer):
        if self.left is not None:
            buffer = memoryview(buffer)[: self.left]
        n = self.raw.readinto(buffer)
        if self.left is not None:
            self.left -= n
        chunk = memoryview(buffer)[:n].tobytes() if n else b""
        nul = chunk.find(b"\x00")
        if nul != -1:
            line = self.lines + chunk.count(b"\n", 0, nul) + 1
            if self.start:
                line += _lines_before(self.path, self.start)
            raise ReadError(
                f"{self.plan.source} contains a NUL byte on line {line}, "
                f"so it is not {self.plan.kind} text."
            )
        self.lines += chunk.count(b"\n")
        return n

    def tell(self):
        return self.raw.tell() - self.start

    def close(self):
        self.raw.close()
        super().close()


def _open_text(path, plan, start=0, end=None, newline=None):
    """The text of the file at path, or of its bytes start to end, in the plan's encoding: (raw, text).

    raw counts the bytes read (its tell()) and refuses NUL bytes, but in
    UTF-16 and UTF-32, whose text is full of them and which are never read
    in parts. newline is as for open().
    """
    if _is_wide(plan.encoding):
        raw = open(path, "rb", buffering=0)
    else:
        raw = _NulGuard(path, plan, start, end)
    text = io.TextIOWrapper(
        io.BufferedReader(raw, READ_BUFFER_BYTES),
        # A byte order mark can only be at the very start.
        encoding="utf-8" if start and plan.encoding == "utf-8-sig" else plan.encoding,
        errors=_decode_errors(plan.encoding),
        newline=newline,
    )
    return raw, text


class _RangeEndsMidRow(Exception):
    """The bytes a reader was given end inside a row, or above the header: the end of
    the range was misplaced, not the file wrong (see "Reading large files in parts")."""


def _lines_before(path, offset, lf_only=False):
    """How many lines the file at path has before byte offset, for messages.

    As csv counts them, a CR alone ends a line too; as json counts them
    (lf_only), only an LF does.
    """
    count, previous = 0, b""
    with open(path, "rb") as f:
        while offset > 0:
            chunk = f.read(min(READ_BUFFER_BYTES, offset))
            if not chunk:
                break
            offset -= len(chunk)
            count += chunk.count(b"\n")
            if not lf_only:
                count += chunk.count(b"\r") - chunk.count(b"\r\n")
                count -= previous == b"\r" and chunk.startswith(b"\n")  # a CRLF cut in two
            previous = chunk[-1:]
    return count


# ===== Readers: text encodings =====


LATIN1_FALLBACK = "app_support_latin1_fallback"
UTF8_FALLBACK = "app_support_utf8_fallback"
# Encodings a file can be cut in at any LF byte: it is a line break wherever
# it appears, and no state carries over from one line to the next.
SPLITTABLE_ENCODINGS = ("utf-8-sig", "cp1252")


def _latin1_fallback(error):
    # cp1252 leaves five bytes undefined; read those as Latin-1.
    return error.object[error.start : error.end].decode("latin-1"), error.end


def _utf8_fallback(error):
    """Read a byte that is not UTF-8 as cp1252, and a character cut off at the end as U+FFFD."""
    if error.reason == "unexpected end of data":
        return "\ufffd", error.end
    return error.object[error.start : error.end].decode("cp1252", LATIN1_FALLBACK), error.end


codecs.register_error(LATIN1_FALLBACK, _latin1_fallback)
codecs.register_error(UTF8_FALLBACK, _utf8_fallback)


def _codec(charset):
    """The Python codec for a declared charset, or None when it is unknown."""
    try:
        name = codecs.lookup(charset.strip().strip('"')).name
    except (LookupError, ValueError):
        return None
    if name == "utf-8":
        return "utf-8-sig"
    # As browsers do: content labelled Latin-1 is read as its superset cp1252.
    return "cp1252" if name in ("latin-1", "iso8859-1", "ascii") else name


def _is_wide(encoding):
    """UTF-16 and UTF-32 text is full of NUL bytes that are not binary."""
    return encoding.startswith(("utf-16", "utf-32", "utf_16", "utf_32"))


def _decodes_as_utf8(head):
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        # A multi-byte character may be cut at the end of the sample or file.
        return e.reason == "unexpected end of data"
    return True


def sniff_encoding(head, declared=None):
    """Pick the encoding: a declared charset, a BOM, else UTF-8 unless the start says
    an East Asian code page or cp1252."""
    looks_utf8 = _decodes_as_utf8(head)
    codec = _codec(declared) if declared else None
    # Servers often label UTF-8 as Latin-1 by default, while non-ASCII bytes
    # that decode as UTF-8 are almost never really Latin-1.
    if codec and not (codec == "cp1252" and looks_utf8 and not head.isascii()):
        return codec
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "utf-16"
    return "utf-8-sig" if looks_utf8 else _east_asian_code_page(head) or "cp1252"


# The code pages Excel writes CSV in on Japanese, Chinese and Korean Windows,
# each with the national standard it extends and the codes there of its
# everyday characters: punctuation and kana rows, and the common level of
# kanji or hanzi, or the Hangul syllables of KS X 1001.
_EAST_ASIAN = (
    ("cp949", "euc_kr", ((0xA1A1, 0xACFE), (0xB0A1, 0xC8FE))),
    ("gb18030", "gb2312", ((0xA1A1, 0xA9FE), (0xB0A1, 0xD7F9))),
    ("cp950", "big5", ((0xA140, 0xA3BF), (0xA440, 0xC67E))),
    ("cp932", "shift_jis", ((0x8140, 0x84BE), (0x889F, 0x9872))),
)
# How much of a file's non-ASCII text must be such characters, and how many
# of its runs may touch a Latin letter, as accented letters read as double-
# byte codes do (café: caf + a code made of é and the next byte).
EAST_ASIAN_SHARE = 0.9
TOUCHING_LATIN_SHARE = 0.2
_NON_ASCII_RUN = re.compile(r"[^\x00-\x7f]+")
# Japanese prose is mostly kana, which Western text read as cp932 never gives
# (hiragana would be "‚" before a letter in cp1252). With this share of
# full-width kana, the text is Japanese whatever else it holds: rarer kanji,
# half-width katakana, or Latin words beside Japanese ones (iPhoneを).
KANA_SHARE = 0.3
_FULL_WIDTH_KANA = re.compile(r"[\u3041-\u3096\u30a1-\u30fa\u30fc]")


def _everyday(c, standard, ranges):
    """Whether c is one of the everyday characters of a national standard."""
    try:
        code = int.from_bytes(c.encode(standard), "big")
    except UnicodeEncodeError:
        return False
    return any(low <= code <= high for low, high in ranges)


def _east_asian_code_page(head):
    """The East Asian code page the bytes are text in, or None.

    Western text decodes as these code pages too, often without an error:
    an accented letter and the letter after it make a double-byte code. So
    the evidence is what the text decodes to: nearly all of it the everyday
    characters of the code page's language, in runs that seldom touch a
    Latin letter. Of code pages with equal evidence, the first listed wins:
    Korean text reads as common Chinese characters in GB18030.
    """
    best, best_share = None, EAST_ASIAN_SHARE
    for encoding, standard, ranges in _EAST_ASIAN:
        try:
            text = codecs.getincrementaldecoder(encoding)().decode(head)  # may end mid-character
        except UnicodeDecodeError:
            continue
        runs = list(_NON_ASCII_RUN.finditer(text))
        wide = "".join(run.group() for run in runs)
        if len(wide) < 2:
            continue
        if encoding == "cp932" and len(_FULL_WIDTH_KANA.findall(wide)) >= KANA_SHARE * len(wide):
            return encoding
        share = sum(_everyday(c, standard, ranges) for c in wide) / len(wide)
        touching = sum(
            text[run.start() - 1 : run.start()].isalpha() or text[run.end() : run.end() + 1].isalpha()
            for run in runs
        )
        if share > best_share and touching <= len(runs) * TOUCHING_LATIN_SHARE:
            best, best_share = encoding, share
    return best


def _decode_errors(encoding):
    """UTF-8 that turns out to hold a stray cp1252 byte keeps its UTF-8 text."""
    if encoding == "cp1252":
        return LATIN1_FALLBACK
    return UTF8_FALLBACK if encoding in ("utf-8-sig", "utf-8") else "strict"


# ===== Readers: CSV =====
#
# How the CSV dialect is decided: plan_csv, detect_delimiter and _messy_plan.


SNIFF_CHARACTERS = 64 * 1024
# Rows of the sample that vote for a delimiter.
SNIFF_ROWS = 100
DELIMITERS = ",\t;|"
# For one-column files: a control character that never splits a value.
NO_DELIMITER = "\x1f"
# The csv module's field size limit while this plugin reads: no limit, in effect.
CSV_FIELD_SIZE_LIMIT = min(sys.maxsize, 2**31 - 1)


@dataclass
class CSVPlan:
    """How to read a CSV file, decided from its start."""

    encoding: str = "utf-8-sig"
    delimiter: str = ","
    source: str = ""  # the file's name in messages
    quotechar: str = '"'  # None: quotes are characters like any other
    escapechar: str = None
    # The lines above the header (titles, comments), as text, and how many
    # lines come before the header, counted from the first line not blank.
    skipped_lines: list = field(default_factory=list)
    header_line: int = 0
    # The user's reading options: lines to skip from the file's first line,
    # instead of header_line; and whether the first row is a header.
    skip_lines: int = None
    header: bool = True

    @property
    def format(self):
        return "tsv" if self.delimiter == "\t" else "csv"

    @property
    def kind(self):
        return self.format.upper()

    @property
    def splittable(self):
        """Whether a row may start after any LF byte outside quotes, so the file can be read in parts."""
        return self.encoding in SPLITTABLE_ENCODINGS

    @property
    def quote_byte(self):
        """The byte whose count before an LF says whether the LF is inside a quoted cell; None with quoting off."""
        return self.quotechar.encode() if self.quotechar else None

    @property
    def dialect(self):
        """The csv module's reader options for the file."""
        if self.quotechar is None:
            return {"delimiter": self.delimiter, "quoting": csv.QUOTE_NONE}
        return {"delimiter": self.delimiter, "quotechar": self.quotechar, "escapechar": self.escapechar}

    def answer(self):
        """What the import's answer says of the file: its format, and how it differs from plain CSV."""
        answer = {"format": self.format}
        if self.quotechar is None:
            answer["quoting"] = "none"
        elif self.quotechar != '"':
            answer["quotechar"] = self.quotechar
        if self.escapechar:
            answer["escapechar"] = self.escapechar
        if self.skipped_lines:
            answer["skipped_lines"] = self.skipped_lines
        return answer

    def readers(self, path):
        """(sheet, reader) for each table the file gives: one, with no sheet name."""
        yield None, self.open(path)

    def open(self, path, start=0, end=None):
        return CSVReader(path, self, start, end)

    def row_start(self, window, quotes):
        """Just past the first LF in window outside a quoted cell, given the quote bytes before window; or None.

        A quote inside an unquoted cell can mislead the count: then the
        reader of the bytes before that LF finds its range ends mid-row.
        """
        start = 0
        while True:
            end = window.find(b"\n", start)
            if end == -1:
                return None
            quotes += window.count(self.quote_byte, start, end) if self.quote_byte else 0
            if quotes % 2 == 0:
                return end + 1
            start = end + 1


def _is_blank(row):
    return not any(cell.strip() for cell in row)


def detect_delimiter(sample, complete=True):
    """Choose the delimiter that splits the sample's rows most consistently.

    csv.Sniffer picks letters as delimiters for one-column files; this only
    considers , tab ; and |, and needs at least two columns in the header.
    A file whose header has one column is read one value per line, so an
    unquoted comma in a value does not split it. The sample is parsed as the
    import will parse the file, so CR-only line endings split rows too.
    """
    best, best_score = NO_DELIMITER, None
    for delimiter in DELIMITERS:
        try:
            rows = list(csv.reader(io.StringIO(sample, newline=""), delimiter=delimiter))
        except csv.Error:
            continue
        if not complete and len(rows) > 1:
            rows.pop()  # the sample may end mid-row
        widths = [len(row) for row in rows[:SNIFF_ROWS] if not _is_blank(row)]
        if not widths or widths[0] < 2:
            continue
        score = (sum(w == widths[0] for w in widths) / len(widths), widths[0])
        if best_score is None or score > best_score:
            best, best_score = delimiter, score
    return best


def _text_sample(path, encoding, skip_lines=None):
    """Up to SNIFF_CHARACTERS of text from the first non-blank line on, or from the first
    after skip_lines lines; whether that is all; and the skipped lines that are not blank."""
    with open(path, encoding=encoding, errors=_decode_errors(encoding), newline="") as f:
        skipped = [line.rstrip("\r\n") for line in itertools.islice(f, skip_lines or 0)]
        text = ""
        while not text.strip():  # blank lines before the header, however many
            text = f.read(SNIFF_CHARACTERS)
            if not text:
                return "", True, skipped
        first = len(text) - len(text.lstrip())
        text = text[max(text.rfind("\n", 0, first), text.rfind("\r", 0, first)) + 1 :]
        more = f.read(SNIFF_CHARACTERS)
        return text + more, not more, [line for line in skipped if line.strip()]


def plan_csv(path, encoding, source, options=NO_OPTIONS):
    """Decide how to read a CSV file in a known encoding: its delimiter, and, for a
    messy file, its quoting and the lines above its header. The user's options
    decide what they name, and the rest is decided around them."""
    try:
        sample, complete, skipped = _text_sample(path, encoding, options.skip_lines)
    except UnicodeDecodeError:
        raise ReadError(f"{source} is not valid {encoding} text.")
    if not sample.strip():
        if options.skip_lines:
            raise ReadError(f"{source} has no rows below the {options.skip_lines:,} lines skip_lines skips.")
        raise ReadError(f"File is empty: {source}")
    plan = CSVPlan(
        encoding, options.delimiter or detect_delimiter(sample, complete), source,
        quotechar=None if options.quoting == "none" else '"', skipped_lines=skipped,
        skip_lines=options.skip_lines, header=options.header is not False,
    )
    table = _SampleReading(sample, complete, plan.dialect).table()
    if table is not None and not table[1]:
        return plan  # rows of one width from the header on: most files
    return _messy_plan(plan, sample, complete, options) or plan
class _SampleReading:
    """The sample's rows as the csv module reads them with dialect (its reader options).

    rows leaves out a last row the sample may have cut off; spans gives the
    lines each row spans, as a range of indexes into lines. failed is True
    when the reading is an error (strict readings) or a quote never closes.
    """

    def __init__(self, sample, complete, dialect, strict=False):
        self.lines = io.StringIO(sample, newline="").readlines()
        self.rows, self.spans, self.failed = [], [], False
        reader = csv.reader(itertools.chain(self.lines, [CSVReader.END]), strict=strict, **dialect)
        start = 0
        try:
            for row in reader:
                self.rows.append(row)
                self.spans.append(range(start, reader.line_num))
                start = reader.line_num
        except csv.Error:
            self.failed = True
            return
        if self.rows[-1] != [CSVReader.END]:
            self.failed = complete  # a cut sample may end inside a long quoted cell
        del self.rows[-1], self.spans[-1]
        if not complete and self.rows:
            del self.rows[-1], self.spans[-1]

    def spans_lines(self):
        """Whether some row spans more than one line: quotes joined them."""
        return any(len(span) > 1 for span in self.spans)

    def table(self):
        """Where a table of one width starts, and the lines above it; None when there is none.

        The table is the longest run of rows of one width, at least two
        fields, that ends the sample: a header and at least one row. Every
        line above it must be one a table never starts with: a comment (#, !
        or %) of another width; words with no delimiter, as a title or a note
        is; or a line of one or two fields, two or more fewer than the table
        has, above a header that names a column of numbers. A comment of the
        table's width is above it too when the line after it is such a
        header, and a header may still name a column "#". A header one field
        short of its rows is a ragged file, not a title.
        Returns (header line, [lines above it]): (0, []) for a plain file.
        """
        if self.failed:
            return None
        kept = [i for i, row in enumerate(self.rows) if not _is_blank(row)]
        if len(kept) < 2:
            return None
        width, first = len(self.rows[kept[-1]]), len(kept) - 1
        while first > 0 and len(self.rows[kept[first - 1]]) == width:
            first -= 1
        # Comments as wide as the table, above a header that names a column of numbers.
        below = first
        while below < len(kept) - 1 and self.rows[kept[below]][0].lstrip().startswith(COMMENT_MARKS):
            below += 1
        if below < len(kept) - 1 and _header_names_a_number_column([self.rows[i] for i in kept[below:]]):
            first = below
        if width < 2 or first == len(kept) - 1:
            return None
        above = [self.rows[i] for i in kept[:first]]
        if any(len(self.spans[i]) > 1 for i in kept[:first]):
            return None
        if not all(_is_note(row, width) or len(row) <= min(2, width - 2) for row in above):
            return None
        table = [self.rows[i] for i in kept[first:]]
        if any(not _is_note(row, width) for row in above) and not _header_names_a_number_column(table):
            return None
        header = self.spans[kept[first]].start
        return header, [self.lines[self.spans[i].start].rstrip("\r\n") for i in kept[:first]]


# What comment lines start with: # in most files, ! and % in some tools' exports.
COMMENT_MARKS = ("#", "!", "%")


def _is_note(row, width):
    """A line above a table of width fields that no table starts with: a comment, or words
    with no delimiter in them. A comment of the table's width was found above its header."""
    if row[0].lstrip().startswith(COMMENT_MARKS):
        return True
    # Not a line of any delimiter read with another: each of its lines would be one field.
    return len(row) == 1 and " " in row[0].strip() and not any(d in row[0] for d in DELIMITERS)


def _header_names_a_number_column(table):
    """Whether the first row is a header: it names a column that holds numbers below it."""
    header, rows = table[0], table[1:]
    for i, name in enumerate(header):
        if name.strip() and column_type([name]) == _TEXT:
            if column_type([row[i] for row in rows]) in (_INTEGER, _REAL):
                return True
    return False


def _messy_plan(plan, sample, complete, options=NO_OPTIONS):
    """A plan for a file whose rows have one width only once lines above the header are
    skipped, or quotes are read another way; None when no reading gives them one.

    Quotes are read another way only on evidence the usual reading is wrong:
    quoting is turned off when the usual quotes join lines, never close, or
    close before text that is not a delimiter;
    ' quotes or \\" escapes are read only where the rows are consistent with
    them and with neither the usual quotes nor none.
    The delimiter, the quoting and the lines skipped that options give stay.
    """
    found = None
    delimiters = [plan.delimiter] + [d for d in DELIMITERS if d != plan.delimiter and not options.delimiter]
    for delimiter in delimiters:
        usual_fields = {"quotechar": None} if options.quoting == "none" else {}
        usual = _SampleReading(sample, complete, CSVPlan(delimiter=delimiter, **usual_fields).dialect)
        readings = [(0, usual_fields, usual)]
        if usual.table() is None and options.quoting is None:
            readings += _other_quotes(sample, complete, delimiter, usual)
        for rank, fields, reading in readings:
            table = reading.table()
            if table is None or not (rank or table[1]) or (options.skip_lines is not None and table[1]):
                continue
            size = (-rank, len(reading.rows), len(reading.rows[-1]))
            if found is None or size > found[0]:
                header_line, skipped = table
                found = size, CSVPlan(
                    plan.encoding, delimiter, plan.source, **fields,
                    skipped_lines=plan.skipped_lines + skipped, header_line=header_line,
                    skip_lines=plan.skip_lines, header=plan.header,
                )
    return found and found[1]


def _other_quotes(sample, complete, delimiter, usual):
    """(rank, CSVPlan fields, reading) for each other way of reading quotes the sample gives evidence for."""
    unquoted = _SampleReading(sample, complete, {"delimiter": delimiter, "quoting": csv.QUOTE_NONE})
    if usual.failed or usual.spans_lines() or _SampleReading(
        sample, complete, {"delimiter": delimiter}, strict=True
    ).failed:
        yield 1, {"quotechar": None}, unquoted
    if unquoted.table() is not None:
        return  # quotes of any kind change nothing that matters
    if "'" in sample:
        single = {"delimiter": delimiter, "quotechar": "'"}
        yield 2, {"quotechar": "'"}, _SampleReading(sample, complete, single, strict=True)
    # Only where every backslash escapes a quote or a backslash: elsewhere it would be lost.
    if '\\"' in sample and not re.search(r'\\[^"\\]', sample):
        escaped = {"delimiter": delimiter, "escapechar": "\\"}
        yield 3, {"escapechar": "\\"}, _SampleReading(sample, complete, escaped, strict=True)


def _allow_large_csv_fields():
    """Let the csv module read fields of any size, not only up to 128 KB.

    The limit is process-wide and has no per-reader form. Raising it is safe
    for any other code in the process: it changes no parse, only whether a
    field that large is an error.
    """
    if csv.field_size_limit() < CSV_FIELD_SIZE_LIMIT:
        csv.field_size_limit(CSV_FIELD_SIZE_LIMIT)


def _line_breaks(text):
    return text.count("\n") + text.count("\r") - text.count("\r\n")


class CSVReader:
    """Streams a CSV file, or its bytes from start to end, as a header and batches of rows.

    The header is the first non-blank row read from the file's start; it is
    known once the first batch has come, and a range that starts later has
    none. The csv module quietly ends a quoted field at the end of the file,
    so a marker line is read after the last one: it comes back as a row of
    its own when every quote closed, and inside the last cell when one did
    not. A range that stops short of the file's end stops at a line break;
    if that break was inside a quoted cell, the range ends mid-row.
    """

    END = "\uffffapp_support end of file\uffff"
    typed_cells = False  # every cell is text, as written; its type is learned from it

    def __init__(self, path, plan, start=0, end=None):
        _allow_large_csv_fields()
        self.path = path
        self.plan = plan
        self.start = start
        self.last = end is None
        self.header = []
        self.keys = None  # columns are known by their position
        self.guard, self.file = _open_text(path, plan, start, end, newline="")
        lines = itertools.chain(self.file, [self.END])
        self.reader = csv.reader(lines, **plan.dialect)
        self.lines_skipped = 0  # lines above the header, read past before the csv reader's

    def close(self):
        self.file.close()

    @property
    def bytes_read(self):
        return self.guard.tell()

    def batches(self, size=BATCH_ROWS):
        if self.start == 0:
            self._skip_lines_above_header()
            if self.plan.header:
                self.header = self._first_row()
        yield from self._batches(size)

    def _skip_lines_above_header(self):
        """Read past the blank lines at the start and the plan's lines above the header,
        or past the lines the user said to skip."""
        if self.plan.skip_lines is not None:
            for line in itertools.islice(self.file, self.plan.skip_lines):
                self.lines_skipped += 1
            if self.lines_skipped < self.plan.skip_lines and not self.last:
                raise _RangeEndsMidRow()
            return
        if not self.plan.header_line:
            return
        line = "\n"
        while line and not line.strip():
            line = next(self.file, "")
            self.lines_skipped += 1
        for _ in range(self.plan.header_line - 1):
            line = next(self.file, "")
            self.lines_skipped += 1
        if not line and not self.last:  # the range ends above the header
            raise _RangeEndsMidRow()

    def _first_row(self):
        for batch in self._batches(1):
            if not _is_blank(batch[0]):
                return batch[0]
        if not self.last:  # blank lines past the range's end
            raise _RangeEndsMidRow()
        raise ReadError(f"No header row found in {self.plan.source}: the file has no columns.")

    def _batches(self, size):
        while True:
            # islice straight over the csv reader: a generator around it
            # would cost a Python frame per row.
            with self._reading():
                batch = list(itertools.islice(self.reader, size))
            if not batch:
                return
            last = batch[-1]
            if last == [self.END]:
                batch.pop()
            elif last and last[-1].endswith(self.END):
                if not self.last:
                    raise _RangeEndsMidRow()
                raise self._unclosed_quote(last)
            if not all(batch):
                batch = [row for row in batch if row]  # blank lines
            if batch:
                yield batch

    def _line(self, number):
        """A line number within the range, as a line number of the file."""
        return number + (_lines_before(self.path, self.start) if self.start else self.lines_skipped)

    def _unclosed_quote(self, row):
        row[-1] = row[-1][: -len(self.END)]
        # The marker is a line of its own, and so is the last line of the file.
        lines = sum(map(_line_breaks, row)) + 1 + (not row[-1].endswith(("\n", "\r")))
        opened = self.reader.line_num - lines + 1 + sum(map(_line_breaks, row[:-1]))
        return ReadError(
            f"{self.plan.source} has a quote that is never closed: it opens on line "
            f"{self._line(opened)}. Close it, or remove it, and try again."
        )

    @contextlib.contextmanager
    def _reading(self):
        try:
            yield
        except csv.Error as e:
            raise ReadError(
                f"Could not read {self.plan.source} as CSV at line "
                f"{self._line(self.reader.line_num)}: {e}."
            )
        except UnicodeDecodeError:
            raise ReadError(
                f"{self.plan.source} is not valid {self.plan.encoding} text "
                f"(line {self._line(self.reader.line_num + 1)})."
            )


# ===== Readers: JSON =====
#
# A JSON file is never loaded whole. _JSONText keeps a buffer of its text and
# decodes one value at a time from it with the json module's C decoder: a row
# object, a key, a scalar. Containers around the rows are walked a character
# at a time. plan_json looks at the file first to learn its shape; for an
# object that holds arrays of objects, that look walks the whole file once.


# JSON is read in chunks of this many characters; a single value (a row)
# may be at most MAX_JSON_VALUE_CHARS. Chunks of 1M characters were no
# faster, and the peak RSS grew with the file: 87 MB at 1M rows, 90 at 5M.
JSON_CHUNK_CHARS = 256 * 1024
MAX_JSON_VALUE_CHARS = 32 * 1024 * 1024
# How many objects deep, inside the top-level object, an array of objects is looked for.
MAX_JSON_DEPTH = 3
JSON_SHAPES = (
    "an array of objects, one object per line (NDJSON), an object that holds an array of "
    "objects, or a GeoJSON FeatureCollection"
)
_JSON_DECODER = json.JSONDecoder()
_JSON_WHITESPACE = re.compile(r"[ \t\n\r]*")
# Where a row of a file of JSON objects may start: just after an LF that
# follows an item and comes before the next object. An LF is never inside a
# JSON string, so no quotes need counting.
_JSON_ROW_STARTS = {
    "array": re.compile(rb",[ \t\r]*\n(?=[ \t\r\n]*\{)"),
    "ndjson": re.compile(rb"\}[ \t\r]*\n(?=[ \t\r\n]*\{)"),
}
# GeoJSON features' own members, kept apart from keys in their properties.
_FEATURE_ID, _FEATURE_GEOMETRY = "\x00id", "\x00geometry"


@dataclass
class JSONPlan:
    """How to read a JSON file, decided from its start, or from one walk through it."""

    encoding: str = "utf-8-sig"
    shape: str = "array"  # "array", "ndjson", "nested" (inside objects) or "geojson"
    source: str = ""  # the file's name in messages
    json_path: list = None  # the keys that lead to a nested array of objects
    kind = "JSON"

    @property
    def format(self):
        return {"ndjson": "ndjson", "geojson": "geojson"}.get(self.shape, "json")

    quote_byte = None  # an LF is never inside a JSON string

    @property
    def splittable(self):
        """Whether a row may start after an LF byte, so the file can be read in parts."""
        return self.shape in _JSON_ROW_STARTS and self.encoding in SPLITTABLE_ENCODINGS

    def answer(self):
        answer = {"format": self.format}
        if self.shape == "nested":
            answer["json_path"] = ".".join(self.json_path)
        return answer

    def readers(self, path):
        yield None, self.open(path)

    def open(self, path, start=0, end=None):
        return JSONReader(path, self, start, end)

    def row_start(self, window, quotes):
        """Just past the first LF in window that follows an item and comes before an object; or None.

        An LF inside a nested array can look the same: then the reader of the
        bytes before it finds its range ends mid-row.
        """
        found = _JSON_ROW_STARTS[self.shape].search(window)
        return found.end() if found else None


def plan_json(path, encoding, source, json_path=None):
    """Decide the shape of a JSON file: from its first item for an array, else by walking it.

    json_path, the user's option, chooses among the arrays of objects an
    object holds, by the keys that lead to it joined with dots.
    """
    with contextlib.closing(_JSONText(path, JSONPlan(encoding, "array", source))) as text:
        try:
            if text.peek() == "[":
                text.pos += 1
                first = text.peek()
                if first != "{":
                    kind = _array_of_values(text)
                    if kind is None:
                        raise ReadError(f"{source} holds an empty JSON array: there is nothing to import.")
                    raise _not_a_table(source, f"an array of {kind}s")
                _refuse_json_path(json_path, source, "an array of objects")
                return JSONPlan(encoding, "array", source)
            found, top = [], {}
            _survey_object(text, [], found, top)
            after = text.peek()
            if after == "{":  # a second object: one per line
                _refuse_json_path(json_path, source, "one object per line (NDJSON)")
                return JSONPlan(encoding, "ndjson", source)
            if after:
                raise text.error("Extra data")
        except RecursionError:
            raise ReadError(f"{source} holds JSON nested too deeply to read.")
    if not found:
        raise _not_a_table(source, "an object with no array of objects in it")
    if json_path is not None:
        paths = {".".join(keys): keys for keys, _ in found}
        if json_path not in paths:
            raise ReadError(
                f"{source} has no array of objects at the json_path {_shorten(json_path)!r}. "
                f"It has them at {_listed(map(repr, paths))}."
            )
        json_path = paths[json_path]
    else:
        json_path, _ = max(found, key=lambda path_and_count: path_and_count[1])  # the first largest
    if top.get("type") == "FeatureCollection" and json_path == ["features"]:
        return JSONPlan(encoding, "geojson", source, json_path)
    return JSONPlan(encoding, "nested", source, json_path)


# How many items of an array of values are read to tell it from CSV lines.
JSON_VALUES_CHECKED = 1000


def _refuse_json_path(json_path, source, what):
    if json_path is not None:
        raise ReadError(f"{source} is {what} at its top level, so it has no json_path to choose. Leave it out.")


def _array_of_values(text):
    """The kind of the first item of the array whose "[" was just passed, None when it is empty,
    once its first items read as JSON; else raise _NotJSON, for CSV lines such as [248.128.0.120].
    """
    kind = None
    try:
        for count, _ in enumerate(text.items()):
            item = text.value()
            kind = kind or _json_kind(item)
            if count == JSON_VALUES_CHECKED:
                return kind
        if text.peek() == "":  # nothing after the array
            return kind
    except ReadError:
        if kind and text.peek() == "":  # JSON cut short
            return kind
    raise _NotJSON()


def _survey_object(text, path, found, top):
    """Walk the object that comes next, adding (keys, items) to found for each array of
    objects in it or in the objects within it, MAX_JSON_DEPTH objects deep at most.

    top gets the top-level object's scalar members, such as GeoJSON's "type".
    """
    for key in text.members():
        value = text.peek()
        if value == "{" and len(path) < MAX_JSON_DEPTH:
            _survey_object(text, path + [key], found, top)
        elif value == "[":
            count = _survey_array(text)
            if count:
                found.append((path + [key], count))
        elif value == "{":
            text.skip()
        else:
            scalar = text.value()
            if not path:
                top[key] = scalar


def _survey_array(text):
    """Pass the array that comes next; return how many items it has if they are objects, else 0."""
    text.take("[")
    objects, count = text.peek() == "{", 0
    for _ in text.items():
        text.skip()
        count += 1
    return count if objects else 0


def _json_kind(value):
    if isinstance(value, bool):
        return "boolean"
    names = {dict: "object", list: "array", str: "string", int: "number", float: "number"}
    return names.get(type(value), "null")


def _not_a_table(source, what):
    return ReadError(
        f"{source} holds {what}, which cannot be imported as a table. "
        f"JSON can be imported when it is {JSON_SHAPES}."
    )


class _JSONText:
    """The JSON text of a file, or of bytes start to end of it, taken a value at a time.

    The buffer holds text read and not yet passed; pos is where the next
    value starts. When a value may go on past the buffer's end, as much text
    again is read, so that a long value costs a few decodes, not one a chunk.
    In a range that stops short of the file's end, a value cut off by that
    end means the range ends mid-row.
    """

    def __init__(self, path, plan, start=0, end=None):
        self.path = path
        self.plan = plan
        self.start = start
        self.last = end is None
        self.guard, self.file = _open_text(path, plan, start, end)
        self.buffer, self.pos, self.eof = "", 0, False
        self.lines = 0  # line breaks passed before the buffer
        self.column = 0  # characters passed after the last of them
        self.passed = 0  # characters passed before the buffer
        self.after_comma = False  # in objects(): the last item was followed by a comma
        self.next_run = 0  # in objects(): where to look for a run of lines again

    def close(self):
        self.file.close()

    @property
    def bytes_read(self):
        return self.guard.tell()

    def peek(self):
        """The next character that is not whitespace, passing the whitespace; "" at the end."""
        while True:
            self.pos = _JSON_WHITESPACE.match(self.buffer, self.pos).end()
            if self.pos < len(self.buffer):
                return self.buffer[self.pos]
            if self.eof:
                return ""
            self._read_more()

    def take(self, char):
        if self.peek() != char:
            raise self.error(f"Expecting '{char}'")
        self.pos += 1

    def value(self):
        """The next value, decoded whole."""
        self.peek()
        while True:
            try:
                value, end = _JSON_DECODER.raw_decode(self.buffer, self.pos)
            except json.JSONDecodeError as e:
                cut = e.msg.startswith("Unterminated string") or len(self.buffer) - e.pos < 64
                if not (cut and not self.eof):
                    if cut and not self.last:
                        raise _RangeEndsMidRow()
                    raise self.error(e.msg, e.pos)
            else:
                # A number at the very end may go on in the text not read yet.
                if self.eof or len(self.buffer) - end >= 64:
                    self.pos = end
                    return value
            self._read_more()

    def items(self):
        """Count off the items of the array whose "[" was just passed, until its "]" is passed.

        The caller takes each item. In a range that stops short of the
        file's end, the items end where the text does, after a comma.
        """
        if self.peek() == "]":
            self.pos += 1
            return
        while True:
            yield
            if self._closed("]") or (not self.last and self.peek() == ""):
                return

    def objects(self, ndjson):
        """Yield every object of NDJSON text, or of the array whose "[" was just passed.

        Where the buffer holds whole lines of objects, they are decoded with
        one call; where that fails, one at a time, which also finds the
        place of any error. In a range that stops short of the file's end,
        the objects end where the text does.
        """
        while True:
            run = self._run_of_lines(ndjson)
            if run is not None:
                yield from run
                continue
            item = self._next_object(ndjson)
            if item is None:
                return
            yield item

    def _run_of_lines(self, ndjson):
        """The objects from pos to the last line break in the buffer that ends one, or None."""
        if self.passed + self.pos < self.next_run:
            return None
        cut = self._last_item_end(ndjson)
        if cut is None:  # look again once this buffer is passed
            self.next_run = self.passed + len(self.buffer)
            return None
        self.next_run = self.passed + cut
        body = self.buffer[self.pos : cut].strip()
        # A blank line gives ",,", which fails, and that run is read one object at a time.
        body = body.replace("\n", ",") if ndjson else body[:-1]
        try:
            items = json.loads("[" + body + "]")
        except (ValueError, RecursionError):
            return None
        if not all(type(item) is dict for item in items):
            return None
        self.pos, self.after_comma = cut, True
        return items

    def _last_item_end(self, ndjson):
        """Just past the last LF in the buffer that follows an item (and its comma in an array)
        and comes before an object; or None. Leaves the tail, which may be cut off, alone."""
        buffer, end = self.buffer, len(self.buffer) - (0 if self.eof else 64)
        cut = buffer.rfind("\n", self.pos, end)
        for _ in range(8):
            if cut <= self.pos:
                return None
            before, after = cut - 1, cut + 1
            while before > self.pos and buffer[before] in " \t\r":
                before -= 1
            while after < end and buffer[after] in " \t\r\n":
                after += 1
            if buffer[before] == ("}" if ndjson else ",") and buffer[after : after + 1] == "{":
                return cut + 1
            cut = buffer.rfind("\n", self.pos, cut)
        return None

    def _next_object(self, ndjson):
        """The next object, decoded on its own; None after the last."""
        start = self.peek()
        if ndjson and not start:
            return None
        if not ndjson and not self.after_comma and start == "]":
            self.pos += 1
            return None
        if not ndjson and self.after_comma and not start and not self.last:
            return None  # a range ends after a comma, where a row may start
        pos = self.pos
        item = self.value()
        if type(item) is not dict:
            raise self._not_an_object(pos, item, ndjson)
        if not ndjson:
            after = self.peek()
            self.after_comma = after == ","
            if self.after_comma:
                self.pos += 1
            elif after != "]":
                if not after and not self.last:
                    raise _RangeEndsMidRow()
                raise self.error("Expecting ',' delimiter")
        return item

    def _not_an_object(self, pos, item, ndjson):
        line, _ = self.line_and_column(pos)
        kind = _json_kind(item)
        kind = ("an " if kind[0] in "ao" else "a ") + kind
        where = f"line {line} holds {kind}" if ndjson else f"the array holds {kind} on line {line}"
        return ReadError(
            f"{self.plan.source}: {where}, not an object. Each row must be a JSON object."
        )

    def members(self):
        """Pass the object that comes next: yield each of its keys, before the caller takes its value."""
        self.take("{")
        if self.peek() == "}":
            self.pos += 1
            return
        while True:
            if self.peek() != '"':
                raise self.error("Expecting property name enclosed in double quotes")
            key = self.value()
            self.take(":")
            yield key
            if self._closed("}"):
                return

    def _closed(self, close):
        """Pass the comma after an item or member, or the close; whether it was the close."""
        after = self.peek()
        if after == close:
            self.pos += 1
            return True
        if after != ",":
            if after == "" and not self.last:
                raise _RangeEndsMidRow()  # a range that ends inside an item
            raise self.error("Expecting ',' delimiter")
        self.pos += 1
        return False

    def skip(self):
        """Pass the next value; arrays and objects item by item, so that a large one is never held."""
        start = self.peek()
        if start == "[":
            self.pos += 1
            for _ in self.items():
                self.skip()
        elif start == "{":
            for _ in self.members():
                self.skip()
        else:
            self.value()

    def error(self, message, pos=None):
        """A ReadError that names the line and column of pos (the next value by default)."""
        line, column = self.line_and_column(self.pos if pos is None else pos)
        return ReadError(
            f"{self.plan.source} is not valid JSON: line {line}, column {column}: {message}."
        )

    def line_and_column(self, pos):
        """Where the character at pos of the buffer is in the file, as json counts: for messages."""
        line_start = self.buffer.rfind("\n", 0, pos) + 1
        line = self.lines + self.buffer.count("\n", 0, pos) + 1
        column = pos - line_start + 1 + (self.column if line_start == 0 else 0)
        if self.start:
            line += _lines_before(self.path, self.start, lf_only=True)
        return line, column

    def _read_more(self):
        passed = self.buffer[: self.pos]
        self.passed += len(passed)
        newlines = passed.count("\n")
        self.lines += newlines
        self.column = len(passed) - passed.rfind("\n") - 1 if newlines else self.column + len(passed)
        rest = self.buffer[self.pos :]
        if len(rest) > MAX_JSON_VALUE_CHARS:
            raise ReadError(
                f"{self.plan.source} holds a single JSON value larger than "
                f"{_amount(MAX_JSON_VALUE_CHARS)}, at line {self.lines + 1}: "
                "rows that large cannot be imported."
            )
        chunk = self.file.read(max(JSON_CHUNK_CHARS, len(rest)))
        self.eof = not chunk
        self.buffer, self.pos = rest + chunk, 0


class JSONReader:
    """Streams the objects of a JSON file, or of its bytes from start to end, as batches of rows.

    keys are every key seen so far, in order of first appearance, and header
    their names; a row has a value for each key seen up to it. Values keep
    their JSON types: objects and arrays in them are stored as JSON text.
    """

    typed_cells = True

    def __init__(self, path, plan, start=0, end=None):
        self.plan = plan
        self.text = _JSONText(path, plan, start, end)
        self.first = start == 0
        self.header, self.keys = [], []
        self.columns = {}  # key: its column
        self.order = ()  # the keys, as the common row lists them

    def close(self):
        self.text.close()

    @property
    def bytes_read(self):
        return self.text.bytes_read

    def batches(self, size=BATCH_ROWS):
        objects = self._objects()
        if self.plan.shape == "geojson":
            objects = map(_feature, objects)
        try:
            while True:
                batch = [self._row(item) for item in itertools.islice(objects, size)]
                if not batch:
                    return
                yield batch
        except RecursionError:
            raise ReadError(f"{self.plan.source} holds JSON nested too deeply to read.")

    def _objects(self):
        text, shape = self.text, self.plan.shape
        if shape == "ndjson":
            yield from text.objects(ndjson=True)
            return
        if shape != "array":
            self._go_to(self.plan.json_path)
        elif self.first:
            text.take("[")
        yield from text.objects(ndjson=False)
        if shape == "array" and text.last and text.peek():
            raise text.error("Extra data")

    def _go_to(self, keys):
        """Pass the text up to the first item of the array at keys in the objects."""
        for depth, wanted in enumerate(keys):
            for key in self.text.members():
                if key == wanted:
                    break
                self.text.skip()
        self.text.take("[")

    def _row(self, item):
        if tuple(item) == self.order:  # the same keys as the columns, in their order
            return list(item.values())
        row = [None] * len(self.keys)
        for key, value in item.items():
            column = self.columns.get(key)
            if column is None:
                column = self._add(key)
                row.append(None)
            row[column] = value
        return row

    def _add(self, key):
        if len(self.keys) == MAX_COLUMNS:
            raise ReadError(
                f"{self.plan.source} has more than {MAX_COLUMNS:,} different keys; "
                f"SQLite tables hold at most {MAX_COLUMNS:,} columns."
            )
        self.columns[key] = len(self.keys)
        self.keys.append(key)
        self.header.append(key.lstrip("\x00") if key in (_FEATURE_ID, _FEATURE_GEOMETRY) else key)
        self.order = tuple(self.keys)
        return self.columns[key]


def _feature(feature):
    """A GeoJSON feature as a row: its id, its properties, and its geometry as JSON."""
    if type(feature) is not dict:
        return feature
    row = {_FEATURE_ID: feature["id"]} if "id" in feature else {}
    properties = feature.get("properties")
    if type(properties) is dict:
        row.update(properties)
    row[_FEATURE_GEOMETRY] = feature.get("geometry")
    return row


# ===== Readers: Excel workbooks =====
#
# An .xlsx file is a zip of XML parts. The workbook part names the sheets
# and the date system; the styles part says which cell styles show dates or
# times; the shared strings part holds most of the text, each cell naming a
# string by its index. Those three are read when the file is planned, and
# the shared strings are held in memory, up to MAX_SHARED_STRINGS_BYTES of
# XML. Each sheet is then streamed: runs of its rows are cut from the XML as
# it is unzipped, and read with patterns (see _SheetXML), so no sheet is
# ever held. The small parts are read with ElementTree.


# A worksheet's XML is read this many bytes at a time. A workbook's shared
# strings are held in memory, so its part holding them may unpack to at most
# MAX_SHARED_STRINGS_BYTES.
XLSX_CHUNK_BYTES = 1024 * 1024
MAX_SHARED_STRINGS_BYTES = 256 * 1024 * 1024
_OLE2_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
_ZIP_MAGIC = b"PK\x03\x04"
_XLSX_WORKSHEET = "/worksheet"  # the end of a worksheet relationship's type, in either namespace
# Excel's built-in number formats that show dates and times, by id.
_XLSX_DATE_FORMATS = {
    14: "date", 15: "date", 16: "date", 17: "date", 18: "time", 19: "time", 20: "time", 21: "time",
    22: "datetime", 27: "date", 28: "date", 29: "date", 30: "date", 31: "date", 32: "time",
    33: "time", 34: "time", 35: "time", 36: "date", 45: "time", 46: "elapsed", 47: "time",
    50: "date", 51: "date", 52: "date", 53: "date", 54: "date", 55: "date", 56: "date",
    57: "date", 58: "date",
}
# What a custom number format shows, once quoted text, [brackets], \escapes
# and the characters after _ and * are taken out of it.
_FORMAT_NOISE = re.compile(r'"[^"]*"|\[[^\]]*\]|\\.|_.|\*.')
_EXCEL_EPOCHS = {False: datetime(1899, 12, 30), True: datetime(1904, 1, 1)}


def _save_as_advice(source, what):
    return ReadError(
        f"{source} is {what}, which cannot be read here. Open it in Excel or LibreOffice, "
        "save it as an Excel workbook (.xlsx) without a password, or as CSV, and try again."
    )


@dataclass
class XLSXPlan:
    """How to read an Excel workbook: its sheets, date system and date styles, and its shared strings."""

    source: str = ""
    sheets: list = None  # [name, zip member] of each worksheet, in the workbook's order
    date1904: bool = False
    date_styles: dict = None  # cell style index: "date", "datetime", "time" or "elapsed"
    strings: list = field(default=None, repr=False)
    all_sheets: list = None  # every worksheet, when sheets holds only the one the user chose
    format = "xlsx"
    kind = "XLSX"
    splittable = False

    def answer(self):
        return {"format": self.format}

    def readers(self, path):
        for number, (name, _) in enumerate(self.sheets):
            yield name, XLSXReader(path, self, number)


def _is_workbook(path):
    """Whether the zip file at path is an Excel workbook: .xlsx, .xlsm, or .xlsb."""
    try:
        with zipfile.ZipFile(path) as archive:
            parts = _Parts(archive)
            if parts.find("xl/workbook.xml") or parts.find("xl/workbook.bin"):
                return True
            workbook = parts.target("", "/officeDocument")
    except (zipfile.BadZipFile, ReadError):
        return False
    # A Word or PowerPoint file has an office document too, in word/ or ppt/.
    return bool(workbook) and workbook.lower().startswith("xl/")


def plan_xlsx(path, source, unpacked_limit_mb=URL_SIZE_LIMIT_MB, sheet=None):
    """Read a workbook's own parts: its sheets, date system, date styles and shared strings.

    sheet, the user's option, keeps only the worksheet of that name.
    """
    strings_part = "xl/sharedStrings.xml"
    try:
        with zipfile.ZipFile(path) as archive:
            parts = _Parts(archive)
            workbook_part = (
                parts.target("", "/officeDocument") or parts.find("xl/workbook.xml")
                or parts.find("xl/workbook.bin") or "xl/workbook.xml"
            )
            if workbook_part.lower().endswith(".bin"):
                raise _save_as_advice(source, "an Excel binary workbook (.xlsb)")
            for member in archive.infolist():
                _check_unpacked_size(source, member, unpacked_limit_mb)
            workbook = _xml_part(archive, workbook_part, source)
            related = parts.relationships(workbook_part, source)
            sheets = all_sheets = _worksheets(workbook, related)
            if sheet is not None:
                sheets = _the_sheet(sheets, sheet, source)
            styles_part = parts.target(workbook_part, "/styles", related) or parts.find("xl/styles.xml")
            styles = _xml_part(archive, styles_part, source) if styles_part else None
            strings_part = parts.target(workbook_part, "/sharedStrings", related) or parts.find(strings_part)
            strings = []
            if strings_part:
                if archive.getinfo(strings_part).file_size > MAX_SHARED_STRINGS_BYTES:
                    raise ReadError(
                        f"{source} holds more text in its shared strings than can be read here "
                        f"({_amount(MAX_SHARED_STRINGS_BYTES)} of XML). Save each sheet "
                        "as CSV and import those instead."
                    )
                with archive.open(strings_part) as part:
                    strings = _shared_strings(part)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise ReadError(f"{source} is a damaged Excel workbook ({e}).")
    except _DamagedPart:
        raise _damaged_part(source, strings_part)
    properties = _child(workbook, "workbookPr")
    date1904 = properties is not None and properties.get("date1904", "0") in ("1", "true")
    return XLSXPlan(source, sheets, date1904, _date_styles(styles), strings, all_sheets)


def _the_sheet(sheets, name, source):
    """[[name, zip member]] of the worksheet called name."""
    chosen = [pair for pair in sheets if pair[0] == name]
    if not sheets:
        raise ReadError(f"{source} has no worksheets, so it has no sheet named {_shorten(name)!r}.")
    if not chosen:
        raise ReadError(
            f"{source} has no worksheet named {_shorten(name)!r}. "
            f"Its worksheets are {_listed(repr(pair[0]) for pair in sheets)}."
        )
    return chosen


class _Parts:
    """The parts of a workbook's zip, found as Excel finds them: through their relationships,
    whatever their names, and by names in any case."""

    def __init__(self, archive):
        self.archive = archive
        self.names = {name.lower(): name for name in archive.namelist()}

    def find(self, name):
        """The zip member called name, in any case; None when there is none."""
        return self.names.get(name.lower())

    def relationships(self, part, source=None):
        """(type, id, zip member) of each relationship of part ("" for the package), targets resolved."""
        folder, file = posixpath.split(part)
        rels = self.find(posixpath.join(folder, "_rels", file + ".rels"))
        if rels is None:
            return []
        found = []
        for relationship in _xml_part(self.archive, rels, source or rels):
            target = relationship.get("Target", "")
            if relationship.get("TargetMode") == "External" or not target:
                continue
            # An absolute target starts at the package's root; a relative one beside the part.
            name = target[1:] if target.startswith("/") else posixpath.join(folder, target)
            member = self.find(posixpath.normpath(name))
            if member:
                found.append((relationship.get("Type", ""), relationship.get("Id"), member))
        return found

    def target(self, part, kind, related=None):
        """The first part that part relates to by a relationship whose type ends with kind."""
        for relation, _, member in related if related is not None else self.relationships(part):
            if relation.endswith(kind):
                return member
        return None


def _damaged_part(source, member):
    return ReadError(
        f"{source} is a damaged Excel workbook: {member} is cut short or is not a workbook's "
        "XML, so none of its sheets were imported."
    )


def _shared_strings(part):
    """The workbook's shared strings, in order: cells name them by their index.

    A plain item, one <t> of text without CRs, is decoded right here; others,
    rich text in runs or with phonetic runs, go through _SheetXML.string.
    """
    runs = _xml_runs(part, "sst", "si")
    prefix = next(runs, None)
    if prefix is None:
        return []
    xml = _SheetXML(prefix)
    p = re.escape(prefix)
    items = re.compile(
        rb"<" + p + rb"si><" + p + rb"t(?: [^>]*|)>([^<\r]*)</" + p + rb"t></" + p + rb"si>"
        rb"|<" + p + rb"si\b[^>]*?(?:/>|>(.*?)</" + p + rb"si>)", re.S,
    )
    strings = []
    for run in runs:
        escaped = b"&" in run or b"_x" in run  # entities or _xHHHH_, rare: looked for in the item only then
        strings += [
            xml.string(rich) if rich
            else _xml_text(plain) if escaped and (b"&" in plain or b"_x" in plain)
            else plain.decode("utf-8", "replace")
            for plain, rich in items.findall(run)
        ]
    return strings


def _local(tag):
    """A tag without its namespace: the same in transitional and strict OOXML."""
    return tag.rpartition("}")[2]


def _child(element, name):
    return next((child for child in element if _local(child.tag) == name), None)


def _children(element, name):
    """The children of the child called name, or none when there is no such child."""
    child = _child(element, name) if element is not None else None
    return list(child) if child is not None else []


def _xml_part(archive, name, source):
    try:
        with archive.open(name) as part:
            return ElementTree.parse(part).getroot()
    except KeyError:
        raise ReadError(f"{source} is a damaged Excel workbook: it has no {name}.")
    except ElementTree.ParseError as e:
        raise ReadError(f"{source} is a damaged Excel workbook: {name} is not valid XML ({e}).")


def _worksheets(workbook, related):
    """[name, zip member] of each worksheet, in the workbook's order; chart sheets are left out."""
    targets = {id_: member for kind, id_, member in related if kind.endswith(_XLSX_WORKSHEET)}
    sheets = []
    for sheet in _children(workbook, "sheets"):
        relation = next((v for k, v in sheet.attrib.items() if _local(k) == "id"), None)
        if relation in targets:
            sheets.append([sheet.get("name", f"Sheet{len(sheets) + 1}"), targets[relation]])
    return sheets


def _date_styles(styles):
    """The cell styles whose number format shows a date or a time, and which."""
    custom = {}
    for number_format in _children(styles, "numFmts"):
        custom[int(number_format.get("numFmtId", -1))] = number_format.get("formatCode", "")
    kinds = {}
    for index, style in enumerate(_children(styles, "cellXfs")):
        number_format = int(style.get("numFmtId", 0))
        if number_format in custom:
            kind = _format_kind(custom[number_format])
        else:
            kind = _XLSX_DATE_FORMATS.get(number_format)
        if kind:
            kinds[str(index)] = kind  # as a cell's s attribute names it
    return kinds


# [h], [mm] or [ss]: time elapsed; other brackets hold colours, conditions, locales.
_ELAPSED = re.compile(r"\[(?:h+|m+|s+)\]", re.IGNORECASE)


def _format_kind(code):
    """What a custom number format shows: "date", "datetime", "time", "elapsed", or None for a number."""
    first = code.split(";")[0]
    if _ELAPSED.search(first):
        return "elapsed"
    shown = _FORMAT_NOISE.sub("", first).lower()
    has_date = "y" in shown or "d" in shown
    has_time = "h" in shown or "s" in shown
    if "m" in shown and not has_date and not has_time:
        has_date = True  # "mmm" alone is a month
    if has_date and has_time:
        return "datetime"
    return "date" if has_date else "time" if has_time else None


def _excel_date(serial, kind, date1904):
    """A date serial as ISO 8601 text, as a cell of this kind shows it; None if it is no date."""
    if serial < 0:
        return None  # Excel shows no date for it either
    if kind == "elapsed":
        seconds = round(serial * 86400)
        return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
    if not date1904 and 60 <= serial < 61 and kind != "time":
        # Excel's 1900 system has a 29 February 1900 that never was.
        when = "1900-02-29"
        return when if kind == "date" else f"{when} {_excel_time(serial)}"
    if not date1904 and serial < 60:
        serial += 1  # days before the fictitious one are counted from 31 December 1899
    try:
        moment = _EXCEL_EPOCHS[date1904] + timedelta(seconds=round(serial * 86400))
    except (OverflowError, ValueError):
        return None
    if kind == "time":
        return moment.strftime("%H:%M:%S")
    if kind == "date":
        return moment.date().isoformat()
    return moment.isoformat(" ")


def _excel_time(serial):
    seconds = round((serial % 1) * 86400) % 86400
    return f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class _DamagedPart(Exception):
    """A part of a workbook that is cut short, or has no container of its items."""


def _xml_runs(part, container, name):
    """The XML of the elements called name in the container element of a large part, a run at a time.

    Yields the namespace prefix the part writes its elements with (b"" for
    none), then runs of whole items, as bytes. The part is cut after an
    item's end tag, which can never be inside text, where "<" is escaped.
    """
    start = re.compile(rb"<([\w.-]+:)?" + name.encode() + rb"[\s/>]")
    buffer = b""
    while True:
        chunk = part.read(XLSX_CHUNK_BYTES)
        buffer += chunk
        first = start.search(buffer)
        if first:
            break
        if not chunk:
            # No items: an empty container, <sheetData/> or <sheetData></sheetData>, or damage.
            empty = re.search(rb"<([\w.-]+:)?" + container.encode() + rb"(\s[^>]*)?(/>|>\s*</\1?" + container.encode() + rb">)", buffer)
            if not empty:
                raise _DamagedPart()
            return
    prefix = first.group(1) or b""
    yield prefix
    item_end = b"</" + prefix + name.encode() + b">"
    container_end = b"</" + prefix + container.encode() + b">"
    buffer = buffer[first.start() :]
    while True:
        chunk = part.read(XLSX_CHUNK_BYTES)
        buffer += chunk
        if chunk:
            cut = buffer.rfind(item_end)
            if cut == -1:
                continue
            cut += len(item_end)
        else:
            cut = buffer.find(container_end)
            if cut == -1:
                raise _DamagedPart()  # cut short: the rows would be only some of them
        yield buffer[:cut]
        buffer = buffer[cut:]
        if not chunk:
            return


class _SheetXML:
    """The patterns that pick a worksheet's rows, cells, values and texts out of its XML.

    Cutting XML with patterns is a shortcut, for speed: a sheet of 1M rows
    of 9 cells, as LibreOffice writes it, took 46 s to import with
    ElementTree, and about 20 s with these patterns alone; runs of plain
    rows now take the faster path of _SheetColumns (10 s in all), and the
    rest these patterns. It relies on what every program that writes .xlsx
    does (no comments among the cells); test_app_support.py checks it
    against ElementTree on generated sheets.
    """

    def __init__(self, prefix):
        p = re.escape(prefix)
        cdata = rb"<!\[CDATA\[.*?\]\]>"
        self.row = re.compile(rb"<" + p + rb"row\b([^>]*?)(?:/>|>(.*?)</" + p + rb"row>)", re.S)
        # A cell, its r, s and t in the order programs write them, any other
        # attributes, and its content.
        self.cell = re.compile(
            rb"<" + p + rb"c\b(?:\s+r=\"([A-Z]*)[0-9]*\")?(?:\s+s=\"([0-9]*)\")?(?:\s+t=\"(\w*)\")?"
            rb"([^>]*?)(?:/>|>(.*?)</" + p + rb"c>)", re.S,
        )
        self.value = re.compile(rb"<" + p + rb"v(?:\s[^>]*)?>((?:[^<]|" + cdata + rb")*)</", re.S)
        self.text = re.compile(rb"<" + p + rb"t(?:\s[^>]*)?>((?:[^<]|" + cdata + rb")*)</" + p + rb"t>", re.S)
        self.phonetic = re.compile(rb"<" + p + rb"rPh\b.*?</" + p + rb"rPh>", re.S)

        self.shared = re.compile(rb"<" + p + rb"si\b[^>]*?(?:/>|>(.*?)</" + p + rb"si>)", re.S)
        self.value_start = b"<" + prefix + b"v>"

    def string(self, xml):
        """The text of a shared or inline string: its runs joined, never its phonetic ones."""
        if b"rPh" in xml:
            xml = self.phonetic.sub(b"", xml)
        return "".join(_xml_text(text) for text in self.text.findall(xml))


_XML_ATTRIBUTE = re.compile(rb"""\s([\w.:-]+)\s*=\s*(?:"([^"]*)"|'([^']*)')""")
_XML_ESCAPE = re.compile(r"_x([0-9A-Fa-f]{4})_")
_CDATA = re.compile(rb"<!\[CDATA\[(.*?)\]\]>", re.S)


def _xml_text(raw):
    """XML text as a string, as an XML parser gives it: line ends as LF, entities replaced,
    CDATA as it is; then OOXML's _xHHHH_ escapes of control characters replaced."""
    if b"\r" in raw:  # a literal CR LF or CR; &#13; stays a CR
        raw = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    if b"<![CDATA[" in raw:
        pieces = _CDATA.split(raw)  # text, CDATA, text, ...
        text = "".join(
            piece.decode("utf-8", "replace") if odd else _unescaped(piece)
            for odd, piece in zip(itertools.cycle((False, True)), pieces)
        )
    else:
        text = _unescaped(raw)
    if "_x" in text:
        text = _XML_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), text)
    return text


def _unescaped(raw):
    text = raw.decode("utf-8", "replace")
    return html.unescape(text) if "&" in text else text


def _attributes(xml):
    """The attributes of a start tag's XML, by their names without a prefix."""
    return {name.rpartition(b":")[2]: double or single for name, double, single in _XML_ATTRIBUTE.findall(xml)}


def _check_unpacked_size(source, member, limit_mb):
    """Refuse a part that would unpack past limit_mb, or too much larger than it is packed: a zip bomb."""
    if member.file_size > limit_mb * 1024 * 1024:
        raise ReadError(
            f"{source} holds a part that unpacks to more than {limit_mb:g} MB "
            f"({member.filename}), more than can be read here. The app_support setting "
            "url_size_limit_mb changes this limit."
        )
    if _looks_like_a_bomb(member.file_size, member.compress_size):
        raise ReadError(
            f"{source} holds a part that expands more than {MAX_EXPANSION_RATIO} times "
            f"({member.filename}), which no real workbook does, so it looks like a zip bomb."
        )


class _CountedFile(io.FileIO):
    """A file that counts the bytes read from it: a workbook's packed bytes, for progress."""

    count = 0

    def read(self, size=-1):
        data = super().read(size)
        self.count += len(data)
        return data


_ROW_NUMBER = re.compile(rb"""\sr\s*=\s*["']([0-9]+)""")
_COLUMNS = {}  # a cell reference's letters, such as b"AB": its column, counted from 0


def _column_number(letters):
    """The column a cell reference's letters name, counted from 0, learned once."""
    number = 0
    for letter in letters.upper():
        number = number * 26 + letter - 64
    _COLUMNS[letters] = number - 1
    return number - 1


def _xlsx_number(text):
    """A number cell's value: an int when it is whole (Excel stores every number as a double)."""
    if b"." not in text and b"E" not in text and b"e" not in text:
        return int(text)
    number = float(text)
    return int(number) if number.is_integer() and -(2**63) <= number < 2**63 else number


# Most runs of rows, as programs write them, hold only numbers, shared
# strings and empty cells, each as <c r="B7" s="1" t="s"><v>12</v></c> with
# its attributes in this order. _SheetColumns reads such a run at once: one
# pattern matches a whole row, with a group for each column's number and
# one for its shared string, and re.split gives every row's groups in one
# flat list, so that a column is a slice of it. Numbers are converted by
# json.loads, shared strings looked up by map, and rows zipped from the
# columns a batch at a time, all in C. A run with any other cell, or a
# row without r, is read cell by cell by _cells, as before.
XLSX_FAST_MAX_COLUMNS = 128  # wider rows are read cell by cell
XLSX_FAST_RETRY_RUNS = 16  # runs read cell by cell, at most, before trying _SheetColumns again
_WHOLE_FRACTION = re.compile(rb"\.0*(?![0-9])")  # a float json.loads gives, perhaps a whole one
_CELL_LETTERS = re.compile(rb'<(?:[\w.-]+:)?c r="([A-Z]+)')


def _column_letters(number):
    """The letters of column number, counted from 0: b"A", b"B", ..., b"AA"."""
    letters = b""
    number += 1
    while number:
        number, rest = divmod(number - 1, 26)
        letters = bytes([65 + rest]) + letters
    return letters


class _SheetColumns:
    """Reads a run of rows whose cells are all numbers, shared strings or empty, column by column."""

    def __init__(self, prefix, strings, date_styles, value):
        self.prefix, self.strings, self.dates, self.value = prefix, strings, date_styles, value
        self.width, self.pattern = 0, None

    def _compile(self, width):
        """The pattern of a row of such cells in columns A to width. Its groups: the row's number,
        then for each column its style (if some styles show dates), number and shared string.

        Each optional part is a branch with an empty alternative, not a ?: a ?
        over groups makes the regex engine save every group's place at each cell.
        """
        p = re.escape(self.prefix)
        style = rb'(?: s="([0-9]+)"|)' if self.dates else rb'(?: s="[0-9]+"|)'
        cells = b"".join(
            rb"(?:<" + p + rb'c r="' + _column_letters(column) + rb'[0-9]*"' + style
            + rb'(?:(?: t="n"|)><' + p + rb"v>([-+.0-9Ee]+)</" + p + rb"v></" + p + rb"c>"
            + rb'| t="s"><' + p + rb"v>([0-9]+)</" + p + rb"v></" + p + rb"c>"
            + rb'|(?: t="\w+"|)(?:/>|></' + p + rb"c>))|)"
            for column in range(width)
        )
        self.pattern = re.compile(rb"<" + p + rb'row r="([0-9]+)"[^>]*(?:/>|>' + cells + rb"</" + p + rb"row>)")
        self.width = width

    def read(self, run):
        """(The numbers of the run's rows, the values of each column), or None when a row
        has other cells or names a shared string there is not."""
        while True:
            if self.pattern is not None:
                # The text before each row, then each row's groups, None for any not matched.
                found = self.pattern.split(run)
                step = self.pattern.groups + 1
                between = found[::step]
                if not any(between) or b"".join(between).isspace():
                    break  # every row matched
            # Perhaps cells further right than the pattern reads.
            width = max(map(_column_number, set(_CELL_LETTERS.findall(run))), default=-1) + 1
            if width <= self.width or width > XLSX_FAST_MAX_COLUMNS:
                return None
            self._compile(width)
        count = len(between) - 1
        numbers = list(map(int, found[1::step]))
        columns = []
        per_column = 3 if self.dates else 2
        for start in range(2, step, per_column):
            styles = found[start::step] if self.dates else None
            texts, indexes = found[start + per_column - 2 :: step], found[start + per_column - 1 :: step]
            no_numbers, no_strings = texts.count(None) == count, indexes.count(None) == count
            if no_numbers and no_strings:
                columns.append(None)
                continue
            if no_numbers:
                values = None
            elif styles is not None and not self.dates.keys().isdisjoint(styles):
                values = [self._date_or_number(style or b"", text) if text else None for style, text in zip(styles, texts)]
            else:
                values = self._numbers(texts)
            try:
                if no_strings:
                    columns.append(values)
                elif no_numbers and None not in indexes:
                    columns.append(list(map(self.strings.__getitem__, map(int, indexes))))
                elif no_numbers:
                    columns.append([self.strings[int(index)] if index else None for index in indexes])
                else:
                    columns.append([self.strings[int(index)] if index else value for index, value in zip(indexes, values)])
            except IndexError:
                return None  # read cell by cell, which says which string is missing
        while columns and columns[-1] is None:
            columns.pop()
        return numbers, [[None] * count if column is None else column for column in columns]

    def _numbers(self, texts):
        """The values of number cells' texts, None for None, as _cells gives them: all at once by
        json.loads, or one by one when they are not all JSON numbers (007, +1, 1.)."""
        joined = b",".join([text or b"null" for text in texts] if None in texts else texts)
        try:
            numbers = json.loads(b"[" + joined + b"]")
        except ValueError:
            numbers = None
        if numbers is None or len(numbers) != len(texts):
            return [self._date_or_number(b"", text) if text else None for text in texts]
        if b"e" in joined or b"E" in joined or (b"." in joined and _WHOLE_FRACTION.search(joined)):
            numbers = [
                int(n) if n.__class__ is float and n.is_integer() and -(2**63) <= n < 2**63 else n for n in numbers
            ]
        return numbers

    def _date_or_number(self, style, text):
        """A number cell's value, as _cells reads it."""
        if text.isdigit() and style not in self.dates:
            return int(text)
        return self.value(b"", style, text)


class XLSXReader:
    """Streams one worksheet of a workbook as a header and batches of rows.

    Each cell goes where its reference says, a gap being None. The header
    is the first row that is not empty. Empty rows after the last that is
    not, and empty cells after the last of each row, are left out.
    """

    typed_cells = True
    keys = None

    def __init__(self, path, plan, number):
        self.plan = plan
        self.name, self.member = plan.sheets[number]
        self.header = []
        self.file = _CountedFile(path)
        self.archive = zipfile.ZipFile(self.file)
        self.part = self.archive.open(self.member)
        self.start = self.file.count
        self.date_styles = {style.encode(): kind for style, kind in plan.date_styles.items()}

    def close(self):
        self.part.close()
        self.archive.close()
        self.file.close()

    @property
    def bytes_read(self):
        return self.file.count - self.start

    def batches(self, size=BATCH_ROWS):
        """As before, row by row; but lists of rows with no empty one among them go in by slices."""
        lists = self._row_lists()
        for rows in lists:
            for i, row in enumerate(rows):
                if row:
                    self.header = [_header_name(value) for value in row]
                    lists = itertools.chain([rows[i + 1 :]], lists)
                    break
            else:
                continue
            break
        batch, empty = [], 0
        for rows in lists:
            if not empty and [] not in rows:
                start = 0
                while start < len(rows):
                    end = start + size - len(batch)
                    batch += rows[start:end]
                    start = end
                    if len(batch) >= size:
                        yield batch
                        batch = []
                continue
            for row in rows:
                if not row:
                    empty += 1  # kept only if a row that is not empty follows
                    continue
                if empty:
                    batch.extend([] for _ in range(empty))
                    empty = 0
                batch.append(row)
                if len(batch) >= size:
                    yield batch
                    batch = []
        if batch:
            yield batch

    def _rows(self):
        """Each row of the sheet, from the first, as its values; rows the sheet leaves out are []."""
        return itertools.chain.from_iterable(self._row_lists())

    def _row_lists(self):
        """The rows of the sheet, in lists of at most BATCH_ROWS."""
        try:
            yield from self._row_lists_of_part()
        except (zipfile.BadZipFile, zlib.error, EOFError) as e:
            raise ReadError(f"{self.plan.source} is a damaged Excel workbook ({e}).")
        except _DamagedPart:
            raise _damaged_part(self.plan.source, self.member)

    def _row_lists_of_part(self):
        runs = _xml_runs(self.part, "sheetData", "row")
        prefix = next(runs, None)
        if prefix is None:
            return
        xml, expected = _SheetXML(prefix), 1
        by_column = _SheetColumns(prefix, self.plan.strings, self.date_styles, self._value)
        skip = failures = 0
        for run in runs:
            read = None
            if skip:
                skip -= 1
            else:
                read = by_column.read(run)
                # After runs with other cells, try again less and less often.
                failures = 0 if read else min(failures + 1, 5)
                skip = min(2**failures - 1, XLSX_FAST_RETRY_RUNS)
            if read is None:
                rows = []
                for attributes, content in xml.row.findall(run):
                    number = _ROW_NUMBER.search(attributes)
                    number = int(number.group(1)) if number else expected
                    rows.extend([] for _ in range(expected, number))
                    expected = number + 1
                    rows.append(self._cells(xml, content) if content else [])
                yield rows
                continue
            numbers, columns = read
            count = len(numbers)
            in_order = count and numbers[0] == expected and numbers == list(range(expected, expected + count))
            for start in range(0, count, BATCH_ROWS):
                end = start + BATCH_ROWS
                if columns:
                    rows = list(map(list, zip(*[column[start:end] for column in columns])))
                    if None in columns[-1][start:end]:  # rows whose last cells are empty end at their last value
                        for row in rows:
                            while row and row[-1] is None:
                                row.pop()
                else:
                    rows = [[] for _ in range(len(numbers[start:end]))]
                if in_order:
                    expected = numbers[start:end][-1] + 1
                else:  # rows left out, or numbered out of order
                    spaced = []
                    for number, row in zip(numbers[start:end], rows):
                        spaced.extend([] for _ in range(expected, number))
                        expected = number + 1
                        spaced.append(row)
                    rows = spaced
                yield rows

    def _cells(self, xml, content):
        """A row's values, each at the column its reference names. The common cells, numbers
        and shared strings, are read right here: this loop runs for every cell of a sheet."""
        cells, strings, dates = [], self.plan.strings, self.date_styles
        value_start, skip = xml.value_start, len(xml.value_start)
        column = -1
        for letters, style, kind, others, inner in xml.cell.findall(content):
            if others and (b"r=" in others or b"s=" in others or b"t=" in others):
                # Attributes in another order than r, s, t: rare, so read slowly.
                attributes = _attributes(others)
                letters = letters or attributes.get(b"r", b"").rstrip(b"0123456789")
                style, kind = style or attributes.get(b"s", b""), kind or attributes.get(b"t", b"")
            if letters:
                column = _COLUMNS.get(letters)
                if column is None:
                    column = _column_number(letters)
            else:
                column += 1  # a cell without a reference follows the cell before it
            if not inner:
                continue  # a cell with a style and no value
            if kind == b"inlineStr":
                value = xml.string(inner)
            else:
                if inner.startswith(value_start) and not inner.startswith(b"<![CDATA[", skip):
                    text = inner[skip : inner.index(b"<", skip)]
                else:  # a formula first, the value's tag has attributes, or CDATA
                    found = xml.value.search(inner)
                    text = found.group(1) if found else b""
                    if b"<![CDATA[" in text and kind != b"str":
                        text = _CDATA.sub(rb"\1", text)
                if kind == b"s" and text:
                    try:
                        value = strings[int(text)]
                    except (IndexError, ValueError):
                        raise self._no_such_string(text)
                elif (not kind or kind == b"n") and text.isdigit() and style not in dates:
                    value = int(text)
                else:
                    value = self._value(kind, style, text)
                    if value is None:
                        continue
            if column == len(cells):
                cells.append(value)
            elif column > len(cells):
                cells.extend([None] * (column - len(cells)))
                cells.append(value)
            else:
                cells[column] = value
        return cells

    def _no_such_string(self, text):
        return ReadError(
            f"{self.plan.source} is a damaged Excel workbook: sheet {self.name} names "
            f"shared string {text.decode('utf-8', 'replace')}, which it does not have."
        )

    def _value(self, kind, style, text):
        """A cell's value, from its type (t), its style (s) and the text of its value (v)."""
        if not text or kind == b"e":  # no value, or an error such as #N/A
            return None
        if kind == b"" or kind == b"n":
            try:
                shown = self.date_styles.get(style)
                date = shown and _excel_date(float(text), shown, self.plan.date1904)
                return date or _xlsx_number(text)
            except ValueError:
                return _xml_text(text)  # not a number after all: kept as it is written
        if kind == b"b":
            return text == b"1"
        return _xml_text(text)  # "str", a formula's text, and "d", a date already written as ISO 8601


def _header_name(value):
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    return "" if value is None else str(value)


# ===== Column names and types =====
#
# How a column's type is learned: column_type for text cells,
# typed_column_type for typed ones.


# Longer digit strings overflow SQLite's 64-bit integers.
MAX_INTEGER_DIGITS = 18
# A double holds 17 significant decimal digits; a decimal with more stays TEXT.
MAX_REAL_DIGITS = 17


def clean_headers(names, width):
    """Unique, non-empty NFC column names: blanks become column_N, repeats a_2, a_3."""
    names = list(names) + [""] * (width - len(names))
    result, seen = [], set()
    for position, name in enumerate(names, 1):
        # SQLite cannot take a NUL in SQL text, which names go into.
        base = unicodedata.normalize("NFC", (name or "").replace("\x00", "")).strip() or f"column_{position}"
        candidate, suffix = base, 2
        while candidate.lower() in seen:
            candidate = f"{base}_{suffix}"
            suffix += 1
        seen.add(candidate.lower())
        result.append(candidate)
    return result


_INTEGER, _REAL, _TEXT = "INTEGER", "REAL", "TEXT"
_RANK = {None: 0, _INTEGER: 1, _REAL: 2, _TEXT: 3}
_DIGITS_AS_NINES = bytes.maketrans(b"012345678", b"999999999")
_DIGITS_AS_ONES = bytes.maketrans(b"23456789", b"11111111")
_DIGITS_AND_DOT_AS_NINES = bytes.maketrans(b"012345678.", b"9999999999")
# Values with more significant digits than a double holds have at least 18 digits.
_LONG_DECIMAL = b"9" * (MAX_REAL_DIGITS + 1)
# A zero before another digit at the start of a value, seen with every other digit a 1.
_LEADING_ZERO = re.compile(b"\n0[01]")
_LONE_SIGN = re.compile(b"-\n")
_NEGATIVE_ZERO = re.compile(b"\n-0\n")
_LONE_POINT = re.compile(b"\n\\.\n")


def column_type(values):
    """The narrowest of INTEGER, REAL, TEXT that holds every text value exactly.

    Returns None when every value is empty or None. Works on the whole batch
    at once with C-speed string operations, because a check per value costs
    more than the insert; test_app_support.py checks it against a plain
    per-value rule on generated columns. Leading zeros, a sign or exponent
    SQLite would rewrite, integers too long for 64 bits and decimals with
    more significant digits than a double holds make it TEXT.
    """
    return _column_type(values)[0]


def _column_type(values, whole=0, places=0):
    """column_type(values), and the most digits before the point and after it in them, at least
    whole and places, the most counted in the batches before of the same column.

    The digits are counted in batches of numbers only, by searches at C
    speed (two for a batch no longer than those before it), and spare the
    per-value checks for long numbers in nearly every batch.
    """
    try:
        joined = "\n" + "\n".join(values) + "\n"
    except TypeError:  # None, past the end of a short row: rare, so not looked for first
        values = [v for v in values if v is not None]
        if not values:
            return None, whole, places
        joined = "\n" + "\n".join(values) + "\n"
    if len(joined) == len(values) + 1:
        return None, whole, places
    try:
        b = joined.encode("ascii")
    except UnicodeEncodeError:
        return _TEXT, whole, places
    if b.translate(None, b"0123456789-.\n") or b.count(b"\n") != len(values) + 1:
        return _TEXT, whole, places
    # Without signs, with every digit but 0 a 1.
    ones = b.translate(_DIGITS_AS_ONES, b"-")
    # A sign only at the start of a value, never alone.
    signs = len(b) - len(ones)
    if signs and (b.count(b"\n-") != signs or _LONE_SIGN.search(b)):
        return _TEXT, whole, places
    # No zero before another digit at the start of a value ("007", "-007"), and no "-0".
    if _LEADING_ZERO.search(ones) or (signs and _NEGATIVE_ZERO.search(b)):
        return _TEXT, whole, places
    # Every digit a 9, without signs: each value's digits before the point follow a newline.
    nines = ones.translate(_DIGITS_AS_NINES)
    while _contains(nines, b"\n" + b"9" * (whole + 1)):
        whole += 1
    if whole > MAX_INTEGER_DIGITS and any("." not in v and len(v.lstrip("-")) > MAX_INTEGER_DIGITS for v in values):
        return _TEXT, whole, places
    if b"." not in b:
        return _INTEGER, whole, places
    # Without digits and signs, a value with two dots shows as ".."; without signs, "." and "-." as ".".
    if b".." in b.translate(None, b"0123456789-") or _LONE_POINT.search(nines):
        return _TEXT, whole, places
    while _contains(nines, b"." + b"9" * (places + 1)):
        places += 1
    if whole + places > MAX_REAL_DIGITS and _LONG_DECIMAL in b.translate(_DIGITS_AND_DOT_AS_NINES) and any(
        len(v.replace("-", "").replace(".", "").lstrip("0")) > MAX_REAL_DIGITS for v in values
    ):
        return _TEXT, whole, places
    return _REAL, whole, places


def _contains(data, pattern):
    """pattern in data, for the runs of 9s that digits are counted by: as a regular expression,
    since re finds them in 2-3 times less time than bytes' own search, which slows down on
    patterns whose every byte is common, as 9s are there."""
    return _literal(pattern).search(data) is not None


@functools.lru_cache(maxsize=64)
def _literal(pattern):
    return re.compile(re.escape(pattern))


_TYPED_KINDS = {bool: _INTEGER, int: _INTEGER, float: _REAL, str: _TEXT}
_SQLITE_INTEGERS = range(-(2**63), 2**63)


def typed_column_type(batch, i, column):
    """The narrowest of INTEGER, REAL, TEXT for column i of typed values, such as JSON's.

    First makes each value one SQLite stores as it is: an object or an array
    (a dict or list) becomes compact JSON text, and an integer beyond 64 bits
    its digits. Returns None when every value is None.
    """
    kinds = set(map(type, column))
    if dict in kinds or list in kinds:
        for row in batch:
            if type(row[i]) in (dict, list):
                row[i] = json.dumps(row[i], ensure_ascii=False, separators=(",", ":"))
        kinds = (kinds - {dict, list}) | {str}
    if int in kinds:
        ints = column if kinds == {int} else [value for value in column if type(value) is int]
        if min(ints) not in _SQLITE_INTEGERS or max(ints) not in _SQLITE_INTEGERS:
            for row in batch:
                if type(row[i]) is int and row[i] not in _SQLITE_INTEGERS:
                    row[i] = str(row[i])
            kinds.add(str)
    kinds.discard(type(None))
    return max(map(_TYPED_KINDS.get, kinds), key=_RANK.get, default=None)


def chosen_types(columns, types, options, source):
    """The columns' types with the user's choices (options.types) and, when appending,
    the table's own in place; and, for each column whose values must be checked to
    fit its new type, why it has that type.

    A column's type that was learned from every value needs no check.
    """
    types, checks = list(types), {}
    where = {_column_key(name): i for i, name in enumerate(columns)}
    for name, kind in (options.types or {}).items():
        i = where.get(_column_key(name))
        if i is None:
            raise ReadError(
                f"types names a column that {source} does not have: {_shorten(name)!r}. "
                f"Its columns are {_listed(map(repr, columns))}."
            )
        if kind != types[i]:
            types[i], checks[i] = kind, "as types asks"
    if options.table_columns is not None:
        table = options.table_columns
        for i, name in enumerate(columns):
            if _column_key(name) not in table["columns"]:
                raise ReadError(
                    f"{source} has a column {name!r} that the table {table['name']} does not have, "
                    "so its rows cannot be appended. Add the column to the table, or import the "
                    "file as a new table."
                )
            kind = table["columns"][_column_key(name)]
            if kind is not None and kind != types[i]:
                types[i], checks[i] = kind, f"as the table {table['name']} stores it"
    return types, checks


def _column_key(name):
    """A column name as SQLite compares them: without regard to the case of ASCII letters."""
    return unicodedata.normalize("NFC", name).translate(_ASCII_LOWER)


_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


def _exact_types(types, long_integers):
    """The column types learned batch by batch, TEXT where none were learned, and TEXT where a
    column became REAL after integers too long to be exact as REALs, as column_type would
    have made it had it seen them all at once."""
    return [
        _TEXT if kind is None or (kind == _REAL and i in long_integers) else kind
        for i, kind in enumerate(types)
    ]


def _wider(a, b):
    return a if _RANK[a] >= _RANK[b] else b


def _pad(batch, width):
    """Pad short rows with None (NULL); return the lengths of the widest row and the shortest, as they were."""
    lengths = set(map(len, batch))
    if lengths == {width}:
        return width, width
    for row in batch:
        if len(row) < width:
            row.extend([None] * (width - len(row)))
    return max(lengths), min(lengths)


# ===== Staging =====
#
# A reader's rows go into a staging database while their types are learned:
# number columns in their types, converted as they go in, while their values
# keep to those types; SQLite then converts what needs it there, to the final
# types.


SQLITE_ENCODINGS = ("UTF-8", "UTF-16le", "UTF-16be")
# Rows per INSERT statement, fewer for wide files.
ROWS_PER_INSERT = 50


@dataclass
class Staged:
    """A file read into staging databases, in tables ready to copy in file order."""

    tables: list  # (database path, table name) pairs
    columns: list
    types: list
    rows: int
    answer: dict  # what the import's answer says of the file: its format
    sheet: str = None  # the worksheet of a workbook the table comes from
    checks: dict = None  # column index: why its type was chosen, for values not seen to fit it


def stage_file(
    path, staging_path, *, detect_types=True, on_progress=None, db_encoding="UTF-8", charset=None,
    source=None, unpacked_limit_mb=URL_SIZE_LIMIT_MB, options=NO_OPTIONS,
):
    """Read the file at path once into a new database at staging_path; return a Staged for each table.

    A file gives one table; a workbook one for each worksheet that is not
    empty. on_progress(rows, bytes_read) is called after every batch.
    db_encoding is the target database's text encoding (UTF-8, UTF-16le or
    UTF-16be): SQLite only attaches databases that share it. charset, source
    and unpacked_limit_mb are as for plan_file. A large file is read in parts,
    into staging_path and databases beside it. options are the user's ReadOptions.
    """
    try:
        plan = plan_file(path, charset, source, unpacked_limit_mb, options)
        processes = _process_count(os.path.getsize(path), plan)
        staged = None
        if processes > 1:
            try:
                staged = [_stage_in_parts(
                    path, plan, processes, staging_path, detect_types, on_progress, db_encoding, options
                )]
            except _SplitFailed:
                # Rare: a quote inside an unquoted cell misled a split, or a helper could not run.
                _remove_part_databases(staging_path, processes)
        if staged is None:
            staged = _stage_whole(path, plan, staging_path, detect_types, on_progress, db_encoding, options)
        for one in staged:
            _check_chosen_types(one, plan.source)
        return staged
    except OSError as e:  # the staging database reports its own failures as sqlite3 errors
        raise ReadError(f"Could not read {_shorten(path)}: {e.strerror or e}.") from e


def _stage_whole(path, plan, staging_path, detect_types, on_progress, db_encoding, options=NO_OPTIONS):
    """Stage each table of the file, one after another, in one process."""
    staged, rows_before, bytes_before = [], 0, 0

    def progress(rows, bytes_read):
        """Count on from the tables before this one."""
        if on_progress:
            on_progress(rows_before + rows, bytes_before + bytes_read)

    with contextlib.closing(_open_staging(staging_path, db_encoding)) as conn:
        conn.execute("BEGIN")
        for number, (sheet, reader) in enumerate(plan.readers(path)):
            with contextlib.closing(reader):
                rows = _StagedRows(conn, f"staged_{number}", reader.typed_cells, detect_types, _stages_typed(options))
                rows.read(reader, progress)
                rows_before, bytes_before = rows_before + rows.rows, bytes_before + reader.bytes_read
                if sheet is not None and not reader.header:
                    continue  # an empty worksheet
                columns = clean_headers(reader.header, rows.width)
                types, checks = chosen_types(columns, rows.final_types(), options, plan.source)
                table = rows.convert(columns, types, checked=checks)
                staged.append(Staged(
                    [(staging_path, table)], columns, types, rows.rows, plan.answer(), sheet, checks
                ))
        conn.execute("COMMIT")
    if not staged:
        raise ReadError(f"{plan.source} is a workbook with no data in any of its sheets.")
    return staged


# Whether number columns are staged in their types (see _StagedRows): the
# tests compare imports made with it on and off.
STAGE_TYPED = True


def _stages_typed(options):
    """Whether a file read with these ReadOptions has its number columns staged in their types:
    not when the user chooses types or appends, whose checks read the values as the file has them."""
    return STAGE_TYPED and not options.types and options.table_columns is None


def _open_staging(path, db_encoding):
    if db_encoding not in SQLITE_ENCODINGS:  # PRAGMA takes no bound parameters
        raise ValueError(f"Unknown SQLite text encoding: {db_encoding}")
    conn = sqlite3.connect(path, isolation_level=None)
    # Larger pages: a quarter of the writes to the operating system.
    pragmas = (
        f"encoding = '{db_encoding}'", "page_size = 16384", "journal_mode = off", "synchronous = off"
    )
    for pragma in pragmas:
        conn.execute(f"PRAGMA {pragma}")
    # SQLite writes a REAL as text to 15 digits; Python's repr keeps every one.
    conn.create_function("app_support_real_text", 1, float.__repr__, deterministic=True)
    conn.create_function("app_support_real", 1, float, deterministic=True)
    conn.create_function("app_support_real_or_text", 1, _real_or_text, deterministic=True)
    return conn


# Decimals that SQLite before 3.43 reads one unit off in the last binary
# digit (it rounds twice, through an 80-bit long double): short ones as
# files hold them, ones of 8 to 14 places, and 17-digit ones near halfway
# between two doubles.
_HARD_DECIMALS = (
    "0.337006", "-151.3907387", "-77.179786", "326.9414783", "92.679589", "875.985163",
    "243.671678", "-359.073836", "-77.8436515", "678.491422", "156.797072", "93.0281053",
    "99584.59907561", "1095.639537679", "-5603.2021500070", "37.35869853182", "-9.860085658699",
    "61.8436967120976", "5.26613834698562", "-34.330547048880522", "-9245.7578589056493", "-0.88301252330427632",
    "-913130.87476658792", "0.00059621730125136973", "-53480301.821334932",
)
_exact_real_casts = []  # once known: whether this process's SQLite reads them all exactly
_exact_short_casts = []  # the same for short decimals (see _sqlite_reads_short_decimals_exactly)
_exact_quotients = []  # the same for _exact_quotient
# A batch of decimals with no empty cell is given to SQLite as Python's
# float() of each (see _StagedRows._stage_typed). In a batch with one, where
# SQLite may read a decimal wrongly, a column of decimals whose digits before
# the point, at most, and places, at most, come to EXACT_DIGITS or fewer is
# made exact in SQL (see _exact_quotient); other columns call float() from
# SQL for every value, at several times the cost of SQLite's reading.
EXACT_DIGITS = 15
# Decimals of at most SHORT_DECIMAL_PLACES places and EXACT_DIGITS digits:
# most decimals in files, and ones SQLite reads exactly even when it rounds
# twice. It divides the digits, an integer held exactly, by a power of ten;
# a quotient that is not halfway between two doubles is then at least
# 2^-1/5^places of a double's last digit from halfway, more than the 2^-12 of
# it that an 80-bit long double's first rounding can move it, for 4 places
# (5^4 < 2^11). 15 digits fit a double exactly, where long double is double.
SHORT_DECIMAL_PLACES = 4


def _sqlite_reads_decimals_exactly(conn):
    """Whether SQLite turns decimal text into the nearest double, as Python's float() does.

    Proved on this SQLite, once per process, on decimals that older versions
    get wrong, rather than guessed from its version number.
    """
    if not _exact_real_casts:
        casts = ", ".join(["CAST(? AS REAL)"] * len(_HARD_DECIMALS))
        got = conn.execute(f"SELECT {casts}", _HARD_DECIMALS).fetchone()
        _exact_real_casts.append(list(got) == [float(text) for text in _HARD_DECIMALS])
    return _exact_real_casts[0]


def _exact_quotient(column, places):
    """SQL for the nearest double to the decimal text in column, as float() reads it, when its
    places are at most places and its digits before the point and places come to EXACT_DIGITS.

    The decimal is its digits, an integer N below 10^15, divided by
    10^places; both are doubles exactly, and one IEEE division rounds their
    quotient once, to the nearest double, as float() does. SQLite's own
    reading is at most a unit off in a double's last digit, so times
    10^places it is within a third of N, and round() gives N.
    """
    return f"round(CAST({column} AS REAL) * 1e{places}) / 1e{places}"


def _hard_decimals(most_places=EXACT_DIGITS):
    """Decimals of 1 to most_places places and at most EXACT_DIGITS digits, each the nearest
    to halfway between two doubles: the hardest to read."""
    texts = []
    for i in range(480):
        x = (i * 7919 % 100_003) / 100_003 * 10 ** (i % 11)
        halfway = (decimal.Decimal(x) + decimal.Decimal(math.nextafter(x, math.inf))) / 2
        places = 1 + i % most_places
        text = format(halfway.quantize(decimal.Decimal(1).scaleb(-places)), "f")
        if len(text) - 1 <= EXACT_DIGITS:
            texts.append(text if i % 2 else "-" + text)
    return texts


def _short_hard_decimals():
    """Short decimals, of every length of fraction, each the nearest to halfway between two doubles."""
    return _hard_decimals(SHORT_DECIMAL_PLACES)


def _sqlite_divides_exactly(conn):
    """Whether _exact_quotient gives Python's float() of the hardest decimals on this SQLite.

    Seen once per process, as for _sqlite_reads_decimals_exactly, with the
    decimal's own places and with the most its digits before the point allow.
    """
    if not _exact_quotients:
        cases = []  # (text, places)
        for text in [*_HARD_DECIMALS, *_hard_decimals()]:
            whole, _, fraction = text.lstrip("-").partition(".")
            if len(whole) + len(fraction) <= EXACT_DIGITS:
                cases += [(text, len(fraction)), (text, EXACT_DIGITS - len(whole))]
        quotients = ", ".join(_exact_quotient("?", places) for _, places in cases)
        got = conn.execute(f"SELECT {quotients}", [text for text, _ in cases]).fetchone()
        _exact_quotients.append(list(got) == [float(text) for text, _ in cases])
    return _exact_quotients[0]


def _sqlite_reads_short_decimals_exactly(conn):
    """Whether SQLite reads short decimals (see SHORT_DECIMAL_PLACES) as Python's float() does, as it should.

    Seen on this SQLite once per process, as for _sqlite_reads_decimals_exactly.
    """
    if not _exact_short_casts:
        texts = _short_hard_decimals()
        casts = ", ".join(["CAST(? AS REAL)"] * len(texts))
        got = conn.execute(f"SELECT {casts}", texts).fetchone()
        _exact_short_casts.append(list(got) == [float(text) for text in texts])
    return _exact_short_casts[0]


def _max_variables(conn):
    """How many ? a statement may hold: 999 before SQLite 3.32."""
    if hasattr(conn, "getlimit"):  # Python 3.11+
        return conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    return 32766 if sqlite3.sqlite_version_info >= (3, 32) else 999


def _number_sql(conn, value, kind, digits, blanks=True):
    """The SQL for the text value, SQL itself, as a number of type kind, or NULL when empty.

    digits are the most digits before the point and after it in the value's
    column. A column of that type converts the text it is given. blanks is
    False when the value is never empty.
    """
    # Where SQLite might read a decimal wrongly: a column of short decimals
    # only, as most are, it reads exactly; a column of coordinates
    # _exact_quotient makes exact; others call Python's float().
    number = value
    if kind == _REAL and not _sqlite_reads_decimals_exactly(conn):
        whole, places = digits
        if whole + places > EXACT_DIGITS or not _sqlite_divides_exactly(conn):
            number = f"app_support_real({value})"
        elif places > SHORT_DECIMAL_PLACES or not _sqlite_reads_short_decimals_exactly(conn):
            number = _exact_quotient(value, places)
    # CASE, not nullif(): a function's result is a copy of the value, and
    # copying every cell of a number column cost a third of the conversion.
    return f"CASE WHEN {value} <> '' THEN {number} END" if blanks else number


def _create_table_sql(table, columns, types):
    return "CREATE TABLE {} (\n{}\n)".format(
        _quote(table), ",\n".join(f"   {_quote(c)} {kind}" for c, kind in zip(columns, types))
    )


class _StagingTable:
    """A table of columns c1, c2 ... that takes batches of rows.

    The columns are TEXT for text cells, and have no type for typed cells,
    so that SQLite stores every value as it is given, unless declare() gives
    them types and values() the SQL that converts each column's values.
    """

    def __init__(self, conn, name, column_type=_TEXT):
        self.conn = conn
        self.name = name
        self.column_type = column_type
        self.width = 0
        self.sql = []  # each column's value as SQL, {} standing for its parameter
        self.statements = {}  # tuple(sql): rows per statement, and the INSERTs of one row and of that many
        conn.execute(f"CREATE TABLE {name} (c1 {column_type})")
        self.widen(1)

    def widen(self, width):
        if width <= self.width:
            return
        if width > MAX_COLUMNS:
            raise ReadError(
                f"The file has {width:,} columns; SQLite tables hold at most {MAX_COLUMNS:,}."
            )
        for n in range(max(self.width, 1) + 1, width + 1):
            self.conn.execute(f"ALTER TABLE {self.name} ADD COLUMN c{n} {self.column_type}")
        self.width = width
        self.values(self.sql + ["{}"] * (width - len(self.sql)))

    def declare(self, types):
        """Make the table, while it is empty, one of columns of these declared types."""
        self.conn.execute(f"DROP TABLE {self.name}")
        self.conn.execute(_create_table_sql(self.name, [f"c{n}" for n in range(1, len(types) + 1)], types))

    def values(self, sql):
        """Insert each column's values as its SQL in sql says, with {} for the value given."""
        if sql == self.sql:
            return
        self.sql, width = sql, len(sql)
        if tuple(sql) not in self.statements:
            per_statement = max(1, min(ROWS_PER_INSERT, _max_variables(self.conn) // width))

            def row(number):
                return "(" + ", ".join(
                    value.format(f"?{number * width + i}") for i, value in enumerate(sql, 1)
                ) + ")"

            self.statements[tuple(sql)] = per_statement, (
                f"INSERT INTO {self.name} VALUES {row(0)}",
                f"INSERT INTO {self.name} VALUES " + ", ".join(map(row, range(per_statement))),
            )
        self.per_statement, (self.one, self.many) = self.statements[tuple(sql)]

    def insert(self, batch, floats=()):
        """Insert the rows, each of width cells; the cells of the columns whose indexes are in floats
        as Python's float() of their text."""
        flat = list(itertools.chain.from_iterable(batch))
        for i in floats:
            flat[i :: self.width] = map(float, flat[i :: self.width])
        step = self.width * self.per_statement
        whole = len(flat) - len(flat) % step
        if whole:
            self.conn.executemany(self.many, [flat[i : i + step] for i in range(0, whole, step)])
        if whole < len(flat):
            self.conn.executemany(self.one, [flat[i : i + self.width] for i in range(whole, len(flat), self.width)])


@dataclass
class _Stored:
    """How a column staged in a type of its own holds its values: the first rows as values of
    kind, and any after them kept as they came."""

    kind: str
    rows: int = 0
    kept: bool = False


class _StagedRows:
    """A reader's rows in a staging table, and the column types learned from
    them batch by batch.

    With typed (see _stages_typed), a column whose first batch holds only
    numbers is staged as such, in a column of that type, so that a file whose
    types hold to its end needs no conversion after: the staging table is the
    table copied in. The values of such a column are converted as they are
    inserted until a batch has a value its type cannot hold, or a short row;
    from then on they are kept as they come, as BLOBs, which no column type
    converts. convert() makes every value what the final types say.
    Otherwise the rows are staged as the reader gives them.
    """

    def __init__(self, conn, name, typed_cells, detect_types, typed=False):
        self.conn = conn
        self.name = name
        self.typed_cells = typed_cells
        self.detect_types = detect_types
        self.table = _StagingTable(conn, name, "" if typed_cells else _TEXT)
        self.types = [self._unknown]
        self.rows = 0
        self.typed = typed and detect_types and not typed_cells
        self.stored = {}  # column index: a _Stored, for the columns staged in a type
        # The columns staged as REALs whose texts are still kept, a row per
        # batch, in a table beside the staged one (see _texts_table): a column
        # of decimals that turns to text has its values back from there.
        self.texts = set()
        # Column index: the most digits seen before the point and after it,
        # in batches of numbers: for integers too long to be exact as REALs
        # (see _exact_types) and, where SQLite may read a decimal wrongly,
        # for how _number_sql makes it exact.
        self.digits = {}

    @property
    def width(self):
        return self.table.width

    @property
    def long_integers(self):
        """The columns that hold an integer too long to be exact as a REAL."""
        return {i for i, (whole, _) in self.digits.items() if whole > MAX_REAL_DIGITS}

    @property
    def _unknown(self):
        return None if self.detect_types else _TEXT

    def read(self, reader, on_progress=None, enough=None):
        """Stage every batch the reader gives; on_progress(rows, bytes_read) after each.

        Stops early once enough(rows, bytes_read) is true. Returns whether
        every row was read.
        """
        for batch in reader.batches():
            width, shortest = _pad(batch, self.width)
            if width > self.width or len(reader.header) > self.width:
                self.widen(max(width, len(reader.header)))
                _pad(batch, self.width)
            kinds = {}  # column index: the type of this batch's values, and the values
            if self.typed_cells or self.detect_types:
                for i, column in enumerate(zip(*batch)):
                    if self.typed_cells:  # even when every column is TEXT: it makes them storable
                        kind = typed_column_type(batch, i, column)
                    elif self.types[i] != _TEXT:
                        kind, *digits = _column_type(column, *self.digits.get(i, (0, 0)))
                        if kind in (_INTEGER, _REAL):
                            self.digits[i] = digits
                        kinds[i] = kind, column
                    else:
                        continue
                    self.types[i] = _wider(self.types[i], kind)
            floats = self._stage_typed(kinds, shortest < self.width) if self.typed else ()
            self.table.insert(batch, floats)
            self.rows += len(batch)
            if on_progress:
                on_progress(self.rows, reader.bytes_read)
            if enough and enough(self.rows, reader.bytes_read):
                self.widen(len(reader.header))
                return False
        self.widen(len(reader.header))  # a header wider than every row, or no rows
        return True

    def _stage_typed(self, kinds, short):
        """Say how the batch's values are staged: a number column's in its type, while they fit it.

        short is whether a row of the batch was padded with NULLs. Returns
        the columns whose values are given to SQLite as Python's float() of
        their text: REALs with no empty cell in the batch. That is exact,
        which SQLite's own reading is not everywhere (see _number_sql), and
        binding a double costs SQLite less than reading a decimal: 0.193 s
        against 0.207 s for 200,000 rows of coordinates, where correcting
        SQLite's reading in SQL took 0.227 s.
        """
        floats = []
        if not self.rows:  # the first batch decides which columns are typed
            for i, (kind, column) in kinds.items():
                if kind in (_INTEGER, _REAL) and not (short and None in column):
                    self.stored[i] = _Stored(kind)
                    if kind == _REAL:
                        self.conn.execute(f"CREATE TABLE {self._texts_table(i)} (texts TEXT)")
                        self.texts.add(i)
            if self.stored:
                self.table.declare([self._staged_type(i) for i in range(self.width)])
        sql = ["{}"] * self.width
        for i, stored in self.stored.items():
            kind, column = kinds.get(i, (_TEXT, ()))
            if not stored.kept and (_RANK[kind] > _RANK[stored.kind] or (short and None in column)):
                stored.kept = True
                self.texts.discard(i)  # the texts so far stay, for convert()
            if stored.kept:
                sql[i] = "CAST({} AS BLOB)"
                continue
            if stored.kind == _REAL and "" not in column:
                floats.append(i)
            else:
                sql[i] = _number_sql(self.conn, "{0}", stored.kind, self.digits.get(i, (0, 0)), "" in column)
            stored.rows += len(column)
            if i in self.texts:
                self.conn.execute(f"INSERT INTO {self._texts_table(i)} VALUES (?)", ["\n".join(column)])
        self.table.values(sql)
        return floats

    def _staged_type(self, i):
        """The type column i is staged in: TEXT unless its values are converted as they are staged."""
        return self.stored[i].kind if i in self.stored else _TEXT

    def _staged_as(self, i, kind):
        """Whether every value of column i is staged as a value of type kind."""
        kept = i in self.stored and self.stored[i].kept
        return not self.typed_cells and self._staged_type(i) == kind and not kept

    def _texts_table(self, i):
        """The table of the texts of column i's values staged as REALs: a row for each batch,
        its values joined by newlines, which no number holds."""
        return f"{self.name}_texts_{i + 1}"

    def widen(self, width):
        self.table.widen(width)
        self.types += [self._unknown] * (width - len(self.types))

    def final_types(self):
        """The column types of every row read: TEXT where none were learned."""
        return _exact_types(self.types, self.long_integers)

    def convert(self, columns, types, sources=None, checked=()):
        """Copy the rows into a table of these columns and types; return the table that holds them.

        sources[j] is the staged column that holds column j (1 for c1), or None
        for a column these rows never had; by default column j is c{j + 1}.
        Empty text cells become NULL in number columns. Rows staged in these
        types already, text cells that all stay TEXT among them, need no
        copy. The columns whose indexes are in checked have a type chosen for
        them: a value that does not fit it is left as it is, for
        _check_chosen_types to find.
        """
        if sources is None:
            self.widen(len(columns))
            sources = range(1, len(columns) + 1)
            if all(self._staged_as(i, kind) for i, kind in enumerate(types)):
                return self.name  # staged in these types already
        values = ", ".join(
            self._chosen(n, kind) if j in checked else self._converted(n, kind)
            for j, (n, kind) in enumerate(zip(sources, types))
        )
        joins = "".join(
            f" LEFT JOIN temp.{self._load_texts(i)} AS texts_{i + 1} ON texts_{i + 1}.rowid = {self.name}.rowid"
            for i, kind in enumerate(types) if i in self.stored and self.stored[i].kind == _REAL and kind == _TEXT
        )
        typed = f"{self.name}_typed"
        self.conn.execute(_create_table_sql(typed, columns, types))
        self.conn.execute(f"INSERT INTO {typed} SELECT {values} FROM {self.name}{joins}")
        return typed

    def _load_texts(self, i):
        """A temporary table of the texts of column i's values staged as REALs, a row each, so by
        the staged rows' rowids; its name."""
        table = f"{self.name}_values_{i + 1}"
        self.conn.execute(f"CREATE TEMP TABLE {table} (text TEXT)")
        batches = self.conn.execute(f"SELECT texts FROM {self._texts_table(i)} ORDER BY rowid")
        self.conn.executemany(
            f"INSERT INTO temp.{table} (text) VALUES (?)",
            ([text] for (texts,) in batches.fetchall() for text in texts.split("\n")),
        )
        return table

    def _from_stored(self, n, kind):
        """The SQL for column n, staged in a type of its own (see _stage_typed), as a value of type kind."""
        stored, column = self.stored[n - 1], f"c{n}"
        if stored.kind == kind:
            as_staged = column
        elif kind == _REAL:  # integers
            as_staged = f"CAST({column} AS REAL)"
        elif stored.kind == _INTEGER:  # as text: a NULL there was an empty cell, since a short row stops it
            as_staged = f"coalesce(CAST({column} AS TEXT), '')"
        else:
            as_staged = f"texts_{n}.text"
        if not stored.kept:
            return as_staged
        text = f"CAST({column} AS TEXT)"
        later = text if kind == _TEXT else _number_sql(self.conn, text, kind, self.digits.get(n - 1, (0, 0)))
        return f"CASE WHEN {self.name}.rowid <= {stored.rows} THEN {as_staged} ELSE {later} END"

    def _converted(self, n, kind):
        """The SQL for staged column n as a value of type kind."""
        if n is None:
            return "NULL"
        if self.typed_cells:
            if kind != _TEXT:
                return f"c{n}"
            return f"CASE WHEN typeof(c{n}) = 'real' THEN app_support_real_text(c{n}) ELSE c{n} END"
        if n - 1 in self.stored:
            return self._from_stored(n, kind)
        if kind == _TEXT:
            return f"c{n}"
        return _number_sql(self.conn, f"c{n}", kind, self.digits.get(n - 1, (0, 0)))

    def _chosen(self, n, kind):
        """The SQL for staged column n as a value of a type chosen for it, kind.

        SQLite's own conversion where the column's type makes it, as it would
        store a value written to such a column, with Python's exact float()
        for REALs; a value it cannot convert stays as it is.
        """
        if n is None or kind == _TEXT:
            return self._converted(n, kind)
        if self.typed_cells:
            if kind == _REAL:
                return f"CASE WHEN typeof(c{n}) = 'text' THEN app_support_real_or_text(c{n}) ELSE c{n} END"
            return f"c{n}"
        if kind == _REAL:
            return f"CASE WHEN c{n} <> '' THEN app_support_real_or_text(c{n}) END"
        return f"CASE WHEN c{n} <> '' THEN c{n} END"


def _real_or_text(text):
    """text as the nearest double when it is a decimal number, as SQLite would read it; else text."""
    if _DECIMAL_NUMBER.fullmatch(text):
        return float(text)
    return text


# What SQLite reads as a number, spaces around it included: no nan, inf or 1_000.
_DECIMAL_NUMBER = re.compile(r"\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*", re.ASCII)
_STORED_AS = {_INTEGER: "integer", _REAL: "real"}
_TYPE_WORDS = {_INTEGER: "a whole number", _REAL: "a number"}


def _check_chosen_types(staged, source):
    """Refuse the import when a value does not fit a type chosen for its column, naming the first."""
    if not any(staged.types[i] in _STORED_AS for i in staged.checks or {}):
        return
    with contextlib.closing(sqlite3.connect(staged.tables[0][0])) as conn, _attached(conn, [staged]) as sources:
        _refuse_misfits(conn, sources[0], staged.columns, staged.types, staged.checks, source)


def _refuse_misfits(conn, tables, columns, types, checks, source):
    """Refuse a value in the converted tables, the parts of a file in order, that does not fit
    a type chosen for its column; checks gives why each was chosen.

    Rows are numbered from 1, the first row below the header, across the parts.
    """
    checks = {i: why for i, why in checks.items() if types[i] in _STORED_AS}
    rows_before = 0
    for table in tables if checks else ():
        for i, why in checks.items():
            column, kind = _quote(columns[i]), types[i]
            found = conn.execute(
                f"SELECT rowid, {column} FROM {table} WHERE typeof({column}) NOT IN (?, 'null') "
                "ORDER BY rowid LIMIT 1", [_STORED_AS[kind]],
            ).fetchone()
            if found:
                row = rows_before + conn.execute(
                    f"SELECT count(*) FROM {table} WHERE rowid <= ?", [found[0]]
                ).fetchone()[0]
                raise ReadError(
                    f"The column {columns[i]!r} of {source} must be {kind} ({why}), but "
                    f"row {row:,} holds {_shorten(found[1], 80)!r}, which is not "
                    f"{_TYPE_WORDS[kind]}. Nothing was imported. Choose another type for the "
                    "column, or correct the file, and try again."
                )
        rows_before += conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


# ===== Copying into the target =====
#
# The one step that touches the user's database: every staged table copied in,
# in one transaction, under names that are free at that moment.


# Shared-cache locks (the `temporary` database) fail at once instead of
# waiting: how long to keep trying while pages read it.
SHARED_CACHE_WAIT_SECONDS = 10


@dataclass
class ImportResult:
    table: str
    rows: int
    columns: list
    types: list
    answer: dict = field(default_factory=dict)  # more for the import's answer: its format
    sheet: str = None  # the worksheet of a workbook the table comes from
    created: bool = True  # False when the rows were appended to a table that was there
    # The columns of the table the rows go into, when they are not the file's:
    # the table's own names for them, when appending.
    into_columns: list = None

    @property
    def schema(self):
        return _create_table_sql(self.table, self.columns, self.types)


def copy_in(conn, staged, wanted_table, shared_cache=False, if_exists="rename"):
    """Copy each staged table into conn's main database, all in one transaction; return
    their ImportResults.

    One table is named after wanted_table; a workbook's are named
    wanted_table_sheet. if_exists says what happens when that name is taken:
    "rename" makes a new table under a free name close to it, "replace"
    drops the table there and makes a new one, "append" adds the rows to it.
    In the shared-cache `temporary` database an uncommitted CREATE TABLE
    fails every reader at once, so there new tables are created on their
    own, in autocommit, and dropped again should filling them fail; a
    replacing table takes the old one's name in a short transaction of its
    own. Readers' locks fail a writer at once there too, so each step waits
    them out.
    """
    wanted = [
        wanted_table if len(staged) == 1 or table.sheet is None else f"{wanted_table}_{table.sheet}"
        for table in staged
    ]
    with _attached(conn, staged) as sources:
        if not shared_cache:
            with _transaction(conn):
                results = [_new_table(conn, table, name, if_exists) for table, name in zip(staged, wanted)]
                for result, table_sources in zip(results, sources):
                    _copy_rows(conn, table_sources, result)
            return results
        # Only Datasette's write thread writes to `temporary`: the names stay free.
        results, replaced = [], []
        try:
            for table, name in zip(staged, wanted):
                old = _existing_table(conn, name, if_exists) if if_exists == "replace" else None
                results.append(_retry_while_locked(
                    _new_table, conn, table, name, "rename" if old else if_exists
                ))
                replaced.append(old)
            _retry_while_locked(_fill, conn, sources, results)
            if any(replaced):
                _retry_while_locked(_take_names, conn, results, replaced)
        except BaseException:
            for result in results:
                if result.created:
                    _retry_while_locked(conn.execute, f"DROP TABLE IF EXISTS main.{_quote(result.table)}")
            raise
        return results


def _new_table(conn, staged, wanted_table, if_exists="rename"):
    """The table the staged rows go into, created unless they are appended; return what it will hold.

    Under a name close to wanted_table that is free now, or the name itself
    when the table there is replaced or appended to.
    """
    result = ImportResult(
        wanted_table, staged.rows, staged.columns, staged.types, staged.answer, staged.sheet
    )
    old = _existing_table(conn, wanted_table, if_exists) if if_exists != "rename" else None
    if old and if_exists == "append":
        result.table, result.created = old, False
        result.into_columns = _append_columns(conn, old, staged.columns)
        return result
    if old:
        conn.execute(f"DROP TABLE main.{_quote(old)}")
    result.table = old or _free_table_name(conn, wanted_table)
    conn.execute(result.schema)
    return result


def _existing_table(conn, wanted_table, if_exists):
    """The name of the table called wanted_table, in any case, or None; refuses a view or an index there."""
    found = conn.execute(
        "SELECT type, name FROM main.sqlite_master WHERE name = ? COLLATE NOCASE",
        [_table_name(wanted_table)],
    ).fetchone()
    if found is None:
        return None
    kind, name = found
    if kind != "table":
        doing = "replaced" if if_exists == "replace" else "appended to"
        raise APIError(
            f"{name} is a {kind} in that database, not a table, so it cannot be {doing}. "
            "Choose another table_name."
        )
    return name


def _append_columns(conn, table, columns):
    """The table's names for the file's columns, matched by name; refuses a column it lacks."""
    names = {_column_key(row[1]): row[1] for row in conn.execute(f"PRAGMA main.table_info({_quote(table)})")}
    for column in columns:
        if _column_key(column) not in names:
            raise APIError(
                f"The table {table} has no column {column!r}, which the file has, so its rows "
                "cannot be appended. Add the column to the table, or import the file as a new table."
            )
    return [names[_column_key(column)] for column in columns]


def _take_names(conn, results, replaced):
    """Give each new table the name of the table it replaces, which is dropped, in one transaction.

    The legacy ALTER TABLE leaves views and triggers that name the old table
    as they are, instead of refusing to rename while they name a table that
    is gone; they name the new one once it has the name.
    """
    conn.execute("PRAGMA legacy_alter_table = ON")
    try:
        with _transaction(conn):
            for result, old in zip(results, replaced):
                if old:
                    conn.execute(f"DROP TABLE main.{_quote(old)}")
                    conn.execute(f"ALTER TABLE main.{_quote(result.table)} RENAME TO {_quote(old)}")
    finally:
        conn.execute("PRAGMA legacy_alter_table = OFF")
    for result, old in zip(results, replaced):
        result.table = old or result.table


@contextlib.contextmanager
def _attached(conn, staged):
    """Attach the staging databases; yield, for each staged table, its parts in file order as aliased names."""
    aliases = {}
    try:
        for path, _ in itertools.chain.from_iterable(table.tables for table in staged):
            if path not in aliases:
                alias = f"app_support_staging{len(aliases)}"
                conn.execute(f"ATTACH DATABASE ? AS {alias}", [path])
                aliases[path] = alias
        yield [[f"{aliases[path]}.{part}" for path, part in table.tables] for table in staged]
    finally:
        for alias in aliases.values():
            conn.execute(f"DETACH DATABASE {alias}")


def _copy_rows(conn, sources, result):
    # SELECT * from a table of the same column types: SQLite copies the
    # records as they are, much faster than value by value.
    into = ""
    if result.into_columns is not None:
        into = " (" + ", ".join(map(_quote, result.into_columns)) + ")"
    for source in sources:
        conn.execute(f"INSERT INTO main.{_quote(result.table)}{into} SELECT * FROM {source}")


def _fill(conn, sources, results):
    with _transaction(conn):
        for table_sources, result in zip(sources, results):
            _copy_rows(conn, table_sources, result)


@contextlib.contextmanager
def _transaction(conn):
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        _roll_back(conn)
        raise


def _retry_while_locked(step, *args):
    """step(*args), again while a reader's shared-cache lock refuses it, up to a limit."""
    deadline = time.monotonic() + SHARED_CACHE_WAIT_SECONDS
    while True:
        try:
            return step(*args)
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.005)


def _roll_back(conn):
    """Leave conn's database as it was before a write that failed.

    After some errors, a full disk among them, SQLite has rolled back by
    itself but replays its journal only on the next read; Datasette's
    read-only connections cannot, so that read happens here.
    """
    if conn.in_transaction:
        conn.execute("ROLLBACK")
    conn.execute("SELECT count(*) FROM main.sqlite_master").fetchone()


def _check_writable(path):
    """Check, without waiting long, that the database file at path takes writes; return its text encoding.

    A connection of its own: Datasette's write thread would wait five seconds
    for a lock before it ran anything.
    """
    uri = "file:" + urllib.parse.quote(path) + "?mode=rw"
    conn = sqlite3.connect(uri, uri=True, timeout=LOCKED_TIMEOUT_SECONDS, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
        return conn.execute("PRAGMA encoding").fetchone()[0]
    finally:
        conn.close()


# ===== Reading large files in parts =====
#
# One Python process parses CSV or JSON no faster than one CPU allows, so a
# large file is cut into one part per process, each starting where the
# plan's row_start says a row may, and the parts are read at once: the
# first by this process, and each other one by a helper process. Each part
# is staged like a whole file, in its reader's own staging database. The
# columns and types of all parts then decide the table; each process
# converts its part to them, and copy_in copies the parts in file order.
# When that does not work out (_SplitFailed), the file is read in one piece.


# Files this large are read in parts, one per process, by up to one process
# per CPU and at most MAX_PROCESSES: below it, starting a process costs more
# than it saves.
PARALLEL_MIN_BYTES = 16 * 1024 * 1024
MAX_PROCESSES = 4
# How far past its aim a part boundary may move to reach a line break.
SPLIT_SEARCH_BYTES = 1024 * 1024
# How much longer the first part is than the others, since this process
# reads it from the start: a helper starts to read about 0.1 s later (the
# time Python takes to start and load this module from its bytecode cache;
# 0.04 s more where there is none). At 2 MB, parts of the benchmark's files
# ended within 0-0.03 s of each other (medians of 10 imports); at 3 MB, the
# helper's part of the 9 columns ended 0.075 s before this process's.
HEAD_START_BYTES = 2 * 1024 * 1024
# How often helper processes report progress, and the import checks for Cancel.
PART_PROGRESS_SECONDS = 0.2
_Part = collections.namedtuple("_Part", "number start end")  # end is None for the last part
# What staging a part learned. types are None where it saw no values; keys
# are None when columns are known by position, as in CSV.
# long_integers are the columns where it saw integers too long to be exact as REALs.
_PartSummary = collections.namedtuple("_PartSummary", "rows width types header keys long_integers")
_PLANS = {plan.__name__: plan for plan in (CSVPlan, JSONPlan)}


class _SplitFailed(Exception):
    """Reading the file in parts did not work out, so it must be read in one piece.

    A split point was misplaced (a part's reader found its range ends
    mid-row), or a helper process could not do its part.
    """


def _cpu_count():
    if hasattr(os, "sched_getaffinity"):  # the CPUs this process may use
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _process_count(size, plan):
    """How many processes should read a file of this size: one unless it is large."""
    if size < PARALLEL_MIN_BYTES or not plan.splittable:
        return 1
    if not sys.executable:  # Python embedded somewhere it cannot start itself
        return 1
    return min(_cpu_count(), MAX_PROCESSES)


def _part_database(staging_path, number):
    """The staging database of the process that reads part number: 0 is this one."""
    return f"{staging_path}-{number}" if number else staging_path


def _split_points(path, processes, plan):
    """Where the second and later parts of the file start: one part per process, of about equal
    size, the first HEAD_START_BYTES longer, since this process reads it.

    Each is where plan.row_start finds a row may start, at or after its
    part's share of the file. Where quotes decide that (CSV), the bytes before are
    scanned to count them: a scan of bytes, not a parse. Fewer points come
    back when no row start is near where one is wanted, and none past a NUL
    byte: the file is refused there, which reading it finds sooner than a
    scan of the rest would.
    """
    size = os.path.getsize(path)
    head_start = min(HEAD_START_BYTES, size // (4 * processes))
    quote = plan.quote_byte
    points, quotes, position = [], 0, 0
    with open(path, "rb") as f:
        for number in range(1, processes):
            aim = head_start + (size - head_start) * number // processes
            if quote is None:  # nothing to count on the way
                position = max(position, aim)
                f.seek(position)
            while position < aim:
                chunk = f.read(min(READ_BUFFER_BYTES, aim - position))
                if not chunk or b"\x00" in chunk:
                    return points
                quotes += chunk.count(quote)
                position += len(chunk)
            window = f.read(SPLIT_SEARCH_BYTES)
            point = plan.row_start(window, quotes)
            if point is None or position + point >= size or b"\x00" in window[:point]:
                return points
            points.append(position + point)
            quotes += window.count(quote, 0, point) if quote else 0
            position += point
            f.seek(position)
    return points


def _read_part(conn, path, plan, part, detect_types, report, typed=False):
    """Stage one part of the file in conn; return its _StagedRows and _PartSummary.

    Of a CSV file, only the first part has a header; the others give [].
    """
    try:
        with contextlib.closing(plan.open(path, part.start, part.end)) as reader:
            rows = _StagedRows(conn, "staged", reader.typed_cells, detect_types, typed)
            rows.read(reader, report)
            return rows, _PartSummary(
                rows.rows, rows.width, rows.types, reader.header, reader.keys, sorted(rows.long_integers)
            )
    except _RangeEndsMidRow as e:  # a split point was misplaced
        raise _SplitFailed() from e


def _stage_in_parts(path, plan, processes, staging_path, detect_types, on_progress, db_encoding, options=NO_OPTIONS):
    """Read the file's first part here and each other part in a helper process.

    The parts' outcomes are taken in file order, so the first error is the
    one reported: a part after one that ended inside a quote started in the
    wrong place, and its own error means nothing. Raises _SplitFailed when
    reading in parts does not work out for this file.
    """
    starts = [0] + _split_points(path, processes, plan)
    if len(starts) == 1:
        raise _SplitFailed()
    parts = [_Part(n, start, end) for n, (start, end) in enumerate(zip(starts, starts[1:] + [None]))]
    job = {
        "path": path, "plan": [type(plan).__name__, asdict(plan)], "db_encoding": db_encoding,
        "detect_types": detect_types, "typed": _stages_typed(options),
    }
    helpers = []
    try:
        for part in parts[1:]:
            staging = _part_database(staging_path, part.number)
            helpers.append(_Helper({**job, "part": part, "staging_path": staging}))

        def reading(rows=0, bytes_read=0):
            """Report this process's part and the helpers' parts together."""
            if on_progress:
                on_progress(
                    rows + sum(helper.rows for helper in helpers),
                    bytes_read + sum(helper.bytes_read for helper in helpers),
                )

        with contextlib.closing(_open_staging(staging_path, db_encoding)) as conn:
            conn.execute("BEGIN")
            rows, summary = _read_part(conn, path, plan, parts[0], detect_types, reading, job["typed"])
            summaries = [summary] + [helper.staged(reading) for helper in helpers]
            columns, types, sources = _whole_file(summaries)
            types, checks = chosen_types(columns, types, options, plan.source)
            for helper, helper_sources in zip(helpers, sources[1:]):
                helper.convert(columns, types, helper_sources, list(checks))
            tables = [rows.convert(columns, types, sources[0], checks)]
            conn.execute("COMMIT")
            tables += [helper.converted(reading) for helper in helpers]
    finally:
        for helper in helpers:
            helper.stop()
    located = [(_part_database(staging_path, n), table) for n, table in enumerate(tables)]
    return Staged(located, columns, types, sum(s.rows for s in summaries), plan.answer(), checks=checks)


def _whole_file(summaries):
    """The whole file's columns and types, from every part's summary, and where each part holds them.

    CSV columns are known by position, and the first part's header names
    them. JSON columns are known by key, in order of first appearance in the
    file; each part lists its keys in its own order, so for each part the
    third answer gives the staged column of each column (see convert).
    """
    if summaries[0].keys is None:
        width = max(summary.width for summary in summaries)
        types = [None] * width
        for summary in summaries:
            for i, kind in enumerate(summary.types):
                types[i] = _wider(types[i], kind)
        long_integers = set().union(*(summary.long_integers for summary in summaries))
        columns = clean_headers(summaries[0].header, width)
        return columns, _exact_types(types, long_integers), [None] * len(summaries)
    where, names = {}, []
    for summary in summaries:
        for key, name in zip(summary.keys, summary.header):
            if key not in where:
                where[key] = len(names)
                names.append(name)
    types, sources = [None] * len(names), []
    for summary in summaries:
        part_sources = [None] * len(names)
        for n, (key, kind) in enumerate(zip(summary.keys, summary.types), 1):
            types[where[key]] = _wider(types[where[key]], kind)
            part_sources[where[key]] = n
        sources.append(part_sources)
    return clean_headers(names, len(names)), [kind or _TEXT for kind in types], sources


def _remove_part_databases(staging_path, processes):
    for number in range(processes):
        with contextlib.suppress(FileNotFoundError):
            os.remove(_part_database(staging_path, number))


class _Helper:
    """A helper process that stages one part of the file: _helper_main runs there.

    They talk in JSON lines. It is sent the job, reports its progress, and
    answers with what it staged. It is then sent the whole file's columns and
    types, and answers with the table that holds its part converted to them.
    """

    # The helper runs only the engine, which needs nothing of Datasette, and
    # importing Datasette took half of its start: 0.1 s of the 0.2 s it
    # starts in. So the names this module imports from Datasette, which only
    # hooks and handlers use, are stand-ins there.
    CODE = (
        "import sys, types\n"
        "if sys.path[:1] == ['']:\n"
        "    del sys.path[0]  # no modules from the working folder\n"
        "for name in ('datasette', 'datasette.database', 'datasette.utils', 'datasette.utils.asgi'):\n"
        "    sys.modules[name] = types.ModuleType(name)\n"
        "sys.modules['datasette'].hookimpl = lambda function: function\n"
        "sys.modules['datasette'].hookspecs = None\n"
        "sys.modules['datasette.database'].Database = object\n"
        "sys.modules['datasette.utils.asgi'].Response = None\n"
        "import importlib.util\n"
        "spec = importlib.util.spec_from_file_location('app_support_part', sys.argv[1])\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "module._helper_main()\n"
    )

    def __init__(self, job):
        self.rows = self.bytes_read = 0
        self.answers = queue.Queue()
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", self.CODE, os.path.abspath(__file__)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, encoding="utf-8",
            )
        except OSError as e:
            raise _SplitFailed() from e
        threading.Thread(target=self._listen, daemon=True).start()
        try:
            self._send(job)
        except _SplitFailed:
            self.stop()
            raise

    def staged(self, tick):
        """The _PartSummary of its part, once staged; tick is called while waiting."""
        return _PartSummary(*self._answer("staged", tick))

    def convert(self, columns, types, sources, checked):
        self._send({"columns": columns, "types": types, "sources": sources, "checked": checked})

    def converted(self, tick):
        """The table that holds its part, converted."""
        return self._answer("converted", tick)

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        with contextlib.suppress(OSError):
            self.process.stdin.close()

    def _send(self, message):
        try:
            self.process.stdin.write(json.dumps(message) + "\n")
            self.process.stdin.flush()
        except OSError as e:  # it has ended
            raise _SplitFailed() from e

    def _answer(self, key, tick):
        while True:
            try:
                message = self.answers.get(timeout=PART_PROGRESS_SECONDS)
            except queue.Empty:
                tick()  # progress, and a chance for Cancel
                continue
            if "error" in message:
                raise _helper_error(message["error"])
            if key not in message:  # it ended without answering
                raise _SplitFailed()
            return message[key]

    def _listen(self):
        try:
            with self.process.stdout:
                for line in self.process.stdout:
                    message = json.loads(line)
                    if "progress" in message:
                        self.rows, self.bytes_read = message["progress"]
                    else:
                        self.answers.put(message)
        except ValueError:
            pass  # not one of ours: it ends
        finally:
            self.answers.put({})  # the process has ended


def _helper_error(error):
    """The exception a helper process reported, to raise in this one."""
    if error["kind"] == "read":
        return ReadError(error["message"])
    if error["kind"] == "os":
        return OSError(error["errno"], error["message"])
    if error["kind"] == "sqlite":
        return sqlite3.OperationalError(error["message"])
    return _SplitFailed()


def _helper_main():
    """A helper process's side of _Helper: JSON lines in on stdin and out on stdout."""

    def send(message):
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

    sent = 0.0

    def report(rows, bytes_read):
        nonlocal sent
        if time.monotonic() - sent >= PART_PROGRESS_SECONDS:
            sent = time.monotonic()
            send({"progress": [rows, bytes_read]})

    job = json.loads(sys.stdin.readline())
    kind, fields = job["plan"]
    plan, part = _PLANS[kind](**fields), _Part(*job["part"])
    try:
        with contextlib.closing(_open_staging(job["staging_path"], job["db_encoding"])) as conn:
            conn.execute("BEGIN")
            rows, summary = _read_part(conn, job["path"], plan, part, job["detect_types"], report, job["typed"])
            send({"staged": summary})
            whole = json.loads(sys.stdin.readline() or "null")
            if whole:
                table = rows.convert(whole["columns"], whole["types"], whole["sources"], whole["checked"])
                conn.execute("COMMIT")
                send({"converted": table})
    except _SplitFailed:
        send({"error": {"kind": "split"}})
    except ReadError as e:
        send({"error": {"kind": "read", "message": str(e)}})
    except sqlite3.Error as e:
        send({"error": {"kind": "sqlite", "message": str(e)}})
    except OSError as e:
        send({"error": {"kind": "os", "errno": e.errno, "message": e.strerror or str(e)}})


# ===== Running an import =====
#
# The engine for the handlers: an import into a Datasette database, staged in
# a worker thread and copied in by the database's write thread, then made
# visible and announced.


def import_file(conn, path, wanted_table, detect_types=True):
    """Create new tables in conn from the file at path, all or nothing; return their ImportResults.

    The engine in one call: a file gives one table, a workbook one for each sheet.
    """
    with _work_folder() as folder:
        db_encoding = conn.execute("PRAGMA encoding").fetchone()[0]
        staged = stage_file(
            path, os.path.join(folder, "staging.db"), detect_types=detect_types, db_encoding=db_encoding
        )
        return copy_in(conn, staged, wanted_table)


async def _import_into(datasette, db, path, wanted_table, detect_types, on_progress, options=NO_OPTIONS, **file):
    """Import the file at path into db: staged in a worker thread, copied in by db's write thread.

    Returns an ImportResult for each table made or appended to. options are
    the user's ReadOptions. file holds stage_file's charset and source.
    """
    target = db.path or f"the database {db.name}"
    with _sqlite_failures("import into", target):
        if db.is_memory:
            db_encoding = (await db.execute("PRAGMA encoding")).first()[0]
        else:
            db_encoding = await asyncio.to_thread(_check_writable, db.path)
        if options.if_exists != "rename":
            options = await _check_table_to_write(datasette, db, wanted_table, options)
    if db.is_memory:  # a file that cannot fit is refused now, not after minutes of staging
        await asyncio.to_thread(_check_room_before_staging, path, file.get("source") or path)
    async with _work_folder_off_loop() as folder:
        staging_path = os.path.join(folder, "staging.db")
        with _sqlite_failures("stage the import in", tempfile.gettempdir()):
            staged = await asyncio.to_thread(
                stage_file, path, staging_path, detect_types=detect_types,
                on_progress=on_progress, db_encoding=db_encoding,
                unpacked_limit_mb=_unpacked_limit_mb(datasette), options=options, **file,
            )
        if options.if_exists != "rename" and len(staged) > 1:
            raise APIError(
                f"{_shorten(file.get('source') or path)} has {len(staged)} worksheets with data. To "
                f"{IF_EXISTS_VERBS[options.if_exists]} a table, choose "
                "one of them with sheet."
            )
        async with _temporary_held(datasette, db.name):
            db = _attached_now(datasette, db)
            if db.is_memory:
                await asyncio.to_thread(_check_room_for_import, staged, file.get("source") or path)
            with _sqlite_failures("import into", db.path or target):
                return await _write_outside_transaction(
                    db, lambda conn: copy_in(conn, staged, wanted_table, db.is_memory, options.if_exists)
                )


async def _check_table_to_write(datasette, db, wanted_table, options):
    """Refuse to replace or append to what is not a table, or a table Datasette does not let
    the desktop user write to; return the options, with the table's columns when appending."""
    table = await db.execute_fn(lambda conn: _existing_table(conn, wanted_table, options.if_exists))
    if table is None:
        return options  # a table the import makes
    for action in ("drop-table", "insert-row") if options.if_exists == "replace" else ("insert-row",):
        if not await _root_may(datasette, action, db.name, table):
            raise APIError(
                f"Datasette's permissions do not let the desktop user "
                f"{IF_EXISTS_VERBS[options.if_exists]} the table {table} in {db.name} ({action}), "
                "so nothing was imported."
            )
    if options.if_exists == "replace":
        return options
    info = await db.execute(f"PRAGMA table_info({_quote(table)})")
    columns = {_column_key(row[1]): _affinity(row[2]) for row in info}
    return dataclasses.replace(options, table_columns={"name": table, "columns": columns})


def _affinity(declared):
    """The type a column declared so stores text that looks like a number as: INTEGER, REAL, TEXT,
    or None when it keeps values as they come (BLOB, NUMERIC, no type), by SQLite's rules."""
    declared = (declared or "").upper()
    if "INT" in declared:
        return _INTEGER
    if any(word in declared for word in ("CHAR", "CLOB", "TEXT")):
        return _TEXT
    if any(word in declared for word in ("REAL", "FLOA", "DOUB")):
        return _REAL
    return None


# The least memory a table takes per byte of the file it comes from, for the
# check before staging: tables measured 1.0 to 1.26 times their CSV and 0.4
# times their NDJSON. Taken low, so that only a file that cannot fit is
# refused before it is staged; the staged tables are measured after.
MIN_TABLE_BYTES_PER_CSV_BYTE = 0.4
MIN_TABLE_BYTES_PER_JSON_BYTE = 0.2


def _unpacked_limit_mb(datasette):
    """The url_size_limit_mb setting, which bounds a workbook's parts too; its default when it is no number."""
    try:
        return _download_limits(datasette).size_limit_mb
    except APIError:  # a download says so; a file from disk need not fail for it
        return URL_SIZE_LIMIT_MB


def _check_room_before_staging(path, source):
    """Refuse a file whose tables could not fit in temporary's memory, from its size alone."""
    with open(path, "rb") as f:
        head = f.read(BINARY_SNIFF_BYTES).lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(_ZIP_MAGIC):
        return  # a workbook's size says little of its rows
    ratio = MIN_TABLE_BYTES_PER_JSON_BYTE if head[:1] in (b"[", b"{") else MIN_TABLE_BYTES_PER_CSV_BYTE
    _check_room_for_tables(ratio * os.path.getsize(path), source)


def _check_room_for_import(staged, source):
    _check_room_for_tables(sum(_table_bytes(*located) for one in staged for located in one.tables), source)


def _check_room_for_tables(size, source):
    """Refuse tables of size bytes, from source, that would not fit in temporary's memory."""
    need = MEMORY_PER_TABLE_BYTE * size
    name = _shorten(posixpath.basename(urllib.parse.urlsplit(source).path) if "://" in source else os.path.basename(source))
    _check_room_in_memory(need, (
        f"{name} needs about {{need}} of memory to open in the temporary database, and "
        "{free}. Create a database file (File → New Empty Database…) and use Import CSV "
        "on it instead."
    ))


def _attached_now(datasette, db):
    """The database the import goes into now: temporary may have moved into or out of its kept file."""
    now = datasette.databases.get(db.name)
    if db.name == TEMPORARY and now is not None:
        return now
    if now is not db:
        raise APIError(
            f"The database {db.name} was closed during the import, so nothing was imported. "
            "Open it again and import the file once more."
        )
    return now


async def _import_local_file(datasette, raw_path, database, values):
    """Import the file at raw_path into the database, as the request's values say."""
    options = _import_options(values)
    path = _existing_file(raw_path)
    db = _writable_database(datasette, database)
    log = _import_log(datasette)
    with log.track(raw_path, db.name, os.path.getsize(path)) as progress:
        async with _work_folder_off_loop() as folder:
            # A compressed file is read unpacked, as from a URL, with no size
            # limit but the disk's, and guarded against decompression bombs.
            unpacked = await asyncio.to_thread(
                _unpack, path, path.lower(), path, LOCAL_FILE_LIMITS, folder, progress
            )
            if unpacked != path:
                progress.bytes_total = await asyncio.to_thread(os.path.getsize, unpacked)
            results = await _import_into(
                datasette, db, unpacked, values.get("table_name") or _local_table_name(path, unpacked != path),
                values.get("detect_types") is not False, progress.update, options, source=path,
            )
        log.done(progress, results)
    return await _announce_import(datasette, db, results)


def _local_table_name(path, unpacked):
    """The name a table from the file at path is given: the file's, without its suffix, or without
    its suffixes when it was unpacked (data.csv.gz)."""
    if unpacked:
        return _table_name_from_url(urllib.parse.quote(os.path.basename(path)))
    return Path(path).stem


def _import_options(values):
    """The ReadOptions of an import request's checked values, with its table_name checked beside them."""
    options = _reading_options(values)
    name = values.get("table_name")
    if name is not None and "\x00" in name:
        raise APIError("table_name must not contain a NUL character.")
    if options.if_exists != "rename" and not (name or "").strip():
        raise APIError(
            f'if_exists "{options.if_exists}" needs table_name: the name of the table to '
            f"{IF_EXISTS_VERBS[options.if_exists]}."
        )
    return options


async def _import_url(datasette, url, database, values):
    """Download the file at url and import it into the database, as the request's values say."""
    options = _import_options(values)
    url = _check_url(url)
    db = _writable_database(datasette, database)
    limits = _download_limits(datasette)
    log = _import_log(datasette)
    with log.track(url, db.name) as progress:
        async with _kept_download(datasette, url, limits, progress) as (path, final_url, charset):
            wanted = values.get("table_name") or _table_name_from_url(final_url)
            # bytes_* describe the download; the import only adds rows.
            results = await _import_into(
                datasette, db, path, wanted, values.get("detect_types") is not False,
                lambda rows, _: progress.update(rows=rows), options, charset=charset, source=final_url,
            )
        log.done(progress, results)
    return await _announce_import(datasette, db, results)


async def _announce_import(datasette, db, results):
    """Make a committed import visible and heard of; return the import handlers' answer."""
    await _refresh_catalog(datasette)
    for result in results:
        await _report_import(datasette, db, result)
    first = results[0]
    answer = {"ok": True, "path": datasette.urls.table(db.name, first.table), "rows": first.rows}
    answer.update(first.answer)
    if first.sheet is not None:  # a workbook: every sheet's table
        answer["tables"] = [
            {"table": result.table, "path": datasette.urls.table(db.name, result.table), "rows": result.rows}
            for result in results
        ]
    return answer


async def _report_import(datasette, db, result):
    """Announce a committed import as a new table, unless it appended, and its inserted rows."""
    if result.created:
        await _track_event(
            datasette, "CreateTableEvent", database=db.name, table=result.table, schema=result.schema
        )
    if result.rows:
        await _track_event(
            datasette, "InsertRowsEvent", database=db.name, table=result.table,
            num_rows=result.rows, ignore=False, replace=False,
        )


# ===== Downloads =====
#
# A URL is streamed into a work folder in a worker thread, within the limits of
# the plugin's settings, then unpacked.


# The files a zip download is looked in for, and the endings a URL's table name loses.
DATA_SUFFIXES = (".csv", ".tsv", ".txt", ".json", ".ndjson", ".jsonl", ".geojson")
WORKBOOK_SUFFIXES = (".xlsx", ".xlsm")
MAX_REDIRECTS = 5
DOWNLOAD_CHUNK_BYTES = 1024 * 1024
# Downloads stop while this much space is still free on the temp disk.
DISK_MARGIN_BYTES = 100 * 1024 * 1024


def _redirect_error(url, location):
    if urllib.parse.urlsplit(location).scheme.lower() not in ("http", "https", ""):
        return f"{url} redirected to {location}, which is not an http or https URL."
    return f"{url} redirected more than {MAX_REDIRECTS} times."


class _LimitedRedirects(urllib.request.HTTPRedirectHandler):
    max_redirections = MAX_REDIRECTS

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        # urllib itself would follow ftp: redirects.
        if urllib.parse.urlsplit(newurl).scheme.lower() not in ("http", "https"):
            raise APIError(_redirect_error(req.full_url, newurl))
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _check_url(url):
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        raise APIError(
            f"Only http:// and https:// URLs can be opened, not: {_shorten(url) or '(empty)'}"
        )
    return _encode_url(parts, url)


# What a browser leaves alone when it encodes a typed URL; "%" too, so
# existing escapes stay as they are.
_URL_SAFE = "/:@!$&'()*+,;=~%"


def _encode_url(parts, url):
    """The URL as a browser sends it: an IDNA host, percent-encoded UTF-8 elsewhere."""
    userinfo, _, hostport = parts.netloc.rpartition("@")
    host, port = hostport, ""
    if not hostport.endswith("]"):  # an IPv6 literal is ASCII and keeps its colons
        host, colon, port = hostport.partition(":")
        port = colon + port
    try:
        host = host if host.isascii() else host.encode("idna").decode("ascii")
    except UnicodeError:
        raise APIError(f"That URL's host name is not valid: {_shorten(url)}")
    netloc = (urllib.parse.quote(userinfo, safe=_URL_SAFE) + "@" if userinfo else "") + host + port
    return urllib.parse.urlunsplit((
        parts.scheme,
        netloc,
        urllib.parse.quote(parts.path, safe=_URL_SAFE),
        urllib.parse.quote(parts.query, safe=_URL_SAFE + "?"),
        "",  # the fragment is never sent
    ))


def _table_name_from_url(url):
    name = urllib.parse.unquote(urllib.parse.urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1])
    for suffix in (".gz", ".bz2", ".xz", ".zip") + DATA_SUFFIXES + WORKBOOK_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return name.strip() or "data"


@dataclass
class DownloadLimits:
    """How long and how large a download may get; each is a plugin setting."""

    timeout: float = URL_TIMEOUT_SECONDS  # url_timeout: connecting, and each read
    time_limit: float = URL_TIME_LIMIT_SECONDS  # url_time_limit: the whole download
    size_limit_mb: float = URL_SIZE_LIMIT_MB  # url_size_limit_mb: after decompression
    deadline: float = None

    def start(self):
        self.deadline = time.monotonic() + self.time_limit

    def check_time(self, url):
        if time.monotonic() > self.deadline:
            raise APIError(
                f"Stopped downloading {_shorten(url)}: it took longer than {self.time_limit:g} "
                "seconds. The app_support setting url_time_limit changes this limit."
            )

    def check_size(self, url, size, packed_size, folder):
        """Refuse a file past the size limit, a decompression bomb, or a nearly full disk."""
        if size > self.size_limit_mb * 1024 * 1024:
            raise APIError(
                f"Stopped downloading {_shorten(url)}: it is larger than {self.size_limit_mb:g} MB "
                "uncompressed. The app_support setting url_size_limit_mb changes this limit."
            )
        if packed_size is not None and _looks_like_a_bomb(size, packed_size):
            raise APIError(
                f"Stopped unpacking {_shorten(url)}: it expands more than {MAX_EXPANSION_RATIO} "
                "times, which no real data file does, so it looks like a decompression bomb."
            )
        _check_free_space(folder)


# A compressed file from disk unpacks with no limit but the disk's free
# space, and the decompression bomb check.
LOCAL_FILE_LIMITS = DownloadLimits(time_limit=math.inf, size_limit_mb=math.inf)


def _check_free_space(folder):
    free = shutil.disk_usage(folder).free
    if free < DISK_MARGIN_BYTES:
        raise APIError(
            f"The disk is nearly full: only {_amount(free)} is free in {_shorten(folder)}, "
            f"and downloads stop while less than {_amount(DISK_MARGIN_BYTES)} is free. "
            "Free some space and try again."
        )


def _download_limits(datasette):
    config = datasette.plugin_config(PLUGIN_NAME) or {}
    values = {}
    for setting, name, default in (
        ("url_timeout", "timeout", URL_TIMEOUT_SECONDS),
        ("url_time_limit", "time_limit", URL_TIME_LIMIT_SECONDS),
        ("url_size_limit_mb", "size_limit_mb", URL_SIZE_LIMIT_MB),
    ):
        try:
            values[name] = float(config.get(setting, default))
        except (TypeError, ValueError):
            raise APIError(f"The app_support setting {setting} must be a number.")
    return DownloadLimits(**values)


class _CountingReader(io.RawIOBase):
    """The response as a raw stream that counts bytes before any decompression.

    Each read returns what has arrived instead of waiting for a full buffer,
    so a server that trickles bytes still meets the deadline.
    """

    def __init__(self, response, progress, url, limits):
        self.response = response
        self.progress = progress
        self.url = url
        self.limits = limits
        self.count = 0

    def readable(self):
        return True

    def readinto(self, buffer):
        self.limits.check_time(self.url)
        chunk = self.response.read1(len(buffer))
        buffer[: len(chunk)] = chunk
        self.count += len(chunk)
        if self.progress:
            self.progress.update(bytes_read=self.count)
        return len(chunk)


def _copy_limited(source, out, url, limits, folder, packed_size=None, progress=None, max_bytes=None):
    """Copy source to out chunk by chunk, checking the limits before each write.

    packed_size: a function giving the compressed bytes read so far, when
    source decompresses. progress, when given, hears of each chunk, and stops
    the copy once the user cancels. With max_bytes, the copy stops once it
    has copied that much.
    """
    size = 0
    while max_bytes is None or size < max_bytes:
        chunk = source.read1(DOWNLOAD_CHUNK_BYTES)
        if not chunk:
            return size
        size += len(chunk)
        if progress:
            progress.update()
        limits.check_size(url, size, packed_size() if packed_size else None, folder)
        try:
            out.write(chunk)
        except OSError as e:
            raise _sqlite_failure(e, f"save the download from {_shorten(url)} in", folder)
    return size


def download_file(url, folder, limits=None, progress=None):
    """Stream url into a file in folder, uncompressed; return (path, final_url, charset)."""
    limits = limits or DownloadLimits()
    limits.start()
    _check_free_space(folder)
    opener = urllib.request.build_opener(_LimitedRedirects)
    request = urllib.request.Request(
        url, headers={"User-Agent": "app_support (Datasette Desktop)", "Accept-Encoding": "gzip"}
    )
    target = os.path.join(folder, "download")
    shown = _shorten(url)
    try:
        with opener.open(request, timeout=limits.timeout) as response:
            final_url = response.geturl()
            if response.headers.get_content_type() in ("text/html", "application/xhtml+xml"):
                raise ReadError(
                    f"{_shorten(final_url)} is a web page (HTML), not CSV, TSV or JSON data."
                )
            charset = response.headers.get_content_charset()
            if progress and response.length is not None:
                progress.bytes_total = response.length
            counted = _CountingReader(response, progress, url, limits)
            body, packed_size = io.BufferedReader(counted, DOWNLOAD_CHUNK_BYTES), None
            if response.headers.get("Content-Encoding", "").lower() == "gzip":
                body, packed_size = gzip.GzipFile(fileobj=counted), lambda: counted.count
            with open(target, "wb") as out:
                _copy_limited(body, out, url, limits, folder, packed_size)
            # read(n) returns b"" when the server hangs up early, without
            # raising IncompleteRead; what is left of Content-Length tells.
            if response.length:
                raise APIError(
                    f"Could not download {shown}: the connection closed with "
                    f"{response.length} bytes still to come."
                )
            if progress and progress.bytes_total is None:
                progress.bytes_total = counted.count
    except urllib.error.HTTPError as e:
        if 300 <= e.code < 400:
            raise APIError(_redirect_error(url, e.headers.get("Location") or ""))
        raise APIError(_http_failure(shown, e.code, e.reason))
    except urllib.error.URLError as e:
        raise APIError(f"Could not download {shown}: {_download_failure(url, e.reason, limits)}")
    except (TimeoutError, OSError, EOFError, http.client.HTTPException) as e:
        raise APIError(f"Could not download {shown}: {_download_failure(url, e, limits)}")
    url_path = urllib.parse.urlsplit(final_url).path.lower()
    return _unpack(target, url_path, url, limits, folder, progress), final_url, charset


# What a person can do about an HTTP error status.
_NO_FILE_THERE = "there is no file at that address. Check the URL and try again."
_SIGN_IN_NEEDED = (
    "the site wants a sign-in or refuses to share the file. Download it in a browser, "
    "then open the downloaded file."
)
_HTTP_ADVICE = {
    404: _NO_FILE_THERE, 410: _NO_FILE_THERE,
    401: _SIGN_IN_NEEDED, 403: _SIGN_IN_NEEDED, 407: _SIGN_IN_NEEDED,
    429: "the site is getting too many requests. Wait a minute and try again.",
}


def _http_failure(shown, code, reason):
    """An HTTP error status as a sentence that says what to do."""
    try:
        reason = http.HTTPStatus(code).phrase
    except ValueError:  # a status of the server's own
        pass
    if code in _HTTP_ADVICE:
        advice = _HTTP_ADVICE[code]
    elif code >= 500:
        advice = "the site failed to answer. Try again later."
    else:
        advice = "the site refused the request. Check the URL and try again."
    return f"{shown} returned HTTP {code}{' ' + reason if reason else ''}: {advice}"


def _download_failure(url, reason, limits):
    """Why a download failed, in words rather than an [Errno …]."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or url
    if isinstance(reason, socket.gaierror):
        return (
            f"the host {host} could not be found. Check the address, and that this "
            "computer is online."
        )
    if isinstance(reason, ConnectionRefusedError):
        return (
            f"{parts.netloc} refused the connection: no web server is answering there. "
            "Check the address, and that the server is running."
        )
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return (
            f"{host} did not answer within {limits.timeout:g} seconds. Try again later; "
            "the app_support setting url_timeout changes this limit."
        )
    if isinstance(reason, ssl.SSLCertVerificationError):
        return (
            f"the secure connection to {host} failed because its certificate could not be "
            f"trusted ({reason.verify_message}). Check the address, and the computer's date."
        )
    if isinstance(reason, ssl.SSLError):
        why = (reason.reason or str(reason)).replace("_", " ").lower()
        return (
            f"the secure (https) connection to {host} failed ({why}). Check the address: "
            "a site that does not offer https needs an http:// address."
        )
    if isinstance(reason, gzip.BadGzipFile):
        return f"the server marked its answer as gzip-compressed, but it is not ({reason})."
    if isinstance(reason, (ConnectionResetError, ConnectionAbortedError, EOFError, http.client.HTTPException)):
        return f"the connection to {host} broke off during the download. Try again."
    if isinstance(reason, OSError) and reason.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN):
        return f"{host} cannot be reached: this computer may be offline."
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror[0].lower() + reason.strerror[1:] + "."
    return str(reason)


# The compressed files a data file may come in, by their first bytes: each
# is unpacked as it is read, past the limits' checks.
_PACKINGS = [
    (b"\x1f\x8b", "gunzip", lambda raw: gzip.GzipFile(fileobj=raw)),
    (b"BZh", "bunzip2", bz2.BZ2File),
    (b"\xfd7zXZ\x00", "unxz", lzma.LZMAFile),
]


def _unpack(path, name, source, limits, folder, progress=None, max_bytes=None):
    """Unpack a .gz, .bz2 or .xz file, or the single data file of a .zip, into folder; else return path.

    name is the file's name or URL path, lowercased; source names it in
    messages. An Excel workbook is a zip too, and stays as it is. With
    max_bytes, only about that much of the file's start is unpacked.
    """
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic.startswith(_ZIP_MAGIC) and _is_workbook(path):
        return path
    unpacked = os.path.join(folder, "unpacked.data")
    shown = _shorten(source)
    for start, verb, opener in _PACKINGS:
        if magic.startswith(start):
            try:
                with open(path, "rb") as raw, opener(raw) as src, open(unpacked, "wb") as out:
                    _copy_limited(src, out, source, limits, folder, raw.tell, progress, max_bytes)
            except (OSError, EOFError, lzma.LZMAError) as e:
                raise APIError(
                    f"Could not {verb} {shown}: {str(e).rstrip('.')}. The file may be cut short "
                    "or damaged: copy or download it again."
                )
            return unpacked
    if name.endswith(".zip") or magic.startswith(_ZIP_MAGIC):
        try:
            with zipfile.ZipFile(path) as archive:
                members = [
                    m for m in archive.infolist()
                    if not m.is_dir() and m.filename.lower().endswith(DATA_SUFFIXES)
                ]
                if len(members) != 1:
                    raise APIError(
                        f"{shown} is a zip file holding {len(members)} CSV, TSV or JSON "
                        "files; it must hold exactly one."
                    )
                # The declared sizes are safe to judge by: zipfile never
                # extracts more than a member's file_size.
                member = members[0]
                limits.check_size(source, member.file_size, member.compress_size, folder)
                with archive.open(member) as src, open(unpacked, "wb") as out:
                    _copy_limited(src, out, source, limits, folder, progress=progress, max_bytes=max_bytes)
        except zipfile.BadZipFile as e:
            raise APIError(f"Could not open the zip file from {shown}: {e}")
        return unpacked
    return path


# How long a download is kept for another import or preview of the same URL,
# and how many are kept at most.
KEEP_DOWNLOAD_SECONDS = 300
KEPT_DOWNLOADS = 4
_Download = collections.namedtuple("_Download", "folder path final_url charset kept_at")


class _KeptDownloads:
    """Recent downloads by URL, each in a work folder of its own: a preview's download is
    imported without being fetched again."""

    def __init__(self):
        self.items = collections.OrderedDict()

    def take(self, url):
        """The kept download of url, no longer kept, or None; and those too old to keep."""
        old = self._expired()
        return self.items.pop(url, None), old

    def keep(self, url, download):
        """Keep the download of url, as of now; return the downloads that no longer fit."""
        self.items[url] = download._replace(kept_at=time.monotonic())
        old = self._expired()
        while len(self.items) > KEPT_DOWNLOADS:
            old.append(self.items.popitem(last=False)[1])
        return old

    def _expired(self):
        now = time.monotonic()
        expired = [url for url, d in self.items.items() if now - d.kept_at > KEEP_DOWNLOAD_SECONDS]
        return [self.items.pop(url) for url in expired]


@contextlib.asynccontextmanager
async def _kept_download(datasette, url, limits, progress=None, keep=False):
    """The file at url, as (path, final_url, charset): downloaded, unless a preview's recent
    download of it is kept. With keep, as for a preview, it is kept afterwards for
    KEEP_DOWNLOAD_SECONDS; else it is removed."""
    kept = _shared_by_copies(datasette, "kept_downloads", _KeptDownloads)
    download, old = kept.take(url)
    try:
        if download is None:
            folder = await asyncio.to_thread(_work_folder)
            try:
                found = await asyncio.to_thread(download_file, url, folder.name, limits, progress)
            except BaseException:
                await asyncio.to_thread(folder.cleanup)
                raise
            download = _Download(folder, *found, None)
        elif progress:
            progress.bytes_total = progress.bytes_read = await asyncio.to_thread(os.path.getsize, download.path)
        yield download.path, download.final_url, download.charset
    finally:
        if download is not None:
            old += kept.keep(url, download) if keep else [download]
        for one in old:
            await asyncio.to_thread(one.folder.cleanup)


# ===== Previews =====
#
# What an import would do, from the file's start: its reading, columns, types
# and first rows, staged and converted as the import stages and converts
# them, in a database in memory. Nothing is written to any other database.


PREVIEW_ROWS = 20
# How much of a file a preview reads to learn its columns' types, whichever
# comes first; and how much of a compressed file it unpacks.
PREVIEW_READ_ROWS = 20_000
PREVIEW_READ_BYTES = 2 * 1024 * 1024
PREVIEW_UNPACK_BYTES = 4 * 1024 * 1024
# How many values of a TEXT column are looked at to say why it is TEXT.
PREVIEW_REASON_VALUES = 2000
# The preview's answer, in this order, after "ok".
PREVIEW_ANSWER_ORDER = (
    "format", "encoding", "delimiter", "quoting", "header", "skipped_lines", "sheets", "json_path",
    "table_name", "columns", "rows", "rows_read", "rows_estimate", "complete",
)


def _preview_local_file(path, folder, options, unpacked_limit_mb):
    """preview_file for a file on disk, of which a compressed one is unpacked only in part;
    and whether it was unpacked.

    The start of a JSON object that holds arrays is not enough to find them
    all, so a refusal of a file unpacked in part is checked on all of it.
    """
    unpacked = _unpack(path, path.lower(), path, LOCAL_FILE_LIMITS, folder, max_bytes=PREVIEW_UNPACK_BYTES)
    cut = unpacked != path and os.path.getsize(unpacked) >= PREVIEW_UNPACK_BYTES
    try:
        answer = preview_file(unpacked, options, source=path, unpacked_limit_mb=unpacked_limit_mb, cut=cut)
    except ReadError:
        if not cut:
            raise
        unpacked = _unpack(path, path.lower(), path, LOCAL_FILE_LIMITS, folder)
        answer = preview_file(unpacked, options, source=path, unpacked_limit_mb=unpacked_limit_mb)
    return answer, unpacked != path


def preview_file(path, options=NO_OPTIONS, charset=None, source=None, unpacked_limit_mb=URL_SIZE_LIMIT_MB, cut=False):
    """What importing the file at path with these ReadOptions would do, read from its start.

    cut is True when path holds only the start of the file, so that its size
    says nothing of the rows there are. charset, source and
    unpacked_limit_mb are as for plan_file.
    """
    plan = plan_file(path, charset, source, unpacked_limit_mb, options)
    answer = {key: None for key in PREVIEW_ANSWER_ORDER}
    answer.update(plan.answer(), skipped_lines=[])
    if isinstance(plan, CSVPlan):
        answer.update(
            encoding=_shown_encoding(plan.encoding), delimiter=plan.delimiter, header=plan.header,
            quoting="none" if plan.quotechar is None else "standard", skipped_lines=plan.skipped_lines,
        )
    elif isinstance(plan, JSONPlan):
        answer["encoding"] = _shown_encoding(plan.encoding)
    else:
        answer["sheets"] = _sheet_sizes(path, plan.all_sheets)

    def enough(rows, bytes_read):
        return rows >= PREVIEW_READ_ROWS or bytes_read >= PREVIEW_READ_BYTES

    with contextlib.closing(_open_staging(":memory:", "UTF-8")) as conn:
        for number, (sheet, reader) in enumerate(plan.readers(path)):
            with contextlib.closing(reader):
                rows = _StagedRows(conn, f"staged_{number}", reader.typed_cells, True)
                complete = rows.read(reader, enough=enough) and not cut
                bytes_read = reader.bytes_read
            if sheet is None or reader.header:
                break  # a worksheet with data, or the one table of a file
        else:
            raise ReadError(f"{plan.source} is a workbook with no data in any of its sheets.")
        columns = clean_headers(reader.header, rows.width)
        types, checks = chosen_types(columns, rows.final_types(), options, plan.source)
        table = rows.convert(columns, types, checked=checks)
        _refuse_misfits(conn, [table], columns, types, checks, plan.source)
        answer["rows"] = [list(row) for row in conn.execute(f"SELECT * FROM {table} LIMIT {PREVIEW_ROWS}")]
        answer["columns"] = [
            {"name": name, "type": kind, "why": checks.get(i) or _why_text(rows, i, kind)}
            for i, (name, kind) in enumerate(zip(columns, types))
        ]
    answer.update(rows_read=rows.rows, complete=complete)
    if sheet is not None:
        answer["sheet"] = sheet
        answer["rows_estimate"] = rows.rows if complete else next(
            (s["rows_estimate"] for s in answer["sheets"] if s["name"] == sheet), None
        )
    elif complete:
        answer["rows_estimate"] = rows.rows
    elif not cut and bytes_read:
        answer["rows_estimate"] = round(rows.rows * os.path.getsize(path) / bytes_read)
    return answer


def _shown_encoding(encoding):
    """An encoding as the user names it: utf-8, not the utf-8-sig that also reads a byte order mark."""
    return "utf-8" if encoding == "utf-8-sig" else encoding


def _why_text(rows, i, kind):
    """Why a column of text cells is TEXT when its values look like numbers: the first value
    with leading zeros, or else the first that is not a number among others that are; or None."""
    if kind != _TEXT or rows.typed_cells:
        return None
    values = [
        value for (value,) in rows.conn.execute(
            f"SELECT c{i + 1} FROM {rows.name} WHERE c{i + 1} <> '' LIMIT {PREVIEW_REASON_VALUES}"
        )
    ]
    for value in values:
        digits = value.lstrip("-")
        if digits[:1] == "0" and digits[1:2].isdigit() and digits.replace(".", "", 1).isdigit():
            return f"leading zeros ({_shorten(value, 40)})"
    kinds = [column_type([value]) for value in values]
    if _TEXT not in kinds or not any(k in (_INTEGER, _REAL) for k in kinds):
        return None  # no numbers, or the value that is no number comes later
    value = values[kinds.index(_TEXT)]
    if value.lstrip("-").replace(".", "", 1).isdigit():
        return f"more digits than a number holds ({_shorten(value, 40)})"
    return f"text among the numbers ({_shorten(value, 40)})"


_DIMENSION = re.compile(rb"<(?:\w+:)?dimension\s+ref=\"[A-Za-z]*(\d+)(?::[A-Za-z]*(\d+))?\"")


def _sheet_sizes(path, sheets):
    """[{"name", "rows_estimate"}] of each worksheet: the rows below the first that its
    dimension says it spans, or None when it says nothing."""
    sizes = []
    with zipfile.ZipFile(path) as archive:
        for name, member in sheets:
            with archive.open(member) as part:
                found = _DIMENSION.search(part.read(BINARY_SNIFF_BYTES))
            estimate = None
            if found:
                first, last = int(found.group(1)), int(found.group(2) or found.group(1))
                estimate = max(0, last - first)
            sizes.append({"name": name, "rows_estimate": estimate})
    return sizes


# ===== Import progress =====
#
# What /-/import-progress shows and /-/cancel-import stops, in memory.


# Finished imports kept for /-/import-progress; running ones are always kept.
PROGRESS_HISTORY = 50


def _now():
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class ImportProgress:
    """One import as /-/import-progress shows it; updated from worker threads."""

    id: int
    source: str
    database: str
    bytes_total: int = None
    table: str = None
    state: str = "running"
    rows: int = 0
    bytes_read: int = 0
    started: str = field(default_factory=_now)
    finished: str = None
    error: str = None
    skipped_lines: int = 0  # lines above the header that the import skipped
    sheet_tables: dict = None  # for a workbook: each worksheet's table

    cancelled: bool = False

    def update(self, rows=None, bytes_read=None):
        """Record progress; raise ImportCancelled once the user has cancelled.

        The engine calls this every batch and the download every chunk, so a
        cancelled import stops within a second and rolls back.
        """
        if self.cancelled:
            raise ImportCancelled(f"Import cancelled: {self.source}")
        self._record(rows, bytes_read)

    def _record(self, rows=None, bytes_read=None):
        if rows is not None:
            self.rows = rows
        if bytes_read is not None:
            # Buffered reads run ahead of the rows parsed; never past the end.
            self.bytes_read = min(bytes_read, self.bytes_total or bytes_read)

    def as_json(self, urls):
        data = {
            key: getattr(self, key)
            for key in ("id", "source", "database", "table", "state", "rows", "bytes_read",
                        "bytes_total", "started", "finished", "error", "skipped_lines")
        }
        # Where the page's Open link goes; for `temporary` the table is only
        # known once the import is done.
        data["path"] = urls.table(self.database, self.table) if self.state == "done" else None
        return data


class ImportLog:
    """Running imports and the last PROGRESS_HISTORY finished ones, in memory."""

    def __init__(self):
        self.items = collections.deque()
        self.ids = itertools.count(1)

    @contextlib.contextmanager
    def track(self, source, database, bytes_total=None):
        item = ImportProgress(next(self.ids), source, database, bytes_total)
        self.items.appendleft(item)
        try:
            yield item
        except ImportCancelled as e:
            self._finish(item, "cancelled", error=e.message)
            raise
        except APIError as e:
            self._finish(item, "failed", error=e.message)
            raise
        except Exception as e:
            fault = _server_fault(e)
            self._finish(item, "failed", error=fault.message)
            raise fault from e

    def done(self, item, results):
        """The import's tables are committed: a Cancel that came too late changes nothing.

        For a workbook, the first sheet's table is the one the import opens.
        """
        item.table = results[0].table
        if results[0].sheet is not None:
            item.sheet_tables = {result.sheet: result.table for result in results}
        item.skipped_lines = len(results[0].answer.get("skipped_lines", ()))
        item._record(rows=sum(result.rows for result in results), bytes_read=item.bytes_total)
        self._finish(item, "done")

    def cancel(self, import_id):
        """Mark a running import cancelled; it stops at its next progress update."""
        item = next((i for i in self.items if i.id == import_id), None)
        if item is None:
            raise APIError(f"No import has the id {import_id}.")
        if item.state != "running":
            raise APIError(f"Import {import_id} has already finished ({item.state}): {item.source}")
        item.cancelled = True
        return item

    def finished(self, import_id):
        """The import of that id, once it has finished."""
        item = next((i for i in self.items if i.id == import_id), None)
        if item is None:
            raise APIError(f"No import has the id {import_id}: it may be too old to be kept.")
        if item.state == "running":
            raise APIError(f"Import {import_id} is still running: wait for it to finish, or cancel it.")
        return item

    def _finish(self, item, state, error=None):
        item.error = error
        item.finished = _now()
        item.state = state
        finished = [i for i in self.items if i.state != "running"]
        for old in finished[PROGRESS_HISTORY:]:
            self.items.remove(old)

    def as_json(self, urls):
        return [item.as_json(urls) for item in list(self.items)]


_import_logs = weakref.WeakKeyDictionary()


def _import_log(datasette):
    if datasette not in _import_logs:
        _import_logs[datasette] = ImportLog()
    return _import_logs[datasette]


# ===== Pages for the desktop user =====
#
# What the hooks add to the desktop user's pages, beside the page assets at
# the end of the file: the page script's settings, and the database a page
# offers Import CSV into.


def _page_globals(**values):
    """Script that sets window.<name> to each value that is not None."""
    # "<" escaped, so no value can close the script element.
    return "".join(
        "window.{} = {};".format(name, json.dumps(value).replace("<", "\\u003c"))
        for name, value in values.items()
        if value is not None
    )


def _import_target(datasette, database, template, view_name):
    """The database whose page this is, when a CSV can be imported into it."""
    if view_name != "database" or not database or template.startswith("query"):
        return None
    db = datasette.databases.get(database)
    if db is None or not db.is_mutable or database in ("_internal", PLUGIN_DIRECTORY):
        return None
    return database


def _keep_html(datasette):
    """The line that turns keeping temporary on or off, with why its kept file was not used, if so."""
    db = datasette.get_database(TEMPORARY)
    if db.is_memory:
        text, keep, label = "Keep these tables after Datasette Desktop quits: ", "true", "Turn on"
        error = _keeper(datasette).error
    else:
        text, keep, label = f"These tables are kept in {_shown_path(db.path)}: ", "false", "Turn off"
        error = None
    return (
        f'<div class="app-support-keep"><p>{html.escape(text)}<button type="button" '
        f'class="app-support-button" data-keep="{keep}">{label}</button></p>'
        f'<p class="app-support-error"{"" if error else " hidden"}>{html.escape(error or "")}</p></div>'
    )


class _HTML(str):
    """Markup that Datasette's templates insert as it is (Jinja's __html__ protocol)."""

    def __html__(self):
        return self


def _attribute(value):
    return html.escape("" if value is None else str(value), quote=True)


# ===== The plugin directory and the welcome section =====
#
# The app's Plugins menu opens the plugin_directory database's plugins table,
# and its home page shows a welcome section with example CSVs. Both lists
# come from datasette.io (the plugin settings plugin_directory_url and
# example_csvs_url). A list is fetched in a worker thread, never while
# startup or a page waits, and a copy is kept on disk: the app restarts the
# server after every plugin install, and the list must be there at once,
# online or not. The HTML the pages show comes last here; the page script
# is DIRECTORY_SCRIPT, among the page assets.


# A list older than this is fetched again, in the background, when a page
# shows it; after a failed fetch, not before the Retry wait has passed.
LIST_MAX_AGE_SECONDS = 60 * 60
LIST_RETRY_SECONDS = 5 * 60
# Copies of fetched lists are kept in this folder of the temp directory. It
# is not a work folder, so a later start keeps it.
LIST_COPIES_FOLDER = "app-support-lists"


class RemoteList:
    """A JSON list of objects at a URL, fetched in a worker thread, its last copy kept on disk.

    items is the last copy, or None; fetched_at when it was fetched (seconds
    since the epoch); error why the last fetch failed, or None. One fetch
    runs at a time, and callers of refresh() share it. on_change(items) is
    awaited whenever a copy arrives.
    """

    def __init__(self, what, url, limits, on_change):
        self.what = what  # "plugin list", for messages
        self.url = url
        self.limits = limits  # limits(): the DownloadLimits, from the settings
        self.on_change = on_change
        self.items = None
        self.fetched_at = None
        self.error = None
        self.failed_at = None
        self._fetch = None

    @property
    def fetching(self):
        return self._fetch is not None

    async def load_copy(self):
        copy = await asyncio.to_thread(_read_list_copy, self.url)
        if copy is not None:
            self.items, self.fetched_at = copy
        await self.on_change(self.items or [])

    def refresh_if_stale(self):
        """Start a fetch in the background when the copy is missing or old; never wait for it."""
        now = time.time()
        stale = self.fetched_at is None or now - self.fetched_at > LIST_MAX_AGE_SECONDS
        waiting = self.failed_at is not None and now - self.failed_at < LIST_RETRY_SECONDS
        if stale and not waiting and self._fetch is None:
            self._fetch = asyncio.ensure_future(self._fetch_and_show())

    async def refresh(self):
        """Fetch the list now, or wait for the fetch under way; True when a new copy arrived."""
        if self._fetch is None:
            self._fetch = asyncio.ensure_future(self._fetch_and_show())
        return await asyncio.shield(self._fetch)

    async def _fetch_and_show(self):
        try:
            self.items, self.fetched_at = await asyncio.to_thread(
                _fetch_and_keep, self.url, self.limits(), self.what
            )
            self.error = self.failed_at = None
            await self.on_change(self.items)
            return True
        except APIError as e:
            self.error = e.message
        except Exception as e:
            self.error = _server_fault(e).message
        finally:
            self._fetch = None
        self.failed_at = time.time()
        return False


def _fetch_and_keep(url, limits, what):
    """Fetch the list at url and keep a copy on disk: (items, fetched_at)."""
    url = _check_url(url)
    with _work_folder() as folder:
        path, _, _ = download_file(url, folder, limits)
        try:
            with open(path, "rb") as f:
                items = json.load(f)
        except (ValueError, RecursionError):
            raise APIError(f"The {what} at {_shorten(url)} is not JSON.")
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise APIError(f"The {what} at {_shorten(url)} is not a JSON array of objects.")
    fetched_at = time.time()
    _write_list_copy(url, items, fetched_at)
    return items, fetched_at


def _list_copies_folder():
    """The folder for copies of fetched lists, or None when it is not safely this user's own."""
    folder = os.path.join(tempfile.gettempdir(), LIST_COPIES_FOLDER)
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        info = os.lstat(folder)
    except OSError:
        return None
    # In a shared /tmp another user could have made it, to plant a list.
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != getattr(os, "getuid", lambda: info.st_uid)():
        return None
    return folder


def _list_copy_path(folder, url):
    # Named for the URL: servers with different settings never share a copy.
    return os.path.join(folder, hashlib.sha256(url.encode("utf-8")).hexdigest()[:32] + ".json")


def _write_list_copy(url, items, fetched_at):
    """Keep a copy of a fetched list, written whole or not at all. A copy is a convenience: failing to write one is no error."""
    folder = _list_copies_folder()
    if folder is None:
        return
    partial = None
    try:
        fd, partial = tempfile.mkstemp(dir=folder, prefix=".partial-", suffix=".json")
        with open(fd, "w", encoding="utf-8") as f:
            json.dump({"url": url, "fetched_at": fetched_at, "items": items}, f)
        os.replace(partial, _list_copy_path(folder, url))
    except OSError:
        if partial:
            with contextlib.suppress(OSError):
                os.remove(partial)


def _read_list_copy(url):
    """The kept copy of the list at url, as (items, fetched_at), or None."""
    folder = _list_copies_folder()
    if folder is None:
        return None
    try:
        url = _check_url(url)
        with open(_list_copy_path(folder, url), encoding="utf-8") as f:
            copy = json.load(f)
        items, fetched_at = copy["items"], float(copy["fetched_at"])
    except (OSError, ValueError, KeyError, TypeError, APIError):
        return None
    if copy.get("url") != url or not isinstance(items, list):
        return None
    return [item for item in items if isinstance(item, dict)], fetched_at


def _age(seconds):
    """How long ago, in words: "just now", "5 minutes ago", "2 days ago"."""
    minutes = int(max(seconds, 0) // 60)
    for size, unit in ((24 * 60, "day"), (60, "hour"), (1, "minute")):
        if minutes >= size:
            count = minutes // size
            return f"{count} {unit}{'' if count == 1 else 's'} ago"
    return "just now"


# A PEP 440 version: epoch, release, pre-, post- and dev-release, local label.
_VERSION = re.compile(
    r"v?(?:(\d+)!)?(\d+(?:\.\d+)*)"
    r"(?:[-_.]?(a|b|c|rc|alpha|beta|pre|preview)[-_.]?(\d*))?"
    r"(?:-(\d+)|[-_.]?(?:post|rev|r)[-_.]?(\d*))?"
    r"(?:[-_.]?dev[-_.]?(\d*))?"
    r"(?:\+[a-z0-9]+(?:[-_.][a-z0-9]+)*)?",
    re.IGNORECASE,
)
_PRE_RELEASES = {"a": 0, "alpha": 0, "b": 1, "beta": 1, "c": 2, "rc": 2, "pre": 2, "preview": 2}


def version_key(text):
    """A sort key for a PEP 440 version, or None if it is not one: 0.10 > 0.9, 1.0a2 < 1.0."""
    match = _VERSION.fullmatch((text or "").strip())
    if not match:
        return None
    epoch, release, pre, pre_number, post_dash, post, dev = match.groups()
    numbers = [int(n) for n in release.split(".")]
    while len(numbers) > 1 and numbers[-1] == 0:
        numbers.pop()  # 1.0 is 1
    is_post = post_dash is not None or post is not None
    if pre:
        stage = (1, _PRE_RELEASES[pre.lower()], int(pre_number or 0))
    elif dev is not None and not is_post:
        stage = (0, 0, 0)  # 1.0.dev1 comes before 1.0a1
    else:
        stage = (2, 0, 0)
    return (
        int(epoch or 0),
        tuple(numbers),
        stage,
        (1, int(post_dash or post or 0)) if is_post else (0, 0),
        (0, int(dev or 0)) if dev is not None else (1, 0),
    )


def _is_newer(latest, version):
    new, old = version_key(latest), version_key(version)
    return new is not None and old is not None and new > old


def _normalized_name(name):
    """A distribution name as PEP 503 compares them: Datasette_Vega is datasette-vega."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _installed_plugins(datasette):
    """{normalized name: version, or None for a --plugins-dir module}, as /-/plugins.json lists them."""
    return {_normalized_name(p["name"]): p.get("version") for p in _listed_plugins(datasette)}


def _default_plugins():
    """The plugins the app installs itself, named in DATASETTE_DEFAULT_PLUGINS: no Uninstall."""
    return {_normalized_name(name) for name in os.environ.get("DATASETTE_DEFAULT_PLUGINS", "").split()}


# datasette.io's columns: the table has them even before there is a list.
PLUGIN_LIST_COLUMNS = (
    "name", "full_name", "owner", "description", "stargazers_count", "tag_name",
    "latest_release_at", "created_at", "openGraphImageUrl", "usesCustomOpenGraphImage",
    "downloads_this_week", "is_plugin", "is_tool",
)
# What the table adds to each plugin of the list.
PLUGIN_STATUS_COLUMNS = ("installed", "installed_version", "upgrade", "is_default")


def plugin_rows(plugins, installed, defaults):
    """The plugins table for a list: (columns, rows), each plugin with its installed version and status.

    installed maps normalized names to versions, defaults is a set of normalized names.
    """
    plugins = [p for p in plugins if isinstance(p.get("name"), str)]
    columns = dict.fromkeys(PLUGIN_LIST_COLUMNS)
    for plugin in plugins:
        columns.update((key, None) for key in plugin if key not in PLUGIN_STATUS_COLUMNS)
    columns = list(columns)
    rows = []
    for plugin in plugins:
        key = _normalized_name(plugin["name"])
        version = installed.get(key)
        status = [
            "installed" if key in installed else "not installed",
            version,
            "upgrade available" if key in installed and _is_newer(plugin.get("tag_name"), version) else None,
            int(key in defaults),
        ]
        cells = [_cell(plugin.get(column)) for column in columns]
        rows.append(cells[:1] + status + cells[1:])
    # The status next to the name, where its buttons are seen without scrolling.
    return columns[:1] + list(PLUGIN_STATUS_COLUMNS) + columns[1:], rows


def _cell(value):
    """A JSON value as SQLite stores it: arrays and objects as JSON text."""
    return json.dumps(value) if isinstance(value, (dict, list)) else value


def _fill_plugins_table(conn, columns, rows):
    """Replace the plugins table and its full-text index, in one transaction."""
    fts = _quote(PLUGINS_TABLE + "_fts")
    with _transaction(conn):
        conn.execute(f"DROP TABLE IF EXISTS {fts}")
        conn.execute(f"DROP TABLE IF EXISTS {_quote(PLUGINS_TABLE)}")
        conn.execute(f"CREATE TABLE {_quote(PLUGINS_TABLE)} ({', '.join(map(_quote, columns))})")
        marks = ", ".join("?" * len(columns))
        conn.executemany(f"INSERT INTO {_quote(PLUGINS_TABLE)} VALUES ({marks})", rows)
        # Datasette offers _search on a table whose FTS table names it as content.
        with contextlib.suppress(sqlite3.OperationalError):  # a SQLite without FTS5
            conn.execute(
                f"CREATE VIRTUAL TABLE {fts} USING fts5(name, description, "
                f"content={_quote(PLUGINS_TABLE)})"
            )
            conn.execute(f"INSERT INTO {fts}({fts}) VALUES ('rebuild')")


async def _show_plugin_list(datasette, plugins):
    columns, rows = plugin_rows(plugins, _installed_plugins(datasette), _default_plugins())
    db = datasette.get_database(PLUGIN_DIRECTORY)
    await _write_outside_transaction(
        db, lambda conn: _retry_while_locked(_fill_plugins_table, conn, columns, rows)
    )
    await _refresh_catalog(datasette)


@dataclass
class _Lists:
    plugins: RemoteList
    examples: RemoteList


def _lists(datasette):
    """The plugin list and the example CSVs of this Datasette, from its settings, shared by copies of this module."""
    return _shared_by_copies(datasette, "lists", lambda: _new_lists(datasette))


def _new_lists(datasette):
    config = datasette.plugin_config(PLUGIN_NAME) or {}

    def limits():
        return _download_limits(datasette)

    async def show_plugins(items):
        await _show_plugin_list(datasette, items)

    async def nothing_to_show(items):
        pass

    return _Lists(
        plugins=RemoteList(
            "plugin list", str(config.get("plugin_directory_url") or PLUGIN_DIRECTORY_URL),
            limits, show_plugins,
        ),
        examples=RemoteList(
            "list of example CSVs", str(config.get("example_csvs_url") or EXAMPLE_CSVS_URL),
            limits, nothing_to_show,
        ),
    )


_THIS_COPY = object()


def _is_first_copy(datasette):
    """False in the second of two copies of this module loaded into one server, whose output would repeat the first's."""
    return _shared_by_copies(datasette, "copy", lambda: _THIS_COPY) is _THIS_COPY


def _directory_status(datasette):
    """What the plugin directory page says of its list, for the page script."""
    plugins = _lists(datasette).plugins
    host = urllib.parse.urlsplit(plugins.url).hostname or plugins.url
    if plugins.items is not None:
        count = len(plugins.items)
        message = f"{count:,} plugin{'' if count == 1 else 's'}, listed by {host} {_age(time.time() - plugins.fetched_at)}."
    elif plugins.fetching:
        message = f"Fetching the plugin list from {host}…"
    else:
        message = f"There is no copy of the plugin list yet: it comes from {host}."
    return {
        "message": message,
        "error": plugins.error and f"The last attempt to fetch it failed. {plugins.error}",
        "hasCopy": plugins.items is not None,
        "fetching": plugins.fetching,
        "refreshUrl": datasette.urls.path("/-/refresh-plugin-directory"),
    }


def _is_plugin_directory_page(database, table, view_name):
    return database == PLUGIN_DIRECTORY and table == PLUGINS_TABLE and view_name in ("table", "row")


def _plugin_cell(row):
    """The installed column's cell: its text, and for the page script the plugin's name, versions and status."""
    keys = row.keys()
    plugin = {key: row[key] if key in keys else None for key in (
        "name", "tag_name", "installed", "installed_version", "upgrade", "is_default"
    )}
    if plugin["name"] is None:
        return None  # a page showing only some columns: the cell as it is
    installed = plugin["installed"] == "installed"
    text = "installed " + (plugin["installed_version"] or "") if installed else "not installed"
    data = {
        "name": plugin["name"],
        "latest": plugin["tag_name"],
        "installed": int(installed),
        "upgrade": int(plugin["upgrade"] is not None),
        "is-default": int(bool(plugin["is_default"])),
    }
    attributes = "".join(f' data-{key}="{_attribute(value)}"' for key, value in data.items())
    return _HTML(f'<span class="app-support-plugin"{attributes}>{html.escape(text.strip())}</span>')


def _href(url):
    """A link from a fetched list, if it is a web address (never javascript: or data:)."""
    if isinstance(url, str) and urllib.parse.urlsplit(url).scheme.lower() in ("http", "https"):
        return _attribute(url)
    return None


async def _welcome_html(datasette):
    """The welcome section of the desktop user's home page: the File menu, Run SQL, example CSVs."""
    examples = _lists(datasette).examples
    examples.refresh_if_stale()
    tables = set(await datasette.get_database(TEMPORARY).table_names())
    parts = [
        '<section class="app-support-welcome">',
        "<p>Welcome to Datasette Desktop. Get started by opening a <strong>CSV file</strong> or "
        "<strong>SQLite database file</strong> using the <em>File</em> menu.</p>",
        _keep_html(datasette),
    ]
    if not tables:
        parts.append(
            f'<p class="app-support-run-sql"><strong><a href="{_attribute(datasette.urls.database(TEMPORARY))}">'
            "Run SQL</a></strong> against a temporary database</p>"
        )
    shown = [
        _example_html(datasette, example, tables) for example in examples.items or []
        if all(isinstance(example.get(key), str) for key in ("name", "table_name"))
        and _href(example.get("url"))
    ]
    if shown:
        parts += [
            '<details class="app-support-examples" open>',
            "<summary>Or try importing an example CSV</summary>",
            "<ul>", *shown, "</ul>", "</details>",
        ]
    parts.append("</section>")
    return "\n".join(parts)


def _example_html(datasette, example, tables):
    table = example["table_name"]
    parts = [f"<li><h3>{html.escape(example['name'])}</h3>"]
    if isinstance(example.get("description"), str):
        parts.append(f"<p>{html.escape(example['description'])}</p>")
    source = _href(example.get("source_url"))
    if source:
        label = example.get("source") if isinstance(example.get("source"), str) else example["source_url"]
        parts.append(f'<p><strong>Source</strong>: <a href="{source}">{html.escape(label)}</a></p>')
    if table in tables:
        link = _attribute(datasette.urls.table(TEMPORARY, table))
        parts.append(f'<p><strong>Already imported</strong>: <a href="{link}">{html.escape(table)}</a></p>')
    else:
        # Hidden until the page script finds the app's importCsvFromUrl.
        parts.append(
            '<button type="button" class="app-support-button app-support-import-example" hidden '
            f'data-csvurl="{_href(example["url"])}" data-name="{_attribute(example["name"])}" '
            f'data-tablename="{_attribute(table)}">Import</button>'
        )
    parts.append("</li>")
    return "".join(parts)


# ===== Endpoints =====
#
# One handler per route, in the order of ROUTES. A POST handler takes the
# request's JSON object and answers a dict, which becomes {"ok": true, ...}.


async def auth_app_user(datasette, data):
    values = _checked_body(data, required={}, optional={"redirect": str})
    redirect = values["redirect"] or "/"
    if not redirect.startswith("/") or redirect.startswith(("//", "/\\")) or any(
        c < " " or c == "\\" for c in redirect
    ):
        redirect = "/"
    response = Response.redirect(redirect)
    response.set_cookie(
        "ds_actor", datasette.sign({"a": ROOT_ACTOR}, "actor"), httponly=True, samesite="lax"
    )
    await _track_event(datasette, "LoginEvent")
    return response


async def open_database_file(datasette, data):
    path = _existing_file(_checked_body(data, required={"path": str}, optional={})["path"])
    _refuse_uri_characters(path)
    _refuse_already_open(datasette, path)
    await asyncio.to_thread(_check_sqlite_file, path)
    _refuse_already_open(datasette, path)  # a second request may have won the race
    db = datasette.add_database(_file_database(datasette, path))
    await _refresh_catalog(datasette)
    return {"ok": True, "path": datasette.urls.database(db.name)}


async def new_empty_database_file(datasette, data):
    path = _new_file(_checked_body(data, required={"path": str}, optional={})["path"])
    _refuse_uri_characters(path)
    await asyncio.to_thread(_create_empty_database, path)
    db = datasette.add_database(_file_database(datasette, path))
    await _refresh_catalog(datasette)
    return {"ok": True, "path": datasette.urls.database(db.name)}


# What every import endpoint takes beside its own keys.
IMPORT_KEYS = {"table_name": str, "detect_types": bool, **READING_OPTIONS}


async def open_csv_file(datasette, data):
    values = _checked_body(data, required={"path": str}, optional=IMPORT_KEYS)
    return await _import_local_file(datasette, values["path"], TEMPORARY, values)


async def import_csv_file(datasette, data):
    values = _checked_body(data, required={"path": str, "database": str}, optional=IMPORT_KEYS)
    return await _import_local_file(datasette, values["path"], values["database"], values)


async def open_csv_from_url(datasette, data):
    values = _checked_body(
        data, required={"url": str}, optional={"table_name": str, "database": str, **IMPORT_KEYS}
    )
    return await _import_url(datasette, values["url"], values["database"] or TEMPORARY, values)


async def preview_import(datasette, data):
    values = _checked_body(
        data, required={}, optional={"path": str, "url": str, "table_name": str, **READING_OPTIONS}
    )
    if (values["path"] is None) == (values["url"] is None):
        raise APIError("Send either path, the full path of a file, or url, the address of one.")
    options = _import_options({**values, "if_exists": None})
    if values["path"] is not None:
        path = _existing_file(values["path"])
        async with _work_folder_off_loop() as folder:
            answer, unpacked = await asyncio.to_thread(
                _preview_local_file, path, folder, options, _unpacked_limit_mb(datasette)
            )
        wanted = _local_table_name(path, unpacked)
    else:
        url = _check_url(values["url"])
        limits = _download_limits(datasette)
        async with _kept_download(datasette, url, limits, keep=True) as (path, final_url, charset):
            answer = await asyncio.to_thread(
                preview_file, path, options, charset, final_url, _unpacked_limit_mb(datasette)
            )
        wanted = _table_name_from_url(final_url)
    answer["table_name"] = _table_name(values["table_name"] or wanted)
    return {"ok": True, **{key: answer.pop(key) for key in PREVIEW_ANSWER_ORDER}, **answer}


async def import_again(datasette, data):
    values = _checked_body(
        data, required={"id": int}, optional={k: v for k, v in READING_OPTIONS.items() if k != "if_exists"}
    )
    item = _import_log(datasette).finished(values["id"])
    # Into the table it made, in place; or, after a failure, into a new one.
    table = item.table
    if item.sheet_tables is not None:  # a workbook: the table of the sheet read again
        sheet = values["sheet"] or next(iter(item.sheet_tables))
        # A sheet this import did not make a table of gets the name a whole-workbook import gives it.
        table = item.sheet_tables.get(sheet) or f"{Path(item.source).stem}_{sheet}"
    again = {**values, "table_name": table, "if_exists": "replace" if table else None}
    if re.match(r"https?://", item.source, re.IGNORECASE):
        return await _import_url(datasette, item.source, item.database, again)
    return await _import_local_file(datasette, item.source, item.database, again)


DUMP_ACTION = "save the temporary database to"


async def dump_temporary_to_file(datasette, data):
    path = _new_file(_checked_body(data, required={"path": str}, optional={})["path"])
    # Written under a name of its own in the same folder, so a failed dump
    # never leaves a partial file at path that would refuse the retry.
    partial = os.path.join(os.path.dirname(path), f".app_support-{uuid.uuid4().hex[:12]}.partial")
    try:
        await asyncio.to_thread(_create_partial, partial, path, DUMP_ACTION)
        async with _temporary_held(datasette, TEMPORARY):
            await _vacuum_into(datasette.get_database(TEMPORARY), partial, path)
        await asyncio.to_thread(_move_into_place, partial, path, DUMP_ACTION)
    finally:
        await asyncio.to_thread(_remove_partial, partial)
    return {"ok": True, "path": path}


def _create_partial(partial, path, action, mode=0o644):
    """Create the empty file that VACUUM INTO will fill, before it becomes path.

    VACUUM INTO accepts an empty file; creating it first gives a clear
    OSError for a read-only or full disk, and the file the mode asked for.
    """
    try:
        os.close(os.open(partial, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode))
    except OSError as e:
        raise _sqlite_failure(e, action, path)


async def _vacuum_into(db, partial, path):
    def vacuum_into(conn):
        conn.execute("vacuum into ?", [partial])

    try:
        await _write_outside_transaction(db, vacuum_into)
    except sqlite3.Error as e:
        raise _sqlite_failure(e, DUMP_ACTION, path)


def _move_into_place(partial, path, action):
    """Give the finished copy its name, never over a file that appeared meanwhile."""
    try:
        os.link(partial, path)  # fails if path exists, unlike rename
        return
    except FileExistsError:
        raise APIError(f"File already exists: {_shorten(path)}")
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK):
            raise _sqlite_failure(e, action, path)
    # A file system without hard links (FAT, exFAT): check, then rename.
    if os.path.lexists(path):
        raise APIError(f"File already exists: {_shorten(path)}")
    try:
        os.rename(partial, path)
    except OSError as e:
        raise _sqlite_failure(e, action, path)


def _remove_partial(partial):
    for leftover in (partial, partial + "-journal", partial + "-wal", partial + "-shm"):
        if os.path.lexists(leftover):  # removing a missing file on a read-only disk is EROFS
            os.remove(leftover)


async def restore_temporary_from_file(datasette, data):
    path = _existing_file(_checked_body(data, required={"path": str}, optional={})["path"])
    async with _temporary_held(datasette, TEMPORARY):
        return await _restore_temporary(datasette, path)


async def _restore_temporary(datasette, path):
    db = datasette.get_database(TEMPORARY)
    page_size, pages = (await db.execute("select * from pragma_page_size, pragma_page_count")).first()
    if db.is_memory:  # a kept temporary grows on disk instead
        # The backup takes the place of what temporary holds now.
        need = MEMORY_PER_TABLE_BYTE * (os.path.getsize(path) - page_size * pages)
        await asyncio.to_thread(_check_room_in_memory, need, (
            f"The backup {_shorten(path)} needs about {{need}} more memory to restore into the "
            "temporary database, and {free}, so nothing was restored. Open it as a database "
            "file instead (File → Open Database…)."
        ))
    async with _work_folder_off_loop() as folder:
        # temporary is replaced only from a checked copy that already has its
        # page size and encoding, so the last step has nothing left to fail on.
        copy_path = os.path.join(folder, "restore.db")
        backup_tables = await asyncio.to_thread(_prepare_restore, path, copy_path, page_size)

        def restore(conn):
            copy = sqlite3.connect(copy_path)
            try:
                copy.backup(conn)
            finally:
                copy.close()
            return _table_names(conn)

        try:
            restored_tables = await _write_outside_transaction(db, restore)
        except sqlite3.Error as e:
            raise _sqlite_failure(e, "restore the temporary database from", path)
    await _refresh_catalog(datasette)
    return {
        "ok": True,
        "path": path,
        "restored_tables": restored_tables,
        "backup_tables": backup_tables,
    }


def _prepare_restore(path, copy_path, page_size):
    """Check the backup at path through and through, then copy it to copy_path.

    The copy gets page_size, which the backup API needs to write into an
    in-memory database. Returns the backup's table names.
    """
    damaged = f"The backup {_shorten(path)} is damaged, so nothing was restored"
    _check_sqlite_file(path, damaged)
    try:
        source = _connect_readonly(path)
        try:
            own_page_size = source.execute("pragma page_size").fetchone()[0]
            db_encoding = source.execute("pragma encoding").fetchone()[0]
            if db_encoding != "UTF-8":
                raise APIError(
                    f"The backup {_shorten(path)} stores its text as {db_encoding}; only UTF-8 "
                    "databases can be restored, so nothing was restored."
                )
            problems = [row[0] for row in source.execute("pragma integrity_check(3)")]
            if problems != ["ok"]:
                raise APIError(f"{damaged}: {_shorten(problems[0])}")
            tables = _table_names(source)
            copy = sqlite3.connect(copy_path, isolation_level=None)
            try:
                source.backup(copy)
                copy.execute("pragma journal_mode = delete")
                if own_page_size != page_size:
                    # PRAGMA takes no bound parameters; page_size is SQLite's own integer.
                    copy.execute(f"pragma page_size = {int(page_size)}")
                    copy.execute("vacuum")
            finally:
                copy.close()
        finally:
            source.close()
    except sqlite3.DatabaseError as e:
        if isinstance(e, sqlite3.OperationalError):
            raise _sqlite_failure(e, "restore the temporary database from", path)
        raise APIError(f"{damaged}: {e}.")
    return tables


async def keep_temporary_state(datasette):
    return _kept_state(datasette)


async def keep_temporary(datasette, data):
    keep = _checked_body(data, required={"keep": bool}, optional={})["keep"]
    keeper = _keeper(datasette)
    # Waits for an import's last step, a restore or another switch to finish.
    async with _temporary_held(datasette, TEMPORARY):
        kept = not datasette.get_database(TEMPORARY).is_memory
        if keep and not kept:
            await _start_keeping(datasette, keeper)
        elif kept and not keep:
            await _stop_keeping(datasette, keeper)
    return _kept_state(datasette)


async def import_progress(datasette):
    return {"ok": True, "imports": _import_log(datasette).as_json(datasette.urls)}


# How long POST /-/cancel-import waits for the import to stop before answering.
CANCEL_WAIT_SECONDS = 5


async def cancel_import(datasette, data):
    import_id = _checked_body(data, required={"id": int}, optional={})["id"]
    item = _import_log(datasette).cancel(import_id)
    # Answer with how it ended, so the page need not poll to find out.
    clock = asyncio.get_running_loop().time
    deadline = clock() + CANCEL_WAIT_SECONDS
    while item.state == "running" and clock() < deadline:
        await asyncio.sleep(0.05)
    if item.state == "done":
        raise APIError(f"The import finished before it could be cancelled: {item.source}")
    return {"ok": True, "import": item.as_json(datasette.urls)}


async def refresh_plugin_directory(datasette, data):
    _checked_body(data, required={}, optional={})
    plugins = _lists(datasette).plugins
    if not await plugins.refresh():
        # The page keeps the last copy; this says why there is no newer one.
        raise APIError(plugins.error, status=502)
    return {"ok": True, "plugins": len(plugins.items), "path": datasette.urls.table(PLUGIN_DIRECTORY, PLUGINS_TABLE)}


async def page_script(datasette):
    return _asset_response(PAGE_SCRIPT, "application/javascript")


async def directory_script(datasette):
    return _asset_response(DIRECTORY_SCRIPT, "application/javascript")


async def page_style(datasette):
    return _asset_response(PAGE_STYLE, "text/css")


def _asset_response(body, content_type):
    # The URL carries ASSET_VERSION, so a changed asset has a new URL.
    return Response(
        body, content_type=content_type, headers={"Cache-Control": "max-age=31536000, immutable"}
    )


# ===== Routes =====


@dataclass(frozen=True)
class Route:
    path: str
    method: str
    caller: str  # who may call it: APP, APP_OR_USER or ANYONE
    handler: object  # handler(datasette), or handler(datasette, body) for a POST


ROUTES = [
    Route("/-/auth-app-user", "POST", APP, auth_app_user),
    Route("/-/open-database-file", "POST", APP, open_database_file),
    Route("/-/new-empty-database-file", "POST", APP, new_empty_database_file),
    Route("/-/open-csv-file", "POST", APP, open_csv_file),
    Route("/-/import-csv-file", "POST", APP, import_csv_file),
    Route("/-/open-csv-from-url", "POST", APP, open_csv_from_url),
    Route("/-/preview-import", "POST", APP_OR_USER, preview_import),
    Route("/-/import-again", "POST", APP_OR_USER, import_again),
    Route("/-/dump-temporary-to-file", "POST", APP, dump_temporary_to_file),
    Route("/-/restore-temporary-from-file", "POST", APP, restore_temporary_from_file),
    Route("/-/keep-temporary", "GET", APP_OR_USER, keep_temporary_state),
    Route("/-/keep-temporary", "POST", APP_OR_USER, keep_temporary),
    Route("/-/import-progress", "GET", APP_OR_USER, import_progress),
    Route("/-/cancel-import", "POST", APP_OR_USER, cancel_import),
    Route("/-/refresh-plugin-directory", "POST", APP_OR_USER, refresh_plugin_directory),
    Route("/-/app-support.js", "GET", ANYONE, page_script),
    Route("/-/app-support-directory.js", "GET", ANYONE, directory_script),
    Route("/-/app-support.css", "GET", ANYONE, page_style),
]
_APP_ONLY_PATHS = {route.path for route in ROUTES if route.caller == APP}


def _view(routes):
    """The view of a path's routes, one per method: its callers checked first, every failure as JSON.

    A POST handler gets the request's JSON object as its second argument.
    """
    by_method = {route.method: route for route in routes}
    allowed = " or ".join(by_method)

    async def view(request, datasette):
        route = by_method.get(request.method)
        if route is None:
            response = _error_response(f"Use {allowed} for {request.path}.", 405)
            response.headers["Allow"] = ", ".join(by_method)
            return response
        try:
            _AUTHENTICATE[route.caller](request)
            body = [await _read_json_object(request)] if route.method == "POST" else []
            result = await route.handler(datasette, *body)
        except APIError as e:
            return _error_response(e.message, e.status)
        except Exception as e:
            fault = _server_fault(e)
            return _error_response(fault.message, fault.status)
        return result if isinstance(result, Response) else Response.json(result)

    return view


# ===== Hooks =====


@hookimpl
def startup(datasette):
    if "_memory" in datasette.databases:
        datasette.remove_database("_memory")

    async def add_databases_remove_leftovers_and_load_lists():
        # Before the first request: temporary, from its kept file when there is one.
        if TEMPORARY not in datasette.databases:
            await _open_temporary(datasette)
        if PLUGIN_DIRECTORY not in datasette.databases:
            # A memory name of its own, as _temporary_database explains.
            memory_name = f"{PLUGIN_DIRECTORY}_{uuid.uuid4().hex}"
            datasette.add_database(_memory_database(datasette, memory_name), name=PLUGIN_DIRECTORY)
        await asyncio.to_thread(_remove_leftover_work_folders)
        # The copies kept on disk, at once; the network only when a page asks.
        lists = _lists(datasette)
        await lists.plugins.load_copy()
        await lists.examples.load_copy()

    return add_databases_remove_leftovers_and_load_lists


@hookimpl
def register_routes():
    paths = dict.fromkeys(route.path for route in ROUTES)
    return [
        ("^" + re.escape(path) + "$", _view([route for route in ROUTES if route.path == path]))
        for path in paths
    ]


@hookimpl
def skip_csrf(scope):
    # Datasette 0.65's CSRF check would answer a request that carries a cookie
    # but no Bearer token with an HTML page; the app's routes need the token
    # anyway, and answer its absence with JSON. Routes the desktop user's
    # pages call with the cookie keep the check.
    return scope.get("path") in _APP_ONLY_PATHS


@hookimpl
def asgi_wrapper():
    paths = {route.path for route in ROUTES}
    return lambda app: _csrf_refusals_as_json(app, paths)


@hookimpl
def extra_css_urls(request, datasette):
    # Only the desktop user's pages: others get no script, so no polling.
    if not _is_app_user(request):
        return []
    return [datasette.urls.path(f"/-/app-support.css?v={ASSET_VERSION}")]


@hookimpl
def extra_js_urls(database, table, view_name, request, datasette):
    if not _is_app_user(request):
        return []
    urls = [datasette.urls.path(f"/-/app-support.js?v={ASSET_VERSION}")]
    if view_name == "index" or _is_plugin_directory_page(database, table, view_name):
        urls.append(datasette.urls.path(f"/-/app-support-directory.js?v={ASSET_VERSION}"))
    return urls


@hookimpl
def extra_body_script(template, database, table, view_name, request, datasette):
    if not _is_app_user(request):
        return None
    config = {
        "progressUrl": datasette.urls.path("/-/import-progress"),
        "cancelUrl": datasette.urls.path("/-/cancel-import"),
        "previewUrl": datasette.urls.path("/-/preview-import"),
        "importAgainUrl": datasette.urls.path("/-/import-again"),
        "csrftoken": _csrftoken(request),
        "importDatabase": _import_target(datasette, database, template, view_name),
        "keepUrl": datasette.urls.path("/-/keep-temporary"),
        # The home page's comes in its welcome section.
        "keepHtml": _keep_html(datasette) if database == TEMPORARY and view_name == "database" else None,
    }
    directory = None
    if _is_plugin_directory_page(database, table, view_name):
        _lists(datasette).plugins.refresh_if_stale()
        directory = {"csrftoken": config["csrftoken"], "directory": _directory_status(datasette)}
    elif view_name == "index":
        directory = {"welcomeHtml": None}

    async def script():
        if directory and "welcomeHtml" in directory and _welcome_in_page_script():
            directory["welcomeHtml"] = await _welcome_html(datasette)
        return _page_globals(appSupport=config, appSupportDirectory=directory)

    return script


@hookimpl
def top_homepage(datasette, request):
    # Datasette 1.0 only; on 0.65 the page script places the welcome section.
    if not _is_app_user(request) or not _is_first_copy(datasette):
        return None
    return _welcome_html(datasette)


@hookimpl
def render_cell(row, value, column, table, database, datasette):
    if database == PLUGIN_DIRECTORY and table == PLUGINS_TABLE and column == "installed":
        return _plugin_cell(row)
    return None


@hookimpl
def permission_resources_sql(actor):
    # Datasette 1.0 gives root every permission only under --root; the
    # desktop user must be able to run SQL, create tables and use writing
    # plugins. Everyone else keeps Datasette's defaults.
    if PermissionSQL is not None and actor and actor.get("id") == ROOT_ACTOR["id"]:
        return PermissionSQL.allow(reason="app_support: the Datasette Desktop user")
    return None


@hookimpl
def permission_allowed(action, resource):
    # Datasette 0.65 shows _internal to root; the desktop user is root.
    if action == "view-database" and resource == "_internal":
        return False
    return None


# ===== Page assets =====
#
# The import panel, the Import CSV button, the plugin directory's buttons and
# the welcome section's: the script and style the hooks add to the desktop
# user's pages. Plain script and style, no build.


# What every page script begins with: its own scope, and a helper that
# makes an element.
_SCRIPT_START = r"""(function () {
  function element(tag, className, text) {
    var el = document.createElement(tag);
    if (className) {
      el.className = className;
    }
    if (text) {
      el.textContent = text;
    }
    return el;
  }

"""


def _page_script(title, body):
    """A page script: a comment naming it, then body in a scope of its own with _SCRIPT_START's helper."""
    return f"/* app_support: {title} */\n{_SCRIPT_START}{body.lstrip(chr(10))}}})();\n"


PAGE_SCRIPT = _page_script("import progress, Cancel, Import CSV and keeping temporary, for Datasette Desktop.", r"""
  var IDLE_POLL_MS = 5000;
  var BUSY_POLL_MS = 750;
  var config = null;
  var panel = null;
  var timer = null;
  var running = false;
  // Imports this page saw running: only these are shown once they end; and,
  // when the page opens, one that has just failed, or has just filled the
  // table the page shows, as the app opens a table at once.
  var RECENT_MS = 60000;
  var watched = {};
  var dismissed = {};
  var firstRender = true;
  try {
    dismissed = JSON.parse(sessionStorage.getItem("appSupportDismissed") || "{}");
  } catch (e) {
    dismissed = {};
  }

  function justFinished(item) {
    if (!item.finished || Date.now() - Date.parse(item.finished) > RECENT_MS) {
      return false;
    }
    return item.state === "failed" || (item.state === "done" && item.path === location.pathname);
  }

  function fileName(source) {
    if (/^https?:/i.test(source)) {
      return source;
    }
    return source.split(/[\\/]/).filter(Boolean).pop() || source;
  }

  function formatNumber(n) {
    return n.toLocaleString("en-US");
  }

  function percent(item) {
    if (!item.bytes_total) {
      return null;
    }
    return Math.min(100, Math.floor((100 * item.bytes_read) / item.bytes_total));
  }

  function statusText(item) {
    var rows = formatNumber(item.rows) + (item.rows === 1 ? " row" : " rows");
    if (item.state === "running") {
      var p = percent(item);
      return "Importing: " + rows + (p === null ? "" : ", " + p + "%");
    }
    if (item.state === "done") {
      var skipped = item.skipped_lines
        ? " Skipped " + formatNumber(item.skipped_lines) +
          (item.skipped_lines === 1 ? " line" : " lines") + " above the header."
        : "";
      return "Imported " + rows + " into " + item.table + "." + skipped;
    }
    return item.error || "The import failed.";
  }

  function buildItem(item) {
    var box = element("div", "app-support-import");
    box.dataset.id = item.id;
    var name = element("div", "app-support-source", fileName(item.source));
    name.title = item.source;
    var bar = element("progress", "app-support-bar");
    bar.max = 100;
    var status = element("p", "app-support-status");
    status.setAttribute("aria-live", "polite");
    var actions = element("div", "app-support-actions");
    box.append(name, bar, status, actions);
    return box;
  }

  function updateItem(box, item) {
    var bar = box.querySelector("progress");
    var p = percent(item);
    bar.hidden = item.state !== "running";
    if (p === null) {
      bar.removeAttribute("value");  // no value: an indeterminate bar
    } else {
      bar.value = p;
    }
    var status = box.querySelector(".app-support-status");
    var text = statusText(item);
    if (status.textContent !== text) {
      status.textContent = text;
    }
    box.className = "app-support-import app-support-" + item.state;
    if (box.dataset.state !== item.state) {
      box.dataset.state = item.state;
      showActions(box.querySelector(".app-support-actions"), item);
    }
  }

  function showActions(actions, item) {
    actions.textContent = "";
    if (item.state === "running") {
      var cancel = element("button", "app-support-button", "Cancel");
      cancel.type = "button";
      cancel.addEventListener("click", function () {
        cancelImport(item.id, cancel);
      });
      actions.append(cancel);
      return;
    }
    if (item.state === "done" && item.path) {
      var open = element("a", "app-support-open", "Open " + item.table);
      open.href = item.path;
      actions.append(open);
    }
    if (item.state === "done" || item.state === "failed") {
      var change = element("button", "app-support-button app-support-change", "Change how it was read…");
      change.type = "button";
      change.addEventListener("click", function () {
        openReadingDialog(item);
      });
      actions.append(change);
    }
    var close = element("button", "app-support-button", "Dismiss");
    close.type = "button";
    close.addEventListener("click", function () {
      dismissed[item.id + "@" + item.started] = true;  // ids start again with the server
      try {
        sessionStorage.setItem("appSupportDismissed", JSON.stringify(dismissed));
      } catch (e) {
        // Storage may be off; the line then comes back on the next page.
      }
      var box = actions.parentNode;
      box.remove();
      panel.hidden = !panel.firstChild;
    });
    actions.append(close);
  }

  function render(imports) {
    running = false;
    var shown = {};
    var newest = {};  // imports come newest first: an older one of the same table or file is old news
    imports.forEach(function (item) {
      if (item.state === "running") {
        running = true;
        watched[item.id] = true;
      }
      var key = item.path || item.source;
      if (firstRender && !newest[key] && justFinished(item)) {
        watched[item.id] = true;
      }
      newest[key] = true;
      if (!watched[item.id] || dismissed[item.id + "@" + item.started]) {
        return;
      }
      shown[item.id] = true;
      var box = panel.querySelector('[data-id="' + item.id + '"]');
      if (!box) {
        box = buildItem(item);
        panel.append(box);
      }
      updateItem(box, item);
    });
    Array.from(panel.children).forEach(function (box) {
      if (!shown[box.dataset.id]) {
        box.remove();
      }
    });
    panel.hidden = !panel.firstChild;
    firstRender = false;
  }

  function poll() {
    clearTimeout(timer);
    fetch(config.progressUrl, { credentials: "same-origin", cache: "no-store" })
      .then(function (response) {
        return response.ok ? response.json() : null;
      })
      .then(function (data) {
        if (data && data.imports) {
          render(data.imports);
        }
      })
      .catch(function () {
        // The server may be restarting; try again later.
      })
      .then(scheduleNextPoll);
  }

  function scheduleNextPoll() {
    clearTimeout(timer);
    if (!document.hidden) {
      timer = setTimeout(poll, running ? BUSY_POLL_MS : IDLE_POLL_MS);
    }
  }

  function post(url, body) {
    return fetch(url, {
      method: "POST",
      credentials: "same-origin",
      // Datasette 0.65 checks this header against its ds_csrftoken cookie.
      headers: { "x-csrftoken": config.csrftoken },
      body: JSON.stringify(body),
    });
  }

  function cancelImport(id, button) {
    button.disabled = true;
    button.textContent = "Cancelling…";
    post(config.cancelUrl, { id: id })
      .then(function (response) {
        if (!response.ok) {
          // Refused, or too late: the next poll shows what really happened.
          button.disabled = false;
          button.textContent = "Cancel";
        }
      })
      .catch(function () {})
      .then(poll);
  }

  function addImportButton() {
    var app = window.datasetteApp;
    var header = document.querySelector(".page-header");
    if (!config.importDatabase || !app || typeof app.importCsv !== "function" || !header) {
      return;
    }
    var button = element("button", "app-support-button app-support-import-csv", "Import CSV");
    button.type = "button";
    button.addEventListener("click", function () {
      app.importCsv(config.importDatabase);
    });
    var wrapper = element("p", "app-support-import-csv-row");
    wrapper.append(button);
    // Below Datasette 1.0's "Database actions" menu, which follows the header.
    var next = header.nextElementSibling;
    (next && next.classList.contains("page-action-menu") ? next : header).after(wrapper);
  }

  function addKeepLine() {
    var header = document.querySelector(".page-header");
    if (config.keepHtml && header) {
      // Below the Import CSV button, which follows the header.
      (document.querySelector(".app-support-import-csv-row") || header).insertAdjacentHTML(
        "afterend", config.keepHtml
      );
    }
  }

  function keepTemporary(button) {
    var error = button.closest(".app-support-keep").querySelector(".app-support-error");
    var keep = button.dataset.keep === "true";
    var label = button.textContent;
    button.disabled = true;
    button.textContent = keep ? "Turning on…" : "Turning off…";
    post(config.keepUrl, { keep: keep })
      .then(function (response) {
        return response.json();
      })
      .then(function (answer) {
        if (!answer.ok) {
          throw new Error(answer.error);
        }
        location.reload();  // every line and link as the database now is
      })
      .catch(function (e) {
        error.textContent = e.message || "The server did not answer. Try again.";
        error.hidden = false;
        button.disabled = false;
        button.textContent = label;
      });
  }

  // The dialog that shows how a finished import read its file, and reads it again.
  var ENCODINGS = ["utf-8", "cp1252", "iso8859-15", "mac-roman", "utf-16", "cp932", "euc_jp",
    "gb18030", "cp950", "cp949", "cp1251", "cp1250"];
  var DELIMITERS = [[",", "Comma (,)"], [";", "Semicolon (;)"], ["\t", "Tab"], ["|", "Pipe (|)"]];
  var TYPES = ["TEXT", "INTEGER", "REAL"];

  function labelled(text, control) {
    var label = element("label", "app-support-field", text + " ");
    label.append(control);
    return label;
  }

  function select(choices, value) {
    var box = element("select");
    choices.forEach(function (choice) {
      var pair = Array.isArray(choice) ? choice : [choice, choice];
      var option = element("option", "", pair[1]);
      option.value = pair[0];
      box.append(option);
    });
    if (value !== null && value !== undefined) {
      if (!choices.some(function (c) { return (Array.isArray(c) ? c[0] : c) === value; })) {
        var extra = element("option", "", value);
        extra.value = value;
        box.append(extra);
      }
      box.value = value;
    }
    return box;
  }

  function openReadingDialog(item) {
    var old = document.querySelector(".app-support-dialog");
    if (old) {
      old.remove();
    }
    var source = /^https?:/i.test(item.source) ? { url: item.source } : { path: item.source };
    var chosen = {};  // only what the user changed; the rest is the import's own choice
    var types = {};
    var answer = null;
    var busy = false;
    var previews = 0;  // the number of the latest preview asked for
    var dialog = element("dialog", "app-support-dialog");
    dialog.setAttribute("aria-labelledby", "app-support-dialog-title");
    var title = element("h2", "", "Change how " + fileName(item.source) + " is read");
    title.id = "app-support-dialog-title";
    var fields = element("div", "app-support-fields");
    var error = element("p", "app-support-error");
    error.setAttribute("role", "alert");
    error.hidden = true;
    var summary = element("p", "app-support-summary");
    summary.setAttribute("aria-live", "polite");
    var table = element("table", "app-support-preview");
    var wrap = element("div", "app-support-preview-wrap");
    wrap.append(table);
    var again = element("button", "app-support-button app-support-import-again", "Import again");
    again.type = "button";
    var close = element("button", "app-support-button", "Close");
    close.type = "button";
    var buttons = element("div", "app-support-dialog-buttons");
    buttons.append(again, close);
    dialog.append(title, fields, error, summary, wrap, buttons);
    document.body.append(dialog);

    function options() {
      var body = Object.assign({}, chosen);
      if (Object.keys(types).length) {
        body.types = Object.assign({}, types);
      }
      if (answer && answer.sheet && !body.sheet) {
        body.sheet = answer.sheet;  // a workbook: the sheet the preview shows
      }
      return body;
    }

    function showError(message) {
      error.textContent = message;
      error.hidden = !message;
    }

    function change(key, value) {
      chosen[key] = value;
      types = {};  // the columns may change with the reading
      refresh();
    }

    function drawFields() {
      fields.textContent = "";
      var csv = answer.format === "csv" || answer.format === "tsv";
      if (answer.format !== "xlsx") {
        var encoding = select(ENCODINGS, chosen.encoding || answer.encoding);
        encoding.addEventListener("change", function () { change("encoding", encoding.value); });
        fields.append(labelled("Encoding", encoding));
      }
      if (csv) {
        var delimiter = select(DELIMITERS, chosen.delimiter || answer.delimiter);
        delimiter.addEventListener("change", function () { change("delimiter", delimiter.value); });
        var header = element("input");
        header.type = "checkbox";
        header.checked = answer.header !== false;
        header.addEventListener("change", function () { change("header", header.checked); });
        var headerLabel = element("label", "app-support-field");
        headerLabel.append(header, " First row is a header");
        var skip = element("input");
        skip.type = "number";
        skip.min = "0";
        skip.step = "1";
        skip.value = chosen.skip_lines === undefined ? "" : chosen.skip_lines;
        skip.placeholder = "as found (" + answer.skipped_lines.length + ")";
        skip.addEventListener("change", function () {
          if (skip.value === "") {
            delete chosen.skip_lines;
            types = {};
            refresh();
          } else if (/^[0-9]+$/.test(skip.value)) {
            change("skip_lines", parseInt(skip.value, 10));
          }
        });
        fields.append(labelled("Delimiter", delimiter), headerLabel, labelled("Lines to skip", skip));
      }
      if (answer.sheets) {
        var sheet = select(answer.sheets.map(function (s) { return s.name; }), chosen.sheet || answer.sheet);
        sheet.addEventListener("change", function () { change("sheet", sheet.value); });
        fields.append(labelled("Sheet", sheet));
      }
    }

    function drawTable() {
      table.textContent = "";
      var head = element("tr");
      answer.columns.forEach(function (column) {
        var th = element("th");
        th.scope = "col";
        var kind = select(TYPES, column.type);
        kind.addEventListener("change", function () {
          types[column.name] = kind.value;
          refresh();
        });
        var label = element("label", "app-support-column", column.name + " ");
        label.append(kind);
        if (column.why) {
          label.title = "Why " + column.type + ": " + column.why;
        }
        th.append(label);
        head.append(th);
      });
      var thead = element("thead");
      thead.append(head);
      var tbody = element("tbody");
      answer.rows.forEach(function (row) {
        var tr = element("tr");
        row.forEach(function (value) {
          var td = element("td", value === null ? "app-support-null" : "", value === null ? "" : String(value));
          tr.append(td);
        });
        tbody.append(tr);
      });
      table.append(thead, tbody);
      var total = answer.complete ? formatNumber(answer.rows_read) + " rows"
        : "about " + formatNumber(answer.rows_estimate || answer.rows_read) + " rows";
      summary.textContent = "The first " + formatNumber(answer.rows.length) + " of " + total + ", as " +
        answer.format.toUpperCase() + (answer.encoding ? " in " + answer.encoding : "") + "." +
        (answer.complete ? "" : " The types are read from the first " + formatNumber(answer.rows_read) +
          " rows; the import checks every row.");
    }

    function refresh() {
      var focused = document.activeElement;
      var where = focused && dialog.contains(focused) ? focused.closest("label") : null;
      var text = where ? where.textContent : null;
      showError("");
      summary.textContent = "Reading…";
      var asked = ++previews;
      post(config.previewUrl, Object.assign({}, source, options()))
        .then(function (response) { return response.json(); })
        .then(function (data) {
          if (asked !== previews) {
            return;  // a later choice's preview is on its way
          }
          if (!data.ok) {
            throw new Error(data.error);
          }
          answer = data;
          drawFields();
          drawTable();
          again.disabled = false;
          // Keep the keyboard where it was: the control of the same label.
          var same = Array.from(dialog.querySelectorAll("label")).find(function (l) {
            return l.textContent === text;
          });
          var control = same && same.querySelector("select, input");
          if (control) {
            control.focus();
          }
        })
        .catch(function (e) {
          if (asked !== previews) {
            return;
          }
          showError(e.message || "The server did not answer. Try again.");
          summary.textContent = "";
          again.disabled = true;  // until a reading the import would take is shown
        });
    }

    function importAgain() {
      busy = true;
      again.disabled = true;
      again.textContent = "Importing…";
      showError("");
      // Not modal while it imports: the panel's Cancel stays within reach.
      dialog.close();
      dialog.show();
      var request = post(config.importAgainUrl, Object.assign({ id: item.id }, options()));
      setTimeout(poll, 100);
      request
        .then(function (response) { return response.json(); })
        .then(function (data) {
          if (!data.ok) {
            throw new Error(data.error);
          }
          location.href = data.path;
        })
        .catch(function (e) {
          busy = false;
          again.disabled = false;
          again.textContent = "Import again";
          dialog.close();
          dialog.showModal();
          showError(e.message || "The server did not answer. Try again.");
          poll();
        });
    }

    again.addEventListener("click", importAgain);
    close.addEventListener("click", function () {
      dialog.close();
    });
    dialog.addEventListener("close", function () {
      // close() queues this event: after a refused import the dialog is open again by then.
      if (!busy && !dialog.open) {
        dialog.remove();
      }
    });
    again.disabled = true;
    dialog.showModal();
    close.focus();
    refresh();
  }

  function addPanel() {
    panel = element("section", "app-support-panel");
    panel.setAttribute("aria-label", "CSV imports");
    panel.hidden = true;
    document.body.append(panel);
  }

  document.addEventListener("DOMContentLoaded", function () {
    config = window.appSupport;
    if (!config) {
      return;
    }
    addImportButton();
    addKeepLine();
    addPanel();
    // Also the home page's line, which 0.65's welcome section adds later.
    document.addEventListener("click", function (event) {
      var button = event.target.closest(".app-support-keep button");
      if (button) {
        keepTemporary(button);
      }
    });
    document.addEventListener("visibilitychange", function () {
      if (document.hidden) {
        clearTimeout(timer);
      } else {
        poll();
      }
    });
    poll();
  });
""")
# The plugin directory's status line and buttons, and the welcome section's
# Import buttons, for the desktop user's pages. The buttons call the app's
# preload functions, as datasette-app-support 0.11.8's did: only the app's
# window has them, so a plain browser shows the list read-only.
DIRECTORY_SCRIPT = _page_script("the plugin directory and the welcome section, for Datasette Desktop.", r"""
  var config = null;

  function busy(button, text) {
    button.disabled = true;
    button.textContent = text;
  }

  function button(label, working, action) {
    var b = element("button", "app-support-button", label);
    b.type = "button";
    b.addEventListener("click", function () {
      b.parentNode.querySelectorAll("button").forEach(function (other) {
        other.disabled = true;
      });
      busy(b, working);
      action(b);
    });
    return b;
  }

  function addPluginButtons(app) {
    document.querySelectorAll(".app-support-plugin").forEach(function (cell) {
      var plugin = cell.dataset;
      var actions = element("span", "app-support-plugin-actions");
      if (plugin.installed !== "1") {
        actions.append(button("Install", "Installing…", function (b) {
          app.installPlugin(plugin.name, b);
        }));
      }
      if (plugin.upgrade === "1") {
        actions.append(button("Upgrade to " + plugin.latest, "Upgrading…", function (b) {
          app.installPlugin(plugin.name + "==" + plugin.latest, b);
        }));
      }
      if (plugin.installed === "1" && plugin.isDefault !== "1") {
        actions.append(button("Uninstall", "Uninstalling…", function (b) {
          app.uninstallPlugin(plugin.name, b);
        }));
      }
      cell.append(actions);
    });
  }

  function showStatus(status) {
    var box = element("div", "app-support-directory-status");
    var line = element("p", "", status.message + " ");
    var error = element("p", "app-support-error", status.error);
    error.hidden = !status.error;
    var label = status.hasCopy ? "Refresh" : "Retry";
    var refresh = element("button", "app-support-button", label);
    refresh.type = "button";
    refresh.addEventListener("click", function () {
      fetchList(refresh, label, error);
    });
    line.append(refresh);
    box.append(line, error);
    var header = document.querySelector(".page-header") || document.querySelector("h1");
    header.after(box);
    if (status.fetching && !status.hasCopy) {
      fetchList(refresh, label, error);  // the first copy is on its way: show it when it comes
    }
  }

  function fetchList(refresh, label, error) {
    busy(refresh, "Fetching…");
    fetch(config.directory.refreshUrl, {
      method: "POST",
      credentials: "same-origin",
      // Datasette 0.65 checks this header against its ds_csrftoken cookie.
      headers: { "x-csrftoken": config.csrftoken },
      body: "{}",
    })
      .then(function (response) {
        return response.json();
      })
      .then(function (answer) {
        if (answer.ok) {
          location.reload();
          return;
        }
        throw new Error(answer.error);
      })
      .catch(function (e) {
        error.textContent = e.message || "The plugin list could not be fetched.";
        error.hidden = false;
        refresh.disabled = false;
        refresh.textContent = label;
      });
  }

  function addWelcome(app) {
    var h1 = document.querySelector("h1");
    if (config.welcomeHtml && h1) {
      h1.insertAdjacentHTML("afterend", config.welcomeHtml);
    }
    if (!app || typeof app.importCsvFromUrl !== "function") {
      return;
    }
    document.querySelectorAll(".app-support-import-example").forEach(function (b) {
      b.hidden = false;
      b.addEventListener("click", function () {
        busy(b, "Importing…");
        app.importCsvFromUrl(b.dataset.csvurl, b);
      });
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    config = window.appSupportDirectory;
    if (!config) {
      return;
    }
    var app = window.datasetteApp;
    if (config.directory) {
      showStatus(config.directory);
      if (app && typeof app.installPlugin === "function") {
        addPluginButtons(app);
      }
    }
    addWelcome(app);
  });
""")
PAGE_STYLE = """/* app_support: the import panel and its dialog, Import CSV, the plugin directory and the welcome section. */
.app-support-panel {
  position: fixed;
  right: 1rem;
  bottom: 1rem;
  z-index: 1000;
  width: 20rem;
  max-width: calc(100vw - 2rem);
  font-size: 0.85rem;
  line-height: 1.3;
}
.app-support-panel[hidden] {
  display: none;
}
.app-support-dialog {
  width: min(60rem, calc(100vw - 3rem));
  max-height: calc(100vh - 4rem);
  border: 1px solid #999;
  border-radius: 6px;
  padding: 1rem 1.25rem;
  font-size: 0.9rem;
  color: #111;
  background: #fff;
}
.app-support-dialog::backdrop {
  background: rgba(0, 0, 0, 0.3);
}
.app-support-dialog h2 {
  margin: 0 0 0.75rem;
  font-size: 1.2rem;
}
.app-support-fields {
  display: flex;
  flex-wrap: wrap;
  gap: 0.5rem 1.25rem;
  align-items: center;
  margin-bottom: 0.75rem;
}
.app-support-fields input[type="number"] {
  width: 9rem;
}
.app-support-preview-wrap {
  overflow: auto;
  max-height: 50vh;
  border: 1px solid #ddd;
}
.app-support-preview {
  border-collapse: collapse;
  font-size: 0.85rem;
}
.app-support-preview th,
.app-support-preview td {
  border: 1px solid #ddd;
  padding: 0.2rem 0.4rem;
  text-align: left;
  white-space: nowrap;
  max-width: 16rem;
  overflow: hidden;
  text-overflow: ellipsis;
}
.app-support-preview th {
  background: #f4f4f4;
  position: sticky;
  top: 0;
}
.app-support-column select {
  display: block;
  margin-top: 0.2rem;
}
.app-support-null {
  background: #fafafa;
}
.app-support-dialog-buttons {
  display: flex;
  gap: 0.5rem;
  justify-content: flex-end;
  margin-top: 0.75rem;
}
.app-support-import {
  background: #fff;
  color: #111;
  border: 1px solid #ccc;
  border-left: 4px solid #007bff;
  border-radius: 4px;
  box-shadow: 0 2px 8px rgba(0, 0, 0, 0.2);
  padding: 0.6rem 0.75rem;
  margin-top: 0.5rem;
}
.app-support-import.app-support-done {
  border-left-color: #28a745;
}
.app-support-import.app-support-failed,
.app-support-import.app-support-cancelled {
  border-left-color: #c0392b;
}
.app-support-source {
  font-weight: bold;
  overflow: hidden;
  text-overflow: ellipsis;
  white-space: nowrap;
}
.app-support-bar {
  display: block;
  width: 100%;
  height: 0.6rem;
  margin: 0.4rem 0 0.2rem;
}
.app-support-bar[hidden] {
  display: none;
}
.app-support-import p.app-support-status {
  margin: 0.3rem 0;
  overflow-wrap: anywhere;
}
.app-support-actions {
  display: flex;
  align-items: center;
  justify-content: flex-end;
  gap: 0.75rem;
}
.app-support-open {
  margin-right: auto;
}
button.app-support-button {
  font: inherit;
  font-size: 0.85rem;
  line-height: 1;
  cursor: pointer;
  color: #007bff;
  background: #fff;
  border: 1px solid #007bff;
  border-radius: 0.25rem;
  padding: 0.4em 0.8em;
}
button.app-support-button:hover,
button.app-support-button:focus-visible {
  background: #e8f1ff;
}
button.app-support-button:disabled {
  color: #777;
  border-color: #aaa;
  cursor: default;
}
.app-support-import-csv-row {
  margin: 0.5rem 0 1rem;
}
.app-support-directory-status p {
  margin: 0.5rem 0;
}
.app-support-error {
  color: #c0392b;
}
.app-support-error[hidden] {
  display: none;
}
.app-support-plugin-actions {
  display: inline-flex;
  flex-wrap: wrap;
  gap: 0.4rem;
  margin-left: 0.5rem;
}
.app-support-welcome li {
  margin-bottom: 0.75rem;
}
.app-support-welcome h3 {
  margin: 0.5rem 0 0.25rem;
}
.app-support-welcome p {
  margin: 0.25rem 0;
}
button.app-support-button[hidden] {
  display: none;
}
.app-support-keep {
  margin: 0.5rem 0 1rem;
}
.app-support-keep p {
  margin: 0.25rem 0;
}
"""
ASSET_VERSION = hashlib.sha256(
    (PAGE_SCRIPT + DIRECTORY_SCRIPT + PAGE_STYLE).encode("utf-8")
).hexdigest()[:12]
