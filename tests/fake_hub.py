"""Local stand-ins for Hub datasets, laid out like the Hub repositories, for tests with no network.

A test fixture (``tests/dist/ex_cases.py`` writes them into its work folder), not part of the examples.

``datasets.load_dataset("wikitext", "wikitext-103-raw-v1")`` resolves a local folder named ``wikitext`` in the
working directory before it asks the Hub, so a folder with the Hub's layout (a README declaring the configs,
parquet files per split) runs the examples' real Hub-name code path offline.
"""

from __future__ import annotations

from pathlib import Path

import datasets


def _write_repo(root: Path, name: str, config: str, splits: dict[str, datasets.Dataset]) -> Path:
    repo = root / name
    (repo / config).mkdir(parents=True, exist_ok=True)
    lines = ["---", "configs:", f"- config_name: {config}", "  data_files:"]
    for split, data in splits.items():
        data.to_parquet(str(repo / config / f"{split}-00000-of-00001.parquet"))
        lines += [f"  - split: {split}", f"    path: {config}/{split}-*.parquet"]
    (repo / "README.md").write_text(
        "\n".join(lines + ["---", f"Local stand-in for the Hub dataset {name}.", ""])
    )
    return repo


def make_wikitext(root: Path, train_lines: list[str], val_lines: list[str]) -> Path:
    """``<root>/wikitext`` with config ``wikitext-103-raw-v1`` (splits train/validation, column ``text``)."""
    return _write_repo(root, "wikitext", "wikitext-103-raw-v1", {
        "train": datasets.Dataset.from_dict({"text": train_lines}),
        "validation": datasets.Dataset.from_dict({"text": val_lines}),
    })  # fmt: skip


def make_wmt16(root: Path, pairs: dict[str, list[tuple[str, str]]]) -> Path:
    """``<root>/wmt16`` with config ``de-en``: splits of ``translation`` = ``{"de": ..., "en": ...}`` rows."""
    return _write_repo(root, "wmt16", "de-en", {
        split: datasets.Dataset.from_dict({"translation": [{"de": de, "en": en} for de, en in rows]})
        for split, rows in pairs.items()
    })  # fmt: skip
