"""``python -m cmr_search.cli``: the same as the ``cmr`` command."""

from cmr_search.cli.app import app

app()
