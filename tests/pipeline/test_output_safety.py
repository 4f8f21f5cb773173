"""Output-directory safety: qtune never writes into its inputs, and never deletes or overwrites a
file it did not create; bad output locations and failing disks get one clear line, not a
traceback, and leave the previous version intact.

Most checks happen before any work, so most tests need no scoring: a synthetic scored cache
(``qtune.demo.synthetic_cache``) stands in where triage needs one.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner, Result

from qtune.demo.synthetic_cache import write_synthetic_cache
from qtune.pipeline.cli import app
from qtune.pipeline.config import ConfigError, check_output_location, load_config
from qtune.pipeline.layout import OutputLayout

USER_CARD = "# My dataset\n\nHand-written notes about this corpus.\n"
CHAT_ROW = json.dumps(
    {
        "messages": [
            {"role": "user", "content": "What is 2 + 3?"},
            {"role": "assistant", "content": "5."},
        ]
    }
)


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative path, with its bytes (a before/after snapshot)."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def _hf_folder(root: Path) -> Path:
    """A Hugging Face style dataset folder: a card and data/train.jsonl."""
    (root / "data").mkdir(parents=True)
    (root / "README.md").write_text(USER_CARD)
    (root / "data/train.jsonl").write_text(CHAT_ROW + "\n")
    return root


def _write_config(
    path: Path,
    input_path: str | list[str],
    output_dir: str,
    model: str | Path = "unused-model",
    **output: object,
) -> Path:
    # JSON scalars are valid YAML flow scalars: any path survives quoting.
    section = {"dir": output_dir, "num_shards": 2, "report": False, **output}
    path.write_text(
        f"input: {{path: {json.dumps(input_path)}}}\n"
        f"model: {{path: {json.dumps(str(model))}, max_length: 256}}\n"
        "scoring: {backend: torch}\n"
        f"output: {json.dumps(section)}\n"
        "ray: {num_cpus: 2}\n"  # the scoring actor holds one; tasks need another
    )
    return path


def _cfg(inputs: list[str], output: str):
    return load_config(
        None, [f"input.path={json.dumps(inputs)}", "model.path=m", f"output.dir={output}"]
    )


def _writing_command(name: str, config: Path, tmp_path: Path) -> list[str]:
    if name == "demo":
        return ["demo", "--config", str(config)]
    args = [name, str(config)]
    if name == "rescore":
        args += ["--model", str(tmp_path / "checkpoint")]
    if name == "watch":
        args += ["--checkpoints", str(tmp_path / "trainer")]
    return args


WRITERS = ["run", "score", "triage", "rescore", "watch", "demo"]


def _one_error_line(result: Result) -> str:
    """The one ``error:`` line of a failed command that raised nothing past the CLI."""
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    output = result.output
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, output
    # Logging's own reports of a handler still bound to an earlier CliRunner's closed stream (Ray
    # Data sets its loggers up once per process) are no traceback of qtune's: left out.
    own = re.sub(r"--- Logging error ---\n.*?\nArguments: [^\n]*\n", "", output, flags=re.S)
    assert "Traceback" not in own, own
    return lines[0]


# --- 2. output.dir and the inputs ------------------------------------------------------------


@pytest.mark.parametrize("command", WRITERS)
def test_output_dir_holding_the_input_is_refused_before_any_work(tmp_path, command):
    """The reported case: an HF-style folder used as output.dir while its data is the input."""
    ds = _hf_folder(tmp_path / "ds")
    config = _write_config(tmp_path / "c.yaml", str(ds / "data/train.jsonl"), str(ds))
    before = _tree(tmp_path)
    result = CliRunner().invoke(app, _writing_command(command, config, tmp_path))
    assert result.exit_code == 2, result.output
    line = _one_error_line(result)
    assert str(ds) in line and str(ds / "data/train.jsonl") in line, line
    assert _tree(tmp_path) == before  # not even a lock file
    assert not (ds / ".qtune.lock").exists()


@pytest.mark.parametrize(
    ("inputs", "output"),
    [
        (["ds"], "ds"),  # the same folder
        (["ds"], "ds/out"),  # output inside the input folder: it would be read back as input
        (["ds/data/*.jsonl"], "ds"),  # a glob under the output
        (["ds/*/train.jsonl"], "ds/data"),  # the glob reaches into the output
        (["ds/**/*.jsonl"], "ds/out"),  # a recursive glob reaches everywhere under its base
        (["elsewhere.jsonl", "ds/data/train.jsonl"], "ds"),  # one entry of a list
        (["ds/data/train.jsonl"], "link"),  # a symlink to the folder
        (["link/data/train.jsonl"], "ds"),  # an input through a symlink
    ],
)
def test_every_kind_of_overlap_is_a_config_error(tmp_path, monkeypatch, inputs, output):
    monkeypatch.chdir(tmp_path)
    _hf_folder(tmp_path / "ds")
    (tmp_path / "link").symlink_to(tmp_path / "ds")
    (tmp_path / "elsewhere.jsonl").write_text(CHAT_ROW + "\n")
    cfg = _cfg(inputs, output)
    with pytest.raises(ConfigError, match="overlaps") as raised:
        check_output_location(cfg)
    assert output in str(raised.value)


@pytest.mark.parametrize(
    ("inputs", "output"),
    [
        (["corpus/*.jsonl"], "corpus/out"),  # a flat glob never reads corpus/out/
        (["corpus/data"], "corpus/out"),  # siblings
        (["corpus/a.jsonl"], "corpus-out"),  # a shared name prefix is not containment
    ],
)
def test_outputs_beside_the_inputs_are_fine(tmp_path, monkeypatch, inputs, output):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus/data").mkdir(parents=True)
    (tmp_path / "corpus/a.jsonl").write_text(CHAT_ROW + "\n")
    cfg = _cfg(inputs, output)
    check_output_location(cfg)


def test_model_dir_and_work_dir_overlaps_are_refused(tmp_path):
    ds = _hf_folder(tmp_path / "ds")
    model = tmp_path / "out" / "model"
    cfg = load_config(
        None, [f"input.path={ds}", f"model.path={model}", f"output.dir={tmp_path / 'out'}"]
    )
    with pytest.raises(ConfigError, match="model.path"):
        check_output_location(cfg)
    # A remote output's working copy is written like an output directory (checked before any
    # connection: this URI's endpoint does not exist).
    cfg = load_config(
        None,
        [
            f"input.path={ds}",
            "model.path=m",
            "output.dir=s3://bucket/run?endpoint_override=127.0.0.1:9",
            f"output.work_dir={ds}",
        ],
    )
    with pytest.raises(ConfigError, match="output.work_dir"):
        check_output_location(cfg)


@pytest.mark.parametrize(
    ("inputs", "output"),
    [
        ("s3://bucket/corpus", "s3://bucket/corpus/out"),
        ("s3://bucket/corpus/*.jsonl", "S3://bucket/corpus/"),
        ("s3://key:secret@bucket/corpus/a.jsonl?region=x", "s3://bucket/corpus?region=y"),
        ("s3://bucket/corpus/../corpus/a.jsonl", "s3://bucket/corpus"),
    ],
)
def test_remote_overlaps_compare_normalised_uris(inputs, output):
    cfg = load_config(None, [f"input.path={inputs}", "model.path=m", f"output.dir={output}"])
    with pytest.raises(ConfigError, match="overlaps"):
        check_output_location(cfg)
    other = load_config(
        None, [f"input.path={inputs}", "model.path=m", "output.dir=s3://bucket/corpus-out"]
    )
    check_output_location(other)


def test_triage_out_overlapping_an_input_is_refused(tmp_path):
    ds = _hf_folder(tmp_path / "ds")
    out = tmp_path / "out"
    write_synthetic_cache(out, 40, response_tokens=10, prompt_tokens=4, rows_per_file=16)
    config = _write_config(tmp_path / "c.yaml", str(ds / "data/train.jsonl"), str(out))
    before = _tree(tmp_path)
    result = CliRunner().invoke(app, ["triage", str(config), "--out", str(ds)])
    assert result.exit_code == 2, result.output
    assert str(ds) in _one_error_line(result)
    assert _tree(tmp_path) == before


def _demo_model_stub(model: Path) -> Path:
    """A model directory the demo takes for its own, current one (so it trains nothing)."""
    from qtune.demo.assets import DEMO_RECIPE, STAMP

    model.mkdir(parents=True)
    (model / STAMP).write_text(json.dumps(DEMO_RECIPE))
    return model


def test_demo_never_replaces_a_folder_it_did_not_build(tmp_path):
    """`qtune demo` rebuilds its corpus in input.path: a user's own corpus there must stay."""
    corpus = _hf_folder(tmp_path / "my-corpus")
    model = _demo_model_stub(tmp_path / "model")
    config = _write_config(tmp_path / "demo.yaml", str(corpus), str(tmp_path / "out"), model)
    before = _tree(tmp_path)
    result = CliRunner().invoke(app, ["demo", "--config", str(config)])
    assert result.exit_code == 2, result.output
    assert str(corpus) in _one_error_line(result)
    assert _tree(tmp_path) == before


def test_demo_loop_never_deletes_a_folder_it_did_not_write(tmp_path):
    """The demo loop starts by deleting --out: only its own earlier output may be there."""
    out = tmp_path / "results"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    model = _demo_model_stub(tmp_path / "model")
    config = _write_config(tmp_path / "demo.yaml", str(tmp_path / "corpus"), "out", model)
    result = CliRunner().invoke(app, ["demo-loop", "--config", str(config), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert str(out) in _one_error_line(result)
    assert (out / "notes.txt").read_text() == "mine\n"


# --- 7. empty, ".", the working directory, "/", home -----------------------------------------


@pytest.mark.parametrize("value", ['""', "", ".", "./", "{cwd}", "/", "{home}", "sub/.."])
def test_output_dir_that_names_no_directory_of_its_own_is_a_config_error(
    tmp_path, monkeypatch, value
):
    cwd, home = tmp_path / "cwd", tmp_path / "home"
    cwd.mkdir()
    (cwd / "sub").mkdir()
    home.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HOME", str(home))
    (cwd / "in.jsonl").write_text(CHAT_ROW + "\n")
    config = _write_config(cwd / "c.yaml", str(cwd / "in.jsonl"), str(tmp_path / "out"))
    override = "output.dir=" + value.format(cwd=cwd, home=home)
    before = _tree(tmp_path)
    result = CliRunner().invoke(app, ["run", str(config), "--set", override])
    assert result.exit_code == 2, result.output
    assert "output.dir" in _one_error_line(result)
    assert _tree(tmp_path) == before
    assert not Path("/.qtune.lock").exists()


# --- 8. clear errors --------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["is a file", "under a file"])
@pytest.mark.parametrize("command", ["run", "score", "triage"])
def test_output_dir_that_is_or_lies_under_a_file(tmp_path, where, command):
    (tmp_path / "in.jsonl").write_text(CHAT_ROW + "\n")
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory\n")
    out = blocker if where == "is a file" else blocker / "out"
    config = _write_config(tmp_path / "c.yaml", str(tmp_path / "in.jsonl"), str(out))
    result = CliRunner().invoke(app, [command, str(config)])
    assert result.exit_code == 2, result.output
    line = _one_error_line(result)
    assert str(out) in line and "file" in line
    if where == "under a file":
        assert str(blocker) in line


def test_triage_out_pointing_at_a_file(tmp_path):
    out = tmp_path / "out"
    write_synthetic_cache(out, 40, response_tokens=10, prompt_tokens=4, rows_per_file=16)
    config = _write_config(tmp_path / "c.yaml", "unused.jsonl", str(out))
    target = tmp_path / "target.txt"
    target.write_text("mine\n")
    result = CliRunner().invoke(app, ["triage", str(config), "--out", str(target)])
    assert result.exit_code == 2, result.output
    assert str(target) in _one_error_line(result)
    assert target.read_text() == "mine\n"


def test_config_file_that_is_not_utf8(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_bytes(b"input: {path: \xff\xfe.jsonl}\n")
    result = CliRunner().invoke(app, ["run", str(config)])
    assert result.exit_code == 2, result.output
    line = _one_error_line(result)
    assert str(config) in line and "UTF-8" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_output_location_is_one_line(tmp_path):
    out = tmp_path / "out"
    write_synthetic_cache(out, 40, response_tokens=10, prompt_tokens=4, rows_per_file=16)
    config = _write_config(tmp_path / "c.yaml", "unused.jsonl", str(out))
    locked = tmp_path / "read-only"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        # A new output under a read-only directory, and a read-only output directory.
        result = CliRunner().invoke(app, ["triage", str(config), "--out", str(locked / "x")])
        assert result.exit_code == 1, result.output
        line = _one_error_line(result)
        assert str(locked / "x") in line and "Permission denied" in line
        out.chmod(0o555)
        result = CliRunner().invoke(app, ["triage", str(config)])
        assert result.exit_code == 1, result.output
        line = _one_error_line(result)
        assert str(out) in line and "Permission denied" in line
    finally:
        locked.chmod(0o755)
        out.chmod(0o755)


def _disk_full(monkeypatch, target: str) -> None:
    """Writes of Parquet data (``shards``) or of the dataset card (``card``) fail with ENOSPC,
    as pyarrow and the OS report it."""
    if target == "shards":

        def full(self, *args, **kwargs):
            raise OSError(
                errno.ENOSPC,
                "Error writing bytes to file. Detail: [errno 28] No space left on device",
            )

        monkeypatch.setattr(pq.ParquetWriter, "write_table", full)
        return
    real_open = open

    def open_full(file, mode="r", *args, **kwargs):
        if "w" in mode and Path(file).name.startswith(".README.md"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", open_full)


def _published_state(out: Path) -> dict[str, bytes]:
    return {k: v for k, v in _tree(out).items() if k.startswith(("data/", "README", "LATEST"))}


@pytest.mark.parametrize("target", ["shards", "card"])
def test_disk_full_during_triage_keeps_the_previous_version(tmp_path, monkeypatch, target):
    out = tmp_path / "out"
    write_synthetic_cache(out, 60, response_tokens=10, prompt_tokens=4, rows_per_file=16)
    config = _write_config(tmp_path / "c.yaml", "unused.jsonl", str(out))
    runner = CliRunner()
    result = runner.invoke(app, ["triage", str(config)])
    assert result.exit_code == 0, result.output
    before = _published_state(out)

    _disk_full(monkeypatch, target)
    result = runner.invoke(app, ["triage", str(config), "--set", "qtuning.sample_ratio=0.5"])
    monkeypatch.undo()
    assert result.exit_code == 1, result.output
    line = _one_error_line(result)
    assert "No space left on device" in line and str(out) in line, line
    assert _published_state(out) == before  # the previous version, card and LATEST
    assert not (out / ".staging").exists()
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]
    assert not (out / ".qtune.lock").exists()


# --- group_by with JSONPath characters --------------------------------------------------------


def test_group_by_field_names_are_not_json_paths():
    from qtune.pipeline.triage_job import sample_groups

    stats = pa.table(
        {
            "source": ["a.jsonl"] * 4,
            "metadata": [
                json.dumps({"$..*": "x", "task": "t"}),
                json.dumps({"a.b": 1, "it's": "q"}),
                json.dumps({"$..*": "y", "a\\b": "z"}),
                None,
            ],
        }
    )
    assert list(sample_groups(stats, "$..*")) == ["x", "(no $..*)", "y", "(no $..*)"]
    assert list(sample_groups(stats, "a.b")) == ["(no a.b)", "1", "(no a.b)", "(no a.b)"]
    assert list(sample_groups(stats, "it's"))[1] == "q"
    assert list(sample_groups(stats, "a\\b"))[2] == "z"
    assert list(sample_groups(stats, "task"))[0] == "t"


def test_group_by_with_json_path_characters_through_the_cli(tmp_path):
    out = tmp_path / "out"
    write_synthetic_cache(out, 40, response_tokens=10, prompt_tokens=4, rows_per_file=16)
    config = _write_config(tmp_path / "c.yaml", "unused.jsonl", str(out))
    result = CliRunner().invoke(
        app,
        ["triage", str(config), "--set", "qtuning.scope=group", "--set", "qtuning.group_by=$..*"],
    )
    assert result.exit_code == 1, result.output
    assert "no input row has that field" in _one_error_line(result)


# --- the dataset card and files qtune did not write ------------------------------------------


@pytest.mark.parametrize("command", ["triage", "score", "run"])
def test_a_foreign_readme_is_refused_before_any_work(tmp_path, command):
    out = tmp_path / "out"
    write_synthetic_cache(out, 40, response_tokens=10, prompt_tokens=4, rows_per_file=16)
    (out / "README.md").write_text(USER_CARD)
    (tmp_path / "in.jsonl").write_text(CHAT_ROW + "\n")
    # The model does not exist: a check after preflight would fail on it instead.
    config = _write_config(tmp_path / "c.yaml", str(tmp_path / "in.jsonl"), str(out))
    before = _tree(tmp_path)
    result = CliRunner().invoke(app, [command, str(config)])
    assert result.exit_code == 2, result.output
    line = _one_error_line(result)
    assert str(out / "README.md") in line, line
    assert _tree(tmp_path) == before


def test_qtune_replaces_its_own_card_and_one_written_before_the_marker(tmp_path):
    out = tmp_path / "out"
    write_synthetic_cache(out, 40, response_tokens=10, prompt_tokens=4, rows_per_file=16)
    config = _write_config(tmp_path / "c.yaml", "unused.jsonl", str(out))
    runner = CliRunner()
    assert runner.invoke(app, ["triage", str(config)]).exit_code == 0
    card = (out / "README.md").read_text()
    assert runner.invoke(app, ["triage", str(config)]).exit_code == 0
    # A card written by qtune before cards carried a marker.
    legacy = "\n".join(line for line in card.splitlines() if "<!--" not in line) + "\n"
    (out / "README.md").write_text(legacy)
    result = runner.invoke(app, ["triage", str(config)])
    assert result.exit_code == 0, result.output
    assert (out / "README.md").read_text() == card


def test_a_version_folder_holding_foreign_files_is_not_replaced(tmp_path):
    out = tmp_path / "out"
    write_synthetic_cache(out, 40, response_tokens=10, prompt_tokens=4, rows_per_file=16)
    config = _write_config(tmp_path / "c.yaml", "unused.jsonl", str(out))
    runner = CliRunner()
    assert runner.invoke(app, ["triage", str(config)]).exit_code == 0
    notes = out / "data/epoch_000/notes.txt"
    notes.write_text("my notes\n")
    before = _published_state(out)
    result = runner.invoke(app, ["triage", str(config), "--set", "qtuning.sample_ratio=0.5"])
    assert result.exit_code == 2, result.output
    assert str(notes) in _one_error_line(result)
    assert _published_state(out) == before


def _published_output(tmp_path: Path) -> tuple[Path, Path]:
    """A synthetic output with a published version and its report, and the config."""
    out = tmp_path / "out"
    write_synthetic_cache(out, 40, response_tokens=10, prompt_tokens=4, rows_per_file=16)
    rejects = OutputLayout(out).rejects_dir(0)
    rejects.mkdir(parents=True)
    config = _write_config(tmp_path / "c.yaml", "unused.jsonl", str(out))
    result = CliRunner().invoke(app, ["triage", str(config)])
    assert result.exit_code == 0, result.output
    from qtune.pipeline.report_job import write_report

    assert write_report(out).is_file()
    return out, config


# Files of the user's beside qtune's folders, and inside them (those block re-publication of
# that folder, but --restart must not delete them either).
BESIDE = {
    "notes.txt": b"mine\n",
    "data/train.jsonl": CHAT_ROW.encode() + b"\n",
    "data/mine/more.jsonl": CHAT_ROW.encode() + b"\n",
}
INSIDE = {
    "scores/epoch_000/NOTES.md": b"about these scores\n",
    "rejects/epoch_000/why.txt": b"my analysis\n",
    "data/epoch_000/train/README.txt": b"do not delete\n",
}
USER_FILES = {**BESIDE, **INSIDE}


def test_restart_removes_only_what_qtune_wrote(tmp_path):
    from qtune.pipeline.score_job import discard_outputs

    out, _ = _published_output(tmp_path)
    (out / ".staging/triage-000-0123456789ab").mkdir(parents=True)
    (out / ".staging/triage-000-0123456789ab/x.parquet").write_bytes(b"partial")
    for relative, data in USER_FILES.items():
        (out / relative).parent.mkdir(parents=True, exist_ok=True)
        (out / relative).write_bytes(data)
    # The CLI above rebound logging to its own (closed) stream: listen on the job's logger.
    messages: list[str] = []
    listener = logging.Handler()
    listener.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("qtune.pipeline.score_job")
    logger.addHandler(listener)
    try:
        discard_outputs(OutputLayout(out))
    finally:
        logger.removeHandler(listener)
    assert _tree(out) == USER_FILES  # every qtune file gone, every other file as it was
    assert not (out / ".staging").exists() and not (out / "data/epoch_000/report").exists()
    kept = next(m for m in messages if "qtune did not write" in m)
    assert "notes.txt" in kept and "data/train.jsonl" in kept


def test_restart_keeps_a_foreign_card(tmp_path):
    from qtune.pipeline.score_job import discard_outputs

    out, _ = _published_output(tmp_path)
    (out / "README.md").write_text(USER_CARD)
    (out / "LATEST").write_text("my own pointer\n")
    discard_outputs(OutputLayout(out))
    assert _tree(out) == {"README.md": USER_CARD.encode(), "LATEST": b"my own pointer\n"}


@pytest.mark.ray
def test_run_restart_through_the_cli_keeps_user_files(mixed, llama_dir, tmp_path):
    from tests.pipeline.mixed_corpus import write_config

    copy = tmp_path / "copy"
    shutil.copytree(mixed["out"], copy)
    for relative, data in BESIDE.items():
        (copy / relative).parent.mkdir(parents=True, exist_ok=True)
        (copy / relative).write_bytes(data)
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.jsonl").write_text(CHAT_ROW + "\n")
    config = write_config(tmp_path / "r.yaml", other, llama_dir, copy)
    result = CliRunner().invoke(app, ["run", str(config), "--restart"])
    assert result.exit_code == 0, result.output
    assert "qtune did not write" in result.output
    for relative, data in BESIDE.items():
        assert (copy / relative).read_bytes() == data, relative
    manifest = json.loads((copy / "data/epoch_000/manifest.json").read_text())
    assert manifest["counts"]["input_rows"] == 1


@pytest.mark.ray
def test_disk_full_during_run_keeps_the_previous_version(mixed, llama_dir, tmp_path, monkeypatch):
    from tests.pipeline.mixed_corpus import write_config

    copy = tmp_path / "copy"
    shutil.copytree(mixed["out"], copy)
    before = _published_state(copy)
    config = write_config(tmp_path / "c.yaml", mixed["corpus"], llama_dir, copy)
    _disk_full(monkeypatch, "shards")  # the scored cache is complete: run goes on to triage
    result = CliRunner().invoke(app, ["run", str(config)])
    monkeypatch.undo()
    assert result.exit_code == 1, result.output
    line = _one_error_line(result)
    assert "No space left on device" in line and str(copy) in line
    assert _published_state(copy) == before
    assert not (copy / ".staging").exists()


@pytest.mark.ray
def test_disk_full_while_scoring_is_one_line_and_resumable(llama_dir, tmp_path, monkeypatch):
    import qtune.pipeline.scoring_state as scoring_state

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text((CHAT_ROW + "\n") * 6)
    out = tmp_path / "out"
    config = _write_config(tmp_path / "c.yaml", str(corpus), str(out), model=llama_dir)
    real = scoring_state.write_atomic

    def marker_full(path: Path, text: str) -> None:
        if path.parent.name == "done":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, text)

    monkeypatch.setattr(scoring_state, "write_atomic", marker_full)
    result = CliRunner().invoke(app, ["run", str(config)])
    monkeypatch.undo()
    assert result.exit_code == 1, result.output
    line = _one_error_line(result)
    assert "No space left on device" in line and str(out) in line
    assert "re-run" in line  # the finished partitions are kept for a resume
    result = CliRunner().invoke(app, ["run", str(config)])
    assert result.exit_code == 0, result.output


# --- remote outputs: the push deletes only what it synced -------------------------------------


def test_push_never_deletes_remote_files_it_did_not_sync(tmp_path, s3_bucket):
    from qtune import storage
    from qtune.pipeline.remote_sync import output_layout, push

    uri = f"{s3_bucket}/safety-{os.getpid()}"
    layout = output_layout(uri, tmp_path / "work", pull=False)
    (layout.root / "data/epoch_000").mkdir(parents=True)
    (layout.root / "data/epoch_000/manifest.json").write_text("{}")
    (layout.root / "LATEST").write_text("epoch_000\n")
    push(layout)
    # Someone else's file appears on the remote; qtune never saw it.
    storage.write_bytes(storage.join(uri, "data", "theirs.txt"), b"theirs")
    # A file qtune pushed, then removed here (a replaced version): its remote copy goes.
    (layout.root / "data/epoch_000/manifest.json").unlink()
    push(layout)
    files = storage.list_files(uri)
    assert "data/theirs.txt" in files
    assert "data/epoch_000/manifest.json" not in files
