"""An Iceberg REST catalog on loopback, for tests: the REST protocol in front of pyiceberg's
SQL catalog (SQLite), so that every request is parsed, checked and applied by pyiceberg, an
implementation independent of iceberg-rust.

Usage: python rest_catalog.py PORT DIR WAREHOUSE [KEY=VALUE ...]
       (catalog database DIR/rest-catalog.db; WAREHOUSE a file:// or s3:// location;
       the properties go to pyiceberg's file IO, e.g. s3.endpoint=…)

With KAPPA_TEST_CATALOG_FAULTS=1 in its environment, table commits (counted from 1, across
tables) fail as a network or a catalog does: the 1st, 4th, 7th… are applied and then answered
with a 500 (the reply lost), the 2nd, 5th, 8th… answered with a 503 without being applied; each
fault is logged as a line of DIR/faults.log ("applied-then-500 TABLE", "refused-503 TABLE").
"""

import json
import os
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from pyiceberg.catalog.rest import CreateTableRequest
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.exceptions import (
    CommitFailedException,
    NamespaceAlreadyExistsError,
    NoSuchNamespaceError,
    NoSuchTableError,
    TableAlreadyExistsError,
)
from pyiceberg.table import CommitTableRequest

port, folder, warehouse = int(sys.argv[1]), sys.argv[2], sys.argv[3]
properties = dict(a.split("=", 1) for a in sys.argv[4:])
catalog = SqlCatalog(
    "rest", uri=f"sqlite:///{folder}/rest-catalog.db", warehouse=warehouse, **properties
)

# (exception, HTTP status, error type as the REST spec names it)
ERRORS = [
    (NoSuchTableError, 404, "NoSuchTableException"),
    (NoSuchNamespaceError, 404, "NoSuchNamespaceException"),
    (TableAlreadyExistsError, 409, "AlreadyExistsException"),
    (NamespaceAlreadyExistsError, 409, "AlreadyExistsException"),
    (CommitFailedException, 409, "CommitFailedException"),
]


def namespace_of(part):
    return tuple(urllib.parse.unquote(part).split("\x1f"))


def table_result(table):
    return {
        "metadata-location": table.metadata_location,
        "metadata": json.loads(table.metadata.model_dump_json()),
        "config": {},
    }


FAULTS = os.environ.get("KAPPA_TEST_CATALOG_FAULTS") == "1"
commits = 0
commits_lock = threading.Lock()


def fault(kind, ident):
    with open(f"{folder}/faults.log", "a") as log:
        log.write(f"{kind} {'.'.join(ident)}\n")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, status, body=None):
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def body(self):
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length)

    def route(self, method):
        path = urllib.parse.urlparse(self.path).path.strip("/").split("/")
        if path[:1] != ["v1"]:
            return self.reply(404, {"error": {"message": self.path, "type": "NotFound", "code": 404}})
        path = path[1:]
        try:
            self.dispatch(method, path)
        except Exception as e:  # the REST error model, as a real catalog answers
            for kind, status, name in ERRORS:
                if isinstance(e, kind):
                    break
            else:
                status, name = 500, type(e).__name__
            if method == "HEAD":
                return self.reply(status)
            self.reply(status, {"error": {"message": str(e), "type": name, "code": status}})

    def dispatch(self, method, path):
        if path == ["config"] and method == "GET":
            return self.reply(200, {"defaults": {}, "overrides": {}})
        if path == ["namespaces"]:
            if method == "GET":
                names = [list(n) for n in catalog.list_namespaces()]
                return self.reply(200, {"namespaces": names})
            if method == "POST":
                request = json.loads(self.body())
                catalog.create_namespace(tuple(request["namespace"]), request.get("properties", {}))
                return self.reply(200, {"namespace": request["namespace"], "properties": {}})
        if len(path) == 2 and path[0] == "namespaces":
            ns = namespace_of(path[1])
            properties = catalog.load_namespace_properties(ns)
            if method == "HEAD":
                return self.reply(204)
            if method == "GET":
                return self.reply(200, {"namespace": list(ns), "properties": properties})
        if len(path) == 3 and path[0] == "namespaces" and path[2] == "tables":
            ns = namespace_of(path[1])
            if method == "GET":
                ids = [{"namespace": list(t[:-1]), "name": t[-1]} for t in catalog.list_tables(ns)]
                return self.reply(200, {"identifiers": ids})
            if method == "POST":
                fields = {"location": None, "partition-spec": None, "write-order": None}
                fields.update(json.loads(self.body()))
                request = CreateTableRequest.model_validate(fields)
                table = catalog.create_table(
                    ns + (request.name,),
                    schema=request.table_schema,
                    location=request.location,
                    partition_spec=request.partition_spec,
                    properties=request.properties,
                )
                return self.reply(200, table_result(table))
        if len(path) == 4 and path[0] == "namespaces" and path[2] == "tables":
            ident = namespace_of(path[1]) + (urllib.parse.unquote(path[3]),)
            if method in ("GET", "HEAD"):
                table = catalog.load_table(ident)
                return self.reply(204) if method == "HEAD" else self.reply(200, table_result(table))
            if method == "POST":
                request = CommitTableRequest.model_validate_json(self.body())
                global commits
                with commits_lock:
                    commits += 1
                    turn = commits % 3 if FAULTS else 0
                if turn == 2:
                    fault("refused-503", ident)
                    return self.reply(503, {"error": {"message": "injected", "type": "ServiceUnavailable", "code": 503}})
                table = catalog.load_table(ident)
                response = catalog.commit_table(table, request.requirements, request.updates)
                if turn == 1:
                    fault("applied-then-500", ident)
                    return self.reply(500, {"error": {"message": "injected", "type": "ServerError", "code": 500}})
                return self.reply(200, json.loads(response.model_dump_json()))
            if method == "DELETE":
                catalog.drop_table(ident)
                return self.reply(204)
        self.reply(404, {"error": {"message": f"{method} {self.path}", "type": "NotFound", "code": 404}})

    def do_GET(self):
        self.route("GET")

    def do_HEAD(self):
        self.route("HEAD")

    def do_POST(self):
        self.route("POST")

    def do_DELETE(self):
        self.route("DELETE")


ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
