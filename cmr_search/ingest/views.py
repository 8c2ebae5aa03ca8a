"""View classification: series descriptions of the common vendors, Kaggle DSB folder
names, and a geometric fallback; plus recognising series that are not cines."""

from __future__ import annotations

import re

import numpy as np

__all__ = [
    "LAX_VIEWS",
    "VIEWS",
    "apex_sign",
    "decoy_reason",
    "lax_view_from_geometry",
    "looks_like_cine",
    "plane_normal",
    "septal_angle",
    "view_from_text",
]

VIEWS = ("4CH", "3CH", "2CH", "SAX", "LVOT", "OTHER")
LAX_VIEWS = ("2CH", "3CH", "4CH")  # the long-axis planes through the LV apex, by rotation from the septum

# Letters-only boundaries: vendors glue words with "_" (CINE_segmented_SAX_b3), so \b is useless.
_B, _E = r"(?<![a-z])", r"(?![a-z])"
_VIEW_PATTERNS: list[tuple[str, re.Pattern]] = [
    # "4CV": four-chamber view, as some sites write it
    ("4CH", re.compile(rf"4\s*-?\s*c[hv]|four.?ch|4.?chamber|{_B}hla{_E}|lax.?4")),
    ("3CH", re.compile(r"3\s*-?\s*c[hv]|three.?ch|3.?chamber|lax.?3")),
    ("2CH", re.compile(rf"2\s*-?\s*c[hv]|two.?ch|2.?chamber|{_B}vla{_E}|lax.?2")),
    ("LVOT", re.compile(r"lvot")),
    ("SAX", re.compile(rf"sax|short.?ax|{_B}sa{_E}|{_B}sa\d")),
]
# Why each decoy is skipped; tested against the lower-cased description.
_DECOY_PATTERNS: list[tuple[str, re.Pattern]] = [
    ("localizer", re.compile(rf"locali[sz]er|scout|survey|tri.?pilot|3.?plane|{_B}loc{_E}")),
    ("phase-contrast flow", re.compile(rf"flow|venc|phase.?contrast|velocity|{_B}pc{_E}|_p$")),
    (
        "late gadolinium enhancement",
        re.compile(rf"{_B}lge{_E}|psir|{_B}de{_E}|delayed|late.?gad|viability|{_B}ir{_E}.*tfl"),
    ),
    ("derived series", re.compile(rf"inlinevf|moco|t1.?map|t2.?map|molli|{_B}map{_E}")),
]
_CINE_WORDS = re.compile(r"cine|ssfp|fiesta|bffe|btfe|trufi|truefisp|fisp|balanced|tfe")
_FLOW_TYPES = {"P", "VELOCITY", "PHASE", "PHASE MAP", "VELOCITY MAP"}

# Prior directions in patient LPS coordinates (x left, y posterior, z superior): the LV apex
# points anterior-inferior-left, the septum faces the RV to the right and anterior.
APEX_PRIOR = np.array([0.6, -0.55, -0.58]) / np.linalg.norm([0.6, -0.55, -0.58])
SEPTUM_PRIOR = np.array([-1.0, -1.0, 0.0]) / np.sqrt(2.0)


def view_from_text(text: str) -> str | None:
    """View named by a SeriesDescription or folder name (`CINE_segmented_LAX_4Ch`, `sax_5`)."""
    low = text.lower()
    for view, pattern in _VIEW_PATTERNS:
        if pattern.search(low):
            return view
    return None


def decoy_reason(description: str, image_type: tuple[str, ...]) -> str | None:
    """Why a series is not a cine to ingest (localizer, flow, LGE, derived), or None."""
    kinds = set(image_type[2:]) if len(image_type) > 2 else set()
    if "LOCALIZER" in image_type:
        return "localizer"
    if kinds & _FLOW_TYPES:
        return "phase-contrast flow"
    if image_type[:1] == ("DERIVED",) and "SECONDARY" in image_type:
        return "derived series"
    if "PSIR" in image_type:
        return "late gadolinium enhancement"
    low = description.lower()
    for reason, pattern in _DECOY_PATTERNS:
        if pattern.search(low):
            return reason
    return None


def looks_like_cine(description: str) -> bool:
    """True when the description names a cine sequence (a 1-frame one is then broken)."""
    low = description.lower()
    return bool(_CINE_WORDS.search(low)) or view_from_text(low) is not None


def plane_normal(iop: tuple[float, ...]) -> np.ndarray:
    """Unit normal of an image plane from ImageOrientationPatient (row x column direction)."""
    r, c = iop[:3], iop[3:]
    n = np.array([r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0]])
    return n / (np.linalg.norm(n) or 1.0)


def apex_sign(normal: np.ndarray) -> float:
    """+1 when moving along ``normal`` goes from base to apex (by the anatomical prior)."""
    return 1.0 if float(np.dot(normal, APEX_PRIOR)) >= 0 else -1.0


def lax_view_from_geometry(lax_normal: np.ndarray, sax_normal: np.ndarray) -> str:
    """Classify a long-axis plane from its rotation about the LV long axis.

    All long-axis planes contain the long axis (the SAX normal). The 2-chamber plane is
    parallel to the septum, so its normal points at the septum; the 4-chamber plane cuts
    the septum, so its normal is perpendicular to it; the 3-chamber plane lies between.
    Planes that do not contain the long axis (within 35 degrees) are OTHER.
    """
    axis = sax_normal / np.linalg.norm(sax_normal)
    if abs(float(np.dot(lax_normal, axis))) > np.sin(np.radians(35)):
        return "OTHER"
    angle = septal_angle(lax_normal, axis)
    if angle < 27:
        return "2CH"
    if angle < 68:
        return "3CH"
    return "4CH"


def septal_angle(lax_normal: np.ndarray, sax_normal: np.ndarray) -> float:
    """Degrees (0-90) between a long-axis plane's normal and the septal direction, both
    projected across the LV long axis: about 0 for the 2-chamber plane, 90 for the 4-chamber."""
    axis = sax_normal / np.linalg.norm(sax_normal)
    septum = SEPTUM_PRIOR - np.dot(SEPTUM_PRIOR, axis) * axis
    septum /= np.linalg.norm(septum)
    n = lax_normal - np.dot(lax_normal, axis) * axis
    n /= np.linalg.norm(n)
    return float(np.degrees(np.arccos(min(1.0, abs(float(np.dot(n, septum)))))))
