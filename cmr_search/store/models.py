"""The models of a store on object storage, shared by its machines: encoders, their
``DEFAULT``/``LATEST`` pointers, and heads.

Each machine reads a model through local files (safetensors, FAISS), so its state folder
keeps a copy of what it uses; the bucket (``store.shared``, under ``URI/state/``) holds the
originals at the same relative keys as a local store's folder:

- ``encoders/<model_id>/`` is uploaded when a model is registered, ``config.json`` last:
  readers key on it, so a reader that finds it finds the whole folder. A model_id is the
  hash of the weights, so a copy never goes stale and is downloaded once per machine (only
  ``card.json`` is rewritten, when training or the evaluation notes the model's origin).
- ``encoders/DEFAULT`` and ``encoders/LATEST`` are objects; a machine copies them into its
  state folder when it opens the store (``pull_models``), with the models they name, and
  writes both copies when it sets one (``set_pointer``).
- ``heads/<name>/head.json`` holds a head's card and the key of its weights
  (``heads/<name>/<sha256[:16]>.safetensors``): one object switches a head whole, so a
  head re-registered under a name is replaced everywhere, and a machine whose copy carries
  an older entity tag of ``head.json`` downloads the new one (``pull_heads``).

A local store has no shared state: every function here does nothing for it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path

from cmr_search.core.layout import StoreLayout, write_atomic
from cmr_search.store.shared import SharedState, shared_state

__all__ = ["publish_local_models", "pull_heads", "pull_model", "pull_models", "push_head", "push_model", "set_pointer",
           "shared_model_ids"]

log = logging.getLogger(__name__)

#: the file of a model folder that readers key on, uploaded last
MODEL_MARKER = "config.json"
#: a head's one shared object: its card and the key of its weights
HEAD_ENTRY = "head.json"
#: beside a downloaded head: the entity tag of the ``head.json`` it was made from
HEAD_STAMP = ".shared-etag"
#: a model looked for and not found in the bucket is not asked for again this long (seconds):
#: ``vectors_of`` asks for every model id a caller names, registered or not
ABSENT_TTL_S = 30.0
#: pointers copied this recently (seconds) are not read again by the same process (a command
#: opens the store several times); a write by this process forgets it
POINTER_TTL_S = 1.0

_lock = threading.Lock()
_absent: dict[tuple[str, str], float] = {}
_pulled: dict[tuple[str, str], float] = {}


# -- encoders ---------------------------------------------------------------------------------
def _encoder_key(layout: StoreLayout, model_id: str) -> str:
    return layout.key(layout.encoder(model_id))


def push_model(layout: StoreLayout, model_id: str, card: bool = True) -> None:
    """Upload the registered model ``model_id`` (its folder, ``config.json`` last) unless the
    bucket has it; where it has, only the card (which ``note`` rewrites), with ``card``."""
    shared = shared_state(layout)
    folder = layout.encoder(model_id)
    if shared is None or not (folder / MODEL_MARKER).exists():
        return
    prefix = _encoder_key(layout, model_id)
    if shared.etag(f"{prefix}/{MODEL_MARKER}") is None:
        shared.upload_folder(folder, prefix, last=MODEL_MARKER)
        log.info("encoder %s uploaded to %s/%s", model_id, shared.base, prefix)
    elif card and (folder / "card.json").exists():
        shared.put(f"{prefix}/card.json", (folder / "card.json").read_bytes())
    with _lock:
        _absent.pop((shared.uri, model_id), None)


def pull_model(layout: StoreLayout, model_id: str) -> bool:
    """Make sure this machine has a copy of model ``model_id`` when the bucket holds it
    (downloaded whole into the state folder); whether the folder is here afterwards."""
    folder = layout.encoder(model_id)
    if layout.uri is None or (folder / MODEL_MARKER).exists():
        return (folder / MODEL_MARKER).exists()
    shared = shared_state(layout)
    if not model_id or "/" in model_id or model_id.startswith("."):
        return False
    with _lock:
        if time.monotonic() - _absent.get((shared.uri, model_id), -ABSENT_TTL_S) < ABSENT_TTL_S:
            return False
    prefix = _encoder_key(layout, model_id)
    # only a complete upload: its marker is written last
    if shared.etag(f"{prefix}/{MODEL_MARKER}") is None or not shared.download_folder(prefix, folder):
        with _lock:
            _absent[(shared.uri, model_id)] = time.monotonic()
        return False
    log.info("encoder %s downloaded from %s to %s", model_id, shared.base, folder)
    return (folder / MODEL_MARKER).exists()


def shared_model_ids(layout: StoreLayout) -> list[str]:
    """The model_ids whose folders are complete in the bucket (none for a local store)."""
    shared = shared_state(layout)
    if shared is None:
        return []
    prefix = layout.key(layout.encoders)
    return sorted({key.split("/")[1] for key in shared.list(prefix)
                   if key.count("/") == 2 and key.endswith(f"/{MODEL_MARKER}")})


def set_pointer(layout: StoreLayout, pointer: Path, model_id: str) -> None:
    """Point ``DEFAULT`` or ``LATEST`` (``pointer``, a path of ``layout``) at ``model_id``:
    the local file and, for a store on object storage, the shared object (the model uploaded
    first where the bucket lacks it, so no machine reads a pointer to nothing)."""
    write_atomic(pointer, model_id + "\n")
    shared = shared_state(layout)
    if shared is None:
        return
    push_model(layout, model_id, card=False)
    shared.put(layout.key(pointer), (model_id + "\n").encode())
    with _lock:
        _pulled.clear()


def pull_models(layout: StoreLayout) -> None:
    """Copy the shared ``DEFAULT`` and ``LATEST`` into the state folder, and the models they
    name (their ``VECTORS`` pointers too): when the store is opened (``EmbeddingStore.open``,
    ``EncoderRegistry``), so a process sees the pointers as they were then. A pointer absent
    from the bucket leaves the local one as it is (a store from before sharing)."""
    shared = shared_state(layout)
    if shared is None:
        return
    stamp = (shared.uri, str(layout.root))
    with _lock:
        if time.monotonic() - _pulled.get(stamp, -POINTER_TTL_S) < POINTER_TTL_S:
            return
        _pulled[stamp] = time.monotonic()
    for pointer in (layout.default, layout.latest):
        blob = shared.get(layout.key(pointer))
        model_id = blob.data.decode().strip() if blob else ""
        if not model_id:
            continue
        pull_model(layout, model_id)
        pull_model(layout, layout.vectors_model_id(model_id))  # a text-aligned model's video model
        try:
            same = pointer.read_text().strip() == model_id
        except FileNotFoundError:
            same = False
        if not same:
            write_atomic(pointer, model_id + "\n")


def publish_local_models(layout: StoreLayout) -> None:
    """Share what an older cmr kept only in this machine's state folder: every registered
    model, the ``DEFAULT``/``LATEST`` pointers and every head, each only where the bucket has
    none yet (``object_store``'s migration of a one-machine store, before its store.json is
    shared: the machines that join on it find the models)."""
    shared = shared_state(layout)
    if shared is None:
        return
    if layout.encoders.exists():
        for folder in sorted(layout.encoders.iterdir()):
            if (folder / MODEL_MARKER).exists() and not folder.name.startswith("."):
                push_model(layout, folder.name, card=False)
    for pointer in (layout.default, layout.latest):
        if pointer.exists():
            shared.create(layout.key(pointer), pointer.read_bytes())
    if layout.heads.exists():
        for folder in sorted(layout.heads.iterdir()):
            if (folder / "card.json").exists() and not folder.name.startswith(".") and \
                    shared.etag(f"{layout.key(folder)}/{HEAD_ENTRY}") is None:
                push_head(layout, folder.name)


# -- heads ------------------------------------------------------------------------------------
def push_head(layout: StoreLayout, name: str) -> None:
    """Share the head ``name`` as registered in this state folder (``heads/<name>/``): its
    weights under their hash, then ``head.json`` replaced only if unchanged since read, and
    the weights it named before deleted (a concurrent registration of the name is never left
    pointing at deleted weights)."""
    shared = shared_state(layout)
    if shared is None:
        return
    folder = layout.heads / name
    weights = (folder / "model.safetensors").read_bytes()
    card = json.loads((folder / "card.json").read_text())
    prefix = layout.key(folder)
    file = f"{hashlib.sha256(weights).hexdigest()[:16]}.safetensors"
    shared.put(f"{prefix}/{file}", weights)
    entry = json.dumps({"card": card, "weights": file}, indent=1).encode()
    replaced: list[bytes | None] = [None]

    def switch(old: bytes | None) -> bytes:
        replaced[0] = old  # the entry this write replaces (re-read on each retry)
        return entry

    shared.update(f"{prefix}/{HEAD_ENTRY}", switch)
    stale = json.loads(replaced[0]).get("weights") if replaced[0] else None
    if stale and stale != file:
        shared.delete(f"{prefix}/{stale}")
    # the local copy carries no entity tag now: the next pull takes the bucket's head.json,
    # ours or a concurrent registration's that won, whichever it is
    (folder / HEAD_STAMP).unlink(missing_ok=True)
    log.info("head %s shared as %s/%s", name, shared.base, prefix)


def pull_heads(layout: StoreLayout) -> None:
    """Bring this machine's copies of the shared heads up to date: a head absent here, or
    whose copy was made from another ``head.json`` than the bucket's, is downloaded and
    swapped in whole. Heads registered only here (before sharing) are left alone."""
    shared = shared_state(layout)
    if shared is None:
        return
    prefix = layout.key(layout.heads)
    for key, etag in shared.etags(prefix).items():
        parts = key.split("/")
        if len(parts) != 3 or parts[2] != HEAD_ENTRY:
            continue
        folder = layout.heads / parts[1]
        try:
            have = (folder / HEAD_STAMP).read_text().strip()
        except FileNotFoundError:
            have = None
        if have != etag:
            _download_head(shared, key, folder)


def _download_head(shared: SharedState, key: str, folder: Path) -> None:
    blob = shared.get(key)
    if blob is None:
        return
    entry = json.loads(blob.data)
    weights = shared.get(f"{key.rsplit('/', 1)[0]}/{entry['weights']}")
    if weights is None:  # replaced since read: the next pull gets the new one
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.pull-{os.getpid()}-{threading.get_ident()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(weights.data)
    (tmp / "card.json").write_text(json.dumps(entry["card"], indent=2))
    (tmp / HEAD_STAMP).write_text(blob.etag)
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}-{threading.get_ident()}")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    log.info("head %s downloaded from %s", folder.name, shared.base)
