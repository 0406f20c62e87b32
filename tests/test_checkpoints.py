"""Weights files users bring: wrappers unpacked, mismatches named, nothing unpickled as code."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from kd_core.checkpoints import CheckpointError, load_weights, read_state_dict
from kd_core.models import build_model

ARCH = {"width": 8, "depth": 1}


def teacher(num_classes: int = 10) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("convnet", num_classes, 1, ARCH)


class Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def payload_file(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.pt"
    torch.save({"model": teacher().state_dict(), "extra": Payload(marker)}, path)
    return path, marker


@pytest.mark.parametrize("wrap", [
    lambda sd: sd,
    lambda sd: {"model": sd, "epoch": 240, "best_acc": torch.tensor(79.4)},  # RepDistiller
    lambda sd: {"state_dict": sd},
    lambda sd: {f"module.{k}": v for k, v in sd.items()},  # DataParallel
])
def test_wrappers_and_prefixes_are_unpacked(tmp_path, wrap) -> None:
    model = teacher()
    torch.save(wrap(model.state_dict()), tmp_path / "t.pt")
    state = read_state_dict(tmp_path / "t.pt")
    fresh = build_model("convnet", 10, 1, ARCH)
    assert load_weights(fresh, state, "t.pt") == []
    for key, value in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value)


def test_checkpoint_key_picks_the_state_dict(tmp_path) -> None:
    torch.save({"ema": teacher().state_dict(), "model": teacher().state_dict()}, tmp_path / "t.pt")
    assert set(read_state_dict(tmp_path / "t.pt", "ema")) == set(teacher().state_dict())
    with pytest.raises(CheckpointError, match="no key 'nope'"):
        read_state_dict(tmp_path / "t.pt", "nope")


def test_mismatches_are_named(tmp_path) -> None:
    torch.save(teacher(100).state_dict(), tmp_path / "c100.pt")
    with pytest.raises(CheckpointError, match="100 classes in the checkpoint, 10 in the data"):
        load_weights(teacher(10), read_state_dict(tmp_path / "c100.pt"), "c100.pt")
    state = teacher().state_dict()
    state["stem.extra"] = torch.zeros(1)
    del state["head.fc.bias"]
    with pytest.raises(CheckpointError, match=r"missing keys head\.fc\.bias; unexpected keys stem\.extra"):
        load_weights(teacher(), state, "t.pt")
    wider = build_model("convnet", 10, 1, {"width": 16, "depth": 1}).state_dict()
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_weights(teacher(), wider, "wide.pt")


def test_a_new_head_for_another_class_count_is_allowed_where_asked(tmp_path) -> None:
    model = teacher(10)
    notes = load_weights(model, teacher(100).state_dict(), "c100.pt", new_head=True)
    assert notes and "new classifier head" in notes[0]
    torch.testing.assert_close(model.stem[0][0].weight, teacher(100).stem[0][0].weight)


def test_unreadable_truncated_and_code_carrying_files_are_refused(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="no such file"):
        read_state_dict(tmp_path / "absent.pt")
    torch.save(teacher().state_dict(), tmp_path / "t.pt")
    data = (tmp_path / "t.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="unreadable or truncated"):
        read_state_dict(tmp_path / "cut.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="unreadable or truncated"):
        read_state_dict(tmp_path / "text.pt")
    path, marker = payload_file(tmp_path)
    with pytest.raises(CheckpointError, match=r"refused, it holds a pickled object \(posix\.mkdir\)") as refused:
        read_state_dict(path)
    assert "weights_only" not in str(refused.value)  # never a hint to turn the protection off
    assert not marker.exists()
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(CheckpointError):
        read_state_dict(tmp_path / "plain.pkl")
    assert not marker.exists()
