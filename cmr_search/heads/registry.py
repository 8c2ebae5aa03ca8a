"""The head registry: ``STORE/heads/<name>/{model.safetensors, card.json}``.

A card says what the head predicts and from what: task, labels, kind, the encoder's
``model_id``, the label source and its sha256, the split and seeds, the metrics and the
training time. A head only runs on embeddings of its own ``model_id``.

On object storage every machine of the store sees the same heads: registering one shares it
(``store.models.push_head``), and the registry brings its copies up to date from the bucket
before it lists or reads them (at most every ``refresh_s``).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from cmr_search.core.exceptions import InputError
from cmr_search.core.layout import StoreLayout
from cmr_search.heads.config import HeadConfig
from cmr_search.heads.data import Bags, LabelSet, load_bags, load_labels, patient_split
from cmr_search.heads.model import build_head
from cmr_search.heads.train import (
    TrainedHead,
    fit_head,
    metrics_for,
    predict_outputs,
    to_label_units,
)
from cmr_search.store.embedding_store import EmbeddingStore
from cmr_search.store.models import pull_heads, push_head
from cmr_search.store.search import default_model_id
from cmr_search.store.withdrawal import finish_pending_withdrawals

__all__ = ["CARD_FORMAT", "Head", "HeadRegistry", "evaluate_head", "open_store", "predict_head", "train_head"]

CARD_FORMAT = "cmr-head/1"
HEAD_FILE_FORMAT = "cmr-head-file/1"  # one exported head: weights + the card in the metadata
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")


@dataclass
class Head:
    """A registered head, loaded: ``predict`` for one or many studies."""

    name: str
    card: dict
    model: torch.nn.Module

    @property
    def model_id(self) -> str:
        return self.card["model_id"]

    def predict_bags(self, bags: Bags) -> list[dict]:
        """Per study: the prediction of each label (probability for classification, label
        units for regression), the call at the card's threshold, and the attention per view."""
        if bags.model_id != self.model_id:
            raise InputError(f"head {self.name} was trained on embeddings of model {self.model_id}, not "
                             f"{bags.model_id}; embed with that encoder or train a head for this one")
        outputs, attention = predict_outputs(self.model, bags)
        values = to_label_units(self.card["task"], outputs, self.card["target"])
        out = []
        for i, uid in enumerate(bags.study_uids):
            pred = {name: float(values[i, j]) for j, name in enumerate(self.card["labels"])}
            row = {"study_uid": uid, "head": self.name, "task": self.card["task"], "prediction": pred}
            if self.card["task"] != "regression":
                row["positive"] = {n: pred[n] >= t for n, t in self.card["thresholds"].items()}
            if len(attention[i]):
                row["attention"] = [{**v, "weight": float(w)} for v, w in zip(bags.view_names[i], attention[i])]
            out.append(row)
        return out

    def predict(self, store: EmbeddingStore, study_uids: list[str]) -> list[dict]:
        """Predictions for these stored studies (embeddings of the head's model_id)."""
        return self.predict_bags(load_bags(store, self.model_id, list(study_uids)))


class HeadRegistry:
    """The heads of one store."""

    def __init__(self, store_root: Path, refresh_s: float = 1.0):
        self.layout = StoreLayout(store_root)
        self.root = self.layout.heads
        self.refresh_s, self._pulled = refresh_s, -float("inf")

    def _pull(self) -> None:
        """On object storage: the bucket's heads copied here, at most every ``refresh_s``
        (a listing each time: the service asks on every prediction)."""
        if self.layout.uri is not None and time.monotonic() - self._pulled >= self.refresh_s:
            pull_heads(self.layout)
            self._pulled = time.monotonic()

    def names(self) -> list[str]:
        """Registered heads, by name."""
        self._pull()
        return sorted(p.name for p in self.root.glob("*")
                      if not p.name.startswith(".") and (p / "card.json").exists()) if self.root.exists() else []

    def cards(self) -> list[dict]:
        """Every head's card."""
        return [self.card(n) for n in self.names()]

    def card(self, name: str) -> dict:
        """One head's card."""
        self._pull()
        path = self.root / name / "card.json"
        if not _NAME.match(name) or not path.exists():
            have = ", ".join(self.names()) or "none yet; train one with `cmr heads train`"
            raise InputError(f"no head named {name!r} in this store (heads: {have})")
        return json.loads(path.read_text())

    def save(self, name: str, trained: TrainedHead, extra: dict, replace: bool = False) -> Path:
        """Write weights and card atomically (a temporary folder renamed into place)."""
        if not _NAME.match(name):
            raise InputError(f"head name {name!r}: use letters, digits, '.', '_', '+' and '-' (up to 128)")
        self._pull()  # a head of that name from another machine counts too
        final = self.root / name
        if final.exists() and not replace:
            raise InputError(f"a head named {name} exists; pass --replace to overwrite it or choose another --name")
        card = {"format": CARD_FORMAT, "name": name, "task": trained.task, "labels": trained.labels,
                "kind": trained.config.kind, "config": trained.config.to_dict(), "target": trained.target,
                "thresholds": trained.thresholds, "metrics": trained.metrics, "split": trained.split,
                "training_seconds": round(trained.seconds, 3), "epochs": trained.epochs,
                "best_epoch": trained.best_epoch, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                **extra}
        return self._publish(name, trained.model.state_dict(), card)

    def export(self, name: str, out: Path) -> Path:
        """One head as one safetensors file: its weights, and its card in the file's metadata
        (``cmr heads import`` reads it in another store). Written by rename: never half a file."""
        card = self.card(name)
        out = Path(out)
        if out.is_dir():
            out = out / f"{name}.head.safetensors"
        state = load_file(self.root / name / "model.safetensors")
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        try:
            save_file(state, tmp, metadata={"format": HEAD_FILE_FORMAT, "card": json.dumps(card)})
            os.replace(tmp, out)
        except OSError as error:
            tmp.unlink(missing_ok=True)
            raise InputError(f"cannot write the head to {out}: {error.strerror}; choose another --out") from None
        return out

    def import_file(self, path: Path, name: str | None = None, replace: bool = False) -> str:
        """Register the head of an exported file under ``name`` (default: its own); its name.
        The card keeps the encoder's ``model_id``: the head runs on embeddings of that model."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        try:
            with safe_open(str(path), "pt") as fp:
                meta = fp.metadata() or {}
                state = {k: fp.get_tensor(k) for k in fp.keys()}  # noqa: SIM118 (a safe_open, not a dict)
        except FileNotFoundError:
            raise InputError(f"head file {path} does not exist") from None
        except (SafetensorError, OSError) as error:  # a foreign or truncated file
            raise InputError(f"{path} is not a head file written by `cmr heads export` ({error})") from None
        if meta.get("format") != HEAD_FILE_FORMAT or "card" not in meta:
            raise InputError(f"{path} is not a head file written by `cmr heads export` (format {meta.get('format')!r})")
        card = json.loads(meta["card"])
        if card.get("format") != CARD_FORMAT:
            raise InputError(f"{path} holds a head of card format {card.get('format')!r}; this version reads {CARD_FORMAT}")
        name = name or card["name"]
        if not _NAME.match(name):
            raise InputError(f"head name {name!r}: use letters, digits, '.', '_', '+' and '-' (up to 128)")
        self._pull()  # a head of that name from another machine counts too
        final = self.root / name
        if final.exists() and not replace:
            raise InputError(f"a head named {name} exists; pass --replace to overwrite it or choose another --name")
        card = card | {"name": name, "imported_from": path.name,
                       "imported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        cfg = HeadConfig.from_dict(card["config"])
        build_head(cfg, card["task"], card["dim"], len(card["labels"])).load_state_dict(state)  # refuse a bad file now
        self._publish(name, state, card)
        return name

    def _publish(self, name: str, state: dict, card: dict) -> Path:
        """Weights and card into ``heads/name`` by one rename (an old head of that name replaced)."""
        final = self.root / name
        tmp = self.root / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in state.items()}, tmp / "model.safetensors",
                  metadata={"format": CARD_FORMAT})
        (tmp / "card.json").write_text(json.dumps(_jsonable(card), indent=2))
        old = self.root / f".{name}.old-{os.getpid()}"
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        push_head(self.layout, name)  # on object storage: for the store's other machines
        return final

    def load(self, name: str) -> Head:
        """A head ready to predict."""
        card = self.card(name)
        if card.get("format") != CARD_FORMAT:
            raise InputError(f"head {name} has card format {card.get('format')!r}; this version reads {CARD_FORMAT}")
        cfg = HeadConfig.from_dict(card["config"])
        model = build_head(cfg, card["task"], card["dim"], len(card["labels"]))
        model.load_state_dict(load_file(self.root / name / "model.safetensors"))
        return Head(name, card, model.eval())


def open_store(store_root: Path) -> EmbeddingStore:
    """The store's embedding tables, for reading by a head."""
    # a crash mid-withdrawal: finish it before any head reads those studies
    store = EmbeddingStore.open(Path(store_root))
    finish_pending_withdrawals(store)
    return store


def _require_embeddings(store: EmbeddingStore, head: Head) -> None:
    """A head imported from another store runs only once this store holds its encoder's embeddings."""
    have = store.model_ids("studies")
    if store.vectors_of(head.model_id) in have:
        return
    layout = StoreLayout(store.root)
    where = (f"{layout.encoder(head.model_id)}" if (layout.encoder(head.model_id) / "config.json").exists()
             else f"<the store the head was trained in>/encoders/{head.model_id}")
    raise InputError(f"head {head.name} runs on embeddings of model {head.model_id}, which {store.root} does not hold"
                     + (f" (it holds {', '.join(sorted(have))})" if have else "")
                     + f"; embed this store with that encoder first: `cmr embed --store {store.root} --checkpoint {where}`")


def predict_head(store_root: Path, name: str, study_uids: list[str]) -> list[dict]:
    """Predictions of registered head ``name`` for stored studies (see ``Head.predict``)."""
    store = open_store(store_root)
    head = HeadRegistry(store_root).load(name)
    _require_embeddings(store, head)
    return head.predict(store, study_uids)


def train_head(store_root: Path, labels: list[str], cfg: HeadConfig | None = None, labels_path: Path | None = None,
               model_id: str | None = None, name: str | None = None, replace: bool = False,
               log=None) -> tuple[Head, LabelSet]:
    """Train a head on the store's embeddings and register it; returns it with the label
    report (what was skipped and why)."""
    cfg = cfg or HeadConfig()
    store = open_store(store_root)
    model_id = model_id or default_model_id(store)
    bags = load_bags(store, model_id)
    label_set = load_labels(store, bags, list(labels), labels_path, cfg.task)
    trained = fit_head(bags, label_set, cfg, log=log)
    name = name or f"{'+'.join(labels)}-{cfg.kind}-{model_id[:8]}" + (f"-f{cfg.fraction:g}" if cfg.fraction < 1 else "")
    registry = HeadRegistry(store_root)
    registry.save(name, trained, {"model_id": model_id, "dim": bags.studies.shape[1], "label_source": label_set.source,
                                  "label_sha256": label_set.sha256, "label_problems": label_set.problems}, replace)
    return registry.load(name), label_set


def evaluate_head(store_root: Path, name: str, labels_path: Path | None = None) -> dict:
    """Metrics of a registered head: on its own test split (labels from the store, split
    again from the card's seeds), or on every labelled study of ``labels_path`` (an
    external test set)."""
    store = open_store(store_root)
    head = HeadRegistry(store_root).load(name)
    _require_embeddings(store, head)
    card = head.card
    bags = load_bags(store, head.model_id)
    label_set = load_labels(store, bags, card["labels"], labels_path, card["task"])
    if labels_path is None:
        cfg = HeadConfig.from_dict(card["config"])
        rows = patient_split(bags, label_set, cfg.val_fraction, cfg.test_fraction, cfg.split_seed)[2]
        scope = "test split"
    else:
        rows = np.flatnonzero(label_set.usable())
        scope = f"every labelled study of {labels_path}"
    subset = bags.subset(rows)
    pred = to_label_units(card["task"], predict_outputs(head.model, subset)[0], card["target"])
    metrics = metrics_for(card["task"], card["labels"], label_set.values[rows], pred, card.get("thresholds"))
    return {"head": name, "scope": scope, "studies": len(rows), "metrics": _jsonable(metrics),
            "label_problems": label_set.problems}


def _jsonable(x):
    """NaN -> None (strict JSON), numpy scalars -> Python."""
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and math.isnan(x):
        return None
    return x
