"""A loopback stand-in for the Hugging Face Hub HTTP API, driven by the real huggingface_hub client.

It speaks the parts perta-stream uses: repo info with the file list (`/api/models/...`), file
resolution with HEAD and Range (`/resolve/...`, LFS files redirected to a second "CDN" server on
another loopback address, as the real Hub redirects to its storage host), repo and branch
creation, the preupload and Git LFS batch endpoints, LFS uploads, and the NDJSON commit endpoint.
Repos are versioned by commits whose files are content-addressed blobs on disk.

It also lets tests misbehave on purpose: refuse bad tokens (401), answer missing repos and
revisions with the Hub's 404 error codes, inject transient or persistent failures on any route,
cut a response short, expire the CDN signatures, and count every byte of file content served.

Run standalone (for benchmarks, so the server does not share the client's interpreter):
    python tests/hub_server.py --root DIR [--token TOKEN]   # prints {"endpoint": ..., "cdn": ...}
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_THRESHOLD_BYTES = 10 * 2**20
_BLOCK = 1 << 20
_BAD_TOKEN = "Invalid credentials in Authorization header"
# The "CDN" answers on another loopback address, as the real Hub's storage is another host:
# huggingface_hub 1.30 to 2.0 (at least) keep the token on a redirect to the same host name
# whatever the port (2.4 compares the whole origin), which a CDN on 127.0.0.1 would refuse (400).
_HUB_HOST = "127.0.0.1"
_CDN_HOST = "127.0.0.2"


@dataclass
class FileEntry:
    sha256: str
    size: int
    lfs: bool
    git_sha1: str


@dataclass
class Repo:
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict[str, FileEntry]] = field(default_factory=dict)


@dataclass
class Fault:
    pattern: re.Pattern
    status: int | None
    times: int | None  # None: forever
    truncate_after: int | None = None
    hits: int = 0


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubServer:
    """Two loopback HTTP servers (Hub API and CDN) sharing one in-memory repo store.

    Args:
        root: folder for blobs (a temporary one when None; removed on `stop`).
        tokens: token -> may write. Requests without a token are anonymous readers.
    """

    def __init__(self, root: str | os.PathLike | None = None, tokens: dict[str, bool] | None = None):
        self._own_root = root is None
        self.root = Path(root or tempfile.mkdtemp(prefix="perta-hub-server-"))
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        self.tokens = dict(tokens or {})
        self.repos: dict[str, Repo] = {}
        self.lock = threading.RLock()
        self.faults: list[Fault] = []
        self.signature = 1
        self.file_bytes_served = 0
        self.file_bytes_by_path: dict[str, int] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self.cdn_requests_with_auth = 0
        self.commit_count = 0
        self.commit_messages: list[tuple[str, str, str]] = []  # (repo_id, branch, summary)
        self._commit_counter = 0
        self.hub = _make_server(self, cdn=False)
        self.cdn = _make_server(self, cdn=True)
        self.endpoint = f"http://{_HUB_HOST}:{self.hub.server_address[1]}"
        self.cdn_endpoint = f"http://{_CDN_HOST}:{self.cdn.server_address[1]}"
        self._threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in (self.hub, self.cdn)]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        for server in (self.hub, self.cdn):
            server.shutdown()
            server.server_close()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    # ------------------------------------------------------------------ test controls
    def publish_folder(self, repo_id: str, folder: str | os.PathLike, *, private: bool = False, branch: str = "main", path_in_repo: str = "") -> str:
        """Commit every file of `folder` (top level) to `repo_id` (created if missing); returns the commit."""
        files = {}
        for path in sorted(Path(folder).iterdir()):
            if path.is_file():
                name = f"{path_in_repo}/{path.name}" if path_in_repo else path.name
                with open(path, "rb") as handle:
                    files[name] = self.store_stream(handle, path.stat().st_size, lfs=path.suffix == ".safetensors")
        with self.lock:
            repo = self.repos.setdefault(repo_id, Repo(private=private))
            if not repo.branches:
                self._new_commit(repo, "main", {".gitattributes": self.store_blob(b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n", lfs=False)})
            base = dict(repo.commits[repo.branches.get(branch, repo.branches["main"])])
            base.update(files)
            return self._new_commit(repo, branch, base)

    def create_empty_repo(self, repo_id: str, *, private: bool = False) -> None:
        with self.lock:
            repo = self.repos.setdefault(repo_id, Repo(private=private))
            self._new_commit(repo, "main", {".gitattributes": self.store_blob(b"*.safetensors filter=lfs -text\n", lfs=False)})

    def inject(self, pattern: str, status: int | None = 503, *, times: int | None = 1, truncate_after: int | None = None) -> Fault:
        """Fail requests whose `METHOD path` matches `pattern`: `times` times, or forever (None)."""
        fault = Fault(re.compile(pattern), status, times, truncate_after)
        with self.lock:
            self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self.lock:
            self.faults.clear()

    def rotate_signatures(self) -> None:
        """Expire every CDN location handed out so far."""
        with self.lock:
            self.signature += 1

    def reset_counters(self) -> None:
        with self.lock:
            self.file_bytes_served = 0
            self.file_bytes_by_path.clear()
            self.requests.clear()
            self.cdn_requests_with_auth = 0

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The content of every file of a repo at a revision."""
        with self.lock:
            repo = self.repos[repo_id]
            entries = repo.commits[repo.branches.get(revision, revision)]
        return {path: (self.root / "blobs" / entry.sha256).read_bytes() for path, entry in entries.items()}

    def stats(self) -> dict:
        with self.lock:
            return {
                "file_bytes_served": self.file_bytes_served,
                "file_bytes_by_path": dict(self.file_bytes_by_path),
                "requests": len(self.requests),
                "cdn_requests_with_auth": self.cdn_requests_with_auth,
                "commit_count": self.commit_count,
            }

    # ------------------------------------------------------------------ storage
    def store_blob(self, data: bytes, *, lfs: bool) -> FileEntry:
        sha256 = hashlib.sha256(data).hexdigest()
        path = self.root / "blobs" / sha256
        if not path.exists():
            tmp = path.with_suffix(f".{threading.get_ident()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return FileEntry(sha256, len(data), lfs or len(data) > LFS_THRESHOLD_BYTES, git_sha1(data))

    def store_stream(self, stream, size: int, *, lfs: bool) -> FileEntry:
        """Store `size` bytes read from `stream` (a file or a request body) without holding them whole."""
        sha256, sha1 = hashlib.sha256(), hashlib.sha1(b"blob %d\0" % size)
        tmp = self.root / "blobs" / f"upload.{threading.get_ident()}.tmp"
        remaining = size
        with open(tmp, "wb") as out:
            while remaining:
                block = stream.read(min(_BLOCK, remaining))
                if not block:
                    break
                sha256.update(block)
                sha1.update(block)
                out.write(block)
                remaining -= len(block)
        if remaining:
            tmp.unlink()
            raise _Reply(400, message="body shorter than its Content-Length")
        os.replace(tmp, self.root / "blobs" / sha256.hexdigest())
        return FileEntry(sha256.hexdigest(), size, lfs or size > LFS_THRESHOLD_BYTES, sha1.hexdigest())

    def _new_commit(self, repo: Repo, branch: str, files: dict[str, FileEntry]) -> str:
        self._commit_counter += 1
        digest = hashlib.sha1(json.dumps({"n": self._commit_counter, "files": sorted((p, e.sha256) for p, e in files.items())}).encode())
        sha = digest.hexdigest()
        repo.commits[sha] = files
        repo.branches[branch] = sha
        return sha

    def resolve_revision(self, repo: Repo, revision: str | None) -> str | None:
        revision = revision or "main"
        if revision in repo.branches:
            return repo.branches[revision]
        return revision if revision in repo.commits else None


def _make_server(state: HubServer, *, cdn: bool) -> ThreadingHTTPServer:
    handler = type("Handler", (_Handler,), {"state": state, "is_cdn": cdn})
    server = ThreadingHTTPServer((_CDN_HOST if cdn else _HUB_HOST, 0), handler)
    server.daemon_threads = True
    return server


class _Reply(Exception):
    def __init__(self, status: int, body: dict | None = None, *, code: str | None = None, message: str | None = None):
        super().__init__(status)
        self.status, self.body, self.code, self.message = status, body or {"error": message or "error"}, code, message


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes; without this, Nagle's algorithm and delayed
    # ACKs add ~40 ms to every keep-alive request.
    disable_nagle_algorithm = True
    state: HubServer
    is_cdn: bool

    def log_message(self, format: str, *args) -> None:  # noqa: A002  (the base class's name)
        return

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    # ------------------------------------------------------------------ plumbing
    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        path, query = unquote(split.path), parse_qs(split.query)
        self._raw_path = split.path  # a revision's `/` arrives as %2F: one path segment, as on the Hub
        self._body: bytes | None = None
        with self.state.lock:
            self.state.requests.append((method, path, self.headers.get("Range")))
        fault = self._matching_fault(f"{method} {path}")
        try:
            if fault is not None and fault.status is not None:
                self._read_body()
                raise _Reply(fault.status, message="injected failure")
            self._truncate_after = fault.truncate_after if fault is not None else None
            if self.is_cdn:
                self._cdn(method, path, query)
            else:
                self._hub(method, path, query)
        except _Reply as reply:
            self._read_body()
            self._send_json(reply.status, reply.body, code=reply.code, message=reply.message)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _matching_fault(self, request_line: str) -> Fault | None:
        with self.state.lock:
            for fault in self.state.faults:
                if (fault.times is None or fault.hits < fault.times) and fault.pattern.search(request_line):
                    fault.hits += 1
                    return fault
        return None

    def _read_body(self) -> bytes:
        if self._body is not None:
            return self._body
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            self._body = b"".join(parts)
        else:
            self._body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        return self._body

    def _json_body(self) -> dict:
        try:
            return json.loads(self._read_body() or b"{}")
        except ValueError:
            raise _Reply(400, message="body is not JSON") from None

    def _send_json(self, status: int, body: dict, *, code: str | None = None, message: str | None = None, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if code:
            self.send_header("X-Error-Code", code)
        if message:
            self.send_header("X-Error-Message", message)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    # ------------------------------------------------------------------ auth
    def _token(self) -> str | None:
        header = self.headers.get("Authorization")
        if header is None:
            return None
        token = header.removeprefix("Bearer ").strip()
        if token not in self.state.tokens:
            raise _Reply(401, message=_BAD_TOKEN)
        return token

    def _repo(self, repo_id: str, *, write: bool) -> Repo:
        token = self._token()
        repo = self.state.repos.get(repo_id)
        if repo is None or (repo.private and token is None):
            raise _Reply(404 if token else 401, code="RepoNotFound", message="Repository not found")
        if write and token is None:
            raise _Reply(401, message="You must be authenticated to write")
        if write and not self.state.tokens[token]:
            raise _Reply(403, message="You don't have the rights to write to this repo")
        return repo

    def _commit_of(self, repo: Repo, revision: str | None) -> str:
        commit = self.state.resolve_revision(repo, revision)
        if commit is None:
            raise _Reply(404, code="RevisionNotFound", message="Invalid rev id")
        return commit

    # ------------------------------------------------------------------ Hub API
    def _hub(self, method: str, path: str, query: dict) -> None:
        if method == "GET" and (match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path)):
            return self._tree(match[1], match[2], match[3] or "")
        if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/(.+))?", path):
            return self._model_info(match[1], match[2], query)
        if method in ("GET", "HEAD") and (match := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", self._raw_path)):
            return self._resolve(method, unquote(match[1]), unquote(match[2]), unquote(match[3]))
        if method == "POST" and path == "/api/repos/create":
            return self._create_repo()
        if method == "POST" and (match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/branch/(.+)", path)):
            return self._create_branch(match[1], match[2])
        if method == "POST" and (match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/(.+)", path)):
            return self._preupload(match[1], match[2])
        if method == "POST" and (match := re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path)):
            return self._lfs_batch(match[1])
        if method == "PUT" and (match := re.fullmatch(r"/_lfs/upload/([0-9a-f]{64})", path)):
            return self._lfs_put(match[1])
        if method == "POST" and path == "/_lfs/verify":
            body = self._json_body()
            exists = (self.state.root / "blobs" / str(body.get("oid"))).exists()
            return self._send_json(200 if exists else 404, {})
        if method == "POST" and path == "/api/validate-yaml":
            self._read_body()
            return self._send_json(200, {"errors": [], "warnings": []})
        if method == "POST" and (match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/(.+)", path)):
            return self._commit(match[1], match[2])
        raise _Reply(404, message=f"no route {method} {path}")

    def _model_info(self, repo_id: str, revision: str | None, query: dict) -> None:
        with self.state.lock:
            repo = self._repo(repo_id, write=False)
            commit = self._commit_of(repo, revision)
            files = repo.commits[commit]
            siblings = []
            for name, entry in sorted(files.items()):
                sibling: dict = {"rfilename": name}
                if query.get("blobs"):
                    sibling.update(size=entry.size, blobId=entry.git_sha1)
                    if entry.lfs:
                        sibling["lfs"] = {"size": entry.size, "sha256": entry.sha256, "pointerSize": 134}
                siblings.append(sibling)
            body = {"id": repo_id, "modelId": repo_id, "sha": commit, "private": repo.private, "siblings": siblings}
        self._send_json(200, body)

    def _tree(self, repo_id: str, revision: str, folder: str) -> None:
        """The files of a commit (recursively), as `list_repo_tree` and `snapshot_download` read them."""
        from urllib.parse import unquote

        prefix = f"{unquote(folder).strip('/')}/" if folder else ""
        with self.state.lock:
            repo = self._repo(repo_id, write=False)
            files = repo.commits[self._commit_of(repo, unquote(revision))]
            listing = []
            for name, entry in sorted(files.items()):
                if not name.startswith(prefix):
                    continue
                item: dict = {"type": "file", "path": name, "size": entry.size, "oid": entry.git_sha1}
                if entry.lfs:
                    item["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": 134}
                listing.append(item)
        self._send_json(200, listing)

    def _resolve(self, method: str, repo_id: str, revision: str, file_path: str) -> None:
        with self.state.lock:
            repo = self._repo(repo_id, write=False)
            commit = self._commit_of(repo, revision)
            entry = repo.commits[commit].get(file_path)
            signature = self.state.signature
        if entry is None:
            raise _Reply(404, code="EntryNotFound", message="Entry not found")
        common = {"X-Repo-Commit": commit}
        if entry.lfs:
            location = f"{self.state.cdn_endpoint}/blobs/{entry.sha256}?sig={signature}"
            headers = {**common, "Location": location, "X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size), "ETag": f'"{entry.git_sha1}"'}
            self._read_body()
            self.send_response(302)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self._send_blob(method, entry, f"{repo_id}/{file_path}", {**common, "ETag": f'"{entry.git_sha1}"'})

    def _create_repo(self) -> None:
        body = self._json_body()
        token = self._token()
        if token is None or not self.state.tokens[token]:
            raise _Reply(401 if token is None else 403, message="You don't have the rights to create a repo")
        repo_id = f"{body.get('organization')}/{body.get('name')}"
        with self.state.lock:
            if repo_id in self.state.repos:
                raise _Reply(409, message="You already created this model repo")
            self.state.create_empty_repo(repo_id, private=body.get("visibility") == "private" or bool(body.get("private")))
        self._send_json(200, {"url": f"{self.state.endpoint}/{repo_id}"})

    def _create_branch(self, repo_id: str, branch: str) -> None:
        body = self._json_body()
        with self.state.lock:
            repo = self._repo(repo_id, write=True)
            if branch in repo.branches:
                raise _Reply(409, message="Branch already exists")
            repo.branches[branch] = self._commit_of(repo, body.get("startingPoint"))
        self._send_json(200, {})

    def _preupload(self, repo_id: str, revision: str) -> None:
        body = self._json_body()
        with self.state.lock:
            self._commit_of(self._repo(repo_id, write=True), revision)
        files = []
        for item in body.get("files", []):
            sample = base64.b64decode(item.get("sample", ""))
            lfs = item["path"].endswith(".safetensors") or item.get("size", 0) > LFS_THRESHOLD_BYTES or b"\0" in sample
            files.append({"path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": None})
        self._send_json(200, {"files": files})

    def _lfs_batch(self, repo_id: str) -> None:
        body = self._json_body()
        with self.state.lock:
            self._repo(repo_id, write=True)
        objects = []
        for item in body.get("objects", []):
            oid, size = item["oid"], item["size"]
            entry: dict = {"oid": oid, "size": size}
            if not (self.state.root / "blobs" / oid).exists():
                entry["actions"] = {
                    "upload": {"href": f"{self.state.endpoint}/_lfs/upload/{oid}", "header": {}},
                    "verify": {"href": f"{self.state.endpoint}/_lfs/verify", "header": {}},
                }
            objects.append(entry)
        self._send_json(200, {"transfer": "basic", "objects": objects})

    def _lfs_put(self, oid: str) -> None:
        if self.headers.get("Content-Length") is None:
            data = self._read_body()
            entry = self.state.store_blob(data, lfs=True)
        else:
            self._body = b""  # consumed here, streamed to disk
            entry = self.state.store_stream(self.rfile, int(self.headers["Content-Length"]), lfs=True)
        if entry.sha256 != oid:
            raise _Reply(400, message="content does not match its oid")
        self._send_json(200, {})

    def _commit(self, repo_id: str, revision: str) -> None:
        lines = [json.loads(line) for line in self._read_body().splitlines() if line.strip()]
        with self.state.lock:
            repo = self._repo(repo_id, write=True)
            if revision not in repo.branches:
                raise _Reply(404, code="RevisionNotFound", message="Invalid rev id")
            files = dict(repo.commits[repo.branches[revision]])
            summary = next((line["value"].get("summary", "") for line in lines if line["key"] == "header"), "")
            for line in lines:
                key, value = line["key"], line["value"]
                if key == "file":
                    files[value["path"]] = self.state.store_blob(base64.b64decode(value["content"]), lfs=False)
                elif key == "lfsFile":
                    blob = self.state.root / "blobs" / value["oid"]
                    if not blob.exists():
                        raise _Reply(422, message=f"LFS object {value['oid']} of {value['path']} was never uploaded")
                    files[value["path"]] = FileEntry(value["oid"], blob.stat().st_size, True, git_sha1(value["oid"].encode()))
                elif key == "deletedFile":
                    if value["path"] not in files:
                        raise _Reply(404, code="EntryNotFound", message="A file with this name doesn't exist")
                    del files[value["path"]]
            commit = self.state._new_commit(repo, revision, files)
            self.state.commit_count += 1
            self.state.commit_messages.append((repo_id, revision, summary))
        self._send_json(200, {"commitUrl": f"{self.state.endpoint}/{repo_id}/commit/{commit}", "commitOid": commit, "pullRequestUrl": None})

    # ------------------------------------------------------------------ CDN
    def _cdn(self, method: str, path: str, query: dict) -> None:
        if self.headers.get("Authorization") is not None:
            with self.state.lock:
                self.state.cdn_requests_with_auth += 1
            raise _Reply(400, message="Only one auth mechanism allowed")
        match = re.fullmatch(r"/blobs/([0-9a-f]{64})", path)
        if method not in ("GET", "HEAD") or match is None:
            raise _Reply(404, message="no such object")
        if query.get("sig", [""])[0] != str(self.state.signature):
            raise _Reply(403, message="Request has expired")
        blob = self.state.root / "blobs" / match[1]
        if not blob.exists():
            raise _Reply(404, message="no such object")
        entry = FileEntry(match[1], blob.stat().st_size, True, "")
        self._send_blob(method, entry, f"blobs/{match[1]}", {"ETag": f'"{match[1]}"'})

    def _send_blob(self, method: str, entry: FileEntry, label: str, headers: dict) -> None:
        self._read_body()
        start, end, status = 0, entry.size - 1, 200
        if (range_header := self.headers.get("Range")) is not None:
            found = re.fullmatch(r"bytes=(\d+)-(\d*)", range_header.strip())
            if found is None:
                raise _Reply(400, message="bad Range")
            start = int(found[1])
            end = min(int(found[2]) if found[2] else entry.size - 1, entry.size - 1)
            if start >= entry.size or end < start:
                raise _Reply(416, message="range not satisfiable", body={"error": "range"})
            status = 206
        length = end - start + 1 if entry.size else 0
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(length))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{entry.size}")
        self.end_headers()
        if method == "HEAD" or length == 0:
            return
        limit = length if self._truncate_after is None else min(length, self._truncate_after)
        sent = 0
        with open(self.state.root / "blobs" / entry.sha256, "rb") as handle:
            while sent < limit:
                block = os.pread(handle.fileno(), min(_BLOCK, limit - sent), start + sent)
                self.wfile.write(block)
                sent += len(block)
        with self.state.lock:
            self.state.file_bytes_served += sent
            self.state.file_bytes_by_path[label] = self.state.file_bytes_by_path.get(label, 0) + sent
        if sent < length:
            self.close_connection = True
            self.wfile.flush()
            self.connection.shutdown(2)


def main() -> None:
    """Serve until killed; with a control route for publishing folders and reading counters."""
    import argparse
    import time

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", required=True)
    parser.add_argument("--token", action="append", default=[], help="a token with write access")
    args = parser.parse_args()
    server = HubServer(args.root, tokens={token: True for token in args.token})
    _ControlHandler.server_state = server
    control = ThreadingHTTPServer(("127.0.0.1", 0), _ControlHandler)
    threading.Thread(target=control.serve_forever, daemon=True).start()
    print(json.dumps({"endpoint": server.endpoint, "cdn": server.cdn_endpoint, "control": f"http://127.0.0.1:{control.server_address[1]}"}), flush=True)
    while True:
        time.sleep(3600)


class _ControlHandler(BaseHTTPRequestHandler):
    """POST /publish {repo_id, folder, private}, POST /listing {repo_id}, POST /reset, GET /stats (benchmarks)."""

    server_state: HubServer

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        return

    def do_GET(self) -> None:
        self._reply(self.server_state.stats())

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        if self.path == "/publish":
            commit = self.server_state.publish_folder(body["repo_id"], body["folder"], private=body.get("private", False))
            self._reply({"commit": commit})
        elif self.path == "/listing":
            with self.server_state.lock:
                repo = self.server_state.repos[body["repo_id"]]
                entries = repo.commits[repo.branches[body.get("revision", "main")]]
                self._reply({path: {"sha256": e.sha256, "size": e.size} for path, e in entries.items()})
        else:
            self.server_state.reset_counters()
            self._reply({})

    def _reply(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


if __name__ == "__main__":
    main()
