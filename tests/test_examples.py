"""The LM and NMT examples train on real offline data through their LightningCLI and YAML configs.

Each test launches ``tests/dist/ex_cases.py`` once (several cases in sequence) as its own process: one process,
``torchrun --nproc_per_node 2`` (DDP, DeepSpeed ZeRO-2, ZeRO-3 on CPU), and two simulated nodes on loopback.
Checks use independent quantities: perplexity against exp(loss) from the model's own loss, BLEU against the
sacrebleu package, Lookahead's sync count against steps // k, and the loss going down.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from examples.common.runs import free_port, run_env

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "dist" / "ex_cases.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
K = 5  # configs/{lm,nmt}_lookahead.yaml


def launch(commands: list[list[str]], timeout: float) -> None:
    env = run_env()
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for cmd in commands]  # fmt: skip
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            raise
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, f"{proc.args} failed:\n{out[-6000:]}"


def cases(tmp_path: Path, names: str, prefix: list[str], timeout: float = 400) -> dict:
    out = tmp_path / "results.json"
    launch([[*prefix, str(SCRIPT), "--work", str(tmp_path), "--out", str(out), "--cases", names]], timeout)
    return json.loads(out.read_text())


def val_rows(result: dict) -> list[dict]:
    return [row for row in result["metrics"] if "val_loss" in row]


def check_lm(result: dict, steps: int) -> None:
    assert result["global_step"] == steps
    rows = val_rows(result)
    assert len(rows) == steps // 10
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] - 0.1, rows
    for row in rows:  # equal-size batches of equal-length blocks: token-mean NLL == mean of batch losses
        assert row["val_ppl"] == pytest.approx(math.exp(row["val_loss"]), rel=1e-4)
    tokens_per_s = [row["train_tokens_per_s"] for row in result["metrics"] if "train_tokens_per_s" in row]
    assert tokens_per_s and all(rate > 0 for rate in tokens_per_s)


def check_nmt(result: dict, steps: int) -> None:
    assert result["global_step"] == steps
    rows = val_rows(result)
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] or len(rows) == 1
    for row in rows:
        for key in ("val_bleu_greedy", "val_bleu_beam"):
            assert 0.0 <= row[key] <= 100.0


def check_lookahead(result: dict) -> None:
    assert "LookaheadCallback" in result["callbacks"]
    syncs = [(row["step"], row["lookahead/syncs"]) for row in result["metrics"] if "lookahead/syncs" in row]
    assert syncs and all(count == (step + 1) // K for step, count in syncs), syncs


def check_outputs(result: dict) -> None:
    assert {"metrics.csv", "config.yaml", "hparams.yaml", "checkpoints"} <= set(result["logs"])
    # TensorBoard is installed here (the examples extra), so its event files sit beside metrics.csv
    assert any(name.startswith("events.out.tfevents") for name in result["logs"])
    assert "last.ckpt" in result["checkpoints"]


@pytest.mark.slow
def test_one_process_hub_names_local_files_and_resume(tmp_path: Path) -> None:
    res = cases(tmp_path, "lm_hub,lm_hub+resume,nmt_local,nmt_hub", [sys.executable])
    # LM through load_dataset("wikitext", "wikitext-103-raw-v1") resolved to a local Hub-layout folder
    check_lm(res["lm_hub"], 30)
    check_outputs(res["lm_hub"])
    assert res["lm_hub"]["strategy"] == "SingleDeviceStrategy"
    # --ckpt_path last resumes at step 30 and continues to 40 (it does not start over)
    resumed = res["lm_hub+resume"]
    assert resumed["global_step"] == 40
    assert min(row["step"] for row in resumed["metrics"]) >= 30
    assert val_rows(resumed)[-1]["val_loss"] < val_rows(res["lm_hub"])[-1]["val_loss"]
    # NMT on the local Tatoeba TSV, and through load_dataset("wmt16", "de-en")
    check_nmt(res["nmt_local"], 30)
    check_outputs(res["nmt_local"])
    check_nmt(res["nmt_hub"], 10)
    for name in ("nmt_local", "nmt_hub"):
        logged = val_rows(res[name])[-1]["val_bleu_greedy"]
        assert res[name]["bleu_check"]["n"] == 16
        assert logged == pytest.approx(res[name]["bleu_check"]["sacrebleu"], abs=1e-3)


@pytest.mark.dist
def test_two_processes_ddp_zero2_zero3_with_lookahead(tmp_path: Path) -> None:
    prefix = [
        *TORCHRUN,
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
    ]
    res = cases(tmp_path, "lm_ddp_la,lm_zero2_la,nmt_zero3_la", prefix, timeout=500)
    assert res["lm_ddp_la"]["strategy"] == "DDPStrategy"
    assert res["lm_zero2_la"]["strategy"] == res["nmt_zero3_la"]["strategy"] == "CPUDeepSpeedStrategy"
    for name in ("lm_ddp_la", "lm_zero2_la"):
        assert res[name]["world_size"] == 2
        check_lm(res[name], 30)
        check_lookahead(res[name])
    check_nmt(res["nmt_zero3_la"], 30)
    check_lookahead(res["nmt_zero3_la"])
    check_outputs(res["lm_zero2_la"])


@pytest.mark.dist
def test_two_nodes_on_loopback(tmp_path: Path) -> None:
    port = str(free_port())
    commands = [
        [*TORCHRUN, "--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
         "--master_port", port, str(SCRIPT), "--work", str(tmp_path), "--out", str(tmp_path / f"node{rank}.json"),
         "--cases", "lm_multinode_la"]
        for rank in (0, 1)
    ]  # fmt: skip
    launch(commands, timeout=300)
    result = json.loads((tmp_path / "node0.json").read_text())["lm_multinode_la"]
    assert (result["num_nodes"], result["world_size"]) == (2, 2)
    check_lm(result, 20)
    check_lookahead(result)


def test_offline_variables_are_set_for_runs() -> None:
    env = run_env()
    assert env["HF_HUB_OFFLINE"] == env["HF_DATASETS_OFFLINE"] == env["TRANSFORMERS_OFFLINE"] == "1"
    assert os.pathsep.join([str(REPO)]) in env["PYTHONPATH"]
