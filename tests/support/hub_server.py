"""A small Hugging Face Hub-protocol server for tests (stdlib only: http.server + threading).

It speaks the subset of the Hub HTTP API that ``huggingface_hub`` 2.x uses to push and load a PEFT
adapter, so that round trips in tests go through the real client over real HTTP on 127.0.0.1:

- ``GET  /api/whoami-v2``                                   who owns a token
- ``POST /api/repos/create``                                create a repo (409 if it exists)
- ``POST /api/validate-yaml``                               README metadata check (accepts everything)
- ``POST /api/models/{repo}/preupload/{rev}``               every file is uploaded as "regular" (no LFS/Xet)
- ``POST /api/models/{repo}/commit/{rev}``                  NDJSON: header, file (base64), deletedFile/Folder
- ``POST /api/models/{repo}/branch/{branch}``               create a branch
- ``GET  /api/models/{repo}/refs``                          list branches
- ``GET  /api/models/{repo}[/revision/{rev}]``              repo info (sha, siblings, private)
- ``GET  /api/models/{repo}/tree/{rev}[/{path}]``           tree listing
- ``HEAD/GET /{repo}/resolve/{rev}/{path}``                 file download with X-Repo-Commit and ETag

Repos live in a temporary directory: each blob is stored once by its git blob sha; commits (file table,
parent, message) are kept in memory. Errors carry ``X-Error-Code`` / ``X-Error-Message`` like the Hub, so
the client raises its usual typed errors (RepositoryNotFoundError, RevisionNotFoundError, ...).

Auth: tokens are registered with :meth:`HubServer.add_user`. Private repos are readable and every repo is
writable only by its namespace owner; an unknown token gives 401 ``Invalid credentials in Authorization
header`` on every request, as on the Hub. ``python -m support.hub_server (from tests/)`` serves until interrupted.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

_INVALID_TOKEN = "Invalid credentials in Authorization header"


def git_blob_sha(data: bytes) -> str:
    """The git blob id of ``data`` (what the Hub reports as the ETag of a regular file)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    """One commit: the full file table (path -> blob sha) plus metadata."""

    oid: str
    files: dict[str, str]
    parent: str | None
    title: str
    date: str


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    created_at: str = ""


class HubError(Exception):
    """An HTTP error answer: status, X-Error-Code, X-Error-Message and extra headers."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict | None = None,
        extra: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}
        self.extra = extra or {}  # more JSON body fields (the Hub's 409 on create carries the repo url)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


class HubState:
    """Repos, blobs and users of one server (thread-safe through one lock)."""

    def __init__(self, root: Path):
        self.root = root
        (root / "blobs").mkdir(parents=True, exist_ok=True)
        self.repos: dict[str, Repo] = {}
        self.tokens: dict[str, str] = {}
        self.lock = threading.RLock()
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, user) for assertions
        self._counter = 0

    # blobs ---------------------------------------------------------------------------------------
    def put_blob(self, data: bytes) -> str:
        oid = git_blob_sha(data)
        path = self.root / "blobs" / oid
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
        return oid

    def blob(self, oid: str) -> bytes:
        return (self.root / "blobs" / oid).read_bytes()

    # commits -------------------------------------------------------------------------------------
    def new_commit(self, repo: Repo, files: dict[str, str], parent: str | None, title: str) -> Commit:
        self._counter += 1
        seed = f"{repo.repo_id}\0{parent}\0{title}\0{self._counter}\0{sorted(files.items())}"
        oid = hashlib.sha1(seed.encode()).hexdigest()
        commit = Commit(oid=oid, files=dict(files), parent=parent, title=title, date=_now())
        repo.commits[oid] = commit
        return commit

    def resolve(self, repo: Repo, revision: str) -> Commit:
        """Branch name, full commit sha or a unique prefix of >= 7 characters."""
        revision = unquote(revision)
        if revision in repo.branches:
            return repo.commits[repo.branches[revision]]
        if revision in repo.commits:
            return repo.commits[revision]
        if len(revision) >= 7:
            matches = [oid for oid in repo.commits if oid.startswith(revision)]
            if len(matches) == 1:
                return repo.commits[matches[0]]
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    # plumbing ------------------------------------------------------------------------------------
    def log_message(self, format: str, *args: Any) -> None:  # silence stderr access logs
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
        self.send_response(status)
        headers = {"Content-Type": "application/json", **(headers or {})}
        headers.setdefault("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _json(self, status: int, payload: Any, headers: dict | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers)

    def _user(self) -> str | None:
        """The user of the Bearer token; None when anonymous; 401 for an unknown token."""
        auth = self.headers.get("Authorization")
        if not auth:
            return None
        token = auth.removeprefix("Bearer ").strip()
        user = self.server.state.tokens.get(token)
        if user is None:
            raise HubError(401, _INVALID_TOKEN)
        return user

    def _dispatch(self, method: str) -> None:
        state = self.server.state
        head = method == "HEAD"
        try:
            body = self._body() if method == "POST" else b""
            url = urlsplit(self.path)
            query = parse_qs(url.query)
            parts = [unquote(p) for p in url.path.split("/")[1:]]
            with state.lock:
                user = self._user()
                state.requests.append((method, url.path, user))
                self._route(method, parts, query, body, user, head)
        except HubError as err:
            headers = {"X-Error-Message": err.message, **err.headers}
            if err.code:
                headers["X-Error-Code"] = err.code
            body = json.dumps({"error": err.message, **err.extra}).encode()
            self._send(err.status, body, headers, head=head)
        except Exception as err:  # pragma: no cover - a server bug must show up in the test
            self._send(500, json.dumps({"error": f"test hub server error: {err!r}"}).encode())

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    # access --------------------------------------------------------------------------------------
    def _repo(self, repo_id: str, user: str | None, write: bool = False) -> Repo:
        repo = self.server.state.repos.get(repo_id)
        owner = repo_id.split("/")[0]
        if repo is None or (repo.private and user != owner):
            # the Hub answers 401 to anonymous and 404 to authenticated callers, both "RepoNotFound"
            status = 401 if user is None else 404
            raise HubError(status, "Repository not found", "RepoNotFound")
        if write and user != owner:
            if user is None:
                raise HubError(401, "You must be authenticated to write to this repo", "RepoNotFound")
            raise HubError(
                403, f"You don't have the rights to write to {repo_id}. The repo belongs to '{owner}'"
            )
        return repo

    # routes --------------------------------------------------------------------------------------
    def _route(self, method: str, parts: list[str], query: dict, body: bytes, user: str | None, head: bool):
        if parts[:1] == ["api"]:
            if method == "GET" and parts[1:] == ["whoami-v2"]:
                return self._whoami(user)
            if method == "POST" and parts[1:] == ["repos", "create"]:
                return self._create_repo(json.loads(body or b"{}"), user)
            if method == "POST" and parts[1:] == ["validate-yaml"]:
                return self._json(200, {"errors": [], "warnings": []})
            if len(parts) >= 4 and parts[1] == "models":
                repo_id, rest = "/".join(parts[2:4]), parts[4:]
                if method == "GET" and not rest:
                    return self._info(repo_id, "main", user)
                if method == "GET" and rest[:1] == ["revision"] and len(rest) >= 2:
                    return self._info(repo_id, "/".join(rest[1:]), user)
                if method == "GET" and rest[:1] == ["tree"] and len(rest) >= 2:
                    return self._tree(repo_id, rest[1], "/".join(rest[2:]), query, user)
                if method == "GET" and rest == ["refs"]:
                    return self._refs(repo_id, user)
                if method == "POST" and rest[:1] == ["preupload"] and len(rest) >= 2:
                    return self._preupload(repo_id, "/".join(rest[1:]), json.loads(body), user)
                if method == "POST" and rest[:1] == ["commit"] and len(rest) >= 2:
                    return self._commit(repo_id, "/".join(rest[1:]), body, user)
                if method == "POST" and rest[:1] == ["branch"] and len(rest) >= 2:
                    return self._branch(repo_id, "/".join(rest[1:]), json.loads(body or b"{}"), user)
            raise HubError(404, f"Unknown API route {'/'.join(parts)}")
        if method in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]), user, head)
        raise HubError(404, f"Not found: /{'/'.join(parts)}")

    def _whoami(self, user: str | None) -> None:
        if user is None:
            raise HubError(401, _INVALID_TOKEN)
        self._json(
            200,
            {
                "type": "user",
                "name": user,
                "fullname": user,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}},
            },
        )

    def _create_repo(self, payload: dict, user: str | None) -> None:
        if user is None:
            raise HubError(401, "You must be authenticated to create a repo")
        namespace = payload.get("organization") or user
        repo_id = f"{namespace}/{payload['name']}"
        if payload.get("type", "model") != "model":
            raise HubError(400, "This test hub only stores model repos")
        if namespace != user:
            raise HubError(
                403, f'You don\'t have the rights to create a model under the namespace "{namespace}"'
            )
        state = self.server.state
        url = f"{self.server.url}/{repo_id}"
        if repo_id in state.repos:
            raise HubError(409, "You already created this model repo", extra={"url": url})
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        repo = Repo(repo_id=repo_id, private=private, created_at=_now())
        gitattributes = state.put_blob(b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
        first = state.new_commit(repo, {".gitattributes": gitattributes}, None, "initial commit")
        repo.branches["main"] = first.oid
        state.repos[repo_id] = repo
        self._json(200, {"url": url, "name": repo_id, "id": repo_id})

    def _info(self, repo_id: str, revision: str, user: str | None) -> None:
        repo = self._repo(repo_id, user)
        commit = self.server.state.resolve(repo, revision)
        siblings = [{"rfilename": path} for path in sorted(commit.files)]
        self._json(
            200,
            {
                "_id": repo_id,
                "id": repo_id,
                "modelId": repo_id,
                "author": repo_id.split("/")[0],
                "sha": commit.oid,
                "private": repo.private,
                "gated": False,
                "disabled": False,
                "lastModified": commit.date,
                "createdAt": repo.created_at,
                "tags": [],
                "downloads": 0,
                "likes": 0,
                "siblings": siblings,
            },
        )

    def _tree(self, repo_id: str, revision: str, path: str, query: dict, user: str | None) -> None:
        state = self.server.state
        repo = self._repo(repo_id, user)
        commit = state.resolve(repo, revision)
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = f"{path.strip('/')}/" if path.strip("/") else ""
        if prefix and not any(p.startswith(prefix) for p in commit.files):
            raise HubError(404, f"Path {path} not found", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        entries: dict[str, dict] = {}
        for file_path, oid in sorted(commit.files.items()):
            if not file_path.startswith(prefix):
                continue
            rel = file_path[len(prefix) :]
            folders = rel.split("/")[:-1]
            for depth in range(len(folders)):
                folder = prefix + "/".join(folders[: depth + 1])
                entries.setdefault(folder, {"type": "directory", "path": folder, "oid": "0" * 40, "size": 0})
                if not recursive:
                    break
            if recursive or not folders:
                entries[file_path] = {
                    "type": "file",
                    "path": file_path,
                    "oid": oid,
                    "size": len(state.blob(oid)),
                }
        self._json(200, list(entries.values()))

    def _refs(self, repo_id: str, user: str | None) -> None:
        repo = self._repo(repo_id, user)
        branches = [
            {"name": name, "ref": f"refs/heads/{name}", "targetCommit": oid}
            for name, oid in sorted(repo.branches.items())
        ]
        self._json(200, {"branches": branches, "tags": [], "converts": [], "pullRequests": []})

    def _branch(self, repo_id: str, branch: str, payload: dict, user: str | None) -> None:
        state = self.server.state
        repo = self._repo(repo_id, user, write=True)
        if branch in repo.branches:
            raise HubError(409, f"Reference refs/heads/{branch} already exists")
        start = state.resolve(repo, payload.get("startingPoint") or "main")
        repo.branches[branch] = start.oid
        self._json(200, {})

    def _preupload(self, repo_id: str, revision: str, payload: dict, user: str | None) -> None:
        state = self.server.state
        repo = self._repo(repo_id, user, write=True)
        state.resolve(repo, revision)
        files = [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in payload["files"]
        ]
        self._json(200, {"files": files, "commitOid": repo.branches.get(unquote(revision))})

    def _commit(self, repo_id: str, revision: str, body: bytes, user: str | None) -> None:
        state = self.server.state
        repo = self._repo(repo_id, user, write=True)
        branch = unquote(revision)
        if branch not in repo.branches:
            raise HubError(404, f"Invalid rev id: {branch} (commits go to a branch)", "RevisionNotFound")
        head = repo.commits[repo.branches[branch]]
        files = dict(head.files)
        title = "commit"
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                title = value.get("summary") or title
                parent = value.get("parentCommit")
                if parent and not head.oid.startswith(parent):
                    raise HubError(412, f"Parent commit {parent} is not the head of {branch}")
            elif key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise HubError(400, "only base64 file content is supported")
                files[value["path"]] = state.put_blob(base64.b64decode(value["content"]))
            elif key == "deletedFile":
                if value["path"] not in files:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                del files[value["path"]]
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                for path in [p for p in files if p.startswith(prefix)]:
                    del files[path]
            else:
                raise HubError(400, f"test hub server does not support commit operation {key!r} (LFS/copy)")
        commit = state.new_commit(repo, files, head.oid, title)
        repo.branches[branch] = commit.oid
        self._json(
            200,
            {
                "success": True,
                "commitOid": commit.oid,
                "pullRequestUrl": None,
                "commitUrl": f"{self.server.url}/{repo_id}/commit/{commit.oid}",
            },
        )

    def _resolve(self, repo_id: str, revision: str, path: str, user: str | None, head: bool) -> None:
        state = self.server.state
        repo = self._repo(repo_id, user)
        commit = state.resolve(repo, revision)
        oid = commit.files.get(path)
        if oid is None:
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        data = state.blob(oid)
        headers = {
            "Content-Type": "application/octet-stream",
            "X-Repo-Commit": commit.oid,
            "ETag": f'"{oid}"',
            "Content-Length": str(len(data)),
            "Accept-Ranges": "bytes",
        }
        self._send(200, data, headers, head=head)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    state: HubState
    url: str


class HubServer:
    """A running test hub on 127.0.0.1 (random free port). Use as a context manager or call ``stop()``."""

    def __init__(self, root: str | Path | None = None):
        self._tmp = None if root is not None else tempfile.mkdtemp(prefix="hpr-test-hub-")
        self.root = Path(root if root is not None else self._tmp)
        self.state = HubState(self.root)
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.state = self.state
        self.url = self._server.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="test-hub", daemon=True)
        self._thread.start()

    def add_user(self, name: str, token: str) -> None:
        """Register ``token`` as a write token of user ``name``."""
        with self.state.lock:
            self.state.tokens[token] = name

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of ``repo_id`` at ``revision`` (for assertions)."""
        with self.state.lock:
            commit = self.state.resolve(self.state.repos[repo_id], revision)
            return {path: self.state.blob(oid) for path, oid in commit.files.items()}

    def commits(self, repo_id: str, branch: str = "main") -> list[str]:
        """Commit ids of ``branch``, newest first."""
        with self.state.lock:
            repo = self.state.repos[repo_id]
            out, oid = [], repo.branches[branch]
            while oid is not None:
                out.append(oid)
                oid = repo.commits[oid].parent
            return out

    def env(self, home: str | Path, **extra: str) -> dict[str, str]:
        """Environment for a client process talking to this server with a fresh HF_HOME."""
        home = Path(home)
        env = {
            "HF_ENDPOINT": self.url,
            "HF_HOME": str(home),
            "HF_HUB_CACHE": str(home / "hub"),
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
            "HF_HUB_OFFLINE": "0",
            "TRANSFORMERS_OFFLINE": "0",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }
        env.update(extra)
        return env

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> HubServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":  # pragma: no cover
    with HubServer() as hub:
        hub.add_user("alice", "hf_alice_test_token")
        print(f"test hub at {hub.url} (user alice, token hf_alice_test_token); Ctrl-C to stop", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
