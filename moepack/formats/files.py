"""Opening a pack's files as untrusted input: JSON with repeated keys or absurd nesting refused, only regular files of
bounded size, nothing reached through a symlink out of the pack (every file opened from a pack goes through here)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from moepack.errors import PackError

def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    d = dict(pairs)
    if len(d) != len(pairs):
        dup = next(k for i, (k, _) in enumerate(pairs) if any(k == k2 for k2, _ in pairs[:i]))
        raise PackError(f"key {json.dumps(dup)} appears twice in one object (a pack never repeats an entry)")
    return d


def regular_file(root: Path, rel: str, limit: int) -> Path:
    """``root/rel`` as a regular file of at most ``limit`` bytes inside ``root`` (no FIFO, device or way out)."""
    path = root / rel
    try:
        st = os.stat(path)
    except OSError as e:
        raise PackError(f"{path}: cannot read it ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise PackError(f"{path}: not a regular file")
    if st.st_size > limit:
        raise PackError(f"{path}: {st.st_size} bytes is implausibly large (at most {limit})")
    inside(root, rel)
    return path


def read_json(path: Path, what: str) -> Any:
    """Parse a JSON file of a pack; malformed, repeated-key or absurdly nested JSON is a PackError."""
    try:
        return json.loads(path.read_bytes(), object_pairs_hook=_unique_keys)
    except PackError as e:
        raise PackError(f"{path}: {e}") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise PackError(f"{path} is not valid {what} JSON: {type(e).__name__}: {e}") from None
    except OSError as e:
        raise PackError(f"{path}: cannot read it ({e.strerror})") from None


def inside(root: Path, rel: str) -> None:
    """Refuse ``root/rel`` when symlinks resolve it to somewhere outside ``root``."""
    base = os.path.realpath(root)
    real = os.path.realpath(os.path.join(base, rel))
    if real != base and not real.startswith(base + os.sep):
        raise PackError(f"{root / rel}: a symbolic link leads outside the pack (to {real}); a pack is self-contained")


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
