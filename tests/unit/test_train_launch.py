"""Launcher command lines (DeepSpeed, torchrun, srun) and rank/world discovery from the environment."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from bertscale.errors import ConfigError
from bertscale.train.distributed import read_env
from bertscale.train.launch import LaunchSpec, build_command

CFG = Path("/tmp/run/launch-config.yaml")


def test_deepspeed_single_node_runs_the_module_on_n_ranks():
    cmd, env = build_command(LaunchSpec(num_procs=2, master_port=29600), CFG, data="/d", tokenizer="/t")
    assert cmd[:4] == [sys.executable, "-u", "-m", "deepspeed.launcher.runner"]
    assert cmd[cmd.index("--num_gpus") + 1] == "2"
    assert cmd[cmd.index("--master_port") + 1] == "29600"
    assert "--hostfile" not in cmd and "--no_ssh" not in cmd
    tail = cmd[cmd.index("--module"):]
    assert tail == ["--module", "bertscale.train", "--config", str(CFG), "--data", "/d", "--tokenizer", "/t"]
    assert env["PYTHONUNBUFFERED"] == "1"


def test_deepspeed_per_node_launch_without_ssh_writes_a_hostfile(tmp_path):
    cfg = tmp_path / "launch-config.yaml"
    cmd, _ = build_command(LaunchSpec(num_procs=4, nnodes=3, node_rank=2, master_addr="10.0.0.1"), cfg)
    assert cmd[cmd.index("--node_rank") + 1] == "2" and "--no_ssh" in cmd
    assert cmd[cmd.index("--master_addr") + 1] == "10.0.0.1"
    hostfile = Path(cmd[cmd.index("--hostfile") + 1])
    assert hostfile.read_text().splitlines() == ["node0 slots=4", "node1 slots=4", "node2 slots=4"]


def test_deepspeed_with_a_hostfile_uses_ssh(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("a slots=2\nb slots=2\n")
    cmd, _ = build_command(LaunchSpec(num_procs=2, nnodes=2, hostfile=str(hosts)), CFG)
    assert cmd[cmd.index("--hostfile") + 1] == str(hosts) and "--no_ssh" not in cmd


def test_torchrun_and_srun_commands():
    cmd, _ = build_command(LaunchSpec("torchrun", num_procs=2, nnodes=2, node_rank=1, master_addr="h0"), CFG)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    for flag, value in (("--nnodes", "2"), ("--nproc_per_node", "2"), ("--node_rank", "1"), ("--master_addr", "h0")):
        assert cmd[cmd.index(flag) + 1] == value
    assert cmd[-4:] == ["-m", "bertscale.train", "--config", str(CFG)]
    cmd, env = build_command(LaunchSpec("srun", num_procs=8, nnodes=2, master_addr="h0", master_port=1234), CFG)
    assert cmd[0] == "srun" and "--ntasks-per-node=8" in cmd and "--nodes=2" in cmd
    assert env["MASTER_ADDR"] == "h0" and env["MASTER_PORT"] == "1234"


def test_bad_specs_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="node_rank"):
        build_command(LaunchSpec(nnodes=2, node_rank=2), CFG)
    with pytest.raises(ConfigError, match="hostfile"):
        build_command(LaunchSpec(hostfile=str(tmp_path / "missing")), CFG)


def test_read_env_torch_style_variables():
    env = read_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                    "MASTER_ADDR": "h0", "MASTER_PORT": "1234"})
    assert (env.rank, env.world_size, env.local_rank, env.node_rank, env.source) == (3, 4, 1, 1, "torch")
    assert not env.is_main and env.master_addr == "h0" and env.master_port == 1234


def test_read_env_slurm_and_single_process():
    env = read_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                    "SLURM_NTASKS_PER_NODE": "4(x2)", "MASTER_ADDR": "n0"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.source) == (5, 8, 1, 4, "slurm")
    single = read_env({})
    assert (single.rank, single.world_size, single.source) == (0, 1, "single") and single.is_main
    assert 0 < single.master_port < 65536


def test_default_port_is_free_on_one_node_and_29500_across_nodes(tmp_path):
    import socket

    with socket.socket() as busy:  # another job on this machine already holds a port
        busy.bind(("127.0.0.1", 29500 if _port_free(29500) else 0))
        busy.listen()
        taken = busy.getsockname()[1]
        single = LaunchSpec(num_procs=2)
        cmd, _ = build_command(single, CFG)
        port = int(cmd[cmd.index("--master_port") + 1])
        assert port != taken and _port_free(port) and single.master_port == port
    multi = LaunchSpec("torchrun", num_procs=2, nnodes=2, master_addr="h0")
    cmd, _ = build_command(multi, tmp_path / "c.yaml")
    assert cmd[cmd.index("--master_port") + 1] == "29500"


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_output_lines_drop_progress_redraws_and_keep_the_final_bar():
    import io

    from bertscale.train.launch import output_lines

    out = (b"starting\n"
           b"\rpretrain:   0%|     | 0/3\rpretrain:  33%|#    | 1/3\rpretrain: 100%|#####| 3/3\n"
           b"windows line\r\n"
           b"\n   \n"
           b"caf\xc3\xa9 done\n"
           b"\rbar killed mid-draw 50%")
    assert list(output_lines(io.BytesIO(out))) == [
        "starting", "pretrain: 100%|#####| 3/3", "windows line", "café done", "bar killed mid-draw 50%"]
