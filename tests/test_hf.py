"""Hugging Face Trainer: ``LookaheadTrainerCallback`` in real runs (CPU, gloo), against the plain reference.

tests/dist/hf_cases.py runs each mode in its own launch, one process (``single``) or two (``ddp``, ``zero2``,
``zero3`` under torchrun); every training there is compared here with tests/dist/hf_common.py's reference, a plain
loop of the same AdamW and tests/reference.py's Algorithm 1 on the same full batches:

* ``full``: θ and φ equal the reference; ``lookahead/syncs`` and ``lookahead/alpha`` are in the Trainer's logs;
* ``resume``: a mid-cycle ``resume_from_checkpoint`` ends bit-identical to ``full`` (θ, φ, this rank's shard of φ,
  the cycle counters);
* ``eval``: evaluation every 2 steps on the slow weights leaves the trajectory bit-identical, ``trainer.evaluate()``
  reports the loss at the reference φ (not at θ) and restores θ bit-exactly;
* ZeRO: the collectives of every training step are the same with and without the callback;
* ``gas``: 2 accumulated micro-batches per optimizer step give the same result (k counts optimizer steps);
* ``again`` (one process, DDP): a second ``trainer.train()`` keeps the Lookahead and its state;
* ``section`` (ZeRO-2): the DeepSpeed config's "lookahead" section is honoured; with callback options too it raises;
* ``example`` (one process): examples/hf/run_clm.py trains a tiny GPT-2 with the callback on the offline WikiText-2.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.dist.hf_common import ALPHA, SECTION, STEPS, K, eval_loss, reference
from tests.helpers import run_module, run_torchrun
from tests.tolerances import WEIGHT_TOL

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

TOL = WEIGHT_TOL  # another summation order (batch split, gradient averaging): fp32 rounding (tests/tolerances.py)
MODES = {"single": 1, "ddp": 2, "zero2": 2, "zero3": 2}
# One launch per world size: the 2-process modes run one after the other in one process group.
LAUNCHES = {"single": ["single"], "two": ["ddp", "zero2", "zero3"]}
_RUNS: dict[str, list[dict[str, Any]]] = {}


def _runs(mode: str, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    if mode.startswith("zero"):
        pytest.importorskip("deepspeed")
    if mode not in _RUNS:
        group = next(group for group in LAUNCHES.values() if mode in group)
        modes = [m for m in group if not m.startswith("zero") or importlib.util.find_spec("deepspeed")]
        out = tmp_path_factory.mktemp("hf")
        args = [str(out), ",".join(modes)]
        if MODES[mode] == 1:
            proc = run_module("tests.dist.hf_cases", args, timeout=300)
        else:
            proc = run_torchrun("tests.dist.hf_cases", args, nproc=MODES[mode], timeout=400)
        assert proc.returncode == 0, proc.stdout[-6000:]
        for m in modes:
            _RUNS[m] = [torch.load(Path(out) / f"{m}_rank{r}.pt", weights_only=False) for r in range(MODES[m])]
    return _RUNS[mode]


@pytest.fixture(params=list(MODES), scope="module")
def mode(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def runs(mode: str, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return _runs(mode, tmp_path_factory)


def _max_dev(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b) and a
    return max((x.double() - y.double()).abs().max().item() for x, y in zip(a, b))


def _bitwise(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


REF = {}


def _reference(steps: int = STEPS, k: int = K, alpha: float = ALPHA) -> tuple[list, list]:
    if (steps, k, alpha) not in REF:
        REF[steps, k, alpha] = reference(steps, k, alpha)
    return REF[steps, k, alpha]


@pytest.mark.dist
def test_equals_reference(mode: str, runs: list[dict[str, Any]]) -> None:
    theta, phi = _reference()
    start = reference(0)[0]
    for rank, r in enumerate(runs):
        full = r["full"]
        dev_theta, dev_phi = _max_dev(full["theta"], theta), _max_dev(full["phi"], phi)
        print(f"{mode} rank {rank}: max |θ - θ_ref| = {dev_theta:.3g}, max |φ - φ_ref| = {dev_phi:.3g}")
        assert dev_theta < TOL and dev_phi < TOL
        assert _max_dev(full["theta"], start) > 1e-3  # it trained
        assert _max_dev(full["theta"], full["phi"]) > 1e-4  # two steps into a cycle: θ ≠ φ
        assert full["syncs_done"] == STEPS // K
        # Lookahead.sync_count counts cycles, also where ZeRO-1/2 steps the Trainer's 2 param groups separately
        assert full["sync_count"] == STEPS // K
        assert set(full["counts"]) == {STEPS % K}
        logs = [entry for entry in full["logs"] if "loss" in entry]
        assert [entry["lookahead/syncs"] for entry in logs] == [float(s // K) for s in range(1, STEPS + 1)]
        assert all(entry["lookahead/alpha"] == ALPHA for entry in logs)


@pytest.mark.dist
def test_mid_cycle_resume_is_bit_identical(mode: str, runs: list[dict[str, Any]]) -> None:
    for r in runs:
        full, resumed = r["full"], r["resume"]
        assert _bitwise(resumed["theta"], full["theta"])
        assert _bitwise(resumed["phi"], full["phi"])
        assert _bitwise(resumed["shard_phi"], full["shard_phi"])  # this rank's φ (its ZeRO partition)
        assert resumed["counts"] == full["counts"]
        assert resumed["syncs_done"] == full["syncs_done"]  # carried over in trainer_state.json
        assert resumed["logs"][-2]["lookahead/syncs"] == full["logs"][-2]["lookahead/syncs"]


@pytest.mark.dist
def test_evaluation_on_slow_weights(mode: str, runs: list[dict[str, Any]]) -> None:
    theta, phi = _reference()
    for r in runs:
        ev = r["eval"]
        assert _bitwise(ev["theta"], r["full"]["theta"])  # 4 evaluations during training changed nothing
        assert _bitwise(ev["theta_after_eval"], ev["theta"])  # θ restored bit-exactly after trainer.evaluate()
        at_phi, at_theta = eval_loss(phi), eval_loss(theta)
        assert abs(at_phi - at_theta) > 50 * TOL
        assert math.isclose(ev["eval_loss"], at_phi, rel_tol=0, abs_tol=TOL)
        assert math.isclose(ev["eval_loss_fast"], at_theta, rel_tol=0, abs_tol=TOL)  # eval_weights="fast"
        evals = [entry for entry in ev["logs"] if "eval_loss" in entry]
        assert [entry["step"] for entry in evals] == [2, 4, 6, 8, 8, 8]  # during training, then 2 evaluate()


@pytest.mark.dist
def test_collectives_unchanged_under_zero(mode: str, runs: list[dict[str, Any]]) -> None:
    if not mode.startswith("zero"):
        pytest.skip("DDP and one process: Lookahead runs locally on replicated weights")
    for r in runs:
        with_la, without = r["full"]["comm"], r["plain"]["comm"]
        assert len(with_la) == STEPS and all(with_la), "the log must see DeepSpeed's own collectives"
        assert with_la == without


@pytest.mark.dist
def test_gradient_accumulation_counts_optimizer_steps(mode: str, runs: list[dict[str, Any]]) -> None:
    if mode == "zero3":
        pytest.skip("accumulation is exercised for one process, DDP and ZeRO-2")
    theta, phi = _reference()
    for r in runs:
        gas = r["gas"]
        assert _max_dev(gas["theta"], theta) < TOL and _max_dev(gas["phi"], phi) < TOL
        assert gas["syncs_done"] == STEPS // K and set(gas["counts"]) == {STEPS % K}


@pytest.mark.dist
def test_second_train_call_keeps_lookahead(mode: str, runs: list[dict[str, Any]]) -> None:
    if mode.startswith("zero"):
        pytest.skip("repeated train() is exercised for one process and DDP")
    theta, phi = _reference(2 * STEPS)
    for r in runs:
        again = r["again"]
        assert _max_dev(again["theta"], theta) < TOL and _max_dev(again["phi"], phi) < TOL
        assert again["syncs_done"] == 2 * STEPS // K


@pytest.mark.dist
def test_deepspeed_section_is_honoured_or_conflicts(tmp_path_factory: pytest.TempPathFactory) -> None:
    runs = _runs("zero2", tmp_path_factory)
    theta, phi = _reference(STEPS, SECTION["k"], SECTION["alpha"])
    for r in runs:
        sec = r["section"]
        assert (sec["k"], sec["alpha"]) == (SECTION["k"], SECTION["alpha"])
        assert _max_dev(sec["theta"], theta) < TOL and _max_dev(sec["phi"], phi) < TOL
        logs = [entry for entry in sec["logs"] if "loss" in entry]
        assert logs[-1]["lookahead/syncs"] == STEPS // SECTION["k"]
        assert logs[-1]["lookahead/alpha"] == SECTION["alpha"]
        # log_distance=True: ‖θ − φ‖ over all shards, 0 right after a sync (step 8 = 4 * k)
        assert logs[-1]["lookahead/distance"] == 0.0 and logs[-2]["lookahead/distance"] > 0.0
        assert "lookahead" in r["conflict"] and "['k']" in r["conflict"]


# ============================================================== in-process checks (no training)
def test_options_are_validated_with_names() -> None:
    from lookahead_dist.core.settings import LookaheadConfigError, LookaheadSettings
    from lookahead_dist.transformers import LookaheadTrainerCallback

    with pytest.raises(LookaheadConfigError, match="k=0"):
        LookaheadTrainerCallback(k=0)
    with pytest.raises(LookaheadConfigError, match="alpha=1.5"):
        LookaheadTrainerCallback(alpha=1.5)
    with pytest.raises(ValueError, match="eval_weights='slowest'"):
        LookaheadTrainerCallback(eval_weights="slowest")
    with pytest.raises(TypeError, match="not both"):
        LookaheadTrainerCallback(k=3, settings=LookaheadSettings())
    cb = LookaheadTrainerCallback(k=3, alpha="adaptive", alpha_bounds=[0.3, 0.9], pullback_keys=["exp_avg"])
    assert cb.settings == LookaheadSettings(k=3, alpha="adaptive", alpha_bounds=(0.3, 0.9), pullback_keys=("exp_avg",))
    state = cb.state()  # JSON-ready, and rebuilds the same callback (restore_callback_states_from_checkpoint)
    assert state["args"]["alpha_bounds"] == [0.3, 0.9]
    assert LookaheadTrainerCallback(**state["args"]).settings == cb.settings
    assert LookaheadTrainerCallback().state()["args"] == {"eval_weights": "slow", "log_distance": False,
                                                          "log_prefix": "lookahead/"}


@pytest.mark.dist
def test_run_clm_example(tmp_path_factory: pytest.TempPathFactory) -> None:
    """examples/hf/run_clm.py (run inside the one-process launch): trains with Lookahead, logs it, evaluates."""
    example = _runs("single", tmp_path_factory)[0]["example"]
    steps = [entry for entry in example["logs"] if "loss" in entry]
    assert [entry["lookahead/syncs"] for entry in steps] == [0.0, 1.0, 1.0, 2.0]  # k=2, 4 steps
    assert all(entry["lookahead/alpha"] == 0.5 for entry in steps)
    loss = example["metrics"]["eval_loss"]
    assert math.isfinite(loss) and loss < math.log(300) + 1  # a 300-token BPE: near-uniform after 4 steps
    assert math.isclose(example["metrics"]["perplexity"], math.exp(loss), rel_tol=1e-9)


def test_grad_scaler_steps_go_through_lookahead() -> None:
    """fp16 on GPUs: accelerate steps through a GradScaler; every unskipped step must still be a Lookahead step.

    Checked with a CPU GradScaler on accelerate's AcceleratedOptimizer directly (the Trainer uses no scaler on
    CPU). Scales are powers of two, so the unscaled gradients are the plain ones and the result must equal the
    reference loop; a step with an inf gradient is skipped by the scaler and must not count in the cycle.
    """
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.state import AcceleratorState

    from lookahead_dist.core.keys import COUNT_KEY, SLOW_KEY
    from lookahead_dist.core.settings import LookaheadSettings
    from lookahead_dist.transformers import wrap_accelerated
    from tests.dist.hf_common import LR, WD, batch, make_model, train_set

    x, y = batch(train_set())
    theta_ref, phi_ref = reference(5, k=2, alpha=ALPHA)
    model = make_model()
    weights = [p for n, p in model.named_parameters() if not n.endswith("bias")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    inner = torch.optim.AdamW([{"params": weights, "weight_decay": WD}, {"params": biases, "weight_decay": 0.0}],
                              lr=LR)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4, growth_interval=1000)
    try:
        Accelerator(cpu=True)  # accelerate's process state, which AcceleratedOptimizer reads
        holder = AcceleratedOptimizer(inner, device_placement=False, scaler=scaler)
        lookahead = wrap_accelerated(holder, LookaheadSettings(k=2, alpha=ALPHA))
        for step in range(6):
            holder.zero_grad()
            loss = model(x, y)["loss"]
            if step == 3:
                loss = loss * float("inf")  # an overflow: the scaler skips this step
            scaler.scale(loss).backward()
            holder.step()
            assert holder.step_was_skipped == (step == 3)
    finally:
        AcceleratorState._reset_state(True)
    assert lookahead.sync_count == 2  # 5 real steps, k=2
    assert {st[COUNT_KEY] for st in lookahead.state.values()} == {1}
    theta = [p.detach() for p in model.parameters()]
    assert _max_dev(theta, theta_ref) < TOL
    assert _max_dev([lookahead.state[p][SLOW_KEY] for p in model.parameters()], phi_ref) < TOL


def _tiny_trainer(out: Path, callbacks: list[Any] | None = None) -> Any:
    from transformers import Trainer, TrainingArguments

    from tests.dist.hf_common import LR, N_TRAIN, WD, make_model, train_set

    args = TrainingArguments(
        output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=N_TRAIN, learning_rate=LR, weight_decay=WD,
        lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.0, optim="adamw_torch",
        train_sampling_strategy="sequential", logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        seed=0, disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    return Trainer(model=make_model(), args=args, train_dataset=train_set(), callbacks=callbacks)


def test_callback_without_attach_is_refused_with_the_fix(tmp_path: Path) -> None:
    from accelerate.state import AcceleratorState

    from lookahead_dist.transformers import LookaheadTrainerCallback

    try:
        with pytest.raises(RuntimeError, match=r"was not attached.*\.attach\(trainer\)"):
            _tiny_trainer(tmp_path, callbacks=[LookaheadTrainerCallback(k=K, alpha=ALPHA)])
        trainer = _tiny_trainer(tmp_path)
        trainer.add_callback(LookaheadTrainerCallback(k=K, alpha=ALPHA))  # added, never attached
        with pytest.raises(RuntimeError, match="was not attached"):
            trainer.train()
        with pytest.raises(TypeError, match="expected a transformers.Trainer"):
            LookaheadTrainerCallback().attach(object())  # type: ignore[arg-type]
    finally:
        AcceleratorState._reset_state(True)


def test_a_callback_rebuilt_from_its_state_is_served(tmp_path: Path) -> None:
    """The Trainer may replace the attached instance by one built from ``state()`` (restoring callback states
    from a checkpoint); the wrapped Trainer methods serve whichever instance its callback handler holds."""
    from accelerate.state import AcceleratorState

    from lookahead_dist.core.keys import SLOW_KEY
    from lookahead_dist.transformers import LookaheadTrainerCallback

    try:
        trainer = _tiny_trainer(tmp_path)
        attached = LookaheadTrainerCallback(k=K, alpha=ALPHA).attach(trainer)
        with pytest.raises(ValueError, match="already has a LookaheadTrainerCallback"):
            LookaheadTrainerCallback().attach(trainer)
        trainer.callback_handler.remove_callback(attached)
        rebuilt = LookaheadTrainerCallback(**attached.state()["args"])
        trainer.callback_handler.add_callback(rebuilt)
        trainer.train()
    finally:
        AcceleratorState._reset_state(True)
    assert attached.lookahead is None and rebuilt.lookahead is not None
    theta, phi = _reference()
    params = list(trainer.model.parameters())
    assert _max_dev([p.detach() for p in params], theta) < TOL
    assert _max_dev([rebuilt.lookahead.state[p][SLOW_KEY] for p in params], phi) < TOL
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["lookahead/syncs"] for entry in logs] == [float(s // K) for s in range(1, STEPS + 1)]
    assert all(entry["lookahead/alpha"] == ALPHA for entry in logs)
