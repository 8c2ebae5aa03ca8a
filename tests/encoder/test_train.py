"""Training: the loss goes down, checkpoints round-trip, and a killed run resumes exactly."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from cmr_search.core.exceptions import InputError
from cmr_search.encoder.checkpoint import load_checkpoint
from cmr_search.encoder.data import ClipCorpus, ContrastiveBatches
from cmr_search.encoder.loss import ContrastiveLoss
from cmr_search.encoder.model import CmrClip
from cmr_search.encoder.train import (
    ReportCache,
    Trainer,
    any_rank,
    latest_checkpoint,
    lr_at,
    micro_step,
)


def test_lr_schedule_warms_up_then_decays(tiny_cfg):
    t = tiny_cfg.train
    values = [lr_at(s, t) for s in range(t.max_steps + 2)]
    assert values[0] == pytest.approx(1 / t.warmup_steps)
    assert max(values) == pytest.approx(1.0)
    assert values[-1] == pytest.approx(t.min_lr_ratio)
    assert all(a >= b for a, b in zip(values[t.warmup_steps - 1 :], values[t.warmup_steps :]))


def test_locked_text_tower_cache_gives_the_step_of_encoding_the_same_reports(enc_store, tiny_cfg):
    tiny_cfg = replace(tiny_cfg, text=replace(tiny_cfg.text, frozen_layers=6, freeze_projection=True,
                                              counterfactuals=0))
    corpus = ClipCorpus(enc_store)
    studies = corpus.with_reports()
    k = 3
    data = ContrastiveBatches(corpus, studies, 4, 2, 5, tiny_cfg.augment, tiny_cfg.preprocess, 0, 2, report_variants=k)
    texts = data.variant_texts()
    assert [len(v) for v in texts] == [k] * len(studies) and texts == data.variant_texts()  # seeded
    assert any(len(set(v)) > 1 for v in texts)  # variants differ (sentence order and choice)
    torch.manual_seed(0)
    model = CmrClip(tiny_cfg).eval()
    cache = ReportCache(texts, model)
    batch = data[0]
    assert "texts" not in batch and int(batch["report_ids"].max()) < len(studies) * k
    assert int(cache.done.sum()) == 0  # nothing is encoded before a batch draws it
    same = dict(batch, texts=[texts[i // k][i % k] for i in batch["report_ids"].tolist()])
    del same["report_ids"]
    loss_fn = ContrastiveLoss(flood=0.0)
    cached = micro_step(model, model, loss_fn, batch, 2, nullcontext(), reports=cache)["loss"].item()
    assert int(cache.done.sum()) == len((batch["report_ids"] // k).unique())  # the studies drawn
    model.zero_grad()
    encoded = micro_step(model, model, loss_fn, same, 2, nullcontext())["loss"].item()
    assert cached == pytest.approx(encoded, rel=1e-5)
    # and the locked tower receives no gradient either way
    assert all(p.grad is None for p in model.text.parameters())


def test_a_few_steps_reduce_the_loss(enc_store, tiny_cfg):
    torch.manual_seed(0)
    corpus = ClipCorpus(enc_store)
    data = ContrastiveBatches(corpus, corpus.with_reports(), 4, 2, 5, tiny_cfg.augment, tiny_cfg.preprocess, 0, 1)
    batch = data[0]
    model = CmrClip(tiny_cfg)
    tokens = model.text.tokenize(batch["texts"])
    loss_fn = ContrastiveLoss(flood=0.0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def loss():
        views, reports, studies, _ = model(batch["clips"], tokens, 2)
        return loss_fn(views, reports, batch["study_of_view"], model.scale(), studies)["loss"]

    model.eval()
    with torch.no_grad():
        before = loss().item()
    model.train()
    for _ in range(8):
        opt.zero_grad()
        loss().backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        after = loss().item()
    assert after < 0.8 * before, (before, after)


def test_checkpoint_round_trip_and_exact_resume(enc_store, tiny_cfg, tmp_path):
    straight = Trainer(enc_store, tiny_cfg, run_dir=tmp_path / "a", progress=False, log=lambda *_: None)
    done = straight.fit(max_steps=4)
    assert done.step == 4 and latest_checkpoint(enc_store) == done.checkpoint

    model, cfg, model_id, step = load_checkpoint(done.checkpoint)
    assert model_id == done.model_id and step == 4 and cfg.to_dict() == tiny_cfg.to_dict()
    for key, value in straight.model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key

    first = Trainer(enc_store, tiny_cfg, run_dir=tmp_path / "b", progress=False, log=lambda *_: None)
    first.fit(max_steps=2)
    with pytest.raises(InputError, match="--resume"):
        Trainer(enc_store, tiny_cfg, run_dir=tmp_path / "b", progress=False)
    resumed = Trainer(enc_store, tiny_cfg, run_dir=tmp_path / "b", resume=True, progress=False, log=lambda *_: None)
    assert resumed.step == 2
    again = resumed.fit(max_steps=4)
    assert again.model_id == done.model_id  # bit-identical weights to the uninterrupted run
    steps = [int(r["step"]) for r in csv.DictReader((tmp_path / "b" / "metrics.csv").read_text().splitlines())]
    assert steps == [1, 2, 3, 4]


def test_counterfactual_batches_are_seeded_rewrites_of_the_sampled_reports(enc_store, tiny_cfg):
    corpus = ClipCorpus(enc_store)
    data = ContrastiveBatches(corpus, corpus.with_reports(), 4, 2, 5, tiny_cfg.augment, tiny_cfg.preprocess, 0, 2,
                              counterfactuals=2)
    batch, again = data[1], data[1]
    assert batch["counterfactuals"] == again["counterfactuals"]  # the step's seed fixes them
    claims, rewrites, valid = batch["claims"], batch["counterfactuals"], batch["counterfactual_valid"]
    assert len(claims) == len(batch["texts"]) and len(rewrites) == 2 * len(claims)
    assert valid.shape == (len(claims), 2) and valid.any()
    from cmr_search.findings.parse import FindingParser, summarise

    parser = FindingParser()
    for j, (text, claim) in enumerate(zip(batch["texts"], claims)):
        # a sentence of the sampled report, or what it says of one finding, said plainly
        whole = summarise(parser.parse(text))
        assert claim in text or all((whole[f].present, whole[f].grade) == (s.present, s.grade)
                                    for f, s in summarise(parser.parse(claim)).items())
        for k in range(2):
            rewrite = rewrites[2 * j + k]
            assert bool(valid[j, k]) == bool(rewrite) and rewrite != claim


def test_claim_targets_say_which_studies_each_claim_and_rewrite_holds_for(enc_store, tiny_cfg):
    corpus = ClipCorpus(enc_store)
    data = ContrastiveBatches(corpus, corpus.with_reports(), 4, 2, 5, tiny_cfg.augment, tiny_cfg.preprocess, 0, 2,
                              counterfactuals=2, claim_targets=True)
    batch = data[1]
    targets, valid = batch["claim_targets"], batch["counterfactual_valid"]
    s = len(batch["claims"])
    assert targets.shape == (3 * s, s) and torch.equal(targets, data[1]["claim_targets"])
    own = torch.arange(s)
    claimed = torch.tensor([bool(c) for c in batch["claims"]])
    assert (targets[own, own][claimed] == 1).all()  # a claim from a study's report holds for it
    rewrites = targets[s:].view(s, 2, s)[own, :, own]  # [s, 2]: each study's own rewrites
    assert (rewrites[valid] != 1).all() and (rewrites[valid] == 0).any()  # rewrites say otherwise
    assert not (targets[s:].view(s, 2, s)[~valid] >= 0).any()  # padding is known of no study


def test_text_tower_training_with_counterfactuals_resumes_exactly(enc_store, tiny_cfg, tmp_path):
    cfg = replace(tiny_cfg, text=replace(tiny_cfg.text, frozen_layers=5, freeze_projection=False,
                                         counterfactuals=2))
    quiet = {"progress": False, "log": lambda *_: None}
    straight = Trainer(enc_store, cfg, run_dir=tmp_path / "a", **quiet)
    top = {k: v.clone() for k, v in straight.model.text.state_dict().items()}
    done = straight.fit(max_steps=4)
    moved = [k for k, v in straight.model.text.state_dict().items() if not torch.equal(v, top[k])]
    assert any("layer.5." in k for k in moved) and any("proj" in k for k in moved)
    assert not any("layer.4." in k or "embeddings" in k for k in moved)  # frozen layers stay
    rows = list(csv.DictReader((tmp_path / "a" / "metrics.csv").read_text().splitlines()))
    assert all(r["hard_err"] != "" for r in rows)

    Trainer(enc_store, cfg, run_dir=tmp_path / "b", **quiet).fit(max_steps=2)
    again = Trainer(enc_store, cfg, run_dir=tmp_path / "b", resume=True, **quiet).fit(max_steps=4)
    assert again.model_id == done.model_id  # bit-identical to the uninterrupted run


def test_the_alignment_phase_trains_the_text_tower_alone_and_resumes_exactly(enc_store, tiny_cfg, tmp_path):
    cfg = replace(tiny_cfg, text=replace(tiny_cfg.text, frozen_layers=5, freeze_projection=False, counterfactuals=2),
                  align=replace(tiny_cfg.align, max_steps=4, studies_per_batch=6, warmup_steps=1))
    with pytest.raises(InputError, match="freeze_projection"):
        replace(cfg, text=replace(cfg.text, freeze_projection=True))
    quiet = {"progress": False, "log": lambda *_: None}
    straight = Trainer(enc_store, cfg, run_dir=tmp_path / "a", **quiet)
    straight.fit(max_steps=cfg.train.max_steps)  # the joint phase alone
    before = {k: v.clone() for k, v in straight.model.state_dict().items()}
    done = straight.fit()
    assert done.step == cfg.train.max_steps + 4
    moved = {k for k, v in straight.model.state_dict().items() if not torch.equal(v, before[k])}
    assert any(k.startswith("text.bert.encoder.layer.5.") for k in moved) and "text.text_proj.weight" in moved
    assert all(k.startswith("text.") for k in moved), sorted(k for k in moved if not k.startswith("text."))
    rows = list(csv.DictReader((tmp_path / "a" / "metrics.csv").read_text().splitlines()))
    assert [int(r["step"]) for r in rows] == list(range(1, cfg.train.max_steps + 5))
    aligned = rows[cfg.train.max_steps:]
    assert all(r["hard"] != "" and float(r["loss"]) > 0 for r in aligned)
    assert aligned[-1]["val_R@1"] != ""  # validated at the end, on the locked video tower's embeddings

    # killed in the alignment phase and resumed: bit-identical to the uninterrupted run
    Trainer(enc_store, cfg, run_dir=tmp_path / "b", **quiet).fit(max_steps=cfg.train.max_steps + 2)
    again = Trainer(enc_store, cfg, run_dir=tmp_path / "b", resume=True, **quiet).fit()
    assert again.model_id == done.model_id


def test_training_augments_uint8_clips_on_the_device_when_asked(enc_store, tiny_cfg, tmp_path):
    with pytest.raises(InputError, match="augment_on"):
        replace(tiny_cfg, train=replace(tiny_cfg.train, augment_on="gpu"))
    cfg = replace(tiny_cfg, train=replace(tiny_cfg.train, augment_on="device"))
    auto = Trainer(enc_store, tiny_cfg, run_dir=tmp_path / "auto", progress=False, log=lambda *_: None)
    assert tiny_cfg.train.augment_on == "auto" and not auto.augments_on_device  # on a CPU, the loader
    straight = Trainer(enc_store, cfg, run_dir=tmp_path / "a", progress=False, log=lambda *_: None)
    assert straight.augments_on_device
    done = straight.fit(max_steps=3)
    rows = list(csv.DictReader((tmp_path / "a" / "metrics.csv").read_text().splitlines()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3] and all(float(r["loss"]) > 0 for r in rows)
    # same seeds, same batches: a resumed device-augmented run is bit-identical too
    Trainer(enc_store, cfg, run_dir=tmp_path / "b", progress=False, log=lambda *_: None).fit(max_steps=2)
    resumed = Trainer(enc_store, cfg, run_dir=tmp_path / "b", resume=True, progress=False, log=lambda *_: None)
    assert resumed.fit(max_steps=3).model_id == done.model_id


def test_a_run_started_before_a_new_setting_still_resumes(enc_store, tiny_cfg, tmp_path):
    Trainer(enc_store, tiny_cfg, run_dir=tmp_path / "r", progress=False, log=lambda *_: None).fit(max_steps=1)
    meta_path = tmp_path / "r" / "checkpoint" / "config.json"
    meta = json.loads(meta_path.read_text())
    del meta["config"]["train"]["augment_on"]  # as written by a cmr without that setting
    meta_path.write_text(json.dumps(meta))
    assert Trainer(enc_store, tiny_cfg, run_dir=tmp_path / "r", resume=True, progress=False, log=lambda *_: None).step == 1


def test_held_out_patients_follow_the_split_seed_not_the_training_seed(enc_store, tiny_cfg, tmp_path):
    def held_out(seed: int, split_seed: int | None) -> tuple[str, ...]:
        cfg = replace(tiny_cfg, train=replace(tiny_cfg.train, seed=seed, split_seed=split_seed, val_fraction=0.5))
        trainer = Trainer(enc_store, cfg, run_dir=tmp_path / f"{seed}-{split_seed}", progress=False, log=lambda *_: None)
        return tuple(sorted(s.study_uid for s in trainer.val_studies))

    own = {held_out(seed, None) for seed in (0, 1, 2)}
    assert len(own) > 1  # by default each training seed holds out its own patients
    assert len({held_out(seed, 3) for seed in (0, 1, 2)}) == 1  # one split for every seed
    assert held_out(0, 1) == held_out(1, None)  # split_seed draws the split that seed would


def test_a_resumed_run_logs_each_step_once(enc_store, tiny_cfg, tmp_path):
    cfg = replace(tiny_cfg, train=replace(tiny_cfg.train, checkpoint_every=4))
    Trainer(enc_store, cfg, run_dir=tmp_path / "r", progress=False, log=lambda *_: None).fit(max_steps=4)
    log = tmp_path / "r" / "metrics.csv"
    rows = list(csv.DictReader(log.read_text().splitlines()))
    # a killed run may have flushed steps after its last checkpoint: those steps run again
    with log.open("a", newline="") as fp:
        writer = csv.DictWriter(fp, fieldnames=list(rows[0]))
        writer.writerows([dict(rows[-1], step=5), dict(rows[-1], step=6)])
    Trainer(enc_store, cfg, run_dir=tmp_path / "r", resume=True, progress=False, log=lambda *_: None).fit(max_steps=6)
    assert [int(r["step"]) for r in csv.DictReader(log.read_text().splitlines())] == [1, 2, 3, 4, 5, 6]


def _any_rank_worker(rank: int, port: int, out) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    out.put((rank, any_rank(rank == 0, torch.device("cpu")), any_rank(False, torch.device("cpu"))))
    torch.distributed.destroy_process_group()


def test_ranks_agree_on_the_time_budget():
    """One rank past its deadline stops every rank at the same step (else DDP deadlocks)."""
    import multiprocessing as mp
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_any_rank_worker, args=(rank, port, out)) for rank in range(2)]
    for proc in procs:
        proc.start()
    got = sorted(out.get(timeout=120) for _ in procs)
    for proc in procs:
        proc.join(30)
    assert got == [(0, True, False), (1, True, False)]


def test_resume_with_another_config_is_refused(enc_store, tiny_cfg, tmp_path):
    Trainer(enc_store, tiny_cfg, run_dir=tmp_path / "r", progress=False, log=lambda *_: None).fit(max_steps=1)
    tiny_cfg.train.lr = 0.5
    with pytest.raises(InputError, match="another config"):
        Trainer(enc_store, tiny_cfg, run_dir=tmp_path / "r", resume=True, progress=False)


def _ckpt_step(run_dir) -> int:
    meta = run_dir / "checkpoint" / "config.json"
    try:
        return json.loads(meta.read_text())["step"]
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def test_kill_9_then_resume_loses_nothing_before_the_last_checkpoint(enc_store, tiny_cfg_file, tmp_path):
    cmd = [sys.executable, "-m", "cmr_search.cli", "train-encoder", "--store", str(enc_store), "--config", str(tiny_cfg_file),
           "--run-name", "killed", "--max-steps", "6", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    run_dir = enc_store / "encoders" / "runs" / "killed"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while _ckpt_step(run_dir) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = _ckpt_step(run_dir)
    assert killed_at in (2, 4)

    out = subprocess.run([*cmd, "--resume", "--json"], env=env, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["step"] == 6
    steps = [int(r["step"]) for r in csv.DictReader((run_dir / "metrics.csv").read_text().splitlines())]
    assert steps == sorted(set(steps)) and steps[-1] == 6 and set(range(killed_at + 1, 7)) <= set(steps)
    assert "resumed killed at step" in out.stderr
    # the resumed weights equal an uninterrupted run of the same config and seed
    reference = Trainer(enc_store, tiny_cfg_from(tiny_cfg_file), run_dir=tmp_path / "ref", progress=False,
                        log=lambda *_: None).fit(max_steps=6)
    assert result["model_id"] == reference.model_id
    state = load_file(run_dir / "checkpoint" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in state.values())


def tiny_cfg_from(path):
    from cmr_search.encoder.config import load_config

    return load_config(path)


def test_torchrun_ddp_on_two_cpu_ranks(enc_store, tiny_cfg_file, tmp_path):
    """The multi-GPU path (torchrun + DDP + feature gather) on two gloo ranks."""
    # --standalone: a free port, not a fixed one another job may hold
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd = [*torchrun, "-m", "cmr_search.cli", "train-encoder", "--store", str(enc_store), "--config", str(tiny_cfg_file),
           "--max-steps", "2", "--run-name", "ddp", "--json"]
    # TMPDIR: torchrun's torchelastic_* folder goes with the test's, not into /tmp for good
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])  # only rank 0 prints
    assert result["step"] == 2
    rows = list(csv.DictReader((enc_store / "encoders" / "runs" / "ddp" / "metrics.csv").read_text().splitlines()))
    assert [int(r["step"]) for r in rows] == [1, 2]
    # two ranks x 4 studies: the gathered batch has 8 reports, so v->t starts near log(8), not log(4)
    assert float(rows[0]["v2t"]) > 1.7


def test_the_progress_shows_the_validation_pool_and_chance():
    from cmr_search.encoder.runlog import progress_text

    assert progress_text(1.23456, {}) == "loss 1.235"
    text = progress_text(0.5, {"R@1": 1.0, "R@5": 1.0, "pool": 4})
    assert "R@5 1.00 of 4 studies (chance 1.00)" in text
    assert "(chance 0.05)" in progress_text(0.5, {"R@5": 0.3, "pool": 100})
