"""The server dies, comes back, or never answers: the loop never notices and no point is lost."""

from __future__ import annotations

import io
import socket
import threading

import torch

import stethoscope
from stethoscope._sync import sync
from helpers import TinyNet, read_series, train
from test_metrics import spooled_points


def test_killed_and_restarted_server_loses_and_duplicates_nothing(server_process, tmp_path):
    torch.manual_seed(0)
    server = server_process().start()
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = stethoscope.attach(model, opt, server=server.url, spool_dir=tmp_path / "spool")
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
    mon = stethoscope.attach(model, opt, run="offline-run", server="offline", spool_dir=tmp_path / "spool")
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
