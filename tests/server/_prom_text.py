"""A strict reader of the Prometheus text exposition format (0.0.4), for the /metrics tests.

Stricter than Prometheus itself where that catches our mistakes: every family has one HELP
and one TYPE line before its samples, sample names belong to the family just declared (with
``_bucket``/``_sum``/``_count`` for histograms), no sample repeats, histogram buckets are
cumulative and end at ``le="+Inf"`` equal to ``_count``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
SAMPLE = re.compile(rf"^({NAME})(?:\{{(.*)\}})? (\S+)$")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')
TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}
SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count", "")}


@dataclass
class Family:
    name: str
    help: str
    type: str = ""
    samples: dict = field(default_factory=dict)  # (sample name, frozenset(labels)) -> value

    def value(self, suffix: str = "", **labels) -> float:
        return self.samples[(self.name + suffix, frozenset(labels.items()))]

    def buckets(self) -> list[tuple[float, float]]:
        out = [(float(dict(k[1])["le"]), v) for k, v in self.samples.items() if k[0] == self.name + "_bucket"]
        return sorted(out)


class ParseError(AssertionError):
    pass


def _labels(text: str | None, line: str) -> frozenset:
    if not text:
        return frozenset()
    pos, out = 0, {}
    while pos < len(text):
        m = LABEL.match(text, pos)
        if m is None:
            raise ParseError(f"bad labels in {line!r}")
        if m.group(1) in out:
            raise ParseError(f"label {m.group(1)} twice in {line!r}")
        out[m.group(1)] = m.group(2)
        pos = m.end()
        if pos < len(text):
            if text[pos] != ",":
                raise ParseError(f"labels must be separated by ',' in {line!r}")
            pos += 1
    return frozenset(out.items())


def _value(text: str, line: str) -> float:
    if text in ("+Inf", "-Inf", "NaN"):
        return float(text.replace("Inf", "inf").replace("NaN", "nan"))
    try:
        return float(text)
    except ValueError:
        raise ParseError(f"bad value in {line!r}") from None


def parse(text: str) -> dict[str, Family]:
    if not text.endswith("\n"):
        raise ParseError("the exposition must end with a newline")
    families: dict[str, Family] = {}
    current: Family | None = None
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP "):
            name, _, help_ = line[7:].partition(" ")
            if not re.fullmatch(NAME, name) or name in families:
                raise ParseError(f"bad or repeated HELP: {line!r}")
            current = families[name] = Family(name, help_)
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            if current is None or name != current.name or current.type or kind not in TYPES:
                raise ParseError(f"TYPE must follow its HELP once, with a known type: {line!r}")
            current.type = kind
        elif line.startswith("#") or not line:
            raise ParseError(f"unexpected line {line!r}")
        else:
            m = SAMPLE.match(line)
            if m is None or current is None or not current.type:
                raise ParseError(f"sample outside a declared family: {line!r}")
            name = m.group(1)
            allowed = [current.name + s for s in SUFFIXES.get(current.type, ("",))]
            if name not in allowed:
                raise ParseError(f"sample {name} does not belong to {current.type} {current.name}")
            key = (name, _labels(m.group(2), line))
            if key in current.samples:
                raise ParseError(f"sample repeated: {line!r}")
            current.samples[key] = _value(m.group(3), line)
    for f in families.values():
        if not f.samples:
            raise ParseError(f"family {f.name} has no samples")
        if f.type == "counter" and any(v < 0 or math.isnan(v) for v in f.samples.values()):
            raise ParseError(f"counter {f.name} is negative or NaN")
        if f.type == "histogram":
            b = f.buckets()
            if not b or b[-1][0] != math.inf:
                raise ParseError(f'histogram {f.name} lacks le="+Inf"')
            if any(b[i][1] > b[i + 1][1] for i in range(len(b) - 1)):
                raise ParseError(f"histogram {f.name} buckets are not cumulative: {b}")
            if b[-1][1] != f.value("_count"):
                raise ParseError(f"histogram {f.name}: +Inf bucket {b[-1][1]} != count {f.value('_count')}")
    return families
