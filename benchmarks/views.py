"""View classification accuracy on a synthetic cohort (which knows the truth): with the
vendor descriptions as written, and with descriptions and folder names stripped so that
only the geometry is left.

    python benchmarks/views.py [--studies 40] [--seed 11]
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
from collections import Counter
from pathlib import Path

from cmr_search.ingest import IngestConfig, ingest
from cmr_search.store import ClipStore
from cmr_search.synth import generate_cohort
from cmr_search.synth.variants import strip_view_names


def accuracy(dicom: Path, truth: dict[str, dict], workers: int) -> dict:
    """Ingest a tree and score every clip's view against the generator's truth."""
    with tempfile.TemporaryDirectory() as tmp:
        store = ClipStore.open(Path(tmp) / "store", create=True)
        ingest([dicom], store, IngestConfig(workers=workers), b"views", progress=False)
        clips = store.clip_metadata(["series_uid", "view", "view_source"]).to_pylist()
    cines = [c for c in clips if truth[c["series_uid"]]["kind"] == "cine"]
    confusion = Counter((truth[c["series_uid"]]["view"], c["view"]) for c in cines)
    per_view = {}
    for view in ("SAX", "4CH", "3CH", "2CH"):
        n = sum(v for (t, _), v in confusion.items() if t == view)
        per_view[view] = round(confusion[(view, view)] / n, 4) if n else None
    return {
        "clips": len(cines),
        "accuracy": round(sum(v for (t, p), v in confusion.items() if t == p) / len(cines), 4),
        "per_view": per_view,
        "non_cine_clips": [(truth[c["series_uid"]]["kind"], c["view"]) for c in clips if truth[c["series_uid"]]["kind"] != "cine"],
        "sources": dict(Counter(c["view_source"] for c in clips)),
        "confusion": {f"{t}->{p}": v for (t, p), v in sorted(confusion.items()) if t != p},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=40)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cohort = Path(tmp) / "cohort"
        generate_cohort(args.studies, cohort, seed=args.seed, workers=args.workers, progress=False)
        with open(cohort / "truth.csv", newline="") as fp:
            truth = {r["series_uid"]: r for r in csv.DictReader(fp)}
        named = accuracy(cohort / "dicom", truth, args.workers)
        strip_view_names(cohort / "dicom", Path(tmp) / "stripped")
        stripped = accuracy(Path(tmp) / "stripped", truth, args.workers)
    print(json.dumps({"studies": args.studies, "seed": args.seed, "with_descriptions": named, "geometry_only": stripped}, indent=1))


if __name__ == "__main__":
    main()
