"""Runs example training cases in sequence in this process (or in each torchrun process) and writes JSON results.

    python tests/dist/ex_cases.py --work DIR --out results.json --cases lm_hub,nmt_local_la,nmt_local_la+test
    torchrun --nproc_per_node 2 tests/dist/ex_cases.py --work DIR --out results.json --cases lm_zero2_la

Every case goes through the examples' LightningCLI (``LMCLI``/``NMTCLI`` with ``args=``) with the repo's YAML
configs. Hub-name cases run in ``--work``, which holds the local stand-ins for Hub datasets.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    assert os.environ.get(var) == "1", f"{var} must be 1 so that nothing reaches the network"
# The Hub-name cases write local stand-ins under real Hub names: into a temporary cache, never the user's.
_HOME_CACHE = str(Path.home() / ".cache")
for var in ("HF_HOME", "HF_DATASETS_CACHE", "LOOKAHEAD_CACHE_DIR"):
    assert os.environ.get(var) and not os.environ[var].startswith(_HOME_CACHE), (
        f"{var}={os.environ.get(var)!r}: point it at a temporary folder (tests/conftest.py does) so that the "
        f"cases leave ~/.cache and the repository alone"
    )

import torch

from tests.fake_hub import make_wikitext, make_wmt16
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
    "--data.max_tokens=600",
    "--data.max_train_pairs=4000",
    "--data.max_val_pairs=40",
    "--data.max_test_pairs=24",
    "--data.vocab_size=1000",
    "--data.max_len=24",
    "--model.d_model=64",
    "--model.layers=1",
    "--model.ffn_dim=128",
    "--model.warmup_steps=5",
    "--model.num_beams=2",
    "--model.show_translations=2",
]

# name -> (task, setup config, extra CLI args, steps, validate every)
CASES: dict[str, tuple[str, str, list[str], int, int]] = {
    "lm_hub": ("lm", "lm_cpu.yaml", LM_HUB + LM_SMALL, 30, 10),
    # 32 steps, k=5: the last sync was 2 steps before the end, so φ != θ in the final checkpoint
    "nmt_local_la": ("nmt", "nmt_cpu.yaml", ["--config", LOOKAHEAD["nmt"], *NMT_SMALL], 32, 16),
    "nmt_hub": ("nmt", "nmt_cpu.yaml", NMT_HUB + NMT_SMALL, 10, 10),
    "lm_ddp_la": ("lm", "lm_ddp.yaml", ["--config", LOOKAHEAD["lm"], *LM_SMALL], 30, 10),
    "lm_zero2_la": ("lm", "lm_zero2.yaml", ["--config", LOOKAHEAD["lm"], *LM_SMALL], 30, 10),
    "nmt_zero3_la": ("nmt", "nmt_zero3.yaml", ["--config", LOOKAHEAD["nmt"], *NMT_SMALL], 30, 10),
    "nmt_zero2_la": ("nmt", "nmt_zero2.yaml", ["--config", LOOKAHEAD["nmt"], *NMT_SMALL], 12, 12),
    # BLEU of known translations (each reference with its second word dropped): the value is not 0
    "nmt_oracle": ("nmt", "nmt_cpu.yaml", [*NMT_SMALL, "--data.max_val_pairs=300"], 2, 2),
    "nmt_oracle_ddp": ("nmt", "nmt_ddp.yaml", [*NMT_SMALL, "--data.max_val_pairs=301"], 2, 2),
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


def damaged(reference: str) -> str:
    """A stand-in translation: the reference without its second word (BLEU well above 0, below 100)."""
    words = reference.split()
    return " ".join(words[:1] + words[2:]) if len(words) > 2 else reference


def oracle_module():  # type: ignore[no-untyped-def]
    from examples.nmt.model import TranslationModule

    class OracleTranslation(TranslationModule):
        """Decodes nothing: returns :func:`damaged` references, so the BLEU to expect is known exactly."""

        def _decode(self, batch, beams):  # type: ignore[no-untyped-def]
            split = "validation" if self.trainer.validating or self.trainer.sanity_checking else "test"
            refs = self.trainer.datamodule.references(split)
            return [damaged(refs[i]) for i in batch["index"].tolist()]

    return OracleTranslation


def gather(value):  # type: ignore[no-untyped-def]
    if not torch.distributed.is_initialized():
        return [value]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, value)
    return out


def run_case(name: str, work: Path, resume: bool = False, test: bool = False) -> dict:
    """``fit`` (``resume``: ``fit --ckpt_path last`` for 10 more steps; ``test``: ``test --ckpt_path last``)."""
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

        if name.startswith("nmt_oracle"):
            Module = oracle_module()
        base = "nmt_base.yaml"
    root = work / name
    args = [
        "test" if test else "fit", "--config", str(CFG / setup), *extra, f"--trainer.default_root_dir={root}",
        f"--trainer.max_steps={steps}", f"--trainer.val_check_interval={every}", "--trainer.enable_progress_bar=false",
        "--trainer.log_every_n_steps=5",
    ]  # fmt: skip
    if resume or test:
        args.append("--ckpt_path=last")
    cli = CLI(Module, Data, base_config=base, args=args)
    trainer = cli.trainer
    run = cli.run_dir
    result = {
        "global_step": trainer.global_step,
        "world_size": trainer.world_size,
        "num_nodes": trainer.num_nodes,
        "strategy": type(trainer.strategy).__name__,
        "callbacks": [type(cb).__name__ for cb in trainer.callbacks],
        "run": str(run),
        "runs": sorted(p.name for p in root.iterdir()) if trainer.is_global_zero else [],
        "logs": sorted(p.name for p in run.iterdir()) if trainer.is_global_zero else [],
        "checkpoints": sorted(p.name for p in (run / "checkpoints").iterdir())
        if trainer.is_global_zero and not test
        else [],
        # what each rank logged last: BLEU must be the same number everywhere
        "bleu_per_rank": gather({k: float(trainer.callback_metrics[k]) for k in ("val_bleu", "test_bleu")
                                 if k in trainer.callback_metrics}),
    }  # fmt: skip
    if trainer.is_global_zero:
        result["metrics"] = read_metrics(run)
    if task == "nmt" and trainer.is_global_zero:
        result["bleu_check"] = recompute_bleu(cli, run, oracle=name.startswith("nmt_oracle"))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return result


def recompute_bleu(cli, run: Path, oracle: bool) -> dict:  # type: ignore[no-untyped-def]
    """BLEU recomputed with the sacrebleu package directly, from raw strings, for the test to compare.

    ``test``: the run's ``test_translations.tsv`` (hypotheses and references as written). ``oracle``: the
    damaged validation references, whose score the run must have logged. ``raw``: every reference is a
    line of the data file as it is (no tokenizer round trip).
    """
    import csv

    import sacrebleu

    with open(run / "test_translations.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    out = {
        "test": sacrebleu.corpus_bleu(
            [r["translation"] for r in rows], [[r["reference"] for r in rows]]
        ).score,
        "n_test": len(rows),
    }
    data = cli.datamodule
    refs = data.references("validation")
    out["n_val"] = len(refs)
    if oracle:
        out["oracle_val"] = sacrebleu.corpus_bleu([damaged(r) for r in refs], [refs]).score
    if data.hparams.data_file:
        tsv = data_dir() / "tatoeba-deu-eng" / "deu.txt"
        english = {line.split("\t")[0] for line in tsv.read_text().splitlines()}
        out["raw"] = all(r in english for r in refs + [r["reference"] for r in rows])
    return out


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
        base_name, _, then = name.partition("+")
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        results[name] = run_case(base_name, args.work, resume=then == "resume", test=then == "test")
    if rank == 0:
        args.out.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
