"""The encoders a store holds: ``STORE/encoders/<model_id>/`` with a card, and the store's
default model.

Every model whose embeddings are in the store is registered here, wherever it was trained:
a checkpoint folder of ours from another store is copied in, the published ``cmr_c0.1``
Lightning file is kept as its vision tower alone (``VISION_FORMAT``: it has no text tower).
Folders are content-addressed by ``model_id``, so the same weights are never stored twice.
The card (``card.json``, beside the weights, not part of the hash) says where a model came
from and whether it has a text tower; ``DEFAULT`` names the model that search, heads and the
service use when none is named: the first model embedded, or the user's choice. Evaluation
baselines never become the default.

For a store on object storage the bucket holds every registered model and the pointers
(``store.models``): registering uploads the folder, setting the default writes the shared
``DEFAULT``, and a model this machine lacks is downloaded into its state folder when looked
up (once: a model_id never changes its weights).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from cmr_search.core.exceptions import InputError
from cmr_search.core.layout import StoreLayout, publish_folder, write_atomic
from cmr_search.encoder.checkpoint import (
    PUBLISHED_CONFIG,
    TEXT_FORMAT,
    VISION_FORMAT,
    checkpoint_meta,
    checkpoint_model_id,
    has_text_tower,
    load_video_encoder,
    save_vision_checkpoint,
    video_folder,
)
from cmr_search.encoder.config import EncoderConfig, load_config
from cmr_search.store.models import (
    pull_model,
    pull_models,
    push_model,
    set_pointer,
    shared_model_ids,
)

__all__ = ["ORIGINS", "EncoderRegistry"]

#: where a registered model came from
ORIGINS = ("trained", "imported", "published", "baseline", "aligned")


class EncoderRegistry:
    """The encoders of one store, their cards and the default model."""

    def __init__(self, store_root: Path):
        self.layout = StoreLayout(store_root)
        pull_models(self.layout)  # on object storage: the shared DEFAULT and LATEST, and their models

    # -- reading ------------------------------------------------------------------------------
    def model_ids(self) -> list[str]:
        """Registered models (a folder with a config), oldest first (on object storage the
        bucket's, each copied here on first sight)."""
        for model_id in shared_model_ids(self.layout):
            pull_model(self.layout, model_id)
        if not self.layout.encoders.exists():
            return []
        found = [p for p in self.layout.encoders.iterdir()
                 if p.is_dir() and not p.name.startswith(".") and p != self.layout.runs and (p / "config.json").exists()]
        return [p.name for p in sorted(found, key=lambda p: (self._card_at(p).get("registered_at", ""), p.name))]

    def card(self, model_id: str) -> dict:
        """What the store knows of one model; a folder without a card (a store from before
        cards) gets one read from its config."""
        folder = self.layout.encoder(model_id)
        if not pull_model(self.layout, model_id):
            have = ", ".join(self.model_ids()) or "none"
            raise InputError(f"no encoder {model_id!r} is registered in {self.layout.root} (registered: {have}); "
                             "`cmr embed --checkpoint PATH` registers the encoder it embeds with")
        return self._card_at(folder)

    def _card_at(self, folder: Path) -> dict:
        try:
            return json.loads((folder / "card.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return _card(folder, "trained", "", folder.name)  # a store from before cards: the folder is the model_id

    def config(self, model_id: str) -> EncoderConfig:
        """A registered model's configuration."""
        self.card(model_id)
        return EncoderConfig.from_dict(checkpoint_meta(self.layout.encoder(model_id))["config"])

    @property
    def default(self) -> str | None:
        """The store's default model, where one is set."""
        return self.layout.default_model_id()

    # -- writing ------------------------------------------------------------------------------
    def set_default(self, model_id: str) -> None:
        """Make ``model_id`` (registered) the store's default model."""
        card = self.card(model_id)
        if card["origin"] == "baseline":
            raise InputError(f"{model_id} is the evaluation's random-init baseline; it cannot be the default model")
        set_pointer(self.layout, self.layout.default, model_id)

    def register(self, checkpoint: Path, origin: str | None = None, *, allow_partial: bool = False,
                 trust_pickle: bool = False, config: str | None = None) -> str:
        """Make sure the model of ``checkpoint`` (a folder of ours anywhere, or a published
        ``.ckpt``) is registered in this store; its ``model_id``. ``origin`` defaults to
        "trained" for a folder already in this store, "imported" for another folder and
        "published" for a Lightning file."""
        checkpoint = Path(checkpoint)
        if not checkpoint.exists():
            raise InputError(f"checkpoint {checkpoint} does not exist")
        model_id = checkpoint_model_id(checkpoint)
        final = self.layout.encoder(model_id)
        if pull_model(self.layout, model_id):  # registered here, or by another machine of the store
            if not (final / "card.json").exists():  # a store from before cards
                self._write_card(final, _card(final, origin or "trained", checkpoint.name, model_id))
            push_model(self.layout, model_id, card=False)  # (a store from before sharing: its models too)
            return model_id
        tmp = self.layout.encoders / f".register-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            if checkpoint.is_dir():
                if not (has_text_tower(checkpoint) or checkpoint_meta(checkpoint).get("format") == VISION_FORMAT):
                    raise InputError(f"{checkpoint} is not an encoder folder (needs model.safetensors and config.json)")
                if checkpoint_meta(checkpoint).get("format") == TEXT_FORMAT:
                    # a text-aligned model needs its video model in the store: that one embeds
                    self.register(video_folder(checkpoint))
                tmp.mkdir(parents=True)
                pointer = self.layout.vectors_of(model_id).name  # a text-aligned model's video model
                for name in ("model.safetensors", "video.safetensors", "config.json", pointer):
                    if (checkpoint / name).exists():
                        shutil.copy2(checkpoint / name, tmp / name)
                origin = origin or "imported"
            else:
                video = load_video_encoder(checkpoint, allow_partial=allow_partial, trust_pickle=trust_pickle,
                                           config=config)
                cfg = load_config(config or PUBLISHED_CONFIG)
                save_vision_checkpoint(video, cfg, tmp, model_id, checkpoint.name)
                origin = origin or "published"
            self._write_card(tmp, _card(tmp, origin, checkpoint.name, model_id))
            publish_folder(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        push_model(self.layout, model_id)
        return model_id

    def note(self, model_id: str, origin: str, **extra) -> None:
        """Record a model's origin (training writes "trained", the evaluation "baseline")."""
        folder = self.layout.encoder(model_id)
        card = self._card_at(folder) | {"origin": origin, **extra}
        self._write_card(folder, card)
        push_model(self.layout, model_id)  # the folder, or where the bucket has it, the new card

    @staticmethod
    def _write_card(folder: Path, card: dict) -> None:
        if card["origin"] not in ORIGINS:
            raise InputError(f"unknown encoder origin {card['origin']!r}; one of {', '.join(ORIGINS)}")
        write_atomic(folder / "card.json", json.dumps(card, indent=2))


def _card(folder: Path, origin: str, source: str, model_id: str) -> dict:
    """A card from what the folder holds: its config's name and step, its text tower."""
    meta = checkpoint_meta(folder)
    return {
        "model_id": model_id,
        "origin": origin,
        "source": source,  # the file or folder name it came from (no machine path)
        "config": meta.get("config", {}).get("name", "custom"),
        "step": meta.get("step"),
        "text_tower": has_text_tower(folder),
        # a text-aligned model: the video model whose tower and stored embeddings it uses
        "video_model": meta.get("video_model"),
        "registered_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
