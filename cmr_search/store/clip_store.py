"""The store directory and its Lance tables: canonical clips, report texts and labels."""

from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from cmr_search.core.exceptions import InputError, StoreError
from cmr_search.core.layout import StoreLayout, write_atomic
from cmr_search.store.config import ClipConfig
from cmr_search.store.journal import withdraw_overtaken
from cmr_search.store.lease import StudyWriteLock
from cmr_search.store.object_store import open_shared
from cmr_search.store.tombstones import Tombstones

__all__ = ["CLIP_SCHEMA", "CLIP_STORAGE_VERSION", "ClipStore", "ImportResult", "process_alive", "read_study_table", "sql_quote"]

FORMAT_VERSION = 1

CLIP_SCHEMA = pa.schema(
    [
        pa.field("clip_id", pa.string(), nullable=False),
        pa.field("study_uid", pa.string(), nullable=False),
        pa.field("series_uid", pa.string(), nullable=False),
        pa.field("patient_key", pa.string(), nullable=False),
        pa.field("view", pa.string(), nullable=False),
        pa.field("view_source", pa.string()),
        pa.field("slice_index", pa.int16()),
        pa.field("n_slices", pa.int16()),
        pa.field("series_slice", pa.int16()),
        pa.field("frames", pa.int16()),
        pa.field("height", pa.int16()),
        pa.field("width", pa.int16()),
        pa.field("clip", pa.large_binary()),  # uint8 [frames, height, width], C order
        pa.field("source_frames", pa.int16()),
        pa.field("time_source", pa.string()),
        pa.field("row_spacing_mm", pa.float32()),
        pa.field("col_spacing_mm", pa.float32()),
        pa.field("clip_spacing_mm", pa.float32()),
        pa.field("position_mm", pa.float32()),
        pa.field("rr_ms", pa.float32()),
        pa.field("series_number", pa.int32()),
        pa.field("series_description", pa.string()),
        pa.field("vendor", pa.string()),
        pa.field("site", pa.string()),
        pa.field("sex", pa.string()),
        pa.field("age", pa.float32()),
        pa.field("study_date", pa.string()),
        pa.field("ingested_at", pa.timestamp("ms", tz="UTC")),
    ]
)
# Lance file format of the clip table. The newer default formats (2.1+) compress each
# large binary value: ~14 % smaller for clip pixels, but the write of a 16-study commit
# went from 0.03 s to 0.4 s, 6.3 s of 6.7 s for a 240-study archive, and reads were no
# faster (measured: docs/BENCHMARKS.md). 2.0 stores the bytes as they are. A table keeps
# the format it was created with, through appends and compaction.
CLIP_STORAGE_VERSION = "2.0"
REPORT_SCHEMA = pa.schema([pa.field("study_uid", pa.string(), nullable=False), pa.field("report", pa.string())])


@dataclass
class ImportResult:
    """What importing a report or label file did."""

    rows: int = 0
    problems: list[str] = field(default_factory=list)  # rows not imported, with reasons
    columns: dict[str, list[str]] = field(default_factory=dict)  # labels: "numeric" (usable as labels), "text" (kept only)


def read_study_table(path: Path) -> pa.Table:
    """A CSV or Parquet file keyed by study_uid (reports, labels), study_uid as text."""
    if not path.exists():
        raise InputError(f"{path} does not exist; give a CSV or Parquet file keyed by study_uid")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            table = pq.read_table(path)
        else:
            table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(strings_can_be_null=True))
    except (pa.ArrowInvalid, OSError) as err:
        raise InputError(f"{path} cannot be read as CSV/Parquet: {err}") from err
    if "study_uid" not in table.column_names:
        raise InputError(f"{path} has no 'study_uid' column (columns: {', '.join(table.column_names)})")
    return table.set_column(table.schema.get_field_index("study_uid"), "study_uid", table["study_uid"].cast(pa.string()))


def _dedupe_last(table: pa.Table, result: ImportResult) -> pa.Table:
    """Drop rows without a study_uid and keep the last row of each study_uid."""
    uids = table["study_uid"].to_pylist()
    last: dict[str, int] = {}
    for i, uid in enumerate(uids):
        if not uid:
            result.problems.append(f"row {i + 2}: empty study_uid")
            continue
        if uid in last:
            result.problems.append(f"row {i + 2}: duplicate study_uid {uid}; the last row wins")
        last[uid] = i
    return table.take(sorted(last.values()))


class ClipStore:
    """A store directory: ``store.json`` (format and clip shape), ``lance/`` tables, secrets.

    For a store on object storage ``root`` is its local state folder and the tables are at
    the URI that folder names (``core.location``)."""

    def __init__(self, root: Path | StoreLayout, clip: ClipConfig):
        # a layout travels whole to machines without the state folder (a Ray task's fragments)
        self.layout = root if isinstance(root, StoreLayout) else StoreLayout(Path(root))
        self.root = self.layout.root
        self.clip_config = clip
        # a zero interval makes every read check for the newest version: readers never see stale data
        self.db = lancedb.connect(self.layout.lance, read_consistency_interval=timedelta(0))
        self._write_lock: StudyWriteLock | None = None

    @classmethod
    def open(cls, root: Path, clip: ClipConfig | None = None, create: bool = False) -> ClipStore:
        """Open a store; with ``create`` make it (the first clip config fixes the clip shape).
        On object storage a new state folder (another machine) joins the store (``open_shared``)."""
        layout = StoreLayout(Path(root))
        new = {"format_version": FORMAT_VERSION, "clip": (clip or ClipConfig()).to_dict()}
        if not layout.local:  # join the store, or publish a new store's store.json
            open_shared(layout, (new | {"uri": layout.uri, "tables": layout.lance}) if create else None)
        if layout.meta.exists():
            meta = json.loads(layout.meta.read_text())
            if meta.get("format_version") != FORMAT_VERSION:
                raise StoreError(f"{root} has store format {meta.get('format_version')}; this cmr reads {FORMAT_VERSION}")
            if meta.get("uri") != layout.uri:
                raise StoreError(f"{layout.meta} names the tables' location {meta.get('uri') or 'lance/'} but "
                                 f"{layout.uri_file} says {layout.uri or 'local'}; put back the state folder as it was")
            stored = ClipConfig(**meta["clip"])
            if clip is not None and clip != stored:
                raise StoreError(f"{root} holds clips of shape {stored.frames}x{stored.size}x{stored.size} at "
                                 f"{stored.fov_mm} mm; ingest with the same --frames/--size/--fov-mm or use a new store")
            return cls(layout, stored)
        if not create:
            raise StoreError(f"{root} is not a cmr store (no store.json); run `cmr ingest ... --store {layout.uri or root}` first")
        write_atomic(layout.meta, json.dumps(new, indent=2))  # atomic: a crash leaves no store or a whole one
        return cls(layout, clip or ClipConfig())

    def write_lock(self) -> StudyWriteLock:
        """The store-wide lock every commit of study rows holds (ingest, embed, uploads,
        withdrawal), across processes and threads, and for a store on object storage across
        machines (``store.lease``); re-entrant within one thread, so a writer holding it may
        call another that takes it."""
        if self._write_lock is None:
            self._write_lock = StudyWriteLock.of(self.layout, on_release=self._recheck)
        return self._write_lock

    def committed(self, studies: dict[str, str | None]) -> None:
        """Note study rows just committed (study_uid -> patient key, or None). On object
        storage they are checked against the tombstones again after the commit (a lease
        cannot fence it): at the write lock's release, or at once without the lock."""
        if not self.layout.local and studies and not self.write_lock().note(studies):
            self._recheck(studies)

    def _recheck(self, studies: dict[str, str | None]) -> None:
        withdraw_overtaken(self, studies)

    def scratch_dir(self, kind: str = "ingest") -> Path:
        """A fresh private folder for one ingest run's intermediate clips (or one upload's
        files, ``kind="upload"``); folders left by processes that died are removed first."""
        self.clean_scratch()
        path = self.layout.tmp / f"{kind}-{os.getpid()}-{secrets.token_hex(4)}"
        path.mkdir(parents=True)
        return path

    def clean_scratch(self) -> int:
        """Remove the scratch folders of ingests and uploads whose process is gone (a crash,
        a kill); how many. The search service runs it when it starts, too."""
        removed = 0
        for old in self.layout.tmp.glob("*-*-*") if self.layout.tmp.exists() else ():
            pid = old.name.split("-")[1]
            if pid.isdigit() and not process_alive(pid):
                shutil.rmtree(old, ignore_errors=True)
                removed += 1
        return removed

    # -- clips -------------------------------------------------------------------------
    def has_table(self, name: str) -> bool:
        """Whether the store holds a table of that name."""
        return name in self.db.list_tables(limit=1000).tables

    def _table(self, name: str, schema: pa.Schema, storage_version: str | None = None):
        options = {"new_table_data_storage_version": storage_version} if storage_version else None
        return self.db.create_table(name, schema=schema, exist_ok=True, storage_options=options)

    @property
    def clips(self):
        """The Lance table of canonical clips."""
        return self._table("clips", CLIP_SCHEMA, CLIP_STORAGE_VERSION)

    def upsert_clips(self, rows: list[dict], skip_unchanged: bool = False) -> tuple[int, int, int]:
        """Insert or replace clips by ``clip_id`` in one commit; returns (inserted, updated,
        unchanged). With ``skip_unchanged``, a clip stored with the same pixels and metadata
        is left as it is (its ``ingested_at`` too, so its embeddings stay current): ingesting
        the same files again writes nothing."""
        if not rows:
            return 0, 0, 0
        now = datetime.now(UTC)
        for r in rows:
            r.setdefault("ingested_at", now)
        data = pa.Table.from_pylist(rows, schema=CLIP_SCHEMA)
        table = self.clips
        if table.count_rows() == 0 and len(set(data["clip_id"].to_pylist())) == len(rows):
            # nothing to match against: a plain append (the first merge into an empty table
            # costs half a second of join set-up, a tenth of a 16-study ingest)
            table.add(data)
            self.committed({r["study_uid"]: r["patient_key"] for r in rows})
            return len(rows), 0, 0
        same = 0
        if skip_unchanged:
            keep = self._changed(data)
            same = len(data) - int(keep.sum())
            data = data.filter(pa.array(keep))
            if not len(data):
                return 0, 0, same
        result = table.merge_insert("clip_id").when_matched_update_all().when_not_matched_insert_all().execute(data)
        self.committed(dict(zip(data["study_uid"].to_pylist(), data["patient_key"].to_pylist())))
        return int(result.num_inserted_rows), int(result.num_updated_rows), same

    def write_clip_fragments(self, rows: list[dict]) -> list:
        """Write clip rows as new Lance fragment files of the clip table, committed by nobody
        yet: what each task of a cluster ingest does, the driver committing them all at once
        (``append_clip_fragments``). Runs anywhere that reaches the store's files."""
        from lance.fragment import write_fragments

        now = datetime.now(UTC)
        for r in rows:
            r.setdefault("ingested_at", now)
        data = pa.Table.from_pylist(rows, schema=CLIP_SCHEMA)
        return write_fragments(data, str(self.layout.table("clips")), schema=CLIP_SCHEMA,
                               data_storage_version=CLIP_STORAGE_VERSION)

    def append_clip_fragments(self, fragments: list, read_version: int) -> int:
        """Commit fragments from ``write_clip_fragments`` as one Lance Append (Lance's
        distributed-write API): a reader sees every one of them or none. ``read_version`` is
        the clip table's version the rows were planned against; returns the new version."""
        import lance

        if not fragments:
            return read_version
        done = lance.LanceDataset.commit(str(self.layout.table("clips")), lance.LanceOperation.Append(fragments),
                                         read_version=read_version)
        return done.version

    def _changed(self, data: pa.Table, chunk: int = 256) -> np.ndarray:
        """Per row of ``data``: True unless the stored clip of that ``clip_id`` has the same
        value in every column but ``ingested_at`` (the pixels compared byte for byte)."""
        columns = [f.name for f in CLIP_SCHEMA if f.name != "ingested_at"]
        ids = data["clip_id"].to_pylist()
        stored: dict[str, dict] = {}
        for i in range(0, len(ids), chunk):
            where = "clip_id IN (" + ", ".join(f"'{sql_quote(c)}'" for c in ids[i : i + chunk]) + ")"
            for row in self.clips.search().where(where).select(columns).limit(None).to_arrow().to_pylist():
                stored[row["clip_id"]] = row
        new = data.select(columns).to_pylist()
        return np.array([stored.get(r["clip_id"]) != r for r in new], dtype=bool)

    def count_clips(self, where: str | None = None) -> int:
        """Number of clips (optionally matching a SQL filter)."""
        return self.clips.count_rows(where)

    def clip_metadata(self, columns: list[str] | None = None) -> pa.Table:
        """All clip rows without the pixel column (cheap to scan)."""
        cols = columns or [f.name for f in CLIP_SCHEMA if f.name != "clip"]
        return self.clips.search().select(cols).limit(None).to_arrow()

    def get_clip(self, clip_id: str) -> tuple[dict, np.ndarray]:
        """One clip's metadata and its uint8 array [T, H, W]."""
        rows = self.clips.search().where(f"clip_id = '{sql_quote(clip_id)}'").limit(1).to_list()
        if not rows:
            raise KeyError(f"no clip {clip_id} in {self.root}")
        row = rows[0]
        arr = np.frombuffer(row.pop("clip"), np.uint8).reshape(row["frames"], row["height"], row["width"])
        return row, arr

    def study_uids(self) -> set[str]:
        """Studies that have at least one clip."""
        return set(self.clips.search().select(["study_uid"]).limit(None).to_arrow()["study_uid"].to_pylist())

    def optimize(self, compact_fragments: int = 32, rewritten: bool = False) -> bool:
        """Compact the clip table and drop versions older than a day, once it holds more than
        ``compact_fragments`` fragments or when ``rewritten`` rows left garbage behind;
        returns whether it ran.

        Each ingest commit appends one fragment of whole studies (~60 MB of clips), large
        enough to read well. Compaction rewrites every fragment under Lance's million-row
        target, so running it on every ingest rewrote the whole clip table each time (1.9 s
        of a 48-study ingest, growing with the archive); this is the policy of the
        embedding tables (``StoreConfig.compact_fragments``).
        """
        table = self.clips
        if not rewritten and table.stats()["fragment_stats"]["num_fragments"] <= compact_fragments:
            return False
        table.optimize(cleanup_older_than=timedelta(days=1))
        return True

    # -- reports and labels --------------------------------------------------------------
    @staticmethod
    def check_table_file(path: Path, kind: str) -> None:
        """Fail fast (before a long ingest) on a report or label file that cannot be imported."""
        table = read_study_table(Path(path))
        if kind == "reports" and "report" not in table.column_names:
            raise InputError(f"{path} has no 'report' column (columns: {', '.join(table.column_names)})")

    def import_reports(self, path: Path) -> ImportResult:
        """Upsert report texts from a CSV/Parquet with columns study_uid, report."""
        result = ImportResult()
        table = read_study_table(Path(path))
        if "report" not in table.column_names:
            raise InputError(f"{path} has no 'report' column (columns: {', '.join(table.column_names)})")
        table = _dedupe_last(table.select(["study_uid", "report"]), result)
        with self.write_lock():
            return self._import_reports(table, result)

    def _import_reports(self, table: pa.Table, result: ImportResult) -> ImportResult:
        table = self._without_withdrawn(table, result)
        reports = table["report"].to_pylist()
        keep = [i for i, text in enumerate(reports) if text and str(text).strip()]
        for i in set(range(len(reports))) - set(keep):
            result.problems.append(f"study {table['study_uid'][i]}: empty report")
        table = table.take(keep).cast(REPORT_SCHEMA)
        if table.num_rows:
            self._table("reports", REPORT_SCHEMA).merge_insert(
                "study_uid"
            ).when_matched_update_all().when_not_matched_insert_all().execute(table)
            self.committed(dict.fromkeys(table["study_uid"].to_pylist()))
        result.rows = table.num_rows
        return result

    def import_labels(self, path: Path) -> ImportResult:
        """Merge a label table keyed by study_uid into the store's ``labels`` table.

        Columns may differ from earlier imports: the result holds the union, and a new
        row for a study replaces its old row. Written as one new table version.
        """
        result = ImportResult()
        table = _dedupe_last(read_study_table(Path(path)), result)
        numeric = [f.name for f in table.schema if f.name != "study_uid"
                   and (pa.types.is_integer(f.type) or pa.types.is_floating(f.type) or pa.types.is_boolean(f.type))]
        result.columns = {"numeric": numeric,
                          "text": [n for n in table.column_names if n != "study_uid" and n not in numeric]}
        with self.write_lock():  # the old rows read here are rewritten below: no withdrawal in between
            table = self._without_withdrawn(table, result)
            result.rows = table.num_rows
            self._merge_labels(table)
            self.committed(dict.fromkeys(table["study_uid"].to_pylist()))
        return result

    def _merge_labels(self, table: pa.Table) -> None:
        if self.has_table("labels"):
            old = self.db.open_table("labels").to_arrow()
            new_ids = set(table["study_uid"].to_pylist())
            mask = pa.array([uid not in new_ids for uid in old["study_uid"].to_pylist()])
            table = pa.concat_tables([old.filter(mask), table], promote_options="permissive")
        self.db.create_table("labels", data=table, mode="overwrite")

    def _without_withdrawn(self, table: pa.Table, result: ImportResult) -> pa.Table:
        """The rows of studies not withdrawn from this store (caller holds the write lock)."""
        uids = table["study_uid"].to_pylist()
        withdrawn = Tombstones(self.layout).withdrawn(uids)
        if not withdrawn:
            return table
        result.problems += [f"study {u}: withdrawn from this store (cmr delete); not imported" for u in sorted(withdrawn)]
        return table.filter(pa.array([u not in withdrawn for u in uids]))

    def reports(self, study_uids: list[str]) -> dict[str, str]:
        """The stored report text of each of these studies that has one."""
        if not study_uids or not self.has_table("reports"):
            return {}
        where = "study_uid IN (" + ", ".join(f"'{sql_quote(u)}'" for u in study_uids) + ")"
        rows = self.db.open_table("reports").search().where(where).select(["study_uid", "report"]).limit(None).to_arrow()
        return dict(zip(rows["study_uid"].to_pylist(), rows["report"].to_pylist()))

    def table_study_uids(self, name: str) -> set[str]:
        """study_uid values of the reports or labels table (empty if the table is absent)."""
        if not self.has_table(name):
            return set()
        return set(self.db.open_table(name).search().select(["study_uid"]).limit(None).to_arrow()["study_uid"].to_pylist())


def sql_quote(text: str) -> str:
    """A text as the inside of a SQL string literal (single quotes doubled)."""
    return text.replace("'", "''")


def process_alive(pid: str) -> bool:
    """Whether a process of this id runs on this machine (for leftovers of killed runs)."""
    return pid.isdigit() and Path(f"/proc/{pid}").exists()
