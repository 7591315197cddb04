"""The on-disk spool: a write-ahead log of everything the hook means to send.

Each sender owns one directory ``<root>/<run_id>/<writer>/`` holding ``run.json`` (what
creates the run on the server), numbered segments ``000001.jsonl`` with one JSON entry a
line (``{"t": "points"|"events"|"status", "b": body}``) and ``cursor`` (the first byte not
yet acknowledged by the server). Every batch is appended before it is sent, so a killed
process or a dead server loses nothing that reached the sender thread; sent segments are
deleted, so an online run keeps at most one small segment on disk. ``stethoscope sync``
reads the same directories. An exclusive ``flock`` on ``lock`` marks a directory as in use.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no locking, one writer per directory anyway
    fcntl = None

#: A segment is closed and a new one started past this size (bytes).
SEGMENT_BYTES = 4 * 1024 * 1024
#: Entries kept in memory when the disk refuses writes (then the oldest are dropped).
MEMORY_FALLBACK_ENTRIES = 1000


def default_root() -> Path:
    return Path(os.environ.get("STETHOSCOPE_DIR", ".stethoscope")) / "spool"


class Spool:
    """Append entries, read them back in order from the cursor, acknowledge, forget."""

    def __init__(self, path: Path, run_meta: dict | None = None, lock: bool = True):
        self.path = Path(path)
        self._lock_fd = None
        self._writer = None
        self._write_seg = 0
        self._write_size = 0
        self._reader = None
        self._read_seg = 0
        self._mem: deque = deque()
        self.memory_dropped = 0
        self.disk_ok = True
        self.path.mkdir(parents=True, exist_ok=True)
        if lock:
            self._take_lock()
        if run_meta is not None:
            _write_atomic(self.path / "run.json", json.dumps(run_meta))
        segs = self.segments()
        self._write_seg = segs[-1] if segs else 1
        self._cursor = self._read_cursor(segs)

    # -- locking -------------------------------------------------------------------
    def _take_lock(self) -> None:
        if fcntl is None:
            return
        fd = os.open(self.path / "lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise BlockingIOError(f"spool {self.path} is in use by another process")
        self._lock_fd = fd

    @staticmethod
    def in_use(path: Path) -> bool:
        if fcntl is None or not (Path(path) / "lock").exists():
            return False
        fd = os.open(Path(path) / "lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        except OSError:
            return True
        finally:
            os.close(fd)

    # -- layout --------------------------------------------------------------------
    def segments(self) -> list[int]:
        out = []
        for p in self.path.glob("*.jsonl"):
            try:
                out.append(int(p.stem))
            except ValueError:
                pass
        return sorted(out)

    def _seg_path(self, n: int) -> Path:
        return self.path / f"{n:06d}.jsonl"

    def _read_cursor(self, segs: list[int]) -> tuple[int, int]:
        try:
            seg, off = json.loads((self.path / "cursor").read_text())
            seg, off = int(seg), int(off)
        except (OSError, ValueError, TypeError):
            seg, off = (segs[0] if segs else 1), 0
        if segs and seg < segs[0]:
            seg, off = segs[0], 0
        return seg, off

    # -- writing -------------------------------------------------------------------
    def append(self, kind: str, body):
        """Write an entry. Returns the entry pushed out of the memory fallback to make room
        (disk full and the memory full too: the oldest goes) as ``(kind, body)``, else None."""
        line = (json.dumps({"t": kind, "b": body}, separators=(",", ":"), allow_nan=False) + "\n").encode()
        if self.disk_ok:
            try:
                if self._writer is None or self._write_size >= SEGMENT_BYTES:
                    self._roll()
                self._writer.write(line)
                self._writer.flush()
                self._write_size += len(line)
                return None
            except OSError:
                self.disk_ok = False  # full or read-only disk: keep going from memory
                self._close_writer()
        lost = None
        if len(self._mem) >= MEMORY_FALLBACK_ENTRIES:
            entry = json.loads(self._mem.popleft())
            lost = entry["t"], entry["b"]
            self.memory_dropped += 1
        self._mem.append(line)
        return lost

    def _roll(self) -> None:
        if self._writer is not None:  # full: the next segment (after compact: already advanced)
            self._close_writer()
            self._write_seg += 1
        path = self._seg_path(self._write_seg)
        self._writer = open(path, "ab")
        self._write_size = self._writer.tell()

    def _close_writer(self) -> None:
        try:
            if self._writer is not None:
                self._writer.close()
        except OSError:
            pass
        self._writer = None

    # -- reading -------------------------------------------------------------------
    def peek(self):
        """The oldest unacknowledged entry as ``(kind, body)``, or None."""
        seg, off = self._cursor
        while True:
            path = self._seg_path(seg)
            if self._reader is None or self._read_seg != seg:
                if self._reader is not None:
                    self._reader.close()
                    self._reader = None
                if not path.exists():
                    break
                self._reader, self._read_seg = open(path, "rb"), seg
            self._reader.seek(off)
            line = self._reader.readline()
            if line.endswith(b"\n"):
                self._next = (seg, off + len(line))
                entry = json.loads(line)
                return entry["t"], entry["b"]
            # end of this segment (a torn last line is left for the writer to finish)
            later = [s for s in self.segments() if s > seg]
            if not later:
                break
            self._drop_segment(seg)
            seg, off = later[0], 0
            self._cursor = (seg, off)
        if self._mem:
            self._next = None
            entry = json.loads(self._mem[0])
            return entry["t"], entry["b"]
        return None

    def ack(self) -> None:
        """Forget the entry ``peek`` returned: the server has it."""
        if self._next is None:
            self._mem.popleft()
            return
        self._cursor = self._next
        self._save_cursor()

    def _save_cursor(self) -> None:
        try:
            _write_atomic(self.path / "cursor", json.dumps(list(self._cursor)))
        except OSError:
            # A full disk: the cursor is kept in memory. After a crash the entries since the
            # last saved cursor are sent again, and the idempotent ingest stores them once.
            pass

    def _drop_segment(self, seg: int) -> None:
        if self._reader is not None and self._read_seg == seg:
            self._reader.close()
            self._reader = None
        if seg == self._write_seg and self._writer is not None:
            return
        try:
            self._seg_path(seg).unlink()
        except OSError:
            pass

    def empty(self) -> bool:
        return self.peek() is None

    def compact(self) -> None:
        """Delete the segment the cursor has fully passed when nothing more will be written."""
        if self.peek() is None and self._writer is not None:
            seg, off = self._cursor
            if seg == self._write_seg and off >= self._write_size:
                self._close_writer()
                self._drop_segment(seg)
                # the next append starts a new segment, and reading resumes at its start
                self._write_seg += 1
                self._write_size = 0
                self._cursor = (self._write_seg, 0)
                self._save_cursor()

    def close(self, remove_if_empty: bool = True) -> None:
        self._close_writer()
        empty = remove_if_empty and self.peek() is None and not self.segments_with_data()
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if empty:
            for p in list(self.path.iterdir()):
                try:
                    p.unlink()
                except OSError:
                    pass
            try:
                self.path.rmdir()
                self.path.parent.rmdir()  # the run directory, when this was its last writer
            except OSError:
                pass
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def segments_with_data(self) -> bool:
        seg, off = self._cursor
        for s in self.segments():
            size = self._seg_path(s).stat().st_size
            if s > seg and size > 0 or s == seg and size > off:
                return True
        return False

    def run_meta(self) -> dict:
        return json.loads((self.path / "run.json").read_text())


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def writer_name() -> str:
    """A directory name that sorts by creation time and is unique per process."""
    return f"{time.time_ns():020d}-{os.getpid()}"


def find_spools(path: Path) -> list[Path]:
    """Spool directories (those with a ``run.json``) at or under ``path``, oldest first."""
    path = Path(path)
    if (path / "run.json").exists():
        return [path]
    return sorted((p.parent for p in path.rglob("run.json")), key=lambda p: (p.parent.name, p.name))
