"""What a GPU buys, measured side by side in one run: MViT-B 16x4 embedding (bf16 against
fp32, and a whole study through `Embedder`), contrastive training steps (bf16 against fp32
through `encoder.train.micro_step`), and exact search on the GPU (`TorchExactIndex`)
against FAISS on the same machine's CPU cores, exact and IVF as `VectorIndex` builds them.

    python benchmarks/gpu.py [--sizes 100000 1000000] [--json gpu.json]
    python benchmarks/gpu.py --smoke        # tiny sizes and the CPU configuration (no GPU needed)

Only torch, numpy, transformers and faiss are needed (no lancedb), so it runs on a lent GPU
machine with faiss-cpu carried as a wheel. Weights are random: speed does not depend on
their values. `--text-config DIR` names a Hugging Face folder with the text model's
config.json and tokenizer but no weights (the packaged all-MiniLM-L6-v2 is 90 MB); random
weights of that architecture are written next to them.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from vectors import DIM, embeddings, latency, qps, recall

REPORT = ("Cine SSFP images of the heart were obtained. The left ventricle is severely dilated. "
          "Left ventricular systolic function is severely reduced with an ejection fraction of 25 percent. "
          "There is akinesis of the apex with a small apical thrombus. The right ventricle is normal in size. "
          "No pericardial effusion.")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Mean seconds per call after warm-up calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / repeats


def _amp(device: torch.device, precision: str):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and precision == "bf16" else nullcontext()


def _peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def embedding(config: str, device: torch.device, batches: list[int], repeats: int, work: Path,
              compile: bool = False) -> dict:
    """Vision tower clips/s per precision and batch; one 14-clip study end to end."""
    from cmr_search.encoder.checkpoint import save_checkpoint
    from cmr_search.encoder.config import load_config
    from cmr_search.encoder.embed import Embedder, encode_study
    from cmr_search.encoder.model import CmrClip

    cfg = load_config(config)
    torch.manual_seed(0)
    model = CmrClip(cfg, text=False).eval()
    ckpt = work / "ckpt"
    save_checkpoint(model, cfg, ckpt, 0)
    video = model.video.to(device)
    shape = (3, cfg.vision.frames, cfg.preprocess.crop, cfg.preprocess.crop)
    rows = []
    with torch.inference_mode():
        probe = torch.randn(16, *shape, device=device)
        ref = video(probe).float()
        with _amp(device, "bf16"):
            low = video(probe).float()
        agreement = float((ref * low).sum(1).min())  # both L2-normalised: cosine
        for precision in ("fp32", "bf16"):
            for b in batches:
                _reset_peak(device)
                x = torch.randn(b, *shape, device=device)

                def run(x=x, precision=precision):
                    with _amp(device, precision):
                        video(x)

                sec = _timed(run, device, repeats)
                rows.append({"precision": precision, "batch": b, "clips_per_s": b / sec, "ms_per_batch": 1e3 * sec,
                             "peak_gib": _peak_gib(device)})
    # a whole study as the service embeds one: uint8 clips in, views + pooled study out
    embedder = Embedder(ckpt, device=str(device))
    clips = np.random.default_rng(0).integers(0, 255, (14, cfg.vision.frames, cfg.preprocess.crop, cfg.preprocess.crop),
                                              dtype=np.uint8)
    out = {"config": config, "params_M": sum(p.numel() for p in video.parameters()) / 1e6,
           "bf16_vs_fp32_min_cosine": agreement, "rows": rows,
           "study_14_clips_ms": 1e3 * _timed(lambda: encode_study(clips, embedder), device, repeats)}
    if compile:
        compiled = Embedder(ckpt, device=str(device), compile=True, compile_batch=16)
        t0 = time.perf_counter()
        views, _, _ = encode_study(clips, compiled)
        out["compile_s"] = time.perf_counter() - t0
        out["compiled_vs_eager_min_cosine"] = float((views * encode_study(clips, embedder)[0]).sum(1).min())
        out["study_14_clips_compiled_ms"] = 1e3 * _timed(lambda: encode_study(clips, compiled), device, repeats)
        many = np.concatenate([clips] * 5)  # 70 clips: four full batches of 16 and a padded one
        sec = _timed(lambda: compiled.encode_clips(many), device, max(1, repeats // 2))
        out["compiled_clips_per_s_uint8_in"] = len(many) / sec
    return out


def _text_folder(src: Path | None, work: Path) -> Path | None:
    """A text-model folder with random weights of the architecture in ``src`` (None: the packaged model)."""
    if src is None:
        return None
    from transformers import AutoConfig, AutoModel

    out = work / "text"
    shutil.copytree(src, out)
    torch.manual_seed(0)
    AutoModel.from_config(AutoConfig.from_pretrained(out)).save_pretrained(out)
    return out


def training(config: str, device: torch.device, text_dir: Path | None, steps: int, compile: bool = False) -> list[dict]:
    """Seconds per optimizer step of the whole contrastive model, per precision; the batch
    halves until it fits (the figure per clip stays comparable)."""
    from cmr_search.encoder.config import load_config

    cfg = load_config(config)
    if text_dir is not None:
        cfg.text = replace(cfg.text, model=str(text_dir), sha256=None)
    rows = []
    for precision, compiled in [("bf16", False), ("fp32", False)] + ([("bf16", True)] if compile else []):
        studies = cfg.train.studies_per_batch
        while studies >= 1:
            _reset_peak(device)
            try:
                rows.append(_train_steps(cfg, precision, studies, device, steps, compiled))
                break
            except torch.cuda.OutOfMemoryError:
                studies //= 2
    return rows


def _train_steps(cfg, precision: str, studies: int, device: torch.device, steps: int, compile: bool) -> dict:
    from cmr_search.encoder.data import sample_augment
    from cmr_search.encoder.loss import ContrastiveLoss
    from cmr_search.encoder.model import CmrClip
    from cmr_search.encoder.train import micro_step, param_groups

    t = cfg.train
    torch.manual_seed(0)
    model = CmrClip(cfg).to(device).train()
    optimizer = torch.optim.AdamW(param_groups(model, t), betas=(0.9, 0.98), eps=1e-6)
    loss_fn = ContrastiveLoss(cfg.loss.lam, cfg.loss.flood, cfg.loss.study_weight)
    # as the Trainer gets them on a GPU (train.augment_on "auto"): uint8 clips at the crop
    # size on the host with their augmentation's parameters, augmented in micro_step
    n, side = studies * t.views_per_study, cfg.preprocess.crop
    clips = torch.randint(0, 256, (n, cfg.vision.frames, side, side), dtype=torch.uint8)
    batch = {"clips": clips.pin_memory() if device.type == "cuda" else clips,
             "augment": sample_augment(n, cfg.augment, torch.Generator().manual_seed(0)), "texts": [REPORT] * studies}
    losses = []
    net = torch.compile(model) if compile else model  # as Trainer(compile=True) does

    def step():
        out = micro_step(net, model, loss_fn, batch, t.views_per_study, _amp(device, precision))
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(out["loss"].detach()))

    t0 = time.perf_counter()
    step()  # the first step compiles
    first = time.perf_counter() - t0
    sec = _timed(step, device, steps)
    copy = float_copy = 0.0
    if device.type == "cuda":  # the uint8 batch against the float batch a loader-side augmentation hands over
        floats = torch.empty(n, 3, *clips.shape[1:]).pin_memory()
        copy = _timed(lambda: batch["clips"].to(device), device, 3, warmup=1)
        float_copy = _timed(lambda: floats.to(device), device, 3, warmup=1)
    return {"precision": precision, "compiled": compile, "first_step_s": first, "studies_per_step": studies, "clips_per_step": n, "s_per_step": sec,
            "clips_per_s": n / sec, "host_to_device_s": copy, "host_to_device_float_s": float_copy,
            "peak_gib": _peak_gib(device), "loss_finite": all(math.isfinite(v) for v in losses)}


def search(sizes: list[int], n_queries: int, k: int, device: torch.device) -> list[dict]:
    """GPU exact search against FAISS on the CPU (exact, and IVF as VectorIndex builds it)."""
    rows = []
    for n in sizes:
        rows.append(_search_size(n, n_queries, k, device))
        _reset_peak(device)
    return rows


def _search_size(n: int, n_queries: int, k: int, device: torch.device) -> dict:
    import faiss

    from cmr_search.store.index.torch_exact import TorchExactIndex

    data = embeddings(n + n_queries, seed=n)
    x, queries = data[:n], data[n:]
    ids = np.arange(n, dtype=np.int64) * 7 + 3  # ids are not row numbers
    out: dict = {"rows": n, "faiss_threads": faiss.omp_get_max_threads()}
    t0 = time.perf_counter()
    gpu = TorchExactIndex(DIM, str(device))
    gpu.add_with_ids(x, ids)
    _sync(device)
    out["gpu_load_s"] = time.perf_counter() - t0
    flat = faiss.IndexIDMap(faiss.IndexFlatIP(DIM))
    flat.add_with_ids(x, ids)
    _, truth = flat.search(queries, k)
    nlist = 2 ** round(math.log2(4 * math.sqrt(n)))  # IndexConfig's default
    t0 = time.perf_counter()
    ivf = faiss.index_factory(DIM, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
    ivf.cp.niter = 10
    rng = np.random.default_rng(0)
    ivf.train(x[rng.choice(n, min(n, 40 * nlist), replace=False)])
    ivf.add_with_ids(x, ids)
    out["ivf_build_s"] = time.perf_counter() - t0
    faiss.extract_index_ivf(ivf).nprobe = 32
    faiss.extract_index_ivf(ivf).parallel_mode = 1
    single = queries[:300]
    allowed = np.sort(ids[rng.random(n) < 0.1])  # a filter that keeps 10% of the rows
    select = faiss.SearchParameters(sel=faiss.IDSelectorBatch(allowed))
    cases = {
        "gpu_exact": (lambda q: gpu.search(q, k), lambda q: gpu.search(q, k, allowed)),
        "faiss_cpu_exact": (lambda q: flat.search(q, k), lambda q: flat.search(q, k, params=select)),
        "faiss_cpu_ivf32": (lambda q: ivf.search(q, k), None),
    }
    for name, (fn, filtered) in cases.items():
        fn(queries[:8])  # warm-up
        p50, p99, found = latency(lambda v, fn=fn: fn(v[None])[1][0], single)
        out[f"{name}_p50_ms"], out[f"{name}_p99_ms"] = p50, p99
        out[f"{name}_recall@{k}"] = recall(np.array(found), truth[: len(single)])
        out[f"{name}_qps_batch64"] = qps(fn, queries, 64)
        if filtered is not None:
            out[f"{name}_filtered10_p50_ms"] = latency(lambda v, f=filtered: f(v[None]), single[:100])[0]
    out["gpu_vs_faiss_exact_p50"] = out["faiss_cpu_exact_p50_ms"] / out["gpu_exact_p50_ms"]
    out["gpu_vs_faiss_ivf_p50"] = out["faiss_cpu_ivf32_p50_ms"] / out["gpu_exact_p50_ms"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="mvit_b_16x4")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 14, 64])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per precision")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--text-config", type=Path, help="text model folder without weights (see above)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["embedding", "training", "search"])
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile (a minute or more each)")
    parser.add_argument("--smoke", action="store_true", help="CPU configuration, tiny sizes: checks the script runs")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.smoke:
        args.config, args.batches, args.repeats, args.steps = "mvit_xs_cpu", [2], 1, 1
        args.sizes, args.queries = [3000], 100
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result: dict = {"machine": {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor(),
                                "torch": torch.__version__, "cpu_threads": torch.get_num_threads()}}
    print(json.dumps(result["machine"]), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "embedding" not in args.skip:
            e = result["embedding"] = embedding(args.config, device, args.batches, args.repeats, work, args.compile)
            print(f"\n{e['config']} vision tower, {e['params_M']:.1f}M params; bf16 vs fp32 embeddings: "
                  f"min cosine {e['bf16_vs_fp32_min_cosine']:.4f}")
            for r in e["rows"]:
                print(f"  {r['precision']:<5} batch {r['batch']:>3}: {r['clips_per_s']:9.1f} clips/s  "
                      f"{r['ms_per_batch']:8.2f} ms/batch  peak {r['peak_gib']:.1f} GiB")
            print(f"  one 14-clip study through Embedder (uint8 in, views + study out): {e['study_14_clips_ms']:.1f} ms",
                  flush=True)
            if "compile_s" in e:
                print(f"  compiled Embedder: {e['study_14_clips_compiled_ms']:.1f} ms per study, "
                      f"{e['compiled_clips_per_s_uint8_in']:.0f} clips/s (uint8 in); compiling took {e['compile_s']:.0f} s; "
                      f"min cosine to eager {e['compiled_vs_eager_min_cosine']:.4f}", flush=True)
        if "training" not in args.skip:
            rows = result["training"] = training(args.config, device, _text_folder(args.text_config, work), args.steps,
                                                  args.compile)
            print(f"\n{args.config} contrastive training step (AdamW, clip, both towers):")
            for r in rows:
                print(f"  {r['precision'] + ('+compile' if r['compiled'] else ''):<13} {r['studies_per_step']:>3} studies ({r['clips_per_step']} clips): "
                      f"{r['s_per_step']:.3f} s/step  {r['clips_per_s']:8.1f} clips/s  peak {r['peak_gib']:.1f} GiB  "
                      f"host->device {1e3 * r['host_to_device_s']:.0f} ms (float clips {1e3 * r['host_to_device_float_s']:.0f} ms)  "
                      f"first step {r['first_step_s']:.1f} s  "
                      f"loss finite {r['loss_finite']}")
            if len(rows) >= 2:
                print(f"  bf16 / fp32 clips/s: {rows[0]['clips_per_s'] / rows[1]['clips_per_s']:.2f}x", flush=True)
        if "search" not in args.skip:
            rows = result["search"] = search(args.sizes, args.queries, args.k, device)
            print(f"\nsearch, k={args.k}, {args.queries} queries (p50 of 300 single queries; batches of 64):")
            for r in rows:
                print(f"  {r['rows']:>9,} rows  (faiss on {r['faiss_threads']} threads; GPU load {r['gpu_load_s']:.2f} s, "
                      f"IVF build {r['ivf_build_s']:.1f} s)")
                for name in ("gpu_exact", "faiss_cpu_exact", "faiss_cpu_ivf32"):
                    filt = r.get(f"{name}_filtered10_p50_ms")
                    print(f"    {name:<16} p50 {r[f'{name}_p50_ms']:7.2f} ms  p99 {r[f'{name}_p99_ms']:7.2f} ms  "
                          f"{r[f'{name}_qps_batch64']:9.0f} q/s  recall@{args.k} {r[f'{name}_recall@{args.k}']:.3f}"
                          + (f"  filtered(10%) p50 {filt:.2f} ms" if filt is not None else ""))
                print(f"    GPU exact is {r['gpu_vs_faiss_exact_p50']:.1f}x faiss exact, "
                      f"{r['gpu_vs_faiss_ivf_p50']:.1f}x faiss IVF (p50)", flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
