"""The container recipe: a pinned NGC PyTorch base, a build context that has what the Dockerfile copies, no secrets.

No docker daemon is needed (none runs in CI); these catch the mistakes that would break `make docker` or leak
local state into the image.
"""

from __future__ import annotations

import ast
import fnmatch
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
IGNORED = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
           if line.strip() and not line.startswith("#")]


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(l for l in DOCKERFILE.splitlines() if not l.lstrip().startswith("#")))
    return [(m.group(1).upper(), m.group(2)) for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", text, re.M)]


def _ignored(rel: str) -> bool:
    return any(fnmatch.fnmatch(rel, pat) or fnmatch.fnmatch(rel, pat.replace("**/", "")) for pat in IGNORED)


def test_base_image_is_a_pinned_ngc_pytorch_tag():
    args = dict(a.split("=", 1) for i, a in _instructions() if i == "ARG" and "=" in a)
    (base,) = [a for i, a in _instructions() if i == "FROM"]
    image = args.get(base.strip("${} "), base)
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", image), image
    assert image.split(":")[1][:5] in DOCKERFILE.split("ARG BASE_IMAGE")[0], \
        "the header comment should say which torch / TE / apex the pinned tag carries"


def test_copied_paths_exist_and_are_not_ignored():
    for instr, args in _instructions():
        if instr != "COPY":
            continue
        *sources, _dest = args.split()
        for src in sources:
            assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
            assert not _ignored(src), f"COPY {src}: excluded by .dockerignore"


def test_context_excludes_local_state():
    for path in (".git", ".venv", "runs", "checkpoints", "data", "**/__pycache__"):
        assert path in IGNORED, f".dockerignore should exclude {path}"
    # root-anchored patterns only: the data package itself must stay in the context
    assert not _ignored("megatron_papo/data") and not _ignored("megatron_papo/data/reader.py")


def test_installed_extras_exist_in_setup_py():
    tree = ast.parse((ROOT / "setup.py").read_text())
    extras = next(k.value for node in ast.walk(tree) if isinstance(node, ast.Call)
                  for k in node.keywords if k.arg == "extras_require")
    names = {k.value for k in extras.keys}
    for extra in re.findall(r'"\.\[([\w,]+)\]"', DOCKERFILE):
        assert set(extra.split(",")) <= names, (extra, names)


def test_no_credentials_or_site_paths():
    assert not re.search(r"(?i)(token|password|secret|api[_-]?key)\s*=", DOCKERFILE)
    assert not re.search(r"/(home|scratch|lustre|gpfs)/", DOCKERFILE)


def test_make_docker_builds_this_context():
    make = (ROOT / "Makefile").read_text()
    assert re.search(r"^docker:\n\tdocker build .* \.$", make, re.M)
