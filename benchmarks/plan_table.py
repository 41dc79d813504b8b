"""The README's memory-plan table: preflight.memory_plan for every preset on 8 x H200 and 8 x H100, offline.

The plan needs only each model's config.json. With no hub here, this script writes those configs (the published
shapes of the Qwen3 and DeepSeek-R1-Distill models the presets name, copied from their model cards) into a hub
cache laid out the way the hub lays it out, and plans with HF_HUB_OFFLINE=1 through the same code as
`python train.py --config PRESET --plan true --plan_gpus 8x140`.

    python benchmarks/plan_table.py                       # Markdown table on stdout
    python benchmarks/plan_table.py --gpus 8x140,8x79.6   # the default: H200 (143,771 MiB), H100 80GB (81,559 MiB)
"""
import argparse
import glob
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

QWEN3 = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=128, vocab_size=151936,
             max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000, torch_dtype="bfloat16")
QWEN2 = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", max_position_embeddings=131072,
             rms_norm_eps=1e-6, rope_theta=10000, torch_dtype="bfloat16", tie_word_embeddings=False)
SHAPES = {  # name: (hidden, intermediate, layers, heads, kv heads, tied embeddings, family, vocab)
    "Qwen/Qwen3-0.6B": (1024, 3072, 28, 16, 8, True, QWEN3, 151936),
    "Qwen/Qwen3-1.7B": (2048, 6144, 28, 16, 8, True, QWEN3, 151936),
    "Qwen/Qwen3-1.7B-Base": (2048, 6144, 28, 16, 8, True, QWEN3, 151936),
    "Qwen/Qwen3-8B": (4096, 12288, 36, 32, 8, False, QWEN3, 151936),
    "Qwen/Qwen3-8B-Base": (4096, 12288, 36, 32, 8, False, QWEN3, 151936),
    "Qwen/Qwen3-32B": (5120, 25600, 64, 64, 8, False, QWEN3, 151936),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": (1536, 8960, 28, 12, 2, False, QWEN2, 151936),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B": (3584, 18944, 28, 28, 4, False, QWEN2, 152064),
}


def write_hub_cache(root: str):
    """HF_HUB_CACHE/models--ORG--NAME/{refs/main, snapshots/REV/config.json}, as huggingface_hub writes it."""
    for name, (hidden, inter, layers, heads, kv, tied, family, vocab) in SHAPES.items():
        repo = os.path.join(root, "models--" + name.replace("/", "--"))
        rev = "0" * 40
        os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
        os.makedirs(os.path.join(repo, "snapshots", rev), exist_ok=True)
        open(os.path.join(repo, "refs", "main"), "w").write(rev)
        config = dict(family, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tied, vocab_size=vocab)
        json.dump(config, open(os.path.join(repo, "snapshots", rev, "config.json"), "w"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpus", default="8x140,8x79.6", help="comma-separated GPUSxGIB")
    args = ap.parse_args()
    cache = tempfile.mkdtemp(prefix="plan_hub_")
    write_hub_cache(cache)
    os.environ.update(HF_HUB_CACHE=cache, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    import preflight
    import train
    print("| preset | GPUs | rollout / teacher pass / update GiB per GPU | fits | vLLM KV cache | rollout batch at "
          "once | gpu_memory_utilization (preset / most that fits) |")
    print("|---|---|---|---|---|---|---|")
    for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.toml"))):
        cfg = train.parse_config(["--config", path])
        if cfg.model.startswith("tiny"):
            continue
        for gpus in args.gpus.split(","):
            cfg = train.parse_config(["--config", path, "--plan_gpus", gpus])
            names = {"model": cfg.model, "teacher": cfg.teacher}
            plan = preflight.plan_for(cfg, int(gpus.split("x")[0]), names)
            try:
                preflight.check_plan(plan, cfg)
                fits = "yes"
            except SystemExit as e:
                fits = f"no: {str(e).split(':')[1].strip().split(' per GPU')[0]}"
            ph = plan["phases"]
            at_once = min(int(plan["kv_tokens"] // plan["seq_tokens"]), cfg.max_num_seqs, plan["rollout_seqs"])
            print(f"| {os.path.basename(path)[:-5]} | {gpus.replace('x', ' x ')} GiB | "
                  f"{ph['rollout'] / 2**30:.0f} / {ph['teacher pass'] / 2**30:.0f} / {ph['update'] / 2**30:.0f} | "
                  f"{fits} | {plan['kv_tokens'] / 1e6:.2f}M tokens | {at_once} of {plan['rollout_seqs']} | "
                  f"{cfg.gpu_memory_utilization} / {plan['max_util']:.2f} |")


if __name__ == "__main__":
    main()
