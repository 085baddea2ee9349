"""Lookahead in 🤗 Accelerate loops (lookahead_dist.accelerate), against the single-process reference.

One torchrun launch of tests/dist/accelerate_cases.py (2 CPU processes, gloo): DDP (``Accelerator(cpu=True)``),
FSDP2 (``FullyShardedDataParallelPlugin(fsdp_version=2)``; accelerate drops it on CPU, so the case goes through
``use_fsdp_on_cpu`` and checks that the parameters and φ really are DTensor shards) and the DeepSpeed plugin
with ZeRO-1/2/3 (ZeRO-2 reads k and α from a "lookahead" section in the plugin's JSON file). The checks mirror
tests/test_fabric.py; the refusals that need no processes run here.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

pytest.importorskip("accelerate")

from tests.dist.fsdp_common import ALPHA, K, make_net, reference_run
from tests.helpers import child_env, run, run_torchrun

WORLD = 2
P = sum(p.numel() for p in make_net().parameters())  # 265
CASES = ["ddp", "fsdp2", "zero1", "zero2", "zero3"]
# Same derivation as tests/test_fabric.py: half batches per rank averaged by the engine vs one full batch, fp32
# rounding on weights below 0.5 over 8 Adam steps (measured: 6e-8; a run without Lookahead is 0.13 away).
TOL = 16 * torch.finfo(torch.float32).eps * 0.5


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    pytest.importorskip("deepspeed")
    tmp = tmp_path_factory.mktemp("accelerate")
    out = tmp / "results.json"
    proc = run_torchrun("tests.dist.accelerate_cases", ["--out", str(out), "--tmp", str(tmp)], nproc=WORLD, timeout=400)
    assert out.exists(), f"accelerate_cases wrote no results:\n{proc.stdout[-6000:]}"
    results = json.loads(out.read_text())
    for case, result in results.items():
        assert "error" not in result, f"{case}: {result['error']}\n{result.get('trace', '')}"
    return results


@pytest.fixture(scope="module")
def reference() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    from tests.dist.fabric_cases import PER_RANK, STEPS

    return reference_run(STEPS, PER_RANK * WORLD, "adamw")


def _diff(got: list[list[float]], want: list[torch.Tensor]) -> float:
    return max(float((torch.tensor(g) - w.flatten()).abs().max()) for g, w in zip(got, want))


@pytest.mark.dist
@pytest.mark.parametrize("case", CASES)
def test_trajectory_matches_reference(runs: dict, reference: tuple, case: str) -> None:
    res, (ref_theta, ref_phi) = runs[case], reference
    assert res["distributed_type"] == {"ddp": "MULTI_CPU", "fsdp2": "FSDP"}.get(case, "DEEPSPEED")
    assert _diff(res["theta"], ref_theta) < TOL and _diff(res["phi"], ref_phi) < TOL
    assert _diff(res["base_theta"], ref_theta) > 1e4 * TOL  # without Lookahead: far off, so the check can fail
    assert res["sync_count"] == 8 // K  # zero2: k from the JSON section, no keyword given


@pytest.mark.dist
@pytest.mark.parametrize("case", CASES)
def test_no_extra_collectives(runs: dict, case: str) -> None:
    res = runs[case]
    assert res["comms"] == res["base_comms"]  # per rank, per whole step, with Lookahead (2 syncs) and without
    assert all(len(step) > 0 for rank in res["comms"] for step in rank)


@pytest.mark.dist
@pytest.mark.parametrize("case", CASES)
def test_slow_weights_for_evaluation(runs: dict, reference: tuple, case: str) -> None:
    res = runs[case]
    assert res["restored"] and res["theta_after_swap"] == res["theta"]
    assert _diff(res["phi"], reference[0]) > 1e4 * TOL  # φ ≠ θ at step 8: the swap did change the weights


@pytest.mark.dist
@pytest.mark.parametrize("case", CASES)
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
@pytest.mark.parametrize("case", CASES)
def test_save_state_load_state_resume_mid_cycle_is_bit_identical(runs: dict, case: str) -> None:
    res = runs[case]
    assert res["counts_saved"] == [1] and res["counts_loaded"] == [1]
    assert res["resume_equal"] and res["resume_diff"] == 0.0


@pytest.mark.dist
@pytest.mark.parametrize("case", CASES)
def test_slow_weights_are_sharded_like_the_engine(runs: dict, case: str) -> None:
    res = runs[case]
    numel = [rank["numel"] for rank in res["phi_layout"]]
    if case == "ddp":
        assert numel == [P, P]
    else:
        assert max(numel) < P <= sum(numel) and (case != "fsdp2" or sum(numel) == P)
    assert all(rank["dtensor"] for rank in res["phi_layout"]) is (case == "fsdp2")
    assert res["dtensor_params"] is (case == "fsdp2")  # FSDP2 really sharded the model


@pytest.mark.dist
def test_silently_dropped_plugins_and_ready_lookahead_under_deepspeed_are_refused(runs: dict) -> None:
    res = runs["refuse"]
    assert res["dropped_fsdp_type"] == "MULTI_CPU"  # accelerate on its own: DDP, no word
    assert "use_fsdp_on_cpu" in res["dropped_fsdp"] and "nothing would be sharded" in res["dropped_fsdp"]
    assert "pass the inner optimizer and the options" in res["ready_lookahead_under_deepspeed"]


# ------------------------------------------------------------------ refusals, no processes
def _accelerator(kind: str, fsdp_version: int = 2, config: dict | None = None) -> Any:
    state = SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=fsdp_version),
                            deepspeed_plugin=SimpleNamespace(deepspeed_config=config or {}))  # fmt: skip
    return SimpleNamespace(distributed_type=SimpleNamespace(name=kind), state=state)


def test_refusals_name_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    import lookahead_dist.accelerate as la_acc
    from lookahead_dist import LookaheadConfigError

    net = make_net()
    opt = torch.optim.AdamW(net.parameters())
    with pytest.raises(ValueError, match="fsdp_version=2"):
        la_acc.prepare(_accelerator("FSDP", fsdp_version=1), net, opt)
    with pytest.raises(ValueError, match="XLA is not supported; supported are one process, DDP"):
        la_acc.prepare(_accelerator("XLA"), net, opt)
    with pytest.raises(TypeError, match="exactly one torch optimizer"):
        la_acc.prepare(_accelerator("MULTI_CPU"), net)
    config = {"zero_optimization": {"stage": 2}, "lookahead": {"k": K, "alpha": ALPHA}}
    with pytest.raises(LookaheadConfigError, match="configured twice"):
        la_acc.prepare(_accelerator("DEEPSPEED", config=config), net, opt, k=4)
    with pytest.raises(LookaheadConfigError, match="Lookahead"):
        la_acc.prepare(_accelerator("DEEPSPEED", config={"Lookahead": {"k": 3}}), net, opt)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(RuntimeError, match=r"PartialState\(cpu=True\) first"):
        la_acc.prepare(_accelerator("MULTI_CPU"), net, opt)
    with pytest.raises(TypeError, match="holds no Lookahead"), la_acc.use_slow_weights(opt):
        pass


# ------------------------------------------------------------------ the example
@pytest.mark.dist
def test_accelerate_example_runs(tmp_path: Path) -> None:
    """examples/accelerate/train.py on 2 processes (torchrun), FSDP2 on CPU, tiny sizes, then resumed."""
    from tests.helpers import free_port, torchrun_cmd

    args = ["--parallel=fsdp2", "--max_iters=10", "--eval_interval=5", "--eval_iters=2", "--n_layer=1",
            "--n_embd=32", "--block_size=32", "--batch_size=4", "--k=3", f"--out_dir={tmp_path}"]  # fmt: skip
    port = free_port()
    proc = run(torchrun_cmd("examples/accelerate/train.py", args, nproc=2, port=port, module=False), timeout=120,
               env=child_env(port=port))  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-6000:]
    history = json.loads((tmp_path / "history.json").read_text())
    assert [row["iter"] for row in history] == [0, 5, 10]
    assert history[0]["val_loss_slow"] == history[0]["val_loss"]  # no step yet: φ = θ
    assert history[1]["val_loss_slow"] != history[1]["val_loss"]  # mid-cycle: they differ
    assert "Lookahead synced 3 times" in proc.stdout and "parameters are DTensors: True" in proc.stdout
    assert (tmp_path / "state").is_dir()
