"""Transfer syntaxes the node accepts as SCP, and how it picks them when sending."""

from __future__ import annotations

from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
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

#: What the Storage SCP accepts: JPEG 2000, JPEG-LS, JPEG lossless/baseline/extended, RLE, HTJ2K, native and
#: deflate.  The order is the preference when a sender proposes several for one context: pynetdicom picks
#: the first of this list the sender offers, and a sender offering a compressed syntax usually holds the
#: data that way, so compressed (lossless first) comes before native; the instance is then stored exactly
#: as sent, and decoded for inference with pylibjpeg / openjpeg / pylibjpeg-rle.
ACCEPTED: list[UID] = [
    JPEG2000Lossless,
    JPEGLSLossless,
    JPEGLosslessSV1,
    JPEGLossless,
    RLELossless,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000,
    JPEGLSNearLossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    HTJ2K,
    *UNCOMPRESSED,
    DeflatedExplicitVRLittleEndian,
]
