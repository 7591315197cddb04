"""Framework adapters and torch.distributed, each with a tiny model built here (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import TinyNet, batch, read_series, series_names

pytestmark = pytest.mark.slow
HERE = Path(__file__).parent


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_distributed_ranks_make_one_run_with_global_metrics(mode, live_server, tmp_path):
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(HERE / "ddp_worker.py"),
                mode,
                str(r),
                "2",
                str(port),
                live_server.url,
                str(tmp_path / f"spool{r}"),
                str(tmp_path / f"rank{r}.json"),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(2)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out.decode()[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["internal_errors"] == ranks[1]["internal_errors"] == []
    run_id = ranks[0]["run_id"]
    assert ranks[1]["run_id"] == run_id, "one logical run"
    assert not (tmp_path / "spool1").exists(), "rank 1 sends nothing"
    # The same training in one process, on both ranks' batches: the reference values.
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    want = {"loss": [], "grad/norm": [], "grad/norm/head": [], "weight/norm/body.0": [], "logits/max_abs": []}
    for step in range(5):
        parts = [batch(n=16, seed=1000 * step + r) for r in range(2)]
        logits = [model(x) for x, _ in parts]
        losses = [F.cross_entropy(lg, y) for lg, (_, y) in zip(logits, parts)]
        loss = sum(losses) / 2  # DDP averages the ranks' gradients
        opt.zero_grad()
        loss.backward()
        want["grad/norm"].append(float(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm()))
        want["grad/norm/head"].append(float(torch.cat([p.grad.reshape(-1) for p in model.head.parameters()]).norm()))
        opt.step()
        want["weight/norm/body.0"].append(
            float(torch.cat([p.detach().reshape(-1) for p in model.body[0].parameters()]).norm())
        )
        want["loss"].append(float(loss))
        want["logits/max_abs"].append(max(float(lg.abs().max()) for lg in logits))
    for name, values in want.items():
        steps, got = read_series(live_server.url, run_id, name)
        assert steps == list(range(5)), name
        assert got == pytest.approx(values, rel=1e-4), name
    assert "update_ratio/head" in series_names(live_server.url, run_id)


def test_lightning_callback(live_server, tmp_path):
    import lightning.pytorch as pl

    from stethoscope.lightning import StethoscopeCallback

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = TinyNet()
            self.losses = []

        def training_step(self, b, i):
            x, y = b
            logits = self.net(x)
            loss = F.cross_entropy(logits, y)
            self.losses.append(loss.item())
            return {"loss": loss, "logits": logits, "targets": y}

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    x, y = batch(n=48, seed=0)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    cb = StethoscopeCallback(run="lightning-run", server=live_server.url, spool_dir=tmp_path)
    module = Module()
    trainer = pl.Trainer(
        max_steps=6,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cb],
        default_root_dir=tmp_path,
    )
    trainer.fit(module, train_dataloaders=data)
    steps, losses = read_series(live_server.url, "lightning-run", "loss")
    assert steps == list(range(6))
    assert losses == pytest.approx(module.losses, rel=1e-6)
    names = series_names(live_server.url, "lightning-run")
    assert {"grad/norm/net.head", "update_ratio/net.body.0", "logits/sc_fraction", "lr"} <= names


def test_huggingface_trainer_callback(live_server, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    from stethoscope.huggingface import StethoscopeTrainerCallback

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=40, n_positions=16))
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 40, (16, 12), generator=g)]
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=4,
        per_device_train_batch_size=4,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        max_grad_norm=1e6,
        learning_rate=1e-3,
        disable_tqdm=True,
    )
    cb = StethoscopeTrainerCallback(run="hf-run", server=live_server.url, spool_dir=tmp_path / "spool", every=1)
    Trainer(model=model, args=args, train_dataset=data, callbacks=[cb]).train()
    names = series_names(live_server.url, "hf-run")
    assert {
        "loss",
        "hf/grad_norm",
        "grad/norm",
        "logits/median_margin",
        "update_ratio/transformer.h.0.attn.c_attn",
        "lr/0",
        "lr/1",
    } <= names  # the Trainer makes two groups (with and without decay)
    steps, ours = read_series(live_server.url, "hf-run", "grad/norm")
    assert steps == list(range(4))
    # The Trainer measures the same gradient norm (clipping is off): the two must agree.
    hf_steps, theirs = read_series(live_server.url, "hf-run", "hf/grad_norm")
    assert hf_steps == steps
    assert ours == pytest.approx(theirs, rel=1e-4)
    assert read_series(live_server.url, "hf-run", "logits/mean_logz")[0] == steps
