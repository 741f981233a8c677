"""Label names of DeepfakeBench indexes and their 0 (real) / 1 (fake) values.

The mapping ships the names used by DeepfakeBench's published JSON files; a config can extend it
(``label_dict`` in :func:`masm.data.spec.open_dataset`). A name that is in neither is an error naming the
label and the file: a silent skip would change the class balance without anyone noticing.
"""

from __future__ import annotations

from collections.abc import Mapping

from masm.errors import DataError

REAL, FAKE = 0, 1

_REAL_NAMES = [
    "FF-real", "CelebDFv1_real", "CelebDFv2_real", "DFD_real", "DFDCP_Real", "DFDC_Real", "DF_real",
    "UADFV_Real", "FaceShifter_real", "FF-real-c23", "WDF_real", "DFo_real", "DeeperForensics-1.0_real",
    "FFIW_real", "SimSwap_real", "BlendFace_real", "UniFace_real", "MobileSwap_real", "e4s_real",
    "facedancer_real", "fsgan_real", "inswap_real", "blendface_real",
    "real",  # masm's own generic name (written by ``masm preprocess`` for real/ sources)
]  # fmt: skip
_FAKE_NAMES = [
    "FF-DF", "FF-F2F", "FF-FS", "FF-NT", "FF-FH", "FF-SH", "DFD_fake", "CelebDFv1_fake", "CelebDFv2_fake",
    "DFDCP_FakeA", "DFDCP_FakeB", "DFDC_Fake", "DF_fake", "UADFV_Fake", "FaceShifter", "FF-FaceShifter",
    "WDF_fake", "DFo_fake", "DeeperForensics-1.0_fake", "FFIW_fake", "SimSwap_fake", "BlendFace_fake",
    "UniFace_fake", "MobileSwap_fake", "e4s_fake", "facedancer_fake", "fsgan_fake", "inswap_fake",
    "blendface_fake",
    "fake",  # masm's own generic name (written by ``masm preprocess`` for fake/ sources)
]  # fmt: skip

STANDARD_LABELS: dict[str, int] = {**{n: REAL for n in _REAL_NAMES}, **{n: FAKE for n in _FAKE_NAMES}}


def build_label_dict(extra: Mapping[str, int] | None = None) -> dict[str, int]:
    """The standard mapping extended (or overridden) by ``extra``; values must be 0 or 1."""
    out = dict(STANDARD_LABELS)
    for name, value in (extra or {}).items():
        if value not in (REAL, FAKE) or isinstance(value, bool):
            raise DataError(f"label_dict: {name!r} must map to 0 (real) or 1 (fake), got {value!r}")
        out[str(name)] = int(value)
    return out


def resolve_label(name: str, label_dict: Mapping[str, int], where: str) -> int:
    """0/1 for label ``name``; an unknown name is a :class:`DataError` naming it and ``where`` (the file)."""
    try:
        return label_dict[name]
    except KeyError:
        raise DataError(
            f"{where}: unknown label {name!r}; add it to label_dict (e.g. label_dict: {{{name!r}: 1}})"
        ) from None
