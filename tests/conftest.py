"""Shared test set-up: import path, the in-process vLLM settings, and tiny real models built locally."""
import os
import sys

# Before anything imports vllm or torch: no inductor compile, engine in this process (docs/cpu.md).
os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_tokenizer():
    import tiny
    return tiny.make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny Qwen3 checkpoint (untied embeddings) on disk, loadable by vLLM and from_pretrained."""
    import tiny
    return tiny.save_tiny(str(tmp_path_factory.mktemp("tiny_model")), tiny_tokenizer, seed=0)


@pytest.fixture(scope="session")
def tiny_tied_model_dir(tmp_path_factory, tiny_tokenizer):
    """The same, with tied input/output embeddings (the layout of Qwen3-0.6B and 1.7B)."""
    import tiny
    return tiny.save_tiny(str(tmp_path_factory.mktemp("tiny_tied")), tiny_tokenizer, seed=1, tie_word_embeddings=True)
