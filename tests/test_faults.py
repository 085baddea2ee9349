"""Faults with real processes: SIGKILL of one DeepSpeed ZeRO-2 rank inside a checkpoint write and mid-training.

Three torchrun launches of tests/dist/faults_ds.py (2 CPU ranks, gloo, Lookahead k=5 installed from the config):

A. steps 1..8 with DeepSpeed's own ``engine.save_checkpoint`` at 4 and 8; rank 1 is SIGKILLed half-way through
   writing its ``*_optim_states.pt`` of step 8. DeepSpeed's rank 0 still writes ``latest`` -> ``global_step8``,
   a tag whose rank-1 file (holding that rank's φ) is truncated.
B. "run it again": ``lookahead_dist.deepspeed.load_checkpoint(engine, CKPT, fallback=True)`` refuses step 8, warns
   and resumes from ``global_step4``; trains to 12 saving at 8 with ``lookahead_dist.deepspeed.save_checkpoint``;
   rank 1 is SIGKILLed right after step 10 (mid-training).
C. the resume again: from ``global_step8`` (complete) to 12, where rank 1 is SIGKILLed inside its write of the
   ``lookahead_dist.deepspeed.save_checkpoint`` at 12: ``latest`` must still name ``global_step8``.

Lightning (D, E): Trainer + CPUDeepSpeedStrategy (ZeRO-2) + LookaheadCallback (k=3) under torchrun; rank 1 is SIGKILLed
after step 6 (a checkpoint was saved at step 4); ``fit(ckpt_path=step4.ckpt)`` with a sampler started at batch 4
resumes: steps 5..6 bit-identical to the killed run, all 8 steps equal to the reference.

Checked: the survivors (and torchrun) exit within a bound after each kill (times printed with ``-s``); B's steps
5..8 are bit-identical to A's (A ran them uninterrupted after saving step 4), C's steps 9..10 bit-identical to
B's; every recorded step matches an independent single-process reference (tests/reference.py) to 1e-6.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("deepspeed")

from lookahead_dist.checkpoint import main
from lookahead_dist.deepspeed.checkpoint import (
    IncompleteCheckpointError,
    check_checkpoint,
    resolve_load_tag,
)
from tests.dist.ds_common import ALPHA, K, global_batch, loss_fn, make_model, make_optimizer, param_groups
from tests.helpers import run_torchrun
from tests.reference import ReferenceLookahead

pytestmark = [pytest.mark.dist, pytest.mark.slow]

#: Upper bound on the time from the SIGKILL to the end of every process of the job (measured values are
#: printed; on this 2-core machine they were a few seconds, most of it torchrun's own shutdown).
EXIT_BOUND_S = 30.0


def _launch(out: Path, ckpt: Path, run: str, *args: str) -> dict[str, Any]:
    done = run_torchrun("tests.dist.faults_ds", [str(out), str(ckpt), run, *args], timeout=240)
    end = time.time()
    ranks = []
    for rank in (0, 1):
        lines = [json.loads(line) for line in (out / f"{run}_rank{rank}.jsonl").read_text().splitlines()]
        ranks.append({"head": lines[0], "steps": {r["step"]: r for r in lines[1:]}})
    killed = out / f"{run}_killed"
    errors = {r: json.loads(p.read_text()) for r in (0, 1) if (p := out / f"{run}_rank{r}_error").is_file()}
    return {
        "rc": done.returncode,
        "output": done.stdout,
        "end": end,
        "killed": json.loads(killed.read_text()) if killed.is_file() else None,
        "errors": errors,
        "ranks": ranks,
    }


@pytest.fixture(scope="module")
def faults(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("faults")
    out, ckpt = root / "out", root / "ckpt"
    out.mkdir()
    runs: dict[str, Any] = {"ckpt": ckpt}
    runs["A"] = _launch(out, ckpt, "A", "--steps", "8", "--save-at", "4,8", "--save-with", "ds", "--kill-in-save", "8")
    runs["after_A"] = check_checkpoint(ckpt)
    resume = ["--steps", "12", "--save-at", "8", "--save-with", "safe", "--resume", "fallback"]
    runs["B"] = _launch(out, ckpt, "B", *resume, "--kill-after", "10")
    runs["after_B"] = check_checkpoint(ckpt)
    # C: the same resume; its save at 12 (the safe save) loses rank 1 inside the write.
    runs["C"] = _launch(out, ckpt, "C", "--steps", "12", "--save-at", "12", "--save-with", "safe", "--resume",
                        "fallback", "--kill-in-save", "12")  # fmt: skip
    runs["after_C"] = check_checkpoint(ckpt)
    for name in "ABC":
        run = runs[name]
        run["exit_s"] = run["end"] - run["killed"]["time"]
        survivor = run["errors"].get(0)
        run["survivor_s"] = None if survivor is None else survivor["time"] - run["killed"]["time"]
        print(f"\n[faults] run {name}: rank 1 killed {run['killed']['where']}; rank 0 saw the failure after "
              f"{run['survivor_s']} s; all processes ended {run['exit_s']:.2f} s after the kill")  # fmt: skip
    return runs


def _reference(steps: int) -> dict[int, dict[str, torch.Tensor]]:
    """Single process, full global batches, fp32 AdamW + the plain reference Lookahead loop."""
    model = make_model("mlp")
    opt = make_optimizer("adamw", param_groups(model))
    ref = ReferenceLookahead(opt, K, ALPHA)
    out = {}
    for step in range(1, steps + 1):
        x, y = global_batch("mlp", step)
        loss_fn("mlp", model(x), y).backward()
        ref.step()
        opt.zero_grad()
        out[step] = {n: p.detach().clone().flatten() for n, p in model.named_parameters()}
    return out


def test_kill_inside_checkpoint_write_leaves_latest_on_an_incomplete_tag(faults: dict) -> None:
    a = faults["A"]
    assert a["rc"] != 0 and a["killed"]["where"].startswith("writing zero_pp_rank_1")
    assert a["exit_s"] < EXIT_BOUND_S
    latest, reports = faults["after_A"]
    by_tag = {r.tag: r for r in reports}
    assert latest == "global_step8"  # DeepSpeed's rank 0 did not wait for rank 1
    assert by_tag["global_step4"].complete
    assert not by_tag["global_step8"].complete
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt is truncated" in by_tag["global_step8"].problems[0]


def test_plain_resume_refuses_the_incomplete_tag_on_every_rank(faults: dict) -> None:
    for rank in (0, 1):
        refused = faults["B"]["ranks"][rank]["head"]["loaded"]["refused"]
        assert refused is not None, "engine.load_checkpoint must refuse an incomplete latest"
        assert "'global_step8'" in refused and "zero_pp_rank_1_mp_rank_00_optim_states.pt is truncated" in refused
        assert "The last complete tag is 'global_step4'" in refused and "fallback=True" in refused


def test_safe_save_wrote_latest_after_every_rank(faults: dict, capsys: pytest.CaptureFixture) -> None:
    # B saved step 8 with lookahead_dist.deepspeed.save_checkpoint, then lost rank 1 after step 10.
    latest_b, reports_b = faults["after_B"]
    assert latest_b == "global_step8" and all(r.complete for r in reports_b)
    assert resolve_load_tag(faults["ckpt"]) == "global_step8"
    assert main(["check", str(faults["ckpt"])]) == 0
    assert "resume from: global_step8" in capsys.readouterr().out


def test_rerun_falls_back_to_last_complete_checkpoint_bit_identically(faults: dict) -> None:
    a, b = faults["A"], faults["B"]
    for rank in (0, 1):
        head = b["ranks"][rank]["head"]
        assert "/global_step4/" in head["loaded"]["path"]
        assert head["first"] == 5
        assert any("incomplete" in w and "global_step4" in w for w in head["loaded"]["warnings"]), head
        for step in (5, 6, 7, 8):  # uninterrupted in A after its step-4 save; resumed from that save in B
            assert b["ranks"][rank]["steps"][step] == a["ranks"][rank]["steps"][step], (rank, step)
    assert b["ranks"][0]["steps"][5]["sync_count"] == 1  # the sync at step 5 = global step 5 (k=5)


def test_kill_mid_training_and_resume_from_last_complete_checkpoint(faults: dict) -> None:
    b, c = faults["B"], faults["C"]
    assert b["rc"] != 0 and b["killed"]["where"] == "after step 10"
    assert b["exit_s"] < EXIT_BOUND_S
    for rank in (0, 1):
        head = c["ranks"][rank]["head"]
        assert "/global_step8/" in head["loaded"]["path"] and head["loaded"]["warnings"] == []
        assert head["first"] == 9
        # install() refuses an engine once this is set (tests/test_bad_inputs.py, install-after-load-checkpoint).
        assert head["loaded"]["loaded_dp_world_size"] == [None, 2]
        for step in (9, 10):
            # sync_count counts this process's syncs (not persisted): B synced at 5, C started after it.
            b_rec, c_rec = (dict(r["ranks"][rank]["steps"][step]) for r in (b, c))
            assert c_rec.pop("sync_count") == b_rec.pop("sync_count") - 1
            assert c_rec == b_rec, (rank, step)
    assert sorted(c["ranks"][0]["steps"]) == [9, 10, 11, 12]


def test_kill_inside_the_safe_save_keeps_latest_on_the_complete_tag(faults: dict) -> None:
    c = faults["C"]
    assert c["rc"] != 0 and c["killed"]["where"].startswith("writing zero_pp_rank_1")
    assert c["exit_s"] < EXIT_BOUND_S
    latest, reports = faults["after_C"]
    by_tag = {r.tag: r for r in reports}
    assert not by_tag["global_step12"].complete
    assert latest == "global_step8" and by_tag["global_step8"].complete  # a plain re-run resumes correctly


def test_every_recorded_step_matches_the_reference(faults: dict) -> None:
    ref = _reference(12)
    seen = 0
    for name in "ABC":
        for step, rec in faults[name]["ranks"][0]["steps"].items():
            for pname, values in rec["masters"].items():
                diff = (torch.tensor(values) - ref[step][pname]).abs().max().item()
                assert diff <= 1e-6, (name, step, pname, diff)
            seen += 1
    assert seen == 8 + 6 + 4


def test_resolve_load_tag_refuses_incomplete_tag(tmp_path: Path) -> None:
    """Without a launch: the refusal message of an incomplete `latest` names the file and offers the fallback."""
    from tests.test_checkpoint_tools import fake_checkpoint

    root = fake_checkpoint(tmp_path, tags={"global_step4": "ok", "global_step8": "truncated_rank1"}, latest="global_step8")
    with pytest.raises(IncompleteCheckpointError, match=r"zero_pp_rank_1.*truncated.*'global_step4'.*fallback=True"):
        resolve_load_tag(root)
    with pytest.warns(RuntimeWarning, match="loading the last complete tag 'global_step4'"):
        assert resolve_load_tag(root, fallback=True) == "global_step4"


# ====================================================================== Lightning
@pytest.fixture(scope="module")
def pl_faults(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Lightning D: 8 steps, save at 4, rank 1 SIGKILLed after step 6; E: the same with fit(ckpt_path=step4)."""
    pytest.importorskip("lightning")
    root = tmp_path_factory.mktemp("pl_faults")
    out, ckpt = root / "out", root / "ckpt"
    out.mkdir()
    runs: dict[str, Any] = {}
    for name, args in (("D", ["--save-at", "4", "--kill-after", "6"]), ("E", ["--resume-from", "4"])):
        done = run_torchrun("tests.dist.faults_pl", [str(out), str(ckpt), name, *args], timeout=240)
        end = time.time()
        ranks = [
            {r["step"]: r for r in map(json.loads, (out / f"{name}_rank{rank}.jsonl").read_text().splitlines())}
            for rank in (0, 1)
        ]
        killed, survivor = out / f"{name}_killed", out / f"{name}_rank0_error"
        runs[name] = {"rc": done.returncode, "output": done.stdout, "end": end, "ranks": ranks,
                      "killed": json.loads(killed.read_text()) if killed.is_file() else None,
                      "survivor": json.loads(survivor.read_text()) if survivor.is_file() else None}  # fmt: skip
    d = runs["D"]
    assert d["killed"] is not None, d["output"][-3000:]
    d["exit_s"] = d["end"] - d["killed"]["time"]
    seen = None if d["survivor"] is None else round(d["survivor"]["time"] - d["killed"]["time"], 2)
    print(f"\n[faults] Lightning run D: rank 1 killed {d['killed']['where']}; rank 0 saw the failure after {seen} s; "
          f"all processes ended {d['exit_s']:.2f} s after the kill")  # fmt: skip
    return runs


def test_lightning_kill_mid_training_and_resume(pl_faults: dict) -> None:
    from tests.dist.pl_common import reference_run

    d, e = pl_faults["D"], pl_faults["E"]
    assert d["rc"] != 0 and d["killed"] is not None and d["exit_s"] < EXIT_BOUND_S
    assert e["rc"] == 0, e["output"][-3000:]
    for rank in (0, 1):
        assert sorted(d["ranks"][rank]) == [1, 2, 3, 4, 5, 6]
        assert sorted(e["ranks"][rank]) == [5, 6, 7, 8]
        for step in (5, 6):  # resumed from the step-4 checkpoint: bit-identical to the run that was killed
            assert e["ranks"][rank][step] == d["ranks"][rank][step], (rank, step)
    names = list(d["ranks"][0][1]["theta"])
    for step in range(1, 9):
        net, _, _ = reference_run(step, 8, 3, 0.5)  # 2 ranks x 4 rows, k=3, alpha=0.5, Adam
        record = (d if step <= 6 else e)["ranks"][0][step]
        for name, ref in zip(names, net.parameters()):
            diff = (torch.tensor(record["theta"][name]) - ref.detach().flatten()).abs().max().item()
            assert diff <= 1e-6, (step, name, diff)
