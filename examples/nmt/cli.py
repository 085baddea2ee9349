"""Command line: ``python -m examples.nmt.cli fit --config configs/nmt_cpu.yaml`` (see examples/README.md)."""

from __future__ import annotations

from examples.common.cli import ExampleCLI
from examples.nmt.data import TranslationDataModule
from examples.nmt.model import TranslationModule


class NMTCLI(ExampleCLI):
    def add_arguments_to_parser(self, parser) -> None:  # type: ignore[no-untyped-def]
        parser.link_arguments("data.vocab_size", "model.vocab_size")
        parser.link_arguments("data.max_len", "model.max_len")


def main() -> None:
    NMTCLI(TranslationModule, TranslationDataModule, base_config="nmt_base.yaml")


if __name__ == "__main__":
    main()
