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

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("stethoscope")  # one source: pyproject.toml's version
except PackageNotFoundError:  # pragma: no cover - run from a source tree that was never installed
    __version__ = "0+unknown"

#: Public names, each imported on first use (PEP 562): ``import stethoscope`` alone, and the
#: shared core (``stethoscope.core``) that the server imports, load neither torch nor the
#: hook's sender, spool and transport.
_LAZY = {
    "attach": "._attach",
    "DisabledMonitor": "._attach",
    "attention_logits": "._attention",
    "Monitor": "._monitor",
    "ContinualEvaluator": ".continual",
}


def __getattr__(name):
    where = _LAZY.get(name)
    if where is None:
        raise AttributeError(f"module 'stethoscope' has no attribute {name!r}")
    value = getattr(import_module(where, __name__), name)
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["ContinualEvaluator", "DisabledMonitor", "Monitor", "__version__", "attach", "attention_logits"]
