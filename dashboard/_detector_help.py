"""What the pages say about detectors: a one-line "what to do" per alert, and each setting's
meaning, unit and default for the settings page.

The settings' words are read from the detectors' own source, so they cannot drift from the
code: the ``#:`` comment on a ``Params`` field (trailing, or on the lines above it), else the
``#:`` comment of the module constant that is its default (``window: int = SPIKE_WINDOW``
takes the comment above ``SPIKE_WINDOW``, which names the source of the number).

    docs = detector_docs()        # {"loss_spike": {"params": {"window": {...}}, "advice": "..."}}
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import sys

from stethoscope.core.detectors import DETECTORS

#: One line per detector: the first thing to try when its alert opens.
ADVICE = {
    "divergence": "Stop or roll back to the last good checkpoint; lower the learning rate or lengthen warm-up, "
    "clip gradients, and check the data at the first detected step.",
    "loss_spike": "Look at the batch of the spike's step; if spikes repeat, lower the learning rate, clip "
    "gradients or skip outlier steps.",
    "softmax_collapse": "Logits are outgrowing float32: add weight decay or a logit penalty (z-loss), compute "
    "the softmax in higher precision, or lower the learning rate.",
    "edge_of_stability": "λmax has reached 2/lr: expect oscillation; lower the learning rate if the loss stops "
    "falling or starts to spike.",
    "stability_gap": "Earlier tasks lost accuracy after the task switch: add replay or regularisation, or lower "
    "the learning rate around switches; watch whether it recovers.",
    "stalled": "No new points: check that the job is alive (crashed, hung, or lost its network; the hook "
    "spools to disk and sends later).",
    "plateau": "The run is not learning: raise the learning rate (try 10x), check for dead units or a too-small "
    "initialisation, and that the labels and loss match the inputs.",
    "oscillation": "The learning rate is past the edge of stability: lower it (halve it), or add warm-up or "
    "gradient clipping; with momentum, lower the momentum too.",
    "layer_gradients": "Look at the named layer: dead units (a large negative bias, too high a learning rate), "
    "saturating activations at a poor initialisation, or weights far off the scale a normalisation expects; "
    "re-initialise it, switch to ReLU-family activations with a fan-in init, or fix its weight decay or constraint.",
    "rank_drift": "The data-parallel replicas differ: stop and resume every rank from one checkpoint; look for "
    "a rank that skips optimizer steps, weights or buffers changed outside DDP's all-reduce (a hook, an in-place "
    "edit on one rank) or parameters DDP does not synchronise.",
    "dead_units": "Units of the named layer stopped firing: lower the learning rate (or add warm-up), clip "
    "gradients, check for a large negative bias, or switch to LeakyReLU/GELU or a fan-in init; dead units do "
    "not come back on their own: restart from a checkpoint before they died.",
    "slow_steps": "Steps take longer than at the start of the run: check data-loader workers (CPU use, I/O), "
    "the GPU's clocks and temperature (nvidia-smi), recompilations (TORCH_LOGS=recompiles) and other jobs on "
    "the node.",
    "overfitting": "Keep the checkpoint of the best evaluation (in the evidence); stop early, or add data, "
    "augmentation, weight decay or dropout.",
}
GENERIC_ADVICE = "Open the run and look at the first detected step."


def advice(detector: str) -> str:
    return ADVICE.get(detector, GENERIC_ADVICE)


def _unit(name: str, text: str) -> str:
    """The unit a setting is in, from its name (``_s``, ``_steps``...) or its words."""
    low = text.lower()
    if name.endswith(("_series", "_prefix", "_prefixes")) or name == "series":
        return "series name"
    if name in ("drop", "recover_tolerance", "acc_drop"):
        return "accuracy (0–1)"
    if name.endswith("_s"):
        return "seconds"
    if name.endswith("_steps") or name == "patience" or "in steps" in low:
        return "steps"
    if name.endswith("_points") or name in ("window", "warmup", "grad_window") or "in points" in low:
        return "points"
    if "fraction" in name or " share " in f" {low} ":
        return "fraction (0–1)"
    if "nats" in low or "margin" in name:
        return "nats"
    if "sigmas" in name or name in ("threshold", "recover_threshold"):
        return "robust σ"
    if "ratio" in name:
        return "ratio (×)"
    return ""


def _comment_above(lines: list[str], lineno: int) -> str:
    """The ``#:`` lines right above line ``lineno`` (1-based), joined."""
    out = []
    i = lineno - 2
    while i >= 0 and lines[i].strip().startswith("#:"):
        out.append(lines[i].strip()[2:].strip())
        i -= 1
    return " ".join(reversed(out))


def _trailing(line: str) -> str:
    return line.split("#:", 1)[1].strip() if "#:" in line else ""


@functools.cache
def _module_comments(module_name: str) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """(constant -> comment, Params class -> {field -> comment}) of a detector module."""
    source = inspect.getsource(sys.modules[module_name])
    lines = source.splitlines()
    consts: dict[str, str] = {}
    classes: dict[str, dict[str, str]] = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if isinstance(t, ast.Name):
                    consts[t.id] = _comment_above(lines, node.lineno) or _trailing(lines[node.lineno - 1])
        elif isinstance(node, ast.ClassDef):
            fields: dict[str, str] = {}
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    own = _trailing(lines[item.end_lineno - 1]) or _comment_above(lines, item.lineno)
                    if not own and isinstance(item.value, ast.Name):
                        own = "@" + item.value.id  # resolved against the constants below
                    if not own and isinstance(item.value, ast.BinOp):
                        names = [n.id for n in ast.walk(item.value) if isinstance(n, ast.Name)]
                        own = "@" + names[0] if names else ""
                    fields[item.target.id] = own
            classes[node.name] = fields
    for fields in classes.values():
        for k, v in fields.items():
            if v.startswith("@"):
                fields[k] = consts.get(v[1:], "")
    return consts, classes


def _json_default(v):
    return list(v) if isinstance(v, tuple) else v


@functools.cache
def detector_docs() -> dict[str, dict]:
    """Per detector: ``advice``, and ``params`` ``{name: {description, unit, default}}``."""
    out = {}
    for name, cls in DETECTORS.items():
        params_cls = cls.Params
        _, classes = _module_comments(params_cls.__module__)
        comments = classes.get(params_cls.__name__, {})
        params = {}
        for f in dataclasses.fields(params_cls):
            default = f.default if f.default is not dataclasses.MISSING else None
            text = comments.get(f.name, "")
            params[f.name] = {"description": text, "unit": _unit(f.name, text), "default": _json_default(default)}
        summary = (cls.__doc__ or "").strip().splitlines()
        out[name] = {"advice": advice(name), "summary": summary[0] if summary else "", "params": params}
    return out
