"""Image planes through the phantom: the cine views and the decoy planes.

A plane carries exactly the DICOM geometry that is written for it, so what the
ingestion reads back (ImagePositionPatient, ImageOrientationPatient,
PixelSpacing) is the plane the pixels were rendered on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cmr_search.synth.params import StudyParams
from cmr_search.synth.phantom import HeartFrame, Phantom, rotation, unit


@dataclass(frozen=True)
class Plane:
    """One image plane in patient coordinates (LPS, mm).

    position is the centre of pixel (0, 0); row_dir points along a row (increasing
    column index) and col_dir down a column (increasing row index), i.e. the two
    triplets of ImageOrientationPatient in that order.
    """

    view: str  # 4CH, 3CH, 2CH, SAX, or AX/COR/SAG/FLOW for decoys
    slice_index: int | None  # SAX base -> apex; None for other planes
    position: np.ndarray
    row_dir: np.ndarray
    col_dir: np.ndarray
    spacing: float  # square pixels
    rows: int
    cols: int
    thickness: float

    @property
    def normal(self) -> np.ndarray:
        """Unit normal row_dir x col_dir."""
        return np.cross(self.row_dir, self.col_dir)

    def pixel_positions(self) -> np.ndarray:
        """Patient coordinates of every pixel centre, shape (rows * cols, 3), row-major."""
        return np.stack(self.coordinates(dtype=np.float64), axis=1)

    def coordinates(self, frame: HeartFrame | None = None, dtype=np.float32) -> tuple:
        """x, y, z of every pixel centre as three flat row-major arrays.

        Patient coordinates, or heart-frame coordinates when `frame` is given.
        """
        pos, u, v = self.position, self.row_dir, self.col_dir
        if frame is not None:  # the plane is affine: transform its three vectors only
            pos = frame.axes @ (pos - frame.origin)
            u, v = frame.axes @ u, frame.axes @ v
        r = np.arange(self.rows) * self.spacing
        c = np.arange(self.cols) * self.spacing
        return tuple((pos[i] + r[:, None] * v[i] + c[None, :] * u[i]).astype(dtype).ravel()
                     for i in range(3))


def centered_plane(view, slice_index, center, row_dir, col_dir, spacing, rows, cols,
                   thickness) -> Plane:
    """Plane of rows x cols pixels whose centre lies at `center`."""
    u, v = unit(np.asarray(row_dir, float)), unit(np.asarray(col_dir, float))
    pos = np.asarray(center, float) - 0.5 * (cols - 1) * spacing * u - 0.5 * (rows - 1) * spacing * v
    return Plane(view, slice_index, pos, u, v, float(spacing), int(rows), int(cols),
                 float(thickness))


def lax_plane(ph: Phantom, params: StudyParams, view: str, jitter: int = 0) -> Plane:
    """A long-axis plane (4CH, 2CH or 3CH) containing the LV long axis, apex up.

    `jitter` > 0 draws a different small planning error (a repeated acquisition).
    """
    ax = ph.frame.axes
    ex, _, ez = ax
    idx = {"4CH": 0, "2CH": 1, "3CH": 2}[view]
    angle = {"4CH": 0.0, "2CH": 90.0, "3CH": params.three_ch_angle_deg}[view]
    angle += params.lax_rotation_deg[idx] + 2.5 * jitter
    in_plane = rotation(ez, angle) @ ex  # 0 deg = e_x (4CH), 90 deg = e_y (2CH)
    du, dv, dn = params.view_offsets_mm[3 * idx: 3 * idx + 3]
    row_dir = -in_plane  # RV / LVOT side on the image left
    col_dir = ez  # apex at the top of the image
    normal = np.cross(row_dir, col_dir)
    z_mid = 0.5 * (-(ph.lv_length_ed + ph.wall_apical) + 45.0)
    center = ph.frame.to_patient(np.array([0.0, 0.0, z_mid]))
    center = center + (du + 3 * jitter) * row_dir + dv * col_dir + 0.5 * dn * normal
    return centered_plane(view, None, center, row_dir, col_dir, params.pixel_spacing_mm,
                          params.rows, params.cols, params.slice_thickness_mm)


def sax_stack(ph: Phantom, params: StudyParams) -> list[Plane]:
    """Parallel short-axis planes from base (index 0) to apex, spaced sax_spacing_mm."""
    ex, ey, ez = ph.frame.axes
    tilt = rotation(ex, params.sax_tilt_deg[0]) @ rotation(ey, params.sax_tilt_deg[1])
    normal = tilt @ ez
    row_dir = unit(-(tilt @ ex))
    col_dir = np.cross(normal, row_dir)  # row_dir x col_dir = normal (towards the base)
    du, dv, _ = params.view_offsets_mm[9:12]
    stack_origin = ph.frame.to_patient(np.array([8.0 + du, dv, 0.0]))
    planes = []
    for i in range(params.sax_slices):
        depth = -(i + 0.5) * params.sax_spacing_mm + params.sax_start_mm
        planes.append(centered_plane("SAX", i, stack_origin + depth * normal, row_dir, col_dir,
                                     params.pixel_spacing_mm, params.rows, params.cols,
                                     params.slice_thickness_mm))
    return planes


def localizer_planes(ph: Phantom) -> list[Plane]:
    """Axial, coronal and sagittal scout planes through the heart, coarse and wide."""
    center = ph.frame.to_patient(np.array([10.0, 0.0, -35.0]))
    x, y, z = np.eye(3)
    specs = [("AX", x, y), ("COR", x, -z), ("SAG", y, -z)]
    return [centered_plane(v, None, center, r, c, 1.8, 192, 192, 10.0) for v, r, c in specs]


def flow_plane(ph: Phantom, params: StudyParams) -> Plane:
    """Through-plane phase-contrast plane across the ascending aorta."""
    h_center = ph.aorta_base + 30.0 * ph.aorta_dir
    normal = ph.frame.axes.T @ ph.aorta_dir
    helper = np.array([1.0, 0.0, 0.0]) if abs(normal[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    row_dir = unit(helper - (helper @ normal) * normal)
    col_dir = np.cross(normal, row_dir)
    center = ph.frame.to_patient(h_center)
    spacing = max(params.pixel_spacing_mm, 1.6)
    return centered_plane("FLOW", None, center, row_dir, col_dir, spacing, 160, 160, 6.0)


def angle_between(a: np.ndarray, b: np.ndarray) -> float:
    """Angle in degrees between two directions, ignoring their sign."""
    cos = abs(float(np.dot(unit(a), unit(b))))
    return math.degrees(math.acos(min(1.0, cos)))
