"""Session fixtures: a BPE tokenizer and tiny random models built at test time (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

# vLLM on CPU: small KV cache (24 GiB machines); set before any engine starts.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def tokenizer():
    from qtune.demo.corpus import training_conversations
    from qtune.demo.model import build_bpe_tokenizer

    conversations = training_conversations(1500, seed=1)
    return build_bpe_tokenizer((m["content"] for c in conversations for m in c), vocab_size=512)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """One tiny random model per covered architecture family (head_dim 64, float32)."""
    from qtune.demo.model import ARCHITECTURES, save_tiny_model

    root = tmp_path_factory.mktemp("models")
    return {
        arch: save_tiny_model(root / arch, arch, tokenizer, seed=i)
        for i, arch in enumerate(ARCHITECTURES)
    }


@pytest.fixture(scope="session")
def llama_dir(model_dirs) -> Path:
    return model_dirs["llama"]


@pytest.fixture(scope="session")
def vllm_llama(llama_dir):
    """The session's one long-lived vLLM engine (the llama test model, max length 1024)."""
    from qtune.stages.score import ScoringOptions, create_backend

    backend = create_backend(
        "vllm", ScoringOptions(model_path=str(llama_dir), max_length=1024, max_num_seqs=64)
    )
    yield backend
    backend.close()


def reference_scores(model_dir: Path, ids: np.ndarray) -> np.ndarray:
    """Independent per-token computation: full logits of a float64 HF forward, no chunking."""
    import torch

    model = _reference_model(str(model_dir))
    with torch.no_grad():
        logits = model(torch.from_numpy(ids.astype(np.int64))[None]).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    out = np.zeros((len(ids), 2))
    out[1:, 0] = logp[:-1].gather(1, torch.from_numpy(ids[1:].astype(np.int64))[:, None])[:, 0]
    out[1:, 1] = (-(logp.exp() * logp).sum(-1))[:-1]
    return out


_REFERENCE_MODELS: dict[str, object] = {}


def _reference_model(path: str):
    import torch
    from transformers import AutoModelForCausalLM

    if path not in _REFERENCE_MODELS:
        _REFERENCE_MODELS[path] = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float64
        ).eval()
    return _REFERENCE_MODELS[path]


@pytest.fixture(scope="session")
def s3_bucket():
    """A real S3 endpoint on loopback (moto's server, no network): ``s3://qtune-test``.

    Credentials and endpoint go into the environment, where pyarrow's S3 filesystem (in this
    process and in every Ray worker started afterwards) reads them, as it would on a cluster.
    """
    import socket
    import subprocess
    import sys
    import time

    import pyarrow.fs as pafs

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = Path(sys.executable).parent / "moto_server"
    process = subprocess.Popen(
        [str(server), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"moto_server did not start on port {port}") from None
            time.sleep(0.2)
    env = {
        "AWS_ACCESS_KEY_ID": "qtune-test",
        "AWS_SECRET_ACCESS_KEY": "qtune-test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    pafs.S3FileSystem(
        endpoint_override=f"127.0.0.1:{port}", scheme="http", allow_bucket_creation=True
    ).create_dir("qtune-test")
    yield "s3://qtune-test"
    process.kill()
    process.wait()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
