"""Direct reads of expert files, with the platform differences kept behind one small interface.

Linux: ``O_DIRECT`` (bypasses the page cache; needs aligned buffers, offsets and lengths, which the
pack's alignment guarantees). macOS: no ``O_DIRECT``; ``F_NOCACHE`` turns caching off for the
descriptor and ``F_RDAHEAD 0`` stops read-ahead. Where the file system refuses direct I/O (tmpfs,
some network and overlay file systems) reads fall back to ordinary buffered ``pread`` with a notice.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import stat
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import Executor

import numpy as np

from moepack.errors import PackError
from moepack.formats.files import open_regular
from moepack.formats.manifest import READ_PAGE

log = logging.getLogger(__name__)

# fcntl commands from <sys/fcntl.h> on macOS; Python's fcntl module does not export them all.
F_RDAHEAD = 45
F_NOCACHE = 48
PAGE = READ_PAGE  # the granularity of partial reads (table rows): what O_DIRECT can address


def aligned_buffer(nbytes: int, alignment: int = 16384) -> np.ndarray:
    """A zeroed uint8 buffer whose address is a multiple of ``alignment`` (anonymous mmap plus offset)."""
    m = mmap.mmap(-1, nbytes + alignment)
    raw = np.frombuffer(m, dtype=np.uint8)
    off = (-raw.ctypes.data) % alignment
    return raw[off : off + nbytes]


def cover(ranges: Sequence[tuple[int, int]], max_bytes: int, page: int = PAGE) -> tuple[list[tuple[int, int]], list[int]]:
    """Byte ranges ``[start, end)`` of one file, sorted by start -> (the page-aligned extents ``(offset, length)`` that
    hold them, the extent holding each range). Ranges that share or touch a page go in one extent (one read) while
    it stays within ``max_bytes``; ``max_bytes`` must hold any one range's pages."""
    extents: list[tuple[int, int]] = []
    owner = []
    for start, end in ranges:
        lo, hi = start // page * page, -(-end // page) * page
        if extents and lo <= sum(extents[-1]) and hi - extents[-1][0] <= max_bytes:
            off = extents[-1][0]
            extents[-1] = (off, max(extents[-1][1], hi - off))
        else:
            extents.append((lo, hi - lo))
        owner.append(len(extents) - 1)
    return extents, owner


class DirectReader:
    """Opens files for uncached reads and reads whole files into aligned buffers.

    ``direct=False`` forces ordinary buffered reads. ``self.direct`` turns False for good after the first
    file system that refuses direct I/O, and ``mode`` says which path is in use ("O_DIRECT", "F_NOCACHE",
    "buffered").
    """

    def __init__(self, direct: bool = True, platform: str | None = None, fcntl_fn=None):
        self.platform = platform or sys.platform
        self.direct = direct
        self._fcntl = fcntl_fn
        self._warned = False
        self._lock = threading.Lock()

    @property
    def mode(self) -> str:
        if not self.direct:
            return "buffered"
        return "F_NOCACHE" if self.platform == "darwin" else "O_DIRECT"

    def _fallback(self, path: str, err: OSError) -> None:
        with self._lock:  # I/O threads may all hit the refusal at once: one notice
            self.direct, warned, self._warned = False, self._warned, True
        if not warned:
            log.warning("direct I/O refused on %s (%s); falling back to buffered reads (the page cache will hold experts)",
                        os.path.dirname(path), err.strerror)

    def _open(self, path: str) -> tuple[int, bool]:
        """(fd, whether this descriptor reads uncached). Several I/O threads call this at once. Only a regular file
        is opened (non-blocking, checked on the descriptor: formats.files.open_regular), so a FIFO put in place of
        an expert file fails the read at once instead of wedging an I/O thread."""
        if self.direct and self.platform.startswith("linux") and hasattr(os, "O_DIRECT"):
            try:
                return open_regular(path, os.O_DIRECT, os.open), True
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO refuses O_DIRECT too: not the file system
                    raise PackError(f"{path}: not a regular file (a FIFO, socket or device)") from None
                self._fallback(path, e)
        fd = open_regular(path, 0, os.open)  # this module's os: tests swap it for a failing one
        if self.direct and self.platform == "darwin":
            try:
                fc = self._fcntl or __import__("fcntl").fcntl
                fc(fd, F_NOCACHE, 1)
                fc(fd, F_RDAHEAD, 0)
                return fd, True
            except OSError as e:
                self._fallback(path, e)
        return fd, False

    def read_into(self, path: str, buf: np.ndarray, offset: int = 0) -> int:
        """Read ``len(buf)`` bytes of ``path`` at ``offset`` into ``buf``; returns the bytes read."""
        fd, direct = self._open(path)
        try:
            try:
                n = os.preadv(fd, [buf], offset)
            except OSError as e:
                # Some file systems accept O_DIRECT at open and refuse the read itself. Decide by how this
                # descriptor was opened: another thread may have switched the reader to buffered meanwhile.
                if e.errno != errno.EINVAL or not direct or self.platform == "darwin":
                    raise
                self._fallback(path, e)
                os.close(fd)
                fd, _ = self._open(path)
                n = os.preadv(fd, [buf], offset)
        finally:
            os.close(fd)
        if n != buf.nbytes:
            raise OSError(errno.EIO, f"short read: {n} of {buf.nbytes} bytes (is the file truncated?)", path)
        return n

    def read_extents(self, path: str, buf: np.ndarray, extents: Sequence[tuple[int, int, int]],
                     pool: Executor | None = None) -> int:
        """Read each extent ``(offset, length, at)`` of ``path`` into ``buf[at : at + length]``, several at once on
        ``pool`` where there are several (an SSD serves parallel reads faster); returns the bytes read."""
        def one(e: tuple[int, int, int]) -> int:
            off, n, at = e
            return self.read_into(path, buf[at : at + n], off)

        if pool is None or len(extents) < 2:
            return sum(map(one, extents))
        return sum(pool.map(one, extents))
