"""StudyResult -> DICOM objects (SEG, TID 1500 SR, Secondary Capture, presentation state) via highdicom."""

from reports.outputs import (
    EncodedOutput,
    OutputKind,
    OutputOptions,
    Producer,
    SopReference,
    build_outputs,
)

__all__ = ["EncodedOutput", "OutputKind", "OutputOptions", "Producer", "SopReference", "build_outputs"]
