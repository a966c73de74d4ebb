"""The pure parts of job identity and fencing: step directory names, who may claim a job's prefix,
which config changes make a checkpoint unusable, and the data position check."""

import pytest

from kubetune_contract.config import TrainerConfig
from kubetune_trainer import compat
from kubetune_trainer.errors import UserError
from kubetune_trainer.fence import AttemptToken, may_claim
from kubetune_trainer.manifest import LEGACY_ATTEMPT, parse_step_dir, step_dir_name
from kubetune_trainer.state import TrainState


def _cfg(**over) -> TrainerConfig:
    doc = {
        "job": {"name": "j", "namespace": "ns", "uid": "u-1"},
        "baseModel": {"uri": "org/model"},
        "dataset": {"uri": "s3://data/train.jsonl"},
        "method": "lora",
        "lora": {"r": 8},
        "training": {"maxSteps": 10},
        "checkpoints": {"uri": "s3://ckpt/base"},
        "output": {"uri": "s3://out/x"},
    }
    doc.update(over)
    return TrainerConfig.model_validate(doc)


def test_step_dirs_name_their_attempt_and_order_by_step_then_attempt() -> None:
    assert step_dir_name(123, 2) == "step-000000123-a2"
    assert parse_step_dir("step-000000123-a2") == (123, 2)
    assert parse_step_dir("step-000000123") == (123, LEGACY_ATTEMPT)  # the first layout still reads
    assert step_dir_name(123, LEGACY_ATTEMPT) == "step-000000123"
    assert parse_step_dir("step-12") is None and parse_step_dir("step-000000123-x2") is None
    assert sorted([(5, 1), (5, 0), (4, 3)], reverse=True)[0] == (5, 1)


def test_a_newer_attempt_is_never_displaced() -> None:
    a1, a2 = AttemptToken(1, "pod-1"), AttemptToken(2, "pod-2")
    assert may_claim(None, a1) and may_claim(a1, a2)
    assert not may_claim(a2, a1)  # the zombie of attempt 1 cannot take the prefix back
    assert may_claim(AttemptToken(2, "pod-old"), a2)  # a replacement pod of the same attempt
    assert AttemptToken.parse(a2.to_bytes("t")) == a2
    assert AttemptToken.parse(b"garbage") is None and AttemptToken.parse(b'{"format": "x"}') is None


def test_prefix_has_the_uid_and_resume_from_is_optional() -> None:
    cfg = _cfg()
    assert cfg.checkpoint_prefix == "s3://ckpt/base/ns/j/u-1" and cfg.output_prefix == "s3://out/x/ns/j/u-1"
    assert cfg.checkpoints.resume_from is None
    with pytest.raises(ValueError):
        _cfg(checkpoints={"uri": "s3://ckpt/base", "resumeFrom": "gs://elsewhere"})


def test_config_changes_that_break_a_checkpoint_are_named() -> None:
    saved = compat.fingerprint(_cfg())
    assert compat.differences(saved, compat.fingerprint(_cfg())) == []
    assert compat.differences(saved, compat.fingerprint(_cfg(lora={"r": 8, "alpha": 64, "dropout": 0.2}))) == []
    diffs = compat.differences(saved, compat.fingerprint(_cfg(lora={"r": 16})))
    assert diffs == ["lora.r: checkpoint 8, this job 16 (the adapter matrices change shape)"]
    assert [d.split(":")[0] for d in compat.differences(saved, compat.fingerprint(_cfg(method="full")))] == [
        "method",
        "lora.r",
        "lora.targetModules",
    ]
    assert compat.differences(None, saved) == []  # a checkpoint from before fingerprints
    with pytest.raises(UserError, match=r"s3://c/step-000000004-a0 cannot be resumed by this job: lora\.r"):
        compat.check_config("s3://c/step-000000004-a0", {"config": saved}, _cfg(lora={"r": 4}))


def test_a_position_past_a_smaller_dataset_is_a_user_error_not_an_index_error() -> None:
    st = TrainState(global_step=8, epoch=0, micro_in_epoch=8, sequences_in_epoch=16, global_micro_batch=2)
    st.dataset_sha256 = "a" * 64
    compat.check_position("u", st, micro_per_epoch=20, global_micro=2, sha256="a" * 64)  # fits
    with pytest.raises(UserError, match="micro-batch 8 of epoch 0.*only 3 micro-batches per epoch .a different"):
        compat.check_position("u", st, micro_per_epoch=3, global_micro=2, sha256="b" * 64)
    # another batch layout: the position is kept in sequences (16 sequences = 4 micro-batches of 4)
    compat.check_position("u", st, micro_per_epoch=5, global_micro=4, sha256="a" * 64)
    with pytest.raises(UserError):
        compat.check_position("u", st, micro_per_epoch=4, global_micro=4, sha256="a" * 64)
