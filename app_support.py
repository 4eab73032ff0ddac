"""app_support: the Datasette plugin behind Datasette Desktop.

The Electron app starts `datasette` with DATASETTE_API_TOKEN and
DATASETTE_SECRET set, then drives it through the JSON endpoints below: it
attaches SQLite files, imports CSV files and URLs, signs the desktop user in
as root, and carries the in-memory `temporary` database across restarts.

Every endpoint is a POST that needs `Authorization: Bearer <token>`, reads a
JSON object from the raw body and answers `{"ok": true, ...}` or
`{"ok": false, "error": "<a sentence for a dialog>"}`.

This file imports only the standard library and datasette, so it works when
copied alone into a --plugins-dir, vendored, or installed with pip.
"""

import asyncio
import codecs
import collections
import contextlib
import csv
import gzip
import hashlib
import hmac
import http.client
import inspect
import io
import itertools
import json
import os
import re
import shutil
import sqlite3
import sys
import tempfile
import traceback
import urllib.error
import urllib.parse
import urllib.request
import uuid
import weakref
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from datasette import hookimpl
from datasette.database import Database
from datasette.utils.asgi import Response

try:  # Datasette 1.0: events, and permissions as SQL
    from datasette import events as datasette_events
    from datasette.permissions import PermissionSQL
except ImportError:  # Datasette 0.65 has neither
    datasette_events = PermissionSQL = None

TEMPORARY = "temporary"
PLUGIN_NAME = "app_support"
# The desktop user, who owns the machine and the data. Requests carrying the
# API token come from the desktop app acting for that user.
ROOT_ACTOR = {"id": "root"}
SQLITE_HEADER = b"SQLite format 3\x00"
# Characters that SQLite reads as URI syntax in a file: URI. Datasette builds
# file: URIs from database paths without escaping them.
URI_SPECIAL_CHARACTERS = "?#%"
LOCKED_TIMEOUT_SECONDS = 2
# Small batches stay in the CPU cache: 500 rows ran faster than 5,000 or 20,000.
BATCH_ROWS = 500
# Column types are guessed from the first batch, so it is larger.
FIRST_BATCH_ROWS = 5000
# Rows per INSERT statement: ten at a time ran 10-15% faster than one.
ROWS_PER_INSERT = 10
SNIFF_CHARACTERS = 64 * 1024
READ_BUFFER_BYTES = 256 * 1024
BINARY_SNIFF_BYTES = 8192
DELIMITERS = ",\t;|"
# For one-column files: a control character that never splits a value.
NO_DELIMITER = "\x1f"
URL_TIMEOUT_SECONDS = 30
MAX_REDIRECTS = 5
DOWNLOAD_CHUNK_BYTES = 1024 * 1024
# Longer digit strings overflow SQLite's 64-bit integers.
MAX_INTEGER_DIGITS = 18
# Finished imports kept for /-/import-progress; running ones are always kept.
PROGRESS_HISTORY = 50
# How long POST /-/cancel-import waits for the import to stop before answering.
CANCEL_WAIT_SECONDS = 5
LATIN1_FALLBACK = "app_support_latin1_fallback"
# Work folders (staging databases, downloads) are named
# app_support_<pid>_<random> in the temp directory, so a later start can
# remove the ones whose process died without cleaning up.
WORK_FOLDER_PREFIX = "app_support_"

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


class APIError(Exception):
    """A failure to report to the desktop app as {"ok": false, "error": ...}."""

    def __init__(self, message, status=400):
        super().__init__(message)
        self.message = message
        self.status = status


def _server_fault(exception):
    """An unexpected exception as a 500 APIError, its traceback in the server log."""
    traceback.print_exception(type(exception), exception, exception.__traceback__)
    return APIError(
        f"Unexpected server error: {type(exception).__name__}: {exception}", status=500
    )


# Request helpers


def _now():
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


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


def _check_token_or_app_user(request):
    """The API token, or the cookie /-/auth-app-user gives the desktop user."""
    if request.actor and request.actor.get("id") == ROOT_ACTOR["id"]:
        return
    if request.actor and "authorization" not in request.headers:
        raise APIError("Only the desktop user can see or cancel imports.", status=403)
    _check_token(request)


async def _read_json_object(request):
    body = await request.post_body()
    if not body.strip():
        raise APIError("The request body is empty: send a JSON object.")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise APIError("The request body is not valid JSON.")
    if not isinstance(data, dict):
        raise APIError("The request body must be a JSON object.")
    return data


def _keys(data, required, optional):
    """Check the body's keys and types; return {key: value}, None for absent or null."""
    allowed = {**required, **optional}
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise APIError(f"Unknown key: {unknown[0]}")
    values = {}
    for key, kind in allowed.items():
        value = data.get(key)
        if value is None and key in required:
            raise APIError(f"Missing required key: {key}")
        # type(), not isinstance(): JSON's true and false are not integers here.
        if value is not None and type(value) is not kind:
            raise APIError(f"{key} must be a {_TYPE_NAMES[kind]}.")
        values[key] = value
    return values


_TYPE_NAMES = {str: "string", bool: "boolean (true or false)", int: "whole number"}


def _resolve_path(raw):
    if not raw.strip():
        raise APIError("path must not be empty.")
    if "\x00" in raw:
        raise APIError("path must not contain a NUL character.")
    return os.path.abspath(os.path.expanduser(raw))


def _existing_file(raw):
    path = _resolve_path(raw)
    if not os.path.exists(path):
        raise APIError(f"File not found: {path}")
    if os.path.isdir(path):
        raise APIError(f"That is a folder, not a file: {path}")
    if os.path.getsize(path) == 0:
        raise APIError(f"File is empty: {path}")
    return path


def _new_file(raw):
    path = _resolve_path(raw)
    if os.path.isdir(path):
        raise APIError(f"That is a folder, not a file: {path}")
    if os.path.lexists(path):
        raise APIError(f"File already exists: {path}")
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise APIError(f"Folder not found: {folder}")
    return path


def _refuse_uri_characters(path):
    found = [c for c in URI_SPECIAL_CHARACTERS if c in path]
    if found:
        raise APIError(
            f"Datasette cannot open a database file whose path contains {' or '.join(found)}: "
            f"{path}. Rename the file or its folder and try again."
        )


def _refuse_already_open(datasette, path):
    real = os.path.realpath(path)
    for db in datasette.databases.values():
        if db.path and os.path.realpath(db.path) == real:
            raise APIError(f"That file is already open as the database {db.name}: {path}")


def _writable_database(datasette, name):
    if name not in datasette.databases:
        raise APIError(f"Database not found: {name}")
    db = datasette.databases[name]
    if not db.is_mutable:
        raise APIError(f"Database {name} is read-only, so nothing can be imported into it.")
    return db


def _quote(identifier):
    """Quote an SQL identifier: the only way a name enters SQL text."""
    return '"' + identifier.replace('"', '""') + '"'


def _free_table_name(conn, wanted):
    """A table name close to wanted that no table, view or index in conn uses."""
    # Datasette 0.65 puts table names in [brackets] when it reads a schema, so
    # one "]" would break every page; the same name is used on 1.0 too.
    wanted = wanted.replace("]", "_").strip() or "data"
    if wanted.lower().startswith("sqlite_"):
        wanted = "_" + wanted  # SQLite reserves sqlite_* names
    taken = {
        row[0].lower()
        for row in conn.execute("select name from sqlite_master where name is not null")
    }
    name, suffix = wanted, 2
    while name.lower() in taken:
        name = f"{wanted}_{suffix}"
        suffix += 1
    return name


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


def _check_sqlite_file(path):
    """Raise APIError unless path is a readable SQLite database file."""
    with open(path, "rb") as f:
        if f.read(len(SQLITE_HEADER)) != SQLITE_HEADER:
            raise APIError(f"Not a SQLite database: {path}")
    try:
        conn = _connect_readonly(path)
        try:
            conn.execute("select count(*) from sqlite_master").fetchone()
        finally:
            conn.close()
    except sqlite3.OperationalError as e:
        if "locked" in str(e):
            raise APIError(
                f"Database is locked by another program: {path}. Close it there and try again."
            )
        raise APIError(f"Could not read the SQLite database {path}: {e}")
    except sqlite3.DatabaseError as e:
        raise APIError(f"Not a valid SQLite database ({e}): {path}")


def _create_empty_database(path):
    # O_EXCL: never touch a file that appeared since the request was checked.
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
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


def _work_folder():
    """A temporary folder for staging and downloads, named for this process."""
    return tempfile.TemporaryDirectory(prefix=f"{WORK_FOLDER_PREFIX}{os.getpid()}_")


# Differences between Datasette 0.65 and 1.0


async def _write_outside_transaction(db, fn):
    """Run fn(conn) in db's write thread with no transaction opened around it.

    Datasette 1.0 wraps writes in BEGIN IMMEDIATE unless told otherwise; 0.65
    never does. Callers here manage their own transactions (VACUUM, ATTACH
    and the backup API cannot run inside one).
    """
    if "transaction" in inspect.signature(db.execute_write_fn).parameters:
        return await db.execute_write_fn(fn, block=True, transaction=False)
    return await db.execute_write_fn(fn, block=True)


async def _track_event(datasette, event_class, **fields):
    """Report an event to listening plugins; Datasette 0.65 has no events."""
    if datasette_events is None:
        return
    event = getattr(datasette_events, event_class)(actor=ROOT_ACTOR, **fields)
    await datasette.track_event(event)


async def _report_import(datasette, db, result):
    """Announce a committed import as a new table and its inserted rows."""
    await _track_event(
        datasette, "CreateTableEvent", database=db.name, table=result.table, schema=result.schema
    )
    if result.rows:
        await _track_event(
            datasette, "InsertRowsEvent", database=db.name, table=result.table,
            num_rows=result.rows, ignore=False, replace=False,
        )


def _file_database(datasette, path):
    return Database(datasette, path=path, is_mutable=True)


def _memory_database(datasette, memory_name):
    return Database(datasette, memory_name=memory_name)


# The CSV engine


def _latin1_fallback(error):
    # cp1252 leaves five bytes undefined; read those as Latin-1.
    return error.object[error.start : error.end].decode("latin-1"), error.end


codecs.register_error(LATIN1_FALLBACK, _latin1_fallback)


class CSVError(APIError):
    """A CSV file that cannot be imported; the message names the file and line."""


class _Replan(Exception):
    """The file does not fit the plan made from its start; try again with a better one."""

    def __init__(self, plan):
        self.plan = plan


@dataclass
class CSVPlan:
    """What is known about a CSV file's shape before rows are written."""

    encoding: str = "utf-8-sig"
    delimiter: str = ","
    width: int = 0
    types: list = field(default_factory=list)


@dataclass
class ImportResult:
    table: str
    rows: int
    columns: list
    types: list

    @property
    def schema(self):
        return _create_table_sql(self.table, self.columns, self.types)


def _create_table_sql(table, columns, types):
    return "CREATE TABLE {} (\n{}\n)".format(
        _quote(table), ",\n".join(f"   {_quote(c)} {kind}" for c, kind in zip(columns, types))
    )


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
        # A multi-byte character may be cut at the end of the sample.
        return e.start >= len(head) - 3
    return True


def sniff_encoding(head, declared=None):
    """Pick the encoding: a declared charset, a BOM, else UTF-8 (confirmed while reading)."""
    looks_utf8 = _decodes_as_utf8(head)
    codec = _codec(declared) if declared else None
    # Servers often label UTF-8 as Latin-1 by default, while non-ASCII bytes
    # that decode as UTF-8 are almost never really Latin-1.
    if codec and not (codec == "cp1252" and looks_utf8 and not head.isascii()):
        return codec
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "utf-16"
    return "utf-8-sig" if looks_utf8 else "cp1252"


def _decode_errors(encoding):
    return LATIN1_FALLBACK if encoding == "cp1252" else "strict"


def detect_delimiter(sample):
    """Choose the delimiter that splits the sample's lines most consistently.

    csv.Sniffer picks letters as delimiters for one-column files; this only
    considers , tab ; and |, and needs at least two columns in the header.
    A file whose header has one column is read one value per line, so an
    unquoted comma in a value does not split it.
    """
    lines = sample.splitlines(keepends=True)
    if len(lines) > 1 and not sample.endswith(("\n", "\r")):
        lines = lines[:-1]  # the sample may end mid-line
    text = "".join(lines[:100])
    best, best_score = NO_DELIMITER, None
    for delimiter in DELIMITERS:
        try:
            widths = [len(row) for row in csv.reader(io.StringIO(text), delimiter=delimiter) if row]
        except csv.Error:
            continue
        if not widths or widths[0] < 2:
            continue
        score = (sum(w == widths[0] for w in widths) / len(widths), widths[0])
        if best_score is None or score > best_score:
            best, best_score = delimiter, score
    return best


def clean_headers(names, width):
    """Unique, non-empty column names: blanks become column_N, repeats a_2, a_3."""
    names = list(names) + [""] * (width - len(names))
    result, seen = [], set()
    for position, name in enumerate(names, 1):
        base = (name or "").strip() or f"column_{position}"
        candidate, suffix = base, 2
        while candidate.lower() in seen:
            candidate = f"{base}_{suffix}"
            suffix += 1
        seen.add(candidate.lower())
        result.append(candidate)
    return result


_INTEGER, _REAL, _TEXT = "INTEGER", "REAL", "TEXT"
_RANK = {None: 0, _INTEGER: 1, _REAL: 2, _TEXT: 3}
_REPEATED_DOT = re.compile(rb"\.[0-9]*\.")
_DIGITS_AS_NINES = bytes.maketrans(b"012345678", b"999999999")
_LONG_NUMBER = b"9" * (MAX_INTEGER_DIGITS + 1)


def column_type(values):
    """The narrowest of INTEGER, REAL, TEXT that holds every value exactly.

    Returns None when every value is empty. Works on the whole batch at once
    with C-speed string operations, because a check per value would cost more
    than the insert. Leading zeros, a sign or exponent SQLite would rewrite,
    and integers too long for 64 bits all make the column TEXT.
    """
    values = [v for v in values if v is not None] if None in values else values
    if not values:
        return None
    joined = "\n" + "\n".join(values) + "\n"
    if len(joined) == len(values) + 1:
        return None
    try:
        b = joined.encode("ascii")
    except UnicodeEncodeError:
        return _TEXT
    if b.translate(None, b"0123456789-.\n") or b.count(b"\n") != len(values) + 1:
        return _TEXT
    # A sign only at the start of a value, and never alone or before a zero.
    if b"-" in b and (
        b.count(b"-") != b.count(b"\n-") or b"\n-\n" in b or b.count(b"\n-0") != b.count(b"\n-0.")
    ):
        return _TEXT
    if b"." not in b:
        if b"\n0" in b and b.count(b"\n0") != b.count(b"\n0\n"):
            return _TEXT
        if _LONG_NUMBER in b.translate(_DIGITS_AS_NINES):
            return _TEXT
        return _INTEGER
    if _REPEATED_DOT.search(b) or b"\n.\n" in b or b"\n-.\n" in b:
        return _TEXT
    if b"\n0" in b and b.count(b"\n0") != b.count(b"\n0\n") + b.count(b"\n0."):
        return _TEXT
    return _REAL


def _wider(a, b):
    return a if _RANK[a] >= _RANK[b] else b


class _NulGuard(io.RawIOBase):
    """A raw file that refuses NUL bytes: Python 3.11's csv module accepts them."""

    def __init__(self, path):
        self.path = path
        self.raw = open(path, "rb", buffering=0)
        self.lines = 0

    def readable(self):
        return True

    def readinto(self, buffer):
        n = self.raw.readinto(buffer)
        chunk = memoryview(buffer)[:n].tobytes() if n else b""
        nul = chunk.find(b"\x00")
        if nul != -1:
            line = self.lines + chunk.count(b"\n", 0, nul) + 1
            raise CSVError(
                f"{self.path} contains a NUL byte on line {line}, so it is not CSV text."
            )
        self.lines += chunk.count(b"\n")
        return n

    def tell(self):
        return self.raw.tell()

    def close(self):
        self.raw.close()
        super().close()


class _CSVReader:
    """Streams a CSV file as batches of rows padded to the plan's width."""

    def __init__(self, path, plan):
        self.path = path
        self.plan = plan
        self.guard = open(path, "rb", buffering=0) if _is_wide(plan.encoding) else _NulGuard(path)
        self.file = io.TextIOWrapper(
            io.BufferedReader(self.guard, READ_BUFFER_BYTES),
            encoding=plan.encoding,
            errors=_decode_errors(plan.encoding),
            newline="",
        )
        self.reader = csv.reader(self.file, delimiter=plan.delimiter)

    def close(self):
        self.file.close()

    @property
    def bytes_read(self):
        return self.guard.tell()

    def header(self):
        with self._reading():
            for row in self.reader:
                if any(cell.strip() for cell in row):
                    return row
        raise CSVError(f"No header row found in {self.path}: the file has no columns.")

    def batches(self):
        size = FIRST_BATCH_ROWS
        while True:
            # islice straight over the csv reader: a generator around it
            # would cost a Python frame per row.
            with self._reading():
                batch = list(itertools.islice(self.reader, size))
            size = BATCH_ROWS
            if not batch:
                return
            if not all(batch):
                batch = [row for row in batch if row]  # blank lines
                if not batch:
                    continue
            yield batch

    @contextlib.contextmanager
    def _reading(self):
        try:
            yield
        except csv.Error as e:
            raise CSVError(
                f"Could not read {self.path} as CSV at line {self.reader.line_num}: {e}."
            )
        except UnicodeDecodeError:
            if self.plan.encoding == "cp1252":
                raise
            self.plan.encoding = "cp1252"
            raise _Replan(self.plan)


def _pad(batch, width):
    """Pad short rows with None (NULL); return the widest row's length."""
    lengths = set(map(len, batch))
    if not lengths or lengths == {width}:
        return width
    for row in batch:
        if len(row) < width:
            row.extend([None] * (width - len(row)))
    return max(lengths)


def _batch_types(batch, types, detect_types):
    """Widen types to fit the batch; return them and the columns with empty cells.

    Only columns that may still be numeric are looked at.
    """
    widened, with_empty = list(types), []
    if not detect_types:
        return widened, with_empty
    for i, current in enumerate(types):
        if current != _TEXT:
            values = [row[i] for row in batch]
            widened[i] = _wider(current, column_type(values))
            if "" in values:
                with_empty.append(i)
    return widened, with_empty


def _inserter(conn, table, width):
    """A function that inserts a batch, ROWS_PER_INSERT rows per statement."""
    row = "(" + ", ".join("?" * width) + ")"
    one = f"INSERT INTO {_quote(table)} VALUES {row}"
    many = f"INSERT INTO {_quote(table)} VALUES " + ", ".join([row] * ROWS_PER_INSERT)
    step = width * ROWS_PER_INSERT

    def insert(batch):
        whole = len(batch) - len(batch) % ROWS_PER_INSERT
        if whole:
            flat = list(itertools.chain.from_iterable(batch[:whole]))
            conn.executemany(many, [flat[i : i + step] for i in range(0, len(flat), step)])
        if whole < len(batch):
            conn.executemany(one, batch[whole:])

    return insert


def _nulls_for_empty_numbers(batch, types, with_empty):
    for i in with_empty:
        if types[i] != _TEXT:
            for row in batch:
                if row[i] == "":
                    row[i] = None


def plan_csv(path, charset=None):
    """Make a first plan from the file's start: encoding and delimiter."""
    with open(path, "rb") as f:
        head = f.read(BINARY_SNIFF_BYTES)
    if not head.strip():
        raise CSVError(f"File is empty: {path}")
    encoding = sniff_encoding(head, charset)
    if b"\x00" in head and not _is_wide(encoding):
        raise CSVError(f"This looks like a binary file, not CSV or TSV text: {path}")
    plan = CSVPlan(encoding=encoding)
    try:
        with open(path, encoding=encoding, errors=_decode_errors(encoding), newline="") as f:
            sample = f.read(SNIFF_CHARACTERS)
    except UnicodeDecodeError:
        plan.encoding = "cp1252"
        with open(path, encoding="cp1252", errors=LATIN1_FALLBACK, newline="") as f:
            sample = f.read(SNIFF_CHARACTERS)
    plan.delimiter = detect_delimiter(sample)
    return plan


def import_csv(conn, path, wanted_table, detect_types=True, on_progress=None, charset=None):
    """Create a new table in conn from the CSV file at path, all or nothing.

    Column types are chosen from the first batch of rows. Should a later row
    not fit them (a word in a number column, an extra field) the whole file
    is scanned for its real shape, the transaction is rolled back and the
    import runs once more: messy files pay twice, tidy ones once.
    """
    plan = plan_csv(path, charset)
    while True:
        conn.execute("begin immediate")
        try:
            result = _load(conn, path, wanted_table, plan, detect_types, on_progress)
        except _Replan as replan:
            conn.execute("rollback")
            plan = replan.plan
            continue
        except BaseException:
            conn.execute("rollback")
            raise
        conn.execute("commit")
        return result


def _load(conn, path, wanted_table, plan, detect_types, on_progress):
    reader = _CSVReader(path, plan)
    try:
        header = reader.header()
        batches = reader.batches()
        first = next(batches, [])
        width = max([len(header), plan.width, *map(len, first)])
        _pad(first, width)
        if not plan.types:
            unknown = [None if detect_types else _TEXT] * width
            plan.types = [kind or _TEXT for kind in _batch_types(first, unknown, detect_types)[0]]
        plan.types += [_TEXT] * (width - len(plan.types))
        plan.width = width
        columns = clean_headers(header, width)
        table = _free_table_name(conn, wanted_table)
        conn.execute(_create_table_sql(table, columns, plan.types))
        insert = _inserter(conn, table, width)
        rows = 0
        for batch in itertools.chain([first] if first else [], batches):
            batch_width = _pad(batch, width)
            types, with_empty = _batch_types(batch, plan.types, detect_types)
            if batch_width > width or types != plan.types:
                _scan_rest(batches, plan, batch_width, types, detect_types)
            _nulls_for_empty_numbers(batch, plan.types, with_empty)
            insert(batch)
            rows += len(batch)
            if on_progress:
                on_progress(rows, reader.bytes_read)
        return ImportResult(table, rows, columns, plan.types)
    finally:
        reader.close()


def _scan_rest(batches, plan, width, types, detect_types):
    """Read the rest of the file for its true width and types, then replan."""
    for batch in batches:
        width = max(width, max(map(len, batch)))
        types += [_TEXT] * (width - len(types))
        _pad(batch, width)
        types = _batch_types(batch, types, detect_types)[0]
    plan.width = width
    plan.types = [kind or _TEXT for kind in types]
    raise _Replan(plan)


def _copy_table(conn, staging_path, staged, wanted_table):
    """Copy a staged table into conn's database under a free name.

    Used for the shared-cache `temporary` database, where an uncommitted
    CREATE TABLE would lock the schema for every reader: the table is
    created and committed first, then filled in one short transaction.
    """
    conn.execute("attach database ? as staging", [staging_path])
    try:
        result = ImportResult(
            _free_table_name(conn, wanted_table), staged.rows, staged.columns, staged.types
        )
        table = result.table
        conn.execute("begin immediate")
        conn.execute(result.schema)
        conn.execute("commit")
        try:
            conn.execute("begin immediate")
            conn.execute(
                "INSERT INTO main.{} SELECT * FROM staging.{}".format(
                    _quote(table), _quote(staged.table)
                )
            )
            conn.execute("commit")
        except BaseException:
            conn.execute("rollback")
            conn.execute("DROP TABLE main.{}".format(_quote(table)))
            raise
    finally:
        conn.execute("detach database staging")
    return result


async def _import_csv(db, path, wanted_table, detect_types=True, on_progress=None, charset=None):
    """Import the CSV at path into db: straight in for files, staged for memory."""
    if not db.is_memory:
        return await _write_outside_transaction(
            db, lambda conn: import_csv(conn, path, wanted_table, detect_types, on_progress, charset)
        )
    with _work_folder() as folder:
        staging_path = os.path.join(folder, "staging.db")

        def stage():
            conn = sqlite3.connect(staging_path, isolation_level=None)
            try:
                conn.execute("pragma journal_mode = off")
                conn.execute("pragma synchronous = off")
                return import_csv(conn, path, wanted_table, detect_types, on_progress, charset)
            finally:
                conn.close()

        staged = await asyncio.to_thread(stage)
        return await _write_outside_transaction(
            db, lambda conn: _copy_table(conn, staging_path, staged, wanted_table)
        )


# Downloads


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
        raise APIError(f"Only http:// and https:// URLs can be opened, not: {url or '(empty)'}")
    return url.strip()


def _table_name_from_url(url):
    name = urllib.parse.unquote(urllib.parse.urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1])
    for suffix in (".gz", ".zip", ".csv", ".tsv", ".txt"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return name.strip() or "data"


class _CountingReader:
    """Reports the bytes read from a response, before any decompression."""

    def __init__(self, response, progress):
        self.response = response
        self.progress = progress
        self.count = 0

    def read(self, size=-1):
        chunk = self.response.read(size)
        self.count += len(chunk)
        if self.progress:
            self.progress.update(bytes_read=self.count)
        return chunk


def download_csv(url, folder, timeout=URL_TIMEOUT_SECONDS, progress=None):
    """Stream url into a file in folder, uncompressed; return (path, final_url, charset)."""
    opener = urllib.request.build_opener(_LimitedRedirects)
    request = urllib.request.Request(
        url, headers={"User-Agent": "app_support (Datasette Desktop)", "Accept-Encoding": "gzip"}
    )
    target = os.path.join(folder, "download")
    try:
        with opener.open(request, timeout=timeout) as response:
            final_url = response.geturl()
            charset = response.headers.get_content_charset()
            if progress and response.length is not None:
                progress.bytes_total = response.length
            body = counted = _CountingReader(response, progress)
            if response.headers.get("Content-Encoding", "").lower() == "gzip":
                body = gzip.GzipFile(fileobj=counted)
            with open(target, "wb") as out:
                shutil.copyfileobj(body, out, DOWNLOAD_CHUNK_BYTES)
            # read(n) returns b"" when the server hangs up early, without
            # raising IncompleteRead; what is left of Content-Length tells.
            if response.length:
                raise APIError(
                    f"Could not download {url}: the connection closed with "
                    f"{response.length} bytes still to come."
                )
            if progress and progress.bytes_total is None:
                progress.bytes_total = counted.count
    except urllib.error.HTTPError as e:
        if 300 <= e.code < 400:
            raise APIError(_redirect_error(url, e.headers.get("Location") or ""))
        raise APIError(f"{url} returned HTTP {e.code} {e.reason}")
    except urllib.error.URLError as e:
        raise APIError(f"Could not download {url}: {e.reason}")
    except (TimeoutError, OSError, EOFError, http.client.HTTPException) as e:
        raise APIError(f"Could not download {url}: {e}")
    return _unpack(target, urllib.parse.urlsplit(final_url).path.lower(), url), final_url, charset


def _unpack(path, url_path, url):
    """Gunzip a .gz, extract the single CSV from a .zip, or return path as it is."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic.startswith(b"\x1f\x8b"):
        unpacked = path + ".csv"
        try:
            with gzip.open(path, "rb") as src, open(unpacked, "wb") as out:
                shutil.copyfileobj(src, out, DOWNLOAD_CHUNK_BYTES)
        except (OSError, EOFError) as e:
            raise APIError(f"Could not gunzip {url}: {e}")
        return unpacked
    if url_path.endswith(".zip") or magic == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as archive:
                members = [
                    m for m in archive.infolist()
                    if not m.is_dir() and m.filename.lower().endswith((".csv", ".tsv", ".txt"))
                ]
                if len(members) != 1:
                    raise APIError(
                        f"{url} is a zip file holding {len(members)} CSV or TSV files; "
                        "it must hold exactly one."
                    )
                unpacked = path + ".csv"
                with archive.open(members[0]) as src, open(unpacked, "wb") as out:
                    shutil.copyfileobj(src, out, DOWNLOAD_CHUNK_BYTES)
        except zipfile.BadZipFile as e:
            raise APIError(f"Could not open the zip file from {url}: {e}")
        return unpacked
    return path


def _url_timeout(datasette):
    config = datasette.plugin_config(PLUGIN_NAME) or {}
    return float(config.get("url_timeout", URL_TIMEOUT_SECONDS))


# Import progress


class ImportCancelled(APIError):
    """An import stopped because the user pressed Cancel."""


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
        # A replanned import reads the file again; progress never goes back.
        if rows is not None:
            self.rows = max(self.rows, rows)
        if bytes_read is not None:
            if self.bytes_total is not None:
                bytes_read = min(bytes_read, self.bytes_total)
            self.bytes_read = max(self.bytes_read, bytes_read)

    def as_json(self, urls):
        data = {
            key: getattr(self, key)
            for key in ("id", "source", "database", "table", "state", "rows", "bytes_read",
                        "bytes_total", "started", "finished", "error")
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

    def done(self, item, result):
        # The table is committed: a Cancel that came too late changes nothing.
        item.table = result.table
        item._record(rows=result.rows, bytes_read=item.bytes_total)
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


# Endpoints


async def auth_app_user(datasette, data):
    values = _keys(data, required={}, optional={"redirect": str})
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
    path = _existing_file(_keys(data, required={"path": str}, optional={})["path"])
    _refuse_uri_characters(path)
    _refuse_already_open(datasette, path)
    await asyncio.to_thread(_check_sqlite_file, path)
    _refuse_already_open(datasette, path)  # a second request may have won the race
    db = datasette.add_database(_file_database(datasette, path))
    return {"ok": True, "path": datasette.urls.database(db.name)}


async def new_empty_database_file(datasette, data):
    path = _new_file(_keys(data, required={"path": str}, optional={})["path"])
    _refuse_uri_characters(path)
    await asyncio.to_thread(_create_empty_database, path)
    db = datasette.add_database(_file_database(datasette, path))
    return {"ok": True, "path": datasette.urls.database(db.name)}


async def open_csv_file(datasette, data):
    values = _keys(data, required={"path": str}, optional={"detect_types": bool})
    return await _import_csv_file(datasette, values, TEMPORARY)


async def import_csv_file(datasette, data):
    values = _keys(
        data, required={"path": str, "database": str}, optional={"detect_types": bool}
    )
    return await _import_csv_file(datasette, values, values["database"])


async def _import_csv_file(datasette, values, database):
    path = _existing_file(values["path"])
    db = _writable_database(datasette, database)
    log = _import_log(datasette)
    with log.track(values["path"], db.name, os.path.getsize(path)) as progress:
        result = await _import_csv(
            db, path, Path(path).stem, values["detect_types"] is not False, progress.update
        )
        log.done(progress, result)
    await _report_import(datasette, db, result)
    return {"ok": True, "path": datasette.urls.table(db.name, result.table), "rows": result.rows}


async def open_csv_from_url(datasette, data):
    values = _keys(
        data,
        required={"url": str},
        optional={"table_name": str, "database": str, "detect_types": bool},
    )
    url = _check_url(values["url"])
    db = _writable_database(datasette, values["database"] or TEMPORARY)
    timeout = _url_timeout(datasette)
    log = _import_log(datasette)
    with log.track(values["url"], db.name) as progress, _work_folder() as folder:
        path, final_url, charset = await asyncio.to_thread(
            download_csv, url, folder, timeout, progress
        )
        wanted = values["table_name"] or _table_name_from_url(final_url)
        detect_types = values["detect_types"] is not False
        # bytes_* describe the download; the import only adds rows.
        result = await _import_csv(
            db, path, wanted, detect_types, lambda rows, _: progress.update(rows=rows), charset
        )
        log.done(progress, result)
    await _report_import(datasette, db, result)
    return {"ok": True, "path": datasette.urls.table(db.name, result.table), "rows": result.rows}


async def dump_temporary_to_file(datasette, data):
    path = _new_file(_keys(data, required={"path": str}, optional={})["path"])
    db = datasette.get_database(TEMPORARY)

    def vacuum_into(conn):
        conn.execute("vacuum into ?", [path])

    try:
        await _write_outside_transaction(db, vacuum_into)
    except sqlite3.Error as e:
        raise APIError(f"Could not save the temporary database to {path}: {e}")
    return {"ok": True, "path": path}


async def restore_temporary_from_file(datasette, data):
    path = _existing_file(_keys(data, required={"path": str}, optional={})["path"])
    await asyncio.to_thread(_check_sqlite_file, path)
    db = datasette.get_database(TEMPORARY)

    def restore(conn):
        source = _connect_readonly(path)
        try:
            backup_tables = _table_names(source)
            source.backup(conn)
        finally:
            source.close()
        return backup_tables, _table_names(conn)

    try:
        backup_tables, restored_tables = await _write_outside_transaction(db, restore)
    except sqlite3.Error as e:
        raise APIError(f"Could not restore the temporary database from {path}: {e}")
    return {
        "ok": True,
        "path": path,
        "restored_tables": restored_tables,
        "backup_tables": backup_tables,
    }


async def import_progress(datasette):
    return {"ok": True, "imports": _import_log(datasette).as_json(datasette.urls)}


async def cancel_import(datasette, data):
    import_id = _keys(data, required={"id": int}, optional={})["id"]
    item = _import_log(datasette).cancel(import_id)
    # Answer with how it ended, so the page need not poll to find out.
    clock = asyncio.get_running_loop().time
    deadline = clock() + CANCEL_WAIT_SECONDS
    while item.state == "running" and clock() < deadline:
        await asyncio.sleep(0.05)
    if item.state == "done":
        raise APIError(f"The import finished before it could be cancelled: {item.source}")
    return {"ok": True, "import": item.as_json(datasette.urls)}


ENDPOINTS = {
    "/-/auth-app-user": auth_app_user,
    "/-/open-database-file": open_database_file,
    "/-/new-empty-database-file": new_empty_database_file,
    "/-/open-csv-file": open_csv_file,
    "/-/import-csv-file": import_csv_file,
    "/-/open-csv-from-url": open_csv_from_url,
    "/-/dump-temporary-to-file": dump_temporary_to_file,
    "/-/restore-temporary-from-file": restore_temporary_from_file,
}


def _error_response(message, status):
    return Response.json({"ok": False, "error": message}, status=status)


def _json_endpoint(handler, method="POST", authenticate=_check_token):
    """Wrap a handler: one method, authentication first, every failure as JSON.

    POST handlers get the request's JSON object as their second argument.
    """

    async def view(request, datasette):
        if request.method != method:
            response = _error_response(f"Use {method} for {request.path}.", 405)
            response.headers["Allow"] = method
            return response
        try:
            authenticate(request)
            body = [await _read_json_object(request)] if method == "POST" else []
            result = await handler(datasette, *body)
        except APIError as e:
            return _error_response(e.message, e.status)
        except Exception as e:
            fault = _server_fault(e)
            return _error_response(fault.message, fault.status)
        return result if isinstance(result, Response) else Response.json(result)

    return view


# Page assets: the progress panel and the Import CSV button, for the desktop
# user's pages only (see the hooks below). Plain script and style, no build.

PAGE_SCRIPT = r"""/* app_support: import progress, Cancel and Import CSV for Datasette Desktop. */
(function () {
  var IDLE_POLL_MS = 5000;
  var BUSY_POLL_MS = 750;
  var config = null;
  var panel = null;
  var timer = null;
  var running = false;
  // Imports this page saw running: only these are shown once they end.
  var watched = {};
  var dismissed = {};

  function fileName(source) {
    if (/^https?:/i.test(source)) {
      return source;
    }
    return source.split(/[\\/]/).filter(Boolean).pop() || source;
  }

  function formatNumber(n) {
    return n.toLocaleString("en-US");
  }

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
      return "Imported " + rows + " into " + item.table + ".";
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
    var close = element("button", "app-support-button", "Dismiss");
    close.type = "button";
    close.addEventListener("click", function () {
      dismissed[item.id] = true;
      var box = actions.parentNode;
      box.remove();
      panel.hidden = !panel.firstChild;
    });
    actions.append(close);
  }

  function render(imports) {
    running = false;
    var shown = {};
    imports.forEach(function (item) {
      if (item.state === "running") {
        running = true;
        watched[item.id] = true;
      }
      if (!watched[item.id] || dismissed[item.id]) {
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

  function cancelImport(id, button) {
    button.disabled = true;
    button.textContent = "Cancelling…";
    fetch(config.cancelUrl, {
      method: "POST",
      credentials: "same-origin",
      // Datasette 0.65 checks this header against its ds_csrftoken cookie.
      headers: { "x-csrftoken": config.csrftoken },
      body: JSON.stringify({ id: id }),
    })
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
    addPanel();
    document.addEventListener("visibilitychange", function () {
      if (document.hidden) {
        clearTimeout(timer);
      } else {
        poll();
      }
    });
    poll();
  });
})();
"""

PAGE_STYLE = """/* app_support: the import panel and the Import CSV button. */
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
"""
ASSET_VERSION = hashlib.sha256((PAGE_SCRIPT + PAGE_STYLE).encode("utf-8")).hexdigest()[:12]


def _asset_view(body, content_type):
    async def view(request, datasette):
        # The URL carries ASSET_VERSION, so a changed asset has a new URL.
        return Response(
            body, content_type=content_type,
            headers={"Cache-Control": "max-age=31536000, immutable"},
        )

    return view


def _is_app_user(request):
    return bool(request and request.actor and request.actor.get("id") == ROOT_ACTOR["id"])


def _csrftoken(request):
    """Datasette 0.65's CSRF token, for the x-csrftoken header.

    Datasette 1.0 ignores it: its check reads Sec-Fetch-Site and Origin.
    """
    csrftoken = request.scope.get("csrftoken")
    return csrftoken() if csrftoken else ""


def _import_target(datasette, database, template, view_name):
    """The database whose page this is, when a CSV can be imported into it."""
    if view_name != "database" or not database or template.startswith("query"):
        return None
    db = datasette.databases.get(database)
    if db is None or not db.is_mutable or database == "_internal":
        return None
    return database



# Hooks


@hookimpl
def startup(datasette):
    if TEMPORARY not in datasette.databases:
        # A memory name of its own, so two Datasette instances in one process
        # never share their temporary tables. Not id(datasette): ids are
        # reused, and the shared-cache database outlives its instance while
        # a write thread still holds a connection to it.
        memory_name = f"{TEMPORARY}_{uuid.uuid4().hex}"
        datasette.add_database(_memory_database(datasette, memory_name), name=TEMPORARY)
    if "_memory" in datasette.databases:
        datasette.remove_database("_memory")


@hookimpl
def register_routes():
    progress = _json_endpoint(import_progress, "GET", _check_token_or_app_user)
    cancel = _json_endpoint(cancel_import, "POST", _check_token_or_app_user)
    return [
        ("^/-/import-progress$", progress),
        ("^/-/cancel-import$", cancel),
        (r"^/-/app-support\.js$", _asset_view(PAGE_SCRIPT, "application/javascript")),
        (r"^/-/app-support\.css$", _asset_view(PAGE_STYLE, "text/css")),
    ] + [
        ("^" + re.escape(path) + "$", _json_endpoint(handler))
        for path, handler in ENDPOINTS.items()
    ]


@hookimpl
def skip_csrf(scope):
    # Datasette 0.65's CSRF check would answer a request that carries a cookie
    # but no Bearer token with an HTML page; these routes need the token
    # anyway, and answer its absence with JSON. /-/cancel-import is not one
    # of them: it also takes the desktop user's cookie, so it keeps the check.
    return scope.get("path") in ENDPOINTS


@hookimpl
def extra_css_urls(request, datasette):
    # Only the desktop user's pages: others get no script, so no polling.
    if not _is_app_user(request):
        return []
    return [datasette.urls.path(f"/-/app-support.css?v={ASSET_VERSION}")]


@hookimpl
def extra_js_urls(request, datasette):
    if not _is_app_user(request):
        return []
    return [datasette.urls.path(f"/-/app-support.js?v={ASSET_VERSION}")]


@hookimpl
def extra_body_script(template, database, view_name, request, datasette):
    if not _is_app_user(request):
        return None
    config = {
        "progressUrl": datasette.urls.path("/-/import-progress"),
        "cancelUrl": datasette.urls.path("/-/cancel-import"),
        "csrftoken": _csrftoken(request),
        "importDatabase": _import_target(datasette, database, template, view_name),
    }
    # "<" escaped, so no value can close the script element.
    return "window.appSupport = {};".format(json.dumps(config).replace("<", "\\u003c"))


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
