"""Preflight: every bad record is reported as (file, line, reason); stats; the bad-fraction gate."""

import json

import pytest

from kubetune_contract.config import DatasetSpec
from kubetune_dev.tiny_model import instruction_records, text_records, write_jsonl
from kubetune_trainer.data import Example, check_bad_fraction, encode_files, local_data_files, split_validation
from kubetune_trainer.errors import UserError


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _spec(uri="x", **kw):
    return DatasetSpec(uri=uri, **kw)


def test_bad_records_are_reported_with_file_line_and_reason(tmp_path, tok):
    good = instruction_records(3)
    lines = [
        json.dumps(good[0]),  # 1 ok
        '{"prompt": "count from one", "response": ',  # 2 bad JSON
        json.dumps({"prompt": "count from two"}),  # 3 missing response
        json.dumps({"prompt": 7, "response": "eight"}),  # 4 wrong type
        "",  # 5 blank: skipped, not a record
        json.dumps({"prompt": "count from one", "response": "   "}),  # 6 empty text
        json.dumps({"prompt": "one " * 200, "response": "two"}),  # 7 prompt too long
        json.dumps(["not", "an", "object"]),  # 8 not an object
        json.dumps(good[1]),  # 9 ok
    ]
    f = write_jsonl(tmp_path / "train.jsonl", lines)
    spec = _spec(format="instruction")
    examples, report = encode_files([(f, "s3://b/train.jsonl")], spec, tok, max_seq_length=64)
    assert len(examples) == 2
    assert report.records == 8 and report.bad_count == 6
    got = {(b.file, b.line): b.reason for b in report.bad}
    assert set(got) == {("s3://b/train.jsonl", n) for n in (2, 3, 4, 6, 7, 8)}
    assert got[("s3://b/train.jsonl", 2)].startswith("bad JSON")
    assert got[("s3://b/train.jsonl", 3)] == "missing field 'response'"
    assert got[("s3://b/train.jsonl", 4)] == "field 'prompt' must be a string, got int"
    assert got[("s3://b/train.jsonl", 6)].startswith("empty text")
    assert got[("s3://b/train.jsonl", 7)].startswith("too long")
    assert "must be a JSON object" in got[("s3://b/train.jsonl", 8)]

    with pytest.raises(UserError) as ei:
        check_bad_fraction(report, spec)
    msg = str(ei.value)
    assert "6 of 8 records" in msg and "maxBadRecordFraction" in msg
    assert "s3://b/train.jsonl:3: missing field 'response'" in msg
    # tolerated when the user allows that many
    check_bad_fraction(report, _spec(format="instruction", max_bad_record_fraction=0.8))


def test_chat_and_text_record_errors(tmp_path, tok):
    chat = [
        {"messages": [{"role": "user", "content": "count from one"}, {"role": "assistant", "content": "two"}]},
        {"messages": []},
        {"messages": [{"role": "user", "content": "hi"}]},
        {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]},
        {"conversation": []},
    ]
    f = write_jsonl(tmp_path / "chat.jsonl", chat)
    ex, rep = encode_files([(f, "chat.jsonl")], _spec(format="chat"), tok, 64)
    assert len(ex) == 1
    reasons = [b.reason for b in rep.bad]
    assert reasons == [
        "field 'messages' must be a non-empty list of messages",
        "empty text: no assistant message with content",
        "messages[0].content must be a string, got int",
        "missing field 'messages'",
    ]
    f2 = write_jsonl(tmp_path / "text.jsonl", [{"text": ""}, {"body": "one two"}, {"text": "one two three"}])
    ex, rep = encode_files([(f2, "text.jsonl")], _spec(format="text"), tok, 64)
    assert len(ex) == 1 and [b.line for b in rep.bad] == [1, 2]


def test_length_statistics_and_truncation(tmp_path, tok):
    recs = text_records(20, length=4) + [{"text": "one two three four five six seven eight nine ten " * 3}]
    f = write_jsonl(tmp_path / "t.jsonl", recs)
    ex, rep = encode_files([(f, "t.jsonl")], _spec(format="text"), tok, max_seq_length=16)
    s = rep.stats
    assert s.count == 21 and s.truncated == 1
    assert s.min <= s.p50 <= s.p95 <= s.max and s.max > 16
    assert all(len(e.input_ids) <= 16 for e in ex)
    summary = rep.summary()
    assert summary["tokens"]["truncated"] == 1 and summary["records"] == 21


def test_parquet_rows_are_numbered(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"prompt": ["count from one", None, "count from two"], "response": ["two", "x", ""]})
    pq.write_table(table, tmp_path / "d.parquet")
    files = local_data_files(tmp_path)
    ex, rep = encode_files([(p, p.name) for p in files], _spec(format="instruction"), tok, 64)
    assert len(ex) == 1
    assert [(b.file, b.line) for b in rep.bad] == [("d.parquet", 2), ("d.parquet", 3)]


def test_empty_dataset_is_a_user_error(tmp_path, tok):
    f = write_jsonl(tmp_path / "e.jsonl", [])
    _, rep = encode_files([(f, "e.jsonl")], _spec(format="text"), tok, 64)
    with pytest.raises(UserError, match="no records"):
        check_bad_fraction(rep, _spec(format="text"))


def test_validation_split_is_deterministic_and_disjoint():
    exs = [Example([i, i], [-100, i], 2) for i in range(100)]
    tr1, ev1 = split_validation(exs, 0.1, seed=7)
    tr2, ev2 = split_validation(exs, 0.1, seed=7)
    _, ev3 = split_validation(exs, 0.1, seed=8)
    assert [e.input_ids for e in ev1] == [e.input_ids for e in ev2]
    assert [e.input_ids for e in ev1] != [e.input_ids for e in ev3]
    assert len(ev1) == 10 and len(tr1) == 90
    assert not {e.input_ids[0] for e in tr1} & {e.input_ids[0] for e in ev1}
    assert split_validation(exs, 0.0, 1) == (exs, [])


def test_json_array_files_are_read_record_by_record(tmp_path, tok):
    import json as _json

    (tmp_path / "d.json").write_text(_json.dumps(instruction_records(2) + [{"prompt": "x"}]))
    ex, rep = encode_files([(tmp_path / "d.json", "d.json")], _spec(format="instruction"), tok, 64)
    assert len(ex) == 2 and [(b.line, b.reason) for b in rep.bad] == [(3, "missing field 'response'")]
