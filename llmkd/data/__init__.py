"""Interactions + item text: the leave-last-out split and the `data/` artifact (files are read by
`llmkd.data.tables`).

Split (docs/protocol.md): per user, interactions sorted by timestamp with ties kept in file order; last ->
test, second last -> valid, the rest -> train. Users with fewer than 3 interactions go to train only.
Everything is vectorised over interactions and users (two stable argsorts, offsets per user), so 10 M
interactions among 1 M users split in seconds.

Artifact `data/`:
    meta.json            stage, config, fingerprint, counts
    items.jsonl          one line per internal item index: {"item_id", "text"}
    users.json           original user id per internal user index
    split.safetensors    train_items (int64, concatenated), train_offsets (n_users + 1,),
                         valid_item, test_item (n_users,) int64, -1 where the user has none
    cold_items.jsonl     only with data.cold_items > 0: the withheld items {"item_id", "text", "users":
                         [internal indices of the users who interacted with it]}
"""

from __future__ import annotations

import hashlib
import itertools
import json
import operator
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from json.encoder import encode_basestring, encode_basestring_ascii
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from safetensors.numpy import load_file, save_file

from llmkd.data.tables import (  # noqa: F401  (re-exported: the data stage's public names)
    FORMATS,
    INTERACTION_COLUMNS,
    ML100K_ITEM_COLUMNS,
    as_seconds,
    load_interactions,
    load_items,
    ml100k_dir,
    read_table,
    render_texts,
)
from llmkd.infra.artifacts import (
    LlmkdError,
    StageTimer,
    atomic_dir,
    hash_files,
    new_meta,
    read_meta,
    reading,
    write_json,
)
from llmkd.infra.config import DataConfig

ML100K_TEMPLATE = "{title} ({year}). Genres: {genres}"
WRITE_ROWS = 100_000
"""Lines of items.jsonl encoded and written at a time."""


class Ragged(Sequence):
    """Rows of different lengths stored flat: row u is `values[offsets[u]:offsets[u + 1]]`, a view.

    Behaves as a read-only list of (n_u,) int64 arrays (`train[u]`, `len`, iteration, `np.concatenate`)
    without holding one array object per row; `values` and `offsets` serve vectorised code."""

    def __init__(self, values: np.ndarray, offsets: np.ndarray) -> None:
        offsets = np.asarray(offsets, dtype=np.int64)
        if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(values) \
                or (np.diff(offsets) < 0).any():
            raise ValueError(f"offsets must rise from 0 to {len(values)} (the number of values)")
        self.values, self.offsets = np.asarray(values), offsets

    @classmethod
    def from_rows(cls, rows: Sequence[np.ndarray]) -> Ragged:
        """From a list of 1-d int arrays."""
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        values = np.concatenate(list(rows)).astype(np.int64) if len(rows) else np.zeros(0, np.int64)
        return cls(values, np.concatenate([[0], np.cumsum(lengths)]))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, u):
        if isinstance(u, slice):
            return [self[i] for i in range(*u.indices(len(self)))]
        u = operator.index(u)
        if u < 0:
            u += len(self)
        if not 0 <= u < len(self):
            raise IndexError(f"row {u} out of range for {len(self)} rows")
        return self.values[self.offsets[u] : self.offsets[u + 1]]

    def __iter__(self) -> Iterator[np.ndarray]:
        bounds = self.offsets.tolist()
        return (self.values[a:b] for a, b in itertools.pairwise(bounds))

    def lengths(self) -> np.ndarray:
        """(n_rows,) int64."""
        return np.diff(self.offsets)


@dataclass
class RecData:
    """A split data set. Users and items are internal indices; `train[u]` is (n,) int64 in time order
    (`train` is a `Ragged`; a list of arrays given here is converted)."""

    user_ids: list[str]
    item_ids: list[str]
    item_texts: list[str]
    train: Ragged
    valid_item: np.ndarray
    test_item: np.ndarray
    fingerprint: str
    cold_item_ids: list[str] = field(default_factory=list)
    """Items withheld from everything above (data.cold_items), their texts, and who interacted with each."""
    cold_item_texts: list[str] = field(default_factory=list)
    cold_item_users: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.train, Ragged):
            self.train = Ragged.from_rows(self.train)

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    def history(self, user: int, split: str) -> np.ndarray:
        """Items known before `split`'s held-out item: train for valid, train + valid for test."""
        if split == "valid":
            return self.train[user]
        if split == "test":
            v = self.valid_item[user]
            return self.train[user] if v < 0 else np.append(self.train[user], v)
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")

    def eval_users(self, split: str) -> np.ndarray:
        """Users with a held-out item in `split`, (n,) int64."""
        target = self.valid_item if split == "valid" else self.test_item
        return np.flatnonzero(target >= 0)

    def targets(self, split: str) -> np.ndarray:
        return self.valid_item if split == "valid" else self.test_item

    def item_counts(self) -> np.ndarray:
        """Train interactions per item, (n_items,) int64."""
        return np.bincount(self.train.values, minlength=self.num_items)

    def num_interactions(self) -> int:
        """Train + valid + test interactions."""
        return len(self.train.values) + int((self.valid_item >= 0).sum()) + int((self.test_item >= 0).sum())


def _codes(col: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """A column of ids -> (codes (n,) int64, distinct ids (k,) object) over the ids present in it."""
    if isinstance(col.dtype, pd.CategoricalDtype):
        codes, distinct = col.cat.codes.to_numpy().astype(np.int64), np.asarray(col.cat.categories, dtype=object)
    else:
        codes, distinct = pd.factorize(col)
        codes, distinct = codes.astype(np.int64), np.asarray(distinct, dtype=object)
    present = np.bincount(codes, minlength=len(distinct)) > 0
    if not present.all():  # rows were filtered out (cold items): drop ids no row names any more
        codes, distinct = (np.cumsum(present) - 1)[codes], distinct[present]
    return codes, distinct


def _python_key(s: str) -> tuple:
    return (0, int(s), s) if s.lstrip("-").isdigit() else (1, 0, s)


def id_order(ids: np.ndarray) -> np.ndarray:
    """The permutation that sorts ids (k,) str as `sorted(key=_python_key)` does: integers by value (then
    text), before the other ids by text. Vectorised for ASCII ids of up to 18 digits; others fall back."""
    text = pa.array(ids, type=pa.string())
    if len(ids) and pc.all(pc.string_is_ascii(text)).as_py():
        numeric = pc.match_substring_regex(text, r"^-?[0-9]{1,18}$")
        if pc.all(pc.equal(numeric, pc.match_substring_regex(text, r"^-*[0-9]+$"))).as_py():
            numeric_np = numeric.to_numpy(zero_copy_only=False)
            values = np.zeros(len(ids), dtype=np.int64)
            values[numeric_np] = pc.cast(pc.filter(text, numeric), pa.int64()).to_numpy()
            text_rank = np.empty(len(ids), dtype=np.int64)
            text_rank[pc.sort_indices(text).to_numpy()] = np.arange(len(ids))  # byte order = code point order
            return np.lexsort((text_rank, values, ~numeric_np))
    return np.array(sorted(range(len(ids)), key=lambda i: _python_key(ids[i])), dtype=np.int64)


def split_leave_last_out(inter: pd.DataFrame, item_ids: list[str], path: Path | str) -> tuple:
    """Map ids to indices and split per user (stable sort: ties keep file order).

    Returns (user ids list[str], train Ragged, valid_item (n_users,) int64, test_item (n_users,) int64)."""
    item_codes, item_names = _codes(inter["item_id"])
    items = pd.Index(item_ids).get_indexer(item_names)[item_codes]
    unknown = items < 0
    if unknown.any():
        row = int(np.flatnonzero(unknown)[0])
        raise LlmkdError(
            f"{path}: row {row + 1}: item_id {inter['item_id'].iloc[row]!r} is not in the items file "
            f"({int(unknown.sum())} interaction(s) name unknown items)"
        )
    user_codes, user_names = _codes(inter["user_id"])
    perm = id_order(user_names)
    rank = np.empty(len(perm), dtype=np.int64)
    rank[perm] = np.arange(len(perm))
    users = rank[user_codes]
    order = np.argsort(inter["timestamp"].to_numpy(), kind="stable")
    order = order[np.argsort(users[order], kind="stable")]
    items = items[order].astype(np.int64)
    counts = np.bincount(users, minlength=len(perm))
    ends, held = np.cumsum(counts), counts >= 3
    valid, test = np.full(len(perm), -1, dtype=np.int64), np.full(len(perm), -1, dtype=np.int64)
    valid[held], test[held] = items[ends[held] - 2], items[ends[held] - 1]
    keep = np.ones(len(items), dtype=bool)
    keep[ends[held] - 1] = keep[ends[held] - 2] = False
    offsets = np.concatenate([[0], np.cumsum(counts - 2 * held)])
    return user_names[perm].tolist(), Ragged(items[keep], offsets), valid, test


def item_text_template(source: str, template: str) -> str:
    """The template item texts are rendered with: ml-100k's own for the default '{title}' there."""
    return ML100K_TEMPLATE if source == "ml-100k" and template == "{title}" else template


def build_data(cfg: DataConfig) -> RecData:
    """Load and validate the configured files, render item text, and split."""
    if cfg.source == "ml-100k":
        folder = ml100k_dir()
        inter_path, items_path = folder / "ml-100k.inter", folder / "ml-100k.item"
        template = item_text_template(cfg.source, cfg.text_template)
    else:
        inter_path, items_path, template = Path(cfg.interactions), Path(cfg.items), cfg.text_template
    inter = load_interactions(inter_path)  # first: the big file, whose header is checked before parsing
    item_ids, texts = load_items(items_path, template)
    extra = {"template": template, "source": cfg.source}
    cold = None
    if cfg.cold_items > 0:
        extra.update(cold_items=cfg.cold_items, cold_seed=cfg.cold_seed)
        inter, item_ids, texts, cold = withhold_items(inter, item_ids, texts, cfg.cold_items, cfg.cold_seed, inter_path)
    user_ids, train, valid, test = split_leave_last_out(inter, item_ids, inter_path)
    fp = hash_files([inter_path, items_path], extra=extra)
    data = RecData(user_ids, item_ids, texts, train, valid, test, fp)
    if cold is not None:
        data.cold_item_ids, data.cold_item_texts = cold[0], cold[1]
        data.cold_item_users = cold_users(cold[2], data.cold_item_ids, user_ids)
    return data


def withhold_items(inter: pd.DataFrame, item_ids: list[str], texts: list[str], fraction: float, seed: int,
                   path: Path | str) -> tuple:
    """Draw `fraction` of the interacted items as cold items and remove them with all their interactions.

    Returns the warm interactions, warm item ids and texts, and (cold ids, cold texts, the cold items'
    interactions as a DataFrame)."""
    _, names = _codes(inter["item_id"])
    ids = np.asarray(item_ids, dtype=object)
    used = ids[pd.Index(item_ids).isin(names)]
    n_cold = int(round(fraction * len(used)))
    if n_cold < 1 or n_cold >= len(used):
        raise LlmkdError(f"data.cold_items {fraction}: withholds {n_cold} of {len(used)} interacted items in {path}; "
                         "expected at least one cold and one warm item")
    rng = np.random.default_rng(seed)
    cold = rng.choice(used, n_cold, replace=False)
    is_cold = inter["item_id"].isin(cold).to_numpy()
    cold_item = pd.Index(item_ids).isin(cold)
    return (inter[~is_cold].reset_index(drop=True), ids[~cold_item].tolist(), np.asarray(texts, dtype=object)[~cold_item].tolist(),
            (ids[cold_item].tolist(), np.asarray(texts, dtype=object)[cold_item].tolist(), inter[is_cold]))


def cold_users(cold_inter: pd.DataFrame, cold_ids: list[str], user_ids: list[str]) -> list[list[int]]:
    """Per cold item, the sorted internal indices of the (warm) users who interacted with it; users known
    only through cold items have no warm history to recommend from and are left out."""
    item_codes, item_names = _codes(cold_inter["item_id"])
    user_codes, user_names = _codes(cold_inter["user_id"])
    item = pd.Index(cold_ids).get_indexer(item_names)[item_codes]
    user = pd.Index(user_ids).get_indexer(user_names)[user_codes]
    pairs = np.unique((item * len(user_ids) + user)[user >= 0])  # sorted by item, then user
    item, user = pairs // len(user_ids), pairs % len(user_ids)
    bounds = np.searchsorted(item, np.arange(len(cold_ids) + 1))
    return [user[a:b].tolist() for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist())]


def _write_items(path: Path, item_ids: list[str], texts: list[str]) -> None:
    """items.jsonl: the bytes `json.dumps({"item_id", "text"}, ensure_ascii=False)` writes per line, with
    the JSON string encoding done in C over chunks."""
    with open(path, "w", encoding="utf-8") as f:
        for a in range(0, len(item_ids), WRITE_ROWS):
            ids, txt = map(encode_basestring, item_ids[a : a + WRITE_ROWS]), map(encode_basestring, texts[a : a + WRITE_ROWS])
            f.write("".join(f'{{"item_id": {i}, "text": {t}}}\n' for i, t in zip(ids, txt)))


def save_data(data: RecData, folder: str | Path, cfg: DataConfig, timer: StageTimer | None = None) -> None:
    """Write the `data/` artifact atomically."""
    with atomic_dir(folder) as tmp:
        save_file(
            {
                "train_items": np.ascontiguousarray(data.train.values, dtype=np.int64),
                "train_offsets": data.train.offsets,
                "valid_item": data.valid_item.astype(np.int64),
                "test_item": data.test_item.astype(np.int64),
            },
            str(tmp / "split.safetensors"),
        )
        _write_items(tmp / "items.jsonl", data.item_ids, data.item_texts)
        listed = ",\n".join("  " + s for s in map(encode_basestring_ascii, data.user_ids))
        (tmp / "users.json").write_text(f"[\n{listed}\n]\n" if listed else "[]\n", encoding="utf-8")  # = write_json
        if data.cold_item_ids:
            with open(tmp / "cold_items.jsonl", "w", encoding="utf-8") as f:
                for iid, text, users in zip(data.cold_item_ids, data.cold_item_texts, data.cold_item_users):
                    f.write(json.dumps({"item_id": iid, "text": text, "users": users}, ensure_ascii=False) + "\n")
        stats = {
            "num_users": data.num_users,
            "num_items": data.num_items,
            "num_train": len(data.train.values),
            "num_valid": int((data.valid_item >= 0).sum()),
            "num_test": int((data.test_item >= 0).sum()),
            "num_cold_items": len(data.cold_item_ids),
            "num_cold_interactions": sum(len(u) for u in data.cold_item_users),
        }
        write_json(tmp / "meta.json", new_meta("data", asdict(cfg), data.fingerprint, stats=stats,
                                               timing=timer.as_dict() if timer else None))


def no_eval_users(data: RecData) -> str | None:
    """Why `data` has no user to tune or evaluate on (none with 3 interactions), with the counts; else None."""
    if len(data.eval_users("test")):
        return None
    return (f"no user has 3 or more interactions ({data.num_users} users, {data.num_interactions()} interactions), "
            "so no user has a valid or test item")


def _read_items(path: Path) -> tuple[list[str], list[str]]:
    """items.jsonl -> (ids, texts), parsed by Arrow's JSON reader."""
    import pyarrow.json as pj

    schema = pa.schema([("item_id", pa.string()), ("text", pa.string())])
    table = pj.read_json(path, parse_options=pj.ParseOptions(explicit_schema=schema))
    if table.column("item_id").null_count or table.column("text").null_count:
        raise ValueError("a line without item_id or text")
    return table.column("item_id").to_pylist(), table.column("text").to_pylist()


def load_data(folder: str | Path, need_eval_users: bool = True) -> RecData:
    """Read a `data/` artifact. Every stage after the data stage trains or scores against valid and test
    users, so data without any is refused (one line, rather than a crash later) unless `need_eval_users`
    is False."""
    folder = Path(folder)
    meta = read_meta(folder, "data")
    with reading(folder / "split.safetensors", "data split"):
        arrays = load_file(str(folder / "split.safetensors"))
        train = Ragged(arrays["train_items"], arrays["train_offsets"])
        valid, test = arrays["valid_item"], arrays["test_item"]
        if not len(valid) == len(test) == len(train):
            raise ValueError(f"{len(train)} users in train, {len(valid)} in valid, {len(test)} in test")
    with reading(folder / "items.jsonl", "item list"):
        item_ids, texts = _read_items(folder / "items.jsonl")
    with reading(folder / "users.json", "user list"):
        users = json.loads((folder / "users.json").read_text(encoding="utf-8"))
    data = RecData(users, item_ids, texts, train, valid, test, meta["data_fingerprint"])
    if (folder / "cold_items.jsonl").is_file():
        with reading(folder / "cold_items.jsonl", "cold item list"):
            lines = (folder / "cold_items.jsonl").read_text(encoding="utf-8").split("\n")  # not splitlines: U+2028
            rows = [json.loads(line) for line in lines if line]
            data.cold_item_ids = [r["item_id"] for r in rows]
            data.cold_item_texts = [r["text"] for r in rows]
            data.cold_item_users = [r["users"] for r in rows]
    why = no_eval_users(data) if need_eval_users else None
    if why:
        raise LlmkdError(f"{folder}: {why}; the teacher, LoRA tuning, distillation and evaluation need some "
                         "(a user's last two interactions are held out)")
    return data


def split_checksums(data: RecData) -> dict[str, str]:
    """SHA-256 of 'user_id,item_id\\n' lines of each held-out split, users sorted numerically (docs/protocol.md)."""
    out = {}
    users_text, items_text = pa.array(data.user_ids, type=pa.string()), pa.array(data.item_ids, type=pa.string())
    for split in ("valid", "test"):
        users = data.eval_users(split)  # internal order: user ids sorted numerically where numeric
        lines = pc.binary_join_element_wise(users_text.take(users), items_text.take(data.targets(split)[users]), ",")
        h = hashlib.sha256()
        for a in range(0, len(lines), WRITE_ROWS):
            h.update(("\n".join(lines[a : a + WRITE_ROWS].to_pylist()) + "\n").encode())
        out[split] = h.hexdigest()
    return out
