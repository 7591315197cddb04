"""The public surface: exported names, imports, misuse, the kill switch, the CLI, fork."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from helpers import TinyNet, read_series, train

import stethoscope
from stethoscope import _cli


def test_exported_names_are_pinned():
    assert stethoscope.__all__ == [
        "ContinualEvaluator",
        "DisabledMonitor",
        "Monitor",
        "__version__",
        "attach",
        "attention_logits",
    ]
    for name in stethoscope.__all__:
        assert getattr(stethoscope, name) is not None


def test_import_pulls_in_neither_the_server_stack_nor_torch():
    code = (
        "import sys, stethoscope, stethoscope.core.wire, stethoscope._cli\n"
        "bad = [m for m in ('fastapi', 'sqlalchemy', 'pydantic', 'plotly', 'torch') if m in sys.modules]\n"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_disabled_is_a_no_op(monkeypatch, tmp_path):
    monkeypatch.setenv("STETHOSCOPE_DISABLED", "1")
    mon = stethoscope.attach("not even a model", None, server="http://127.0.0.1:9", spool_dir=tmp_path)
    assert isinstance(mon, stethoscope.DisabledMonitor)
    with mon:
        mon.log(step=0, loss=1.0)
        mon.event("note")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"model": "x"}, "torch.nn.Module"),
        ({"optimizer": "sgd"}, "torch.optim.Optimizer"),
        ({"every": 0}, "every"),
        ({"server": "localhost:8765"}, "http(s) URL"),
        ({"run": "my run"}, "run must be"),
        ({"config": [1, 2]}, "config must be a dict"),
        ({"project": ""}, "project"),
    ],
)
def test_misuse_of_attach_raises_value_error(kwargs, message, tmp_path):
    model = TinyNet()
    args = {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1), "spool_dir": tmp_path} | kwargs
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        stethoscope.attach(**args)


def test_misuse_of_log_raises_value_error(tmp_path):
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = stethoscope.attach(model, opt, server="offline", spool_dir=tmp_path)
    with pytest.raises(ValueError, match="loss must be"):
        mon.log(step=0, loss=torch.ones(3))
    with pytest.raises(ValueError, match="targets must be"):
        mon.log(step=1, logits=torch.zeros(4, 3), targets=torch.zeros(5, dtype=torch.long))
    for targets in (torch.zeros(4, 1, dtype=torch.long), torch.zeros(4), torch.zeros((), dtype=torch.long), [0] * 4):
        with pytest.raises(ValueError, match="targets must be"):
            mon.log(step=1, logits=torch.zeros(4, 3), targets=targets)
    with pytest.raises(ValueError, match="targets must be"):
        mon.log(step=1, logits=torch.zeros(2, 4, 3), targets=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="step must be"):
        mon.log(step=1.5)
    with pytest.raises(ValueError, match="step must be >= 0"):
        mon.log(step=-1)
    with pytest.raises(ValueError, match="metric name"):
        mon.log(step=2, **{"bad name": 1.0})
    with pytest.raises(ValueError, match="callable"):
        mon.add_collector(42)
    with pytest.raises(ValueError, match="event kind"):
        mon.event("")
    mon.close()
    with pytest.raises(ValueError, match="closed"):
        mon.log(step=3, loss=1.0)


def test_cli_dispatches_server_commands(tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 'cli.db'}"
    assert _cli.main(["db", "upgrade", "--db", db]) == 0
    assert "head" in capsys.readouterr().out


def test_cli_without_the_server_extra_prints_the_install_hint(tmp_path):
    # A process where the server package cannot be imported, as after `pip install stethoscope`.
    code = (
        "import sys; sys.modules['stethoscope_server'] = None\n"
        "from stethoscope._cli import main; sys.exit(main(['server']))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip() == "stethoscope: this command needs the server extra: pip install 'stethoscope[server]'"


def test_cli_sync_uploads_an_offline_run(live_server, tmp_path, capsys):
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with stethoscope.attach(model, opt, run="cli-sync", server="offline", spool_dir=tmp_path / "s") as mon:
        train(mon, model, opt, 5)
    assert _cli.main(["sync", str(tmp_path / "s"), "--server", live_server.url]) == 0
    assert "synced 1 run(s)" in capsys.readouterr().err
    assert read_series(live_server.url, "cli-sync", "loss")[0] == list(range(5))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_forked_child_sends_with_its_own_sender(live_server, tmp_path):
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = stethoscope.attach(model, opt, run="forked", server=live_server.url, spool_dir=tmp_path)
    train(mon, model, opt, 5)
    assert mon.flush(10)
    pid = os.fork()
    if pid == 0:  # the child: log steps of its own and leave
        code = 1
        try:
            for step in range(100, 105):
                mon.log(step=step, child=float(step))
            mon.flush(20)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    train(mon, model, opt, 5, start=5)
    mon.close()
    assert read_series(live_server.url, "forked", "child")[0] == list(range(100, 105))
    assert read_series(live_server.url, "forked", "loss")[0] == list(range(10))


def test_a_failure_inside_log_is_swallowed_and_reported(internal_errors, tmp_path):
    class Weird:
        def __float__(self):
            raise ArithmeticError("cannot be read")

    model = TinyNet()
    mon = stethoscope.attach(model, None, server="offline", spool_dir=tmp_path)
    mon.log(step=0, weird=Weird())  # must not raise into the loop
    mon.close()
    assert [w for w, _ in internal_errors] == ["log"]
    assert isinstance(internal_errors[0][1], ArithmeticError)
    internal_errors.clear()  # expected here; the autouse fixture fails on anything left
