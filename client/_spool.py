"""The on-disk spool: a write-ahead log of everything the hook means to send.

Each sender owns one directory ``<root>/<run_id>/<writer>/`` holding ``run.json`` (what
creates the run on the server), numbered segments ``000001.jsonl`` with one JSON entry a
line (``{"t": "points"|"events"|"status", "b": body}``) and ``cursor`` (the first byte not
yet acknowledged by the server). Every batch is appended before it is sent, so a killed
process or a dead server loses nothing that reached the sender thread; sent segments are
deleted, so an online run keeps at most one small segment on disk. ``stethoscope sync``
reads the same directories. An exclusive ``flock`` on ``lock`` marks a directory as in use.

A full disk: a line that does not fit is cut off again (segments hold whole lines only) and
the entry goes to a bounded memory fallback; ``reserve`` is space set aside when the spool
opens and given back at close, so the run's last entries (its final status, the count of
records lost) still reach the disk.
"""

from __future__ import annotations

import errno
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
#: Bytes set aside at open and given back at close for the run's last entries (a status and a
#: drop count are a few hundred bytes): room for them in a new segment on a file system with
#: blocks of up to 64 KiB, at a cost no disk notices.
RESERVE_BYTES = 64 * 1024


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
        self._next = None
        #: Lines skipped because they were not whole entries (a writer stopped mid-line).
        self.skipped = 0
        self.disk_ok = True
        self._lock_wanted = lock
        self._meta = run_meta  # not None until run.json is on disk
        try:
            self._prepare_disk()
        except BlockingIOError:
            raise
        except OSError:
            self.disk_ok = False  # a full disk from the start: memory now, the disk again later
        segs = self.segments() if self.path.is_dir() else []
        self._write_seg = segs[-1] if segs else 1
        self._cursor = self._read_cursor(segs)

    def _prepare_disk(self) -> None:
        """The directory, its lock, ``run.json`` and the reserve; what is done is not redone."""
        self.path.mkdir(parents=True, exist_ok=True)
        if self._lock_wanted and self._lock_fd is None:
            self._take_lock()
        if self._meta is not None:
            _write_atomic(self.path / "run.json", json.dumps(self._meta))
            self._meta = None
            try:  # the writer's spool only: a reader (sync) needs no reserve
                with open(self.path / "reserve", "wb") as f:
                    f.write(bytes(RESERVE_BYTES))
            except OSError:
                self._release_reserve()  # no room even for that: go on without

    def _release_reserve(self) -> None:
        try:
            (self.path / "reserve").unlink()
        except OSError:
            pass

    # -- locking -------------------------------------------------------------------
    def _take_lock(self) -> None:
        if fcntl is None:
            return
        fd = os.open(self.path / "lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise BlockingIOError(f"spool {self.path} is in use by another process") from None
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
        line = _line(kind, body)
        if not self.disk_ok and not self._mem:
            self.disk_ok = True  # nothing waits in memory: the disk may take entries again, in order
        if self.disk_ok:
            try:
                self._write_line(line)
                return None
            except OSError:
                self.disk_ok = False  # full or read-only disk: keep going from memory
                self._close_writer()
        lost = None
        if len(self._mem) >= MEMORY_FALLBACK_ENTRIES:
            lost = _entry(self._mem.popleft())
        self._mem.append(line)
        return lost

    def _write_line(self, line: bytes) -> None:
        """Append one whole line to the current segment, or raise OSError and leave none of it."""
        if self._meta is not None or self._lock_wanted and self._lock_fd is None:
            self._prepare_disk()
        if self._writer is None or self._write_size >= SEGMENT_BYTES:
            self._roll()
        view, done = memoryview(line), 0
        try:
            while done < len(line):
                n = self._writer.write(view[done:])  # unbuffered: a short count is a full disk
                if not n:
                    raise OSError(errno.ENOSPC, "no space left on the spool disk")
                done += n
        except OSError:
            if done:
                self._cut_partial_line()
            raise
        self._write_size += done

    def _cut_partial_line(self) -> None:
        """A line written in part: truncate the segment to its last whole line."""
        try:
            os.ftruncate(self._writer.fileno(), self._write_size)
        except OSError:
            # Cannot cut it: write on in a new segment; readers skip this one's torn end.
            self._close_writer()
            self._write_seg += 1

    def _roll(self) -> None:
        if self._writer is not None:  # full: the next segment (after compact: already advanced)
            self._close_writer()
            self._write_seg += 1
        path = self._seg_path(self._write_seg)
        self._writer = open(path, "ab", buffering=0)
        self._write_size = os.fstat(self._writer.fileno()).st_size

    def save_memory(self) -> list:
        """At close: move the entries waiting in memory to the disk if it takes them now.
        Returns those it still refuses as ``(kind, body)``, oldest first, and forgets them."""
        while self._mem:
            try:
                self._write_line(self._mem[0])
            except OSError:
                self._close_writer()
                break
            self._mem.popleft()
        lost = [_entry(line) for line in self._mem]
        self._mem.clear()
        return lost

    def append_last(self, entries: list) -> list:
        """At close: write the run's last entries in a new segment, in the space reserved at
        open. Returns those that did not fit, as ``(kind, body)``."""
        self._release_reserve()
        self._close_writer()
        if self._seg_path(self._write_seg).exists():
            self._write_seg += 1
        for i, (kind, body) in enumerate(entries):
            try:
                self._write_line(_line(kind, body))
            except OSError:
                self._close_writer()
                return entries[i:]
        return []

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
                try:
                    entry = _entry(line)
                except (ValueError, KeyError, TypeError):
                    # Not a whole entry: the torn end of a line (an older writer on a full disk)
                    # ran into the next one. Skip it; the entries around it are whole.
                    self.skipped += 1
                    off += len(line)
                    self._cursor = (seg, off)
                    continue
                self._next = (seg, off + len(line))
                return entry
            # end of this segment (a torn last line is left for the writer to finish)
            later = [s for s in self.segments() if s > seg]
            if not later:
                break
            self.skipped += bool(line)  # torn, and the writer went on in a new segment
            self._drop_segment(seg)
            seg, off = later[0], 0
            self._cursor = (seg, off)
        if self._mem:
            self._next = None
            return _entry(self._mem[0])
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

    def skip_torn_tail(self) -> int:
        """For a spool no process writes any more (``sync``): skip the unfinished last line of a
        writer killed mid-write, counting it in ``skipped``. Returns its length in bytes."""
        if self._writer is not None or self.peek() is not None:
            return 0
        seg, off = self._cursor
        try:
            size = self._seg_path(seg).stat().st_size
        except OSError:
            return 0
        if size <= off:
            return 0
        self.skipped += 1
        self._cursor = (seg, size)
        self._save_cursor()
        return size - off

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
        self._release_reserve()
        empty = remove_if_empty and self.peek() is None and not self.segments_with_data()
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if empty and self.path.is_dir():
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


_encode = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode
_SERIES_KEYS = ("name", "steps", "values", "walls")


def _line(kind: str, body) -> bytes:
    if kind == "points":
        line = _points_line(body)
        if line is not None:
            return line
    return (_encode({"t": kind, "b": body}) + "\n").encode()


def _points_line(body) -> bytes | None:
    """A points entry, byte for byte what ``json.dumps`` writes, with each distinct steps or
    walls column encoded once: the series of one training step share its step and its wall
    time, so in a batch of the hook's records every series' walls are the same list of floats,
    which ``json.dumps`` would print again for each series (half the time of encoding a batch
    of a ~1 ms step's eight series). None for a body of another shape."""
    series = body.get("series") if isinstance(body, dict) and len(body) == 1 else None
    if not isinstance(series, list):
        return None
    done: dict[int, list] = {}  # column length -> [(column, its JSON), ...]

    def column(col) -> str:
        same = done.setdefault(len(col), [])
        for c, text in same:
            if c is col or c == col:
                return text
        text = _encode(col)
        same.append((col, text))
        return text

    parts = []
    for s in series:
        if not isinstance(s, dict) or tuple(s) != _SERIES_KEYS or not isinstance(s["walls"], list):
            return None
        parts.append(
            f'{{"name":{_encode(s["name"])},"steps":{column(s["steps"])},'
            f'"values":{_values(s["values"])},"walls":{column(s["walls"])}}}'
        )
    return ('{"t":"points","b":{"series":[' + ",".join(parts) + "]}}\n").encode()


def _values(col) -> str:
    """``_encode(col)`` for a values column; a column of one repeated value (a constant learning
    rate) is encoded once and repeated. Only for a float that is not a whole number: nothing
    else in a column can equal it (an int or a bool could equal 3.0 and print as 3, and -0.0
    equals 0.0)."""
    if col:
        x = col[0]
        if type(x) is float and not x.is_integer() and x == x and col.count(x) == len(col):
            item = _encode(x)
            return "[" + ",".join([item] * len(col)) + "]"
    return _encode(col)


def _entry(line: bytes) -> tuple:
    entry = json.loads(line)
    return entry["t"], entry["b"]


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk: leave no half-written file behind
        raise


def writer_name() -> str:
    """A directory name that sorts by creation time and is unique per process."""
    return f"{time.time_ns():020d}-{os.getpid()}"


def find_spools(path: Path) -> list[Path]:
    """Spool directories (those with a ``run.json``) at or under ``path``, oldest first."""
    path = Path(path)
    if (path / "run.json").exists():
        return [path]
    return sorted((p.parent for p in path.rglob("run.json")), key=lambda p: (p.parent.name, p.name))
