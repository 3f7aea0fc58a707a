"""Input readers, rendering and sampled targets: no teacher engine needed."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kdship.cache.run import draw_sampled_targets
from kdship.data import DataError, read_rows


def _write(path, lines: list[bytes]):
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_jsonl_kinds_and_indices(corpus_dir):
    for name, kind in [("text.jsonl", "text"), ("pairs.jsonl", "pair"), ("chat.jsonl", "messages"), ("prompts.jsonl", "prompt")]:
        rows, rejects = read_rows(corpus_dir / name)
        assert rejects == [] and rows
        assert {r.kind for r in rows} == {kind}
        assert [r.index for r in rows] == list(range(len(rows)))
        assert rows[1].source.endswith(f"{name}:2")


BAD_CASES = [
    (b'{"text": "ok"', "malformed JSON"),
    (b'{"prompt": 5, "response": "x"}', "must be a string"),
    (b'{"foo": "bar"}', "missing field"),
    (b'{"text": "   "}', "empty"),
    (b'{"prompt": "a", "response": ""}', "empty"),
    (b'{"messages": [{"role": "user"}]}', "role' and 'content'"),
    (b'{"messages": [{"role": "wizard", "content": "hi"}]}', "unknown role"),
    (b'{"text": "caf\xe9 latte"}', "UTF-8"),
    (b"[1, 2]", "JSON object"),
]


@pytest.mark.parametrize("line,reason", BAD_CASES)
def test_bad_rows_error_with_file_and_line_or_reject(tmp_path, line, reason):
    f = _write(tmp_path / "d.jsonl", [b'{"text": "first row"}', b"", line, b'{"text": "last row"}'])
    with pytest.raises(DataError) as e:
        read_rows(f)
    assert f"{f}:3:" in str(e.value) and reason in str(e.value)
    rows, rejects = read_rows(f, skip_bad=True)
    # nothing dropped silently: every record is a row or a reject, indices stay stable
    assert [r.index for r in rows] == [0, 2] and [r.index for r in rejects] == [1]
    assert rejects[0].source == f"{f}:3" and reason in rejects[0].reason


def test_parquet_and_datasets_folder(tmp_path, corpus_dir):
    recs = [json.loads(x) for x in (corpus_dir / "pairs.jsonl").read_text().splitlines()]
    table = pa.Table.from_pylist(recs)
    pq.write_table(table, tmp_path / "d.parquet")
    rows, _ = read_rows(tmp_path / "d.parquet")
    assert [r.prompt for r in rows] == [r["prompt"] for r in recs]
    # a `datasets` save_to_disk folder: arrow IPC stream files listed in state.json
    d = tmp_path / "ds"
    d.mkdir()
    with pa.OSFile(str(d / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    (d / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (d / "dataset_info.json").write_text("{}")
    rows2, _ = read_rows(d)
    assert [r.response for r in rows2] == [r["response"] for r in recs]
    # bad row inside Parquet names the row
    pq.write_table(pa.Table.from_pylist([{"text": "fine"}, {"text": ""}]), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad\.parquet:row 1: field 'text' is empty"):
        read_rows(tmp_path / "bad.parquet")


def test_missing_and_unknown_data(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_rows(tmp_path / "nope.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unknown data format"):
        read_rows(tmp_path / "x.csv")


def test_chat_rendering_masks_assistant_turns(tiny_teacher, corpus_dir):
    from kdship.render import load_tokenizer, render_score

    tok = load_tokenizer(str(tiny_teacher))
    rows, _ = read_rows(corpus_dir / "chat.jsonl")
    row = rows[0]
    ids, mask = render_score(row, tok)
    assert mask.any() and not mask.all()
    masked_text = tok.decode(ids[mask])
    assert masked_text.startswith(row.messages[1]["content"])  # the assistant turn (+ its end marker)
    assert row.messages[0]["content"] not in masked_text
    # pairs: the response tokens (and EOS) are masked, the prompt is not
    prow = read_rows(corpus_dir / "pairs.jsonl")[0][0]
    ids, mask = render_score(prow, tok)
    assert tok.decode(ids[mask], skip_special_tokens=True) == prow.response
    assert ids[-1] == tok.eos_token_id


def test_sampled_targets_are_distinct_weighted_draws():
    rng = np.random.default_rng(0)
    V, L, N = 50, 400, 16
    logits = rng.normal(size=(L, V)) * 2
    lp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    order = np.argsort(-lp, axis=1)
    ids = order.astype(np.int32)
    lps = np.take_along_axis(lp, order, 1).astype(np.float32)
    ids[0], lps[0] = -1, -np.inf  # a row without target stays empty
    ti, tl, tw = draw_sampled_targets(ids, lps, N, np.random.default_rng(1))
    assert (ti[0] == -1).all() and (tw[0] == 0).all()
    np.testing.assert_allclose(tw[1:].sum(1), 1.0)
    for r in range(1, L):
        valid = ti[r] >= 0
        assert len(set(ti[r][valid])) == valid.sum()  # distinct ids
        np.testing.assert_allclose(tl[r][valid], lp[r, ti[r][valid]], rtol=1e-6)  # the teacher's own logprob
        assert (np.diff(tw[r][valid]) <= 0).all()
    # unbiased: the mean weight of a token approaches its probability
    p = np.exp(lp[1:])
    emp = np.zeros_like(p)
    for r in range(1, L):
        v = ti[r] >= 0
        emp[r - 1, ti[r][v]] = tw[r][v]
    assert np.abs((emp - p).mean(0)).max() < 0.02
