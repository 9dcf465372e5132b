"""`build_outputs`: one analysis result + its source datasets -> the DICOM objects sent back to PACS."""

from __future__ import annotations

import datetime
from collections.abc import Collection, Sequence

from pydicom.dataset import Dataset

from inference.results import StudyResult
from reports.common import (
    EncodedOutput,
    OutputKind,
    OutputOptions,
    Producer,
    SopReference,
    apply_creation_time,
    apply_identity,
    check_one_study,
    encodable_copy,
    image_sources,
    sources_by_uid,
)
from reports.pr import build_pr
from reports.sc import build_sc
from reports.seg import build_seg
from reports.sr import build_sr

__all__ = [
    "EncodedOutput",
    "OutputKind",
    "OutputOptions",
    "Producer",
    "SopReference",
    "build_outputs",
]


def build_outputs(
    result: StudyResult,
    sources: Sequence[Dataset],
    *,
    kinds: Collection[OutputKind] = tuple(OutputKind),
    options: OutputOptions = OutputOptions(),  # noqa: B008 (frozen, so a shared default is safe)
    producer: Producer = Producer(),  # noqa: B008
    predecessor_sr: SopReference | None = None,
    created: datetime.datetime | None = None,
) -> list[EncodedOutput]:
    """Encode `result` as SEG / SR / SC / PR objects placed in the sources' study.

    `sources` are the study's datasets (pixel data needed for the Secondary Capture); those the
    result analysed must be among them.  Raises ``ValueError`` naming the attribute when the
    sources belong to more than one patient or study, or to another study than `result`.
    Objects are returned per image in the order SEG, SC, PR, then the study's SR.  An image with
    nothing to segment or draw gets no SEG / PR; every analysed image gets its SC, and the study its SR
    (also when no image could be analysed: then the SR alone, saying why).  `created` (default: now) is the
    creation moment every object carries (`apply_creation_time`).
    """
    wanted = {OutputKind(k) for k in kinds}
    check_one_study(sources)
    study = str(sources[0].StudyInstanceUID)
    if study != result.study_instance_uid:
        raise ValueError(
            f"StudyInstanceUID of the sources ({study}) differs from the result's ({result.study_instance_uid})"
        )
    originals = sources
    sources = [encodable_copy(ds) for ds in sources]
    by_uid = sources_by_uid(sources)
    images = [(image, image_sources(image, by_uid)) for image in result.images]
    outputs: list[EncodedOutput] = []
    for number, (image, image_datasets) in enumerate(images, start=1):
        refs = tuple(image.source.sop_instance_uids)
        if OutputKind.SEG in wanted:
            # Alone in its series (one per image), so number 1: the same SEG keeps it as the study grows.
            seg = build_seg(result, image, image_datasets, instance_number=1, options=options, producer=producer)
            if seg is not None:
                outputs.append(EncodedOutput(OutputKind.SEG, seg, refs))
        if OutputKind.SC in wanted:
            sc = build_sc(result, image, image_datasets, instance_number=number, producer=producer)
            outputs.append(EncodedOutput(OutputKind.SC, sc, refs))
        if OutputKind.PR in wanted:
            pr = build_pr(result, image, image_datasets, instance_number=number, producer=producer)
            if pr is not None:
                outputs.append(EncodedOutput(OutputKind.PR, pr, refs))
    if OutputKind.SR in wanted:
        # A study whose every image was skipped (multi-frame, colour, unreadable) still gets its report: the
        # verdict "not assessable" with each image's reason, over the images it received.
        sr = build_sr(result, images, producer=producer, predecessor=predecessor_sr, evidence=sources)
        all_refs = tuple(uid for image, _ in images for uid in image.source.sop_instance_uids)
        outputs.append(EncodedOutput(OutputKind.SR, sr, all_refs))
    # The builders saw copies without unparsable dates/times; identity goes out exactly as the source sent it.
    created = created or datetime.datetime.now(datetime.UTC)
    for out in outputs:
        apply_identity(out.dataset, originals[0])
        apply_creation_time(out.dataset, originals[0], created)
    return outputs
