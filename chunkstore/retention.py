"""Which versions of a repo a retention policy keeps: the rules behind ``chunkstore prune``.

A policy is a set of keep rules; a version is kept if any rule keeps it, and each rule that
does is given as a reason. Whatever the rules, three kinds of version are always kept: the
newest (so the repo and its plain name stay), tagged ones (a tag is a deliberate pin: delete
the tag to let the version go) and those another kept version names as its input (so lineage
does not dangle). Removing a version removes its record only; chunks that kept versions still
need, the bases of their deltas included, stay through ``gc``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from chunkstore.errors import InvalidInput
from chunkstore.model import Version

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")


def parse_duration(text: str) -> float:
    """Seconds in ``text``: a number with a unit (s, m, h, d, w), e.g. ``36h`` or ``2w``."""
    match = _DURATION.fullmatch(text.strip().lower())
    if not match:
        raise InvalidInput(f"invalid duration {text!r}: expected a number and s, m, h, d or w")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_best(text: str, rule: str) -> tuple[str, int]:
    """``METRIC`` or ``METRIC=N`` (N >= 1, default 1) of a ``--keep-lowest``/``--keep-highest``."""
    metric, sep, count = text.partition("=")
    metric = metric.strip()
    if not metric:
        raise InvalidInput(f"invalid --{rule} {text!r}: expected METRIC or METRIC=N")
    if not sep:
        return metric, 1
    if not count.strip().isdigit() or int(count) < 1:
        raise InvalidInput(f"invalid --{rule} {text!r}: N must be a whole number >= 1")
    return metric, int(count)


@dataclass(frozen=True)
class KeepPolicy:
    """Keep rules; an empty policy keeps only what is always kept, and is refused by prune."""

    last: int = 0  # the N newest versions
    within: float | None = None  # seconds: versions made within this long of the newest
    lowest: Mapping[str, int] = field(default_factory=dict)  # metric -> N lowest values
    highest: Mapping[str, int] = field(default_factory=dict)  # metric -> N highest values

    def __post_init__(self) -> None:
        if self.last < 0:
            raise InvalidInput(f"--keep-last must be >= 0, not {self.last}")
        if self.within is not None and self.within < 0:
            raise InvalidInput("--keep-within must not be negative")

    @property
    def empty(self) -> bool:
        return not (self.last or self.within is not None or self.lowest or self.highest)


def plan(
    versions: Sequence[Version],
    policy: KeepPolicy,
    others: Iterable[Version] = (),
    pinned: Mapping[bytes, Sequence[str]] | None = None,
) -> list[tuple[Version, list[str]]]:
    """Each of ``versions`` (one repo's, newest first) with the reasons it is kept; an empty
    list means it goes. ``others`` are versions of other repos, kept whatever happens here,
    whose inputs are kept too. ``pinned`` keeps versions by id whatever the rules, with the
    reasons given (those a record that cannot be read may name), and their inputs too.

    Raises InvalidInput if a metric rule names a metric no version records (a misspelt
    metric would otherwise keep nothing by it).
    """
    _check_metrics(versions, [*policy.lowest, *policy.highest])
    reasons: dict[bytes, list[str]] = {v.id: [] for v in versions}
    if versions:
        reasons[versions[0].id].append("newest")
    for v in versions[: policy.last]:
        reasons[v.id].append(f"last {policy.last}")
    if policy.within is not None and versions:
        since = versions[0].created_ns - policy.within * 1e9
        for v in versions:
            if v.created_ns >= since:
                reasons[v.id].append(f"within {_span(policy.within)}")
    for metric, count in policy.lowest.items():
        for v in _best(versions, metric, count, highest=False):
            reasons[v.id].append(f"lowest {metric}")
    for metric, count in policy.highest.items():
        for v in _best(versions, metric, count, highest=True):
            reasons[v.id].append(f"highest {metric}")
    for v in versions:
        if v.tags:
            reasons[v.id].append("tagged " + ", ".join(v.tags))
    for vid, why in (pinned or {}).items():
        reasons[vid].extend(why)
    _keep_inputs(versions, reasons, others)
    return [(v, reasons[v.id]) for v in versions]


def _check_metrics(versions: Sequence[Version], metrics: Iterable[str]) -> None:
    recorded = {name for v in versions for name in v.metrics}
    unknown = sorted(set(metrics) - recorded)
    if unknown:
        known = ", ".join(sorted(recorded)) or "none"
        raise InvalidInput(
            f"no version records the metric {', '.join(map(repr, unknown))} "
            f"(metrics recorded: {known})"
        )


def _best(versions: Sequence[Version], metric: str, count: int, highest: bool) -> list[Version]:
    """The ``count`` versions with the lowest (or highest) ``metric``; the newer on a tie."""
    scored = [v for v in versions if metric in v.metrics]
    ranked = sorted(
        scored, key=lambda v: (-v.metrics[metric] if highest else v.metrics[metric], -v.created_ns)
    )
    return ranked[:count]


def _keep_inputs(
    versions: Sequence[Version], reasons: dict[bytes, list[str]], others: Iterable[Version]
) -> None:
    """Keep the versions that a kept version (here or in ``others``) names as an input,
    following inputs of inputs within this repo."""
    by_id = {v.id: v for v in versions}
    todo = [v for v in versions if reasons[v.id]] + list(others)
    while todo:
        user = todo.pop()
        for link in user.inputs:
            source = by_id.get(link.id)
            if source is None or link.repo != source.repo:
                continue
            if not reasons[source.id]:
                todo.append(source)
            why = f"input of {user.ref}"
            if why not in reasons[source.id]:
                reasons[source.id].append(why)


def _span(seconds: float) -> str:
    for unit in ("w", "d", "h", "m"):
        if seconds >= _UNITS[unit] and seconds % _UNITS[unit] == 0:
            return f"{seconds / _UNITS[unit]:g}{unit}"
    return f"{seconds:g}s"
