"""`build_rejection_note`: an IHE IOCM rejection note (Key Object Selection) for outputs sent under a patient
identity the sender corrected since.

The node cannot delete what a PACS holds.  An archive that implements IHE Imaging Object Change Management
(dcm4chee, many commercial PACS) hides, then deletes, the instances a rejection note lists; one that does not
keeps the note as one more object of the study, where it names what to remove.  The note carries the identity
of the instances it rejects (the old one, as IOCM requires: the archive files it beside them) and titles them
"Incorrect Modality Worklist Entry" (113038, DCM).
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset

from reports import codes
from reports.common import (
    REJECTION_SERIES,
    Producer,
    apply_creation_time,
    apply_equipment,
    apply_identity,
    check_one_study,
)
from reports.uids import derive_uid


def rejection_note_uid(rejected_sop_instance_uids: Sequence[str]) -> str:
    """SOP Instance UID of the note rejecting these instances: the same set always gives the same note."""
    return str(derive_uid("rejection note", *sorted(rejected_sop_instance_uids)))


def build_rejection_note(rejected: Sequence[Dataset], *, producer: Producer = Producer()) -> Dataset:  # noqa: B008
    """A Key Object Selection Document rejecting `rejected` (the node's own earlier outputs, one study and
    patient), with their patient and study identity.  Raises ``ValueError`` for none, or for outputs of more
    than one study or patient."""
    if not rejected:
        raise ValueError("a rejection note needs at least one instance to reject")
    check_one_study(rejected)
    first = rejected[0]
    uids = [str(ds.SOPInstanceUID) for ds in rejected]
    sop_uid = rejection_note_uid(uids)
    content = hd.ko.KeyObjectSelection(
        document_title=codes.REJECTED_INCORRECT_WORKLIST_ENTRY,
        referenced_objects=list(rejected),
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.OBSERVER_DEVICE,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=producer.device_uid, name=producer.model_name, manufacturer_name=producer.manufacturer,
                model_name=producer.model_name,
                serial_number=producer.device_serial_number),
        ),
        description="Outputs superseded: made under a patient identity or from an image the sender changed since",
    )
    note = hd.ko.KeyObjectSelectionDocument(
        evidence=list(rejected),
        content=content,
        series_instance_uid=derive_uid(sop_uid, "series"),
        series_number=REJECTION_SERIES.number,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=producer.manufacturer,
    )
    apply_identity(note, first)
    apply_creation_time(note, first, datetime.datetime.now(datetime.UTC))
    apply_equipment(note, first, producer)
    note.SeriesDescription = REJECTION_SERIES.description
    return note
