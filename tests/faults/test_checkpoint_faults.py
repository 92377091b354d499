"""Findings 1, 2, 8: a checkpoint proves it is whole before it is resumed from.

The writer here is a stand-in for the policy's (it writes files of known content), so
every fault is exact: 4 KiB overwritten in place (size unchanged), a truncated file, a
save that died before its manifest, a full disk mid-save. What the user sees (the
reason, the one-line error) and what is kept (the previous checkpoint, newest) are
asserted; the trainer-level versions run in test_trainer_faults.py (faults_slow).
"""

from __future__ import annotations

import errno
import os

import pytest

from dapo_megatron.config import load_config
from dapo_megatron.controller import checkpoint as ckpt_io


def _cfg(root, keep_last=3):
    return load_config(None, [f"checkpoint.dir={root}", f"checkpoint.keep_last={keep_last}"])


def _writer(step):
    def write(d):
        os.makedirs(os.path.join(d, "model"))
        with open(os.path.join(d, "model", "shard.bin"), "wb") as f:
            f.write(bytes([step % 251]) * 20000)
        with open(os.path.join(d, "common.pt"), "wb") as f:
            f.write(b"step %d" % step)
    return write


def _saved(root, *steps, keep_last=3):
    cfg = _cfg(root, keep_last)
    for s in steps:
        ckpt_io.save(cfg, s, _writer(s))
    return cfg


def test_bit_rot_is_detected_and_resume_takes_the_previous_checkpoint(tmp_path):
    _saved(tmp_path, 1, 2)
    shard = tmp_path / "step_000002" / "model" / "shard.bin"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:  # 4 KiB overwritten in place: same size, different bytes
        f.seek(8192)
        f.write(b"\xff" * 4096)
    assert shard.stat().st_size == size
    assert "does not match its SHA-256" in ckpt_io.verify(str(tmp_path / "step_000002"))
    path, skipped = ckpt_io.newest_verified(str(tmp_path))
    assert path == str(tmp_path / "step_000001")
    assert [os.path.basename(p) for p, _ in skipped] == ["step_000002"]
    # The size-only check (fast) cannot see it; the checksum can.
    assert ckpt_io.verify(str(tmp_path / "step_000002"), checksums=False) is None


def test_truncated_and_partial_checkpoints_are_skipped_with_their_reason(tmp_path):
    _saved(tmp_path, 1, 2, 3)
    with open(tmp_path / "step_000003" / "model" / "shard.bin", "r+b") as f:
        f.truncate(100)
    os.remove(tmp_path / "step_000002" / ckpt_io.MANIFEST)  # died before the manifest
    path, skipped = ckpt_io.newest_verified(str(tmp_path))
    assert path == str(tmp_path / "step_000001")
    reasons = dict((os.path.basename(p), r) for p, r in skipped)
    assert "100 bytes, the manifest says 20000" in reasons["step_000003"]
    assert "no manifest.json" in reasons["step_000002"]


def test_manifest_is_written_last_and_lists_every_file(tmp_path):
    _saved(tmp_path, 5)
    import json

    manifest = json.load(open(tmp_path / "step_000005" / ckpt_io.MANIFEST))
    assert manifest["step"] == 5
    assert sorted(manifest["files"]) == ["common.pt", os.path.join("model", "shard.bin")]
    assert manifest["files"]["common.pt"]["bytes"] == len(b"step 5")


def test_rotation_never_deletes_the_checkpoint_just_written(tmp_path):
    """After resuming at step 1 past a corrupt step 3, saving step 2 with keep_last=1 must
    keep step 2 (the newest that verifies), though step 3 sorts after it."""
    cfg = _saved(tmp_path, 1, 3)
    with open(tmp_path / "step_000003" / "common.pt", "wb") as f:
        f.write(b"garbage")
    cfg.checkpoint.keep_last = 1
    ckpt_io.save(cfg, 2, _writer(2))
    assert ckpt_io.newest_verified(str(tmp_path))[0] == str(tmp_path / "step_000002")
    assert not (tmp_path / "step_000001").exists()


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    # what torch.save says on a full disk (caffe2/serialize/inline_container.cc)
    RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing "
                 "file data/0: file write failed"),
])
def test_full_disk_names_itself_removes_the_partial_and_keeps_the_previous(tmp_path, error):
    cfg = _saved(tmp_path, 1)

    def write_then_fill_the_disk(d):
        os.makedirs(d)
        with open(os.path.join(d, "big.bin"), "wb") as f:
            f.write(b"\0" * 50000)
        raise error

    with pytest.raises(ckpt_io.CheckpointSaveError) as info:
        ckpt_io.save(cfg, 2, write_then_fill_the_disk)
    message = str(info.value)
    assert "\n" not in message
    assert "checkpoint at step 2 failed: disk full" in message
    assert "step_000001 stays the newest checkpoint" in message
    assert sorted(os.listdir(tmp_path)) == ["step_000001"]  # the partial save is gone
    assert ckpt_io.newest_verified(str(tmp_path))[0] == str(tmp_path / "step_000001")


def test_other_save_failures_say_what_failed_in_one_line(tmp_path):
    cfg = _saved(tmp_path, 1)

    def broken(d):
        os.makedirs(d)
        raise ValueError("tensor model.x has no storage\n  (detail)\nlast line")

    with pytest.raises(ckpt_io.CheckpointSaveError, match=r"step 2 failed: ValueError: last line") as info:
        ckpt_io.save(cfg, 2, broken)
    assert "\n" not in str(info.value)


def test_a_rerun_on_a_still_full_disk_refuses_before_training(tmp_path, monkeypatch):
    """No crash loop: the partial save of a killed run is removed, and a disk that cannot
    hold one more checkpoint is refused at start, not after the first training interval."""
    _saved(tmp_path, 1)
    os.makedirs(tmp_path / "step_000002.tmp")
    (tmp_path / "step_000002.tmp" / "half.bin").write_bytes(b"\0" * 1000)
    assert ckpt_io.remove_partial_saves(str(tmp_path)) == ["step_000002.tmp"]
    monkeypatch.setattr(ckpt_io, "free_bytes", lambda _: 10)
    with pytest.raises(ckpt_io.CheckpointSaveError, match="checkpoint.dir: .* has 0.00 GiB free"):
        ckpt_io.check_free_space(str(tmp_path))
    monkeypatch.setattr(ckpt_io, "free_bytes", lambda _: 10**12)
    ckpt_io.check_free_space(str(tmp_path))
