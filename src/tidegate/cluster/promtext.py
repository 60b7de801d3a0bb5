"""Merging Prometheus text expositions, so one ``/metrics`` serves every process of an app.

Each replica renders its own registry (prometheus_client's text format, version 0.0.4); the
ingress joins those texts with its own. The format requires every family's lines to be one
contiguous group with a single ``# HELP`` and ``# TYPE``, so concatenating the texts is not
enough: the samples of a family are gathered from every part under one header, each labelled
with the part it came from. Everything here is pure: no Ray, no HTTP, no prometheus_client.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["ExpositionError", "merge_expositions"]

# A sample belongs to the family whose HELP/TYPE lines precede it when its name is the family's
# name plus one of these (histograms, summaries, counters and prometheus_client's renderings of
# OpenMetrics types); any other name ends the family.
_SUFFIXES = ("", "_bucket", "_sum", "_count", "_created", "_total", "_info", "_gsum", "_gcount")
_METRIC_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_QUOTED = r'"(?:[^"\\]|\\.)*"'
_SAMPLE = re.compile(
    rf"(?P<name>{_METRIC_NAME})"
    rf"(?:[ \t]*\{{(?P<labels>(?:[^\"{{}}]|{_QUOTED})*)\}}[ \t]*|[ \t]+)"
    r"(?P<value>\S+)(?:[ \t]+(?P<timestamp>\S+))?"
)
_LABEL = re.compile(
    rf"[ \t]*(?P<name>{_LABEL_NAME.pattern})[ \t]*=[ \t]*(?P<value>{_QUOTED})[ \t]*(?:,|\Z)"
)
_DESCRIPTOR = re.compile(r"#[ \t]*(?P<kind>HELP|TYPE)(?:[ \t]+(?P<rest>.*))?")
_NAMED_TEXT = re.compile(rf"(?P<name>{_METRIC_NAME})(?:[ \t]+(?P<text>.*))?")
_TYPE = re.compile(r"[a-z]+")
_TIMESTAMP = re.compile(r"-?[0-9]+")


class ExpositionError(ValueError):
    """A part is not valid Prometheus text. It names the part and the line, so that a caller
    can merge the other parts without it."""

    def __init__(self, source: str, line_number: int, line: str, reason: str) -> None:
        super().__init__(
            f"exposition from {source!r}, line {line_number}: {reason}: {line[:200]!r}; "
            "fix that renderer, or merge the other parts without it"
        )
        self.source = source
        self.line_number = line_number
        self.line = line


class _LineError(Exception):
    pass


@dataclass
class _Family:
    name: str
    help: str | None = None
    type: str | None = None
    samples: list[str] = field(default_factory=list)
    series: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        self.series = frozenset(self.name + suffix for suffix in _SUFFIXES)


def merge_expositions(parts: Sequence[tuple[str, str]], *, label: str = "replica") -> str:
    """Merge Prometheus text expositions (format 0.0.4) into one.

    Each part is ``(source, text)``. Every sample of a part gets ``label="source"`` as its first
    label. A sample that already has ``label`` keeps its value under ``exported_<label>`` (with
    more ``exported_`` prefixes while that name is taken too), as Prometheus itself renames a
    scraped label that clashes with a target label.

    Families with the same name across parts become one group with their samples contiguous,
    in order of first appearance; the ``# HELP`` and the ``# TYPE`` line each come from the
    first part that has one (parts that disagree on a type are not refused: the first wins).
    A sample belongs to the family whose HELP/TYPE lines it follows, if its name is that
    family's name or a suffixed series of it (``_bucket``, ``_sum``, ``_count``, ``_created``,
    ``_total``, ``_info``, ``_gsum``, ``_gcount``); any other sample, and every sample before
    the first HELP/TYPE line, is in the untyped family of its own name. Sample values and
    timestamps are kept as written; comments and blank lines are dropped.

    The result ends with a newline, or is empty when no part has a HELP, TYPE or sample line.
    Raises :class:`ExpositionError` (a ``ValueError``) for a line that is not Prometheus text,
    and ``ValueError`` for a ``label`` that is not a label name or a source that is empty (an
    empty label value means no label) or given twice (its samples would be duplicates).
    """
    if not _LABEL_NAME.fullmatch(label) or label.startswith("__"):
        raise ValueError(f"label {label!r} is not a Prometheus label name outside the reserved "
                         "__ prefix; use letters, digits and underscores, like 'replica'")
    families: dict[str, _Family] = {}
    sources: set[str] = set()
    for source, text in parts:
        if not source:
            raise ValueError(f"a part has an empty source: {label}=\"\" would mean no label; "
                             "give each part a name")
        if source in sources:
            raise ValueError(f"source {source!r} is given twice; its samples would collide")
        sources.add(source)
        _read_part(source, text, label, families)
    lines: list[str] = []
    for family in families.values():
        if family.help is not None:
            lines.append(f"# HELP {family.name} {family.help}" if family.help
                         else f"# HELP {family.name}")
        if family.type is not None:
            lines.append(f"# TYPE {family.name} {family.type}")
        lines.extend(family.samples)
    return "".join(line + "\n" for line in lines)


def _read_part(source: str, text: str, label: str, families: dict[str, _Family]) -> None:
    source_label = f'{label}="{_escape(source)}"'
    current: _Family | None = None
    # Only "\n" ends a line: str.splitlines would also split at U+2028 and others, which may
    # stand unescaped inside a label value.
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.strip(" \t\r")
        if not line:
            continue
        try:
            if line.startswith("#"):
                current = _read_descriptor(line, families) or current
            else:
                current = _read_sample(line, current, source_label, label, families)
        except _LineError as exc:
            raise ExpositionError(source, number, line, str(exc)) from None


def _read_descriptor(line: str, families: dict[str, _Family]) -> _Family | None:
    """Record a HELP or TYPE line and return its family; None for a comment."""
    descriptor = _DESCRIPTOR.fullmatch(line)
    if descriptor is None:
        return None
    kind = descriptor["kind"]
    named = _NAMED_TEXT.fullmatch(descriptor["rest"] or "")
    if named is None:
        raise _LineError(f"{kind} needs a metric name (quoted UTF-8 names are not supported)")
    name, text = named["name"], named["text"] or ""
    family = families.get(name)
    if family is None:
        family = families[name] = _Family(name)
    if kind == "HELP":
        if family.help is None:
            family.help = text
    elif not _TYPE.fullmatch(text):
        raise _LineError("TYPE needs one type such as counter, gauge, histogram")
    elif family.type is None:
        family.type = text
    return family


def _read_sample(line: str, current: _Family | None, source_label: str, label: str,
                 families: dict[str, _Family]) -> _Family | None:
    """Add a sample line, relabelled, to its family; return the family still open after it."""
    sample = _SAMPLE.fullmatch(line)
    if sample is None:
        raise _LineError("not a sample: expected name{label=\"value\",...} value [timestamp]")
    value, timestamp = sample["value"], sample["timestamp"]
    if not _is_float(value):
        raise _LineError(f"sample value {value!r} is not a number")
    if timestamp is not None and not _TIMESTAMP.fullmatch(timestamp):
        raise _LineError(f"timestamp {timestamp!r} is not integer milliseconds")
    name = sample["name"]
    if current is None or name not in current.series:
        current = None
        family = families.get(name) or families.setdefault(name, _Family(name))
    else:
        family = current
    labels = _relabel(_parse_labels(sample["labels"] or ""), source_label, label)
    suffix = "" if timestamp is None else " " + timestamp
    family.samples.append(f"{name}{{{labels}}} {value}{suffix}")
    return current


def _parse_labels(text: str) -> list[tuple[str, str]]:
    """``(name, quoted value)`` pairs, the values still escaped as written."""
    pairs: list[tuple[str, str]] = []
    position = 0
    while text[position:].strip(" \t"):
        pair = _LABEL.match(text, position)
        if pair is None:
            raise _LineError(f"bad label list at {text[position:position + 40]!r}")
        pairs.append((pair["name"], pair["value"]))
        position = pair.end()
    return pairs


def _relabel(pairs: list[tuple[str, str]], source_label: str, label: str) -> str:
    names = {name for name, _ in pairs}
    if len(names) != len(pairs):
        raise _LineError("a label name appears twice")
    exported = label
    while exported in names:
        exported = "exported_" + exported
    return ",".join([source_label, *(
        f"{exported if name == label else name}={value}" for name, value in pairs
    )])


def _is_float(text: str) -> bool:
    # Python's float() accepts "1_000"; Prometheus (Go's ParseFloat) does not.
    if "_" in text:
        return False
    try:
        float(text)
    except ValueError:
        return False
    return True


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n")
