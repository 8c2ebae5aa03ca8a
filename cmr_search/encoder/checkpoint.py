"""Checkpoints: safetensors weights + a JSON config, ``model_id`` = content hash; and the
published ``cmr_c0.1`` Lightning checkpoint of Shad et al."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cmr_search.core.exceptions import InputError
from cmr_search.core.layout import StoreLayout, publish_folder
from cmr_search.encoder.config import EncoderConfig, load_config

__all__ = [
    "PUBLISHED_CONFIG",
    "LoadReport",
    "checkpoint_meta",
    "checkpoint_model_id",
    "export_encoder",
    "has_text_tower",
    "load_checkpoint",
    "load_text_encoder",
    "load_video_encoder",
    "save_checkpoint",
    "save_vision_checkpoint",
    "video_folder",
]

FORMAT = "cmr-encoder/1"
#: a vision tower alone (the published checkpoint registered in a store): video.safetensors
#: + config.json, named by the ``model_id`` of the file it came from
VISION_FORMAT = "cmr-vision/1"
#: a text tower aligned to another model's stored embeddings (``cmr train-text``):
#: model.safetensors (``text.*`` and ``logit_scale``) + config.json naming ``video_model``
TEXT_FORMAT = "cmr-text/1"
#: configuration of the published checkpoint: MViT-B 16x4 with the seed code's preprocessing
PUBLISHED_CONFIG = "mvit_b_16x4_published"
#: prefixes of the published Lightning state_dict that hold the vision tower
PUBLISHED_PREFIXES = ("model.video_encoder.", "model.video_proj.")


@dataclass
class LoadReport:
    """What a checkpoint load matched; a partial load is refused unless asked for."""

    source: str
    matched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model, not in the file
    unexpected: list[str] = field(default_factory=list)  # vision keys in the file the model lacks
    mismatched: list[str] = field(default_factory=list)  # same name, other shape
    ignored: int = 0  # keys outside the vision tower (text tower, heads, optimizer)

    @property
    def complete(self) -> bool:
        """True when every model tensor was loaded and nothing of the vision tower was left over."""
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        """One line for logs and errors."""
        parts = [f"{len(self.matched)} matched", f"{len(self.missing)} missing",
                 f"{len(self.unexpected)} unexpected", f"{len(self.mismatched)} shape mismatches"]
        detail = (self.missing + self.unexpected + self.mismatched)[:5]
        return f"{self.source}: " + ", ".join(parts) + (f" (e.g. {', '.join(detail)})" if detail else "")


def export_encoder(model: torch.nn.Module, cfg: EncoderConfig, store_root: Path, step: int,
                   latest: bool) -> tuple[str, Path]:
    """Publish a model's weights (no optimizer state) as ``STORE/encoders/<model_id>`` in one
    rename, and with ``latest`` point the store's ``LATEST`` at it; ``(model_id, folder)``."""
    from cmr_search.store.models import push_model, set_pointer

    layout = StoreLayout(store_root)
    tmp = layout.encoders / f".export-{os.getpid()}"
    model_id = save_checkpoint(model, cfg, tmp, step)
    folder = publish_folder(tmp, layout.encoder(model_id))
    push_model(layout, model_id)  # a store on object storage: into the bucket, for its other machines
    if latest:
        set_pointer(layout, layout.latest, model_id)
    return model_id, folder


def _hash_files(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as fp:
            for chunk in iter(lambda: fp.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def checkpoint_model_id(path: Path) -> str:
    """Content hash of a checkpoint (our folder: weights + config; a published file: its bytes;
    a registered vision tower: the hash of the file it came from, which its config records)."""
    path = Path(path)
    if path.is_dir():
        meta = checkpoint_meta(path)
        if meta.get("format") == VISION_FORMAT:
            return meta["model_id"]
        return _hash_files(path / "model.safetensors", path / "config.json")
    return _hash_files(path)


def checkpoint_meta(folder: Path) -> dict:
    """A checkpoint folder's config.json ({} for anything else: a file, a foreign folder)."""
    try:
        return json.loads((Path(folder) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):  # not a folder of ours
        return {}


def has_text_tower(folder: Path) -> bool:
    """Whether an encoder folder holds a text tower (ours and a text-aligned model's do; a
    registered vision tower not)."""
    return (checkpoint_meta(folder).get("format") in (FORMAT, TEXT_FORMAT)
            and (Path(folder) / "model.safetensors").exists())


def video_folder(folder: Path) -> Path:
    """The folder whose vision tower embeds for an encoder folder: itself, or for a
    text-aligned model the video model's folder beside it in the same store."""
    folder = Path(folder)
    meta = checkpoint_meta(folder)
    if meta.get("format") != TEXT_FORMAT:
        return folder
    video = folder.parent / meta["video_model"]
    if not (video / "config.json").exists():
        raise InputError(f"{folder} is a text tower aligned to model {meta['video_model']}, whose folder is not beside "
                         f"it ({video}); copy that model's folder too, or embed with the video model itself")
    return video


def save_vision_checkpoint(video: torch.nn.Module, cfg: EncoderConfig, out_dir: Path, model_id: str,
                           source: str) -> None:
    """Write a vision tower alone as ``out_dir/{video.safetensors, config.json}`` (the
    caller publishes the folder): what a store keeps of a checkpoint that has no text tower."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in video.state_dict().items()}
    save_file(state, out_dir / "video.safetensors", metadata={"format": VISION_FORMAT})
    (out_dir / "config.json").write_text(json.dumps(
        {"format": VISION_FORMAT, "model_id": model_id, "source": source, "config": cfg.to_dict()}, indent=2))
    for f in out_dir.iterdir():
        with open(f, "rb") as fp:
            os.fsync(fp.fileno())


def save_checkpoint(model: torch.nn.Module, cfg, out_dir: Path, step: int,
                    train_state: dict | None = None, meta: dict | None = None) -> str:
    """Write ``out_dir/{model.safetensors, config.json[, train_state.pt]}`` atomically (a
    temporary folder renamed into place) and return the checkpoint's ``model_id``. ``meta``:
    config.json's entries instead of ours (a text-aligned model's ``TEXT_FORMAT``)."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "step": step, "config": cfg.to_dict()} if meta is None else meta
    save_file(state, tmp / "model.safetensors", metadata={"format": meta["format"]})
    (tmp / "config.json").write_text(json.dumps(meta, indent=2))
    if train_state is not None:
        torch.save(train_state, tmp / "train_state.pt")
    for f in tmp.iterdir():  # the rename below must not publish data still in the page cache
        with open(f, "rb") as fp:
            os.fsync(fp.fileno())
    old = out_dir.with_name(out_dir.name + ".old")
    if out_dir.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return checkpoint_model_id(out_dir)


def _read_ours(path: Path) -> tuple[EncoderConfig, dict, int]:
    meta_path = path / "config.json"
    if not meta_path.exists() or not (path / "model.safetensors").exists():
        raise InputError(f"{path} is not an encoder checkpoint (needs model.safetensors and config.json)")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") not in (FORMAT, TEXT_FORMAT):
        raise InputError(f"{path}: checkpoint format {meta.get('format')!r}, this cmr reads {FORMAT}")
    return EncoderConfig.from_dict(meta["config"]), load_file(path / "model.safetensors"), int(meta.get("step", 0))


def load_checkpoint(path: Path, text: bool = True):
    """Our checkpoint folder -> (CmrClip in eval mode, config, model_id, step)."""
    from cmr_search.encoder.model import CmrClip

    path = Path(path)
    cfg, state, step = _read_ours(path)
    model = CmrClip(cfg, text=text)
    if not text:
        state = {k: v for k, v in state.items() if not k.startswith("text.")}
    model.load_state_dict(state, strict=True)
    return model.eval(), cfg, checkpoint_model_id(path), step


def _match(module: torch.nn.Module, state: dict, source: str, ignored: int = 0) -> tuple[LoadReport, dict]:
    own = module.state_dict()
    report = LoadReport(source=source, ignored=ignored)
    usable = {}
    for key, value in state.items():
        if key not in own:
            report.unexpected.append(key)
        elif tuple(own[key].shape) != tuple(value.shape):
            report.mismatched.append(f"{key} {tuple(value.shape)}!={tuple(own[key].shape)}")
        else:
            report.matched.append(key)
            usable[key] = value
    report.missing = [k for k in own if k not in state]
    return report, usable


def _read_published(path: Path, trust_pickle: bool) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as err:
        hint = "" if trust_pickle else (
            " It may hold Python objects besides tensors (Lightning hyper-parameters): if you trust"
            " the file, load it with trust_pickle=True (CLI: --trust-checkpoint)."
        )
        raise InputError(f"{path} cannot be read as a PyTorch checkpoint: {err}.{hint}") from err
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise InputError(f"{path} holds no state_dict")
    return state


def load_video_encoder(path: Path, allow_partial: bool = False, trust_pickle: bool = False,
                       config: str | None = None) -> torch.nn.Module:
    """The vision tower of our checkpoint folder or of the published Lightning ``.ckpt``,
    in eval mode: forward(preprocessed [B, 3, T, H, W]) -> L2-normalised [B, 512].

    The module carries ``.preprocess`` (its :class:`PreprocessConfig`), ``.model_id`` and
    ``.load_report``. A load that leaves tensors missing, unexpected or of the wrong shape
    raises unless ``allow_partial``.
    """
    from cmr_search.encoder.video import VideoEncoder

    path = Path(path)
    if not path.exists():
        raise InputError(f"checkpoint {path} does not exist")
    path = video_folder(path)  # a text-aligned model embeds with its video model
    if path.is_dir() and checkpoint_meta(path).get("format") == VISION_FORMAT:
        cfg = EncoderConfig.from_dict(checkpoint_meta(path)["config"])
        state, ignored = load_file(path / "video.safetensors"), 0
    elif path.is_dir():
        cfg, full, _ = _read_ours(path)
        state = {k.removeprefix("video."): v for k, v in full.items() if k.startswith("video.")}
        ignored = len(full) - len(state)
    else:
        cfg = load_config(config or PUBLISHED_CONFIG)
        full = _read_published(path, trust_pickle)
        state = {k.removeprefix("model."): v for k, v in full.items() if k.startswith(PUBLISHED_PREFIXES)}
        ignored = len(full) - len(state)
        if not state:
            raise InputError(
                f"{path} has no keys under {' or '.join(PUBLISHED_PREFIXES)}; is it the cmr_c0.1 checkpoint?"
            )
    module = VideoEncoder(cfg.vision, cfg.dim)
    report, usable = _match(module, state, str(path), ignored)
    if not report.complete and not allow_partial:
        raise InputError(f"refusing a partial load: {report.summary()}; pass allow_partial=True to accept it")
    module.load_state_dict(usable, strict=False)
    module.preprocess = cfg.preprocess
    module.model_id = checkpoint_model_id(path)
    module.load_report = report
    return module.eval()


def load_text_encoder(path: Path | None = None) -> torch.nn.Module:
    """A text tower in eval mode with ``encode(list[str]) -> [N, 512]``.

    ``path`` is one of our checkpoint folders (the trained tower and projection), a local
    Hugging Face folder (that BERT with an untrained projection), or None: the packaged
    all-MiniLM-L6-v2 with an untrained projection (seeded, so it is reproducible).
    """
    from cmr_search.encoder.text import TextConfig, TextEncoder

    if path is not None and (Path(path) / "model.safetensors").exists() and (Path(path) / "config.json").exists():
        meta = json.loads((Path(path) / "config.json").read_text())
        if meta.get("format") in (FORMAT, TEXT_FORMAT):
            cfg, full, _ = _read_ours(Path(path))
            module = TextEncoder(cfg.text, cfg.dim)
            module.load_state_dict({k.removeprefix("text."): v for k, v in full.items() if k.startswith("text.")})
            module.model_id = checkpoint_model_id(Path(path))
            return module.eval()
    text_cfg = TextConfig() if path is None else TextConfig(model=str(path), sha256=None)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        module = TextEncoder(text_cfg)
    module.model_id = None
    return module.eval()
