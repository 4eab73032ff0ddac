# Scratch: JSON tests, to be merged into test_app_support.py's sections.
import gzip
import json
import math
import random
import sqlite3
import unicodedata

import pytest

import app_support
from test_app_support import (
    Datasette, assert_error, assert_refused, column_types, post, read_in_parts, rows, server,
    tables, zipped, ds, in_parts, helpers, progress, events, needs_datasette_1, write, api_token,
)

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


def same_cell(got, want):
    # == for floats: SQLite stores a whole REAL as an integer, so -0.0 comes back as 0.0.
    return type(got) is type(want) and got == want


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


def compare_json_import(params, objects, names, declared, stored, detect_types=True):
    want_names, want_declared, want_stored = expected_json_table(objects, detect_types)
    where = f"seed {params['seed']} document {params['index']} {params}"
    if names != want_names:
        return f"{where}: columns {names} (expected {want_names})"
    if declared != want_declared:
        return f"{where}: types {declared} (expected {want_declared})"
    if len(stored) != len(want_stored):
        return f"{where}: {len(stored)} rows (expected {len(want_stored)})"
    for number, (got, want) in enumerate(zip(stored, want_stored), 1):
        if len(got) != len(want) or not all(same_cell(g, w) for g, w in zip(got, want)):
            return f"{where}: row {number} stored {got!r} (expected {want!r})"
    return None


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


def test_json_engine_matches_json_module_on_generated_documents(tmp_path):
    failures = []
    for index in range(JSON_ENGINE_DOCUMENTS):
        path, params, objects = generated_json_file(tmp_path, index)
        detect_types = index % 7 != 3
        conn = sqlite3.connect(":memory:", isolation_level=None)
        try:
            result = app_support.import_file(conn, str(path), "t", detect_types=detect_types)
            problem = compare_json_import(params, objects, *stored_json_table(conn, result.table), detect_types)
            fmt = {"ndjson": "ndjson", "geojson": "geojson"}.get(params["shape"], "json")
            if not problem and result.answer.get("format") != fmt:
                problem = f"{params}: format {result.answer}"
            if not problem and params["shape"] == "nested" and result.answer.get("json_path") != "data.results":
                problem = f"{params}: json_path {result.answer}"
        except Exception as e:
            problem = f"seed {JSON_SEED} document {index} {params}: {type(e).__name__}: {e}"
        finally:
            conn.close()
        path.unlink()
        if problem:
            failures.append(problem)
    shown = "\n".join(failures[:10])
    assert not failures, f"{len(failures)} of {JSON_ENGINE_DOCUMENTS} documents differ:\n{shown}"


async def test_open_csv_file_matches_json_module_on_generated_documents(ds, tmp_path):
    failures = []
    db = ds.get_database("temporary")
    for index in range(JSON_ENGINE_DOCUMENTS, JSON_ENGINE_DOCUMENTS + JSON_ENDPOINT_DOCUMENTS):
        path, params, objects = generated_json_file(tmp_path, index)
        response = await post(ds, "/-/open-csv-file", {"path": str(path)})
        if response.status_code != 200:
            failures.append(f"{params}: {response.status_code} {response.text}")
            continue
        answer = response.json()
        table = answer["path"].split("/")[-1]
        got = await db.execute_fn(lambda conn: stored_json_table(conn, table))
        problem = compare_json_import(params, objects, *got)
        if not problem and answer["rows"] != len(objects):
            problem = f"{params}: answered rows {answer['rows']}"
        if problem:
            failures.append(problem)
        await db.execute_write(f'drop table "{table}"')
    shown = "\n".join(failures[:10])
    assert not failures, f"{len(failures)} of {JSON_ENDPOINT_DOCUMENTS} documents differ:\n{shown}"


def test_json_engine_in_parts_matches_json_module(tmp_path, in_parts, helpers):
    failures, done, index = [], 0, 0
    while done < JSON_PARTS_DOCUMENTS:
        content, params, _ = random_json_document(JSON_SEED + 1, index, shapes=("array", "ndjson"))
        index += 1
        if params["rows"] < 10 or params["layout"] == "one line":
            continue  # no line breaks between objects: read whole
        done += 1
        path, params, objects = generated_json_file(tmp_path, index - 1, JSON_SEED + 1, shapes=("array", "ndjson"))
        conn = sqlite3.connect(":memory:", isolation_level=None)
        try:
            staged = app_support.stage_file(str(path), str(tmp_path / f"s{index}.db"))
            table = app_support.copy_in(conn, staged, "t").table
            problem = compare_json_import(params, objects, *stored_json_table(conn, table))
            expect_parts = params["layout"] != "indented"
            if not problem and expect_parts and len(staged.tables) < 2:
                problem = f"{params}: read in {len(staged.tables)} parts"
        except Exception as e:
            problem = f"{params}: {type(e).__name__}: {e}"
        finally:
            conn.close()
        if problem:
            failures.append(problem)
    shown = "\n".join(failures[:10])
    assert not failures, f"{len(failures)} of {JSON_PARTS_DOCUMENTS} documents differ:\n{shown}"
    assert helpers and all(helper.poll() is not None for helper in helpers)


from test_app_support import cancel_with_token, work_folders, IS_DATASETTE_1  # noqa: E402
import asyncio  # noqa: E402
import http.server  # noqa: E402
import threading  # noqa: E402
import functools  # noqa: E402

DOGS = [{"id": 1, "name": "Cleo"}, {"id": 2, "name": "Pancakes"}]
DOGS_JSON = json.dumps(DOGS).encode()
DOGS_NDJSON = b"".join(json.dumps(dog).encode() + b"\n" for dog in DOGS)

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


async def test_import_csv_file_json_into_a_file_database(ds, tmp_path):
    await post(ds, "/-/new-empty-database-file", {"path": str(tmp_path / "target.db")})
    path = write(tmp_path / "dogs.ndjson", DOGS_NDJSON)
    response = await post(ds, "/-/import-csv-file", {"path": str(path), "database": "target", "detect_types": False})
    assert response.json() == {"ok": True, "path": "/target/dogs", "rows": 2, "format": "ndjson"}
    conn = sqlite3.connect(tmp_path / "target.db")
    assert conn.execute("select id, name from dogs").fetchall() == [("1", "Cleo"), ("2", "Pancakes")]
    assert column_types(conn, "dogs") == {"id": "TEXT", "name": "TEXT"}


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


@pytest.mark.parametrize("database", ["temporary", "target"])
async def test_cancel_import_of_json(ds, tmp_path, database):
    if database != "temporary":
        await post(ds, "/-/new-empty-database-file", {"path": str(tmp_path / "target.db")})
    path = tmp_path / "big.ndjson"
    with open(path, "w") as f:
        for i in range(600_000):
            f.write(json.dumps({"id": i, "name": f"name {i}", "score": i * 1.5}) + "\n")
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
