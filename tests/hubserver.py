"""A small Hugging Face Hub-compatible HTTP server for tests (stdlib only).

It implements the endpoints the real ``huggingface_hub`` client calls to create repos, upload (regular
base64 commits and the git-lfs batch API with PUT + verify), list and download files, with real
commits (sha1 ids), branches, pull-request refs, 302 redirects of LFS files to the *other* host name
(``localhost`` vs ``127.0.0.1``: the client only stops at a redirect off the Hub's host), ``Range``
requests, and 404s carrying ``X-Error-Code`` (RepoNotFound, RevisionNotFound, EntryNotFound).
The facts it honours are listed in the team's hub-protocol notes, read from huggingface_hub's client.

Usage::

    server = HubServer(tmp_path)          # binds 127.0.0.1, port 0
    server.start(); ...; server.stop()
    server.upload_mode = "regular"        # or "lfs": what /preupload answers for binary files
    server.forbidden_orgs.add("acme")     # creating repos under acme/ answers 403
    server.requests                       # [(method, path), ...] for assertions
    server.hang = True                    # accept every connection, read the request, never answer
    server.drop_uploads = True            # read part of an upload's body (LFS PUT or commit), then drop the line
    server.served                         # [(path, bytes of file content sent), ...]: Range requests count their part
    server.file_bytes_served()            # their total (API answers, JSON listings, are not counted)

Repos live in memory; file contents live in ``root/blobs/<sha256>``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["HubServer"]

# Files the real Hub stores in LFS whatever their size (a subset of its default .gitattributes).
_LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".npz", ".npy",
                 ".zip", ".gz", ".tar", ".pkl", ".model", ".pb")
_REGULAR_MAX = 10 * 1024 * 1024
_GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
_HEX40 = re.compile(r"^[0-9a-f]{40}$")


def _git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class _File:
    sha256: str
    size: int
    lfs: bool
    oid: str  # git blob id (of the pointer for LFS files)


@dataclass
class _Commit:
    sha: str
    parent: str | None
    files: dict[str, _File]
    title: str
    message: str
    date: str


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    private: bool
    refs: dict[str, str] = field(default_factory=dict)  # branch or refs/pr/N -> commit sha
    commits: dict[str, _Commit] = field(default_factory=dict)
    prs: int = 0


class _HttpError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, body: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.body = status, message, code, body


class HubServer:
    """A threaded Hub-compatible server on 127.0.0.1 (see the module docstring)."""

    def __init__(self, root: str | os.PathLike | None = None, *, upload_mode: str = "lfs"):
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="hubserver-"))
        self.blobs = self.root / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.repos: dict[tuple[str, str], _Repo] = {}
        self.upload_mode = upload_mode
        self.forbidden_orgs: set[str] = set()  # namespaces where creating repos answers 403, as for a stranger
        self.requests: list[tuple[str, str]] = []
        self.hang = False  # a Hub that accepts connections and never answers
        self.drop_uploads = False  # a connection lost in the middle of an upload
        self.served: list[tuple[str, int]] = []  # (request path, bytes of file content in the answer's body)
        self._released = threading.Event()  # set by stop(): hung handlers return
        self.lock = threading.RLock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._counter = 0

    # --- lifecycle -------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> HubServer:
        self._released.clear()
        handler = type("Handler", (_Handler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hubserver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._released.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- storage ---------------------------------------------------------------------------------
    def _store(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        path = self.blobs / sha
        if not path.exists():
            tmp = self.blobs / f".{sha}.{uuid.uuid4().hex}"
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return sha

    def has_blob(self, sha256: str) -> bool:
        return bool(re.fullmatch(r"[0-9a-f]{64}", sha256)) and (self.blobs / sha256).exists()

    def _new_commit(self, repo: _Repo, parent: str | None, files: dict[str, _File], title: str, message: str) -> str:
        with self.lock:
            self._counter += 1
            listing = json.dumps(sorted((p, f.oid) for p, f in files.items()))
            sha = hashlib.sha1(f"{repo.repo_id}\n{parent}\n{listing}\n{title}\n{self._counter}".encode()).hexdigest()
            repo.commits[sha] = _Commit(sha, parent, dict(files), title, message,
                                        time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()))
            return sha

    def create_repo(self, repo_id: str, *, repo_type: str = "model", private: bool = False) -> _Repo:
        """Create a repo with an initial commit holding .gitattributes, as the Hub does."""
        with self.lock:
            repo = _Repo(repo_type, repo_id, private)
            ga = _File(self._store(_GITATTRIBUTES), len(_GITATTRIBUTES), False, _git_blob_oid(_GITATTRIBUTES))
            repo.refs["main"] = self._new_commit(repo, None, {".gitattributes": ga}, "initial commit", "")
            self.repos[(repo_type, repo_id)] = repo
            return repo

    def get_repo(self, repo_type: str, repo_id: str) -> _Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise _HttpError(404, f"Repository Not Found: {repo_id}", "RepoNotFound")
        return repo

    def resolve(self, repo: _Repo, rev: str) -> _Commit:
        sha = repo.refs.get(rev) or (rev if rev in repo.commits else None)
        if sha is None:
            raise _HttpError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return repo.commits[sha]

    def read_file(self, repo_id: str, path: str, *, revision: str = "main", repo_type: str = "model") -> bytes:
        """The bytes of a file at a revision (for test assertions)."""
        repo = self.get_repo(repo_type, repo_id)
        f = self.resolve(repo, revision).files[path]
        return (self.blobs / f.sha256).read_bytes()

    def list_files(self, repo_id: str, *, revision: str = "main", repo_type: str = "model") -> list[str]:
        repo = self.get_repo(repo_type, repo_id)
        return sorted(self.resolve(repo, revision).files)

    def downloads(self) -> list[str]:
        """Paths of files fetched with GET .../resolve/... so far (``repo/rev/path``)."""
        out = []
        for method, path in self.requests:
            m = re.match(r"^/(?:datasets/|spaces/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", urlsplit(path).path)
            if method == "GET" and m:
                out.append(f"{m.group(1)}/{unquote(m.group(2))}/{unquote(m.group(3))}")
        return out

    def file_bytes_served(self) -> int:
        """Bytes of file content sent so far (a Range request counts the part it asked for)."""
        with self.lock:
            return sum(n for _, n in self.served)

    def is_lfs(self, path: str, size: int, sample: bytes) -> bool:
        if self.upload_mode == "regular":
            return False
        return path.endswith(_LFS_SUFFIXES) or size > _REGULAR_MAX or b"\0" in sample


def _entry(path: str, f: _File) -> dict:
    e: dict = {"type": "file", "oid": f.oid, "size": f.size, "path": path}
    if f.lfs:
        e["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": len(_lfs_pointer(f.sha256, f.size))}
    return e


def _tree_entries(files: dict[str, _File], prefix: str, recursive: bool) -> list[dict]:
    prefix = prefix.strip("/")
    base = prefix + "/" if prefix else ""
    dirs: dict[str, None] = {}
    out: list[dict] = []
    for path in sorted(files):
        if not path.startswith(base):
            continue
        rest = path[len(base):]
        parts = rest.split("/")
        for i in range(1, len(parts)):
            if recursive or i == 1:
                dirs[base + "/".join(parts[:i])] = None
        if recursive or len(parts) == 1:
            out.append(_entry(path, files[path]))
    folders = [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d} for d in dirs]
    return folders + out


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"
    server_version = "TestHub/1.0"

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    # --- plumbing --------------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, obj: object, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _base(self) -> str:
        return f"http://{self.headers.get('Host') or f'127.0.0.1:{self.hub.port}'}"

    def _other_host(self) -> str:
        host = self.headers.get("Host", "")
        name = "localhost" if host.startswith("127.0.0.1") else "127.0.0.1"
        return f"http://{name}:{self.hub.port}"

    def _dispatch(self) -> None:
        self.hub.requests.append((self.command, self.path))
        if self.hub.hang:
            self.hub._released.wait(600)
            self.close_connection = True
            return
        if self.hub.drop_uploads and self._is_upload():
            return self._drop()
        body = self._body() if self.command in ("POST", "PUT", "DELETE") else b""
        try:
            self._route(body)
        except _HttpError as e:
            headers = {"X-Error-Message": e.message}
            if e.code:
                headers["X-Error-Code"] = e.code
            self._json(e.body or {"error": e.message}, e.status, headers)

    def _is_upload(self) -> bool:
        path = urlsplit(self.path).path
        return (self.command == "PUT" and path.startswith("/lfs-upload/")) or (
            self.command == "POST" and "/commit/" in path)

    def _drop(self) -> None:
        """Read a little of the body, then close the socket without an answer (a connection lost mid-upload)."""
        n = int(self.headers.get("Content-Length") or 0)
        if n:
            self.rfile.read(min(n, 64))
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)
        self.connection.close()

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch  # http.server naming

    # --- routing ---------------------------------------------------------------------------------
    def _route(self, body: bytes) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        raw = url.path
        segs = raw.strip("/").split("/")
        method = self.command
        if raw == "/api/validate-yaml" and method == "POST":
            return self._validate_yaml(json.loads(body or b"{}"))
        if raw in ("/api/repos/create", "/api/repos/delete"):
            return self._create_or_delete(raw.endswith("create"), json.loads(body or b"{}"))
        if segs[0] == "lfs-objects" and len(segs) == 2:
            return self._serve_lfs(segs[1])
        if segs[0] == "lfs-upload" and len(segs) == 2 and method == "PUT":
            return self._lfs_put(segs[1], body)
        if segs[0] == "lfs-verify" and method == "POST":
            return self._lfs_verify(json.loads(body or b"{}"))
        if segs[0] == "api" and len(segs) >= 4 and segs[1] in ("models", "datasets", "spaces"):
            repo_type = segs[1][:-1]
            repo = self.hub.get_repo(repo_type, f"{segs[2]}/{segs[3]}")
            rest = [unquote(s) for s in segs[4:]]
            return self._api(repo, rest, query, body)
        # file URLs: /{repo}/resolve/{rev}/{path}, /datasets/{repo}/..., /{repo}.git/info/lfs/objects/batch
        repo_type = "model"
        if segs[0] in ("datasets", "spaces"):
            repo_type, segs = segs[0][:-1], segs[1:]
        if len(segs) >= 2 and segs[1].endswith(".git") and segs[2:] == ["info", "lfs", "objects", "batch"]:
            repo = self.hub.get_repo(repo_type, f"{segs[0]}/{segs[1][:-4]}")
            return self._lfs_batch(repo, json.loads(body or b"{}"))
        if len(segs) >= 5 and segs[2] == "resolve" and method in ("GET", "HEAD"):
            repo = self.hub.get_repo(repo_type, f"{segs[0]}/{segs[1]}")
            return self._resolve(repo, unquote(segs[3]), unquote("/".join(segs[4:])))
        raise _HttpError(404, f"no route for {method} {raw}")

    def _api(self, repo: _Repo, rest: list[str], query: dict, body: bytes) -> None:
        hub, method = self.hub, self.command
        if method == "GET" and (not rest or rest[0] == "revision"):
            commit = hub.resolve(repo, rest[1] if len(rest) > 1 else "main")
            blobs = query.get("blobs", ["false"])[0].lower() == "true"
            siblings = []
            for path, f in sorted(commit.files.items()):
                s: dict = {"rfilename": path}
                if blobs:
                    s.update(size=f.size, blobId=f.oid)
                    if f.lfs:
                        s["lfs"] = {"sha256": f.sha256, "size": f.size,
                                    "pointerSize": len(_lfs_pointer(f.sha256, f.size))}
                siblings.append(s)
            return self._json({"_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id,
                               "modelId": repo.repo_id, "sha": commit.sha, "private": repo.private,
                               "disabled": False, "gated": False, "lastModified": commit.date, "tags": [],
                               "downloads": 0, "likes": 0, "siblings": siblings})
        if method == "GET" and rest and rest[0] == "tree":
            commit = hub.resolve(repo, rest[1])
            prefix = "/".join(rest[2:])
            if prefix and prefix not in commit.files and not any(p.startswith(prefix + "/") for p in commit.files):
                raise _HttpError(404, f"Entry not found: {prefix}", "EntryNotFound")
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            return self._json(_tree_entries(commit.files, prefix, recursive))
        if method == "POST" and rest and rest[0] == "paths-info":
            commit = hub.resolve(repo, rest[1])
            form = parse_qs(body.decode()) if body and not body.lstrip().startswith(b"{") else {}
            paths = form.get("paths") or (json.loads(body).get("paths", []) if body.strip().startswith(b"{") else [])
            out = []
            for p in paths:
                if p in commit.files:
                    out.append(_entry(p, commit.files[p]))
                elif any(q.startswith(p.rstrip("/") + "/") for q in commit.files):
                    out.append({"type": "directory", "oid": hashlib.sha1(p.encode()).hexdigest(), "path": p})
            return self._json(out)
        if method == "GET" and rest == ["refs"]:
            branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": s}
                        for b, s in repo.refs.items() if not b.startswith("refs/")]
            prs = [{"name": b, "ref": b, "targetCommit": s} for b, s in repo.refs.items() if b.startswith("refs/pr/")]
            return self._json({"branches": branches, "converts": [], "tags": [], "pullRequests": prs})
        if method == "GET" and rest and rest[0] == "commits":
            commit = hub.resolve(repo, rest[1])
            out = []
            while commit is not None:
                out.append({"id": commit.sha, "title": commit.title, "message": commit.message, "authors": [],
                            "date": commit.date})
                commit = repo.commits.get(commit.parent) if commit.parent else None
            return self._json(out)
        if method == "POST" and rest and rest[0] == "branch":
            branch = "/".join(rest[1:])
            if branch in repo.refs:
                raise _HttpError(409, f"Branch {branch} already exists")
            start = (json.loads(body or b"{}") or {}).get("startingPoint") or "main"
            with hub.lock:
                repo.refs[branch] = hub.resolve(repo, start).sha
            return self._json({})
        if method == "POST" and rest and rest[0] == "preupload":
            return self._preupload(repo, rest[1], json.loads(body or b"{}"), query)
        if method == "POST" and rest and rest[0] == "commit":
            return self._commit(repo, "/".join(rest[1:]), body, query)
        raise _HttpError(404, f"no route for {method} {'/'.join(rest)}")

    # --- endpoints -------------------------------------------------------------------------------
    def _validate_yaml(self, payload: dict) -> None:
        content = payload.get("content", "")
        if content.startswith("---"):
            lines = content.splitlines()
            if "---" not in [ln.rstrip() for ln in lines[1:]]:
                return self._json({"errors": [{"message": "unterminated YAML front matter"}], "warnings": []}, 400)
        return self._json({"errors": [], "warnings": []})

    def _create_or_delete(self, create: bool, payload: dict) -> None:
        name, org = payload.get("name"), payload.get("organization")
        repo_type = payload.get("type") or "model"
        repo_id = f"{org}/{name}" if org else str(name)
        url = f"{self._base()}/{'' if repo_type == 'model' else repo_type + 's/'}{repo_id}"
        with self.hub.lock:
            exists = (repo_type, repo_id) in self.hub.repos
            if create and org in self.hub.forbidden_orgs:
                raise _HttpError(403, f"You don't have the rights to create a {repo_type} under the namespace "
                                      f'"{org}"')
            if create:
                if exists:
                    raise _HttpError(409, "You already created this model repo", body={
                        "error": "You already created this model repo", "url": url})
                private = bool(payload.get("private")) or payload.get("visibility") == "private"
                self.hub.create_repo(repo_id, repo_type=repo_type, private=private)
                return self._json({"url": url, "name": repo_id, "id": repo_id})
            if not exists:
                raise _HttpError(404, f"Repository Not Found: {repo_id}", "RepoNotFound")
            del self.hub.repos[(repo_type, repo_id)]
            return self._json({})

    def _resolve(self, repo: _Repo, rev: str, path: str) -> None:
        commit = self.hub.resolve(repo, rev)
        f = commit.files.get(path)
        if f is None:
            raise _HttpError(404, f"Entry not found: {path}", "EntryNotFound")
        headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{f.oid}"', "Accept-Ranges": "bytes"}
        if f.lfs:
            headers.update({"X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(f.size),
                            "Location": f"{self._other_host()}/lfs-objects/{f.sha256}"})
            return self._send(302, b"", headers)
        return self._serve_bytes((self.hub.blobs / f.sha256).read_bytes(), headers)

    def _serve_lfs(self, sha256: str) -> None:
        if not self.hub.has_blob(sha256):
            raise _HttpError(404, f"no such object {sha256}")
        data = (self.hub.blobs / sha256).read_bytes()
        return self._serve_bytes(data, {"ETag": f'"{sha256}"', "Accept-Ranges": "bytes"},
                                 "application/octet-stream")

    def _serve_bytes(self, data: bytes, headers: dict[str, str], content_type: str = "application/octet-stream") -> None:
        rng = self.headers.get("Range")
        m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip()) if rng else None
        if m and (m.group(1) or m.group(2)):
            if m.group(1):
                start = int(m.group(1))
                end = min(int(m.group(2)), len(data) - 1) if m.group(2) else len(data) - 1
            else:
                start, end = max(len(data) - int(m.group(2)), 0), len(data) - 1
            if start >= len(data) and len(data) > 0:
                return self._send(416, b"", {**headers, "Content-Range": f"bytes */{len(data)}"})
            headers = {**headers, "Content-Range": f"bytes {start}-{end}/{len(data)}"}
            self._count(end + 1 - start)
            return self._send(206, data[start:end + 1], headers, content_type)
        self._count(len(data))
        return self._send(200, data, headers, content_type)

    def _count(self, n: int) -> None:
        if self.command != "HEAD":
            with self.hub.lock:
                self.hub.served.append((self.path, n))

    def _preupload(self, repo: _Repo, rev: str, payload: dict, query: dict) -> None:
        commit = self.hub.resolve(repo, "main" if query.get("create_pr") else rev)
        files = []
        for item in payload.get("files", []):
            sample = base64.b64decode(item.get("sample", ""))
            lfs = self.hub.is_lfs(item["path"], int(item.get("size", 0)), sample)
            existing = commit.files.get(item["path"])
            oid = None
            if existing is not None:
                oid = existing.sha256 if existing.lfs else existing.oid
            files.append({"path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": oid})
        return self._json({"files": files, "commitOid": commit.sha})

    def _lfs_batch(self, repo: _Repo, payload: dict) -> None:
        if payload.get("operation") != "upload":
            raise _HttpError(400, "only uploads are supported")
        base = self._base()
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            out: dict = {"oid": oid, "size": size, "authenticated": True}
            if not self.hub.has_blob(oid):
                out["actions"] = {"upload": {"href": f"{base}/lfs-upload/{oid}?size={size}"},
                                  "verify": {"href": f"{base}/lfs-verify"}}
            objects.append(out)
        body = json.dumps({"transfer": "basic", "objects": objects}).encode()
        return self._send(200, body, {}, "application/vnd.git-lfs+json")

    def _lfs_put(self, oid: str, body: bytes) -> None:
        if hashlib.sha256(body).hexdigest() != oid:
            raise _HttpError(400, f"uploaded bytes do not hash to {oid}")
        self.hub._store(body)
        return self._send(200, b"", {})

    def _lfs_verify(self, payload: dict) -> None:
        oid, size = payload.get("oid", ""), payload.get("size")
        if not self.hub.has_blob(oid) or (self.hub.blobs / oid).stat().st_size != size:
            raise _HttpError(404, f"object {oid} of size {size} was not uploaded")
        return self._json({"success": True})

    def _commit(self, repo: _Repo, rev: str, body: bytes, query: dict) -> None:
        hub = self.hub
        lines = [json.loads(ln) for ln in body.splitlines() if ln.strip()]
        header = next((ln["value"] for ln in lines if ln.get("key") == "header"), {})
        create_pr = query.get("create_pr", ["0"])[0] in ("1", "true", "True")
        with hub.lock:
            parent = hub.resolve(repo, rev)
            if header.get("parentCommit") and header["parentCommit"] != parent.sha:
                raise _HttpError(412, f"parent commit {header['parentCommit']} is not the head of {rev}")
            files = dict(parent.files)
            for ln in lines:
                key, value = ln.get("key"), ln.get("value", {})
                if key == "file":
                    data = base64.b64decode(value["content"]) if value.get("encoding") == "base64" \
                        else value["content"].encode()
                    files[value["path"]] = _File(hub._store(data), len(data), False, _git_blob_oid(data))
                elif key == "lfsFile":
                    oid, size = value["oid"], int(value["size"])
                    if not hub.has_blob(oid) or (hub.blobs / oid).stat().st_size != size:
                        raise _HttpError(422, f"LFS object {oid} for {value['path']} was not uploaded")
                    files[value["path"]] = _File(oid, size, True, _git_blob_oid(_lfs_pointer(oid, size)))
                elif key == "deletedFile":
                    if value["path"] not in files:
                        raise _HttpError(404, f"Entry not found: {value['path']}", "EntryNotFound")
                    del files[value["path"]]
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    for p in [p for p in files if p.startswith(prefix)]:
                        del files[p]
                elif key != "header":
                    raise _HttpError(400, f"unsupported commit operation {key!r}")
            sha = hub._new_commit(repo, parent.sha, files, header.get("summary", ""), header.get("description", ""))
            base = f"{self._base()}/{'' if repo.repo_type == 'model' else repo.repo_type + 's/'}{repo.repo_id}"
            pr_url = None
            if create_pr:
                repo.prs += 1
                repo.refs[f"refs/pr/{repo.prs}"] = sha
                pr_url = f"{base}/discussions/{repo.prs}"
            else:
                repo.refs[rev] = sha
        return self._json({"success": True, "commitOid": sha, "commitUrl": f"{base}/commit/{sha}",
                           "pullRequestUrl": pr_url, "hookOutput": ""})


if __name__ == "__main__":  # a manual check: python tests/hubserver.py
    with HubServer() as s:
        print("serving on", s.url, "- Ctrl-C to stop")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
