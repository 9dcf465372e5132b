"""build_outputs on a lateral DX (MONOCHROME2), an AP CR (MONOCHROME1) and a CT series."""

from __future__ import annotations

import copy
import dataclasses
import datetime
import re
import subprocess
import warnings

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag
from pydicom.uid import JPEG2000Lossless

from inference.results import GenantGrade, ImplantKind, ScreeningOutcome
from reports import OutputKind, OutputOptions, Producer, SopReference, build_outputs, codes, examples, sc
from reports.common import DISCLAIMER, IDENTITY_ATTRIBUTES, SERIES
from reports.seg import segment_specs

CASES = ("lateral-dx", "ap-cr", "ct")

# dciodvfy warnings we accept, and why:
# - "Unrecognized defined term <99SPNAI> ... <Coding Scheme Designator>": dciodvfy only knows the coding
#   schemes of PS3.16 Table 8-1.  99SPNAI is the node's private scheme (PS3.3 8.2: private designators
#   start with "99"), declared in CodingSchemeIdentificationSequence of every object that uses it, for
#   concepts the standard has no code for (spinal rod, interbody cage, vertebral body heights, Genant
#   grades, screening verdicts).
ALLOWED_WARNINGS = (
    re.compile(r"^Warning - Unrecognized defined term <99SPNAI> for value 1 of attribute <Coding Scheme Designator>$"),
)


def _by_kind(outs, kind):
    return [o for o in outs if o.kind is kind]


def _write(tmp_path, outs, prefix):
    paths = []
    for i, out in enumerate(outs):
        path = tmp_path / f"{prefix}_{i}_{out.kind.value}.dcm"
        out.dataset.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------- validity


@pytest.mark.parametrize("case", CASES)
def test_all_four_kinds_are_written(outputs, case):
    kinds = [o.kind for o in outputs[case]]
    assert sorted(k.value for k in kinds) == ["pr", "sc", "seg", "sr"]


@pytest.mark.parametrize("case", CASES)
def test_dciodvfy_reports_no_errors(outputs, case, tmp_path, dciodvfy):
    for path in _write(tmp_path, outputs[case], case):
        errors, warnings = dciodvfy(path)
        assert errors == [], f"{path.name}: {errors}"
        unexpected = [w for w in warnings if not any(p.match(w) for p in ALLOWED_WARNINGS)]
        assert unexpected == [], f"{path.name}: {unexpected}"


@pytest.mark.parametrize("case", CASES)
def test_patient_and_study_identity_copied_exactly(cases, outputs, case, tmp_path):
    source = cases[case].sources[0]
    required = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
                "StudyInstanceUID", "StudyID", "AccessionNumber", "StudyDate", "StudyTime",
                "ReferringPhysicianName", "StudyDescription")
    for path in _write(tmp_path, outputs[case], case):
        ds = pydicom.dcmread(path)
        for keyword in required:
            assert keyword in source, keyword
            assert ds[keyword].value == source[keyword].value, (path.name, keyword)
        for keyword, _ in IDENTITY_ATTRIBUTES:
            if keyword in source:
                assert ds[keyword].value == source[keyword].value, (path.name, keyword)


def _stamped(ds: pydicom.Dataset) -> set[tuple[str, str]]:
    """Every date and time of an output but those it copies from its source (identity, evidence, source
    references), as (keyword, value)."""
    copied = {"StudyDate", "StudyTime", "PatientBirthDate", "PatientBirthTime"}
    return {(e.keyword, str(e.value)) for e in ds.iterall() if e.VR in ("DA", "TM", "DT") and e.keyword not in copied}


@pytest.mark.parametrize("case", CASES)
def test_outputs_are_dated_once_and_keep_the_source_time_zone(cases, outputs, case, tmp_path, dciodvfy):
    """Every object of one analysis carries one creation moment (highdicom's own stamps included). A source that
    states TimezoneOffsetFromUTC has its study date and time in that zone: the outputs copy the offset (it applies
    to the copied study time too) and give every time of theirs in it."""
    moments = set()
    for out in outputs[case]:
        stamps = dict(_stamped(out.dataset))
        moments |= {stamps[k] for k in stamps if k.endswith("Date")}
        moments |= {stamps[k][:8] for k in stamps if k.endswith("DateTime")}
        assert "TimezoneOffsetFromUTC" not in out.dataset  # the source states none: nothing is asserted
        assert "SeriesDate" not in out.dataset  # a series outlives one analysis
    assert len(moments) == 1
    sources = copy.deepcopy(cases[case].sources)
    for ds in sources:
        ds.TimezoneOffsetFromUTC = "-0930"
    before = datetime.datetime.now(datetime.UTC)
    zoned = build_outputs(cases[case].result, sources, created=before)
    for path in _write(tmp_path, zoned, case):
        ds = pydicom.dcmread(path)
        assert ds.TimezoneOffsetFromUTC == "-0930"
        stamps = _stamped(ds)
        dates = {v for k, v in stamps if k.endswith("Date")}
        times = {v for k, v in stamps if k.endswith("Time") and not k.endswith("DateTime")}
        assert dates | times and {v for k, v in stamps if k.endswith("DateTime")} <= {d + t for d in dates for t in times}
        assert len(dates) == len(times) == 1, stamps
        made = datetime.datetime.strptime(dates.pop() + times.pop() + "-0930", "%Y%m%d%H%M%S.%f%z")
        assert made == before, path.name
        assert dciodvfy(path)[0] == [], path.name


@pytest.mark.parametrize(("offset", "written"), [("+0100", "+0100"), ("-0000", "+0000"), ("+1400", "+1400"),
                                                 ("+1459", None), ("-1300", None), ("+0160", None), ("", None),
                                                 ("+01:00", None), ("+0100\\+0200", None)])
def test_only_a_valid_source_time_zone_is_copied(cases, offset, written):
    from reports.common import apply_creation_time

    source, out = copy.deepcopy(cases["lateral-dx"].sources[0]), pydicom.Dataset()
    source.TimezoneOffsetFromUTC = offset
    out.TimezoneOffsetFromUTC = "+0500"  # as a builder might have copied it
    apply_creation_time(out, source, datetime.datetime.now(datetime.UTC))
    assert out.get("TimezoneOffsetFromUTC") == written


def test_every_object_of_one_analysis_shares_its_creation_moment_across_seg_variants(cases):
    """A PACS given binary SEGs and another given label maps: the analysis made both at one moment."""
    from dicom_node.pipeline import build_encoded
    from dicom_node.settings import validate

    settings = validate({"destinations": [
        {"name": "a", "ae_title": "A", "host": "127.0.0.1", "port": 104},
        {"name": "b", "ae_title": "B", "host": "127.0.0.1", "port": 105, "seg_format": "labelmap"}]})
    case = cases["lateral-dx"]
    built = build_encoded(case.result, case.sources, settings.destinations, producer=Producer())
    assert {variant for variant, _ in built} >= {"binary/none", "labelmap/none"}
    assert len({o.dataset.InstanceCreationTime for _, o in built}) == 1


@pytest.mark.parametrize("case", CASES)
def test_each_kind_is_its_own_stable_series(outputs, case):
    for out in outputs[case]:
        style = SERIES[out.kind]
        assert out.dataset.SeriesNumber == style.number
        assert out.dataset.SeriesDescription.startswith(style.description)
    series = {o.kind: o.dataset.SeriesInstanceUID for o in outputs[case]}
    assert len(set(series.values())) == 4


def test_non_ascii_patient_name_survives(tmp_path):
    patient = examples.Patient(name="Müller^Zoë", patient_id="ÄÖ-7")
    case = examples.lateral_dx(seed="umlaut", patient=patient)
    for path in _write(tmp_path, build_outputs(case.result, case.sources, kinds=[OutputKind.SR, OutputKind.PR]), "u"):
        ds = pydicom.dcmread(path)
        assert str(ds.PatientName) == "Müller^Zoë"
        assert ds.PatientID == "ÄÖ-7"


@pytest.mark.parametrize(("charset", "name"), [
    (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう"),
    (["", "ISO 2022 IR 149"], "Hong^Gildong=洪^吉洞=홍^길동"),
    ("GB18030", "Wang^XiaoDong=王^小東"),
])
def test_sources_in_any_character_set_give_all_outputs_in_utf8(cases, tmp_path, charset, name):
    """Japanese and Korean sources (ISO 2022 code extensions, an empty first value) are valid DICOM; highdicom
    refuses some of them when it copies the source's character set, which used to fail the whole study."""
    case = cases["lateral-dx"]
    source = copy.deepcopy(case.sources[0])
    source.SpecificCharacterSet = charset
    source.PatientName = name
    source.save_as(tmp_path / "source.dcm", enforce_file_format=True)
    encoded = pydicom.dcmread(tmp_path / "source.dcm")  # names as the modality's bytes, decoded on access
    outs = build_outputs(case.result, [encoded])
    assert sorted(o.kind.value for o in outs) == ["pr", "sc", "seg", "sr"]
    for path in _write(tmp_path, outs, "cs"):
        ds = pydicom.dcmread(path)
        assert ds.SpecificCharacterSet == "ISO_IR 192"
        assert str(ds.PatientName) == name


# -------------------------------------------------------------------------------------------- UIDs


def test_same_input_gives_same_uids(cases, outputs):
    case = cases["lateral-dx"]
    again = build_outputs(case.result, case.sources)
    first = [(o.kind, o.dataset.SOPInstanceUID, o.dataset.SeriesInstanceUID) for o in outputs["lateral-dx"]]
    assert [(o.kind, o.dataset.SOPInstanceUID, o.dataset.SeriesInstanceUID) for o in again] == first
    uids = [o.dataset.SOPInstanceUID for o in again]
    assert len(set(uids)) == len(uids)
    assert all(u.startswith("2.25.") for u in uids)
    # Every UID inside the objects too (highdicom draws some at random), not only the instances' own.
    first_uids = [sorted(_uids(o.dataset)) for o in outputs["lateral-dx"]]
    assert [sorted(_uids(o.dataset)) for o in again] == first_uids


def _uids(ds) -> set[str]:
    """Every UI value in a dataset, nested sequences included."""
    found: set[str] = set()
    for element in ds.iterall():
        if element.VR == "UI" and element.value:
            found.update(str(v) for v in (element.value if element.VM > 1 else [element.value]))
    return found


def test_new_model_version_gives_new_uids(cases, outputs):
    case = cases["lateral-dx"]
    models = (dataclasses.replace(case.result.models[0], version="9.9.9"), *case.result.models[1:])
    changed = build_outputs(dataclasses.replace(case.result, models=models), case.sources)
    before = {o.dataset.SOPInstanceUID for o in outputs["lateral-dx"]}
    assert before.isdisjoint(o.dataset.SOPInstanceUID for o in changed)


def test_a_corrected_identity_gives_new_objects(cases, outputs):
    """A PACS keeps what it holds under a UID (and an IOCM archive refuses a UID it was told to reject): the
    outputs of a study whose identity the sender corrected (the node counts the corrections) are new objects."""
    case = cases["lateral-dx"]
    first = build_outputs(dataclasses.replace(case.result, identity_epoch=1), case.sources)
    again = build_outputs(dataclasses.replace(case.result, identity_epoch=2), case.sources)
    uids = [{o.dataset.SOPInstanceUID for o in outs} for outs in (outputs["lateral-dx"], first, again)]
    assert all(len(u) == len(outputs["lateral-dx"]) for u in uids)
    assert uids[0].isdisjoint(uids[1]) and uids[1].isdisjoint(uids[2]) and uids[0].isdisjoint(uids[2])
    assert {o.dataset.SeriesInstanceUID for o in first}.isdisjoint(o.dataset.SeriesInstanceUID for o in outputs["lateral-dx"])
    # Never corrected: the UIDs outputs always had.
    assert [o.dataset.SOPInstanceUID for o in build_outputs(dataclasses.replace(case.result, identity_epoch=0),
                                                            case.sources)] == [o.dataset.SOPInstanceUID for o in outputs["lateral-dx"]]


def _two_views(cases):
    """The DX case's study with the CR case's image put into it, as if a second view arrived later."""
    dx, cr = cases["lateral-dx"], cases["ap-cr"]
    cr_ds = copy.deepcopy(cr.sources[0])
    cr_ds.StudyInstanceUID = dx.result.study_instance_uid
    cr_image = dataclasses.replace(cr.result.images[0], source=dataclasses.replace(
        cr.result.images[0].source, study_instance_uid=dx.result.study_instance_uid))
    return dataclasses.replace(dx.result, images=(*dx.result.images, cr_image)), cr_ds


def test_sr_and_sc_uids_follow_the_set_of_analysed_instances_and_the_sr_references_its_predecessor(cases, outputs):
    dx = cases["lateral-dx"]
    both, cr_ds = _two_views(cases)
    first_sr = _by_kind(outputs["lateral-dx"], OutputKind.SR)[0].dataset
    earlier = SopReference(str(first_sr.StudyInstanceUID), str(first_sr.SeriesInstanceUID),
                           str(first_sr.SOPClassUID), str(first_sr.SOPInstanceUID))
    outs = build_outputs(both, [*dx.sources, cr_ds], predecessor_sr=earlier)
    sr = _by_kind(outs, OutputKind.SR)[0].dataset
    assert sr.SOPInstanceUID != first_sr.SOPInstanceUID
    assert sr.SeriesInstanceUID == first_sr.SeriesInstanceUID
    ref = sr.PredecessorDocumentsSequence[0]
    assert ref.StudyInstanceUID == first_sr.StudyInstanceUID
    assert ref.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first_sr.SOPInstanceUID
    # The DX's SEG and PR keep their UIDs: they draw that image's results only. Its SC draws the study's
    # verdict too, which the second view changed, so it is a new object (a PACS may ignore a second store
    # under a known UID and go on showing the stale verdict).
    for kind in (OutputKind.SEG, OutputKind.PR):
        old = _by_kind(outputs["lateral-dx"], kind)[0].dataset.SOPInstanceUID
        assert old in {o.dataset.SOPInstanceUID for o in _by_kind(outs, kind)}
    old_sc = _by_kind(outputs["lateral-dx"], OutputKind.SC)[0].dataset.SOPInstanceUID
    assert old_sc not in {o.dataset.SOPInstanceUID for o in _by_kind(outs, OutputKind.SC)}
    again = build_outputs(both, [*dx.sources, cr_ds], predecessor_sr=earlier)
    assert _by_kind(again, OutputKind.SR)[0].dataset.SOPInstanceUID == sr.SOPInstanceUID



def test_each_view_has_a_seg_series_of_its_own(cases, outputs):
    """OHIF opens a SEG series by its first instance: the second view's SEG must not hide behind the first's."""
    both, cr_ds = _two_views(cases)
    sources = [*cases["lateral-dx"].sources, cr_ds]
    segs = [o.dataset for o in build_outputs(both, sources, kinds=[OutputKind.SEG])]
    assert len(segs) == 2
    assert segs[0].SeriesInstanceUID != segs[1].SeriesInstanceUID
    assert {s.SeriesNumber for s in segs} == {SERIES[OutputKind.SEG].number}
    assert [s.InstanceNumber for s in segs] == [1, 1]  # each alone in its series
    assert [s.SeriesDescription for s in segs] == ["AI Spine SEG, LSPINE LL no. 1", "AI Spine SEG, LSPINE AP no. 1"]
    again = [o.dataset for o in build_outputs(both, sources, kinds=[OutputKind.SEG])]
    assert [(s.SOPInstanceUID, s.SeriesInstanceUID) for s in again] == [(s.SOPInstanceUID, s.SeriesInstanceUID)
                                                                         for s in segs]
    # The lateral's SEG is the one made when it was alone in the study: same object, same series.
    alone = _by_kind(outputs["lateral-dx"], OutputKind.SEG)[0].dataset
    assert (alone.SOPInstanceUID, alone.SeriesInstanceUID) == (segs[0].SOPInstanceUID, segs[0].SeriesInstanceUID)


def test_sr_notes_of_a_two_image_study_name_their_image(cases, tmp_path):
    both, cr_ds = _two_views(cases)
    (sr,) = _by_kind(build_outputs(both, [*cases["lateral-dx"].sources, cr_ds], kinds=[OutputKind.SR]), OutputKind.SR)
    notes = [i.TextValue for i in _walk(sr.dataset.ContentSequence)
             if i.ConceptNameCodeSequence[0].CodeValue == codes.IMAGE_NOTE.value]
    labels = [image.source.label for image in both.images]
    assert len(notes) == sum(len(image.notes) for image in both.images) > 0
    assert all(any(n.startswith(f"{label}: ") for label in labels) for n in notes), notes


@pytest.mark.parametrize("orientation", ["absent", "empty", "not letters"])
def test_a_radiograph_without_patient_orientation_still_gets_every_output(cases, tmp_path, dciodvfy, orientation):
    """PatientOrientation absent (DX without it), empty (CR: Type 2C) or invalid: every object is still written and
    valid, the SC with an empty PatientOrientation (it used to fail the whole study's outputs)."""
    case = cases["ap-cr"]
    source = copy.deepcopy(case.sources[0])
    if orientation == "absent":
        del source.PatientOrientation
    else:
        source.PatientOrientation = None if orientation == "empty" else ["X", "Y"]
    outs = build_outputs(case.result, [source])
    assert sorted(o.kind.value for o in outs) == ["pr", "sc", "seg", "sr"]
    for path in _write(tmp_path, outs, orientation.replace(" ", "-")):
        errors, _ = dciodvfy(path)
        assert errors == [], (path.name, errors)
    sc_ds = _by_kind(outs, OutputKind.SC)[0].dataset
    assert "PatientOrientation" in sc_ds and not sc_ds.PatientOrientation


def test_a_source_without_its_type_2_identity_attributes_gets_every_output_with_them_empty(cases, tmp_path, dciodvfy):
    """A DX without PatientSex or StudyID (Type 2, often left out) failed the study: highdicom reads them."""
    case = cases["ap-cr"]
    source = copy.deepcopy(case.sources[0])
    type_2 = [k for k, type_ in IDENTITY_ATTRIBUTES if type_ == 2 and k not in ("PatientName", "PatientID")]
    for keyword in type_2:
        del source[keyword]
    outs = build_outputs(case.result, [source])
    assert sorted(o.kind.value for o in outs) == ["pr", "sc", "seg", "sr"]
    for path in _write(tmp_path, outs, "type2"):
        errors, _ = dciodvfy(path)
        assert errors == [], (path.name, errors)
        ds = pydicom.dcmread(path)
        assert all(k in ds and ds[k].value in (None, "") for k in type_2)
        assert ds.PatientID == case.sources[0].PatientID


def test_a_voi_lut_given_as_a_list_of_values_reaches_the_presentation_state(cases, tmp_path, dciodvfy):
    """LUTData with VR US (legal, as OW is) is read by pydicom as a list, which highdicom refused when it copied
    the source's VOI LUT into the PR: the study got no outputs. The source itself is left as it came."""
    from pydicom.dataelem import DataElement

    case = cases["ap-cr"]
    source = copy.deepcopy(case.sources[0])
    item = pydicom.Dataset()
    item.LUTDescriptor = [256, 0, 16]
    item.add(DataElement(0x00283006, "US", list(range(0, 65536, 256))))
    source.VOILUTSequence = [item]
    for keyword in ("WindowCenter", "WindowWidth"):
        if keyword in source:
            del source[keyword]
    outs = build_outputs(case.result, [source])
    assert sorted(o.kind.value for o in outs) == ["pr", "sc", "seg", "sr"]
    (path,) = _write(tmp_path, _by_kind(outs, OutputKind.PR), "lut")
    assert dciodvfy(path)[0] == []
    lut = pydicom.dcmread(path).SoftcopyVOILUTSequence[0].VOILUTSequence[0]
    assert np.array_equal(np.frombuffer(lut.LUTData, "<u2"), np.arange(0, 65536, 256))
    assert source.VOILUTSequence[0]["LUTData"].VR == "US" and not isinstance(source.VOILUTSequence[0].LUTData, bytes)

def test_refuses_sources_of_two_studies_or_patients(cases):
    dx, cr = cases["lateral-dx"], cases["ap-cr"]
    with pytest.raises(ValueError, match="StudyInstanceUID"):
        build_outputs(dx.result, [*dx.sources, *cr.sources])
    other = copy.deepcopy(dx.sources[0])
    other.PatientID = "SOMEONE-ELSE"
    with pytest.raises(ValueError, match="PatientID"):
        build_outputs(dx.result, [dx.sources[0], other])
    with pytest.raises(ValueError, match="StudyInstanceUID"):
        build_outputs(dx.result, cr.sources)


def test_missing_source_instance_is_named(cases):
    dx = cases["lateral-dx"]
    other = copy.deepcopy(dx.sources[0])
    other.SOPInstanceUID = "1.2.3.4"
    with pytest.raises(ValueError, match=str(dx.sources[0].SOPInstanceUID)):
        build_outputs(dx.result, [other])


def test_a_result_without_images_gets_a_report_alone_that_says_why(cases, tmp_path, dciodvfy):
    """An RGB or multi-frame radiograph is skipped by the analysis; a study of only such images failed with
    'the result analysed no image' (status: failed, nothing in the PACS). It now gets its SR: the verdict and
    each image's reason, over the instances received."""
    dx = cases["lateral-dx"]
    why = "instance 1.2.3 skipped: SamplesPerPixel 3: only grayscale radiographs are analysed"
    verdict = dataclasses.replace(dx.result.verdict, outcome=ScreeningOutcome.NOT_ASSESSABLE, reasons=(why,))
    empty = dataclasses.replace(dx.result, images=(), verdict=verdict)
    outs = build_outputs(empty, dx.sources)
    assert [o.kind for o in outs] == [OutputKind.SR]
    sr = outs[0].dataset
    texts = [str(getattr(i, "TextValue", "")) for i in _walk(sr.ContentSequence)]
    assert any("SamplesPerPixel 3" in t for t in texts)
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert {r.ReferencedSOPInstanceUID for r in evidence} == {str(ds.SOPInstanceUID) for ds in dx.sources}
    (path,) = _write(tmp_path, outs, "empty")
    errors, _ = dciodvfy(path)
    assert errors == []
    # Another skipped image later: a new report (a PACS keeps the first object stored under a UID).
    more = copy.deepcopy(dx.sources[0])
    more.SOPInstanceUID = "1.2.826.0.1.3680043.2.1125.99"
    (later,) = build_outputs(empty, [*dx.sources, more])
    assert later.dataset.SOPInstanceUID != sr.SOPInstanceUID


# --------------------------------------------------------------------------------------------- SEG


def _dense(masks):
    out = None
    for m in masks:
        d = m.dense()
        out = d if out is None else out | d
    return out


@pytest.mark.parametrize("case", CASES)
def test_seg_round_trips_and_frames_align_with_source_pixels(cases, outputs, case, tmp_path):
    image = cases[case].result.images[0]
    (path,) = _write(tmp_path, _by_kind(outputs[case], OutputKind.SEG), case)
    seg = hd.seg.segread(path)
    specs = segment_specs(image)
    assert seg.number_of_segments == len(specs)
    assert seg.SegmentationType == "BINARY"
    for spec in specs:
        desc = seg.get_segment_description(spec.number)
        assert desc.segment_label == spec.label
        assert desc.segmented_property_type == spec.property_type
        algo = desc.algorithm_identification[0]
        assert algo.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"
        assert algo.AlgorithmName == cases[case].result.analysis
        assert all(m.version in algo.AlgorithmVersion for m in cases[case].result.models)
    uids = list(image.source.sop_instance_uids)
    referenced = [uid for uid in uids if uid in {i[2] for i in seg.get_source_image_uids()}]
    pixels = seg.get_pixels_by_source_instance(referenced, segment_numbers=[s.number for s in specs])
    for s, spec in enumerate(specs):
        expected = _dense(spec.masks)
        if not image.source.is_volume:
            expected = expected[np.newaxis]
        else:
            expected = expected[[uids.index(u) for u in referenced]]
        assert np.array_equal(pixels[..., s].astype(bool), expected), spec.label
    # Empty frames are omitted: one frame per (slice, segment) with pixels.
    if image.source.is_volume:
        n_expected = sum(int(_dense(spec.masks).any(axis=(1, 2)).sum()) for spec in specs)
    else:
        n_expected = len(specs)
    assert seg.NumberOfFrames == n_expected


def test_seg_labels_and_codes_for_vertebrae_and_implants(outputs, tmp_path):
    (path,) = _write(tmp_path, _by_kind(outputs["lateral-dx"], OutputKind.SEG), "dx")
    seg = hd.seg.segread(path)
    labels = [seg.get_segment_description(n).segment_label for n in seg.segment_numbers]
    assert labels == ["L1", "L2", "L3", "L4", "L5", "Sacrum", "Pedicle screws", "Rods"]
    l3 = seg.get_segment_description(3)
    assert l3.segmented_property_type == codes.vertebra_code("L3")
    assert (l3.segmented_property_type.value, l3.segmented_property_type.meaning) == ("36470004", "L3 vertebra")
    assert seg.get_segment_description(6).segmented_property_type.meaning == "Sacrum"
    assert seg.get_segment_description(7).segmented_property_type == codes.implant_code(ImplantKind.PEDICLE_SCREW)
    assert seg.get_segment_description(8).segmented_property_category == codes.PHYSICAL_OBJECT
    assert seg.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == codes.PRIVATE_SCHEME


@pytest.mark.parametrize("case", ("lateral-dx", "ap-cr"))
def test_radiograph_seg_carries_projection_geometry_for_viewers(cases, outputs, case):
    seg = _by_kind(outputs[case], OutputKind.SEG)[0].dataset
    source = cases[case].sources[0]
    assert seg.PatientOrientation == source.PatientOrientation
    assert seg.BodyPartExamined == source.BodyPartExamined
    assert "FrameOfReferenceUID" not in seg
    shared = seg.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    for frame in seg.PerFrameFunctionalGroupsSequence:
        assert [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient] == [0, 0, 0]
        ref = frame.DerivationImageSequence[0].SourceImageSequence[0]
        assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID


def test_ct_seg_uses_the_series_geometry(cases, outputs):
    seg = _by_kind(outputs["ct"], OutputKind.SEG)[0].dataset
    first = cases["ct"].sources[0]
    assert seg.FrameOfReferenceUID == first.FrameOfReferenceUID
    positions = {float(f.PlanePositionSequence[0].ImagePositionPatient[2]) for f in seg.PerFrameFunctionalGroupsSequence}
    source_z = {float(ds.ImagePositionPatient[2]) for ds in cases["ct"].sources}
    assert positions <= source_z


def test_every_seg_encoding_has_its_own_uid(cases):
    """One UID per file the node writes: two destinations wanting the same SEG stored differently get two."""
    c = cases["lateral-dx"]
    combos = [OutputOptions(f, z) for f in ("binary", "labelmap") for z in ("none", "jpeg2000")]
    uids = [build_outputs(c.result, c.sources, kinds=[OutputKind.SEG], options=o)[0].dataset.SOPInstanceUID
            for o in combos]
    assert len(set(uids)) == 4
    again = build_outputs(c.result, c.sources, kinds=[OutputKind.SEG], options=combos[0])[0].dataset.SOPInstanceUID
    assert again == uids[0]


@pytest.mark.parametrize("case", ("lateral-dx", "ct"))
@pytest.mark.parametrize("options", [OutputOptions(seg_format="labelmap"), OutputOptions(seg_compression="jpeg2000"),
                                     OutputOptions(seg_format="labelmap", seg_compression="jpeg2000")])
def test_seg_options_validate_and_round_trip(cases, case, options, tmp_path, dciodvfy):
    c = cases[case]
    (out,) = build_outputs(c.result, c.sources, kinds=[OutputKind.SEG], options=options)
    (path,) = _write(tmp_path, [out], case)
    errors, warnings = dciodvfy(path)
    assert errors == []
    assert all(any(p.match(w) for p in ALLOWED_WARNINGS) for w in warnings), warnings
    seg = hd.seg.segread(path)
    if options.seg_compression == "jpeg2000":
        assert seg.file_meta.TransferSyntaxUID == JPEG2000Lossless
    image = c.result.images[0]
    specs = segment_specs(image)
    uids = list(image.source.sop_instance_uids)
    referenced = [u for u in uids if u in {i[2] for i in seg.get_source_image_uids()}]
    if options.seg_format == "labelmap":
        assert seg.SegmentationType == "LABELMAP"
        assert [item.SegmentNumber for item in seg.SegmentSequence] == [s.number for s in specs]  # no background
        labels = seg.get_pixels_by_source_instance(referenced, combine_segments=True)
        dense = {s.number: _dense(s.masks) for s in specs}
        if image.source.is_volume:
            dense = {n: d[[uids.index(u) for u in referenced]] for n, d in dense.items()}
        else:
            dense = {n: d[np.newaxis] for n, d in dense.items()}
        cover = sum(d.astype(int) for d in dense.values())
        implants = np.zeros(labels.shape, bool)
        for s in specs:
            if s.category == codes.PHYSICAL_OBJECT:
                implants |= dense[s.number]
        assert np.array_equal(labels > 0, cover > 0)
        for s in specs:
            only = dense[s.number] & (cover == 1)
            assert np.all(labels[only] == s.number)  # where one segment lies, it is that segment
            assert (labels == s.number).any(), s.label  # none painted out
            if s.category != codes.PHYSICAL_OBJECT:
                assert not np.any(np.isin(labels[implants], [s.number]))  # implants over anatomy
    else:
        pixels = seg.get_pixels_by_source_instance(referenced, segment_numbers=[s.number for s in specs])
        assert pixels.any()
    default = build_outputs(c.result, c.sources, kinds=[OutputKind.SEG])[0].dataset
    # Another SOP class, or another transfer syntax: another instance. The same instance in two transfer
    # syntaxes would be legal DICOM, but the node keeps one file per UID (see reports.seg.seg_variant).
    assert out.dataset.SOPInstanceUID != default.SOPInstanceUID


def test_labelmap_keeps_a_segment_lying_inside_another(cases, tmp_path):
    """A screw inside a larger "other implant" region stays visible in a LABELMAP SEG (it used to be painted
    over by the segment listed after it and declared with no pixel)."""
    from scipy import ndimage

    from inference.results import RegionMask

    case = cases["ap-cr"]
    image = case.result.images[0]
    screw = next(i for i in image.implants if i.kind is ImplantKind.PEDICLE_SCREW)
    around = RegionMask.from_dense(ndimage.binary_dilation(screw.mask.dense(), iterations=6))
    other = dataclasses.replace(screw, kind=ImplantKind.OTHER, mask=around, complications=(), assessed=())
    result = dataclasses.replace(case.result, images=(dataclasses.replace(image, implants=(*image.implants, other)),))
    (out,) = build_outputs(result, case.sources, kinds=[OutputKind.SEG], options=OutputOptions(seg_format="labelmap"))
    (path,) = _write(tmp_path, [out], "inside")
    seg = hd.seg.segread(path)
    labels = seg.get_pixels_by_source_instance(list(image.source.sop_instance_uids), combine_segments=True)
    numbers = {item.SegmentLabel: item.SegmentNumber for item in seg.SegmentSequence}
    assert set(np.unique(labels)) - {0} == set(numbers.values())
    on_screw = labels[0][screw.mask.dense()]
    assert not np.any(on_screw == numbers["Other implants"])  # the region around it does not cover it
    assert np.mean(on_screw == numbers["Pedicle screws"]) > 0.5  # (a rod crossing its head may)


# ---------------------------------------------------------------------------------------------- SR


def _walk(items):
    for item in items:
        yield item
        yield from _walk(item.get("ContentSequence", []))


@pytest.mark.parametrize("case", CASES)
def test_sr_round_trips_as_tid1500_with_coordinates_inside_the_image(cases, outputs, case, tmp_path):
    (path,) = _write(tmp_path, _by_kind(outputs[case], OutputKind.SR), case)
    sr = hd.sr.srread(path)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    report = hd.sr.MeasurementReport.from_sequence([sr])
    groups = report.get_planar_roi_measurement_groups()
    image = cases[case].result.images[0]
    tracking = [g.tracking_identifier for g in groups]
    for vertebra in image.vertebrae:
        assert (vertebra.level if vertebra.level != "S1" else "Sacrum") in tracking
    sizes = {str(ds.SOPInstanceUID): (int(ds.Columns), int(ds.Rows)) for ds in cases[case].sources}
    n_scoord = 0
    for item in _walk(sr.ContentSequence):
        if item.ValueType != "SCOORD":
            continue
        n_scoord += 1
        ref = item.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        cols, rows = sizes[ref]
        data = np.asarray(item.GraphicData, dtype=float).reshape(-1, 2)
        assert (data[:, 0] >= 0).all() and (data[:, 0] <= cols).all(), item.GraphicType
        assert (data[:, 1] >= 0).all() and (data[:, 1] <= rows).all(), item.GraphicType
        if item.GraphicType == "POLYLINE" and item.ConceptNameCodeSequence[0].CodeValue == "111030":
            assert np.array_equal(data[0], data[-1]), "region outlines are closed"
    assert n_scoord >= 2 * len(image.vertebrae)


def test_sr_vertebra_group_content(cases, outputs, tmp_path):
    (path,) = _write(tmp_path, _by_kind(outputs["lateral-dx"], OutputKind.SR), "dx")
    report = hd.sr.MeasurementReport.from_sequence([hd.sr.srread(path)])
    l1 = report.get_planar_roi_measurement_groups(finding_type=codes.VERTEBRA, finding_site=codes.vertebra_code("L1"))
    assert len(l1) == 1
    group = l1[0]
    assert group.tracking_identifier == "L1"
    assert group.finding_type == codes.VERTEBRA
    assert group.roi.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
    expected = cases["lateral-dx"].result.images[0].vertebrae[0]
    heights = {m.name.meaning: m.value for m in group.get_measurements()}
    assert heights["Anterior vertebral body height"] == pytest.approx(expected.heights.anterior.value_mm, abs=0.01)
    assert heights["Posterior vertebral body height"] == pytest.approx(expected.heights.posterior.value_mm, abs=0.01)
    assert heights["Vertebral body height loss"] == pytest.approx(expected.fracture.height_loss_pct, abs=0.05)
    evaluations = {e.name.meaning: e.value for e in group.get_qualitative_evaluations()}
    assert evaluations["Genant fracture grade"] == codes.genant_code(GenantGrade.MODERATE)
    assert evaluations["Fracture morphology"].meaning == "Wedge deformity"
    centres = [i for i in group[0].ContentSequence if i.ValueType == "SCOORD" and i.GraphicType == "POINT"]
    assert len(centres) == 1
    assert np.allclose(np.asarray(centres[0].GraphicData, float), expected.centroid, atol=1e-3)
    names = [i.TextValue for i in group[0].ContentSequence if i.ConceptNameCodeSequence[0].CodeMeaning == "Algorithm Name"]
    assert names == ["spine-xr"]


def test_sr_implant_groups_and_study_evaluations(cases, outputs, tmp_path):
    (path,) = _write(tmp_path, _by_kind(outputs["ap-cr"], OutputKind.SR), "cr")
    sr = hd.sr.srread(path)
    report = hd.sr.MeasurementReport.from_sequence([sr])
    screws = report.get_planar_roi_measurement_groups(finding_type=codes.implant_code(ImplantKind.PEDICLE_SCREW))
    assert len(screws) == 4
    loose = [g for g in screws if g.tracking_identifier == "pedicle screw L4 left"]
    assert len(loose) == 1
    (evaluation,) = [e for e in loose[0].get_qualitative_evaluations() if e.name == codes.COMPLICATIONS]
    assert evaluation.value.meaning == "Screw loosening"
    site = loose[0].finding_sites[0]
    assert site.value == codes.vertebra_code("L4")
    assert site.laterality == codes.laterality_code(cases["ap-cr"].result.images[0].implants[3].side)
    study = next(i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "C0034375")
    values = {i.ConceptNameCodeSequence[0].CodeMeaning: i for i in study.ContentSequence}
    assert values["Overall Assessment"].ConceptCodeSequence[0].CodeMeaning == "Finding present"
    assert values["Implant finding"].ConceptCodeSequence[0].CodeMeaning == "Possible hardware complication"
    assert "4 pedicle screws" in values["Instrumentation"].TextValue
    device = [i for i in _walk(sr.ContentSequence) if i.ConceptNameCodeSequence[0].CodeMeaning == "Device Observer Name"]
    assert device and device[0].TextValue == Producer().model_name
    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.CompletionFlag == "COMPLETE"



def test_sr_numbers_implants_of_one_name_from_the_top_down(cases, tmp_path):
    case = cases["ap-cr"]
    image = case.result.images[0]
    unnamed = tuple(dataclasses.replace(i, levels=()) for i in reversed(image.implants))  # levels unknown
    result = dataclasses.replace(case.result, images=(dataclasses.replace(image, implants=unnamed),))
    (sr_out,) = [o for o in build_outputs(result, case.sources) if o.kind is OutputKind.SR]
    (path,) = _write(tmp_path, [sr_out], "numbered")
    report = hd.sr.MeasurementReport.from_sequence([hd.sr.srread(path)])
    screws = report.get_planar_roi_measurement_groups(finding_type=codes.implant_code(ImplantKind.PEDICLE_SCREW))
    by_name: dict[str, list[tuple[int, float]]] = {}
    for group in screws:
        name, _, number = group.tracking_identifier.partition(" (")
        y = float(np.asarray(group.roi.value).reshape(-1, 2)[:, 1].mean())
        by_name.setdefault(name, []).append((int(number.rstrip(")") or 1), y))
    assert any(len(v) > 1 for v in by_name.values())
    for numbered in by_name.values():
        ys = [y for _, y in sorted(numbered)]
        assert ys == sorted(ys), numbered


def test_sr_says_no_complications_only_where_failure_modes_were_looked_for(cases, tmp_path):
    """A model with every failure mode switched off must not clear its implants in the SR: their groups carry no
    Complications item; the implants whose modes were assessed keep "No complications"."""
    case = cases["ap-cr"]
    image = case.result.images[0]
    unchecked = tuple(dataclasses.replace(i, complications=(), assessed=()) for i in image.implants)
    result = dataclasses.replace(case.result, images=(dataclasses.replace(image, implants=unchecked),))
    (path,) = _write(tmp_path, _by_kind(build_outputs(result, case.sources), OutputKind.SR), "unchecked")
    report = hd.sr.MeasurementReport.from_sequence([hd.sr.srread(path)])
    groups = [g for kind in ImplantKind
              for g in report.get_planar_roi_measurement_groups(finding_type=codes.implant_code(kind))]
    assert len(groups) == len(unchecked) > 0
    assert all(e.name != codes.COMPLICATIONS for g in groups for e in g.get_qualitative_evaluations())

    (path,) = _write(tmp_path, _by_kind(build_outputs(case.result, case.sources), OutputKind.SR), "checked")
    report = hd.sr.MeasurementReport.from_sequence([hd.sr.srread(path)])
    values = [e.value.meaning for kind in ImplantKind
              for g in report.get_planar_roi_measurement_groups(finding_type=codes.implant_code(kind))
              for e in g.get_qualitative_evaluations() if e.name == codes.COMPLICATIONS]
    assert "No complications" in values and "Screw loosening" in values

def test_sr_reads_well_as_plain_text(outputs, tmp_path):
    (path,) = _write(tmp_path, _by_kind(outputs["lateral-dx"], OutputKind.SR), "dx")
    text = subprocess.run(["dsrdump", "+Pn", str(path)], capture_output=True, text=True, check=True).stdout
    for expected in ('(,,"Imaging Measurement Report")', '(,,"Tracking Identifier")="L1"',
                     '(,,"Finding Site")=(66794005,SCT,"L1 vertebra")', '(,,"Anterior vertebral body height")="16.94" (mm',
                     '(,,"Genant fracture grade")=(GENANT-2,99SPNAI,"Grade 2: moderate',
                     '(,,"Fracture morphology")=(VCF-WEDGE,99SPNAI,"Wedge deformity")',
                     '(,,"Overall Assessment")=(SCR-POS,99SPNAI,"Finding present")',
                     '(,,"Instrumentation")="posterior instrumentation', '(,,"Device Observer Name")="spine-pacs-ai-node"',
                     '(,,"Algorithm Family")=(123110,DCM,"Artificial Intelligence")', '(,,"Center")=(POINT,'):
        assert expected in text, expected
    assert "invalid" not in text.lower()


# ---------------------------------------------------------------------------------------------- SC


@pytest.mark.parametrize("case", CASES)
def test_sc_is_rgb_burned_in_and_references_its_source(cases, outputs, case):
    sc = _by_kind(outputs[case], OutputKind.SC)[0].dataset
    assert sc.PhotometricInterpretation == "RGB"
    assert sc.SamplesPerPixel == 3
    assert sc.BurnedInAnnotation == "YES" and sc.ConversionType == "WSD"
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID in {str(d.SOPInstanceUID) for d in cases[case].sources}


# ---------------------------------------------------------------------------------------------- PR


@pytest.mark.parametrize("case", CASES)
def test_pr_round_trips_with_the_same_graphics(cases, outputs, case, tmp_path):
    (path,) = _write(tmp_path, _by_kind(outputs[case], OutputKind.PR), case)
    pr = pydicom.dcmread(path)
    assert pr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.11.1"
    source = cases[case].sources[0]
    expected_shape = "INVERSE" if source.PhotometricInterpretation == "MONOCHROME1" else "IDENTITY"
    assert pr.PresentationLUTShape == expected_shape
    voi = pr.SoftcopyVOILUTSequence[0]
    assert float(voi.WindowCenter) == float(source.WindowCenter)
    sizes = {str(ds.SOPInstanceUID): (int(ds.Columns), int(ds.Rows)) for ds in cases[case].sources}
    n_objects = 0
    texts = []
    for annotation in pr.GraphicAnnotationSequence:
        ref = annotation.ReferencedImageSequence[0].ReferencedSOPInstanceUID
        cols, rows = sizes[ref]
        for obj in annotation.get("GraphicObjectSequence", []):
            data = np.asarray(obj.GraphicData, float).reshape(-1, 2)
            assert (data >= 0).all() and (data[:, 0] <= cols).all() and (data[:, 1] <= rows).all()
            n_objects += 1
        texts += [t.UnformattedTextValue for t in annotation.get("TextObjectSequence", [])]
    image = cases[case].result.images[0]
    assert n_objects >= len(image.vertebrae) + len(image.implants)
    for vertebra in image.vertebrae:
        level = "S" if vertebra.level == "S1" else vertebra.level
        assert any(t == level or t.startswith(f"{level}:") for t in texts), (level, texts)
    assert {layer.GraphicLayer for layer in pr.GraphicLayerSequence} >= {
        a.GraphicLayer for a in pr.GraphicAnnotationSequence}
    # What the SC's banner and panel say, on top: outlines and "?3" labels alone would read as a finding.
    verdict = cases[case].result.verdict
    assert DISCLAIMER.replace("—", "-") in texts and verdict.outcome.value.upper() in texts
    if verdict.hardware is not None:
        assert any(t.startswith(f"Hardware: {verdict.hardware.value}") for t in texts)
    top = max(pr.GraphicLayerSequence, key=lambda layer: layer.GraphicLayerOrder)
    assert top.GraphicLayer == "RESULT"


@pytest.mark.parametrize("case", CASES)
def test_pr_passes_dcmtk_presentation_state_check(outputs, case, tmp_path):
    """dcmpschk checks a GSPS the way dcmtk's presentation-state engine would apply it."""
    (path,) = _write(tmp_path, _by_kind(outputs[case], OutputKind.PR), case)
    run = subprocess.run(["dcmpschk", str(path)], capture_output=True, text=True, timeout=60)
    assert "Test passed" in run.stdout + run.stderr, run.stdout + run.stderr


def test_outcome_enum_covers_verdicts():
    assert {codes.outcome_code(o).meaning for o in ScreeningOutcome} == {"No finding", "Finding present", "Not assessable"}


# ------------------------------------------------------------------------------------- edge cases


def test_unknown_levels_are_numbered_not_guessed(cases, tmp_path, dciodvfy):
    case = cases["lateral-dx"]
    image = case.result.images[0]
    # The model could not name L2 and L3 (e.g. no sacrum in the field of view).
    unnamed = tuple(dataclasses.replace(v, level=None) if v.level in ("L2", "L3") else v for v in image.vertebrae)
    result = dataclasses.replace(case.result, images=(dataclasses.replace(image, vertebrae=unnamed),))
    outs = build_outputs(result, case.sources)
    paths = _write(tmp_path, outs, "unknown")
    for path in paths:
        assert dciodvfy(path)[0] == []
    seg = hd.seg.segread(next(p for p in paths if p.name.endswith("_seg.dcm")))
    labels = [seg.get_segment_description(n).segment_label for n in seg.segment_numbers]
    assert labels[:6] == ["L1", "L4", "L5", "Sacrum", "vertebra 1 (level unknown)", "vertebra 2 (level unknown)"]
    assert seg.get_segment_description(5).segmented_property_type == codes.VERTEBRA
    report = hd.sr.MeasurementReport.from_sequence([hd.sr.srread(next(p for p in paths if p.name.endswith("_sr.dcm")))])
    unknown = [g for g in report.get_planar_roi_measurement_groups()
               if g.tracking_identifier == "vertebra 1 (level unknown)"]
    # No finding site but the finding itself: OHIF labelled every unnamed outline with a generic "Spine" site.
    assert len(unknown) == 1 and unknown[0].finding_sites == [] and unknown[0].finding_type == codes.VERTEBRA
    rendering = sc.render(result, result.images[0], case.sources)
    assert rendering.find("?1").box[1] < rendering.find("?2").box[1], "numbered top to bottom"


def test_nothing_found_still_reports(cases, tmp_path, dciodvfy):
    """No vertebra, no implant (e.g. a chest film routed by mistake): SR and SC say so; no SEG or PR."""
    case = cases["ap-cr"]
    image = dataclasses.replace(case.result.images[0], vertebrae=(), implants=(), findings=(), measurements=(),
                                notes=("no vertebra found",))
    verdict = dataclasses.replace(case.result.verdict, outcome=ScreeningOutcome.NOT_ASSESSABLE,
                                  reasons=("no vertebra found",), hardware=None, instrumentation="")
    result = dataclasses.replace(case.result, images=(image,), verdict=verdict)
    outs = build_outputs(result, case.sources)
    assert sorted(o.kind.value for o in outs) == ["sc", "sr"]
    for path in _write(tmp_path, outs, "empty"):
        assert dciodvfy(path)[0] == []
    sr = next(o.dataset for o in outs if o.kind is OutputKind.SR)
    study = next(i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "C0034375")
    assert study.ContentSequence[0].ConceptCodeSequence[0].CodeMeaning == "Not assessable"


def test_zero_height_loss_is_not_written(outputs):
    sr = _by_kind(outputs["lateral-dx"], OutputKind.SR)[0].dataset
    losses = [float(i.MeasuredValueSequence[0].NumericValue) for i in _walk(sr.ContentSequence)
              if i.ValueType == "NUM" and i.ConceptNameCodeSequence[0].CodeMeaning == "Vertebral body height loss"]
    assert losses == [38.0, 38.0]  # in L1's group, and as the study's named measurement


def test_sagittal_series_gets_its_own_orientation(tmp_path, dciodvfy):
    """A sagittal series (as most spine MR is acquired) is shown slice-wise, not reformatted."""
    case = examples.ct(seed="sagittal", slices=16, size=64)
    sources = []
    for k, ds in enumerate(case.sources):
        ds = copy.deepcopy(ds)
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # rows run posterior, columns run to the feet
        ds.ImagePositionPatient = [round(-20 + 2.5 * k, 3), 0.0, 100.0]
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        sources.append(ds)
    outs = build_outputs(case.result, sources)
    for path in _write(tmp_path, outs, "sag"):
        assert dciodvfy(path)[0] == [], path.name
    sc_ds = _by_kind(outs, OutputKind.SC)[0].dataset
    assert list(sc_ds.PatientOrientation) == ["P", "F"]
    assert len(sc_ds.SourceImageSequence) == 1
    seg = _by_kind(outs, OutputKind.SEG)[0].dataset
    assert [float(v) for v in seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
            .ImageOrientationPatient] == [0, 1, 0, 0, 0, -1]


def test_malformed_source_dates_are_copied_verbatim_not_fatal(cases):
    """Modalities send e.g. PatientBirthDate "31.12.1960"; outputs still go out, carrying the value as sent."""
    case = cases["lateral-dx"]
    sources = [copy.deepcopy(ds) for ds in case.sources]
    for ds in sources:
        ds.PatientBirthDate = "31.12.1960"
        ds.StudyTime = "10:15"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outputs = build_outputs(case.result, sources)
    assert {o.kind for o in outputs} == set(OutputKind)
    for out in outputs:
        assert out.dataset.PatientBirthDate == "31.12.1960"
        assert out.dataset.StudyTime == "10:15"
    assert case.sources[0].PatientBirthDate != "31.12.1960"  # the caller's datasets are untouched


def test_private_codes_are_valid_and_each_value_means_one_thing():
    meanings: dict[str, set[str]] = {}
    for code in codes.all_private_codes():
        meanings.setdefault(code.value, set()).add(code.meaning)
        assert 0 < len(code.value) <= 16 and code.value.isascii()  # CodeValue is SH
        assert 0 < len(code.meaning) <= 64  # CodeMeaning is LO
    assert len(meanings) >= 10
    assert all(len(m) == 1 for m in meanings.values()), {v: m for v, m in meanings.items() if len(m) > 1}


def test_one_patient_check_tells_patients_apart_but_not_spellings_of_one():
    from pydicom.dataset import Dataset

    from reports.common import check_one_study

    def source(**kw):
        ds = Dataset()
        ds.StudyInstanceUID, ds.PatientID, ds.PatientName = "1.2.3", "P1", "DOE^JOHN"
        ds.PatientBirthDate, ds.PatientSex = "19600101", "M"
        for k, v in kw.items():
            setattr(ds, k, v)
        return ds

    check_one_study([source(), source(PatientName="DOE^JOHN^^^"), source(PatientSex=""), source(PatientBirthDate="")])
    for change in ({"PatientID": "P2"}, {"PatientName": "DOE^JANE"}, {"PatientSex": "F"},
                   {"PatientBirthDate": "19610101"}, {"StudyInstanceUID": "1.2.4"}):
        first, other = source(SOPInstanceUID="9.1"), source(SOPInstanceUID="9.2", **change)
        with pytest.raises(ValueError, match=f"sources disagree on {next(iter(change))}") as raised:
            check_one_study([first, source(SOPInstanceUID="9.3", PatientSex=""), other])
        assert "instances 9.1 and 9.2" in str(raised.value)
        # Patient data stays out of the message (it reaches logs and status, and redaction keeps numbers).
        assert not any(str(v) in str(raised.value) for v in ("P1", "P2", "DOE", "19600101", "19610101"))


def test_sr_lists_its_images_in_an_image_library(cases, outputs):
    """TID 1500 row 5: every analysed image is in the Image Library (dcmtk's TID 1500 check wants it)."""
    sr = _by_kind(outputs["lateral-dx"], OutputKind.SR)[0].dataset
    library = [i for i in _walk(sr.ContentSequence) if i.ConceptNameCodeSequence[0].CodeValue == "111028"]
    assert len(library) == 1
    listed = {r.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for r in _walk(library[0].ContentSequence)
              if r.ValueType == "IMAGE"}
    assert listed == {str(ds.SOPInstanceUID) for ds in cases["lateral-dx"].sources}


def test_a_report_is_never_its_own_predecessor(cases, outputs):
    first = _by_kind(outputs["lateral-dx"], OutputKind.SR)[0].dataset
    same = SopReference(str(first.StudyInstanceUID), str(first.SeriesInstanceUID), str(first.SOPClassUID),
                        str(first.SOPInstanceUID))
    case = cases["lateral-dx"]
    (again,) = _by_kind(build_outputs(case.result, case.sources, kinds=[OutputKind.SR], predecessor_sr=same), OutputKind.SR)
    assert again.dataset.SOPInstanceUID == first.SOPInstanceUID
    assert "PredecessorDocumentsSequence" not in again.dataset


def test_sc_of_a_lossy_source_says_lossy(cases):
    case = cases["lateral-dx"]
    source = copy.deepcopy(case.sources[0])
    source.LossyImageCompression = "01"
    source.LossyImageCompressionRatio = 10
    source.LossyImageCompressionMethod = "ISO_10918_1"
    (out,) = _by_kind(build_outputs(case.result, [source], kinds=[OutputKind.SC]), OutputKind.SC)
    assert out.dataset.LossyImageCompression == "01"
    assert out.dataset.LossyImageCompressionMethod == "ISO_10918_1"
    (plain,) = _by_kind(build_outputs(case.result, case.sources, kinds=[OutputKind.SC]), OutputKind.SC)
    assert plain.dataset.LossyImageCompression == "00"
    # Received as JPEG baseline without saying so in its header: lossy all the same.
    unflagged = copy.deepcopy(case.sources[0])
    unflagged.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.50"
    (out,) = _by_kind(build_outputs(case.result, [unflagged], kinds=[OutputKind.SC]), OutputKind.SC)
    assert out.dataset.LossyImageCompression == "01"


def test_seg_segment_and_sr_group_of_a_vertebra_share_a_tracking_uid(outputs):
    seg = _by_kind(outputs["lateral-dx"], OutputKind.SEG)[0].dataset
    sr = _by_kind(outputs["lateral-dx"], OutputKind.SR)[0].dataset
    segments = {s.TrackingID: s.TrackingUID for s in seg.SegmentSequence if "TrackingID" in s}
    groups = {}
    for group in _walk(sr.ContentSequence):
        items = {i.ConceptNameCodeSequence[0].CodeMeaning: i for i in group.get("ContentSequence", [])}
        if "Tracking Identifier" in items and "Tracking Unique Identifier" in items:
            groups[items["Tracking Identifier"].TextValue] = items["Tracking Unique Identifier"].UID
    vertebrae = [label for label in segments if label in ("L1", "L2", "L3", "L4", "L5")]
    assert vertebrae, segments
    for label in vertebrae:
        assert segments[label] == groups[label], label


def _lut_item(bits: int) -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.LUTDescriptor = [4096, 0, bits]
    item.LUTData = [int(v) for v in np.linspace(0, 2**bits - 1, 4096)]
    return item


def _header_oddity(source: pydicom.Dataset, oddity: str) -> None:
    if oddity == "VOI LUT and window":
        source.VOILUTSequence = pydicom.Sequence([_lut_item(16)])
        source.WindowCenter, source.WindowWidth = 2000, 4000
    elif oddity == "12-bit VOI LUT":
        source.VOILUTSequence = pydicom.Sequence([_lut_item(12)])
        for keyword in ("WindowCenter", "WindowWidth"):
            if keyword in source:
                delattr(source, keyword)
    elif oddity == "window width 0":
        source.WindowCenter, source.WindowWidth = 2000, 0
    elif oddity == "window centre not a number":
        source[0x00281050] = RawDataElement(Tag(0x00281050), "DS", 4, b"abc ", 0, True, True)
        source.WindowWidth = 4000
    elif oddity == "institution over 64 characters":
        source.InstitutionName = "Universitätsklinikum " * 5
    elif oddity == "spacing with one value":
        source.ImagerPixelSpacing = "0.25"
    elif oddity == "spacing not numbers":
        source[0x00181164] = RawDataElement(Tag(0x00181164), "DS", 8, b"0.25\\abc", 0, True, True)
    elif oddity == "negative spacing":
        source.ImagerPixelSpacing = [-0.25, 0.25]
    elif oddity == "lower-case body part":
        source.BodyPartExamined = "lspine"
    elif oddity == "body part outside the code string repertoire":
        source.BodyPartExamined = "L-SPINE"
    elif oddity == "no body part":
        del source.BodyPartExamined
    elif oddity == "two body parts":
        source.BodyPartExamined = ["LSPINE", "PELVIS"]
    elif oddity == "VOI LUT descriptor of two values":
        item = _lut_item(12)
        item.LUTDescriptor = [4096, 0]
        source.VOILUTSequence = pydicom.Sequence([item])


@pytest.mark.parametrize("oddity", ["VOI LUT and window", "12-bit VOI LUT", "window width 0", "window centre not a number",
                                    "institution over 64 characters", "spacing with one value", "spacing not numbers",
                                    "negative spacing", "lower-case body part", "body part outside the code string repertoire",
                                    "no body part", "two body parts", "VOI LUT descriptor of two values"])
def test_one_odd_header_value_costs_no_output(cases, oddity, tmp_path, dciodvfy):
    """A valid or merely sloppy header (seen from modalities) must not fail the study's outputs: the value is
    left out or made valid, and every object still passes dciodvfy."""
    case = cases["lateral-dx"]
    source = copy.deepcopy(case.sources[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _header_oddity(source, oddity)
        outs = build_outputs(case.result, [source])
    assert sorted(o.kind.value for o in outs) == ["pr", "sc", "seg", "sr"]
    for path in _write(tmp_path, outs, "odd"):
        errors, _ = dciodvfy(path)
        assert errors == [], f"{path.name}: {errors}"
    if oddity == "12-bit VOI LUT":
        (pr,) = _by_kind(outs, OutputKind.PR)
        lut = pr.dataset.SoftcopyVOILUTSequence[0].VOILUTSequence[0]
        assert lut.LUTDescriptor[2] == 16 and np.frombuffer(lut.LUTData, "<u2").max() == 65535  # scaled, not left at 4095
