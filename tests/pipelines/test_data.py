"""pipelines/data.py with real files written into tmp_path: every supported shape and every bad input, the cleaning
steps with exact counts and undo, EDA figures, the chat-template preview mask (tiny tokenizer from conftest), and
saving/listing/loading dataset versions (never overwriting, atomic)."""

from __future__ import annotations

import copy
import csv
import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest

from pipelines import data
from pipelines.data import read as data_read
from pipelines.data import save as data_save
from pipelines.data import Cleaner, Mapping
from pipelines.errors import BadInput, NotFound

ASSETS = Path(__file__).resolve().parents[2] / "assets"
ALPACA = [
    {"instruction": "Say hi", "input": "", "output": "Hi!"},
    {"instruction": "Add numbers", "input": "2 and 3", "output": "5"},
    {"instruction": "Name a colour", "input": "", "output": "Blue"},
]


def user_error(excinfo, cls=BadInput, *needles: str) -> str:
    """The error is exactly `cls`, one plain line containing `needles`, with no chained traceback."""
    err = excinfo.value
    assert type(err) is cls, f"{type(err).__name__}: {err}"
    msg = str(err)
    assert msg.strip() and "\n" not in msg and "Traceback" not in msg, msg
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__), repr(err.__context__)
    for needle in needles:
        assert needle.lower() in msg.lower(), f"{needle!r} not in {msg!r}"
    return msg


def write_csv(path: Path, rows: list[dict], delimiter: str = ",", encoding: str = "utf-8") -> Path:
    with open(path, "w", newline="", encoding=encoding) as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter=delimiter)
        w.writeheader()
        w.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return data.load_tokenizer(tiny_tokenizer_dir)


# ================================================================================================== reading


@pytest.mark.parametrize("delimiter,ext", [(",", ".csv"), (";", ".csv"), ("|", ".csv"), ("\t", ".tsv"),
                                           ("\t", ".csv")])
def test_read_csv_dialects(tmp_path, delimiter, ext):
    rows = ALPACA + [{"instruction": "Quote, semicolon; pipe|", "input": 'say "x"', "output": "line1\nline2"}]
    f = write_csv(tmp_path / f"t{ext}", rows, delimiter)
    res = data.read_table(f)
    assert res.delimiter == delimiter and res.format == ext[1:] and res.encoding == "utf-8"
    assert (res.n_rows, res.n_cols) == (4, 3) and list(res.df.columns) == ["instruction", "input", "output"]
    assert res.df.loc[3, "instruction"] == "Quote, semicolon; pipe|" and res.df.loc[3, "output"] == "line1\nline2"
    assert res.df.loc[0, "input"] != res.df.loc[0, "input"]  # empty cell = missing (NaN)
    assert all(str(t) == "str" for t in res.df.dtypes)
    assert res.sha256 == hashlib.sha256(f.read_bytes()).hexdigest() and res.warnings == []


def test_read_numbers_stay_text(tmp_path):
    f = tmp_path / "n.csv"
    f.write_text("text,score\nhello,007\nNone,NA\n")
    df = data.read_table(f).df
    assert df["score"].tolist() == ["007", "NA"] and df["text"].tolist() == ["hello", "None"]


def test_read_utf8_bom_and_utf16(tmp_path):
    f = tmp_path / "bom.csv"
    f.write_bytes(b"\xef\xbb\xbfinstruction,output\ncaf\xc3\xa9,ok\n")
    res = data.read_table(f)
    assert res.encoding == "utf-8-sig" and list(res.df.columns) == ["instruction", "output"]
    assert res.df.loc[0, "instruction"] == "café"
    g = tmp_path / "u16.csv"
    g.write_bytes("instruction\toutput\nnaïve\tja\n".encode("utf-16"))
    res = data.read_table(g)
    assert res.encoding == "utf-16" and res.delimiter == "\t" and res.df.loc[0, "instruction"] == "naïve"


ENCODED = {  # encoding -> (the text of a two-column CSV in that language, what the detection must report)
    "cp949": ("질문,답변\n안녕하세요?,반갑습니다. 오늘 날씨가 좋네요.\n이름이 뭐예요?,저는 맥튜너입니다.\n", ("cp949", "euc-kr")),
    "shift_jis": ("質問,回答\nこんにちは,元気です。今日はいい天気ですね。\n名前は？,マックチューナーです。\n",
                  ("cp932", "shift-jis", "shift_jis")),
    "gbk": ("问题,回答\n你好,我很好，今天天气很好。\n你叫什么名字？,我叫麦克调音器。\n", ("gb18030", "gbk", "gb2312")),
    "utf-16-le": ("question,answer\nnaïve,déjà vu\n", ("utf-16-le",)),
    "utf-16-be": ("question,answer\nnaïve,déjà vu\n", ("utf-16-be",)),
    "latin-1": ("instruction,output\ncafé crème,déjà vu\n", ("cp1252",)),
    "cp1252": ("instruction,output\n“smart” quotes,costs €100\n", ("cp1252",)),
}


@pytest.mark.parametrize("enc", list(ENCODED))
def test_read_detects_legacy_encodings(tmp_path, enc):
    text, expected = ENCODED[enc]
    f = tmp_path / f"{enc}.csv"
    f.write_bytes(text.encode(enc))
    res = data.read_table(f)
    assert res.encoding in expected, res.encoding
    assert res.df.iloc[0].tolist() == text.splitlines()[1].split(",")
    assert res.warnings and res.encoding.split("-")[0] in res.warnings[0].lower(), res.warnings
    # the override: read as Latin-1 on purpose (mojibake), and a codec that cannot decode it is refused
    if enc == "cp949":
        assert data.read_table(f, encoding="latin-1").df.columns[0] != "질문"
        with pytest.raises(BadInput, match="not valid utf-8"):
            data.read_table(f, encoding="utf-8")
        with pytest.raises(BadInput, match="Unknown encoding"):
            data.read_table(f, encoding="klingon")


def test_read_plain_text_blocks_and_document(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("First block,\nsecond line.\n\n  \nSecond block.\r\n\r\nThird.\n")
    res = data.read_table(f)
    assert res.format == "txt" and res.df["text"].tolist() == ["First block,\nsecond line.", "Second block.", "Third."]
    assert any("block" in w for w in res.warnings)
    one = data.read_table(f, text_mode="document").df["text"].tolist()
    assert len(one) == 1 and one[0].startswith("First block") and one[0].endswith("Third.")
    assert data.detect_mapping(res.df).format == "text"
    with pytest.raises(BadInput, match="Text mode"):
        data.read_table(f, text_mode="chapters")


def test_read_xlsx(tmp_path):
    f = tmp_path / "book.xlsx"
    with pd.ExcelWriter(f, engine="openpyxl") as xw:
        pd.DataFrame({"instruction": ["Say hi", "Add 2 and 3"], "output": ["Hi!", 5]}).to_excel(xw, sheet_name="qa", index=False)
        pd.DataFrame({"notes": ["other sheet"]}).to_excel(xw, sheet_name="notes", index=False)
    res = data.read_table(f)
    assert res.format == "xlsx" and res.df["output"].tolist() == ["Hi!", "5"]
    assert any("2 sheets" in w and "'qa'" in w for w in res.warnings), res.warnings
    assert data.detect_mapping(res.df).format == "alpaca"


def test_read_json_shapes(tmp_path):
    a = tmp_path / "a.json"
    a.write_text(json.dumps(ALPACA))
    b = tmp_path / "b.json"
    b.write_text(json.dumps({"data": ALPACA}, indent=2))
    for f in (a, b):
        res = data.read_table(f)
        assert res.format == "json" and (res.n_rows, res.n_cols) == (3, 3)
        assert res.df["output"].tolist() == ["Hi!", "5", "Blue"]
    c = write_jsonl(tmp_path / "c.json", ALPACA)  # JSONL saved as .json
    res = data.read_table(c)
    assert res.n_rows == 3 and any("JSONL" in w for w in res.warnings)


def test_read_jsonl_with_blank_lines_and_ragged_keys(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "c", "completion": "d", "extra": 1}\n')
    res = data.read_table(f)
    assert res.format == "jsonl" and res.n_rows == 2 and list(res.df.columns) == ["prompt", "completion", "extra"]
    assert pd.isna(res.df.loc[0, "extra"]) and res.df.loc[1, "extra"] == "1" and res.warnings == []


def test_read_parquet_with_nested_messages(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    pq.write_table(pa.table({"messages": [conv, conv], "n": [1, 2]}), tmp_path / "m.parquet")
    res = data.read_table(tmp_path / "m.parquet")
    assert res.format == "parquet" and res.encoding is None and res.n_rows == 2
    assert json.loads(res.df.loc[0, "messages"]) == conv and res.df["n"].tolist() == ["1", "2"]
    assert data.to_messages(res.df, data.detect_mapping(res.df)) == [conv, conv]


def test_formula_cells_stay_text_with_warning(tmp_path):
    evil = "=cmd|' /C calc'!A0"
    f = write_csv(tmp_path / "f.csv", [{"instruction": evil, "output": "@SUM(A1:A2)"},
                                       {"instruction": "- a bullet (fine)", "output": "-1"}])
    res = data.read_table(f)
    assert res.df.loc[0, "instruction"] == evil and res.df.loc[0, "output"] == "@SUM(A1:A2)"
    [w] = res.warnings
    assert "2 cell(s) look like spreadsheet formulas" in w and "never evaluated" in w and "'instruction'" in w


def test_long_cells_kept_with_warning(tmp_path):
    f = write_jsonl(tmp_path / "long.jsonl", [{"text": "x" * 100_001}, {"text": "y" * 100_000}, {"text": "z"}])
    res = data.read_table(f)
    assert res.df["text"].str.len().tolist() == [100_001, 100_000, 1]
    assert any(w.startswith("1 cell(s) are longer than 100,000") for w in res.warnings), res.warnings


def test_mixed_types_coerced_to_text_with_warning(tmp_path):
    f = write_jsonl(tmp_path / "m.jsonl", [{"q": "a", "answer": 42}, {"q": "b", "answer": "forty"},
                                           {"q": "c", "answer": [1, 2]}, {"q": "d", "answer": None}])
    res = data.read_table(f)
    assert res.df["answer"].tolist()[:3] == ["42", "forty", "[1, 2]"] and pd.isna(res.df.loc[3, "answer"])
    [w] = res.warnings
    assert "'answer' mixes types (list, number, text)" in w


BAD_INPUTS = {
    "empty.csv": (b"", ["empty"]),
    "blank.jsonl": (b"\n  \n", ["empty"]),
    "header.csv": (b"instruction,output\n", ["header", "instruction, output", "no data rows"]),
    "broken.json": (b'[\n  {"a": 1},\n  {"a": 2,\n]', ["malformed json", "line 4", "column 1"]),
    "broken.jsonl": (b'{"a": 1}\n{"a": 2}\n{"a": \n', ["malformed jsonl", "line 3"]),
    "notlist.json": (b'{"rows": []}', ["array of objects", '{"data"']),
    "scalar.jsonl": (b'{"a": 1}\n[1, 2]\n', ["line 2 is a list"]),
    "ragged.csv": (b"a,b\n1,2\n3,4,5\n", ["malformed csv", "expected 2 fields in line 3, saw 3"]),
    "image.csv": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4, ["not a text file", "nul"]),
    "controls.csv": (bytes(range(1, 32)) * 100, ["does not look like text"]),
    "fake.parquet": (b"a,b\n1,2\n", ["not a parquet file"]),
    "sheet.xlsx": (b"PK\x03\x04", ["could not read the workbook sheet.xlsx"]),
    "old.xlsx": (b"\xd0\xcf\x11\xe0 old xls", ["not an excel .xlsx workbook", "save"]),
    "slides.pptx": (b"PK\x03\x04", ["unsupported file type '.pptx'", ".csv", ".parquet", ".xlsx", ".txt"]),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_inputs(tmp_path, name):
    content, needles = BAD_INPUTS[name]
    f = tmp_path / name
    f.write_bytes(content)
    with pytest.raises(BadInput) as ei:
        data.read_table(f)
    user_error(ei, BadInput, *needles)


def test_utf8_check_is_exact_across_chunks():
    raw = ("ab" + "é" * 10 + "z").encode() + b"\xff" + "ok".encode()
    bad = raw.index(b"\xff")
    for step in (1, 2, 3, 5, 7, 64):
        assert data_read._first_bad_utf8(raw, step=step) == bad, step
        assert data_read._first_bad_utf8(raw[:bad], step=step) is None


def test_progress_is_reported(tmp_path, tok):
    seen = []
    res = data.read_table(write_csv(tmp_path / "p.csv", ALPACA), progress=lambda f, m: seen.append((f, m)))
    assert seen[0][0] == 0.0 and seen[-1] == (1.0, "Read 3 rows x 3 columns")
    assert [f for f, _ in seen] == sorted(f for f, _ in seen)
    seen.clear()
    data.token_lengths(res.df, data.detect_mapping(res.df), data.TokenCounter(tok, batch_size=2),
                       progress=lambda f, m: seen.append(f))
    assert seen and seen[-1] == 1.0 and seen == sorted(seen)


def test_size_limit_and_missing_file(tmp_path):
    f = write_csv(tmp_path / "big.csv", ALPACA)
    with pytest.raises(BadInput) as ei:
        data.read_table(f, max_bytes=50)
    user_error(ei, BadInput, "over the 50 B limit")
    with pytest.raises(NotFound):
        data.read_table(tmp_path / "nope.csv")


# ================================================================================================== mapping


def test_detect_and_convert_every_shape(tmp_path):
    conv = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}]
    sharegpt = [{"from": "system", "value": "Be nice."}, {"from": "human", "value": "hi"},
                {"from": "gpt", "value": "hello"}]
    files = {
        "alpaca.csv": (lambda p: write_csv(p, ALPACA[:2]), "alpaca"),
        "pc.jsonl": (lambda p: write_jsonl(p, [{"prompt": "Say hi", "completion": "Hi!"}]), "prompt_completion"),
        "qa.json": (lambda p: p.write_text(json.dumps([{"Question": "Say hi", "Answer": "Hi!"}])), "qa"),
        "msgs.csv": (lambda p: write_csv(p, [{"messages": json.dumps(conv)}]), "messages"),
        "share.json": (lambda p: p.write_text(json.dumps({"data": [{"conversations": sharegpt}]})), "sharegpt"),
        "text.jsonl": (lambda p: write_jsonl(p, [{"text": "Once upon a time."}, {"text": "  "}]), "text"),
    }
    out = {}
    for name, (make, fmt) in files.items():
        make(tmp_path / name)
        df = data.read_table(tmp_path / name).df
        m = data.detect_mapping(df)
        assert m is not None and m.format == fmt, (name, m)
        out[fmt] = data.to_rows(df, m)
    assert out["alpaca"] == [{"messages": [{"role": "user", "content": "Say hi"},
                                           {"role": "assistant", "content": "Hi!"}]},
                             {"messages": [{"role": "user", "content": "Add numbers\n\n2 and 3"},
                                           {"role": "assistant", "content": "5"}]}]
    assert out["prompt_completion"] == out["qa"] == out["alpaca"][:1]
    assert out["messages"] == out["sharegpt"] == [{"messages": conv}]
    assert out["text"] == [{"text": "Once upon a time."}]


def test_detect_unknown_shape_and_system_column():
    assert data.detect_mapping(pd.DataFrame({"foo": ["a"], "bar": ["b"]})) is None
    df = pd.DataFrame({"instruction": ["q"], "output": ["a"], "System": ["Be brief."]}, dtype=str)
    m = data.detect_mapping(df)
    assert (m.format, m.prompt, m.input, m.response, m.system) == ("alpaca", "instruction", None, "output", "System")
    assert data.to_messages(df, m) == [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"},
                                        {"role": "assistant", "content": "a"}]]


def test_system_prompt_constant_and_column_fallback():
    df = pd.DataFrame({"q": ["a", "b"], "r": ["x", "y"], "sys": ["Own.", None]}, dtype=str)
    m = Mapping(format="qa", prompt="q", response="r", system="sys", system_prompt="Default.")
    convs = data.to_messages(df, m)
    assert [c[0] for c in convs] == [{"role": "system", "content": "Own."}, {"role": "system", "content": "Default."}]
    msgs = pd.DataFrame({"m": [json.dumps([{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}])]})
    assert data.to_messages(msgs, Mapping(format="messages", messages="m", system_prompt="S"))[0][0] == \
        {"role": "system", "content": "S"}


def test_mapping_with_missing_column_lists_available():
    df = pd.DataFrame({"instruction": ["q"], "output": ["a"]}, dtype=str)
    with pytest.raises(BadInput) as ei:
        data.to_messages(df, Mapping(format="alpaca", prompt="instruction", response="answer"))
    user_error(ei, BadInput, "'answer'", "response role", "available columns: instruction, output")
    with pytest.raises(BadInput) as ei:
        data.validate_mapping(df, Mapping(format="alpaca", prompt="instruction"))
    user_error(ei, BadInput, "needs a column for the 'response' role")
    with pytest.raises(BadInput) as ei:
        data.validate_mapping(df, Mapping(format="yaml"))
    user_error(ei, BadInput, "unknown format 'yaml'")


def test_conversion_names_every_row_left_out():
    df = pd.DataFrame({"messages": ['[{"role": "user", "content": "hi"}', "[]",
                                    '[{"role": "robot", "content": "x"}]',
                                    '[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]',
                                    '[{"role": "user", "content": "only a question"}]']})
    conv = data.convert(df, Mapping(format="messages", messages="messages"))
    assert len(conv.rows) == 1 and conv.total == 5 and conv.n_dropped == 4
    assert conv.dropped == {"have a cell that is not valid JSON (Expecting ',' delimiter)": [0],
                            "have no user message": [1], "have no assistant reply": [4],
                            "have an unknown role 'robot' (known: " + ", ".join(sorted(data.ROLE_ALIASES)) + ")": [2]}
    summary = conv.summary()
    assert summary.startswith("5 rows → 1 usable") and "4 left out" in summary and "(row 4)" in summary
    assert conv.report()["dropped"]["have no user message"] == {"count": 1, "first_rows": [1]}
    df = pd.DataFrame({"q": ["a", "b", None], "r": ["x", " ", "z"]}, dtype=str)  # rows 1 and 2 have no pair
    assert data.to_messages(df, Mapping(format="qa", prompt="q", response="r")) == \
        [[{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}]]
    with pytest.raises(BadInput) as ei:
        data.to_messages(pd.DataFrame({"text": ["t"]}), Mapping(format="text", text="text"))
    user_error(ei, BadInput, "to_rows")


# ================================================================================================== cleaning


def frame(**cols) -> pd.DataFrame:
    return pd.DataFrame(cols, dtype=str)


def test_missing_drop_and_fill_exact_counts():
    df = frame(instruction=["a", "b", "  ", None, "e"], input=[None, "x", None, None, ""], output=["1", "", "3", "4",
                                                                                                    "\t\n"])
    out, rep = data.handle_missing(df, columns=["instruction", "output"])
    assert (rep.rows_before, rep.rows_after, rep.removed) == (5, 1, 4) and out.index.tolist() == [0]
    assert rep.detail["missing_per_column"] == {"instruction": 2, "output": 2}
    assert [e["_row"] for e in rep.removed_examples] == [1, 2, 3]
    out, rep = data.handle_missing(df, columns=["input"], action="fill", fill_value="")
    assert rep.rows_after == 5 and out["input"].tolist() == ["", "x", "", "", ""]
    assert rep.detail["filled_per_column"] == {"input": 4}
    out, _ = data.handle_missing(df, columns=["output"], action="fill", fill_value="N/A")
    assert out["output"].tolist() == ["1", "N/A", "3", "4", "N/A"] and df["output"].tolist()[1] == ""  # pure
    with pytest.raises(BadInput):
        data.handle_missing(df, action="guess")
    with pytest.raises(BadInput) as ei:
        data.handle_missing(df, columns=["nope"])
    user_error(ei, BadInput, "'nope'", "available columns: instruction, input, output")


def test_duplicates_exact_and_near():
    df = frame(q=["Hello world", "Hello world", "hello   WORLD", " Hello\tworld ", "Other"],
               a=["x", "x", "x", "x", "y"])
    out, rep = data.drop_duplicates(df)
    assert (rep.rows_before, rep.rows_after) == (5, 4) and out.index.tolist() == [0, 2, 3, 4]
    out, rep = data.drop_duplicates(df, near=True)
    assert (rep.rows_before, rep.rows_after) == (5, 2) and out.index.tolist() == [0, 4]
    out, rep = data.drop_duplicates(df, columns=["a"])
    assert rep.rows_after == 2 and rep.detail["columns"] == ["a"]


def test_normalize_text():
    df = frame(t=["cafe\u0301", "a\x00b\x07c\td\r\ne", "x\u00a0y  \nz\n\n\n\nw", "  keep  inner  spaces  ",
                  "\ufeffbom", None, "plain"])
    out, rep = data.normalize_text(df)
    assert out["t"].tolist()[:5] == ["caf\u00e9", "abc\td\ne", "x y\nz\n\nw", "keep  inner  spaces", "bom"]
    assert pd.isna(out.loc[5, "t"]) and out.loc[6, "t"] == "plain"
    assert (rep.rows_before, rep.rows_after) == (7, 7) and rep.detail["changed_cells"] == {"t": 5}


def test_token_counter_batches_and_caches(tok):
    texts = ["Hello, how are you today?", "", "MacTuner fine-tunes small models.", "Hello, how are you today?"]
    counter = data.TokenCounter(tok, batch_size=2)
    expected = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    assert counter.count(texts).tolist() == expected and expected[1] == 0
    calls = []
    counter._encode = lambda chunk: calls.append(chunk) or [0] * len(chunk)
    assert counter.count(texts[:3]).tolist() == expected[:3] and calls == []  # all cached
    counter.count(["new text"])
    assert calls == [["new text"]]


def test_token_lengths_and_length_filter(tok, workspace):
    df = frame(instruction=["Hello", "The quick brown fox jumps over the lazy dog.", "Hi", "x"],
               input=[None, "and more", None, None], output=["Hi", "A fox. " * 20, "", "y"])
    m = data.detect_mapping(df)
    n = lambda t: len(tok(t, add_special_tokens=False)["input_ids"])  # noqa: E731
    lengths = data.token_lengths(df, m, tok)
    assert lengths.loc[1, "prompt_tokens"] == n("The quick brown fox jumps over the lazy dog.\n\nand more")
    assert lengths.loc[1, "response_tokens"] == n("A fox. " * 20)
    assert (lengths["total_tokens"] == lengths["prompt_tokens"] + lengths["response_tokens"]).all()
    assert lengths.loc[0, "total_chars"] == len("Hello") + len("Hi")
    counter = data.TokenCounter(tok)
    totals = lengths["total_tokens"].tolist()
    out, rep = data.filter_token_length(df, counter, m, min_tokens=3, max_tokens=totals[1] - 1, train_max_length=3)
    expect_keep = [i for i, t in enumerate(totals) if 3 <= t <= totals[1] - 1]
    assert out.index.tolist() == expect_keep and rep.rows_after == len(expect_keep)
    assert rep.detail["too_long"] == 1 and rep.detail["too_short"] == sum(t < 3 for t in totals)
    assert rep.detail["over_train_max"] == sum(totals[i] > 3 for i in expect_keep)
    assert rep.detail["over_train_max_share"] == round(rep.detail["over_train_max"] / len(expect_keep), 4)
    out, rep = data.filter_token_length(df, counter, m, max_tokens=0)
    assert out.empty and rep.detail["all_removed"] and "removed every row" in rep.text()
    with pytest.raises(BadInput) as ei:
        data.save_dataset(workspace, "x", data.to_rows(out, m))
    user_error(ei, BadInput, "nothing to save")


def test_cleaner_apply_undo_reset_saved():
    df = frame(q=["a", "a", "b", " "], r=["1", "1", "2", "3"])
    cl = Cleaner(df)
    assert not cl.can_undo and cl.undo() is None
    r1 = cl.apply(data.drop_duplicates)
    r2 = cl.apply(data.handle_missing, columns=["q"])
    assert (r1.rows_after, r2.rows_after, len(cl.df)) == (3, 2, 2)
    assert [s.step for s in cl.steps] == ["drop_duplicates", "handle_missing"]
    assert cl.undo() is r2 and len(cl.df) == 3 and len(cl.steps) == 1
    cl.reset()
    assert cl.df is df and cl.steps == []
    cl.apply(data.handle_missing, columns=["q"])
    cl.mark_saved()
    assert not cl.can_undo and cl.undo() is None and len(cl.df) == 3
    cl.apply(data.drop_duplicates)
    cl.reset()  # back to the saved state, not the original
    assert len(cl.df) == 3 and [s.step for s in cl.steps] == ["handle_missing"]
    cl.apply(data.drop_duplicates)
    hist = cl.history()
    assert [h["step"] for h in hist] == ["handle_missing", "drop_duplicates"] and json.dumps(hist)
    assert hist[0]["params"] == {"columns": ["q"]} and hist[1]["report"]["rows_after"] == 2


def test_sample_dataset_cleans_as_designed():
    res = data.read_table(ASSETS / "sample_dataset.jsonl")
    assert res.n_rows == 60 and res.warnings == []
    m = data.detect_mapping(res.df)
    assert m.format == "alpaca" and m.input == "input"
    cl = Cleaner(res.df)
    assert cl.apply(data.handle_missing, columns=data.required_columns(m)).removed == 2
    assert cl.apply(data.drop_duplicates).removed == 2
    assert cl.apply(data.drop_duplicates, near=True).removed == 2
    assert len(data.to_rows(cl.df, m)) == 54


# ================================================================================================== EDA


def test_column_summary_and_duplicates():
    df = frame(q=["a", "a", "b", None], n=["1", "2", "2", "3"], j=['[1]', '{"a": 1}', " [2]", None])
    s = data.column_summary(df).set_index("column")
    assert s.loc["q"].to_dict() == {"type": "text", "non_null": 3, "missing": 1, "unique": 2, "duplicates": 1,
                                    "examples": "a | b"}
    assert s.loc["n", "type"] == "number" and s.loc["j", "type"] == "json" and s.loc["n", "unique"] == 3
    assert data.duplicate_rows(frame(a=["x", "x", "y"], b=["1", "1", "1"])) == 1


def test_token_length_figure_and_stats():
    import plotly.graph_objects as go

    lengths = pd.DataFrame({"prompt_tokens": [5, 10, 300], "response_tokens": [5, 20, 100],
                            "total_tokens": [10, 30, 400], "prompt_chars": [20, 40, 900],
                            "response_chars": [20, 80, 400], "total_chars": [40, 120, 1300]})
    fig = data.token_length_figure(lengths, max_length=256)
    assert isinstance(fig, go.Figure)
    assert [(t.type, t.name) for t in fig.data] == [("histogram", "prompt"), ("histogram", "response"),
                                                    ("histogram", "total")]
    assert list(fig.data[2].x) == [10, 30, 400]
    [line] = fig.layout.shapes
    assert line.type == "line" and line.x0 == line.x1 == 256
    assert "1 over 256" in fig.layout.title.text
    assert not data.token_length_figure(lengths).layout.shapes
    st = data.length_stats(lengths, 256)
    assert st.loc["total_tokens", "over_max"] == 1 and st.loc["prompt_tokens", "over_max"] == 1
    assert st.loc["total_tokens", "max"] == 400 and pd.isna(st.loc["total_chars", "over_max"])


def test_chat_figures():
    convs = [[{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
              {"role": "assistant", "content": "a"}],
             [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}] * 2]
    turns = data.turns_figure(convs)
    assert turns.data[0].type == "histogram" and list(turns.data[0].x) == [2, 4]
    bal = data.role_balance_figure(convs)
    assert bal.data[0].type == "bar" and list(bal.data[0].x) == ["system", "user", "assistant"]
    assert list(bal.data[0].y) == [1, 3, 3]


# ================================================================================================== preview

CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <b>there</b>"},
        {"role": "assistant", "content": "Hello, how are you?"}, {"role": "user", "content": "Fine"},
        {"role": "assistant", "content": "Good & quick."}]


def test_preview_masks_exactly_the_assistant_tokens(tok):
    p = data.preview_example(CONV, tok)
    assert p.template == "tokenizer"
    # the tiny template: "<s>{role}: {content}</s>\n" per message; the assistant turn after "<s>assistant:" is trained
    pieces = [("<s>system: Be brief.</s>\n<s>user: Hi <b>there</b></s>\n<s>assistant:", 0),
              (" Hello, how are you?</s>\n", 1), ("<s>user: Fine</s>\n<s>assistant:", 0), (" Good & quick.</s>\n", 1)]
    assert p.text == "".join(t for t, _ in pieces)
    expected = [m for t, m in pieces for _ in tok(t, add_special_tokens=False)["input_ids"]]
    assert p.mask == expected
    ids = tok(p.text, add_special_tokens=False)["input_ids"]
    assert tok.decode([i for i, m in zip(ids, p.mask) if m]) == " Hello, how are you?</s>\n Good & quick.</s>\n"
    assert p.trained_tokens == sum(expected) and p.masked_tokens == len(expected) - sum(expected)
    # escaped HTML, two span classes, and the text reads back whole
    assert "<b>" not in p.html and "</b>" not in p.html and "&lt;" in p.html and "&amp;" in p.html
    assert p.html.count('class="mt-trained"') + p.html.count('class="mt-masked"') == len(ids)
    import re
    import html as htmllib

    assert htmllib.unescape(re.sub(r"<[^>]+>", "", p.html)) == p.text


def test_preview_with_gemma_template_folds_system_and_trims(tok):
    from pipelines.templates import GEMMA_CHAT_TEMPLATE

    gem = copy.deepcopy(tok)
    gem.chat_template = GEMMA_CHAT_TEMPLATE
    conv = [dict(m, content=m["content"] + "  ") for m in CONV]  # the template trims content
    text, spans = data.assistant_spans(gem, conv)
    assert [text[a:b] for a, b in spans] == ["Hello, how are you?<end_of_turn>\n", "Good & quick.<end_of_turn>\n"]
    assert text.startswith("<s><start_of_turn>user\nBe brief.\n\nHi <b>there</b><end_of_turn>")


def test_preview_fallback_template_and_text_rows(tok):
    bare = copy.deepcopy(tok)
    bare.chat_template = None
    p = data.preview_example({"messages": CONV[1:3]}, bare)
    assert p.template == "fallback" and p.text.startswith("<|im_start|>user\nHi <b>there</b><|im_end|>\n")
    ids = bare(p.text, add_special_tokens=False)["input_ids"]
    assert bare.decode([i for i, m in zip(ids, p.mask) if m]) == "Hello, how are you?<|im_end|>\n"
    t = data.preview_example({"text": "a <tag>"}, tok)
    assert t.template == "none" and t.masked_tokens == 0 and t.trained_tokens == len(t.mask) > 0
    assert "<tag>" not in t.html and "&lt;" in t.html


def test_chat_templates_render_in_a_sandbox(tok):
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from transformers.utils.chat_template_utils import _compile_jinja_template

    assert isinstance(_compile_jinja_template(tok.chat_template).environment, ImmutableSandboxedEnvironment)
    for evil in ("{{ messages.append({'role': 'user', 'content': 'x'}) }}",
                 "{{ ''.__class__.__mro__[1].__subclasses__() }}"):
        bad = copy.deepcopy(tok)
        bad.chat_template = evil
        with pytest.raises(BadInput) as ei:
            data.preview_example(CONV, bad)
        user_error(ei, BadInput, "chat template failed")


# ================================================================================================== saving


def rows(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(n)]


def test_save_list_load_round_trip(workspace, tmp_path):
    f = write_csv(tmp_path / "src.csv", ALPACA)
    res = data.read_table(f)
    m = data.detect_mapping(res.df)
    cl = Cleaner(res.df)
    cl.apply(data.handle_missing, columns=data.required_columns(m))
    saved = data.save_dataset(workspace, "my-set_1", data.to_rows(cl.df, m), data.build_meta(res, m, cl),
                              val_count=1, seed=3)
    assert (saved.version, len(saved.train), len(saved.validation)) == (1, 2, 1)
    assert saved.path == workspace.datasets / "my-set_1" / "v1"
    assert sorted(p.name for p in saved.path.iterdir()) == ["meta.json", "train.jsonl", "validation.jsonl"]
    loaded = data.load_dataset_version(workspace, "my-set_1")
    assert loaded.train == saved.train and loaded.validation == saved.validation
    assert sorted(loaded.train + loaded.validation, key=str) == sorted(data.to_rows(res.df, m), key=str)
    meta = loaded.meta
    assert meta["source"]["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
    assert meta["source"]["path"] == str(f) and meta["mapping"]["format"] == "alpaca"
    assert meta["cleaning"][0]["step"] == "handle_missing" and meta["counts"] == {"train": 2, "validation": 1,
                                                                                  "total": 3}
    assert meta["split"] == {"val_ratio": None, "val_count": 1, "seed": 3} and meta["shape"] == "messages"
    assert meta["created"] and meta["version"] == 1
    [row] = data.list_datasets(workspace)
    assert row == {"name": "my-set_1", "version": 1, "kind": "sft", "train": 2, "validation": 1, "created": meta["created"],
                   "source": str(f)}


def test_split_is_seeded_and_ratio_based(workspace):
    a = data.save_dataset(workspace, "s", rows(20), val_ratio=0.25, seed=7)
    b = data.save_dataset(workspace, "s", rows(20), val_ratio=0.25, seed=7)
    c = data.save_dataset(workspace, "s", rows(20), val_ratio=0.25, seed=8)
    assert len(a.validation) == 5 and len(a.train) == 15
    assert a.validation == b.validation and a.validation != c.validation
    t = data.save_dataset(workspace, "plain", [{"text": "one"}, {"text": "two"}], val_ratio=0)
    assert t.meta["shape"] == "text" and t.validation == [] and len(t.train) == 2


def test_versions_never_overwrite(workspace):
    v1 = data.save_dataset(workspace, "ds", rows(4), val_count=1)
    before = {p.name: p.read_bytes() for p in v1.path.iterdir()}
    v2 = data.save_dataset(workspace, "ds", rows(6), val_count=1)
    assert (v1.version, v2.version) == (1, 2)
    assert {p.name: p.read_bytes() for p in v1.path.iterdir()} == before
    assert [r["version"] for r in data.list_datasets(workspace)] == [1, 2]
    assert len(data.load_dataset_version(workspace, "ds").train) == 5
    assert len(data.load_dataset_version(workspace, "ds", 1).train) == 3


def test_failed_save_leaves_nothing(workspace, monkeypatch):
    v1 = data.save_dataset(workspace, "ds", rows(4), val_count=1)
    real = data_save._write_jsonl

    def boom(path, rs):
        real(path, rs)
        if path.name == "validation.jsonl":
            raise OSError("disk full")

    monkeypatch.setattr(data_save, "_write_jsonl", boom)
    with pytest.raises(OSError):
        data.save_dataset(workspace, "ds", rows(8), val_count=1)
    assert sorted(p.name for p in (workspace.datasets / "ds").iterdir()) == ["v1"]  # no v2, no temp folder
    assert data.load_dataset_version(workspace, "ds").version == 1 and len(v1.train) == 3
    assert [r["version"] for r in data.list_datasets(workspace)] == [1]


@pytest.mark.parametrize("name", ["", "a b", "../up", "x/y", "naïve", ".hidden", "a" * 65])
def test_bad_names(workspace, name):
    with pytest.raises(BadInput) as ei:
        data.save_dataset(workspace, name, rows(2))
    user_error(ei, BadInput, "letters, digits")


def test_bad_splits_and_rows(workspace):
    for kw in ({"val_count": 3}, {"val_count": 5}, {"val_ratio": 1.0}, {"val_ratio": -0.1}, {"val_count": -1}):
        with pytest.raises(BadInput):
            data.save_dataset(workspace, "x", rows(3), **kw)
    with pytest.raises(BadInput) as ei:
        data.save_dataset(workspace, "x", rows(3), val_count=3)
    user_error(ei, BadInput, "leaves no training rows")
    with pytest.raises(BadInput) as ei:
        data.save_dataset(workspace, "x", [{"messages": [{"role": "wizard", "content": "x"}]}])
    user_error(ei, BadInput, "row 1")
    assert not (workspace.datasets / "x").exists()
    assert data.save_dataset(workspace, "x", [r["messages"] for r in rows(2)], val_ratio=0).train == rows(2)


def test_load_missing(workspace):
    with pytest.raises(NotFound) as ei:
        data.load_dataset_version(workspace, "ghost")
    user_error(ei, NotFound, "ghost")
    data.save_dataset(workspace, "real", rows(2), val_ratio=0)
    with pytest.raises(NotFound) as ei:
        data.load_dataset_version(workspace, "real", 4)
    user_error(ei, NotFound, "no version 4", "v1")
    assert data.list_datasets(workspace)[0]["name"] == "real"


@pytest.mark.slow
def test_bench_runs_small(tiny_tokenizer_dir):
    import subprocess
    import sys

    bench = Path(__file__).resolve().parents[2] / "bench" / "data.py"
    out = subprocess.run([sys.executable, str(bench), "--rows", "400", "--baseline-rows", "200", "--tokenizer",
                          str(tiny_tokenizer_dir)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "speed-up" in out.stdout and "x2 linear extrapolation" in out.stdout and "TOTAL" in out.stdout
