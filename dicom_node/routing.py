"""Routing: which analyses (and destinations) a study's instances go to.  Pure: headers + rules in,
decision out; no I/O, so the same function serves the service, ``dicom-node analyze`` and the tests.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from dicom_node.settings import Match, Rule


@dataclass(frozen=True)
class InstanceHeaders:
    """The attributes routing looks at, for one instance."""

    sop_instance_uid: str
    series_instance_uid: str = ""
    sop_class_uid: str = ""
    modality: str = ""
    body_part_examined: str = ""
    view_position: str = ""
    series_description: str = ""
    study_description: str = ""
    image_type: tuple[str, ...] = ()
    calling_ae: str = ""

    @classmethod
    def from_dataset(cls, ds: Any, calling_ae: str = "") -> InstanceHeaders:
        """Read the routing attributes from a pydicom Dataset (absent attributes are empty)."""

        def text(keyword: str) -> str:
            value = ds.get(keyword, "")
            return "" if value is None else str(value).strip()

        image_type = ds.get("ImageType", ())
        if isinstance(image_type, str):
            image_type = image_type.split("\\")
        return cls(
            sop_instance_uid=text("SOPInstanceUID"),
            series_instance_uid=text("SeriesInstanceUID"),
            sop_class_uid=text("SOPClassUID"),
            modality=text("Modality"),
            body_part_examined=text("BodyPartExamined"),
            view_position=text("ViewPosition"),
            series_description=text("SeriesDescription"),
            study_description=text("StudyDescription"),
            image_type=tuple(str(v).strip() for v in (image_type or ())),
            calling_ae=calling_ae.strip(),
        )

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> InstanceHeaders:
        """Build from a row of the `instances` table."""
        return cls(
            sop_instance_uid=row["sop_instance_uid"],
            series_instance_uid=row.get("series_instance_uid") or "",
            sop_class_uid=row.get("sop_class_uid") or "",
            modality=row.get("modality") or "",
            body_part_examined=row.get("body_part_examined") or "",
            view_position=row.get("view_position") or "",
            series_description=row.get("series_description") or "",
            study_description=row.get("study_description") or "",
            image_type=tuple(v for v in (row.get("image_type") or "").split("\\") if v),
            calling_ae=row.get("calling_ae") or "",
        )


@dataclass(frozen=True)
class RuleMatch:
    """A rule that applies to a study and the instances it selected."""

    rule: Rule
    sop_instance_uids: tuple[str, ...]


@dataclass(frozen=True)
class Routing:
    """The decision for one study."""

    matches: tuple[RuleMatch, ...]
    #: Why no rule applied (empty when some rule did).
    reason: str = ""

    @property
    def routed(self) -> bool:
        """True when at least one rule applies."""
        return bool(self.matches)

    @property
    def complete_on_release(self) -> bool:
        """Every applying rule lets the study be analysed as soon as its association is released.

        A study no rule applies to has nothing to wait for either (it is recorded as unrouted at once).
        """
        return all(m.rule.complete_on == "association-release" for m in self.matches)


@lru_cache(maxsize=256)
def _regex(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.IGNORECASE)


def _one_of(label: str, value: str, allowed: Sequence[str]) -> str | None:
    if not allowed or value.upper() in {a.upper() for a in allowed}:
        return None
    return f"{label} {value or '(absent)'!r} not in {', '.join(allowed)}"


def _search(label: str, value: str, pattern: str | None) -> str | None:
    if pattern is None or _regex(pattern).search(value):
        return None
    return f"{label} {value or '(absent)'!r} does not match /{pattern}/"


def mismatch(match: Match, h: InstanceHeaders) -> str | None:
    """None when `h` satisfies every criterion of `match`, else the first criterion that fails."""
    checks = (
        _one_of("Modality", h.modality, match.modality),
        _one_of("SOPClassUID", h.sop_class_uid, match.sop_class_uid),
        _one_of("calling AE", h.calling_ae, match.calling_ae_title),
        _one_of("ViewPosition", h.view_position, match.view_position),
        _search("BodyPartExamined", h.body_part_examined, match.body_part_examined),
        _search("SeriesDescription", h.series_description, match.series_description),
        _search("StudyDescription", h.study_description, match.study_description),
    )
    for problem in checks:
        if problem:
            return problem
    if match.image_type:
        present = {v.upper() for v in h.image_type}
        missing = [v for v in match.image_type if v.upper() not in present]
        if missing:
            return f"ImageType {'/'.join(h.image_type) or '(absent)'} lacks {', '.join(missing)}"
    return None


def rule_mismatch(rule: Rule, h: InstanceHeaders) -> str | None:
    """None when any of the rule's match tables accepts `h` and none of its exclude tables does, else why."""
    reasons = [mismatch(m, h) for m in rule.match]
    if all(r is not None for r in reasons):
        return reasons[0]
    for k, table in enumerate(rule.exclude):
        if mismatch(table, h) is None:
            return f"left out by exclude[{k}] ({_criteria(table)})"
    return None


def _criteria(match: Match) -> str:
    """The criteria a table sets, as written in the configuration."""
    return ", ".join(f"{k} = {v!r}" for k, v in match.model_dump(exclude_defaults=True).items())


def route(instances: Iterable[InstanceHeaders], rules: Sequence[Rule]) -> Routing:
    """Apply `rules` to a study's instances: each rule selects the instances it accepts."""
    instances = list(instances)
    matches: list[RuleMatch] = []
    reasons: dict[str, str] = {}
    for rule in rules:
        selected = []
        for h in instances:
            problem = rule_mismatch(rule, h)
            if problem is None:
                selected.append(h.sop_instance_uid)
            else:
                reasons.setdefault(rule.name, problem)
        if selected:
            matches.append(RuleMatch(rule, tuple(selected)))
    if matches:
        return Routing(tuple(matches))
    if not instances:
        return Routing((), "no source instances")
    if not rules:
        return Routing((), "no routing rules configured")
    detail = "; ".join(f"{name}: {why}" for name, why in reasons.items())
    return Routing((), f"no rule matched ({detail})")
