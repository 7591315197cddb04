"""The max attention logit (Wortsman et al. 2023: attention-logit growth precedes divergence).

Call ``stethoscope.attention_logits(scores)`` on the pre-softmax scores inside your attention
module; it returns them unchanged and, on logging steps, keeps a running max on the device
that the next ``mon.log`` sends as ``attention/max_logit``. Outside logging steps it costs a
flag test. (Under ``torch.compile`` mark it with ``torch.compiler.disable`` or leave it out.)
"""

from __future__ import annotations

_active = False  # set by an attached monitor on its logging steps
_max = None


def attention_logits(scores):
    """Record the max of pre-softmax attention scores for this step; returns ``scores``.

    >>> scores = stethoscope.attention_logits(q @ k.transpose(-2, -1) * scale)
    """
    global _max
    if _active:
        try:
            m = scores.detach().amax().float().reshape(1)
            _max = m if _max is None else _max.maximum(m)
        except Exception as exc:  # noqa: BLE001
            from ._errors import report

            report("attention_logits", exc)
    return scores


def take():
    """The running max since the last call (a 1-element tensor), or None; resets it."""
    global _max
    m, _max = _max, None
    return m


def set_active(flag: bool) -> None:
    global _active
    _active = flag
