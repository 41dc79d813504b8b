"""Two ranks under torchrun (gloo): each owns a vLLM engine, syncs weights, keeps using collectives, exits clean."""
import json
import os
import socket
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def test_two_ranks_each_own_an_engine(tiny_model_dir, tmp_path):
    with socket.socket() as sock:  # a free port: torchrun's --master_port 0 hangs at rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, TORCH_COMPILE_DISABLE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           os.path.join(HERE, "dist_rollout_worker.py"), tiny_model_dir, str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    results = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    for r, res in enumerate(results):
        assert "init_process_group" in res["early_build_error"]
        assert res["world_after_build"] == 2  # the engine joined the trainer's world, did not replace it
        assert res["local_world_size_env"] == "2"  # vLLM's LOCAL_WORLD_SIZE=1 was undone
        assert res["ranks"] == [0, 1] and res["all_reduce"] == 2.0
        assert max(res["errors"]) < 1e-4  # both ranks' engines follow the synced weights
        assert min(res["moved"]) > 0.1  # ... which really differ from the checkpoint's
        assert res["initialized_after_shutdown"] is False  # documented: vLLM's teardown destroys the group
