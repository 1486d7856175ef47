"""A hub repo read without downloading it: its file list, safetensors headers by HTTP range requests, and shards
fetched one at a time for a streamed conversion (``convert --stream``), all through huggingface_hub, so
``HF_ENDPOINT``, ``HF_HOME`` (its cache and token), ``HF_TOKEN`` and revisions apply as to any hub download.

A shard is verified against the sha256 the repo listing gives before it is used; a shard already in the hub
cache is used in place and never deleted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moepack.convert.source import SIDE_FILES, Checkpoint, TensorInfo, check_header_length, parse_header
from moepack.errors import SourceError

log = logging.getLogger(__name__)

HEADER_PROBE = 1 << 16  # first range request; a larger header takes a second one
ATTEMPTS = 3  # tries per shard download (each one resumes what the last left)
PART = ".part"  # a shard being downloaded


def is_repo_id(src: str) -> bool:
    p = Path(src).expanduser()
    return not p.exists() and not src.startswith((".", "/", "~")) and src.count("/") == 1


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int
    sha256: str | None  # LFS files: the content hash the hub lists


class HubRepo:
    """One revision of a hub repo, pinned to its commit hash so every request reads the same files."""

    def __init__(self, repo_id: str, revision: str | None = None):
        from huggingface_hub import HfApi

        self.repo_id = repo_id
        try:
            info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
        except Exception as e:  # offline, auth, not found: one message
            raise SourceError(
                f"could not list {repo_id}" + (f" at revision {revision}" if revision else "") + " on the Hugging Face "
                f"hub ({type(e).__name__}: {_one_line(e)}); check the repo id, the revision, your network or HF_TOKEN "
                "(with HF_HUB_OFFLINE=1 only a fully downloaded copy can be converted)") from e
        self.sha: str = info.sha
        self.files = {s.rfilename: RemoteFile(s.rfilename, int(s.size or 0), s.lfs.sha256 if s.lfs else None)
                      for s in info.siblings or []}

    @property
    def provenance(self) -> dict:
        return {"source": self.repo_id, "revision": self.sha}

    def fingerprint(self) -> dict:
        """What identifies the source in a conversion's job record: each weight file's size and hash."""
        return {f.name: {"size": f.size, "sha256": f.sha256} for f in self.files.values() if _is_weight(f.name)}

    def shard_names(self) -> list[str]:
        return sorted(n for n in self.files if n.endswith(".safetensors"))

    def url(self, name: str) -> str:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(self.repo_id, name, revision=self.sha)

    def read_range(self, name: str, start: int, n: int) -> bytes:
        """Bytes ``start .. start+n`` of a repo file, by one HTTP range request."""
        from huggingface_hub import get_session
        from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

        headers = {**build_hf_headers(), "Range": f"bytes={start}-{start + n - 1}"}
        for attempt in range(ATTEMPTS):
            try:
                r = get_session().get(self.url(name), headers=headers, follow_redirects=True)
                hf_raise_for_status(r)
                data = r.content
                break
            except Exception as e:  # noqa: BLE001 - a dropped connection: ask again
                if attempt + 1 == ATTEMPTS or getattr(getattr(e, "response", None), "status_code", 500) < 500 \
                        and hasattr(e, "response"):
                    raise
                log.warning("reading %s failed (%s); retrying", name, e)
        if len(data) < n:
            raise SourceError(f"{self.url(name)}: asked for {n} bytes at {start}, got {len(data)}")
        return data[:n]

    def header(self, name: str) -> list[TensorInfo]:
        size = self.files[name].size
        url = self.url(name)
        try:
            head = self.read_range(name, 0, min(HEADER_PROBE, size))
            n = int.from_bytes(head[:8], "little")
            check_header_length(n, size)
            raw = head[8:8 + n] if 8 + n <= len(head) else self.read_range(name, 8, n)
        except (ValueError, OSError) as e:
            raise SourceError(f"{url}: cannot read safetensors header ({e})") from e
        except Exception as e:
            raise SourceError(f"{url}: cannot read safetensors header ({type(e).__name__}: {_one_line(e)}); check the network "
                              "or HF_TOKEN and re-run the same command") from e
        return parse_header(name, raw, size, url)

    def fetch_small(self, name: str, dest: Path) -> Path:
        """A config, index or tokenizer file, into ``dest`` (through the hub cache)."""
        from huggingface_hub import hf_hub_download

        dest.mkdir(parents=True, exist_ok=True)
        if not (dest / name).is_file():
            path = hf_hub_download(self.repo_id, name, revision=self.sha)
            tmp = dest / (name + ".tmp")
            shutil.copyfile(path, tmp)
            os.replace(tmp, dest / name)
        return dest / name

    def checkpoint(self, staging: Path) -> RemoteCheckpoint:
        """The repo as a Checkpoint rooted at ``staging``: config, index and side files fetched there, every shard's
        header read by range requests; shards arrive later (:class:`ShardFeed`) or are read remotely (planning)."""
        if "config.json" not in self.files:
            raise SourceError(f"{self.repo_id}@{self.sha[:12]}: no config.json; is this a Hugging Face model repo?")
        for name in self.files:
            if name in SIDE_FILES or name.endswith(".safetensors.index.json"):
                self.fetch_small(name, staging)
        shards = self.shard_names()
        index = sorted(staging.glob("*.safetensors.index.json"))
        if index:
            try:
                named = sorted(set(json.loads(index[0].read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError) as e:
                raise SourceError(f"{self.repo_id}: {index[0].name} is not a safetensors index ({e})") from e
            missing = [s for s in named if s not in self.files]
            if missing:
                raise SourceError(f"{self.repo_id}: shard file(s) named by {index[0].name} are missing from the repo: "
                                  f"{', '.join(missing)}")
            shards = named
        if not shards:
            raise SourceError(f"{self.repo_id}: no *.safetensors files (moepack reads safetensors checkpoints)")
        tensors: dict[str, TensorInfo] = {}
        for shard in shards:
            for info in self.header(shard):
                if info.name in tensors:
                    raise SourceError(f"{shard}: tensor {info.name} also appears in {tensors[info.name].file}")
                tensors[info.name] = info
        config = json.loads((staging / "config.json").read_text())
        return RemoteCheckpoint(staging, config, tensors, self)


class RemoteCheckpoint(Checkpoint):
    """A hub checkpoint indexed from remote headers: reads a shard from ``root`` once it is there, else by range
    request (planning reads a few tiny tensors, e.g. compressed-tensors' ``weight_shape``)."""

    transient = True

    def __init__(self, root: Path, config: dict, tensors: dict[str, TensorInfo], repo: HubRepo):
        super().__init__(root, config, tensors)
        self.repo = repo

    def __getstate__(self) -> dict:  # worker processes read local shards only
        return {**super().__getstate__(), "repo": None}

    def read_bytes(self, file: str, start: int, n: int) -> np.ndarray:
        if self.repo is None or (self.root / file).is_file():
            return super().read_bytes(file, start, n)
        return np.frombuffer(self.repo.read_range(file, start, n), np.uint8).copy()


def _one_line(e: BaseException) -> str:
    """huggingface_hub's messages span lines; moepack's errors are one line."""
    return " ".join(str(e).split())


def _is_weight(name: str) -> bool:
    return name.endswith((".safetensors", ".safetensors.index.json"))


class ShardFeed:
    """Downloads shards into ``staging`` in order, at most ``window`` on disk at once, on a background thread;
    ``release(name)`` deletes one whose units are all written. Each shard is checked against the repo listing's
    size and sha256; a failed or wrong download is retried (resuming) ``ATTEMPTS`` times, then the error stops the
    conversion."""

    def __init__(self, repo: HubRepo, staging: Path, needed: list[str], window: int):
        self.repo, self.staging, self.window = repo, staging, max(1, window)
        self.needed = needed  # shards still read by some unit, in download order
        self.present: set[str] = set()
        self.held: set[str] = set()  # present and not yet released
        self.error: BaseException | None = None
        self.finished = False
        self.done_bytes = 0
        self._cond = threading.Condition()
        self._stop = False
        self._extra = 0  # shards allowed beyond the window (when nothing on disk can run without the next one)
        self._thread = threading.Thread(target=self._run, name="moepack-download", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()

    def has(self, files: tuple[str, ...]) -> bool:
        return all(f in self.present or f not in self.repo.files or not f.endswith(".safetensors") for f in files)

    def grow(self) -> None:
        """Let one more shard onto the disk: every unit the held shards allow is done, the rest need the next."""
        with self._cond:
            self._extra += 1
            self._cond.notify_all()

    def release(self, name: str, ckpt: Checkpoint) -> None:
        ckpt.close(name)
        path = self.staging / name
        if path.is_symlink() or path.exists():
            path.unlink()
        with self._cond:
            self.held.discard(name)
            self._extra = max(0, self._extra - 1)
            self._cond.notify_all()

    def settled(self) -> bool:
        """The downloader waits for room: every shard it was allowed is here (or it has fetched them all)."""
        with self._cond:
            return self.present >= self.held and (len(self.held) >= self.window + self._extra or self.finished)

    def wait(self, timeout: float) -> None:
        with self._cond:
            self._cond.wait(timeout)

    def bytes_on_disk(self) -> int:
        """Downloaded bytes so far, partial files included (for the progress display)."""
        partial = 0
        for p in self.staging.glob("*" + PART):
            try:
                partial += p.stat().st_size
            except FileNotFoundError:  # renamed into place meanwhile
                pass
        return self.done_bytes + partial

    def _run(self) -> None:
        try:
            for name in self.needed:
                with self._cond:
                    while not self._stop and len(self.held) >= self.window + self._extra:
                        self._cond.wait()
                    if self._stop:
                        return
                    self.held.add(name)
                self._fetch(name)
                with self._cond:
                    self.present.add(name)
                    self.done_bytes += self.repo.files[name].size
                    self._cond.notify_all()
            with self._cond:
                self.finished = True
                self._cond.notify_all()
        except BaseException as e:  # handed to the driver, which raises it
            with self._cond:
                self.error = e
                self._cond.notify_all()

    def _fetch(self, name: str) -> None:
        from huggingface_hub import try_to_load_from_cache

        want = self.repo.files[name]
        dest = self.staging / name
        cached = try_to_load_from_cache(self.repo.repo_id, name, revision=self.repo.sha)
        if isinstance(cached, str) and os.path.getsize(cached) == want.size:
            if not dest.exists():
                os.symlink(cached, dest)  # in the user's hub cache already: read it there, never delete it
            return
        if dest.is_file() and dest.stat().st_size == want.size:
            return  # renamed into place only once whole and verified
        last = None
        for attempt in range(ATTEMPTS):
            try:
                return self._download(want, dest)
            except Exception as e:  # noqa: BLE001 - a network error, a short file or a wrong hash: try again
                last = e
                log.warning("downloading %s failed (%s: %s)%s", name, type(e).__name__, _one_line(e),
                            "; retrying" if attempt + 1 < ATTEMPTS else "")
        raise SourceError(f"could not download {name} from {self.repo.repo_id}@{self.repo.sha[:12]} after {ATTEMPTS} "
                          f"tries ({type(last).__name__}: {_one_line(last)}); re-run the same command to "
                          "resume") from last

    def _download(self, want: RemoteFile, dest: Path) -> None:
        """Into ``dest.part``, continuing what an earlier (killed) run left there with a range request; checked
        against the listing's size and sha256, then renamed to ``dest``. A wrong file is deleted, not resumed."""
        from huggingface_hub import get_session
        from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

        part = dest.with_name(dest.name + PART)
        h = hashlib.sha256()
        have = part.stat().st_size if part.is_file() else 0
        if have > want.size:
            part.unlink()
            have = 0
        with open(part, "ab") as f:
            _hash_file(part, h)  # the bytes already here count towards the hash
            headers = build_hf_headers()
            if have:
                headers["Range"] = f"bytes={have}-"
            if have < want.size:
                with get_session().stream("GET", self.repo.url(want.name), headers=headers, follow_redirects=True,
                                          timeout=60) as r:
                    hf_raise_for_status(r)
                    if have and r.status_code != 206:  # the server ignored the range: start over
                        f.truncate(0)
                        f.seek(0)
                        h = hashlib.sha256()
                    for chunk in r.iter_bytes():
                        f.write(chunk)
                        h.update(chunk)
            f.flush()
            os.fsync(f.fileno())
        size = part.stat().st_size
        problem = None
        if size != want.size:
            problem = f"{want.name}: downloaded {size} bytes, the repo lists {want.size}"
        elif want.sha256 and h.hexdigest() != want.sha256:
            problem = f"{want.name}: sha256 {h.hexdigest()} differs from the repo's {want.sha256} (corrupt download)"
        if problem:
            if size >= want.size:
                part.unlink()  # whole but wrong: fetch it afresh; a short one resumes
            raise SourceError(problem)
        os.replace(part, dest)


def _hash_file(path: Path, h) -> None:
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(4 << 20)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
