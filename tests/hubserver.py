"""A local stand-in for the Hugging Face hub: the part of its HTTP protocol huggingface_hub speaks when it lists a
repo, reads safetensors headers and downloads files. Tests point ``HF_ENDPOINT`` at it (in a subprocess's
environment, or by patching ``huggingface_hub.constants.ENDPOINT``: huggingface_hub reads it at import).

Served per repo: ``GET /api/models/{repo}[/revision/{rev}]`` (sha, siblings with sizes and LFS sha256),
``HEAD|GET /{repo}/resolve/{rev}/{file}`` with ``X-Repo-Commit``, ``ETag`` (``X-Linked-Etag``/``X-Linked-Size`` for
LFS files, as the hub sends them) and byte ranges. ``faults`` break one file's downloads the ways a network or a
server does: ``"drop"`` closes the connection half-way through (``times`` times), ``"truncate"`` serves a short
file, ``"corrupt"`` serves bytes whose sha256 differs from the one the repo listing promises.

Run as a script to serve a directory of checkpoints (``python tests/hubserver.py ROOT``; ROOT/owner/name/...).
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

LFS_SUFFIXES = (".safetensors", ".bin", ".model")
CHUNK = 1 << 16  # served in pieces of this size (16 times larger when not throttled)


@dataclass
class Repo:
    root: Path
    sha: str = ""
    files: dict[str, dict] = field(default_factory=dict)  # rfilename -> {"size", "sha256", "lfs"}

    def scan(self) -> None:
        listing = hashlib.sha1()
        self.files = {}
        for p in sorted(self.root.rglob("*")):
            if not p.is_file() or any(part.startswith(".") for part in p.relative_to(self.root).parts):
                continue
            name = p.relative_to(self.root).as_posix()
            h = hashlib.sha256()
            with open(p, "rb") as f:
                while b := f.read(CHUNK):
                    h.update(b)
            self.files[name] = {"size": p.stat().st_size, "sha256": h.hexdigest(), "lfs": name.endswith(LFS_SUFFIXES)}
            listing.update(f"{name} {h.hexdigest()}\n".encode())
        self.sha = listing.hexdigest()


class HubServer:
    """``with HubServer({"owner/name": dir}) as hub:`` serves on ``hub.url`` until the block ends."""

    def __init__(self, repos: dict[str, str | Path], port: int = 0):
        self.repos = {rid: Repo(Path(d)) for rid, d in repos.items()}
        for r in self.repos.values():
            r.scan()
        self.faults: dict[str, dict] = {}  # file name -> {"kind": "drop"|"truncate"|"corrupt", "times": n}
        self.log: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.bytes_sent = 0
        self.token: str | None = None  # when set, a request without "Authorization: Bearer TOKEN" is refused
        self.auth: list[str | None] = []  # each request's Authorization header
        self.rate: float | None = None  # bytes/s per download, to make a download slow enough to interrupt
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), _handler(self))
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def fault(self, file: str) -> dict | None:
        with self._lock:
            f = self.faults.get(file)
            if f is None:
                return None
            if "times" in f:
                if f["times"] <= 0:
                    return None
                f["times"] -= 1
            return f

    def requests(self, method: str, suffix: str) -> list[tuple[str, str, str | None]]:
        return [r for r in self.log if r[0] == method and r[1].endswith(suffix)]


def _handler(hub: HubServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet: tests read hub.log instead
            pass

        def do_GET(self) -> None:
            self._route(head=False)

        def do_HEAD(self) -> None:
            self._route(head=True)

        def _route(self, head: bool) -> None:
            path = unquote(urlparse(self.path).path)
            hub.log.append((self.command, path, self.headers.get("Range")))
            hub.auth.append(self.headers.get("Authorization"))
            if hub.token and self.headers.get("Authorization") != f"Bearer {hub.token}":
                return self._json(401, {"error": "Invalid credentials"}, {"X-Error-Code": "GatedRepo"})
            if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path):
                return self._info(m[1], m[2])
            if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)", path):
                return self._tree(m[1], m[2])
            if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
                return self._resolve(m[1], m[2], m[3], head)
            self._json(404, {"error": f"no route for {path}"}, {"X-Error-Code": "EntryNotFound"})

        def _repo(self, rid: str, rev: str | None) -> Repo | None:
            repo = hub.repos.get(rid)
            if repo is None:
                self._json(401, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                return None
            if rev not in (None, "main", repo.sha):
                self._json(404, {"error": f"Invalid rev id: {rev}"}, {"X-Error-Code": "RevisionNotFound"})
                return None
            return repo

        def _info(self, rid: str, rev: str | None) -> None:
            if (repo := self._repo(rid, rev)) is None:
                return
            siblings = []
            for name, f in repo.files.items():
                s = {"rfilename": name, "size": f["size"], "blobId": f["sha256"][:40]}
                if f["lfs"]:
                    s["lfs"] = {"sha256": f["sha256"], "size": f["size"], "pointerSize": 134}
                siblings.append(s)
            self._json(200, {"_id": rid, "id": rid, "modelId": rid, "sha": repo.sha, "private": False,
                             "disabled": False, "gated": False, "tags": [], "downloads": 0, "likes": 0,
                             "lastModified": "2026-01-01T00:00:00.000Z", "createdAt": "2026-01-01T00:00:00.000Z",
                             "siblings": siblings})

        def _tree(self, rid: str, rev: str) -> None:
            """The recursive file listing snapshot_download asks for (one page)."""
            if (repo := self._repo(rid, rev)) is None:
                return
            entries = []
            for name, f in repo.files.items():
                e = {"type": "file", "oid": f["sha256"][:40], "size": f["size"], "path": name}
                if f["lfs"]:
                    e["lfs"] = {"oid": f["sha256"], "size": f["size"], "pointerSize": 134}
                entries.append(e)
            self._json(200, entries)

        def _resolve(self, rid: str, rev: str, name: str, head: bool) -> None:
            if (repo := self._repo(rid, rev)) is None:
                return
            f = repo.files.get(name)
            if f is None:
                return self._json(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound",
                                                                     "X-Repo-Commit": repo.sha})
            size = f["size"]
            fault = None if head else hub.fault(name)
            served = size // 2 if fault and fault["kind"] == "truncate" else size  # a short file, honestly sized
            headers = {"X-Repo-Commit": repo.sha, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
            etag = f'"{f["sha256"]}"' if f["lfs"] else f'"{f["sha256"][:40]}"'
            headers["ETag"] = etag
            if f["lfs"]:
                headers["X-Linked-Etag"] = etag
                headers["X-Linked-Size"] = str(size)
            start, end = 0, served - 1
            status = 200
            if (rng := self.headers.get("Range")) and not head:
                m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
                if m is None:
                    return self._json(416, {"error": "bad range"})
                if m[1] == "":  # suffix range: the last n bytes
                    start, end = max(0, served - int(m[2])), served - 1
                else:
                    start, end = int(m[1]), min(int(m[2]) if m[2] else served - 1, served - 1)
                if start >= served:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{served}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end}/{served}"
            length = end - start + 1
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(length))
            self.end_headers()
            if head:
                return
            stop_at = start + length // 2 if fault and fault["kind"] == "drop" else None
            with open(repo.root / name, "rb") as src:
                src.seek(start)
                pos = start
                chunk = CHUNK if hub.rate else 16 * CHUNK
                while pos <= end:
                    n = min(chunk, end + 1 - pos)
                    if stop_at is not None and pos + n > stop_at:
                        n = max(0, stop_at - pos)
                        if n:
                            self.wfile.write(src.read(n))
                        self.wfile.flush()
                        self.close_connection = True
                        self.connection.shutdown(2)  # the server goes away mid-file
                        return
                    data = src.read(n)
                    if fault and fault["kind"] == "corrupt" and pos <= size // 3 < pos + n:
                        i = size // 3 - pos
                        data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]
                    self.wfile.write(data)
                    with hub._lock:
                        hub.bytes_sent += len(data)
                    pos += n
                    if hub.rate:
                        time.sleep(len(data) / hub.rate)

        def _json(self, status: int, body: dict, headers: dict | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

    return Handler


def serve_dir(root: Path, port: int = 0) -> HubServer:
    """Every ROOT/owner/name directory as repo owner/name."""
    return HubServer({f"{o.name}/{n.name}": n for o in sorted(root.iterdir()) if o.is_dir()
                      for n in sorted(o.iterdir()) if n.is_dir()}, port)


def write_shards(dst: Path, tensors: dict[str, tuple[str, list[int], int]], n_shards: int, data) -> None:
    """``tensors`` (name -> (safetensors dtype, shape, bytes)) into ``n_shards`` files of about equal size and an
    index, in layer order, so the cuts fall inside layers and some experts span two shards (as on the hub);
    ``data(name)`` gives a tensor's bytes."""
    layer = lambda k: int(m[1]) if (m := re.search(r"\.layers\.(\d+)\.", k)) else (-1 if "embed" in k else 10**6)
    names = sorted(tensors, key=lambda k: (layer(k), k))
    total = sum(t[2] for t in tensors.values())
    shards: list[list[str]] = [[]]
    size = 0
    for k in names:
        if size >= total * len(shards) / n_shards and len(shards) < n_shards:
            shards.append([])
        shards[-1].append(k)
        size += tensors[k][2]
    weight_map = {}
    for i, keys in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, pos = {"__metadata__": {"format": "pt"}}, 0
        for k in keys:
            dtype, shape, n = tensors[k]
            header[k] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + n]}
            pos += n
            weight_map[k] = fname
        h = json.dumps(header).encode()
        h += b" " * (-len(h) % 8)
        with open(dst / fname, "wb") as f:
            f.write(len(h).to_bytes(8, "little") + h)
            for k in keys:
                f.write(data(k))
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                    "weight_map": weight_map}, indent=2))


def reshard(src: str | Path, dst: str | Path, n_shards: int) -> Path:
    """Copy checkpoint ``src`` to ``dst`` with its tensors in ``n_shards`` files (:func:`write_shards`)."""
    import shutil

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    raw = {}
    for p in sorted(src.glob("*.safetensors")):
        with open(p, "rb") as f:  # raw bytes: bf16 has no numpy dtype
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
            data = f.read()
        for k, v in header.items():
            if k != "__metadata__":
                raw[k] = (v["dtype"], v["shape"], data[v["data_offsets"][0]:v["data_offsets"][1]])
    write_shards(dst, {k: (d, s, len(b)) for k, (d, s, b) in raw.items()}, n_shards, lambda k: raw[k][2])
    for p in src.iterdir():
        if p.is_file() and not p.name.endswith((".safetensors", ".safetensors.index.json")):
            shutil.copy(p, dst / p.name)
    return dst


if __name__ == "__main__":
    with serve_dir(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 0) as hub:
        print(hub.url, flush=True)
        threading.Event().wait()
