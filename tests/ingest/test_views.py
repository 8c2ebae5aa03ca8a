"""View names from vendor descriptions and folder names, decoys, and the geometric fallback."""

import numpy as np
import pytest

from cmr_search.ingest.views import APEX_PRIOR, decoy_reason, lax_view_from_geometry, view_from_text


@pytest.mark.parametrize(
    "text,view",
    [
        ("CINE_segmented_LAX_4Ch", "4CH"),
        ("CINE_segmented_LAX_3Ch", "3CH"),
        ("CINE_segmented_LAX_2Ch", "2CH"),
        ("CINE_segmented_SAX_b3", "SAX"),
        ("cine_sax", "SAX"),
        ("4CH FIESTA BH", "4CH"),
        ("SAX FIESTA", "SAX"),
        ("bFFE BH SA", "SAX"),
        ("sBTFE_2ch", "2CH"),
        ("cine 3 chamber", "3CH"),
        ("tf2d15_retro_iPAT_LVOT", "LVOT"),
        ("sax_5", "SAX"),
        ("2ch_12", "2CH"),
        ("4ch_32", "4CH"),
        ("HLA cine", "4CH"),
        # vendor conventions: Philips (SENSE, B-TFE; its 3-chamber cine is "LVOT", which the
        # plane geometry settles at ingest), GE (FIESTA), Siemens (TrueFISP), Canon (SSFP),
        # chamber views written "CV"
        ("LVOT CINE SENSE", "LVOT"),
        ("B-TFE_3CH", "3CH"),
        ("SA CINE SENSE", "SAX"),
        ("FIESTA CINE 2CH", "2CH"),
        ("SA FIESTA 8 slice", "SAX"),
        ("Cine TrueFISP 4 chamber", "4CH"),
        ("trufi_cine_sax_5", "SAX"),
        ("CINE SSFP 4CH", "4CH"),
        ("cine 2 CV", "2CH"),
        ("LAX 4CV", "4CH"),
        ("Series 7", None),
        ("T1W/SE/1024", None),
        ("sagittal", None),
    ],
)
def test_view_from_text(text, view):
    assert view_from_text(text) == view


@pytest.mark.parametrize(
    "description,image_type,reason",
    [
        ("localizer", ("ORIGINAL", "PRIMARY", "M"), "localizer"),
        ("anything", ("ORIGINAL", "PRIMARY", "LOCALIZER"), "localizer"),
        ("flow_aorta_P", ("ORIGINAL", "PRIMARY", "P", "ND"), "phase-contrast flow"),
        ("flow_aorta", ("ORIGINAL", "PRIMARY", "M"), "phase-contrast flow"),
        ("LGE_PSIR_SAX", ("ORIGINAL", "PRIMARY", "M"), "late gadolinium enhancement"),
        ("DE_SAX", ("ORIGINAL", "PRIMARY", "M"), "late gadolinium enhancement"),
        ("CINE_segmented_SAX_InlineVF", ("DERIVED", "SECONDARY", "OTHER"), "derived series"),
        ("CINE_segmented_SAX_b1", ("ORIGINAL", "PRIMARY", "M", "NORM"), None),
        ("4CH FIESTA BH", ("ORIGINAL", "PRIMARY", "OTHER"), None),
    ],
)
def test_decoy_reason(description, image_type, reason):
    assert decoy_reason(description, image_type) == reason


def _heart_axes():
    """Long axis and septal direction matching the anatomical priors."""
    axis = -APEX_PRIOR  # SAX normal, apex -> base
    septum = np.array([-1.0, -1.0, 0.0])
    septum = septum - septum.dot(axis) * axis
    septum /= np.linalg.norm(septum)
    return axis, septum, np.cross(axis, septum)


def _rotate(v, axis, degrees):
    a = np.radians(degrees)
    return v * np.cos(a) + np.cross(axis, v) * np.sin(a) + axis * axis.dot(v) * (1 - np.cos(a))


@pytest.mark.parametrize("rotation,view", [(0, "2CH"), (10, "2CH"), (50, "3CH"), (-45, "3CH"), (90, "4CH"), (80, "4CH")])
def test_lax_geometry(rotation, view):
    axis, septum, _ = _heart_axes()
    normal = _rotate(septum, axis, rotation)  # 2CH normal points at the septum
    assert lax_view_from_geometry(normal, axis) == view


def test_plane_not_containing_long_axis_is_other():
    axis, _, _ = _heart_axes()
    assert lax_view_from_geometry(axis, axis) == "OTHER"


def test_cycle_indices_spread_over_one_cycle():
    from cmr_search.ingest.clips import cycle_indices

    idx = cycle_indices(30, 16)
    assert len(idx) == 16 and idx[0] == 0 and np.all(np.diff(idx) > 0) and idx[-1] < 30
    assert np.allclose(np.diff(idx), 30 / 16, atol=1)
    assert list(cycle_indices(16, 16)) == list(range(16))
    short = cycle_indices(10, 16)  # fewer acquired frames than clip frames: repeats, in order
    assert len(short) == 16 and np.all(np.diff(short) >= 0) and set(short) == set(range(10))
