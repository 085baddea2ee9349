"""Command line: ``python -m examples.lm.cli fit --config configs/lm_cpu.yaml`` (see examples/README.md)."""

from __future__ import annotations

from examples.common.cli import ExampleCLI
from examples.lm.data import LMDataModule
from examples.lm.model import CausalLMModule


class LMCLI(ExampleCLI):
    def add_arguments_to_parser(self, parser) -> None:  # type: ignore[no-untyped-def]
        parser.link_arguments("data.vocab_size", "model.vocab_size")
        parser.link_arguments("data.seq_len", "model.seq_len")
        parser.link_arguments("model.pretrained", "data.pretrained_tokenizer")
        parser.link_arguments("model.gguf_file", "data.gguf_file")


def main() -> None:
    LMCLI(CausalLMModule, LMDataModule, base_config="lm_base.yaml")


if __name__ == "__main__":
    main()
