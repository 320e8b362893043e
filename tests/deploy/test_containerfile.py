"""The Containerfile, checked without a container runtime (none runs on duoserve's CI machines): its
instructions parse, every COPY source exists and is not excluded by .dockerignore, the final USER is not
root, torch is pinned as in the README, and the kernel-build step calls a real function."""

from __future__ import annotations

import fnmatch
import importlib
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = (ROOT / "pyproject.toml").read_text()  # read as text: tomllib needs Python 3.11
INSTRUCTIONS = {
    "FROM",
    "ARG",
    "ENV",
    "RUN",
    "COPY",
    "WORKDIR",
    "USER",
    "EXPOSE",
    "ENTRYPOINT",
    "CMD",
    "LABEL",
}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with comments dropped and continuation lines joined."""
    result, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        keyword, _, rest = (pending + line).strip().partition(" ")
        result.append((keyword, rest.strip()))
        pending = ""
    assert not pending, "a continuation line runs off the end of the file"
    return result


@pytest.fixture(scope="module")
def steps() -> list[tuple[str, str]]:
    return instructions(ROOT / "Containerfile")


def test_every_instruction_is_known(steps):
    assert {keyword for keyword, _ in steps} <= INSTRUCTIONS
    assert steps[0][0] in ("ARG", "FROM")


def test_base_image_has_a_tag(steps):
    args = dict(re.findall(r"(\w+)=(\S+)", " ".join(rest for k, rest in steps if k == "ARG")))
    (base,) = [rest for keyword, rest in steps if keyword == "FROM"]
    image = re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], base)
    name, _, tag = image.rpartition(":")
    assert name and tag and tag != "latest", image


def _ignored(path: str) -> bool:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    return any(
        fnmatch.fnmatch(path, p.removeprefix("**/")) or path.split("/")[0] == p or path.startswith(p + "/")
        for p in patterns
    )


def test_copy_sources_exist_and_are_in_the_build_context(steps):
    copies = [shlex.split(rest) for keyword, rest in steps if keyword == "COPY"]
    assert copies
    for words in copies:
        sources = [w for w in words[:-1] if not w.startswith("--")]
        for source in sources:
            assert (ROOT / source).exists(), source
            assert not _ignored(source), f"{source} is excluded by .dockerignore"
    # What `pip install .` needs: the package and the files pyproject.toml names.
    copied = {s for words in copies for s in words[:-1]}
    readme = re.search(r'^readme = "(.+)"$', PYPROJECT, re.M)[1]
    assert {"pyproject.toml", readme, "duoserve"} <= copied


def test_runs_as_a_non_root_user_created_in_the_image(steps):
    users = [rest for keyword, rest in steps if keyword == "USER"]
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0  # numeric: runAsNonRoot can check it without /etc/passwd
    creating = " ".join(rest for keyword, rest in steps if keyword == "RUN")
    assert f"useradd --uid {uid}" in creating
    # The manifests run as the same user.
    for manifest in (ROOT / "deploy" / "kubernetes").rglob("*deployment.yaml"):
        assert f"runAsUser: {uid}" in manifest.read_text(), manifest


def test_torch_is_pinned_as_in_the_readme(steps):
    args = dict(re.findall(r"(\w+)=(\S+)", " ".join(rest for k, rest in steps if k == "ARG")))
    readme_pin = re.search(r"torch==([\d.]+)", (ROOT / "README.md").read_text())[1]
    assert args["TORCH_VERSION"] == readme_pin
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"  # the default is the CPU image
    assert any('"torch==${TORCH_VERSION}"' in rest for keyword, rest in steps if keyword == "RUN")


def test_the_kernel_is_built_as_the_final_user_with_a_real_function(steps):
    users = [i for i, (keyword, _) in enumerate(steps) if keyword == "USER"]
    (build,) = [
        i for i, (keyword, rest) in enumerate(steps) if keyword == "RUN" and "cpu_kernels_available" in rest
    ]
    assert build > users[-1], "built as root, the cache would not be the runtime user's"
    code = re.search(r'python -c "(.*)"', steps[build][1])[1]
    module, function = re.search(r"from ([\w.]+) import (\w+)", code).groups()
    assert callable(getattr(importlib.import_module(module), function))
    env = " ".join(rest for keyword, rest in steps[:build] if keyword == "ENV")
    (directory,) = re.findall(r"TORCH_EXTENSIONS_DIR=(\S+)", env)
    chowned = " ".join(rest for keyword, rest in steps[:build] if keyword == "RUN")
    assert f"chown -R 10001:10001 {directory}" in chowned


def test_entrypoint_and_ports(steps):
    (entrypoint,) = [rest for keyword, rest in steps if keyword == "ENTRYPOINT"]
    assert entrypoint == '["duoserve"]'
    assert re.search(r'^duoserve = "duoserve.cli:main"$', PYPROJECT, re.M)  # the console script
    (exposed,) = [rest for keyword, rest in steps if keyword == "EXPOSE"]
    assert exposed.split() == ["8000", "5600", "5601"]  # http, kv, kv-events, as in the manifests
