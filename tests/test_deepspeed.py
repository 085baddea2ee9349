"""DeepSpeed adapter: config section, refused modes (in-process), and 2-process training on CPU/gloo.

The multi-process part launches tests/dist/ds_cases.py twice with torchrun (all cases batched per launch):
``train`` runs every case with and without Lookahead and saves a mid-cycle checkpoint, ``resume`` loads it
in fresh processes. Everything is compared here against tests/reference.py on the same global batches.

bf16 cases use the "probe" model of tests/dist/ds_common.py: its gradient is weight-independent and exact in
bf16, so DeepSpeed's fp32 master weights can be compared with an fp32 reference (started from the bf16-rounded
initial weights) at the same 1e-6 tolerance as fp32; a general bf16 model's rounding would depend on how the
batch is split across ranks and could only be compared loosely.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

pytest.importorskip("deepspeed")

import lookahead_dist.deepspeed as lads
from tests.dist.ds_common import (
    ALPHA,
    CASES,
    SAVE_AT,
    STEPS,
    WORLD,
    K,
    eval_batch,
    global_batch,
    loss_fn,
    lr_lambda,
    make_model,
    make_optimizer,
    param_groups,
)
from tests.helpers import run_torchrun
from tests.reference import ReferenceLookahead
from tests.tolerances import WEIGHT_TOL

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.json"))
TOL = WEIGHT_TOL  # ZeRO partitions vs. the reference loop: fp32 rounding (tests/tolerances.py)


# ============================================================== config section (no processes)
def test_split_config_strips_section_and_fills_defaults(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "lookahead": {"k": 3, "alpha": "adaptive"}}))
    ds_config, kwargs = lads.split_config(path)
    assert ds_config == {"zero_optimization": {"stage": 2}}
    assert kwargs == {"k": 3, "alpha": "adaptive", "pullback": "none", "alpha_bounds": (0.5, 1.0),
                      "alpha_fallback": None, "pullback_keys": ("momentum_buffer", "exp_avg"),
                      "nonfinite": "skip"}
    source = {"train_batch_size": 4}
    assert lads.split_config(source) == ({"train_batch_size": 4}, None)
    assert source == {"train_batch_size": 4}


@pytest.mark.parametrize(
    "section, path",
    [
        ({"k": 0}, "lookahead.k"),
        ({"k": 2.0}, "lookahead.k"),
        ({"k": True}, "lookahead.k"),
        ({"alpha": 1.5}, "lookahead.alpha"),
        ({"alpha": "fast"}, "lookahead.alpha"),
        ({"alpha": 0}, "lookahead.alpha"),
        ({"pullback": "momentum"}, "lookahead.pullback"),
        ({"alpha_bounds": [0.9, 0.5]}, "lookahead.alpha_bounds"),
        ({"alpha_bounds": [0.5]}, "lookahead.alpha_bounds"),
        ({"alpha_fallback": 2}, "lookahead.alpha_fallback"),
        ({"pullback_keys": "exp_avg"}, "lookahead.pullback_keys"),
        ({"kk": 5}, "lookahead.kk"),
        ([5, 0.5], "lookahead"),
    ],
)
def test_bad_section_names_the_key(section: Any, path: str) -> None:
    with pytest.raises(lads.LookaheadConfigError) as info:
        lads.split_config({"lookahead": section})
    message = str(info.value)
    assert path in message
    assert "allowed" in message or "must be" in message


def test_config_files_have_valid_sections() -> None:
    names = {p.name for p in CONFIGS}
    for expected in ["zero1", "zero2", "zero3", "zero2_offload", "zero3_offload", "zero1_bf16", "zero2_bf16",
                     "zero3_bf16"]:
        assert f"{expected}.json" in names
    for path in CONFIGS:
        ds_config, kwargs = lads.split_config(path)
        assert kwargs is not None and kwargs["k"] == K and kwargs["alpha"] == ALPHA, path.name
        assert "lookahead" not in ds_config


def _fake_engine(stage: int = 2, opt: dict | None = None, param: dict | None = None, **attrs: Any) -> Any:
    from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum

    def offload(spec: dict | None) -> Any:
        if spec is None:
            return None
        spec = {"ratio": 1.0, "super_offload": False, **spec}
        return SimpleNamespace(**{**spec, "device": OffloadDeviceEnum(spec["device"])})

    zero = SimpleNamespace(offload_optimizer=offload(opt), offload_param=offload(param))
    return SimpleNamespace(_config=SimpleNamespace(zero_config=zero), zero_optimization_stage=lambda: stage,
                           optimizer=None, **attrs)


@pytest.mark.parametrize(
    "engine, words",
    [
        (lambda: _fake_engine(pipeline_parallelism=True), "pipeline"),
        (lambda: _fake_engine(zenflow=True), "ZenFlow"),
        (lambda: _fake_engine(3, opt={"device": "cpu", "super_offload": True}), "SuperOffload"),
        (lambda: _fake_engine(3, opt={"device": "cpu", "ratio": 0.5}), "ratio=0.5"),
        (lambda: _fake_engine(3, opt={"device": "nvme"}), "NVMe"),
        (lambda: _fake_engine(3, param={"device": "nvme"}), "NVMe"),
        (lambda: _fake_engine(0), "no optimizer"),
    ],
)
def test_unsupported_modes_are_refused(engine: Any, words: str) -> None:
    with pytest.raises(lads.UnsupportedDeepSpeedModeError, match=words):
        lads.install(engine())


def test_unknown_wrapper_is_refused() -> None:
    class Wrapper:  # pretends to be some other DeepSpeed optimizer wrapper
        __module__ = "deepspeed.runtime.something"

    engine = _fake_engine(2)
    engine.optimizer = Wrapper()
    with pytest.raises(lads.UnsupportedDeepSpeedModeError, match="Wrapper"):
        lads.install(engine)
    assert lads.find_lookahead(engine) is None


# ============================================================== 2-process runs
def _launch(out: Path, phase: str, names: list[str]) -> list[dict]:
    proc = run_torchrun("tests.dist.ds_cases", [str(out), phase, ",".join(names)], nproc=WORLD, timeout=600)
    assert proc.returncode == 0, proc.stdout[-8000:]
    return [json.loads((out / f"{phase}_rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("ds")
    train = _launch(out, "train", list(CASES))
    resumable = [n for n in CASES if "error" not in train[0][n] and "error" not in train[1][n]]
    resume = _launch(out, "resume", resumable)
    return {"out": out, "train": train, "resume": resume}


def _case(runs: dict, name: str, phase: str = "train") -> list[dict]:
    per_rank = [r[name] for r in runs[phase]]
    for r in per_rank:
        assert "error" not in r, r.get("error")
    return per_rank


def _reference(name: str, lookahead: bool) -> dict[int, dict[str, Any]]:
    """Single process, full global batches, fp32: params and φ (by parameter name) after every step."""
    case = CASES[name]
    model = make_model(case["model"])
    if "bf16" in case["config"]:
        with torch.no_grad():  # DeepSpeed's masters start from the bf16 model weights
            for p in model.parameters():
                p.copy_(p.bfloat16().float())
    opt = make_optimizer(case["optim"], param_groups(model))
    if name == "stage0_bf16":
        # FP16_UnfusedOptimizer initialises Adam's state with one inner step on zero gradients at
        # construction (DeepSpeed's behaviour, with or without Lookahead; install() comes after it).
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda) if case["sched"] else None
    ref = ReferenceLookahead(opt, K, ALPHA) if lookahead else None
    names = {p: n for n, p in model.named_parameters()}
    out = {}
    for step in range(1, STEPS + 1):
        if step != case["nan"]:  # a NaN step is skipped entirely (no inner step, no cycle count)
            x, y = global_batch(case["model"], step)
            loss_fn(case["model"], model(x), y).backward()
            (ref or opt).step()
            opt.zero_grad()
            if sched:
                sched.step()
        out[step] = {
            "params": {n: p.detach().clone().flatten() for n, p in model.named_parameters()},
            "slow": {names[p]: s.clone().flatten() for p, s in ref.slow.items()} if ref else None,
            "model": model,
        }
    return out


def _max_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    assert a.keys() == b.keys()
    return max((torch.as_tensor(a[n]).float() - torch.as_tensor(b[n]).float()).abs().max().item() for n in a)


def _assemble_phi(per_rank: list[dict], step: int, shapes: dict[str, int]) -> tuple[dict, dict]:
    """Full φ per parameter from every rank's flats + layout, and how often each element was covered."""
    phi = {n: torch.full((numel,), math.nan) for n, numel in shapes.items()}
    cover = {n: torch.zeros(numel, dtype=torch.int64) for n, numel in shapes.items()}
    for rank_rec in per_rank:
        for piece in rank_rec["lookahead"]["steps"][str(step)]["phi"]["pieces"]:
            slow = torch.tensor(piece["slow"])
            for seg in piece["layout"]:
                numel = shapes[seg["name"]]
                length = min(seg["len"], numel - seg["param_start"])  # ZeRO-3 pads the last chunk
                if length <= 0:
                    continue
                dst = slice(seg["param_start"], seg["param_start"] + length)
                phi[seg["name"]][dst] = slow[seg["flat_offset"] : seg["flat_offset"] + length]
                cover[seg["name"]][dst] += 1
    return phi, cover


NAMES = list(CASES)


@pytest.mark.dist
@pytest.mark.parametrize("name", NAMES)
def test_equivalence_with_reference(runs: dict, name: str) -> None:
    ranks = _case(runs, name)
    ref = _reference(name, lookahead=True)
    plain_ref = _reference(name, lookahead=False)
    shapes = {n: v.numel() for n, v in ref[1]["params"].items()}
    for step in range(1, STEPS + 1):
        for r, rank_rec in enumerate(ranks):
            rec = rank_rec["lookahead"]["steps"][str(step)]
            assert _max_diff(rec["masters"], ref[step]["params"]) <= TOL, (name, step, r)
            plain = rank_rec["plain"]["steps"][str(step)]
            assert _max_diff(plain["masters"], plain_ref[step]["params"]) <= TOL, (name, step, r, "plain")
        if name.startswith("stage0"):  # replicated: every rank holds the whole φ
            assert ranks[0]["lookahead"]["steps"][str(step)]["phi"] == ranks[1]["lookahead"]["steps"][str(step)]["phi"]
        phi, cover = _assemble_phi(ranks[:1] if name.startswith("stage0") else ranks, step, shapes)
        assert all(bool((c == 1).all()) for c in cover.values()), (name, step, "φ must cover the model once")
        assert _max_diff(phi, ref[step]["slow"]) <= TOL, (name, step, "φ")
    final_la = ranks[0]["lookahead"]["steps"][str(STEPS)]["masters"]
    final_plain = ranks[0]["plain"]["steps"][str(STEPS)]["masters"]
    assert _max_diff(final_la, final_plain) > 1e-3, "Lookahead must change training"
    la = ranks[0]["lookahead"]
    assert (la["k"], la["alpha"]) == (K, ALPHA)
    assert "k" not in ranks[0]["plain"], "without a lookahead section initialize() must be plain DeepSpeed"
    skipped = 1 if CASES[name]["nan"] else 0
    assert all(r["lookahead"]["skipped_steps"] == skipped for r in ranks)


EXPECTED_HOLDER = {
    "stage0": "Lookahead", "stage0_bf16": "FP16_UnfusedOptimizer", "zero1": "DeepSpeedZeroOptimizer", "zero2": "DeepSpeedZeroOptimizer",
    "zero3": "DeepSpeedZeroOptimizer_Stage3", "zero3_subgroups": "DeepSpeedZeroOptimizer_Stage3",
    "zero3_persist": "DeepSpeedZeroOptimizer_Stage3", "zero1_bf16": "BF16_Optimizer",
    "zero2_bf16": "DeepSpeedZeroOptimizer", "zero3_bf16": "DeepSpeedZeroOptimizer_Stage3",
    "zero2_offload": "DeepSpeedZeroOptimizer", "zero3_offload": "DeepSpeedZeroOptimizer_Stage3",
}


@pytest.mark.dist
@pytest.mark.parametrize("name", NAMES)
def test_phi_is_this_ranks_fp32_partition(runs: dict, name: str) -> None:
    ranks = _case(runs, name)
    assert ranks[0]["lookahead"]["holder"] == EXPECTED_HOLDER[name]
    if CASES[name]["optim"] == "cpuadam":
        assert ranks[0]["lookahead"]["inner"] == "DeepSpeedCPUAdam"
    shapes = {n: v.numel() for n, v in make_model(CASES[name]["model"]).named_parameters()}
    total = sum(shapes.values())
    stage = 0 if name.startswith("stage0") else int(name[4])
    per_rank = []
    for rank_rec in ranks:
        pieces = rank_rec["lookahead"]["steps"][str(STEPS)]["phi"]["pieces"]
        for piece in pieces:
            assert piece["slow_numel"] == piece["numel"] and piece["slow_bytes"] == 4 * piece["numel"]
            assert piece["slow_is_master"] is False
            assert 0 <= piece["count"] < K
        per_rank.append(sum(p["numel"] for p in pieces))
    if stage == 0:
        assert per_rank == [total, total]  # replicated, as DDP
        return
    if stage == 3:  # each parameter is split into WORLD equal (padded) chunks
        expected = sum(math.ceil(n / WORLD) for n in shapes.values())
    else:  # each group's flat buffer, padded, split into WORLD equal parts
        pieces = ranks[0]["lookahead"]["steps"][str(STEPS)]["phi"]["pieces"]
        expected = sum(p["flat_numel"] for p in pieces) // WORLD
        assert expected * WORLD >= total
    assert per_rank == [expected, expected]
    assert expected * WORLD - total < 64 * len(shapes), "padding only"
    assert per_rank[0] < 0.6 * total, "sharded: about P/N per rank"


@pytest.mark.dist
@pytest.mark.parametrize("name", NAMES)
def test_no_extra_collectives(runs: dict, name: str) -> None:
    for rank_rec in _case(runs, name):
        for step in range(1, STEPS + 1):
            with_la = rank_rec["lookahead"]["steps"][str(step)]["comm"]
            without = rank_rec["plain"]["steps"][str(step)]["comm"]
            assert with_la == without, (name, step)
            assert with_la, "the counter must see DeepSpeed's own collectives"


@pytest.mark.dist
@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_resume_is_bit_identical(runs: dict, name: str) -> None:
    train = _case(runs, name)
    resume = _case(runs, name, "resume")
    for r in range(WORLD):
        for step in range(SAVE_AT + 1, STEPS + 1):
            a = train[r]["lookahead"]["steps"][str(step)]
            b = resume[r]["lookahead"]["steps"][str(step)]
            plain_exact = all(
                train[r]["plain"]["steps"][str(s)]["masters"] == resume[r]["plain"]["steps"][str(s)]["masters"]
                for s in range(SAVE_AT + 1, step + 1)
            )
            if plain_exact:
                assert a["masters"] == b["masters"], (name, r, step)
                assert a["phi"] == b["phi"], (name, r, step)
            else:
                # DeepSpeed's own resume (no Lookahead) is not bit-exact here (seen with ZeRO-3 + CPU offload:
                # 1-ulp differences in the fast weights): Lookahead must add nothing beyond that.
                assert _max_diff(a["masters"], b["masters"]) <= TOL, (name, r, step)
                assert [p["count"] for p in a["phi"]["pieces"]] == [p["count"] for p in b["phi"]["pieces"]]
                if step < 2 * K:  # no sync since the checkpoint: φ is exactly the saved one
                    assert a["phi"] == b["phi"], (name, r, step)
            assert a["lr"] == b["lr"]
    ckpt = runs["out"] / f"ckpt_{name}" / "mid"
    if name.startswith("stage0"):
        files = [ckpt / "mp_rank_00_model_states.pt"]
    else:
        files = sorted(ckpt.glob("*_optim_states.pt"))
        assert len(files) == WORLD, files
    for path in files:
        state = torch.load(path, map_location="cpu", weights_only=False)
        found = _find_key(state, "lookahead_slow")
        assert found, f"φ missing from {path.name}"
        if not name.startswith("stage0"):  # per-rank file: this rank's shard only
            total = sum(p.numel() for p in make_model(CASES[name]["model"]).parameters())
            assert sum(t.numel() for t in found) < 0.6 * total


def _find_key(obj: Any, key: str) -> list[torch.Tensor]:
    found = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == key and isinstance(v, torch.Tensor):
                found.append(v)
            else:
                found += _find_key(v, key)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            found += _find_key(v, key)
    return found


@pytest.mark.dist
@pytest.mark.parametrize("name", NAMES)
def test_use_slow_weights(runs: dict, name: str) -> None:
    ranks = _case(runs, name)
    case = CASES[name]
    ref = _reference(name, lookahead=True)[STEPS]
    model = ref["model"]
    bf16 = "bf16" in case["config"]
    with torch.no_grad():
        for n, p in model.named_parameters():
            slow = ref["slow"][n].view_as(p)
            p.copy_(slow.bfloat16().float() if bf16 else slow)
        expected = model(eval_batch(case["model"])).flatten()
    for rank_rec in ranks:
        la = rank_rec["lookahead"]
        assert la["eval_after"] == la["eval_fast"], "θ must be restored bit-exactly"
        assert la["masters_restored"]
        slow_out = torch.tensor(la["eval_slow"])
        assert (slow_out - torch.tensor(la["eval_fast"])).abs().max() > 1e-4
        tol = 0.05 * expected.abs().max().item() if bf16 else 1e-5
        assert (slow_out - expected).abs().max().item() <= tol
        stage = 0 if name.startswith("stage0") else int(name[4])
        ops = {op for op, _ in la["comm_enter"]}
        gathers = {"ds.all_gather_into_tensor", "torch.all_gather_into_tensor", "c10d.all_gather_into_tensor"}
        if name == "zero3_persist":  # persistent params are re-gathered on entry and exit, as after a step
            assert la["comm_enter"] and ops <= gathers
            assert la["comm_exit"] == la["comm_enter"]
        else:
            assert la["comm_exit"] == [], "restoring θ is local"
        if stage == 0:
            assert la["comm_enter"] == []
        elif stage in (1, 2):  # one all-gather per param group, the one DeepSpeed runs after a step
            assert ops <= gathers
            assert len([op for op, _ in la["comm_enter"] if op.startswith("ds.")]) == 2
        elif name != "zero3_persist":
            assert la["comm_enter"] == []
        assert la["comm_eval_slow"] == la["comm_eval_fast"], "no gather beyond the forward's own"


@pytest.mark.dist
def test_every_config_file_trained(runs: dict) -> None:
    used = {CASES[n]["config"] for n in CASES}
    assert {p.name for p in CONFIGS} <= used
    for name in CASES:
        _case(runs, name)
