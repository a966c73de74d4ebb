"""Job identity, fencing and the final state, through real trainer processes and a real MinIO.

- fencing: an old attempt kept running (a zombie: its pod object gone, its container alive) while
  a new attempt of the same job starts: the new one claims the job's prefix, the old one gives up
  at its next checkpoint without committing, and none of the new attempt's checkpoints is deleted;
- identity: a job deleted and re-applied under the same name (a new UID) trains from scratch and
  leaves the old incarnation's checkpoints alone; `checkpoints.resumeFrom` continues an old one,
  and a checkpoint that does not fit (lora.r changed, a smaller dataset) is a user error naming it;
- final state: the output bucket vanishing before the export leaves the last step's checkpoint and
  an actionable message; a new job resuming from it only exports (no step trained again).
"""

import json

import pytest

from kubetune_contract.progress import ExitCode, ProgressRecord
from kubetune_dev.tiny_model import instruction_records, write_jsonl
from kubetune_dev.trainer_inputs import trainer_config, trainer_env
from tests.fixtures.tiny_model import events, start_trainer, wait_for_event

pytestmark = pytest.mark.s3


def _keys(client, bucket, prefix):
    out = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out += [o["Key"] for o in page.get("Contents", [])]
    return sorted(out)


def _committed(client, bucket, prefix) -> set[tuple[int, int]]:
    """(step, attempt) of every committed checkpoint under a job prefix."""
    out = set()
    for k in _keys(client, bucket, prefix + "checkpoints/"):
        if k.endswith("/MANIFEST.json"):
            _, step, attempt = k.split("/")[-2].split("-")
            out.add((int(step), int(attempt[1:])))
    return out


def _message(tmp_dir) -> str:
    return ProgressRecord.model_validate_json((tmp_dir / "termination-log").read_text()).message or ""


def test_zombie_attempt_is_fenced_and_deletes_nothing_of_the_new_one(tmp_path, minio, tiny_model_dir):
    bucket = minio.make_bucket()
    data = write_jsonl(tmp_path / "train.jsonl", instruction_records(80, seed=3))
    cfg = trainer_config(
        bucket=bucket,
        endpoint=minio.endpoint,
        model_dir=tiny_model_dir,
        data_uri=str(data),
        name="zz",
        training={"maxSteps": 40, "batchSize": 2},
        checkpoints={"everySteps": 3, "keepLast": 2},
    )
    old_log, new_log = tmp_path / "a0.log", tmp_path / "a1.log"
    old_env = trainer_env(
        tmp_path / "a0",
        cfg,
        minio.env(),
        KUBETUNE_ATTEMPT=0,
        KUBETUNE_POD_UID="pod-a0",
        KUBETUNE_STEP_DELAY_SECONDS=0.6,
    )
    old = start_trainer(old_env, old_log)
    wait_for_event(old, old_log, lambda e: e.get("event") == "checkpoint_durable" and e["step"] >= 3)
    new_env = trainer_env(
        tmp_path / "a1",
        cfg,
        minio.env(),
        KUBETUNE_ATTEMPT=1,
        KUBETUNE_POD_UID="pod-a1",
        KUBETUNE_STEP_DELAY_SECONDS=0.05,
    )
    new = start_trainer(new_env, new_log)  # the old one keeps running: a zombie
    claimed = wait_for_event(new, new_log, lambda e: e.get("event") == "fence_claimed")
    assert claimed["previous"] == "attempt 0 (pod pod-a0)"

    assert old.wait(60) == ExitCode.RETRIABLE, old_log.read_text()[-3000:]
    assert new.wait(120) == ExitCode.SUCCESS, new_log.read_text()[-3000:]

    fenced = events(old_log, "fenced")
    assert fenced and fenced[0]["owner"] == "attempt 1 (pod pod-a1)" and "committing" in fenced[0]["action"]
    assert "a newer attempt took over" in _message(tmp_path / "a0")
    # the zombie committed nothing once the new attempt owned the prefix, and exported nothing
    assert all(e["time"] < claimed["time"] for e in events(old_log, "checkpoint_durable"))
    assert not events(old_log, "output_uploaded")

    # every checkpoint the new attempt committed is there, unless it pruned it itself
    prefix = "checkpoints/ns/zz/uid-zz/"
    durable = {e["step"] for e in events(new_log, "checkpoint_durable")}
    pruned = {
        int(e["message"].split("step=")[1].split()[0])
        for e in events(new_log, "log")
        if e.get("message", "").startswith("checkpoint pruned") and "attempt=1" in e["message"]
    }
    ours = {s for s, a in _committed(minio.client(), bucket, prefix) if a == 1}
    assert 40 in ours and ours == durable - pruned, (durable, pruned, ours)
    owner = json.loads(minio.client().get_object(Bucket=bucket, Key=prefix + "owner.json")["Body"].read())
    assert (owner["attempt"], owner["podUID"]) == (1, "pod-a1")


def test_recreated_job_starts_fresh_and_resume_from_checks_fit(tmp_path, minio, tiny_model_dir):
    bucket = minio.make_bucket()
    data = write_jsonl(tmp_path / "train.jsonl", instruction_records(80, seed=4))
    small = write_jsonl(tmp_path / "small.jsonl", instruction_records(3, seed=5))

    def cfg(uid, data_uri=data, lora=None, **ck):
        c = trainer_config(
            bucket=bucket,
            endpoint=minio.endpoint,
            model_dir=tiny_model_dir,
            data_uri=str(data_uri),
            name="same",
            training={"maxSteps": 8, "batchSize": 2},
            checkpoints={"everySteps": 4, "keepLast": 3, **ck},
            lora=lora,
        )
        c["job"]["uid"] = uid
        return c

    def run(tag, c):
        log = tmp_path / f"{tag}.log"
        return start_trainer(trainer_env(tmp_path / tag, c, minio.env()), log), log

    first, first_log = run("first", cfg("uid-1"))
    assert first.wait(120) == ExitCode.SUCCESS, first_log.read_text()[-3000:]
    client = minio.client()
    old = _committed(client, bucket, "checkpoints/ns/same/uid-1/")
    assert (8, 0) in old

    # deleted and re-applied (same name, new UID): trains from scratch, the old checkpoints stay
    old_source = f"s3://{bucket}/checkpoints/ns/same/uid-1"
    again, again_log = run("again", cfg("uid-2"))
    # the same old checkpoint through resumeFrom, with lora.r changed / with a smaller dataset
    rank, rank_log = run("rank", cfg("uid-3", lora={"r": 4}, resumeFrom=old_source))
    shrunk, shrunk_log = run(
        "shrunk", cfg("uid-4", data_uri=small, resumeFrom=f"{old_source}/checkpoints/step-000000004-a0")
    )
    assert again.wait(120) == ExitCode.SUCCESS, again_log.read_text()[-3000:]
    assert rank.wait(120) == ExitCode.USER_ERROR, rank_log.read_text()[-3000:]
    assert shrunk.wait(120) == ExitCode.USER_ERROR, shrunk_log.read_text()[-3000:]

    assert events(again_log, "fresh_start") and not events(again_log, "resumed")
    assert sorted(e["step"] for e in events(again_log, "step")) == list(range(1, 9))
    assert _committed(client, bucket, "checkpoints/ns/same/uid-1/") == old
    assert f"{bucket}/output/ns/same/uid-2" in (
        ProgressRecord.model_validate_json((tmp_path / "again" / "termination-log").read_text()).output_uri or ""
    )

    msg = _message(tmp_path / "rank")
    assert "lora.r: checkpoint 8, this job 4" in msg and "step-000000008-a0" in msg, msg
    msg = _message(tmp_path / "shrunk")
    assert "micro-batches per epoch" in msg and "a different dataset" in msg and "step-000000004-a0" in msg, msg
    assert "IndexError" not in shrunk_log.read_text()


def test_output_failure_keeps_the_final_checkpoint_and_a_new_job_only_exports(tmp_path, minio, tiny_model_dir):
    bucket, out_bucket = minio.make_bucket(), minio.make_bucket("out")
    data = write_jsonl(tmp_path / "train.jsonl", instruction_records(40, seed=6))

    def cfg(name, **ck):
        return trainer_config(
            bucket=bucket,
            endpoint=minio.endpoint,
            model_dir=tiny_model_dir,
            data_uri=str(data),
            name=name,
            training={"maxSteps": 6, "batchSize": 2},
            checkpoints={"everySteps": 4, "keepLast": 2, **ck},
            output={"uri": f"s3://{out_bucket}/models"},
        )

    log = tmp_path / "fin.log"
    proc = start_trainer(trainer_env(tmp_path / "fin", cfg("fin"), minio.env(), KUBETUNE_STEP_DELAY_SECONDS=0.3), log)
    wait_for_event(proc, log, lambda e: e.get("event") == "step" and e["step"] >= 1)
    client = minio.client()
    client.delete_bucket(Bucket=out_bucket)  # the output store goes away while the job trains
    assert proc.wait(120) == ExitCode.USER_ERROR, log.read_text()[-3000:]

    final = f"s3://{bucket}/checkpoints/ns/fin/uid-fin/checkpoints/step-000000006-a0"
    msg = _message(tmp_path / "fin")
    assert f"s3://{out_bucket}/models/ns/fin/uid-fin/" in msg and "s3:PutObject" in msg, msg
    assert f"checkpoints.resumeFrom: {final}" in msg, msg
    assert (6, 0) in _committed(client, bucket, "checkpoints/ns/fin/uid-fin/")

    client.create_bucket(Bucket=out_bucket)  # fixed; a new job exports the finished training
    log2 = tmp_path / "fin2.log"
    proc2 = start_trainer(trainer_env(tmp_path / "fin2", cfg("fin2", resumeFrom=final), minio.env()), log2)
    assert proc2.wait(120) == ExitCode.SUCCESS, log2.read_text()[-3000:]
    assert events(log2, "export_only") and not events(log2, "step")
    card_key = "models/ns/fin2/uid-fin2/model_card.json"
    card = json.loads(client.get_object(Bucket=out_bucket, Key=card_key)["Body"].read())
    assert card["steps"] == 6 and card["resumed_from_step"] == 6
    assert "models/ns/fin2/uid-fin2/adapter_model.safetensors" in _keys(client, out_bucket, "models/")
