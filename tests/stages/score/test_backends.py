"""Both scoring backends against an independent float64 computation, per architecture family."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from qtune import schema
from qtune.stages.score import ScoringOptions, cpu_threads, create_backend
from qtune.stages.score.stage import Score
from tests.conftest import reference_scores

TOLERANCE = 1e-4  # nats per token


def _sequences(vocab: int, lengths: list[int], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(5, vocab, size=n).astype(np.int32) for n in lengths]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_torch_backend_matches_reference(model_dirs, tokenizer, arch):
    backend = create_backend(
        "torch",
        ScoringOptions(model_path=str(model_dirs[arch]), max_length=512, tokens_per_forward=600),
    )
    sequences = _sequences(len(tokenizer), [1, 2, 17, 300, 64, 5])
    results = backend.score(sequences)
    for ids, got in zip(sequences, results, strict=True):
        assert got.shape == (len(ids), 2) and got.dtype == np.float32
        np.testing.assert_allclose(got, reference_scores(model_dirs[arch], ids), atol=TOLERANCE)
    backend.close()


@pytest.mark.vllm
def test_vllm_backend_matches_reference_and_torch(vllm_llama, llama_dir, tokenizer):
    # 1024 = the engine's max_length: a whole sample must be scored in one engine step.
    sequences = _sequences(len(tokenizer), [2, 40, 1024, 333, 7], seed=1)
    got = vllm_llama.score(sequences)
    torch_backend = create_backend(
        "torch", ScoringOptions(model_path=str(llama_dir), max_length=1024)
    )
    torch_got = torch_backend.score(sequences)
    for ids, v, t in zip(sequences, got, torch_got, strict=True):
        assert v.shape == (len(ids), 2)
        np.testing.assert_array_equal(v[0], [0.0, 0.0])
        np.testing.assert_allclose(v, reference_scores(llama_dir, ids), atol=TOLERANCE)
        np.testing.assert_allclose(v, t, atol=TOLERANCE)
    # Entropy is over the full vocabulary: bounded by log |V| and positive for a random model.
    assert 0 < got[2][1:, 1].min() and got[2][1:, 1].max() <= np.log(len(tokenizer)) + 1e-4


@pytest.mark.vllm
@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "mistral"])
def test_vllm_plugin_covers_family(model_dirs, tokenizer, arch):
    backend = create_backend(
        "vllm", ScoringOptions(model_path=str(model_dirs[arch]), max_length=256, max_num_seqs=8)
    )
    try:
        sequences = _sequences(len(tokenizer), [3, 200, 31], seed=2)
        for ids, got in zip(sequences, backend.score(sequences), strict=True):
            np.testing.assert_allclose(got, reference_scores(model_dirs[arch], ids), atol=TOLERANCE)
    finally:
        backend.close()


def test_unsupported_architecture_suggests_torch(tmp_path):
    from qtune.stages.score import ScoringSetupError
    from qtune.stages.score.vllm_backend import check_vllm_can_serve

    (tmp_path / "config.json").write_text(
        '{"architectures": ["GPT2LMHeadModel"], "hidden_size": 128, "num_attention_heads": 2}'
    )
    with pytest.raises(ScoringSetupError, match="scoring.backend=torch"):
        check_vllm_can_serve(str(tmp_path), on_cpu=True)
    (tmp_path / "config.json").write_text(
        '{"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4}'
    )
    with pytest.raises(ScoringSetupError, match="head size 16"):
        check_vllm_can_serve(str(tmp_path), on_cpu=True)


def _literal_batch(ids: list[np.ndarray], masks: list[np.ndarray]) -> pa.Table:
    """Three TOKENIZED rows: ``ids[0]``, one rejected upstream, ``ids[1]``."""
    return pa.table(
        {
            schema.SAMPLE_ID: ["a", "b", "c"],
            schema.SOURCE: ["f"] * 3,
            schema.ROW_INDEX: [0, 1, 2],
            schema.PARTITION: pa.array([0, 0, 0], pa.int32()),
            schema.FORMAT: ["messages"] * 3,
            schema.METADATA: pa.nulls(3, pa.string()),
            schema.MESSAGES: pa.nulls(3, pa.list_(schema.MESSAGE_TYPE)),
            schema.TOOLS: pa.nulls(3, pa.string()),
            schema.RAW: [None, "{}", None],
            schema.REJECT_REASON: [None, "invalid_json", None],
            schema.REJECT_DETAIL: [None, "x", None],
            schema.INPUT_IDS: schema.list_array([ids[0], None, ids[1]], pa.int32()),
            schema.LOSS_MASK: schema.list_array([masks[0], None, masks[1]], pa.int8()),
            schema.N_TOKENS: pa.array([6, 0, 4], pa.int32()),
            schema.N_RESPONSE_TOKENS: pa.array([3, 0, 2], pa.int32()),
            schema.TRUNCATED: [False, False, False],
        }
    )


def test_score_stage_on_literal_batch(llama_dir, tokenizer):
    """Three rows, one rejected upstream: scores for the others, nulls for it."""
    ids = _sequences(len(tokenizer), [6, 4], seed=3)
    masks = [np.array([0, 0, 0, 1, 1, 1], np.int8), np.array([0, 1, 1, 0], np.int8)]
    stage = Score("torch", ScoringOptions(model_path=str(llama_dir), max_length=64))
    out = stage(_literal_batch(ids, masks))
    stage.close()
    assert out.schema == schema.SCORED_SCHEMA
    assert out.column(schema.TOKEN_LOGPROB).null_count == 1
    assert out.column(schema.PPL).to_pylist()[1] is None
    for row, (seq, mask) in zip([0, 2], zip(ids, masks, strict=True), strict=True):
        ref = reference_scores(llama_dir, seq)
        got = np.array(out.column(schema.TOKEN_LOGPROB)[row].as_py())
        np.testing.assert_allclose(got, ref[:, 0], atol=TOLERANCE)
        nll = -ref[mask.astype(bool), 0].mean()
        assert out.column(schema.NLL)[row].as_py() == pytest.approx(nll, abs=TOLERANCE)
        assert out.column(schema.PPL)[row].as_py() == pytest.approx(np.exp(nll), rel=1e-3)
        ent = ref[mask.astype(bool), 1].mean()
        assert out.column(schema.ENTROPY)[row].as_py() == pytest.approx(ent, abs=TOLERANCE)


@pytest.mark.vllm
def test_vllm_engine_that_cannot_start_fails_fast_with_its_reason(llama_dir, tmp_path):
    import shutil

    from qtune.stages.score import ScoringSetupError

    broken = tmp_path / "broken"
    shutil.copytree(llama_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    # Fast = it raises (no wait on an engine process that never comes up); not timed, since a
    # busy machine can take minutes just to import vLLM.
    with pytest.raises(ScoringSetupError) as error:
        create_backend("vllm", ScoringOptions(model_path=str(broken), max_length=256))
    # The engine runs in-process on CPU, so its own reason is in the message, not only a log.
    assert "vLLM engine failed to start" in str(error.value)
    assert "header" in str(error.value).lower() or "safetensor" in str(error.value).lower()


def test_score_stage_starts_its_backend_when_built(monkeypatch):
    """A scoring actor starts its engine while upstream stages still read and tokenise."""
    import qtune.stages.score.stage as stage_module

    started = []
    monkeypatch.setattr(stage_module, "create_backend", lambda name, opts: started.append(name))
    Score("torch", ScoringOptions(model_path="unused", max_length=64))
    assert started == ["torch"]


class _FakeBackend:
    def __init__(self, options: ScoringOptions):
        self.closed = 0

    def score(self, sequences: list[np.ndarray]) -> list[np.ndarray]:
        return [np.zeros((len(s), 2), np.float32) for s in sequences]

    def close(self) -> None:
        self.closed += 1


def test_score_stage_closes_its_backend_when_dropped(monkeypatch):
    """Ray Data's teardown of a scoring actor drops the Score (MapWorker.__ray_shutdown__): the
    engine must be shut down then, while Ray still runs, not at interpreter exit."""
    import gc

    from qtune.stages import score as score_module

    monkeypatch.setitem(score_module.BACKENDS, "fake", f"{__name__}:_FakeBackend")
    stage = Score("fake", ScoringOptions(model_path="unused", max_length=64))
    backend = stage.backend
    del stage
    gc.collect()  # CPython frees it at once; this only makes the test independent of that
    assert backend.closed == 1

    stage = Score("fake", ScoringOptions(model_path="unused", max_length=64))
    backend = stage.backend
    stage.close()
    stage.close()
    del stage
    gc.collect()
    assert backend.closed == 1  # once: close() is idempotent and __del__ adds nothing


def test_score_stage_reports_a_backend_that_cannot_start_at_its_first_batch(
    llama_dir, tokenizer, tmp_path
):
    """Not from the constructor: an actor's constructor error reaches the driver only as text
    inside ActorDiedError, a batch's error as itself (the CLI prints its message)."""
    import shutil

    from qtune.stages.score import ScoringSetupError

    broken = tmp_path / "broken"
    shutil.copytree(llama_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    stage = Score("torch", ScoringOptions(model_path=str(broken), max_length=64))
    ids = _sequences(len(tokenizer), [6, 4], seed=3)
    masks = [np.array([0, 0, 0, 1, 1, 1], np.int8), np.array([0, 1, 1, 0], np.int8)]
    for _ in range(2):  # each batch tries again, as before the backend started in the constructor
        with pytest.raises(
            ScoringSetupError, match="the torch scoring backend could not start for"
        ):
            stage(_literal_batch(ids, masks))
    # Rows that were all rejected upstream need no backend and pass through.
    rejected = _literal_batch(ids, masks).filter(pa.array([False, True, False]))
    assert stage(rejected).column(schema.PPL).to_pylist() == [None]


def test_cpu_threads_default_to_every_allowed_core(monkeypatch):
    import os

    import torch

    from qtune.stages.score import cpu_threads, use_cpu_threads

    assert cpu_threads(3) == 3
    assert cpu_threads(None) == len(os.sched_getaffinity(0))
    calls = []
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    assert use_cpu_threads(2) == 2 and calls == []  # unchanged: no call (vLLM stubs it out)
    assert use_cpu_threads(1) == 1 and calls == [1]


def test_torch_backend_runs_on_the_configured_threads(llama_dir, monkeypatch):
    import torch

    calls = []
    monkeypatch.setattr(torch, "get_num_threads", lambda: 99)
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    create_backend("torch", ScoringOptions(str(llama_dir), 64, num_threads=1)).close()
    create_backend("torch", ScoringOptions(str(llama_dir), 64)).close()
    assert calls == [1, cpu_threads(None)]
