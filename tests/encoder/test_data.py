"""Training data: patient splits, sentence sampling, augmentation, batches."""

import numpy as np
import pytest
import torch

from cmr_search.encoder.config import AugmentConfig, load_config
from cmr_search.encoder.data import (
    ClipCorpus,
    ContrastiveBatches,
    Study,
    apply_augment,
    augment_batch,
    patient_split,
    sample_report,
)
from cmr_search.encoder.text import split_sentences
from cmr_search.encoder.video import PreprocessConfig, preprocess_batch, preprocess_clip


def _study(i, patient):
    return Study(f"1.2.{i}", patient, "r", [i], [f"c{i}"], ["SAX"], [0])


def test_patient_split_keeps_each_patient_on_one_side_and_is_stable():
    studies = [_study(i, f"p{i // 3}") for i in range(300)]
    train, val = patient_split(studies, 0.2, seed=4)
    assert {s.patient_key for s in train}.isdisjoint({s.patient_key for s in val})
    assert len(train) + len(val) == 300
    assert 0.1 < len(val) / 300 < 0.3
    again = patient_split(studies, 0.2, seed=4)[1]
    assert [s.study_uid for s in again] == [s.study_uid for s in val]
    assert [s.study_uid for s in patient_split(studies, 0.2, seed=5)[1]] != [s.study_uid for s in val]


def test_report_sampling_takes_k_distinct_sentences():
    report = "LV is dilated. EF is 30%. No thrombus. RV normal. Atria normal. No effusion. Mass 150 g."
    rng = np.random.default_rng(0)
    got = split_sentences(sample_report(report, 5, rng))
    assert len(got) == 5 and len(set(got)) == 5
    assert set(got) <= set(split_sentences(report))
    short = sample_report("One. Two.", 5, rng)
    assert sorted(split_sentences(short)) == ["One.", "Two."]


def test_augmentation_is_the_same_geometry_for_every_frame():
    # a clip whose frames are identical must stay identical after augmentation (noise off)
    frame = np.random.default_rng(1).integers(0, 255, (64, 64), dtype=np.uint8)
    clip = torch.from_numpy(np.stack([frame] * 8))[None]
    cfg = AugmentConfig(noise=0.0)
    pre = PreprocessConfig(crop=48, resize=48)
    out = augment_batch(clip, cfg, pre, torch.Generator().manual_seed(3))
    assert out.shape == (1, 3, 8, 48, 48)
    assert torch.allclose(out[0, 0, 0], out[0, 0, 7])
    assert torch.equal(out[0, 0], out[0, 2])  # grey copied to three channels
    other = augment_batch(clip, cfg, pre, torch.Generator().manual_seed(4))
    assert not torch.allclose(out, other)


def test_preprocess_resizes_crops_and_normalises():
    clip = np.full((4, 128, 160), 255, np.uint8)
    pre = PreprocessConfig(crop=96, resize=112, pixel_mean=0.45, pixel_std=57.375)
    x = preprocess_clip(clip, pre)
    assert x.shape == (3, 4, 96, 96)
    assert torch.allclose(x, torch.full_like(x, (255 - 0.45) / 57.375), atol=1e-3)
    with pytest.raises(ValueError, match=r"\[T, H, W\]"):
        preprocess_clip(clip[0], pre)
    assert preprocess_batch(torch.zeros(2, 4, 96, 96, dtype=torch.uint8), pre).shape == (2, 3, 4, 96, 96)
    whole = load_config("mvit_xs_cpu")  # the whole config works too: its preprocessing is used
    assert torch.equal(preprocess_clip(clip, whole), preprocess_clip(clip, whole.preprocess))


def test_batches_come_from_the_store_and_repeat_per_step(enc_store):
    corpus = ClipCorpus(enc_store)
    studies = corpus.with_reports()
    assert len(studies) == 10
    s = studies[0]
    clips = corpus.read_clips(s.row_ids[::-1])
    assert clips.shape[1:] == corpus.clip_shape and clips.dtype == np.uint8
    assert np.array_equal(clips[-1], corpus.read_clips([s.row_ids[0]])[0])
    data = ContrastiveBatches(corpus, studies, 4, 3, 5, AugmentConfig(), PreprocessConfig(crop=64, resize=64), 0, 10)
    a, b = data[3], data[3]
    assert torch.equal(a["clips"], b["clips"]) and a["texts"] == b["texts"]
    assert a["clips"].shape == (12, 3, 16, 64, 64)
    assert a["study_of_view"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    # an epoch visits every study once
    seen = np.concatenate([data.study_indices(step) for step in range(len(studies) // 4)])
    assert len(set(seen.tolist())) == len(seen)


def test_ranks_gathered_in_one_step_never_share_a_study(enc_store):
    corpus = ClipCorpus(enc_store)
    studies = corpus.with_reports()  # 10 studies: 3 per rank, 2 ranks, so an epoch has 1 step and 4 left over
    args = (corpus, studies, 3, 2, 5, AugmentConfig(), PreprocessConfig(crop=48, resize=48), 0, 40)
    two = ContrastiveBatches(*args, ranks=2)
    for step in range(12):
        a, b = two.study_indices(2 * step), two.study_indices(2 * step + 1)
        assert len(a) == len(b) == 3 and not set(a.tolist()) & set(b.tolist()), step
    one = ContrastiveBatches(*args)  # one rank: consecutive slices of each epoch's permutation, as before
    perm = np.random.default_rng([0, 0]).permutation(len(studies))
    assert [one.study_indices(i).tolist() for i in range(3)] == [perm[0:3].tolist(), perm[3:6].tolist(), perm[6:9].tolist()]
    assert one.study_indices(3).tolist() == np.random.default_rng([0, 1]).permutation(len(studies))[0:3].tolist()


def test_device_augmented_batches_carry_uint8_clips_that_augment_to_the_loader_s(enc_store):
    corpus = ClipCorpus(enc_store)
    side = corpus.clip_shape[-1]
    pre = PreprocessConfig(crop=side, resize=side)  # the model sees the store's frame size
    args = (corpus, corpus.with_reports(), 4, 2, 5, AugmentConfig(), pre, 0, 10)
    on_loader, on_device = ContrastiveBatches(*args)[3], ContrastiveBatches(*args, device_augment=True)[3]
    raw = on_device["clips"]
    assert raw.dtype == torch.uint8 and raw.shape == (8, *corpus.clip_shape)
    assert on_device["texts"] == on_loader["texts"]
    moved = raw.nelement() * raw.element_size() + sum(v.nelement() * v.element_size() for v in on_device["augment"].values())
    floats = on_loader["clips"]
    assert moved * 10 < floats.nelement() * floats.element_size()  # a twelfth of the bytes to the device
    # the same draws give the same clips wherever they are applied (noise comes from its own seed)
    assert torch.equal(apply_augment(raw, on_device["augment"], AugmentConfig(), pre), on_loader["clips"])
    again = ContrastiveBatches(*args, device_augment=True)[3]
    assert all(torch.equal(again["augment"][k], v) for k, v in on_device["augment"].items())
    assert not torch.equal(on_device["augment"]["theta"], ContrastiveBatches(*args, device_augment=True)[4]["augment"]["theta"])


def test_stratified_batches_draw_one_view_type_per_step(enc_store):
    corpus = ClipCorpus(enc_store)
    studies = corpus.with_reports()
    view_of = {r: v for s in studies for r, v in zip(s.row_ids, s.views)}
    data = ContrastiveBatches(corpus, studies, 4, 2, 5, AugmentConfig(), PreprocessConfig(crop=48, resize=48), 0, 40,
                              stratify_views=1.0)
    kinds = set()
    for step in range(8):
        rows = _rows_of_step(data, step)
        views = {view_of[r] for r in rows}
        assert len(views) == 1, views  # every study of the step gave the same view type
        kinds |= views
    assert len(kinds) >= 2  # ... and the type changes from step to step


def _rows_of_step(data, step):
    """The store rows a step picks (the same draws as __getitem__, without the pixels)."""
    read = data.corpus.read_clips
    picked = []
    data.corpus.read_clips = lambda rows: (picked.extend(rows), read(rows))[1]
    try:
        data[step]
    finally:
        data.corpus.read_clips = read
    return picked
