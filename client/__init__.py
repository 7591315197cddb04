"""Stethoscope: attach a training-health monitor to any PyTorch training loop.

    import stethoscope
    mon = stethoscope.attach(model, optimizer, project="demo")
    for step, batch in enumerate(loader):
        ...
        loss.backward(); optimizer.step()
        mon.log(step=step, loss=loss, logits=logits, targets=targets)
    mon.close()

Framework adapters are imported only when asked for: ``stethoscope.lightning`` and
``stethoscope.huggingface``.
"""

__version__ = "0.1.0"

from ._attach import DisabledMonitor, attach  # noqa: E402
from ._attention import attention_logits  # noqa: E402


def __getattr__(name):
    # The monitor needs torch; importing stethoscope alone (the CLI, a server) must not.
    if name == "Monitor":
        from ._monitor import Monitor

        return Monitor
    if name == "ContinualEvaluator":
        from .continual import ContinualEvaluator

        return ContinualEvaluator
    raise AttributeError(f"module 'stethoscope' has no attribute {name!r}")


__all__ = ["ContinualEvaluator", "DisabledMonitor", "Monitor", "__version__", "attach", "attention_logits"]
