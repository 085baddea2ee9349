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


def cases(tmp_path: Path, names: str, prefix: list[str], timeout: float = 1200) -> dict:
    out = tmp_path / "results.json"
    launch([[*prefix, str(SCRIPT), "--work", str(tmp_path), "--out", str(out), "--cases", names]], timeout)
    return json.loads(out.read_text())


def val_rows(result: dict) -> list[dict]:
    return [row for row in result["metrics"] if "val_loss" in row]


def last(result: dict, key: str) -> float:
    return [row[key] for row in result["metrics"] if key in row][-1]


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
    assert all(0.0 <= row["val_bleu"] <= 100.0 for row in rows)
    check = result["bleu_check"]
    # the test split is scored after fit, on all of it, and the logged score is sacrebleu's for the
    # translations written beside it (references: data-file lines as they are)
    assert check["n_test"] == 24 and check.get("raw", True)
    assert last(result, "test_bleu") == pytest.approx(check["test"], abs=1e-4)
    per_rank = result["bleu_per_rank"]
    assert len(per_rank) == result["world_size"] and all(r == per_rank[0] for r in per_rank), per_rank


def check_lookahead(result: dict) -> None:
    assert "LookaheadCallback" in result["callbacks"]
    syncs = [(row["step"], row["lookahead/syncs"]) for row in result["metrics"] if "lookahead/syncs" in row]
    assert syncs and all(count == (step + 1) // K for step, count in syncs), syncs


def check_outputs(result: dict) -> None:
    assert Path(result["run"]).name == "version_0" and result["runs"] == ["version_0"]
    assert {"metrics.csv", "config.yaml", "hparams.yaml", "checkpoints"} <= set(result["logs"])
    # TensorBoard is installed here (the examples extra), so its event files sit beside metrics.csv
    assert any(name.startswith("events.out.tfevents") for name in result["logs"])
    assert "last.ckpt" in result["checkpoints"]


def check_oracle(result: dict, n_val: int) -> None:
    """BLEU of known translations: the logged value is sacrebleu's, well away from 0, on every rank."""
    check = result["bleu_check"]
    assert check["n_val"] == n_val and check["raw"]
    assert 20.0 < check["oracle_val"] < 95.0
    assert last(result, "val_bleu") == pytest.approx(check["oracle_val"], abs=1e-4)
    # the test after fit: every rank logged sacrebleu's score of the translations rank 0 wrote
    assert 20.0 < check["test"] < 95.0
    per_rank = [r["test_bleu"] for r in result["bleu_per_rank"]]
    assert per_rank == [pytest.approx(check["test"], abs=1e-4)] * result["world_size"]


@pytest.mark.slow
def test_one_process_hub_names_local_files_resume_and_test(tmp_path: Path) -> None:
    res = cases(
        tmp_path, "lm_hub,lm_hub+resume,nmt_local_la,nmt_local_la+test,nmt_oracle,nmt_hub", [sys.executable]
    )
    # LM through load_dataset("wikitext", "wikitext-103-raw-v1") resolved to a local Hub-layout folder
    check_lm(res["lm_hub"], 30)
    check_outputs(res["lm_hub"])
    assert res["lm_hub"]["strategy"] == "SingleDeviceStrategy"
    # --ckpt_path last resumes at step 30 in the same run folder and appends to its metrics
    resumed = res["lm_hub+resume"]
    assert resumed["global_step"] == 40 and resumed["run"] == res["lm_hub"]["run"]
    steps = [row["step"] for row in val_rows(resumed)]
    assert steps == sorted(set(steps)) and min(steps) < 30 <= max(steps), steps
    assert val_rows(resumed)[-1]["val_loss"] < val_rows(res["lm_hub"])[-1]["val_loss"]
    # NMT on the local Tatoeba TSV with Lookahead, and through load_dataset("wmt16", "de-en")
    check_nmt(res["nmt_local_la"], 32)
    check_lookahead(res["nmt_local_la"])
    check_outputs(res["nmt_local_la"])
    assert "test_translations.tsv" in res["nmt_local_la"]["logs"]
    check_nmt(res["nmt_hub"], 10)
    check_oracle(res["nmt_oracle"], 300)
    # test --ckpt_path last: beside the run's logs (not over them), on the slow weights restored from the
    # checkpoint: the same weights the test after fit used, so the same loss
    tested = res["nmt_local_la+test"]
    assert Path(tested["run"]) == Path(res["nmt_local_la"]["run"]) / "test_0"
    assert last(tested, "test_loss") == pytest.approx(last(res["nmt_local_la"], "test_loss"), rel=1e-5)
    assert last(tested, "test_bleu") == pytest.approx(last(res["nmt_local_la"], "test_bleu"), abs=1e-4)


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
    names = "lm_ddp_la,lm_zero2_la,nmt_zero3_la,nmt_zero2_la,nmt_zero2_la+test,nmt_oracle_ddp"
    res = cases(tmp_path, names, prefix, timeout=1500)
    assert res["lm_ddp_la"]["strategy"] == "DDPStrategy"
    assert res["lm_zero2_la"]["strategy"] == res["nmt_zero3_la"]["strategy"] == "CPUDeepSpeedStrategy"
    for name in ("lm_ddp_la", "lm_zero2_la"):
        assert res[name]["world_size"] == 2
        check_lm(res[name], 30)
        check_lookahead(res[name])
    check_nmt(res["nmt_zero3_la"], 30)
    check_lookahead(res["nmt_zero3_la"])
    check_outputs(res["lm_zero2_la"])
    # DistributedSampler pads the ranks' shares with repeats: BLEU still scores each sentence once
    check_oracle(res["nmt_oracle_ddp"], 301)
    # standalone test of a ZeRO-2 checkpoint (φ consolidated from the per-rank optimizer files) evaluates the
    # weights the test after fit evaluated (the live φ). 12 steps, k=5: φ != θ. (ZeRO-3: DeepSpeed's own
    # evaluation-mode load fails before any Lookahead code, see examples/README.md.)
    check_nmt(res["nmt_zero2_la"], 12)
    tested = res["nmt_zero2_la+test"]
    assert Path(tested["run"]) == Path(res["nmt_zero2_la"]["run"]) / "test_0"
    assert last(tested, "test_loss") == pytest.approx(last(res["nmt_zero2_la"], "test_loss"), rel=1e-5)


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


# ---------------------------------------------------------------------------------- fast checks, no training
def test_tatoeba_split_shares_no_sentence_between_splits() -> None:
    from examples.common.paths import data_dir
    from examples.nmt.data import split_pairs

    lines = (data_dir() / "tatoeba-deu-eng" / "deu.txt").read_text().splitlines()
    pairs = [(de, en) for en, de in (line.split("\t")[:2] for line in lines)]
    splits = split_pairs(pairs, 0.01, 0.02)
    assert sum(len(v) for v in splits.values()) == len(pairs)
    for side in (0, 1):  # neither a German nor an English sentence of a held-out split was seen in training
        seen = {pair[side] for pair in splits["train"]}
        for held_out in ("validation", "test"):
            assert not seen & {pair[side] for pair in splits[held_out]}
        assert not {p[side] for p in splits["validation"]} & {p[side] for p in splits["test"]}
    # Tatoeba repeats English sentences, so the split must not be by the source alone: it is not trivial
    assert len({en for _, en in pairs}) < len(pairs)
    assert (
        0.015 < len(splits["test"]) / len(pairs) < 0.025
        and 0.005 < len(splits["validation"]) / len(pairs) < 0.015
    )


def test_token_batches_cover_every_example_within_the_budget() -> None:
    import random

    from examples.nmt.data import token_batches

    lengths = [random.Random(i).randint(1, 40) for i in range(1000)]
    batches = token_batches(lengths, max_tokens=200)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert all(max(lengths[i] for i in b) * len(b) <= 200 for b in batches)
    assert len(batches) < 1000 * 21 / 200 * 1.3  # packed: about total tokens / budget, not one example each


def test_bleu_is_sacrebleus_corpus_score_on_the_0_to_100_scale() -> None:
    import sacrebleu

    from examples.nmt.model import corpus_bleu

    refs = ["The cat sat on the mat.", "I am not hungry any more.", "Tom is taller than Mary."]
    hyps = ["The cat sat on a mat.", "I am not hungry anymore.", "Tom is tall."]
    score, signature = corpus_bleu(hyps, refs)
    assert score == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score) and 10 < score < 100
    assert "tok:13a" in signature and "smooth:exp" in signature and "nrefs:1" in signature


def test_run_folders_never_clobber(tmp_path: Path) -> None:
    from examples.common.cli import plan_run

    root = tmp_path / "out"
    first, ckpt, append = plan_run(root, "fit", None)
    assert (first, ckpt, append) == (root / "version_0", None, False)
    (first / "checkpoints").mkdir(parents=True)
    (first / "metrics.csv").write_text("step\n")
    assert plan_run(root, "fit", None)[0] == root / "version_1"  # a second fit: its own folder
    with pytest.raises(FileNotFoundError, match="no run under"):
        plan_run(root, "fit", "last")
    (first / "checkpoints" / "epoch=0-step=10.ckpt").write_text("")
    (first / "checkpoints" / "last.ckpt").symlink_to("epoch=0-step=10.ckpt")
    assert plan_run(root, "fit", "last") == (first, str(first / "checkpoints" / "last.ckpt"), True)
    tested, ckpt, append = plan_run(root, "test", "last")
    assert tested == first / "test_0" and not append
    tested.mkdir()
    assert plan_run(root, "test", str(first / "checkpoints" / "epoch=0-step=10.ckpt"))[0] == first / "test_1"


def test_resumed_csv_log_appends_and_drops_rows_past_the_checkpoint(tmp_path: Path) -> None:
    from examples.common.cli import default_loggers
    from examples.common.runs import read_metrics

    run = tmp_path / "version_0"
    logger = default_loggers(run)[0]
    for step in range(0, 50, 10):
        logger.log_metrics({"train_loss": 1.0 / (step + 1)}, step=step)
    logger.log_metrics({"test_bleu": 7.0}, step=20)  # e.g. the test after fit, on the checkpoint's weights
    logger.save()
    resumed = default_loggers(run, append=True, resume_step=20)[0]  # the checkpoint was written at step 20
    resumed.log_metrics({"train_loss": 0.5, "val_loss": 2.0}, step=20)
    resumed.save()
    rows = read_metrics(run)
    assert [row["step"] for row in rows] == [0, 10, 20, 20]
    assert rows[0]["train_loss"] == 1.0 and rows[2] == {"test_bleu": 7.0, "step": 20}
    assert rows[-1] == {"train_loss": 0.5, "val_loss": 2.0, "step": 20}


def test_standalone_test_from_a_checkpoint_evaluates_the_slow_weights(tmp_path: Path) -> None:
    import lightning as L
    import torch
    from lookahead_dist.callbacks import LookaheadCallback
    from torch.utils.data import DataLoader, TensorDataset

    from lookahead_dist.core.keys import SLOW_KEY

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            # a frozen parameter first, like the NMT model's sinusoidal positions: in the optimizer, never stepped
            self.frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
            self.layer = torch.nn.Linear(3, 1)
            self.seen: list[torch.Tensor] = []

        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            x, y = batch
            return torch.nn.functional.mse_loss(self.layer(x), y)

        def test_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            self.seen.append(self.layer.weight.detach().clone())

        def configure_optimizers(self):  # type: ignore[no-untyped-def]
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(64, 3), torch.randn(64, 1)), batch_size=8)
    quiet = {
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "accelerator": "cpu",
    }
    trainer = L.Trainer(max_steps=7, callbacks=[LookaheadCallback(k=5)], enable_checkpointing=False, **quiet)
    trainer.fit(Tiny(), data)
    path = tmp_path / "tiny.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)
    phi = saved["optimizer_states"][0]["state"][1][SLOW_KEY]  # the weight's φ (index 0 is the frozen one)
    theta = saved["state_dict"]["layer.weight"]
    assert not torch.allclose(phi, theta)  # 2 steps after a sync: the two differ
    for eval_weights, expected in (("slow", phi), ("fast", theta)):
        model = Tiny()
        tester = L.Trainer(callbacks=[LookaheadCallback(k=5, eval_weights=eval_weights)], **quiet)
        tester.test(model, data, ckpt_path=path, verbose=False)
        assert model.seen and all(torch.equal(w, expected) for w in model.seen), eval_weights
        assert torch.equal(model.layer.weight.detach(), theta)  # θ is back after the test


def test_progress_bar_names_the_step_bound_instead_of_epoch_minus_two() -> None:
    from types import SimpleNamespace

    from examples.common.cli import StepsRichProgressBar, _epoch_text, progress_bar

    by_steps = SimpleNamespace(max_epochs=-1, current_epoch=0, max_steps=350)
    assert _epoch_text(by_steps) == "Epoch 0 (max_steps 350)"  # Lightning's own bar says "Epoch 0/-2"
    assert _epoch_text(SimpleNamespace(max_epochs=3, current_epoch=1, max_steps=-1)) == "Epoch 1/2"
    assert isinstance(progress_bar(), StepsRichProgressBar)  # rich is installed here, as Lightning would pick
