"""Demo assets are built once, loadable, and reused while the recipe is unchanged."""

from __future__ import annotations

from qtune.demo.assets import DEMO_RECIPE, STAMP, prepare_demo_corpus, prepare_demo_model


def test_demo_assets_build_once_and_reuse(tmp_path):
    recipe = {
        **DEMO_RECIPE,
        "n_samples": 40,
        "worked_samples": 12,
        "train_conversations": 64,
        "worked_train_conversations": 16,
        "train_steps": 20,
        "vocab_size": 300,
    }
    corpus = prepare_demo_corpus(tmp_path / "corpus", recipe)
    model = prepare_demo_model(tmp_path / "model", recipe)
    assert sorted(p.name for p in corpus.iterdir() if p.name != STAMP) == [
        "alpaca.parquet",
        "chat.jsonl",
        "completions.jsonl",
        "sharegpt.json",
        "worked.jsonl",
    ]
    stamp_time = (model / STAMP).stat().st_mtime_ns
    assert prepare_demo_model(tmp_path / "model", recipe) == model
    assert (model / STAMP).stat().st_mtime_ns == stamp_time  # cached, not rebuilt

    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert AutoTokenizer.from_pretrained(model).chat_template
    assert AutoModelForCausalLM.from_pretrained(model).config.head_dim == 64
    # A changed recipe rebuilds.
    prepare_demo_corpus(tmp_path / "corpus", {**recipe, "n_samples": 41})
    assert (tmp_path / "corpus" / STAMP).read_text() != ""
    assert not list(tmp_path.glob(".*.tmp"))


def test_demo_output_scored_before_the_assets_were_rebuilt_is_stale(tmp_path):
    """`qtune demo` restarts (instead of refusing) an output written from earlier demo assets."""
    import os

    from qtune.pipeline.cli import _demo_output_predates_assets
    from qtune.pipeline.config import load_config
    from qtune.pipeline.layout import OutputLayout

    corpus, model, out = tmp_path / "corpus", tmp_path / "model", tmp_path / "out"
    cfg = load_config(None, [f"input.path={corpus}", f"model.path={model}", f"output.dir={out}"])
    for directory in (corpus, model):
        directory.mkdir()
        (directory / STAMP).write_text("{}")
    assert not _demo_output_predates_assets(cfg, corpus, model)  # nothing scored yet
    summary = OutputLayout(out).score_summary(0)
    summary.parent.mkdir(parents=True)
    summary.write_text("{}")
    os.utime(summary, (1, 1))  # scored long before the assets' stamps
    assert _demo_output_predates_assets(cfg, corpus, model)
    os.utime(corpus / STAMP, (0, 0))
    os.utime(model / STAMP, (0, 0))
    assert not _demo_output_predates_assets(cfg, corpus, model)
