"""Routing rules on DICOM attributes (pure)."""

from __future__ import annotations

from dicom_node.routing import InstanceHeaders, mismatch, route
from dicom_node.settings import Match, Rule, load, validate


def h(uid: str = "1", **kw) -> InstanceHeaders:
    return InstanceHeaders(sop_instance_uid=uid, **kw)


def test_default_rule_selects_spine_radiographs_by_body_part_or_description() -> None:
    rules = load(env={}).rules
    assert route([h(modality="DX", body_part_examined="LSPINE")], rules).routed
    assert route([h(modality="CR", body_part_examined="", series_description="LWS ap/seitl.")], rules).routed
    assert route([h(modality="DX", study_description="XR Lumbar Spine 2 views")], rules).routed
    ct = route([h(modality="CT", body_part_examined="LSPINE")], rules)
    assert not ct.routed and "Modality 'CT' not in DX, CR" in ct.reason
    chest = route([h(modality="DX", body_part_examined="CHEST")], rules)
    assert not chest.routed and "BodyPartExamined 'CHEST'" in chest.reason


def test_default_rule_leaves_out_the_cervical_spine_the_models_never_saw() -> None:
    rules = load(env={}).rules
    for headers in (dict(body_part_examined="CSPINE"), dict(body_part_examined="C-SPINE"), dict(body_part_examined="CTSPINE"),
                    dict(body_part_examined="C_SPINE"), dict(series_description="HWS ap/seitl."),
                    dict(series_description="C-Spine LAT"), dict(study_description="XR cervical spine 3 views"),
                    dict(study_description="Halswirbelsäule"),
                    # One table selects it, another attribute says cervical: the exclusion wins.
                    dict(body_part_examined="SPINE", series_description="HWS 2 Eb."),
                    dict(body_part_examined="SPINE", study_description="Cervicothoracic spine"),
                    # Not a spine film at all.
                    dict(body_part_examined="THORAX"), dict(body_part_examined="CHEST")):
        routing = route([h(modality="DX", **headers)], rules)
        assert not routing.routed, headers
    excluded = route([h(modality="DX", body_part_examined="SPINE", series_description="HWS 2 Eb.")], rules)
    assert "left out by exclude[1]" in excluded.reason, excluded.reason
    for headers in (dict(body_part_examined="TLSPINE"), dict(body_part_examined="L-SPINE"), dict(body_part_examined="SPINE"),
                    dict(body_part_examined="COCCYX"), dict(series_description="Thoracic spine AP"),
                    dict(series_description="BWS+LWS"), dict(study_description="Wirbelsäule ganz stehend"),
                    dict(study_description="rachis lombaire"), dict(study_description="Rachide lombare"),
                    dict(study_description="Columna lumbar 2 proy."), dict(study_description="Colonne lombaire"),
                    dict(study_description="Postop spinal fusion"), dict(study_description="Scoliosis series")):
        assert route([h(modality="DX", **headers)], rules).routed, headers


def test_rule_selects_only_matching_instances_and_completion_policy() -> None:
    rules = validate({"rules": [
        {"name": "xr", "analyses": ["a"], "complete_on": "association-release",
         "match": [{"modality": ["DX"], "view_position": ["LL", "LAT"], "image_type": ["ORIGINAL"]}]},
        {"name": "ct", "analyses": ["b"], "match": [{"modality": ["CT"], "sop_class_uid": ["1.2.840.10008.5.1.4.1.1.2"]}]},
    ]}).rules
    instances = [
        h("1", modality="DX", view_position="LL", image_type=("ORIGINAL", "PRIMARY")),
        h("2", modality="DX", view_position="AP", image_type=("ORIGINAL",)),
        h("3", modality="DX", view_position="LL", image_type=("DERIVED",)),
    ]
    r = route(instances, rules)
    assert [(m.rule.name, m.sop_instance_uids) for m in r.matches] == [("xr", ("1",))]
    assert r.complete_on_release
    both = route([*instances, h("4", modality="CT", sop_class_uid="1.2.840.10008.5.1.4.1.1.2")], rules)
    assert [m.rule.name for m in both.matches] == ["xr", "ct"] and not both.complete_on_release


def test_calling_ae_and_regex_are_case_insensitive() -> None:
    m = Match(calling_ae_title=("PACS",), series_description="^lat")
    assert mismatch(m, h(calling_ae="PACS", series_description="LAT standing")) is None
    assert "calling AE 'MOD'" in mismatch(m, h(calling_ae="MOD", series_description="LAT"))


def test_no_rules_and_no_instances_have_reasons() -> None:
    assert route([h(modality="DX")], ()).reason == "no routing rules configured"
    rule = Rule(name="r", analyses=("a",), match=(Match(),))
    assert route([], (rule,)).reason == "no source instances"


def test_headers_from_dataset_tolerate_missing_attributes() -> None:
    import pydicom

    ds = pydicom.Dataset()
    ds.SOPInstanceUID = "1.2"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    got = InstanceHeaders.from_dataset(ds, calling_ae=" PACS ")
    assert got.image_type == ("ORIGINAL", "PRIMARY") and got.modality == "" and got.calling_ae == "PACS"


def test_redact_keeps_uids_and_tags_but_not_values() -> None:
    from dicom_node.errors import redact

    msg = "Unable to convert '31.12.1960' to 'DA' object for '1.2.840.10008.5.1.4.1.1.1' at '(0010,0030)'"
    assert redact(msg) == ("Unable to convert '<redacted>' to '<redacted>' object for '1.2.840.10008.5.1.4.1.1.1'"
                           " at '(0010,0030)'")
    assert redact('PatientName "DOE^JANE" too long') == 'PatientName "<redacted>" too long'
    assert redact("'' is not a valid PatientOrientationValuesBiped") == "'' is not a valid PatientOrientationValuesBiped"
    # Where the problem is stays readable: keywords and pydicom's class names are not patient data.
    msg = "'Dataset' object has no attribute 'PatientSex'"
    assert redact(msg) == msg
    assert redact("name 'Smith' is not 'PatientName'") == "name '<redacted>' is not 'PatientName'"


def test_redact_all_reaches_every_string_of_a_result_summary() -> None:
    from dicom_node.errors import redact_all

    summary = {"verdict": "not assessable", "implants": 2, "flagged": False,
               "reasons": ["pixel data could not be read (ValueError: cannot convert 'DOE^JANE')"],
               "images": [{"notes": ["VOI LUT 'DOE^JANE' ignored"], "vertebrae": ["level unknown"]}]}
    assert "DOE^JANE" not in str(redact_all(summary))
    assert redact_all(summary)["images"][0]["vertebrae"] == ["level unknown"]
    assert redact_all(summary)["implants"] == 2 and redact_all(summary)["flagged"] is False


def test_hospital_example_sends_outside_clinic_films_to_reporting_only() -> None:
    """Its header promised it; every matching rule runs, and the in-house rule matched the clinic's films too."""
    from pathlib import Path

    rules = load(Path(__file__).resolve().parents[2] / "config" / "examples" / "hospital.toml", env={}).rules
    clinic = route([h(modality="DX", body_part_examined="LSPINE", calling_ae="CLINIC_GW")], rules)
    assert [m.rule.name for m in clinic.matches] == ["outside-clinic-radiographs"]
    room = route([h(modality="DX", body_part_examined="LSPINE", calling_ae="DX_ROOM_1")], rules)
    assert [m.rule.name for m in room.matches] == ["postop-spine-radiograph"]
    assert not route([h(modality="DX", body_part_examined="CSPINE", calling_ae="CLINIC_GW")], rules).routed
