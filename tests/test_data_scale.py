"""The vectorised data stage (1 M users / 10 M interactions) against per-row references: id ordering and
normalisation, item text rendering, the flat train rows, and artifact files byte-identical to the
`json.dumps` / `write_json` output of the per-row writer they replace."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from llmkd.data import Ragged, RecData, _python_key, id_order, load_data, save_data, split_checksums
from llmkd.data.tables import id_codes, render_texts
from llmkd.infra.artifacts import LlmkdError
from llmkd.infra.config import DataConfig

SETTINGS = settings(max_examples=60, deadline=None)


def test_ragged_acts_as_a_list_of_arrays():
    rows = [np.array([3, 1]), np.array([], dtype=np.int64), np.array([7, 7, 2])]
    r = Ragged.from_rows(rows)
    assert len(r) == 3 and r.offsets.tolist() == [0, 2, 2, 5] and r.lengths().tolist() == [2, 0, 3]
    assert [x.tolist() for x in r] == [x.tolist() for x in rows]
    assert r[np.int64(2)].tolist() == [7, 7, 2] and r[-1].tolist() == [7, 7, 2] and r[1].dtype == np.int64
    assert [x.tolist() for x in r[1:]] == [[], [7, 7, 2]]
    assert np.concatenate(r).tolist() == [3, 1, 7, 7, 2] and sum(len(x) for x in r) == 5
    with pytest.raises(IndexError):
        r[3]
    for offsets in ([0, 2, 1, 5], [1, 2, 5], [0, 2, 4]):
        with pytest.raises(ValueError, match="offsets"):
            Ragged(np.arange(5), np.array(offsets))


ids = st.one_of(
    st.integers(-10**20, 10**20).map(str),
    st.from_regex(r"\A-?0{0,3}[0-9]{1,3}\Z"),
    st.text("ab-_ Z9é٣", min_size=1, max_size=5),
)


def orderable(s: str) -> bool:
    """Ids the per-row key can sort (it calls int() on what str.isdigit accepts: '--5' and '²' crash it)."""
    try:
        _python_key(s)
        return True
    except ValueError:
        return False


@SETTINGS
@given(st.lists(ids.filter(orderable), min_size=1, max_size=30, unique=True))
def test_id_order_matches_the_per_row_sort(values):
    """Integers by value then text, before other ids by text; long, signed, zero-padded and non-ASCII ids."""
    arr = np.array(values, dtype=object)
    assert arr[id_order(arr)].tolist() == sorted(values, key=_python_key)


def test_id_order_puts_numbers_by_value():
    arr = np.array(["10", "9", "b", "-3", "009", "a", "90", "9x"], dtype=object)
    assert arr[id_order(arr)].tolist() == ["-3", "009", "9", "10", "90", "9x", "a", "b"]


def row_normalised(value) -> str | None:
    """The per-row rule: text, stripped; integral floats lose '.0'; empty or NaN -> None (an error)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    s = str(pd.Series([value]).astype("string")[0]).strip()
    if s == "" or s.lower() == "nan":
        return None
    import re

    return re.sub(r"^(-?\d+)\.0+$", r"\1", s)


@SETTINGS
@given(st.lists(st.one_of(st.integers(-5, 5), st.sampled_from([1.0, 2.5, -3.0, "1", " 1 ", "x", "07", "1.00"])),
                min_size=1, max_size=20))
def test_ids_are_normalised_per_distinct_value_like_per_row(values):
    col = pd.Series(values, dtype=object)
    codes, distinct = id_codes(col, "item_id", "f.jsonl")
    expected = [row_normalised(v) for v in values]
    assert distinct[codes].tolist() == expected
    assert len(set(distinct.tolist())) == len(distinct)
    assert distinct.tolist() == list(dict.fromkeys(expected))  # first appearance order


def test_empty_id_names_its_row():
    with pytest.raises(LlmkdError, match=r"f.csv: row 3: field 'user_id' is ' '"):
        id_codes(pd.Series(["a", "b", " ", "a"], dtype="str"), "user_id", "f.csv")
    with pytest.raises(LlmkdError, match="row 2"):
        id_codes(pd.Series([1.0, np.nan]), "user_id", "f.parquet")


@pytest.mark.parametrize("template", ["{title} | {genre}", "  {title}{genre}  ", "{{x}} {title}: {n}", "{title:>6}|{n!r}"])
def test_render_texts_equals_str_format(template):
    """Column-wise rendering (and the str.format fallback for specs / conversions) give the per-row text."""
    items = pd.DataFrame({"item_id": [1, 2, 3, 4], "title": [" a\u2028b ", "x", None, "\tq\x1f"],
                          "genre": ["g", "", "h", " "], "n": [1.5, None, 3.0, 4.0]})
    cols = {c: items[c].astype("string").fillna("").to_numpy() for c in ("title", "genre", "n")}
    expected = [template.format(**{c: cols[c][i] for c in cols}).strip() for i in range(len(items))]
    assert render_texts(items, template, "items.csv") == expected


def test_render_texts_names_the_first_blank_item():
    items = pd.DataFrame({"item_id": [5, 6, 7], "title": ["a", " ", None], "genre": ["g", "\t", ""]})
    with pytest.raises(LlmkdError, match=r"items.csv: row 2 \(item_id 6\): empty item text"):
        render_texts(items, "{title} | {genre}", "items.csv")


NASTY = ['say "hi"', "back\\slash", "line\nbreak", "tab\tend", "é 漢字 😀", "sep\u2028par\u2029", "ctl\x01", "sl/ash", " 1 "]


def nasty_data() -> RecData:
    n = len(NASTY)
    train = Ragged.from_rows([np.array([0, 1]), np.array([2, 3, 4]), np.array([5])])
    return RecData(user_ids=["u\"1", "é", "3"], item_ids=[f"i{k}{s}" for k, s in enumerate(NASTY)], item_texts=NASTY[::-1],
                   train=train, valid_item=np.array([6, 7, -1]), test_item=np.array([8, 0, -1]), fingerprint=f"fp{n}")


def test_artifact_files_equal_the_per_row_writer(tmp_path):
    """items.jsonl is json.dumps(ensure_ascii=False) per line and users.json write_json's indented list,
    byte for byte, for quotes, backslashes, control characters, non-ASCII and line separators."""
    data = nasty_data()
    save_data(data, tmp_path / "data", DataConfig())
    lines = "".join(json.dumps({"item_id": i, "text": t}, ensure_ascii=False) + "\n"
                    for i, t in zip(data.item_ids, data.item_texts))
    assert (tmp_path / "data" / "items.jsonl").read_text(encoding="utf-8") == lines
    assert (tmp_path / "data" / "users.json").read_text(encoding="utf-8") == json.dumps(data.user_ids, indent=2) + "\n"


def test_texts_with_line_separators_round_trip(tmp_path):
    """U+2028 / U+2029 stay inside their JSON line (str.splitlines would cut the line there)."""
    data = nasty_data()
    data.cold_item_ids, data.cold_item_texts, data.cold_item_users = ["c1", "c2"], ["a\u2028b", "c\u2029"], [[0, 2], []]
    save_data(data, tmp_path / "data", DataConfig())
    back = load_data(tmp_path / "data")
    assert (back.item_ids, back.item_texts, back.user_ids) == (data.item_ids, data.item_texts, data.user_ids)
    assert (back.cold_item_ids, back.cold_item_texts, back.cold_item_users) == (
        data.cold_item_ids, data.cold_item_texts, data.cold_item_users)
    assert [x.tolist() for x in back.train] == [x.tolist() for x in data.train]
    assert split_checksums(back) == split_checksums(data)


def test_split_checksums_equal_the_per_row_text():
    import hashlib

    data = nasty_data()
    for split in ("valid", "test"):
        users = data.eval_users(split)
        text = "".join(f"{data.user_ids[u]},{data.item_ids[data.targets(split)[u]]}\n" for u in users)
        assert split_checksums(data)[split] == hashlib.sha256(text.encode()).hexdigest()


def test_broken_offsets_are_an_unreadable_split(tmp_path):
    save_data(nasty_data(), tmp_path / "data", DataConfig())
    save_file({"train_items": np.arange(6, dtype=np.int64), "train_offsets": np.array([0, 4, 2, 6], dtype=np.int64),
               "valid_item": np.array([6, 7, -1]), "test_item": np.array([8, 0, -1])},
              str(tmp_path / "data" / "split.safetensors"))
    with pytest.raises(LlmkdError, match="split.safetensors: unreadable data split .*offsets"):
        load_data(tmp_path / "data")
