"""Transfer syntaxes the node accepts as SCP, and how it picks them when sending."""

from __future__ import annotations

from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2K,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

#: Native encodings (every SCP must accept Implicit VR Little Endian).
UNCOMPRESSED: list[UID] = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]

#: What the Storage SCP accepts: native, deflate, JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000,
#: HTJ2K and RLE.  Stored as received; decoded for inference with pylibjpeg / openjpeg / pylibjpeg-rle.
ACCEPTED: list[UID] = [
    *UNCOMPRESSED,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    HTJ2K,
    RLELossless,
]
