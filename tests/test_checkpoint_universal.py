"""Lookahead's slow weights through DeepSpeed universal checkpoints and consolidation.

One 2-process run (ZeRO-1, ZeRO-2 with pullback, ZeRO-3 with pullback and sub-groups) saves mid-cycle and
converts with ``lookahead_dist.deepspeed.checkpoint.to_universal``; 1- and 4-process runs resume from the universal
checkpoint. Every weight is compared with ``tests/reference.py`` (single process, same global batches)
inside the launched script; the results come back as JSON. See tests/dist/ckpt_universal.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.dist import ckpt_universal as script
from tests.helpers import run_module, run_torchrun
from tests.tolerances import WEIGHT_TOL

REPO = Path(__file__).resolve().parents[1]
SCRIPT = "tests.dist.ckpt_universal"
TOL = WEIGHT_TOL  # consolidated/converted weights vs. the reference loop: fp32 rounding (tests/tolerances.py)
RESUME_WORLDS = (1, 4)
SAVE_TAG = f"step{script.SAVE_AT}"


def _launch(nproc: int, phase: str, workdir: Path) -> dict:
    out = workdir / f"{phase}_w{nproc}.json"
    args = ["--phase", phase, "--workdir", str(workdir), "--out", str(out)]
    proc = run_torchrun(SCRIPT, args, nproc=nproc, timeout=400)
    assert proc.returncode == 0 and out.is_file(), f"{phase} on {nproc} ranks failed:\n{proc.stdout[-6000:]}"
    results = json.loads(out.read_text())
    for name, result in results.items():
        assert "error" not in result, f"{phase} on {nproc} ranks, case {name}:\n{result['error']}"
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    workdir = tmp_path_factory.mktemp("ckpt_universal")
    results = {"workdir": workdir, "save": _launch(2, "save", workdir)}
    for world in RESUME_WORLDS:
        results[world] = _launch(world, "resume", workdir)
    return results


CASES = list(script.CASES)


@pytest.mark.dist
@pytest.mark.parametrize("case", CASES)
def test_consolidated_weights_from_2_ranks_match_reference(runs: dict, case: str) -> None:
    saved = runs["save"][case]
    assert saved["world"] == 2
    assert saved["slow_vs_ref"] <= TOL  # ours: consolidated φ
    assert saved["fast_vs_ref"] <= TOL  # DeepSpeed's zero_to_fp32: θ is untouched by Lookahead
    assert saved["slow_vs_ref_fast"] > 1e-3  # mid-cycle φ ≠ θ, so the φ check is not a θ check


@pytest.mark.dist
@pytest.mark.parametrize("case", CASES)
def test_universal_checkpoint_carries_slow_state(runs: dict, case: str) -> None:
    saved = runs["save"][case]
    pullback = script.CASES[case]["pullback"] == "pullback"
    want_keys = ["lookahead_slow", "lookahead_slow_exp_avg"] if pullback else ["lookahead_slow"]
    assert saved["meta"]["slow_keys"] == want_keys
    assert saved["meta"]["count"] == script.SAVE_AT % script.K
    assert saved["meta"]["source_world_size"] == 2
    assert {f"{key}.pt" for key in want_keys} <= set(saved["universal_files"])
    assert {"fp32.pt", "exp_avg.pt", "exp_avg_sq.pt"} <= set(saved["universal_files"])


@pytest.mark.dist
@pytest.mark.parametrize("world", RESUME_WORLDS)
@pytest.mark.parametrize("case", CASES)
def test_resume_at_other_world_size_matches_reference(runs: dict, case: str, world: int) -> None:
    resumed = runs[world][case]
    assert resumed["world"] == world
    assert resumed["counts_after_load"] == [script.SAVE_AT % script.K]
    # After TOTAL steps: θ and φ both depend on the restored φ, moments and cycle position.
    assert resumed["fast_vs_ref"] <= TOL
    assert resumed["slow_vs_ref"] <= TOL
    assert resumed["slow_vs_ref_fast"] > 1e-3
    assert resumed["sync_count"] >= 1


def test_cli_entry_point_runs() -> None:
    proc = run_module("lookahead_dist.checkpoint", ["--help"], timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "to-universal" in proc.stdout and "slow-weights" in proc.stdout


@pytest.mark.dist
def test_cli_slow_weights_load_into_plain_module(runs: dict, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from lookahead_dist.checkpoint import main

    ckpt = runs["workdir"] / "z3_pullback_subgroups"
    out = tmp_path / "slow.safetensors"
    assert main(["slow-weights", str(ckpt), str(out), "--tag", SAVE_TAG]) == 0
    model = script.Net()
    model.load_state_dict(load_file(str(out)), strict=True)
    want = script.reference("pullback")[script.SAVE_AT]["slow"]
    for name, p in model.named_parameters():
        assert (p.detach() - want[name]).abs().max().item() <= TOL, name


@pytest.mark.dist
def test_cli_to_universal(runs: dict, tmp_path: Path) -> None:
    from lookahead_dist.checkpoint import main
    from lookahead_dist.deepspeed.checkpoint import UNIVERSAL_META_FILE

    out = tmp_path / "uni"
    assert (
        main(["to-universal", str(runs["workdir"] / "z1"), "--tag", SAVE_TAG, "--output-dir", str(out)]) == 0
    )
    meta = json.loads((out / UNIVERSAL_META_FILE).read_text())
    assert meta["count"] == script.SAVE_AT % script.K
    slow = torch.load(out / "zero" / "head.weight" / "lookahead_slow.pt", weights_only=False)["param"]
    want = script.reference("none")[script.SAVE_AT]["slow"]["head.weight"]
    assert slow.shape == want.shape and (slow - want).abs().max().item() <= TOL


def _copy_tag(runs: dict, case: str, dest: Path) -> Path:
    tag_dir = dest / case / SAVE_TAG
    shutil.copytree(runs["workdir"] / case / SAVE_TAG, tag_dir)
    return tag_dir


def _edit_rank_file(tag_dir: Path, rank: int, edit) -> None:  # type: ignore[no-untyped-def]
    (path,) = tag_dir.glob(f"*zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    sd = torch.load(path, map_location="cpu", weights_only=False)
    for st in sd["optimizer_state_dict"]["base_optimizer_state"]["state"].values():
        edit(st)
    torch.save(sd, path)


@pytest.mark.dist
def test_disagreeing_cycle_counters_are_refused(runs: dict, tmp_path: Path) -> None:
    from lookahead_dist.deepspeed.checkpoint import consolidated_slow_state_dict, to_universal

    tag_dir = _copy_tag(runs, "z1", tmp_path)
    _edit_rank_file(tag_dir, 1, lambda st: st.__setitem__("lookahead_count", 2))
    with pytest.raises(ValueError, match="lookahead_count.*rank 1 group 0: 2"):
        to_universal(tag_dir.parent, tag=SAVE_TAG, output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before DeepSpeed's conversion wrote anything
    # Consolidation does not need the counters.
    assert "head.weight" in consolidated_slow_state_dict(tag_dir)


@pytest.mark.dist
def test_checkpoint_without_slow_weights_is_refused(runs: dict, tmp_path: Path) -> None:
    from lookahead_dist.deepspeed.checkpoint import consolidated_slow_state_dict

    tag_dir = _copy_tag(runs, "z1", tmp_path)
    for rank in (0, 1):
        _edit_rank_file(tag_dir, rank, lambda st: [st.pop(k) for k in ("lookahead_slow", "lookahead_count")])
    with pytest.raises(ValueError, match="holds no slow weights"):
        consolidated_slow_state_dict(tag_dir.parent, tag=SAVE_TAG)


@pytest.mark.dist
def test_plain_ds_to_universal_output_is_refused_at_restore(runs: dict, tmp_path: Path) -> None:
    from lookahead_dist.deepspeed.checkpoint import UNIVERSAL_META_FILE, restore_after_universal_load

    folder = tmp_path / "plain_universal"
    shutil.copytree(runs["workdir"] / "z1" / f"{SAVE_TAG}_universal", folder)
    (folder / UNIVERSAL_META_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="to_universal"):
        restore_after_universal_load(None, tmp_path, tag="plain_universal")


def test_missing_checkpoint_folder_names_the_fix(tmp_path: Path) -> None:
    from lookahead_dist.deepspeed.checkpoint import consolidated_slow_state_dict, to_universal

    with pytest.raises(FileNotFoundError, match="no \\*_optim_states.pt files and no 'latest'"):
        consolidated_slow_state_dict(tmp_path)
    with pytest.raises(FileNotFoundError, match="tag 'nope' not found"):
        to_universal(tmp_path, tag="nope")
