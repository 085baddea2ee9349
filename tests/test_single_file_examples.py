"""The single-file examples run a few steps on real text: examples/torch/train.py (plain PyTorch loop) and
examples/deepspeed/train.py (raw DeepSpeed with the "lookahead" config section, 2 processes under torchrun).

Both are run as users run them (a script path, from a folder outside the repository) with tiny model sizes.
k=5 and 10 steps: the evaluation at step 6 is mid-cycle (θ ≠ φ) and the one at step 10 right after the second
sync, where Lookahead has just set θ ← φ, so the fast and slow losses must then be identical.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from lookahead_dist.core.keys import SLOW_KEY
from tests.helpers import REPO, child_env, free_port, run, torchrun_cmd

TINY = ["--max_iters=10", "--eval_interval=6", "--eval_iters=2", "--block_size=32", "--n_layer=1", "--n_embd=32",
        "--warmup_iters=2", "--k=5", "--alpha=0.5"]  # fmt: skip


def _check_history(history: list[dict[str, Any]], vocab: int) -> None:
    assert [row["iter"] for row in history] == [0, 6, 10]
    first, mid, last = history
    # Small initial weights: the first loss is that of a uniform guess over the real text's vocabulary.
    assert first["val_loss"] == pytest.approx(math.log(vocab), abs=0.15)
    assert first["val_loss_slow"] == first["val_loss"]  # no step yet: φ = θ
    assert abs(mid["val_loss_slow"] - mid["val_loss"]) > 1e-4, "mid-cycle, θ has moved away from φ"
    assert last["val_loss_slow"] == last["val_loss"], "right after a sync θ = φ"
    assert last["val_loss"] < first["val_loss"] - 0.05, "ten steps should lower the validation loss"


def test_torch_example_trains_and_evaluates_on_slow_weights(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "examples" / "torch" / "train.py"), *TINY, "--batch_size=8", "--lr=3e-3",
           "--device=cpu", f"--out_dir={out}"]  # fmt: skip
    proc = run(cmd, timeout=300, env=child_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "vocabulary of 65" in proc.stdout  # Tiny Shakespeare's characters
    assert "Lookahead synced 2 times" in proc.stdout
    _check_history(json.loads((out / "history.json").read_text()), vocab=65)

    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    assert ckpt["config"]["k"] == 5 and ckpt["config"]["max_iters"] == 10
    # The run ended on a sync: the model weights θ equal the slow weights, saved both as a model state dict
    # and inside the optimizer state (one φ per parameter tensor, shared embedding/head counted once).
    for name, value in ckpt["model"].items():
        assert torch.equal(value, ckpt["slow_model"][name]), name
    # The optimizer state indexes tensors as the example's param groups list them: weights (dim >= 2), then
    # biases and norms, in model order; the output head shares the embedding's tensor.
    names = [n for n in ckpt["slow_model"] if n != "head.weight"]
    order = [n for n in names if ckpt["slow_model"][n].dim() >= 2] + [
        n for n in names if ckpt["slow_model"][n].dim() < 2
    ]
    states = ckpt["optimizer"]["state"]
    assert sorted(states) == list(range(len(order)))
    for index, name in enumerate(order):
        assert torch.equal(states[index][SLOW_KEY], ckpt["slow_model"][name]), name


@pytest.fixture(scope="module")
def ds_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    pytest.importorskip("deepspeed")
    tmp = tmp_path_factory.mktemp("ds_example")
    out = tmp / "out"
    args = [*TINY, "--micro_batch=4", "--lr=3e-3", "--zero_stage=2", "--save_interval=4", f"--out_dir={out}"]
    port = free_port()
    cmd = torchrun_cmd(
        str(REPO / "examples" / "deepspeed" / "train.py"), args, nproc=2, port=port, module=False
    )
    proc = run(cmd, timeout=300, env=child_env(port=port), cwd=tmp)
    assert proc.returncode == 0, proc.stdout[-6000:]
    return {"out": out, "stdout": proc.stdout, "args": args, "tmp": tmp,
            "history": json.loads((out / "history.json").read_text())}  # fmt: skip


@pytest.mark.dist
def test_deepspeed_example_trains_with_the_config_section_under_zero2(ds_run: dict[str, Any]) -> None:
    stdout = ds_run["stdout"]
    assert "ZeRO stage 2, 2 processes" in stdout and "Lookahead synced 2 times (k=5, alpha=0.5)" in stdout
    vocab = int(stdout.split("vocabulary ")[1].split()[0].replace(",", ""))
    assert 13_000 < vocab < 14_000  # WikiText-2's word vocabulary (validation split, plus <eos>)
    _check_history(ds_run["history"], vocab=vocab)

    ckpts = ds_run["out"] / "checkpoints"
    assert (ckpts / "latest").read_text() == "iter10"
    # φ is sharded: each rank's optimizer file holds φ for its own partition only, about half the model.
    module = torch.load(ckpts / "iter10" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    model_numel = sum(
        {v.untyped_storage().data_ptr(): v.numel() for v in module.values()}.values()
    )  # tied once
    slow_per_rank = []
    for rank in (0, 1):
        state = torch.load(
            ckpts / "iter10" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", weights_only=False
        )
        inner = state["optimizer_state_dict"]["base_optimizer_state"]["state"]
        slow_per_rank.append(sum(s[SLOW_KEY].numel() for s in inner.values()))
    assert all(0.4 * model_numel < n < 0.6 * model_numel for n in slow_per_rank), (slow_per_rank, model_numel)


@pytest.mark.dist
@pytest.mark.slow
def test_deepspeed_example_resumes_mid_cycle_exactly(ds_run: dict[str, Any]) -> None:
    # Resume the same run from its step-4 checkpoint (mid-cycle for k=5), in fresh processes, into a copy
    # of the output folder; the evaluations at steps 6 and 10 must be bit-identical to the straight run's.
    import shutil

    out = ds_run["tmp"] / "resumed"
    shutil.copytree(ds_run["out"], out)
    shutil.rmtree(out / "checkpoints" / "iter8")
    shutil.rmtree(out / "checkpoints" / "iter10")
    (out / "checkpoints" / "latest").write_text("iter4")
    args = [a for a in ds_run["args"] if not a.startswith("--out_dir")] + [
        f"--out_dir={out}",
        "--resume=True",
    ]
    port = free_port()
    cmd = torchrun_cmd(
        str(REPO / "examples" / "deepspeed" / "train.py"), args, nproc=2, port=port, module=False
    )
    proc = run(cmd, timeout=300, env=child_env(port=port), cwd=ds_run["tmp"])
    assert proc.returncode == 0, proc.stdout[-6000:]
    assert "resumed from" in proc.stdout and "at iter 4" in proc.stdout
    resumed = json.loads((out / "history.json").read_text())
    assert resumed == ds_run["history"][1:]
