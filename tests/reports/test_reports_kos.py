"""The IHE IOCM rejection note for outputs sent under a patient identity corrected since."""

from __future__ import annotations

import highdicom as hd
import pydicom
import pytest

from reports import codes
from reports.common import REJECTION_SERIES
from reports.kos import build_rejection_note, rejection_note_uid


@pytest.mark.parametrize("case", ["lateral-dx", "ct"])
def test_a_rejection_note_lists_every_rejected_output_with_their_identity(outputs, case, tmp_path, dciodvfy):
    rejected = [o.dataset for o in outputs[case]]
    note = build_rejection_note(rejected)
    path = tmp_path / "note.dcm"
    note.save_as(path, enforce_file_format=True)
    errors, _ = dciodvfy(path)
    assert not errors, errors[:5]

    back = hd.ko.KeyObjectSelectionDocument.from_dataset(pydicom.dcmread(path))
    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.59"  # Key Object Selection Document
    title = back.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator) == (codes.REJECTED_INCORRECT_WORKLIST_ENTRY.value, "DCM")
    listed = {ref.ReferencedSOPInstanceUID for study in back.CurrentRequestedProcedureEvidenceSequence
              for series in study.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence}
    assert listed == {str(ds.SOPInstanceUID) for ds in rejected}
    # IOCM: the note is filed with the instances it rejects, under their (old) patient and study.
    for keyword in ("PatientID", "PatientName", "PatientBirthDate", "StudyInstanceUID", "AccessionNumber"):
        assert back.get(keyword) == rejected[0].get(keyword), keyword
    assert back.SeriesNumber == REJECTION_SERIES.number
    assert back.SOPInstanceUID == rejection_note_uid([str(ds.SOPInstanceUID) for ds in reversed(rejected)])


def test_a_rejection_note_of_nothing_or_of_two_patients_is_refused(outputs, cases):
    with pytest.raises(ValueError, match="at least one"):
        build_rejection_note([])
    with pytest.raises(ValueError, match="disagree"):
        build_rejection_note([outputs["lateral-dx"][0].dataset, outputs["ct"][0].dataset])
