"""Hugging Face Trainer: ``Trainer(..., callbacks=[StethoscopeTrainerCallback(project="demo")])``.

Attaches to the model and optimizer when training starts and logs after every optimizer
step: gradients, weights and updates from the optimizer hooks, the logit statistics from
the model's own output (a forward hook keeps the last training batch's ``logits`` and
``labels``; causal language models are shifted as their loss is), and whatever the Trainer
itself logs (``loss``, ``grad_norm``, ``learning_rate``... under ``hf/``).
"""

from __future__ import annotations

try:
    from transformers import TrainerCallback
except ImportError:
    raise ImportError("stethoscope.huggingface needs transformers: pip install transformers") from None

import torch

from ._attach import attach


def _inner_optimizer(opt):
    # accelerate's AcceleratedOptimizer forwards step() to the optimizer it wraps.
    while isinstance(getattr(opt, "optimizer", None), torch.optim.Optimizer):
        opt = opt.optimizer
    return opt


class StethoscopeTrainerCallback(TrainerCallback):
    """Stethoscope for ``transformers.Trainer``; takes the arguments of ``stethoscope.attach``.

    >>> trainer = Trainer(model, args, train_dataset=ds, callbacks=[StethoscopeTrainerCallback(project="demo")])
    """

    def __init__(self, logits: bool = True, **attach_kwargs):
        self.attach_kwargs = attach_kwargs
        self.want_logits = logits
        self.monitor = None
        self._hook = None
        self._batch = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        kw = dict(self.attach_kwargs)
        kw.setdefault("config", {k: v for k, v in args.to_dict().items() if isinstance(v, (int, float, str, bool))})
        self.monitor = attach(model, _inner_optimizer(optimizer), **kw)
        if self.want_logits:
            self._hook = model.register_forward_hook(self._keep_logits, with_kwargs=True)
        self._causal = not getattr(getattr(model, "config", None), "is_encoder_decoder", False)

    def _keep_logits(self, module, args, kwargs, output):
        if module.training:
            logits = getattr(output, "logits", None)
            if logits is None and isinstance(output, dict):
                logits = output.get("logits")
            self._batch = (logits, kwargs.get("labels"))

    def on_step_end(self, args, state, control, **kwargs):
        if self.monitor is None:
            return
        logits, labels = self._batch if self._batch is not None else (None, None)
        self._batch = None
        if logits is not None and labels is not None:
            if logits.dim() == 3 and labels.dim() == 2 and self._causal and logits.shape[1] == labels.shape[1]:
                logits, labels = logits[:, :-1], labels[:, 1:]  # the next-token shift of the LM loss
            if labels.shape != logits.shape[:-1] or labels.is_floating_point():
                logits = labels = None
        elif labels is None:
            logits = None
        self.monitor.log(step=state.global_step - 1, logits=logits, targets=labels)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.monitor is None or not logs:
            return
        values = {
            ("loss" if k == "loss" else f"hf/{k}"): v
            for k, v in logs.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        self.monitor._send_scalars(max(0, state.global_step - 1), values)

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.monitor is not None:
            self.monitor.close()
