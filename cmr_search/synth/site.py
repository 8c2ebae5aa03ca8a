"""Site profiles: which hospital a synthetic cohort comes from.

A model trained on one hospital's studies is judged on another's (internal versus
external validation). A ``SiteProfile`` sets what differs between hospitals: the scanner
vendors, the field strength and what it does to the images (noise, coil shading,
contrast), the acquisition (pixel spacing, frames per cycle, slice thickness), the house
style of the reports and, slightly, the case mix. Labels stay measured on the phantom, so
they mean the same at every site.

``INTERNAL`` is the default cohort, draw for draw: a cohort generated with it is
byte-identical to one generated before profiles existed. ``EXTERNAL`` is a 3 T referral
centre with other scanners and another report writer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from cmr_search.synth.dicom_writer import DEFAULT_INSTITUTION
from cmr_search.synth.narrative import write_narrative_report
from cmr_search.synth.params import (
    ARCHETYPES,
    DEFAULT_SLICE_THICKNESS_MM,
    VENDOR_STYLES,
    StudyParams,
)
from cmr_search.synth.protocol import SCANNERS
from cmr_search.synth.reports import Report, write_report

__all__ = ["EXTERNAL", "INTERNAL", "REPORT_STYLES", "SITES", "SiteProfile", "site_profile"]

REPORT_STYLES = ("standard", "narrative")
_NAME = re.compile(r"[a-z][a-z0-9_-]{0,23}")  # goes into UIDs, PatientID and InstitutionName


@dataclass(frozen=True)
class SiteProfile:
    """How one hospital acquires, stores and reports its cine CMR studies."""

    name: str
    institution: str  # InstitutionName (0008,0080), at most 64 characters
    vendor_mix: tuple[tuple[str, float], ...]  # (vendor style of protocol.SCANNERS, weight)
    archetypes: tuple[tuple[str, float], ...]  # (archetype of params.ARCHETYPES, weight)
    field_strength_t: float | None  # None: drawn per study (the default cohort's 1.5 T/3 T mix)
    noise_sigma: tuple[float, float]  # Rician sigma relative to blood: uniform range
    bias_strength: tuple[float, float]  # amplitude of the coil shading: uniform range
    myocardium_contrast: float  # myocardium/blood signal relative to the default cohort
    pixel_spacing_mm: tuple[float, float]  # in-plane spacing: uniform range
    # frames per cycle: the count drawn from the heart rate and temporal resolution is
    # clipped to this range, so lo == hi is a fixed count (the kaggle style always has 30)
    frames: tuple[int, int]
    slice_thickness_mm: float
    report_style: str  # "standard": reports.write_report, "narrative": narrative.py

    def __post_init__(self) -> None:
        problems = []
        if not _NAME.fullmatch(self.name):
            problems.append(f"name {self.name!r} must match {_NAME.pattern}")
        if not 0 < len(self.institution) <= 64 or "\\" in self.institution:
            problems.append("institution must be 1-64 characters without a backslash")
        for table, known, what in ((self.vendor_mix, SCANNERS, "vendor style"),
                                   (self.archetypes, dict(ARCHETYPES), "archetype")):
            unknown = [n for n, _ in table if n not in known]
            if unknown or not table:
                problems.append(f"unknown {what}s {unknown} (known: {sorted(known)})")
            if any(w < 0 for _, w in table) or sum(w for _, w in table) <= 0:
                problems.append(f"{what} weights must be >= 0 with a positive sum")
        for label, (lo, hi) in (("noise_sigma", self.noise_sigma),
                                ("bias_strength", self.bias_strength),
                                ("pixel_spacing_mm", self.pixel_spacing_mm),
                                ("frames", self.frames)):
            if not 0 <= lo <= hi:
                problems.append(f"{label} must be a range 0 <= lo <= hi, got {(lo, hi)}")
        if self.frames[0] < 8:  # end systole needs a few frames before and after it
            problems.append(f"frames must be at least 8 per cycle, got {self.frames}")
        if not (0.8 <= self.pixel_spacing_mm[0] and self.pixel_spacing_mm[1] <= 3.0):
            problems.append(f"pixel_spacing_mm must lie in 0.8-3.0 mm, got {self.pixel_spacing_mm}")
        if self.field_strength_t is not None and not 0 < self.field_strength_t <= 11.7:
            problems.append(f"field_strength_t must be in (0, 11.7] tesla, got {self.field_strength_t}")
        if not 0 < self.myocardium_contrast <= 3 or not 0 < self.slice_thickness_mm <= 20:
            problems.append("myocardium_contrast must be in (0, 3] and slice_thickness_mm in (0, 20]")
        if self.report_style not in REPORT_STYLES:
            problems.append(f"report_style must be one of {REPORT_STYLES}, got {self.report_style!r}")
        if problems:
            raise ValueError(f"site profile {self.name!r}: " + "; ".join(problems))

    @property
    def namespace(self) -> str:
        """What goes into the UIDs and PatientIDs: empty for the internal site (the default
        cohort's identifiers), the profile name for any other, so two sites' cohorts with
        one seed never share a study or a patient."""
        return "" if self.name == "internal" else self.name

    def write_report(self, labels: dict, params: StudyParams, rng: np.random.Generator) -> Report:
        """The study's report in this site's house style."""
        if self.report_style == "narrative":
            return write_narrative_report(labels, params, rng,
                                          field_strength_t=self.field_strength_t)
        return write_report(labels, params, rng)


INTERNAL = SiteProfile(
    name="internal",
    institution=DEFAULT_INSTITUTION,
    vendor_mix=VENDOR_STYLES,
    archetypes=ARCHETYPES,
    field_strength_t=None,
    noise_sigma=(0.02, 0.08),
    bias_strength=(0.1, 0.45),
    myocardium_contrast=1.0,
    pixel_spacing_mm=(1.2, 2.0),
    frames=(20, 40),
    slice_thickness_mm=DEFAULT_SLICE_THICKNESS_MM,
    report_style="standard",
)

# A 3 T referral centre: Philips and GE mostly, a Canon scanner, no research or
# challenge data. More signal at 3 T (lower noise), stronger B1 shading, darker
# myocardium against blood, finer pixels and thinner slices, a fixed 25 reconstructed
# phases per cycle, narrative reports, and the case mix of a referral practice.
EXTERNAL = SiteProfile(
    name="external",
    institution="ZZSYNTH Regional Cardiac Centre (external)",
    vendor_mix=(("philips", 0.40), ("ge", 0.30), ("canon", 0.15), ("siemens", 0.15)),
    archetypes=(
        ("normal", 0.36),
        ("hypertensive_lvh", 0.10),
        ("hcm", 0.07),
        ("dcm", 0.13),
        ("ischaemic_apical", 0.12),
        ("pulmonary_hypertension", 0.06),
        ("pericardial_effusion", 0.03),
        ("athlete", 0.02),
        ("mitral_regurgitation", 0.05),
        ("atrial_fibrillation", 0.04),
        ("hypokinetic", 0.02),
    ),
    field_strength_t=3.0,
    noise_sigma=(0.012, 0.045),
    bias_strength=(0.3, 0.6),
    myocardium_contrast=0.85,
    pixel_spacing_mm=(1.1, 1.6),
    frames=(25, 25),
    slice_thickness_mm=6.0,
    report_style="narrative",
)

SITES: dict[str, SiteProfile] = {p.name: p for p in (INTERNAL, EXTERNAL)}


def site_profile(site: str | SiteProfile) -> SiteProfile:
    """The profile named ``site`` (a key of SITES), or ``site`` itself when it is one."""
    if isinstance(site, SiteProfile):
        return site
    try:
        return SITES[site]
    except KeyError:
        raise ValueError(f"unknown site {site!r}; choose one of {sorted(SITES)} "
                         "or pass a SiteProfile") from None
