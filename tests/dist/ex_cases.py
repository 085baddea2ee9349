"""Runs example training cases in sequence in this process (or in each torchrun process) and writes JSON results.

    python tests/dist/ex_cases.py --work DIR --out results.json --cases lm_hub,nmt_local
    torchrun --nproc_per_node 2 tests/dist/ex_cases.py --work DIR --out results.json --cases lm_zero2_la

Every case goes through the examples' LightningCLI (``LMCLI``/``NMTCLI`` with ``args=``) with the repo's YAML
configs. Hub-name cases run in ``--work``, which holds the local stand-ins for Hub datasets.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    assert os.environ.get(var) == "1", f"{var} must be 1 so that nothing reaches the network"

import torch

from examples.common.fake_hub import make_wikitext, make_wmt16
from examples.common.paths import data_dir
from examples.common.runs import read_metrics

CFG = REPO / "configs"
LOOKAHEAD = {"lm": str(CFG / "lm_lookahead.yaml"), "nmt": str(CFG / "nmt_lookahead.yaml")}
LM_HUB = [
    "--data.data_files=null",
    "--data.dataset_name=wikitext",
    "--data.dataset_config=wikitext-103-raw-v1",
]
NMT_HUB = ["--data.data_file=null", "--data.dataset_name=wmt16", "--data.dataset_config=de-en"]
LM_SMALL = ["--data.batch_size=8", "--data.max_val_blocks=16", "--data.vocab_size=1024", "--data.seq_len=64"]
NMT_SMALL = [
    "--data.batch_size=16",
    "--data.max_train_pairs=4000",
    "--data.max_eval_pairs=32",
    "--data.vocab_size=1000",
    "--data.max_len=24",
    "--model.num_beams=2",
    "--model.bleu_batches=1",
]

# name -> (task, setup config, extra CLI args, steps, validate every)
CASES: dict[str, tuple[str, str, list[str], int, int]] = {
    "lm_hub": ("lm", "lm_cpu.yaml", LM_HUB + LM_SMALL, 30, 10),
    "nmt_local": ("nmt", "nmt_cpu.yaml", NMT_SMALL, 30, 10),
    "nmt_hub": ("nmt", "nmt_cpu.yaml", NMT_HUB + NMT_SMALL, 10, 10),
    "lm_ddp_la": ("lm", "lm_ddp.yaml", ["--config", LOOKAHEAD["lm"], *LM_SMALL], 30, 10),
    "lm_zero2_la": ("lm", "lm_zero2.yaml", ["--config", LOOKAHEAD["lm"], *LM_SMALL], 30, 10),
    "nmt_zero3_la": ("nmt", "nmt_zero3.yaml", ["--config", LOOKAHEAD["nmt"], *NMT_SMALL], 30, 10),
    "lm_multinode_la": ("lm", "lm_multinode.yaml", ["--config", LOOKAHEAD["lm"], *LM_SMALL], 20, 10),
}


def make_fake_hub(work: Path) -> None:
    """Hub-layout copies of real offline text: wikitext (tinyshakespeare lines) and wmt16 de-en (Tatoeba pairs)."""
    if not (work / "wikitext").exists():
        lines = (data_dir() / "tinyshakespeare" / "input.txt").read_text().splitlines()
        make_wikitext(work, lines[:20000], lines[-4000:])
    if not (work / "wmt16").exists():
        rows = [
            line.split("\t")[:2]
            for line in (data_dir() / "tatoeba-deu-eng" / "deu.txt").read_text().splitlines()
        ]
        pairs = [(de, en) for en, de in rows[::20]]  # every 20th pair: short and long sentences
        make_wmt16(work, {"train": pairs[:-400], "validation": pairs[-400:-200], "test": pairs[-200:]})


def run_case(name: str, work: Path, resume: bool = False) -> dict:
    task, setup, extra, steps, every = CASES[name]
    steps += 10 if resume else 0
    if task == "lm":
        from examples.lm.cli import LMCLI as CLI
        from examples.lm.data import LMDataModule as Data
        from examples.lm.model import CausalLMModule as Module

        base = "lm_base.yaml"
    else:
        from examples.nmt.cli import NMTCLI as CLI
        from examples.nmt.data import TranslationDataModule as Data
        from examples.nmt.model import TranslationModule as Module

        base = "nmt_base.yaml"
    root = work / name
    args = [
        "fit", "--config", str(CFG / setup), *extra, f"--trainer.default_root_dir={root}",
        f"--trainer.max_steps={steps}", f"--trainer.val_check_interval={every}", "--trainer.enable_progress_bar=false",
        "--trainer.log_every_n_steps=5",
    ]  # fmt: skip
    if resume:
        args.append("--ckpt_path=last")
    cli = CLI(Module, Data, base_config=base, args=args)
    trainer = cli.trainer
    result = {
        "global_step": trainer.global_step,
        "world_size": trainer.world_size,
        "num_nodes": trainer.num_nodes,
        "strategy": type(trainer.strategy).__name__,
        "callbacks": [type(cb).__name__ for cb in trainer.callbacks],
        "logs": sorted(p.name for p in (root / "logs").iterdir()) if trainer.is_global_zero else [],
        "checkpoints": sorted(p.name for p in (root / "logs" / "checkpoints").iterdir())
        if trainer.is_global_zero
        else [],
    }
    if trainer.is_global_zero:
        result["metrics"] = read_metrics(root)
    if task == "nmt" and trainer.world_size == 1:
        result["bleu_check"] = recompute_bleu(cli)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return result


def recompute_bleu(cli) -> dict:  # type: ignore[no-untyped-def]
    """Greedy BLEU of the first validation batch recomputed with the sacrebleu package directly."""
    import sacrebleu

    module, data = cli.model, cli.datamodule
    module.eval()
    batch = next(iter(data.val_dataloader()))
    hypotheses = data.decode(module.translate(batch["input_ids"], batch["attention_mask"], 1))
    references = data.decode(batch["labels"])
    # torchmetrics' SacreBLEUScore does no smoothing by default.
    return {
        "sacrebleu": sacrebleu.corpus_bleu(hypotheses, [references], smooth_method="none").score,
        "n": len(hypotheses),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cases", required=True)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))
    if "hub" in args.cases:
        # Hub-name cases (one process) run where load_dataset finds the local Hub-layout folders; the others
        # run from the repository root like a user, so the configs' relative paths resolve.
        make_fake_hub(args.work)
        os.chdir(args.work)
    results = {}
    for name in args.cases.split(","):
        resume = name.endswith("+resume")
        base_name = name.removesuffix("+resume")
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        results[name] = run_case(base_name, args.work, resume=resume)
    if rank == 0:
        args.out.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
