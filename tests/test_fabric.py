"""Lookahead in Lightning Fabric loops (lookahead_dist.lightning.fabric), against the single-process reference.

One torchrun launch of tests/dist/fabric_cases.py (2 CPU processes, gloo) runs every strategy: DDP,
DeepSpeed ZeRO-1/2/3 (CPUFabricDeepSpeedStrategy; ZeRO-2 takes its settings from a "lookahead" config
section), FSDP1 (CPUFabricFSDPStrategy) and FSDP2 (ModelParallelStrategy). The refusals that need no
processes run here; the example is run by test_fabric_example_runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

pytest.importorskip("lightning")

from tests.dist.fsdp_common import ALPHA, K, make_net, reference_run
from tests.helpers import child_env, run, run_torchrun

WORLD = 2
P = sum(p.numel() for p in make_net().parameters())  # 265
CASES = ["ddp", "zero1", "zero2", "zero3", "fsdp1", "fsdp2"]
CASES_EVAL = [case for case in CASES if case != "fsdp1"]  # FSDP1: the adapter refuses the swap (see below)
# Every rank computes its half of the batch and the engine averages the gradients; the reference takes the
# full batch in one process. Same math, different summation order: fp32 rounding (eps = 1.2e-7) on weights
# below 0.5, accumulated over 8 Adam steps. Measured: 6e-8. A run without Lookahead is 0.13 away.
TOL = 16 * torch.finfo(torch.float32).eps * 0.5


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("fabric")
    out = tmp / "results.json"
    proc = run_torchrun("tests.dist.fabric_cases", ["--out", str(out), "--tmp", str(tmp)], nproc=WORLD, timeout=400)
    assert out.exists(), f"fabric_cases wrote no results:\n{proc.stdout[-6000:]}"
    results = json.loads(out.read_text())
    for case, result in results.items():
        assert "error" not in result, f"{case}: {result['error']}\n{result.get('trace', '')}"
    return results


def _diff(got: list[list[float]], want: list[torch.Tensor]) -> float:
    return max(float((torch.tensor(g) - w.flatten()).abs().max()) for g, w in zip(got, want))


@pytest.fixture(scope="module")
def reference() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    from tests.dist.fabric_cases import PER_RANK, STEPS

    return reference_run(STEPS, PER_RANK * WORLD, "adamw")


@pytest.mark.dist
@pytest.mark.parametrize("case", CASES)
def test_trajectory_matches_reference(runs: dict, reference: tuple, case: str) -> None:
    res, (ref_theta, ref_phi) = runs[case], reference
    assert _diff(res["theta"], ref_theta) < TOL and _diff(res["phi"], ref_phi) < TOL
    assert _diff(res["base_theta"], ref_theta) > 1e4 * TOL  # without Lookahead: far off, so the check can fail
    assert res["sync_count"] == 8 // K  # zero2: k from the config section, no keyword given


@pytest.mark.dist
@pytest.mark.parametrize("case", CASES)
def test_no_extra_collectives(runs: dict, case: str) -> None:
    res = runs[case]
    # Per rank, per step (forward, backward, optimizer.step()): the same (op, element count) list with
    # Lookahead (steps 3 and 6 sync) and without.
    assert res["comms"] == res["base_comms"]
    assert all(len(step) > 0 for rank in res["comms"] for step in rank)  # the counter does see the engine's


@pytest.mark.dist
@pytest.mark.parametrize("case", CASES)
def test_slow_weights_for_evaluation(runs: dict, reference: tuple, case: str) -> None:
    res = runs[case]
    assert res["restored"] and res["theta_after_swap"] == res["theta"]  # θ back bit for bit
    assert _diff(res["phi"], reference[0]) > 1e4 * TOL  # φ ≠ θ at step 8, so the swap really changed the weights


@pytest.mark.dist
@pytest.mark.parametrize("case", CASES_EVAL)
def test_forward_inside_use_slow_weights_computes_with_phi(runs: dict, reference: tuple, case: str) -> None:
    """The model's own forward, after a no-grad forward on θ: θ's loss, then φ's inside the block, then θ's."""
    fast, slow = (_loss(w) for w in reference)
    assert abs(fast - slow) > 1e-3  # the check can tell φ from θ
    got = runs[case]["eval"]
    assert got[0] == pytest.approx(fast, abs=1e-6) and got[2] == got[0]
    assert got[1] == pytest.approx(slow, abs=1e-6)


def _loss(weights: list[torch.Tensor]) -> float:
    from torch import nn

    from tests.dist.fabric_cases import PER_RANK
    from tests.dist.fsdp_common import rank_batch

    net = make_net()
    x, y = rank_batch(999, PER_RANK, 0, 1)
    with torch.no_grad():
        for p, w in zip(net.parameters(), weights):
            p.copy_(w)
        return float(nn.functional.mse_loss(net(x), y))


@pytest.mark.dist
def test_fsdp1_slow_weight_swap_is_refused_with_the_reason(runs: dict) -> None:
    message = runs["fsdp1"]["swap_refused"]
    assert "FSDP1 keeps the root's gathered weights" in message and "FSDP2" in message


@pytest.mark.dist
@pytest.mark.parametrize("case", CASES)
def test_resume_mid_cycle_is_bit_identical(runs: dict, case: str) -> None:
    res = runs[case]
    assert res["step_loaded"] == 4 and res["counts_saved"] == [1]  # saved one step into the second cycle
    assert res["counts_loaded"] == res["counts_saved"]
    assert res["resume_equal"] and res["resume_diff"] == 0.0


@pytest.mark.dist
@pytest.mark.parametrize("case", CASES)
def test_slow_weights_are_sharded_like_the_engine(runs: dict, case: str) -> None:
    layout = runs[case]["phi_layout"]
    numel = [rank["numel"] for rank in layout]
    if case == "ddp":
        assert numel == [P, P]  # replicated, like Adam's moments
    else:  # each rank holds its shard (ZeRO: plus alignment padding); every element somewhere
        assert max(numel) < P <= sum(numel) and (case != "fsdp1" and case != "fsdp2" or sum(numel) == P)
    assert all(rank["dtensor"] for rank in layout) is (case == "fsdp2")


@pytest.mark.dist
def test_fsdp2_parameters_are_sharded(runs: dict) -> None:
    assert runs["fsdp2"]["dtensor_params"] and runs["fsdp2"]["strategy"] == "ModelParallelStrategy"
    assert runs["zero2"]["strategy"] == "CPUFabricDeepSpeedStrategy" and runs["fsdp1"]["strategy"] == "CPUFabricFSDPStrategy"


@pytest.mark.dist
def test_model_parallel_refuses_an_optimizer_on_unsharded_parameters(runs: dict) -> None:
    message = runs["refuse"]["error_message"]
    assert message and "lambda params" in message and "setup_module" in message


# ------------------------------------------------------------------ refusals, no processes
def _fabric(strategy: Any) -> Any:
    return SimpleNamespace(strategy=strategy)


def test_deepspeed_refuses_a_ready_lookahead() -> None:
    from lookahead_dist import Lookahead
    from lookahead_dist.lightning.fabric import CPUFabricDeepSpeedStrategy, setup

    net = make_net()
    strategy = CPUFabricDeepSpeedStrategy(config={"zero_optimization": {"stage": 2}})
    with pytest.raises(TypeError, match=r"pass the inner optimizer and the options"):
        setup(_fabric(strategy), net, Lookahead(torch.optim.AdamW(net.parameters())))


def test_section_and_options_are_two_answers() -> None:
    from lookahead_dist import LookaheadConfigError
    from lookahead_dist.lightning.fabric import CPUFabricDeepSpeedStrategy, setup

    net = make_net()
    config = {"zero_optimization": {"stage": 2}, "lookahead": {"k": K, "alpha": ALPHA}}
    with pytest.raises(LookaheadConfigError, match="configured twice"):
        setup(_fabric(CPUFabricDeepSpeedStrategy(config=config)), net, torch.optim.AdamW(net.parameters()), k=4)
    config["lookahead"] = {"k": 0}
    with pytest.raises(LookaheadConfigError, match="lookahead.k"):
        setup(_fabric(CPUFabricDeepSpeedStrategy(config=config)), net, torch.optim.AdamW(net.parameters()))
    config["look_ahead"] = config.pop("lookahead")
    with pytest.raises(LookaheadConfigError, match="look_ahead"):
        setup(_fabric(CPUFabricDeepSpeedStrategy(config=config)), net, torch.optim.AdamW(net.parameters()))


def test_unsupported_strategy_and_missing_lookahead_are_named() -> None:
    from lightning.fabric.strategies import DataParallelStrategy

    from lookahead_dist.lightning.fabric import setup, use_slow_weights

    net = make_net()
    with pytest.raises(TypeError, match="DataParallelStrategy is not supported; supported are DDP"):
        setup(_fabric(DataParallelStrategy()), net, torch.optim.AdamW(net.parameters()))
    with pytest.raises(TypeError, match="holds no Lookahead"), use_slow_weights(torch.optim.AdamW(net.parameters())):
        pass


# ------------------------------------------------------------------ the example
@pytest.mark.dist
def test_fabric_example_runs(tmp_path: Path) -> None:
    """examples/fabric/train.py on 2 processes (Fabric launches them) with CPU DeepSpeed ZeRO-2, tiny sizes."""
    cmd = [
        sys.executable, "examples/fabric/train.py", "--strategy=deepspeed", "--devices=2", "--max_iters=10",
        "--eval_interval=5", "--eval_iters=2", "--n_layer=1", "--n_embd=32", "--block_size=32", "--batch_size=4",
        "--k=3", f"--out_dir={tmp_path}",
    ]  # fmt: skip
    proc = run(cmd, timeout=120, env=child_env())
    assert proc.returncode == 0, proc.stdout[-6000:]
    history = json.loads((tmp_path / "history.json").read_text())
    assert [row["iter"] for row in history] == [0, 5, 10]
    assert all(row["val_loss_slow"] > 0 for row in history)
    assert "Lookahead synced 3 times" in proc.stdout
    assert (tmp_path / "ckpt").is_dir()  # fabric.save: a DeepSpeed checkpoint folder
