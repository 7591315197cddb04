"""Tiny models and loops for the hook's tests (built in code, nothing downloaded)."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
import torch.nn.functional as F

from stethoscope.core.wire import decode_value


class TinyNet(torch.nn.Module):
    def __init__(self, d_in=8, hidden=16, classes=4):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(d_in, hidden), torch.nn.Tanh())
        self.head = torch.nn.Linear(hidden, classes)

    def forward(self, x):
        return self.head(self.body(x))


def batch(n=32, d_in=8, classes=4, seed=None):
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    x = torch.randn(n, d_in, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


def train_step(mon, model, opt, step):
    """One step of a plain loop on ``batch(seed=step)``, logged after ``opt.step()``; its loss."""
    x, y = batch(seed=step)
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    mon.log(step=step, loss=loss, logits=logits, targets=y)
    return loss


def train(mon, model, opt, steps, start=0, log_after_step=True):
    """A plain loop; returns the losses it logged."""
    losses = []
    for step in range(start, start + steps):
        if log_after_step:
            losses.append(train_step(mon, model, opt, step).item())
            continue
        x, y = batch(seed=step)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        mon.log(step=step, loss=loss, logits=logits, targets=y)
        opt.step()
        losses.append(loss.item())
    return losses


def read_series(url: str, run_id: str, name: str):
    r = httpx.get(f"{url}/api/v1/runs/{run_id}/series/{name}", params={"max_points": 100000}, timeout=30)
    r.raise_for_status()
    body = r.json()
    return body["steps"], [decode_value(v) for v in body["values"]]


def series_names(url: str, run_id: str) -> set:
    r = httpx.get(f"{url}/api/v1/runs/{run_id}/series", timeout=30)
    r.raise_for_status()
    return {s["name"] for s in r.json()}


def spooled_points(root) -> dict:
    """{name: {step: value}} from every spool under root (an offline run's whole output)."""
    out: dict = {}
    for seg in sorted(root.rglob("*.jsonl")):
        for line in seg.read_text().splitlines():
            entry = json.loads(line)
            if entry["t"] == "points":
                for s in entry["b"]["series"]:
                    col = out.setdefault(s["name"], {})
                    for step, v in zip(s["steps"], s["values"]):
                        assert step not in col, f"{s['name']} step {step} twice"
                        col[step] = decode_value(v)
    return out


@pytest.fixture(autouse=True)  # autouse where a test module imports it
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine two OpenMP threads per
    process thrash; one keeps these tests quick and steady."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
