"""Lookahead under FSDP on 2 CPU processes (gloo), against the single-process reference (tests/reference.py).

* FSDP2 ``fully_shard`` (tests/dist/fsdp2_cases.py): trajectory, φ's placement and size, collectives inside
  ``opt.step()`` and over whole steps with and without Lookahead, the local distance and slow-weight swap,
  mid-cycle torch.distributed.checkpoint resumes in both optimizer-state layouts, bf16 mixed precision.
* Lightning (tests/dist/fsdp_pl.py): LookaheadCallback under ModelParallelStrategy (FSDP2) and
  CPUFSDPStrategy (FSDP1), validation on slow weights, resumes from sharded and full checkpoints.
* Consolidated slow weights from DCP folders (torch's recipe and Lightning's), through the function and the
  ``python -m lookahead_dist.checkpoint slow-weights-dcp`` command.
* The examples' FSDP configs on 2 processes.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from lookahead_dist.core.adaptive import Z_SPAN, Z_START
from lookahead_dist.core.settings import LookaheadSettings
from tests.dist.fsdp_common import K, make_net, reference_run
from tests.helpers import child_env, free_port, run_torchrun, torchrun_cmd
from tests.reference import max_abs_diff
from tests.tolerances import WEIGHT_TOL, clipped_ramp_tol, perturbed_dot_tol

ROOT = Path(__file__).resolve().parents[1]
TOL = WEIGHT_TOL  # reduce-scattered gradients vs. one full-batch gradient: fp32 rounding (tests/tolerances.py)
STEPS, PER_RANK, WORLD = 8, 4, 2
P = sum(p.numel() for p in make_net().parameters())  # 265 parameters


def _launch(module: str, tmp: Path, timeout: float = 300) -> dict[str, Any]:
    out = tmp / "results.json"
    proc = run_torchrun(f"tests.dist.{module}", ["--out", str(out), "--tmp", str(tmp)], nproc=WORLD, timeout=timeout)
    assert out.exists(), f"{module} wrote no results:\n{proc.stdout[-6000:]}"
    results = json.loads(out.read_text())
    for case, result in results.items():
        assert "error" not in result, f"{case}: {result['error']}\n{result.get('trace', '')}"
    return results


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    tmp = tmp_path_factory.mktemp("fsdp2")
    return _launch("fsdp2_cases", tmp), tmp


@pytest.fixture(scope="module")
def lightning(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    pytest.importorskip("lightning")
    tmp = tmp_path_factory.mktemp("fsdp_pl")
    return _launch("fsdp_pl", tmp), tmp


# ------------------------------------------------------------------------------------------------ FSDP2
@pytest.mark.dist
@pytest.mark.parametrize("opt", ["adamw", "sgd"])
def test_fsdp2_trajectory_matches_reference(fsdp2: tuple, opt: str) -> None:
    res = fsdp2[0][opt]
    assert res["theta"] < TOL and res["phi"] < TOL, res
    assert res["no_lookahead_gap"] > 1e3 * TOL  # the same run without Lookahead is far off
    assert res["sync_count"] == STEPS // K
    assert res["counts"] == [STEPS % K]


@pytest.mark.dist
@pytest.mark.parametrize("case", ["adamw", "sgd", "mp"])
def test_fsdp2_slow_weights_have_the_parameter_placement(fsdp2: tuple, case: str) -> None:
    ranks = fsdp2[0][case]["placements"]
    assert all(r["same_placement"] and r["P"] == P for r in ranks)
    # Linear(6, 33): rows split 17/16; Linear(33, 1): one row, so rank 1's shard is empty.
    shapes = [{name: shape for name, _, shape in r["shards"]} for r in ranks]
    assert shapes[0]["0.weight"] == [17, 6] and shapes[1]["0.weight"] == [16, 6]
    assert shapes[0]["2.weight"] == [1, 33] and shapes[1]["2.weight"] == [0, 33]
    assert all(placement == "(Shard(dim=0),)" for r in ranks for _, placement, _ in r["shards"])
    phi_bytes = [r["phi_bytes"] for r in ranks]
    assert sum(phi_bytes) == 4 * P  # fp32, each element on exactly one rank
    assert max(phi_bytes) <= 4 * P / WORLD * 1.2  # ≈ 4·P/N per rank (612 and 448 bytes vs 530)


@pytest.mark.dist
@pytest.mark.parametrize("opt", ["adamw", "sgd"])
def test_fsdp2_no_extra_collectives(fsdp2: tuple, opt: str) -> None:
    res = fsdp2[0][opt]
    # Inside opt.step(): none, with Lookahead (two of the eight steps sync) and without.
    assert res["in_step"] == res["base_in_step"] == [[[]] * STEPS] * WORLD
    # Whole steps: FSDP's own all-gathers and reduce-scatters, the same list with and without Lookahead.
    assert res["whole"] == res["base_whole"]
    per_step = res["whole"][0][0]
    assert len(per_step) == 6 and {name for name, _ in per_step} == {"_allgather_base_", "_reduce_scatter_base_"}
    assert res["gather_comms"]  # the counter does see DTensor's (functional) collectives


@pytest.mark.dist
@pytest.mark.parametrize("opt", ["adamw", "sgd"])
def test_fsdp2_distance_and_slow_weight_swap_are_local(fsdp2: tuple, opt: str) -> None:
    res = fsdp2[0][opt]
    assert res["distance_partial_is_dtensor"] is False
    assert res["distance_comms"] == [[], []]
    assert res["distance"] < TOL and res["ref_distance"] > 0.1
    assert res["swap_comms"] == [[], []] and res["swap_still_dtensor"]
    assert res["swap_inside_vs_phi"] == 0.0 and res["swap_restore"] == 0.0


@pytest.mark.dist
@pytest.mark.parametrize("layout", ["nested", "flat"])
def test_fsdp2_dcp_resume_mid_cycle_is_bit_identical(fsdp2: tuple, layout: str) -> None:
    res = fsdp2[0]["dcp"][layout]
    assert res["counts_saved"] == [1, 1, 1, 1]  # saved one step into a cycle
    assert res["counts_loaded"] == res["counts_saved"]
    assert res["probe_syncs"] == 0  # DCP's synthetic step on the fresh optimizer did not count
    assert res["phi_dtensor_after_load"]
    assert res["loaded_vs_saved"] == 0.0
    assert res["resume"] == 0.0
    assert res["syncs_after_resume"] == 1


@pytest.mark.dist
def test_fsdp2_bf16_params_keep_fp32_sharded_slow_weights(fsdp2: tuple) -> None:
    res = fsdp2[0]["mp"]
    assert res["params_fp32"]  # MixedPrecisionPolicy casts for compute only; the sharded params stay fp32
    assert res["params_vs_phi"] == 0.0  # the last step synced: sharded fp32 params are φ exactly
    assert res["sync_count"] == 2
    assert res["in_step"] == [[[]] * 6] * WORLD
    # bf16 compute: the trajectory is the fp32 reference's up to rounding, small next to how far it moved.
    assert res["phi_vs_ref"] < 0.05 * res["moved"]


@pytest.mark.dist
def test_fsdp2_adaptive_alpha_sums_over_shards(fsdp2: tuple) -> None:
    res = fsdp2[0]["adaptive"]
    # The same α as one process stepping the full tensors, so the shard sums were added up (once).
    assert res["theta"] < TOL and res["phi"] < TOL, res
    ref_sums = res["ref_sums"]
    assert len(ref_sums) == STEPS // K and any(abs(x) > 1e-6 for row in ref_sums for x in row)
    for rank_sums in res["sums"]:  # the global sums on every rank, not this rank's shard's
        assert len(rank_sums) == len(ref_sums)
        for got, want in zip(rank_sums, ref_sums):
            assert got == pytest.approx(want, rel=1e-5, abs=1e-9)
    # α is a clipped ramp of z, a ratio of moments of the h's, which are fp64 dot products of differences of
    # weights that agree to TOL: its tolerance follows from that (tests/tolerances.py), not a guess.
    rel_h = 0.0
    for (h, _, _), (abs_sum, abs_products, terms) in zip(ref_sums, res["ref_scales"]):
        if h != 0.0:
            rel_h = max(rel_h, perturbed_dot_tol(TOL, abs_sum, max(terms, 1), abs_products) / abs(h))
    low, high = LookaheadSettings().alpha_bounds
    assert res["alpha"] <= clipped_ramp_tol(2 * rel_h, low, high, Z_START, Z_SPAN), res
    for rank in res["in_step"]:
        # One small all_reduce at each sync (steps 3 and 6), nothing on the other steps.
        assert [i for i, log in enumerate(rank) if log] == [K - 1, 2 * K - 1]
        assert all(len(log) == 1 and log[0][0] == "allreduce_" and log[0][1] <= 16 for log in rank if log)


@pytest.mark.dist
def test_fsdp2_wrap_refuses_partly_sharded_models(fsdp2: tuple) -> None:
    message = fsdp2[0]["refuse"]["error_message"]
    assert message and "fully_shard to the root module" in message


@pytest.mark.dist
def test_consolidated_slow_weights_from_torch_dcp(fsdp2: tuple, tmp_path: Path) -> None:
    from lookahead_dist.fsdp.checkpoint import consolidated_slow_state_dict

    folder = fsdp2[1] / f"dcp_nested_step{STEPS}"
    ref_theta, ref_phi = reference_run(STEPS, PER_RANK * WORLD, "adamw")
    names = list(make_net().state_dict())
    state = consolidated_slow_state_dict(folder)
    assert list(state) == names
    assert max_abs_diff([state[n] for n in names], ref_phi) < TOL
    assert max_abs_diff(ref_theta, ref_phi) > 1e3 * TOL  # φ ≠ θ at step 8, so the check can tell them apart
    # The command writes the same tensors.
    out = tmp_path / "slow.safetensors"
    cmd = [sys.executable, "-m", "lookahead_dist.checkpoint", "slow-weights-dcp", str(folder), str(out)]
    proc = subprocess.run(cmd, check=False, env=child_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    from safetensors.torch import load_file

    written = load_file(str(out))
    assert all(torch.equal(written[n], state[n]) for n in names)
    net = make_net()
    net.load_state_dict(written)  # strict: every key of the plain model, nothing else


def test_consolidation_errors_name_the_problem(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    from lookahead_dist.fsdp.checkpoint import consolidated_slow_state_dict

    with pytest.raises(FileNotFoundError, match="not a torch.distributed.checkpoint folder"):
        consolidated_slow_state_dict(tmp_path)
    plain = tmp_path / "plain"
    dcp.save({"model": make_net().state_dict()}, checkpoint_id=str(plain), no_dist=True)
    with pytest.raises(ValueError, match="holds no slow weights"):
        consolidated_slow_state_dict(plain)


# ------------------------------------------------------------------------------------------------ Lightning
@pytest.mark.dist
@pytest.mark.parametrize("case", ["fsdp2", "fsdp1"])
def test_lightning_callback_under_fsdp(lightning: tuple, case: str) -> None:
    res = lightning[0][case]
    assert res["strategy"] == {"fsdp2": "ModelParallelStrategy", "fsdp1": "CPUFSDPStrategy"}[case]
    assert res["theta"] < TOL and res["phi"] < TOL, res
    assert res["syncs_done"] == STEPS // K
    assert res["val_count"] == 2 and res["val"] < 1e-5  # validation on φ at steps 4 and 8
    assert res["val_fast_gap"] > 1e3 * res["val"] + 1e-4  # ... which validation on θ would not match
    assert res["distance"] < TOL
    assert res["test"] is not None and res["test"] < 1e-5 and res["theta_after_test"] == 0.0  # test after fit
    assert res["step_comms"] == [[[]] * STEPS] * WORLD  # no collective in any inner step or sync
    phi_bytes = res["phi_bytes_per_rank"]
    assert sum(phi_bytes) == 4 * res["P"] and max(phi_bytes) < 4 * res["P"]  # sharded, every element once


@pytest.mark.dist
@pytest.mark.parametrize("case", ["fsdp2", "fsdp1"])
@pytest.mark.parametrize("kind", ["sharded", "full"])
def test_lightning_fsdp_resume_mid_cycle_is_bit_identical(lightning: tuple, case: str, kind: str) -> None:
    res = lightning[0][case]
    assert res[f"resume_{kind}_is_dir"] is (kind == "sharded")
    assert res[f"resume_{kind}"] == 0.0
    assert res[f"resume_{kind}_syncs"] == STEPS // K


@pytest.mark.dist
@pytest.mark.parametrize("case", ["fsdp2", "fsdp1"])
def test_consolidated_slow_weights_from_lightning_checkpoint(lightning: tuple, case: str) -> None:
    from lookahead_dist.fsdp.checkpoint import consolidated_slow_state_dict

    state = consolidated_slow_state_dict(lightning[1] / f"{case}_final.ckpt")
    _, ref_phi = reference_run(STEPS, PER_RANK * WORLD, "adamw")
    names = [f"net.{n}" for n in make_net().state_dict()]
    assert sorted(state) == sorted(names)
    assert max_abs_diff([state[n] for n in names], ref_phi) < TOL


def test_callback_refuses_fsdp1_flat_parameters() -> None:
    pytest.importorskip("lightning")
    from lightning.pytorch.strategies import FSDPStrategy

    from lookahead_dist import LookaheadCallback

    trainer = SimpleNamespace(strategy=FSDPStrategy(use_orig_params=False))
    with pytest.raises(ValueError, match="use_orig_params=True"):
        LookaheadCallback().setup(trainer, None, "fit")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ examples
@pytest.mark.dist
@pytest.mark.slow
def test_examples_run_with_the_fsdp_configs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """configs/{lm,nmt}_fsdp.yaml + the Lookahead config on 2 processes; then the slow weights of the LM's
    sharded checkpoint load into the plain example model."""
    from examples.common.runs import read_metrics, run_env

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")  # ex_cases (imported for its small example sizes) insists on offline runs
    from tests.dist.ex_cases import LM_SMALL, NMT_SMALL

    # No test split after fit for NMT: the example's test report runs trainer.log_dir (a broadcast) on rank 0
    # only, which the other rank never joins, under any multi-process strategy. Fit (training, validation
    # on φ, sharded checkpoints) is what these configs set up; CPUFSDPStrategy's test-after-fit is in fsdp_pl.
    small = {"lm": LM_SMALL, "nmt": [*NMT_SMALL, "--trainer.limit_test_batches=0"]}
    steps = 10
    for task in ("lm", "nmt"):
        root = tmp_path / task
        cmd = torchrun_cmd(f"examples.{task}.cli", [
            "fit", "--config", f"configs/{task}_fsdp.yaml",
            "--config", f"configs/{task}_lookahead.yaml", *small[task], f"--trainer.default_root_dir={root}",
            f"--trainer.max_steps={steps}", f"--trainer.val_check_interval={steps}",
            "--trainer.enable_progress_bar=false", "--trainer.log_every_n_steps=5",
        ], nproc=2, port=free_port())  # fmt: skip
        proc = subprocess.run(cmd, check=False, env=run_env(), cwd=ROOT, capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
        metrics = read_metrics(root)
        syncs = [(row["step"], row["lookahead/syncs"]) for row in metrics if "lookahead/syncs" in row]
        assert syncs and all(count == (step + 1) // 5 for step, count in syncs), syncs  # k=5 in the config
        val = [row["val_loss"] for row in metrics if "val_loss" in row]
        assert val and all(math.isfinite(v) for v in val)
        (last,) = root.rglob("last.ckpt")
        assert (last / ".metadata").is_file()  # a sharded DCP folder
        (config,) = root.rglob("config.yaml")
        assert "CPUFSDPStrategy" in config.read_text()
    from examples.lm.model import CausalLMModule
    from lookahead_dist.fsdp.checkpoint import consolidated_slow_state_dict

    (last,) = (tmp_path / "lm").rglob("last.ckpt")
    state = consolidated_slow_state_dict(last)
    module = CausalLMModule(vocab_size=1024, seq_len=64)
    module.load_state_dict(state)  # strict: the slow weights cover the whole module
