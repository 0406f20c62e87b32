from __future__ import annotations

import dataclasses
import json
import multiprocessing
import time
from pathlib import Path

import pytest
import torch

from kd_core.checkpoints import sha256_file
from kd_core.models import build_model
from kd_core.stages import (
    META_FILE,
    QUARANTINE,
    WEIGHTS_HASH,
    CorruptStageError,
    StageSpec,
    StageStore,
    TrainedStage,
)

ARCH = {"name": "convnet", "args": {"width": 4, "depth": 1}}
DATA = {"name": "digits", "seed": 0, "val_fraction": 0.15, "test_fraction": 0.2}
RECIPE = {"epochs": 3, "lr": 0.05}


def spec(**changes) -> StageSpec:
    return dataclasses.replace(StageSpec("teacher", ARCH, DATA, RECIPE), **changes)


def test_key_is_stable_and_covers_every_determinant() -> None:
    assert spec().key == spec().key == StageSpec("teacher", dict(ARCH), dict(DATA), dict(RECIPE)).key
    assert spec(role="baseline").key == spec().key  # a label, not a determinant
    variants = [
        spec(arch={"name": "convnet", "args": {"width": 8, "depth": 1}}),
        spec(data={**DATA, "seed": 1}),
        spec(recipe={**RECIPE, "lr": 0.1}),
        spec(seed=1),
        spec(method={"name": "kd", "params": {}}),
        spec(parents=(spec(role="assistant", seed=5),)),
    ]
    keys = {v.key for v in variants} | {spec().key}
    assert len(keys) == len(variants) + 1
    # a parent counts through its key: changing the parent changes the child
    assert spec(parents=(spec(seed=1),)).key != spec(parents=(spec(seed=2),)).key


def train_logged(stage: StageSpec, log: Path, seconds: float = 0.0) -> TrainedStage:
    with log.open("a") as f:
        f.write(f"{stage.key}\n")
    time.sleep(seconds)
    model = build_model("convnet", 10, 1, stage.arch["args"])
    return TrainedStage(model.state_dict(), 10, 1, {"test_acc": 0.5}, {"run_id": "r1"})


def test_trains_once_then_reuses(tmp_path) -> None:
    store, log = StageStore(tmp_path), tmp_path / "log"
    record, trained = store.get_or_train(spec(), lambda s: train_logged(s, log))
    again, trained_again = store.get_or_train(spec(), lambda s: train_logged(s, log))
    assert (trained, trained_again) == (True, False)
    assert log.read_text().splitlines() == [spec().key]
    assert again.run_id == "r1" and again.meta["metrics"] == {"test_acc": 0.5}
    model = again.load_model()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, record.load_model().state_dict()[key])


def _worker(root: str, log: str, barrier) -> None:
    barrier.wait()
    StageStore(root).get_or_train(spec(), lambda s: train_logged(s, Path(log), seconds=1.0))


def test_concurrent_processes_train_a_stage_once(tmp_path) -> None:
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(3)
    log = tmp_path / "log"
    workers = [context.Process(target=_worker, args=(str(tmp_path), str(log), barrier))
               for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [w.exitcode for w in workers] == [0, 0, 0]
    assert log.read_text().splitlines() == [spec().key]
    assert StageStore(tmp_path).get(spec().key) is not None


def test_an_incomplete_leftover_is_retrained(tmp_path) -> None:
    store, log = StageStore(tmp_path), tmp_path / "log"
    leftover = tmp_path / "stages" / spec().key
    leftover.mkdir(parents=True)
    (leftover / "weights.pt").write_bytes(b"truncated")
    assert store.get(spec().key) is None
    record, trained = store.get_or_train(spec(), lambda s: train_logged(s, log))
    assert trained and (record.path / META_FILE).exists()
    record.load_model()


def damage(path: Path, how: str) -> None:
    """Damage a stored stage the ways a disk, a crash or a person does."""
    weights, meta = path / "weights.pt", path / META_FILE
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[:200])
    elif how == "other_arch":
        torch.save(build_model("convnet", 10, 1, {"width": 16, "depth": 1}).state_dict(), weights)
    elif how == "no_weights":
        weights.unlink()
    elif how == "bad_meta":
        meta.write_text('{"key": ')
    elif how == "legacy_other_arch":  # published before hashes were recorded, then overwritten
        recorded = json.loads(meta.read_text())
        del recorded[WEIGHTS_HASH]
        meta.write_text(json.dumps(recorded))
        damage(path, "other_arch")


DAMAGES = ["truncated", "other_arch", "no_weights", "bad_meta", "legacy_other_arch"]


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_stage_is_named_set_aside_and_trained_again(tmp_path, how) -> None:
    store, log = StageStore(tmp_path), tmp_path / "log"
    record, _ = store.get_or_train(spec(), lambda s: train_logged(s, log))
    assert record.meta[WEIGHTS_HASH] == sha256_file(record.path / "weights.pt")  # written at publish time
    damage(record.path, how)
    with pytest.raises(CorruptStageError) as raised:
        store.get(spec().key)
    message = str(raised.value)
    assert spec().key in message and str(record.path) in message and f"rm -r {record.path}" in message
    again, trained = store.get_or_train(spec(), lambda s: train_logged(s, log))
    assert trained and log.read_text().splitlines() == [spec().key] * 2
    again.load_model()
    (aside,) = [p for p in (tmp_path / "stages").iterdir() if QUARANTINE in p.name]
    assert aside.name.startswith(spec().key) and (aside / "damage.txt").read_text().strip()
    assert store.get(spec().key) is not None  # the new one is intact


def test_a_legacy_stage_without_a_hash_is_still_used(tmp_path) -> None:
    store, log = StageStore(tmp_path), tmp_path / "log"
    record, _ = store.get_or_train(spec(), lambda s: train_logged(s, log))
    meta = json.loads((record.path / META_FILE).read_text())
    del meta[WEIGHTS_HASH]
    (record.path / META_FILE).write_text(json.dumps(meta))
    _, trained = store.get_or_train(spec(), lambda s: train_logged(s, log))
    assert not trained and store.get(spec().key).content_key == spec().key


def test_a_stage_whose_weights_do_not_fit_its_record_fails_by_name(tmp_path) -> None:
    """Hash and weights agree, but the metadata names another architecture: loading names the stage,
    and a caller that could not load it gets it trained again (`check_load`)."""
    store, log = StageStore(tmp_path), tmp_path / "log"
    record, _ = store.get_or_train(spec(), lambda s: train_logged(s, log))
    damage(record.path, "other_arch")
    meta = json.loads((record.path / META_FILE).read_text())
    meta[WEIGHTS_HASH] = sha256_file(record.path / "weights.pt")
    (record.path / META_FILE).write_text(json.dumps(meta))
    stale = store.get(spec().key)
    with pytest.raises(CorruptStageError, match=f"stage {spec().key} .* weights.pt does not load"):
        stale.load_model()
    again, trained = store.get_or_train(spec(), lambda s: train_logged(s, log), check_load=True)
    assert trained and again.load_model() is not None
