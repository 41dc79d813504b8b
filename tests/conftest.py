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


def lay_out_hub_repo(cache: str, repo_id: str, files_dir: str) -> str:
    """Put files_dir's files into a Hugging Face hub cache the way huggingface_hub writes one: content-addressed
    blobs/, snapshots/REVISION/ of symlinks to them, refs/main naming the revision. Returns the snapshot dir."""
    import hashlib
    import shutil
    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    revision = hashlib.sha1(repo_id.encode()).hexdigest()  # any 40-hex commit id
    snapshot = os.path.join(repo, "snapshots", revision)
    os.makedirs(os.path.join(repo, "blobs"), exist_ok=True)
    os.makedirs(snapshot, exist_ok=True)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    for name in os.listdir(files_dir):
        digest = hashlib.sha256(open(os.path.join(files_dir, name), "rb").read()).hexdigest()
        shutil.copy(os.path.join(files_dir, name), os.path.join(repo, "blobs", digest))
        os.symlink(os.path.join("..", "..", "blobs", digest), os.path.join(snapshot, name))
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(revision)
    return snapshot


@pytest.fixture(scope="session")
def hub_cache(tmp_path_factory, tiny_tokenizer):
    """HF_HUB_CACHE holding tiny models under the default config's names: the student Qwen/Qwen3-0.6B and the
    teacher Qwen/Qwen3-8B (bigger, the same tokenizer), with room for the default 1024 + 2048 tokens."""
    import tiny
    root = tmp_path_factory.mktemp("hub")
    cache = str(root / "cache")
    student = tiny.save_tiny(str(root / "student"), tiny_tokenizer, max_position_embeddings=4096, seed=0)
    teacher = tiny.save_tiny(str(root / "teacher"), tiny_tokenizer, max_position_embeddings=4096, seed=1,
                             hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=256)
    lay_out_hub_repo(cache, "Qwen/Qwen3-0.6B", student)
    lay_out_hub_repo(cache, "Qwen/Qwen3-8B", teacher)
    return cache
