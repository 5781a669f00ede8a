"""Data loading, validation and the leave-last-out split (docs/protocol.md)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pandas as pd
import pytest
from conftest import TEXT_TEMPLATE, write_synthetic

from llmkd.data import build_data, load_data, save_data, split_checksums
from llmkd.infra.artifacts import LlmkdError
from llmkd.infra.config import DataConfig


def reference_split(inter: pd.DataFrame) -> dict[str, tuple[list[str], str | None, str | None]]:
    """Brute force: per user, Python's stable sort by timestamp over rows in file order.

    Returns {user_id: (train item ids, valid item id or None, test item id or None)}.
    """
    rows: dict[str, list[tuple[float, str]]] = {}
    for u, i, t in inter[["user_id", "item_id", "timestamp"]].itertuples(index=False):
        rows.setdefault(str(u), []).append((float(t), str(i)))
    out = {}
    for u, seq in rows.items():
        items = [i for _, i in sorted(seq, key=lambda r: r[0])]  # sorted() is stable: ties keep file order
        out[u] = (items[:-2], items[-2], items[-1]) if len(items) >= 3 else (items, None, None)
    return out


def as_ids(data) -> dict[str, tuple[list[str], str | None, str | None]]:
    """A RecData split in original ids, comparable with `reference_split`."""
    out = {}
    for u, uid in enumerate(data.user_ids):
        v, t = data.valid_item[u], data.test_item[u]
        out[uid] = ([data.item_ids[i] for i in data.train[u]],
                    data.item_ids[v] if v >= 0 else None, data.item_ids[t] if t >= 0 else None)
    return out


def test_split_matches_brute_force(synthetic, synthetic_data):
    data = synthetic_data
    assert as_ids(data) == reference_split(synthetic.inter_df)
    assert data.num_users == synthetic.inter_df["user_id"].nunique()
    assert data.item_ids == [str(i) for i in synthetic.items_df["item_id"]]
    assert data.item_texts[0] == TEXT_TEMPLATE.format(**synthetic.items_df.iloc[0].astype(str).to_dict())
    assert sum(len(t) for t in data.train) + (data.valid_item >= 0).sum() + (data.test_item >= 0).sum() == len(
        synthetic.inter_df)


def test_synthetic_data_exercises_the_tie_rule(synthetic):
    """The fixture has held-out ties, and another tie rule (by item id) would give a different split."""
    inter = synthetic.inter_df
    ties = 0
    for _, rows in inter.groupby("user_id", sort=False):
        ts = sorted(rows["timestamp"])
        ties += len(ts) >= 3 and ts[-1] == ts[-2]
    assert ties >= 3
    by_item = inter.sort_values(["user_id", "timestamp", "item_id"], kind="stable")
    assert reference_split(by_item) != reference_split(inter)


def test_split_edge_users(synthetic_data):
    """Users with < 3 interactions are train only; user 4's tied last three keep file order."""
    data = synthetic_data
    by_id = as_ids(data)
    assert by_id["1"][1:] == (None, None) and len(by_id["1"][0]) == 1
    assert by_id["2"][1:] == (None, None) and len(by_id["2"][0]) == 2
    assert by_id["3"][1] is not None and len(by_id["3"][0]) == 1
    u1 = data.user_ids.index("1")
    assert u1 not in data.eval_users("valid") and u1 not in data.eval_users("test")
    # history(test) = train + valid, history(valid) = train
    u = data.user_ids.index("4")
    assert list(data.history(u, "valid")) == list(data.train[u])
    assert list(data.history(u, "test")) == [*data.train[u], data.valid_item[u]]


def test_ties_keep_file_order(tmp_path):
    """Three interactions at one timestamp: file order decides, not item id."""
    inter = tmp_path / "i.csv"
    items = tmp_path / "it.csv"
    pd.DataFrame({"item_id": [1, 2, 3], "title": ["a", "b", "c"]}).to_csv(items, index=False)
    pd.DataFrame({"user_id": [7, 7, 7], "item_id": [3, 1, 2], "timestamp": [5, 5, 5]}).to_csv(inter, index=False)
    data = build_data(DataConfig(source="files", interactions=str(inter), items=str(items)))
    assert [data.item_ids[i] for i in data.train[0]] == ["3"]
    assert data.item_ids[data.valid_item[0]] == "1"
    assert data.item_ids[data.test_item[0]] == "2"


def test_save_load_round_trip(synthetic, synthetic_data, tmp_path):
    data = synthetic_data
    save_data(data, tmp_path / "data", synthetic.data_config())
    back = load_data(tmp_path / "data")
    assert back.user_ids == data.user_ids
    assert back.item_ids == data.item_ids
    assert back.item_texts == data.item_texts
    assert back.fingerprint == data.fingerprint
    assert len(back.train) == len(data.train)
    for a, b in zip(back.train, data.train):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(back.valid_item, data.valid_item)
    np.testing.assert_array_equal(back.test_item, data.test_item)
    assert split_checksums(back) == split_checksums(data)
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert meta["stage"] == "data" and meta["stats"]["num_users"] == data.num_users
    assert not list(tmp_path.glob(".data.*")), "temporary folders left behind"


def test_fingerprint_depends_on_content(synthetic, synthetic_data, tmp_path):
    other = write_synthetic(tmp_path, seed=1)
    assert build_data(other.data_config()).fingerprint != synthetic_data.fingerprint
    assert build_data(synthetic.data_config(text_template="{title}")).fingerprint != synthetic_data.fingerprint


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "tsv"])
def test_other_formats_give_same_split(fmt, synthetic, synthetic_data, tmp_path):
    inter, items = tmp_path / f"interactions.{fmt}", tmp_path / f"items.{fmt}"
    for df, path in ((synthetic.inter_df, inter), (synthetic.items_df, items)):
        if fmt == "parquet":
            df.to_parquet(path, index=False)
        elif fmt == "jsonl":
            df.to_json(path, orient="records", lines=True)
        else:
            df.to_csv(path, sep="\t", index=False)
    data = build_data(DataConfig(source="files", interactions=str(inter), items=str(items), text_template=TEXT_TEMPLATE))
    assert as_ids(data) == as_ids(synthetic_data)
    assert data.user_ids == synthetic_data.user_ids
    assert data.item_ids == synthetic_data.item_ids
    assert data.item_texts == synthetic_data.item_texts
    assert split_checksums(data) == split_checksums(synthetic_data)


def test_quoted_fields_in_csv(tmp_path):
    """Commas and quotes inside a quoted title survive; ids stay strings ("007" is not 7)."""
    items = tmp_path / "items.csv"
    items.write_text('item_id,title,genre\n007,"Toy Story, The",drama\n2,"He said ""hi""",comedy\n', encoding="utf-8")
    inter = tmp_path / "inter.csv"
    inter.write_text("user_id,item_id,timestamp\n1,007,10\n1,2,11\n", encoding="utf-8")
    data = build_data(DataConfig(source="files", interactions=str(inter), items=str(items), text_template=TEXT_TEMPLATE))
    assert data.item_ids == ["007", "2"]
    assert data.item_texts == ["Toy Story, The | drama", 'He said "hi" | comedy']


@pytest.mark.parametrize("variant", ["quoted_header", "utf8_bom", "crlf"])
def test_common_csv_dialects(variant, synthetic, synthetic_data, tmp_path):
    """CSV as other tools write it gives the same split: R's write.csv quotes the header,
    Excel's 'CSV UTF-8' starts with a byte-order mark, Windows ends lines with CRLF."""
    inter, items = tmp_path / "interactions.csv", tmp_path / "items.csv"
    for df, path in ((synthetic.inter_df, inter), (synthetic.items_df, items)):
        if variant == "quoted_header":
            df.to_csv(path, index=False, quoting=csv.QUOTE_ALL)
        elif variant == "utf8_bom":
            df.to_csv(path, index=False, encoding="utf-8-sig")
        else:
            df.to_csv(path, index=False, lineterminator="\r\n")
    data = build_data(DataConfig(source="files", interactions=str(inter), items=str(items), text_template=TEXT_TEMPLATE))
    assert as_ids(data) == as_ids(synthetic_data)
    assert data.item_texts == synthetic_data.item_texts


# ---------------------------------------------------------------- input errors


def write_pair(tmp_path, inter: pd.DataFrame | str, items: pd.DataFrame | str):
    """Write interactions + items (frames as CSV, strings verbatim) and return a files DataConfig."""
    paths = []
    for name, obj in (("interactions.csv", inter), ("items.csv", items)):
        path = tmp_path / name
        if isinstance(obj, str):
            path.write_text(obj, encoding="utf-8")
        else:
            obj.to_csv(path, index=False)
        paths.append(path)
    return DataConfig(source="files", interactions=str(paths[0]), items=str(paths[1]), text_template=TEXT_TEMPLATE)


def error_of(cfg) -> str:
    with pytest.raises(LlmkdError) as e:
        build_data(cfg)
    return str(e.value)


def test_missing_column(synthetic, tmp_path):
    msg = error_of(write_pair(tmp_path, synthetic.inter_df.drop(columns="timestamp"), synthetic.items_df))
    assert "interactions.csv" in msg and "timestamp" in msg


def test_missing_template_column(synthetic, tmp_path):
    msg = error_of(write_pair(tmp_path, synthetic.inter_df, synthetic.items_df.drop(columns="genre")))
    assert "items.csv" in msg and "genre" in msg


def test_non_numeric_timestamp_names_row(synthetic, tmp_path):
    inter = synthetic.inter_df.astype({"timestamp": object})
    inter.loc[5, "timestamp"] = "yesterday"
    msg = error_of(write_pair(tmp_path, inter, synthetic.items_df))
    assert "interactions.csv" in msg and "timestamp" in msg and "yesterday" in msg
    assert "row 6" in msg  # 1-based data row (header not counted)


def test_unknown_item(synthetic, tmp_path):
    inter = synthetic.inter_df.copy()
    inter.loc[3, "item_id"] = 999
    msg = error_of(write_pair(tmp_path, inter, synthetic.items_df))
    assert "interactions.csv" in msg and "item_id" in msg and "999" in msg


def test_duplicate_item_id(synthetic, tmp_path):
    items = synthetic.items_df.copy()
    items.loc[7, "item_id"] = items.loc[2, "item_id"]
    msg = error_of(write_pair(tmp_path, synthetic.inter_df, items))
    assert "items.csv" in msg and "item_id" in msg and str(items.loc[2, "item_id"]) in msg


def test_empty_item_text(synthetic, tmp_path):
    items = synthetic.items_df.copy()
    items.loc[4, ["title", "genre"]] = ""
    msg = error_of(write_pair(tmp_path, synthetic.inter_df, items))
    assert "items.csv" in msg and "empty" in msg and str(items.loc[4, "item_id"]) in msg


def test_empty_id_field(synthetic, tmp_path):
    inter = synthetic.inter_df.astype({"user_id": object})
    inter.loc[2, "user_id"] = ""
    msg = error_of(write_pair(tmp_path, inter, synthetic.items_df))
    assert "interactions.csv" in msg and "user_id" in msg and "row 3" in msg


@pytest.mark.parametrize("which", ["interactions.csv", "items.csv"])
def test_empty_file(which, synthetic, tmp_path):
    inter, items = synthetic.inter_df, synthetic.items_df
    cfg = write_pair(tmp_path, "" if which == "interactions.csv" else inter, "" if which == "items.csv" else items)
    msg = error_of(cfg)
    assert which in msg and "empty" in msg


def test_header_only_file(synthetic, tmp_path):
    """A header without rows is a user error naming the file (not a crash inside `datasets`)."""
    msg = error_of(write_pair(tmp_path, "user_id,item_id,timestamp\n", synthetic.items_df))
    assert "interactions.csv" in msg


def test_unsupported_extension(synthetic, tmp_path):
    path = tmp_path / "interactions.xlsx"
    path.write_bytes(b"not a spreadsheet")
    items = tmp_path / "items.csv"
    synthetic.items_df.to_csv(items, index=False)
    msg = error_of(DataConfig(source="files", interactions=str(path), items=str(items), text_template=TEXT_TEMPLATE))
    assert "interactions.xlsx" in msg and ".xlsx" in msg


def test_missing_file(synthetic, tmp_path):
    msg = error_of(DataConfig(source="files", interactions=str(tmp_path / "nope.csv"), items=str(synthetic.items)))
    assert "nope.csv" in msg and "not found" in msg


def test_files_source_needs_both_paths():
    with pytest.raises(LlmkdError, match="data.items"):
        DataConfig(source="files", interactions="x.csv")


# ---------------------------------------------------------------- ml-100k (real data)


@pytest.mark.slow
def test_ml100k_split_and_popularity_match_peers():
    """docs/protocol.md and docs/peers.md: split checksums and 'popularity, counted correctly' NDCG@10."""
    from llmkd.data import ml100k_dir
    from llmkd.evaluation.metrics import evaluate_scores, popularity_scorer

    try:
        ml100k_dir()
    except LlmkdError as e:
        pytest.skip(str(e))
    data = build_data(DataConfig())
    assert (data.num_users, data.num_items, sum(len(t) for t in data.train)) == (943, 1682, 98_114)
    assert split_checksums(data) == {
        "valid": "c260399e2dff7e830168847f8165ee0f22e37703b378371498efaaa742e822cd",
        "test": "625089793b2dcbdddd538ef1a858955f83c9e84c2d26f25e4d11ce5d181b5983",
    }
    pop = popularity_scorer(data)
    test = evaluate_scores(data, "test", pop, ks=(10,))["ndcg@10"]
    valid = evaluate_scores(data, "valid", pop, ks=(10,))["ndcg@10"]
    assert len(test) == 943
    assert test.mean() == pytest.approx(0.0449, abs=1e-4)
    assert valid.mean() == pytest.approx(0.0345, abs=1e-4)


def test_cold_items_are_withheld_from_every_split(synthetic, synthetic_data, tmp_path):
    """data.cold_items removes a fraction of items with all their interactions; they are kept aside with
    the users who interacted with them, and survive a save / load round trip."""
    data = build_data(synthetic.data_config(cold_items=0.25, cold_seed=1))
    cold = set(data.cold_item_ids)
    interacted = set(synthetic.inter_df["item_id"].astype(str))
    assert len(cold) == round(0.25 * len(interacted)) and cold <= interacted
    assert not cold & set(data.item_ids)
    assert set(data.item_ids) | cold == set(synthetic_data.item_ids)
    seen = {data.item_ids[i] for seq in data.train for i in seq}
    seen |= {data.item_ids[i] for i in np.concatenate([data.valid_item, data.test_item]) if i >= 0}
    assert not seen & cold
    inter = synthetic.inter_df.astype({"user_id": str, "item_id": str})
    for iid, users in zip(data.cold_item_ids, data.cold_item_users):
        expected = {data.user_ids.index(u) for u in inter.loc[inter["item_id"] == iid, "user_id"] if u in data.user_ids}
        assert set(users) == expected and users
    n_warm_inter = len(inter) - int(inter["item_id"].isin(cold).sum())
    assert sum(len(t) for t in data.train) + (data.valid_item >= 0).sum() + (data.test_item >= 0).sum() == n_warm_inter
    assert data.fingerprint != synthetic_data.fingerprint
    assert build_data(synthetic.data_config(cold_items=0.25, cold_seed=2)).cold_item_ids != data.cold_item_ids
    save_data(data, tmp_path / "d", synthetic.data_config(cold_items=0.25, cold_seed=1))
    back = load_data(tmp_path / "d")
    assert (back.cold_item_ids, back.cold_item_texts, back.cold_item_users) == (
        data.cold_item_ids, data.cold_item_texts, data.cold_item_users)
    save_data(synthetic_data, tmp_path / "warm", synthetic.data_config())  # without cold items: no cold file
    assert not (tmp_path / "warm" / "cold_items.jsonl").exists() and load_data(tmp_path / "warm").cold_item_ids == []


@pytest.mark.parametrize("fraction", [1e-6, 0.999])
def test_cold_fraction_that_leaves_no_cold_or_no_warm_item_is_refused(synthetic, fraction):
    with pytest.raises(LlmkdError, match="expected at least one cold and one warm item"):
        build_data(synthetic.data_config(cold_items=fraction))


def test_data_without_evaluation_users_is_refused_by_later_stages(tmp_path):
    """No user with 3 interactions: the split saves (the data stage warns), but reading it back for a
    later stage is one error with the counts, not a crash on an empty valid split."""
    from llmkd.data import no_eval_users

    inter = tmp_path / "inter.csv"
    inter.write_text("user_id,item_id,timestamp\n1,a,1\n1,b,2\n2,a,1\n", encoding="utf-8")
    items = tmp_path / "items.csv"
    items.write_text("item_id,title\na,A\nb,B\n", encoding="utf-8")
    cfg = DataConfig(source="files", interactions=str(inter), items=str(items))
    data = build_data(cfg)
    assert no_eval_users(data) == ("no user has 3 or more interactions (2 users, 3 interactions), so no user has a "
                                   "valid or test item")
    save_data(data, tmp_path / "data", cfg)
    with pytest.raises(LlmkdError, match=r"data: no user has 3 or more interactions \(2 users, 3 interactions\)"):
        load_data(tmp_path / "data")
    assert load_data(tmp_path / "data", need_eval_users=False).num_users == 2
