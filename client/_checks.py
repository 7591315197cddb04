"""Argument checks for the hot path: misuse raises ValueError at once, with what to do."""

from __future__ import annotations

import operator

import torch

from .core.wire import MAX_NAME_LENGTH


def _check_step(step) -> int:
    try:
        step = operator.index(step)
    except TypeError:
        if isinstance(step, torch.Tensor) and step.numel() == 1 and not step.is_floating_point():
            step = int(step)
        else:
            raise ValueError(f"step must be an int, not {type(step).__name__}") from None
    if step < 0:
        raise ValueError(f"step must be >= 0, not {step}")
    return step


_checked_names: set = set()


def _check_name(name) -> None:
    if name in _checked_names:
        return
    if (
        not isinstance(name, str)
        or not name
        or len(name) > MAX_NAME_LENGTH
        or name.startswith("/")
        or name.endswith("/")
        or "//" in name
        or any(c.isspace() for c in name)
    ):
        raise ValueError(
            f"metric name {name!r}: use a slash path like 'eval/acc/task1' "
            f"(no spaces, at most {MAX_NAME_LENGTH} characters)"
        )
    _checked_names.add(name)


def _check_log_args(loss, logits, targets, scalars) -> int | None:
    """Misuse raises ValueError. Returns the batch size the logits show (their first
    dimension; ``targets`` has it too), or None without logits."""
    # Called on every step: plain tensors (the usual arguments) are told by their class, and
    # 2-D logits' targets compared by length and rows, without further calls or a shape slice.
    if loss is not None:
        cls = loss.__class__
        if cls is _Tensor:
            if loss.numel() != 1:
                raise ValueError(_LOSS_MESSAGE)
        elif cls is not float and not _is_scalar(loss):
            raise ValueError(_LOSS_MESSAGE)
    batch = None
    if logits is not None:
        shape = logits.shape if logits.__class__ is _Tensor or isinstance(logits, _Tensor) else ()
        dims = len(shape)
        if dims < 2 or shape[-1] < 2:
            raise ValueError("logits must be a tensor of shape [batch, classes] or [batch, seq, vocab]")
        batch = shape[0]
        if targets is not None:
            if targets.__class__ is _Tensor or isinstance(targets, _Tensor):
                tshape = targets.shape
                wrong = (len(tshape) != 1 or tshape[0] != batch) if dims == 2 else tshape != shape[:-1]
            else:
                wrong = True
            if wrong or targets.is_floating_point():
                raise ValueError(
                    f"targets must be class indices of shape {tuple(logits.shape[:-1])} "
                    f"(logits' shape without the class dimension)"
                )
    elif targets is not None:
        raise ValueError("targets were given without logits")
    if scalars:
        for name, v in scalars.items():
            _check_name(name)
            if not _is_scalar(v):
                raise ValueError(f"{name}: a logged value must be a number or a one-element tensor")
    return batch


_Tensor = torch.Tensor
_LOSS_MESSAGE = "loss must be a number or a one-element tensor (pass loss, not a batch of losses)"


def _is_scalar(v) -> bool:
    if isinstance(v, torch.Tensor):
        return v.numel() == 1
    return isinstance(v, (int, float)) and not isinstance(v, bool) or hasattr(v, "__float__")


def _jsonable(o):
    if isinstance(o, torch.Tensor) and o.numel() == 1:
        return o.item()
    if hasattr(o, "__float__"):
        return float(o)
    return str(o)
