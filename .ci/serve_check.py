"""Start a real datasette with the plugin and drive one desktop call through it.

Usage: python serve_check.py DATASETTE_BIN [extra datasette args...]
Exits non-zero unless the plugin answers open-csv-file and the table shows.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

TOKEN = "ci-check-token"

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
folder = tempfile.mkdtemp()
csv_path = os.path.join(folder, "dogs.csv")
with open(csv_path, "w") as f:
    f.write("name,age\nCleo,5\n")
env = {**os.environ, "DATASETTE_API_TOKEN": TOKEN, "DATASETTE_SECRET": "x" * 32}
server = subprocess.Popen([sys.argv[1], "--port", str(port), *sys.argv[2:]], env=env)
base = f"http://127.0.0.1:{port}"
try:
    for _ in range(300):
        try:
            plugins = json.load(urllib.request.urlopen(base + "/-/plugins.json", timeout=1))
            break
        except OSError:
            time.sleep(0.1)
    else:
        sys.exit("datasette did not start")
    print("plugins:", [p["name"] for p in plugins])
    request = urllib.request.Request(
        base + "/-/open-csv-file",
        data=json.dumps({"path": csv_path}).encode(),
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    answer = json.load(urllib.request.urlopen(request, timeout=30))
    print("open-csv-file:", answer)
    assert answer == {"ok": True, "path": "/temporary/dogs", "rows": 1, "format": "csv"}, answer
    page = json.load(urllib.request.urlopen(base + "/temporary/dogs.json?_shape=array", timeout=10))
    assert page[0]["name"] == "Cleo", page
    databases = json.load(urllib.request.urlopen(base + "/-/databases.json", timeout=10))
    names = {d["name"] for d in databases}
    assert "temporary" in names and "_memory" not in names, names
    print("ok")
finally:
    server.terminate()
    server.wait(10)
