"""``cmr`` run in the test's own process (so its environment, an S3 server's credentials
included, reaches Lance and the shared state's client)."""

from __future__ import annotations

from typer.testing import CliRunner

from cmr_search.cli.app import app


def cmr(*args, codes: tuple[int, ...] = (0,)) -> str:
    """Run ``cmr ARGS``; its stdout (the JSON of ``--json``), or its stderr where the exit code
    is 2 (the error). Fails the test on an exit code not in ``codes``."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code in codes, f"cmr {' '.join(map(str, args))} -> {result.exit_code}\n{result.output}"
    return result.stderr if result.exit_code == 2 else result.stdout
