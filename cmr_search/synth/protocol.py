"""Which series a study holds and how each is written, in six vendor styles.

A protocol is the scanner-side story of a study: the series list in acquisition
order with their numbers, descriptions, image types, planes and frames, the
decoys (localizer, LGE, phase-contrast flow, UK Biobank derived maps), repeated
acquisitions, and the file-level choices (classic or enhanced, transfer syntax,
instance ordering, Philips private phase numbers). Nothing here touches pixels.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from cmr_search.synth.dicom_encode import (
    EXPLICIT_VR_LE,
    IMPLICIT_VR_LE,
    JPEG2000_LOSSLESS,
    RLE_LOSSLESS,
)
from cmr_search.synth.params import StudyParams
from cmr_search.synth.phantom import Phantom
from cmr_search.synth.planes import Plane, flow_plane, lax_plane, localizer_planes, sax_stack

SCANNERS = {
    "siemens": ("SIEMENS", ("MAGNETOM Aera", "MAGNETOM Avanto", "MAGNETOM Skyra",
                            "MAGNETOM Prisma"), "syngo MR E11"),
    "ge": ("GE MEDICAL SYSTEMS", ("SIGNA Artist", "Optima MR450w", "DISCOVERY MR750",
                                  "SIGNA HDxt"), "27\\LX\\MR Software release:DV27.0"),
    "philips": ("Philips Medical Systems", ("Ingenia", "Achieva", "Intera"), "5.6.1\\5.6.1.2"),
    "ukbiobank": ("SIEMENS", ("MAGNETOM Aera",), "syngo MR D13A"),
    "kaggle": ("SIEMENS", ("MAGNETOM Avanto", "MAGNETOM Aera"), "syngo MR B17"),
    # only in other sites' cohorts (synth/site.py): the default vendor mix has no Canon
    "canon": ("CANON_MEC", ("Vantage Galan 3T", "Vantage Centurian", "Vantage Titan 3T"),
              "V10.0"),
}
CINE_IMAGE_TYPE = {
    "siemens": ("ORIGINAL", "PRIMARY", "M", "NORM", "DIS2D"),
    "ge": ("ORIGINAL", "PRIMARY", "OTHER"),
    "philips": ("ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"),
    "ukbiobank": ("ORIGINAL", "PRIMARY", "M", "NORM", "DIS2D"),
    "kaggle": ("ORIGINAL", "PRIMARY", "M", "ND"),
    "canon": ("ORIGINAL", "PRIMARY", "OTHER"),
}
ENHANCED_IMAGE_TYPE = ("ORIGINAL", "PRIMARY", "M", "NONE")


@dataclass(frozen=True)
class SeriesPlan:
    """One series to write: what it shows and how its files are laid out."""

    kind: str  # cine | localizer | lge | flow | derived
    view: str  # 4CH | 3CH | 2CH | SAX | "" (decoys)
    slice_index: int | None  # SAX slice base -> apex; -1 = all slices; None otherwise
    planes: tuple[Plane, ...]
    frames: tuple[int, ...]  # phantom frames rendered, in temporal order
    contrast: str  # cine | lge | flow_phase | derived
    description: str
    series_number: int
    minutes: float  # SeriesTime after StudyTime
    image_type: tuple[str, ...]
    folder: str
    superseded: bool = False
    repeat: int = 0  # >0: a re-planned repeat of an earlier acquisition
    enhanced: bool = False
    transfer_syntax: str = EXPLICIT_VR_LE
    order: str = "time"  # time | phase_major | slice_major | rotated
    private_phase: bool = False  # Philips phase number instead of TriggerTime
    inversion_time: float | None = None
    noise_stream: int = 0


@dataclass(frozen=True)
class StudyProtocol:
    """Scanner identity and the ordered series of one study."""

    style: str
    manufacturer: str
    model: str
    software: str
    field_strength: float
    rescale_slope: float
    rescale_intercept: float
    study_date: str  # YYYYMMDD
    study_time: str  # HHMMSS
    series: tuple[SeriesPlan, ...] = field(default_factory=tuple)


def safe_name(text: str) -> str:
    """A folder-safe form of a series description."""
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:40] or "series"


def _lax_names(style: str, rng) -> dict[str, str]:
    if style == "siemens":
        if rng.random() < 0.5:
            return {"4CH": "cine_4ch", "2CH": "cine_2ch", "3CH": "cine_3ch"}
        return {v: f"CINE_segmented_LAX_{v[0]}Ch" for v in ("4CH", "2CH", "3CH")}
    if style == "ge":
        return {v: f"{v} FIESTA BH" for v in ("4CH", "2CH", "3CH")}
    if style == "philips":
        return {"4CH": "bFFE 4CH", "2CH": "sBTFE_2ch", "3CH": "bFFE 3CH"}
    if style == "canon":
        return {v: f"CINE SSFP {v}" for v in ("4CH", "2CH", "3CH")}
    return {v: f"CINE_segmented_LAX_{v[0]}Ch" for v in ("4CH", "2CH", "3CH")}


def _sax_names(style: str, n: int) -> tuple[str, list[str]]:
    """Description of a single SAX series, and of per-slice series."""
    single = {"siemens": "cine_sax", "ge": "SAX FIESTA", "philips": "bFFE BH SA",
              "canon": "CINE SSFP SA"}.get(style, "CINE_segmented_SAX")
    per_slice = {"siemens": [f"cine_sax_{i + 1}" for i in range(n)],
                 "ge": [f"SAX FIESTA {i + 1}" for i in range(n)],
                 "philips": [f"bFFE BH SA {i + 1}" for i in range(n)],
                 "canon": [f"CINE SSFP SA {i + 1}" for i in range(n)]}.get(
        style, [f"CINE_segmented_SAX_b{i + 1}" for i in range(n)])
    return single, per_slice


def plan_protocol(params: StudyParams, ph: Phantom, rng: np.random.Generator,
                  study_day: int, field_strength_t: float | None = None) -> StudyProtocol:
    """Draw the scanner, series list and file layout of one study.

    `field_strength_t`: the site's field strength (tesla); None draws it per study as
    the default cohort does (UK Biobank and Kaggle 1.5 T, other scanners 60 % 1.5 T).
    """
    style = params.vendor_style
    manufacturer, models, software = SCANNERS[style]
    model = models[int(rng.integers(len(models)))]
    if field_strength_t is None:
        field_t = 1.5 if style in ("ukbiobank", "kaggle") or rng.random() < 0.6 else 3.0
    else:
        field_t = float(field_strength_t)
    slope = float(np.round(rng.uniform(1.2, 3.2), 6)) if style == "philips" else 1.0
    frames_all = tuple(range(params.n_frames))
    kaggle = style == "kaggle"

    enhanced = rng.random() < {"philips": 0.35, "siemens": 0.2, "ge": 0.15}.get(style, 0.0)
    u = rng.random()
    compression = "rle" if u < 0.12 else "j2k" if u < 0.18 else "none"
    implicit = (not enhanced and compression == "none"
                and rng.random() < {"ge": 0.3, "kaggle": 0.7}.get(style, 0.0))
    private_phase = style == "philips" and not enhanced and rng.random() < 0.5
    implicit = implicit and not private_phase
    single_sax = enhanced or rng.random() < {"siemens": 0.6, "ge": 0.85, "philips": 0.9,
                                             "canon": 0.7}.get(style, 0.0)
    multi_order = "phase_major" if rng.random() < 0.5 else "slice_major"
    rotated = rng.random() < 0.1
    base_ts = IMPLICIT_VR_LE if implicit else EXPLICIT_VR_LE

    series: list[dict] = []

    def add(**kw):
        series.append(kw)

    if not kaggle and rng.random() < 0.85:
        # the default is evaluated (and draws) for every style
        desc = {"ge": "3-Plane Loc", "philips": "Survey scout", "canon": "3-Plane Localizer"}.get(
            style, "localizer" if rng.random() < 0.7 else "AAHScout")
        itype = (("ORIGINAL", "PRIMARY", "LOCALIZER") if style in ("ge", "philips", "canon")
                 else CINE_IMAGE_TYPE[style])
        add(kind="localizer", view="", slice_index=None, planes=tuple(localizer_planes(ph)),
            frames=(0,), contrast="cine", description=desc, image_type=itype)

    lax_views = ["2CH", "4CH"] if kaggle else (
        ["4CH", "2CH", "3CH"] if rng.random() < 0.5 else ["2CH", "4CH", "3CH"])
    names = _lax_names(style, rng)
    repeat_view = lax_views[int(rng.integers(len(lax_views)))] if rng.random() < 0.05 else None
    cine_type = ENHANCED_IMAGE_TYPE if enhanced else CINE_IMAGE_TYPE[style]
    cine_ts = {"rle": RLE_LOSSLESS, "j2k": JPEG2000_LOSSLESS}.get(compression, base_ts)

    def lax(view, repeat=0, superseded=False):
        ts = base_ts if enhanced else (
            cine_ts if compression == "rle" or (compression == "j2k" and view == "4CH")
            else base_ts)
        add(kind="cine", view=view, slice_index=None,
            planes=(lax_plane(ph, params, view, jitter=repeat),), frames=frames_all,
            contrast="cine", description=names.get(view, view), image_type=cine_type,
            repeat=repeat, superseded=superseded, enhanced=enhanced, transfer_syntax=ts,
            order="rotated" if rotated else "time", private_phase=private_phase)

    if not kaggle:
        for v in lax_views:
            lax(v, superseded=v == repeat_view)
    stack = sax_stack(ph, params)
    single, per_slice = _sax_names(style, len(stack))
    if single_sax and not kaggle:
        add(kind="cine", view="SAX", slice_index=-1, planes=tuple(stack), frames=frames_all,
            contrast="cine", description=single, image_type=cine_type, enhanced=enhanced,
            transfer_syntax=base_ts, order=multi_order, private_phase=private_phase)
    else:
        for i, pl in enumerate(stack):
            add(kind="cine", view="SAX", slice_index=i, planes=(pl,), frames=frames_all,
                contrast="cine", description=per_slice[i], image_type=cine_type,
                enhanced=enhanced, transfer_syntax=base_ts,
                order="rotated" if rotated else "time", private_phase=private_phase)
    if kaggle:
        for v in lax_views:
            lax(v)
    if repeat_view:
        lax(repeat_view, repeat=1)

    mid = stack[len(stack) // 2]
    if style == "ukbiobank" and rng.random() < 0.7:
        add(kind="derived", view="", slice_index=None, planes=(mid,),
            frames=(0, params.es_frame), contrast="derived",
            description="CINE_segmented_SAX_InlineVF",
            image_type=("DERIVED", "SECONDARY", "M", "NORM", "DIS2D"))
    if not kaggle and rng.random() < (0.6 if style == "ukbiobank" else 0.35):
        fp = flow_plane(ph, params)
        base = "flow_250_tp_AoV_bh_ePAT@c" if style == "ukbiobank" else "flow_aorta"
        phase_type = (("ORIGINAL", "PRIMARY", "VELOCITY", "OTHER") if style == "ge"
                      else ("ORIGINAL", "PRIMARY", "P", "RETRO", "DIS2D"))
        if rng.random() < 0.5:
            add(kind="flow", view="", slice_index=None, planes=(fp,), frames=frames_all,
                contrast="cine", description=base + "_MAG",
                image_type=("ORIGINAL", "PRIMARY", "M", "RETRO", "DIS2D"))
        add(kind="flow", view="", slice_index=None, planes=(fp,), frames=frames_all,
            contrast="flow_phase", description=base + "_P", image_type=phase_type)
    if style in ("siemens", "ge", "philips", "canon") and rng.random() < 0.6:
        psir = rng.random() < 0.5
        desc = ("LGE_PSIR_SAX" if psir else "DE_SAX") if style != "philips" else "LGE SA PSIR"
        itype = (("ORIGINAL", "PRIMARY", "M", "NORM", "PSIR") if psir
                 else ("ORIGINAL", "PRIMARY", "M", "NORM", "DIS2D"))
        lge_planes = tuple(stack[1::2])
        add(kind="lge", view="", slice_index=None, planes=lge_planes,
            frames=(int(0.75 * params.n_frames),), contrast="lge", description=desc,
            image_type=itype, inversion_time=float(np.round(rng.uniform(260, 340))))

    # numbering, timing, folders; decoys are written uncompressed unless RLE is on
    plans, minutes, number = [], 0.0, 1
    kaggle_number = int(rng.integers(3, 9))
    for k, s in enumerate(series):
        if kaggle:
            number = kaggle_number + k
            prefix = {"SAX": "sax", "2CH": "2ch", "4CH": "4ch"}[s["view"]]
            s["description"] = f"{prefix}_{number}"
            folder = s["description"]
        else:
            number = (k + 1) * 100 + 1 if style == "philips" else k + 1
            folder = f"series_{number:03d}_{safe_name(s['description'])}"
        if s["kind"] != "cine":
            s.setdefault("transfer_syntax", RLE_LOSSLESS if compression == "rle" else base_ts)
        minutes += float(rng.uniform(0.6, 2.5)) + (8.0 if s["kind"] == "lge" else 0.0)
        plans.append(SeriesPlan(series_number=number, minutes=minutes, folder=folder,
                                noise_stream=100 * k, **s))
    study_time = f"{8 + int(rng.integers(10)):02d}{int(rng.integers(60)):02d}00"
    date = np.datetime64("2012-01-02") + np.timedelta64(study_day, "D")
    return StudyProtocol(
        style=style, manufacturer=manufacturer, model=model, software=software,
        field_strength=field_t, rescale_slope=slope, rescale_intercept=0.0,
        study_date=str(date).replace("-", ""), study_time=study_time, series=tuple(plans),
    )
