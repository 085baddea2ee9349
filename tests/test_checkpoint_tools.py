"""Checkpoint tools without DeepSpeed processes: completeness checks, the CLI's errors, Lightning ``.ckpt`` files.

``fake_checkpoint`` writes the files ``engine.save_checkpoint`` writes for ZeRO-1/2 (one ``mp_rank_00_model_states.pt``
with ``dp_world_size`` and ``param_shapes``, one ``zero_pp_rank_R_mp_rank_00_optim_states.pt`` per rank), with the
faults a crash leaves: a rank's file missing or cut in half.

The Lightning ``.ckpt`` cases train a small module with ``LookaheadCallback`` on one CPU device, save with
``trainer.save_checkpoint`` and compare ``slow-weights`` against the plain reference loop of tests/reference.py
run on the same batches.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lookahead_dist.checkpoint import main
from lookahead_dist.deepspeed.checkpoint import (
    IncompleteCheckpointError,
    check_checkpoint,
    check_tag,
    last_complete_tag,
    resolve_load_tag,
)
from lookahead_dist.lightning.checkpoint import lightning_slow_state_dict
from tests.reference import ReferenceLookahead


def fake_checkpoint(root: Path, tags: dict[str, str], latest: str | None = None, world: int = 2) -> Path:
    """Tag folders of a ZeRO-2 save; kind per tag: ok | truncated_rank1 | missing_last | missing_model."""
    root.mkdir(parents=True, exist_ok=True)
    for tag, kind in tags.items():
        folder = root / tag
        folder.mkdir()
        steps = int(re.sub(r"\D", "", tag) or 0)
        if kind != "missing_model":
            head = {"dp_world_size": world, "mp_world_size": 1, "optimizer": None,
                    "param_shapes": [{"w": torch.Size([4])}], "global_steps": steps}  # fmt: skip
            torch.save(head, folder / "mp_rank_00_model_states.pt")
        for rank in range(world):
            if kind == "missing_last" and rank == world - 1:
                continue
            path = folder / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
            torch.save({"optimizer_state_dict": {"zero_stage": 2, "rank": torch.full((64,), float(rank))}}, path)
            if kind == "truncated_rank1" and rank == 1:
                data = path.read_bytes()
                path.write_bytes(data[: len(data) // 2])
    if latest is not None:
        (root / "latest").write_text(latest)
    return root


def error_line(err: str) -> str:
    """The CLI's one error line (stderr may also hold unrelated logging noise from earlier Lightning runs)."""
    lines = [line for line in err.splitlines() if line.startswith("python -m lookahead_dist.checkpoint")]
    assert len(lines) == 1, err
    assert "lookahead_dist/deepspeed/checkpoint.py" not in err, "no traceback of ours"
    return lines[0]


# ------------------------------------------------------------------ completeness
def test_check_tag_finds_missing_and_truncated_rank_files(tmp_path: Path) -> None:
    root = fake_checkpoint(tmp_path / "c", {"global_step2": "ok", "global_step4": "missing_last",
                                            "global_step6": "truncated_rank1", "global_step8": "missing_model"})  # fmt: skip
    assert check_tag(root / "global_step2").complete
    assert check_tag(root / "global_step2").world_size == 2
    assert check_tag(root / "global_step4").problems == ["zero_pp_rank_1_mp_rank_00_optim_states.pt is missing"]
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt is truncated" in check_tag(root / "global_step6").problems[0]
    assert "no *_model_states.pt" in check_tag(root / "global_step8").problems[0]
    assert last_complete_tag(root) == "global_step2"
    latest, reports = check_checkpoint(root)
    assert latest is None and [r.tag for r in reports] == ["global_step8", "global_step2", "global_step4",
                                                            "global_step6"]  # fmt: skip


def test_last_complete_tag_is_the_newest_complete_step(tmp_path: Path) -> None:
    root = fake_checkpoint(tmp_path / "c", {"global_step10": "ok", "global_step9": "ok", "global_step12": "missing_last"},
                           latest="global_step12")  # fmt: skip
    assert last_complete_tag(root) == "global_step10"  # by saved step, not by name
    with pytest.raises(IncompleteCheckpointError, match=r"named by the 'latest' file.*'global_step10'"):
        resolve_load_tag(root)
    assert resolve_load_tag(root, "global_step9") == "global_step9"
    with pytest.raises(IncompleteCheckpointError, match="given as tag="):
        resolve_load_tag(root, "global_step12", fallback=False)


def test_universal_folder_is_reported_but_never_a_fallback(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = fake_checkpoint(tmp_path / "c", {"global_step4": "ok", "global_step8": "missing_last"}, latest="global_step8")
    universal = root / "global_step8_universal"
    (universal / "zero").mkdir(parents=True)
    torch.save({"dp_world_size": 2}, universal / "mp_rank_00_model_states.pt")
    assert check_tag(universal).complete and check_tag(universal).universal
    assert last_complete_tag(root) == "global_step4"
    assert main(["check", str(root)]) == 1
    out = capsys.readouterr().out
    assert "global_step8_universal: complete (universal checkpoint)" in out and "'global_step4'" in out


def test_resolve_without_latest_returns_none(tmp_path: Path) -> None:
    root = fake_checkpoint(tmp_path / "c", {"global_step1": "ok"})
    assert resolve_load_tag(root) is None


def test_nothing_complete_cannot_fall_back(tmp_path: Path) -> None:
    root = fake_checkpoint(tmp_path / "c", {"global_step3": "truncated_rank1"}, latest="global_step3")
    with pytest.raises(IncompleteCheckpointError, match="No complete tag was found"):
        resolve_load_tag(root, fallback=True)


# ------------------------------------------------------------------ CLI
def test_cli_check_reports_each_tag(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = fake_checkpoint(tmp_path / "c", {"global_step4": "ok", "global_step8": "truncated_rank1"},
                           latest="global_step8")  # fmt: skip
    assert main(["check", str(root)]) == 1
    out = capsys.readouterr().out
    assert "global_step4: complete (2 rank(s), step 4)" in out
    assert "global_step8 (latest): INCOMPLETE: zero_pp_rank_1_mp_rank_00_optim_states.pt is truncated" in out
    assert "resume from the last complete one, 'global_step4'" in out
    (root / "latest").write_text("global_step4")
    assert main(["check", str(root)]) == 0
    assert main(["check", str(root), "--tag", "global_step8"]) == 1


def test_cli_check_nothing_complete(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = fake_checkpoint(tmp_path / "c", {"global_step4": "missing_last"}, latest="global_step4")
    assert main(["check", str(root)]) == 2
    assert "no complete tag" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["slow-weights", "to-universal"])
def test_cli_missing_highest_rank_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture, command: str) -> None:
    root = fake_checkpoint(tmp_path / "c", {"global_step4": "ok", "global_step8": "missing_last"}, latest="global_step8")
    argv = [command, str(root)] + ([str(tmp_path / "out.pt")] if command == "slow-weights" else [])
    assert main(argv) == 2
    err = error_line(capsys.readouterr().err)
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt is missing" in err
    assert "pass --tag 'global_step4'" in err


# ------------------------------------------------------------------ Lightning .ckpt
class Net(nn.Module):
    def __init__(self, norm: bool) -> None:
        super().__init__()
        # No bias before the norm: its gradient would be ~0 and Adam would amplify rounding noise.
        self.l1 = nn.Linear(4, 8, bias=not norm)
        self.norm = nn.BatchNorm1d(8) if norm else nn.Identity()
        self.l2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.norm(self.l1(x))))


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(8, 4, generator=g), torch.randn(8, 3, generator=g)) for _ in range(7)]


def _train_lightning(tmp_path: Path, norm: bool) -> Path:
    pl = pytest.importorskip("lightning.pytorch")
    from lookahead_dist.callbacks import LookaheadCallback

    class Module(pl.LightningModule):  # type: ignore[name-defined,misc]
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = Net(norm)

        def training_step(self, batch: Any, _: int) -> torch.Tensor:
            x, y = batch
            return ((self.net(x) - y) ** 2).mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=0.05)

    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=7, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[LookaheadCallback(k=3, alpha=0.5)])  # fmt: skip
    trainer.fit(Module(), train_dataloaders=torch.utils.data.DataLoader(_batches(), batch_size=None))  # type: ignore[arg-type]
    path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(path)
    return path


def _reference_slow(norm: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    net = Net(norm)
    opt = torch.optim.AdamW(net.parameters(), lr=0.05)
    ref = ReferenceLookahead(opt, 3, 0.5)
    for x, y in _batches():
        ((net(x) - y) ** 2).mean().backward()
        ref.step()
        opt.zero_grad()
    names = {p: n for n, p in net.named_parameters()}
    return {f"net.{names[p]}": s for p, s in ref.slow.items()}


def test_slow_weights_of_a_lightning_ckpt(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ckpt = _train_lightning(tmp_path, norm=False)
    out = tmp_path / "slow.pt"
    assert main(["slow-weights", str(ckpt), str(out)]) == 0
    got = torch.load(out)
    expected = _reference_slow(norm=False)
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert (got[name] - value).abs().max().item() <= 1e-6, name
    # 7 steps with k=3: φ moved twice and θ has taken one more step, so φ is not θ.
    theta = torch.load(ckpt, weights_only=False)["state_dict"]
    assert (got["net.l1.weight"] - theta["net.l1.weight"]).abs().max().item() > 1e-4


def test_lightning_ckpt_with_ambiguous_shapes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ckpt = _train_lightning(tmp_path, norm=True)  # BatchNorm: weight, bias, running_mean, running_var all (8,)
    out = tmp_path / "slow.pt"
    assert main(["slow-weights", str(ckpt), str(out)]) == 2
    assert "--param-names" in error_line(capsys.readouterr().err)
    names = tmp_path / "names.txt"
    order = ["net.l1.weight", "net.norm.weight", "net.norm.bias", "net.l2.weight", "net.l2.bias"]
    names.write_text("\n".join(order))
    assert main(["slow-weights", str(ckpt), str(out), "--param-names", str(names)]) == 0
    got, expected = torch.load(out), _reference_slow(norm=True)
    for name, value in expected.items():
        assert (got[name] - value).abs().max().item() <= 1e-6, name
    assert "net.norm.running_mean" in got  # buffers kept, as zero_to_fp32 does
    with pytest.raises(ValueError, match="must name the 5 optimizer parameters"):
        lightning_slow_state_dict(ckpt, param_names=order[:4])


def test_slow_weights_refuses_other_files_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, path)
    assert main(["slow-weights", str(path), str(tmp_path / "o.pt")]) == 2
    assert "is not a Lightning checkpoint with optimizer state" in error_line(capsys.readouterr().err)
