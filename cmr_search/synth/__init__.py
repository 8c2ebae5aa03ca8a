"""Synthetic cine cardiac MRI cohort generator: phantom, rendering, labels, reports, DICOM."""

from cmr_search.synth.cohort import CohortSummary, generate_cohort, generate_study, plan_visits
from cmr_search.synth.labels import (
    BINARY_LABELS,
    LABEL_COLUMNS,
    THRESHOLDS,
    Thresholds,
    study_labels,
)
from cmr_search.synth.params import (
    ARCHETYPES,
    Patient,
    StudyParams,
    sample_patient,
    sample_study_params,
)
from cmr_search.synth.phantom import Phantom, Volumes, build_phantom
from cmr_search.synth.planes import Plane, lax_plane, sax_stack
from cmr_search.synth.render import render_plane, study_appearance
from cmr_search.synth.reports import FINDINGS, Report, write_report
from cmr_search.synth.site import EXTERNAL, INTERNAL, SITES, SiteProfile, site_profile

__all__ = [
    "ARCHETYPES", "BINARY_LABELS", "EXTERNAL", "FINDINGS", "INTERNAL", "LABEL_COLUMNS", "SITES",
    "THRESHOLDS", "CohortSummary", "Patient", "Phantom", "Plane", "Report", "SiteProfile",
    "StudyParams", "Thresholds", "Volumes", "build_phantom", "generate_cohort", "generate_study",
    "lax_plane", "plan_visits", "render_plane", "sample_patient", "sample_study_params", "sax_stack",
    "site_profile", "study_appearance", "study_labels", "write_report",
]
