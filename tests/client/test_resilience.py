"""The server dies, comes back, or never answers: the loop never notices and no point is lost."""

from __future__ import annotations

import errno
import io
import logging
import socket
import threading

import torch
from helpers import TinyNet, read_series, train
from test_metrics import spooled_points

import stethoscope
from stethoscope._sync import sync


def test_killed_and_restarted_server_loses_and_duplicates_nothing(server_process, tmp_path):
    torch.manual_seed(0)
    server = server_process().start()
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = stethoscope.attach(model, opt, server=server.url, spool_dir=tmp_path / "spool", every=1)
    losses = train(mon, model, opt, 20)
    assert mon.flush(20)
    server.kill()
    losses += train(mon, model, opt, 20, start=20)  # logged while the server is down
    assert mon.flush(5) or True  # a flush may time out while the server is down
    assert any((tmp_path / "spool").rglob("*.jsonl")), "the backlog waits in the spool"
    again = server_process(port=server.port).start()  # same database, same port
    losses += train(mon, model, opt, 20, start=40)
    mon.close(timeout=60)
    steps, values = read_series(again.url, mon.run_id, "loss")
    assert steps == list(range(60))
    assert values == [torch.tensor(v).item() for v in losses]
    for name in ("grad/norm", "logits/entropy", "update_ratio/head"):
        assert read_series(again.url, mon.run_id, name)[0] == list(range(60))
    assert mon.dropped == 0
    assert not any((tmp_path / "spool").rglob("*.jsonl")), "everything was sent, the spool is gone"


class SilentServer:
    """Accepts connections and reads requests, and never answers."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.requests = threading.Event()
        self.conns = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn):
        try:
            while conn.recv(65536):
                self.requests.set()
        except OSError:
            pass

    def close(self):
        self.sock.close()
        for c in self.conns:
            c.close()


def test_a_server_that_never_answers_does_not_hold_the_loop(live_server, tmp_path):
    silent = SilentServer()
    try:
        model = TinyNet()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        mon = stethoscope.attach(model, opt, server=silent.url, spool_dir=tmp_path / "spool")
        losses = train(mon, model, opt, 30)
        assert silent.requests.wait(10), "the sender did reach the silent server"
        losses += train(mon, model, opt, 30, start=30)  # the sender is blocked on its reply now
        assert mon.dropped == 0
        mon.close(timeout=1.0)  # gives up on the server, keeps everything in the spool
    finally:
        silent.close()
    got = spooled_points(tmp_path / "spool")
    assert sorted(got["loss"]) == list(range(60))
    # ...and `stethoscope sync` delivers it to a server that works.
    runs, points = sync(tmp_path / "spool", live_server.url)
    assert runs == 1
    steps, values = read_series(live_server.url, mon.run_id, "loss")
    assert steps == list(range(60))
    assert values == [torch.tensor(v).item() for v in losses]


def test_offline_then_sync_twice_is_idempotent(live_server, tmp_path):
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = stethoscope.attach(model, opt, run="offline-run", server="offline", spool_dir=tmp_path / "spool", every=1)
    losses = train(mon, model, opt, 40)
    mon.event("task_switch", task=2)
    mon.close()
    spools = list((tmp_path / "spool").rglob("run.json"))
    assert len(spools) == 1
    copy_dir = tmp_path / "copy"
    import shutil

    shutil.copytree(tmp_path / "spool", copy_dir)
    bar = io.StringIO()
    runs, points = sync(tmp_path / "spool", live_server.url, progress_stream=bar, force_progress=True)
    assert runs == 1 and points > 40 * 10
    assert "100.0%" in bar.getvalue()
    assert not list((tmp_path / "spool").rglob("*.jsonl")), "a synced spool is removed"
    # The same data uploaded again (an interrupted sync rerun from scratch) adds nothing.
    runs2, points2 = sync(copy_dir, live_server.url)
    assert (runs2, points2) == (1, points)
    steps, values = read_series(live_server.url, "offline-run", "loss")
    assert steps == list(range(40))
    assert values == [torch.tensor(v).item() for v in losses]
    import httpx

    run = httpx.get(f"{live_server.url}/api/v1/runs/offline-run").json()
    assert run["status"] == "finished"


def _closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _said(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "stethoscope" and r.levelno >= logging.WARNING]


def test_a_wrong_server_url_is_said_at_once_and_again_only_when_it_changes(server_process, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="stethoscope")
    port = _closed_port()
    url = f"http://127.0.0.1:{port}"
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = stethoscope.attach(model, opt, server=url, spool_dir=tmp_path / "spool")
    losses = train(mon, model, opt, 10)
    assert mon.flush(10)  # the first send is tried (and fails) here, long before close()
    (said,) = _said(caplog)
    where = str(mon._sender.spool_path)
    assert url in said and "ConnectionRefusedError" in said and where in said and "stethoscope sync" in said
    losses += train(mon, model, opt, 10, start=10)
    assert mon.flush(10)
    assert len(_said(caplog)) == 1, "said once, not at every retry"
    server_process(port=port).start()  # the server comes up where the URL points
    losses += train(mon, model, opt, 10, start=20)
    assert mon.flush(30)
    first, back = _said(caplog)
    assert first == said and url in back and "answers again" in back
    mon.close(timeout=30)
    assert len(_said(caplog)) == 2
    assert read_series(url, mon.run_id, "loss")[0] == list(range(30))


def test_a_spool_that_starts_dropping_is_said_once(tmp_path, caplog, monkeypatch):
    from stethoscope import _spool

    def full(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_spool, "MEMORY_FALLBACK_ENTRIES", 2)
    monkeypatch.setattr(_spool.Spool, "_roll", full)
    caplog.set_level(logging.WARNING, logger="stethoscope")
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = stethoscope.attach(model, opt, server=f"http://127.0.0.1:{_closed_port()}", spool_dir=tmp_path / "spool")
    for step in range(8):  # one spool entry per flush: the memory fallback overflows at the third
        train(mon, model, opt, 1, start=step)
        assert mon.flush(10)
    down, dropping = _said(caplog)
    assert "cannot send" in down and "dropped" in dropping and mon.dropped > 0
    mon.close(timeout=1)


def test_a_kept_alive_connection_the_server_closed_is_not_an_outage():
    """A server that closes each connection after its reply (without saying so): the next
    request on the kept-alive connection fails stale, and is made again on a new one."""
    import http.server

    from stethoscope._transport import HttpTransport

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")
            self.close_connection = True  # closes the socket, with no "Connection: close" header

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        t = HttpTransport(f"http://127.0.0.1:{server.server_address[1]}")
        for _ in range(5):
            assert t.request("GET", "/x") == {}
        t.close()
    finally:
        server.shutdown()
        server.server_close()
