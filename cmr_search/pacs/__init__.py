"""The hospital's archive as a source: studies received by DICOM push (``listener.py``,
``cmr listen``) or pulled on a schedule (``cmr sync``) are ingested and embedded with the
store's default model as they arrive (``arrival.py``)."""
