"""Stethoscope: attach a training-health monitor to any PyTorch training loop.

    import stethoscope
    mon = stethoscope.attach(model, optimizer, project="demo")
    for step, batch in enumerate(loader):
        ...
        loss.backward(); optimizer.step()
        mon.log(step=step, loss=loss, logits=logits, targets=targets)
    mon.close()
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
