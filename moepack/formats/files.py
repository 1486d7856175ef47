"""Opening a pack's files as untrusted input. Every file opened from a pack goes through :func:`read_pack_file`
(the manifest, config.json, tokenizer files, the chat template, generation_config.json, heat.json): only a regular
file (checked on the open descriptor, opened non-blocking so a FIFO cannot wedge the open), inside the pack (no
symlink leading out), of at most ``max_bytes``, and with ``blake3`` given (``--verify``) the digest the manifest
records. JSON is parsed strictly: repeated keys, NaN/Infinity and absurd nesting are refused, and ``max_values``
bounds what a file may cost in memory before it is parsed. Expert files are read by the runtime with the same
checks (runtime/io.py, :func:`open_regular`)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from moepack.errors import PackError


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    d = dict(pairs)
    if len(d) != len(pairs):  # linear: find the first repeated key with a set
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise PackError(f"key {json.dumps(dup)[:80]} appears twice in one object (a pack never repeats an entry)")
    return d


def _no_constant(name: str) -> Any:
    raise PackError(f"{name} is not a JSON value (JSON has no NaN or Infinity)")


def _finite(text: str) -> float:
    v = float(text)
    if v != v or v in (float("inf"), float("-inf")):
        raise PackError(f"{text[:40]} is out of the range of a number (it would read as Infinity)")
    return v


def open_regular(path: str | os.PathLike, flags: int = 0, opener=os.open) -> int:
    """A read-only descriptor of ``path``, refused unless it is a regular file. Opened with O_NONBLOCK, so a FIFO
    in its place returns at once instead of waiting for a writer, then checked on the descriptor itself (no race
    with a rename between a stat and the open). Raises OSError like ``os.open`` (ENOENT, EIO...), PackError for
    a FIFO, socket, device or directory. ``opener``: the ``os.open`` to use (the runtime passes its own)."""
    fd = opener(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | flags)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO, socket or device"
            raise PackError(f"{os.fsdecode(path)}: not a regular file ({kind})")
        if hasattr(os, "O_NONBLOCK"):  # regular files ignore O_NONBLOCK, but clear it for any later fcntl users
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def inside(root: Path, rel: str) -> None:
    """Refuse ``root/rel`` when symlinks resolve it to somewhere outside ``root``."""
    base = os.path.realpath(root)
    real = os.path.realpath(os.path.join(base, rel))
    if real != base and not real.startswith(base + os.sep):
        raise PackError(f"{root / rel}: a symbolic link leads outside the pack (to {real}); a pack is self-contained")


def read_pack_file(root: str | os.PathLike, rel: str, max_bytes: int, blake3: str | None = None) -> bytes:
    """The bytes of the pack file ``rel`` under ``root``: a plain relative path that stays inside the pack (through
    symlinks too), a regular file of at most ``max_bytes``, and when ``blake3`` is given, bytes with that digest.
    Any failure is a PackError naming the file; FileNotFoundError is left as it is for callers with a default."""
    from moepack.formats.validate import relpath_problem  # validate builds on the manifest, which uses this module

    root = Path(root)
    if problem := relpath_problem(rel):
        raise PackError(f"{root}: {problem}")
    path = root / rel
    inside(root, rel)
    try:
        fd = open_regular(path)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise PackError(f"{path}: cannot read it ({e.strerror})") from None
    try:
        size = os.fstat(fd).st_size
        if size > max_bytes:
            raise PackError(f"{path}: {size:,} bytes is implausibly large for this file (at most {max_bytes:,})")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise PackError(f"{path}: cannot read it ({e.strerror})") from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise PackError(f"{path}: grew past {max_bytes:,} bytes while being read")
    if blake3 is not None:
        import blake3 as b3

        if b3.blake3(data).hexdigest() != blake3:
            raise PackError(f"{path}: blake3 mismatch, the file is corrupt (run `moepack verify {root}`)")
    return data


def read_pack_text(root: str | os.PathLike, rel: str, max_bytes: int, blake3: str | None = None) -> str:
    """:func:`read_pack_file` decoded as UTF-8 (invalid UTF-8 is a PackError)."""
    data = read_pack_file(root, rel, max_bytes, blake3)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PackError(f"{Path(root) / rel}: not UTF-8 text ({e})") from None


def parse_json(data: bytes, where: str | os.PathLike, what: str, max_values: int | None = None) -> Any:
    """Parse JSON from a pack: malformed, repeated-key, NaN or absurdly nested JSON is a PackError. ``max_values``:
    refuse, before parsing, text with more values than that (counted as separators and brackets), so a file of
    ``[[],[],...]`` cannot cost ten times its size in memory."""
    if max_values is not None:
        n = data.count(b",") + data.count(b"[") + data.count(b"{")
        if n > max_values:
            raise PackError(f"{where}: {n:,} JSON values in {len(data):,} bytes is far more than a {what} holds "
                            f"(at most {max_values:,}); not a file moepack wrote")
    try:
        return json.loads(data, object_pairs_hook=_unique_keys, parse_constant=_no_constant, parse_float=_finite)
    except PackError as e:
        raise PackError(f"{where}: {e}") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise PackError(f"{where} is not valid {what} JSON: {type(e).__name__}: {e}") from None


def read_pack_json(root: str | os.PathLike, rel: str, max_bytes: int, what: str, blake3: str | None = None,
                   max_values: int | None = None) -> Any:
    """:func:`read_pack_file` parsed by :func:`parse_json`."""
    return parse_json(read_pack_file(root, rel, max_bytes, blake3), Path(root) / rel, what, max_values)


def check_tree(root: Path, files: dict[str, dict]) -> None:
    """Every file the manifest names must be a regular file inside the pack (or missing: reads report that).

    A walk of the pack's real directories (d_type only, no per-file stat) finds symlinks and special files; only
    the named paths that go through a symlink are then resolved.
    """
    symlinks, special = set(), set()
    stack = [(str(root), "")]
    while stack:
        path, prefix = stack.pop()
        try:
            entries = list(os.scandir(path))
        except OSError as e:
            raise PackError(f"{path}: cannot list it ({e.strerror})") from None
        for entry in entries:
            rel = prefix + entry.name
            if entry.is_symlink():
                symlinks.add(rel)
            elif entry.is_dir(follow_symlinks=False):
                stack.append((entry.path, rel + "/"))
            elif not entry.is_file(follow_symlinks=False):
                special.add(rel)
    for rel in files.keys() & special:
        raise PackError(f"{root / rel}: not a regular file (a FIFO, socket or device in place of pack data)")
    if not symlinks:
        return
    for rel in files:
        parts = rel.split("/")
        if any("/".join(parts[: i + 1]) in symlinks for i in range(len(parts))):
            inside(root, rel)
            try:
                if not stat.S_ISREG(os.stat(root / rel).st_mode):
                    raise PackError(f"{root / rel}: not a regular file")
            except FileNotFoundError:
                pass
