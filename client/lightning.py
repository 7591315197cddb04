"""PyTorch Lightning: ``trainer = Trainer(callbacks=[StethoscopeCallback(project="demo")])``.

The callback attaches to the LightningModule and its first optimizer when training starts
and logs after every optimizer step. Return ``{"loss": loss, "logits": logits,
"targets": y}`` from ``training_step`` to get the logit statistics too. Under DDP every
rank runs the callback; rank 0 sends.
"""

from __future__ import annotations

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - the standalone package name
    try:
        import pytorch_lightning as pl
    except ImportError:
        raise ImportError("stethoscope.lightning needs PyTorch Lightning: pip install lightning") from None

from ._attach import attach


class StethoscopeCallback(pl.Callback):
    """Stethoscope for Lightning; takes the arguments of ``stethoscope.attach``.

    >>> trainer = lightning.Trainer(callbacks=[StethoscopeCallback(project="demo", server=URL)])
    """

    def __init__(self, **attach_kwargs):
        super().__init__()
        self.attach_kwargs = attach_kwargs
        self.monitor = None
        self._last_step = -1

    def on_train_start(self, trainer, pl_module):
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # LightningOptimizer wraps it
        self.monitor = attach(pl_module, optimizer, **self.attach_kwargs)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.monitor is None:
            return
        step = trainer.global_step - 1  # the optimizer step that just ran, from 0
        if step <= self._last_step:
            return  # gradient accumulation: no optimizer step on this batch
        self._last_step = step
        loss = logits = targets = None
        if isinstance(outputs, dict):
            loss, logits, targets = outputs.get("loss"), outputs.get("logits"), outputs.get("targets")
        elif outputs is not None:
            loss = outputs
        self.monitor.log(step=step, loss=loss, logits=logits, targets=targets)

    def on_train_end(self, trainer, pl_module):
        if self.monitor is not None:
            self.monitor.close()

    def on_exception(self, trainer, pl_module, exception):
        if self.monitor is not None:
            self.monitor.close("failed")
