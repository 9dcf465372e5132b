"""A test analysis for the dashboard tests: the node's block-finder test analysis plus, for studies whose
StudyDescription contains "FLAG", a moderate compression fracture finding at the second block from the
bottom, so that the pages have findings to show and the flagged filter has something to find.

Importing this module registers it (``[models] plugins = ["web_test_analysis"]``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import node_test_analysis

from inference import analyses
from inference.results import (
    Finding,
    FindingKind,
    ScreeningOutcome,
    ScreeningVerdict,
    Severity,
    StudyResult,
)

NAME = "web-test-screening"


class ScreeningTestAnalysis(node_test_analysis.BlockFinderAnalysis):
    """Block finder + a deterministic finding on flagged studies."""

    name = NAME

    def run(self, datasets: Sequence) -> StudyResult:
        result = super().run(datasets)
        result = dataclasses.replace(result, analysis=NAME)
        if "FLAG" not in str(datasets[0].get("StudyDescription", "")).upper():
            return result
        images = []
        for image in result.images:
            named = [v for v in image.vertebrae if v.level]
            if len(named) < 2:
                images.append(image)
                continue
            v = named[-2]
            finding = Finding(FindingKind.VERTEBRAL_COMPRESSION_FRACTURE, Severity.MODERATE, levels=(v.level,),
                              evidence=v.outline, description=f"{v.level}: anterior height loss 30 % (test)",
                              sop_instance_uid=image.source.sop_instance_uids[0])
            images.append(dataclasses.replace(image, findings=(finding,)))
        verdict = ScreeningVerdict(ScreeningOutcome.FINDING_PRESENT, ("new compression fracture (test analysis)",))
        return dataclasses.replace(result, images=tuple(images), verdict=verdict)


analyses.register(NAME, ScreeningTestAnalysis)
