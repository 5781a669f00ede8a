"""Interactions + item text: loading, validation, the leave-last-out split, and the `data/` artifact.

Split (docs/protocol.md): per user, interactions sorted by timestamp with ties kept in file order; last ->
test, second last -> valid, the rest -> train. Users with fewer than 3 interactions go to train only.

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

import csv
import importlib.util
import json
import logging
import string
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from safetensors.numpy import load_file, save_file

from llmkd.artifacts import (
    LlmkdError,
    StageTimer,
    atomic_dir,
    hash_files,
    new_meta,
    read_meta,
    reading,
    write_json,
)
from llmkd.config import DataConfig
from llmkd.paths import readable_file

INTERACTION_COLUMNS = ("user_id", "item_id", "timestamp")
ML100K_ITEM_COLUMNS = {"movie_title": "title", "release_year": "year", "class": "genres"}
ML100K_TEMPLATE = "{title} ({year}). Genres: {genres}"
FORMATS = {".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".jsonl": "json", ".json": "json"}


def ml100k_dir() -> Path:
    """The MovieLens-100K folder inside the installed recbole wheel (the package is not imported)."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise LlmkdError("recbole: not installed; `pip install --no-deps recbole==1.2.1` brings ml-100k")
    folder = Path(spec.submodule_search_locations[0]) / "dataset_example" / "ml-100k"
    if not (folder / "ml-100k.inter").is_file():
        raise LlmkdError(f"{folder}: ml-100k.inter not found in the recbole package")
    return folder


def read_table(path: str | Path, required: Sequence[str] = ()) -> pd.DataFrame:
    """Read a CSV / TSV / Parquet / JSONL file with HF `datasets`; CSV and TSV columns stay strings.

    `required` columns are checked on a CSV's header before the file is parsed (a big file with the
    wrong delimiter fails at once), and on every format's columns after.
    """
    path = readable_file(path)
    suffix = ".tsv" if path.name.endswith(".inter") or path.name.endswith(".item") else path.suffix.lower()
    fmt = FORMATS.get(suffix)
    if fmt is None:
        raise LlmkdError(f"{path}: unsupported format {suffix!r}; expected one of {sorted(FORMATS)}")
    if path.stat().st_size == 0:
        raise LlmkdError(f"{path}: empty file")
    atomic = suffix != path.suffix.lower()  # RecBole atomic file: 'name:type' headers
    header: list[str] = []
    if fmt == "csv":
        sep = "\t" if suffix == ".tsv" else ","
        try:
            with open(path, encoding="utf-8-sig", newline="") as f:
                reader = csv.reader(f, delimiter=sep)
                header = next(reader, [])
                try:
                    has_rows = next(reader, None) is not None
                except csv.Error:  # e.g. a field over the csv module's size limit; pandas reads it below
                    has_rows = True
        except UnicodeDecodeError as e:
            raise LlmkdError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x})") from None
        if len(set(header)) != len(header) or any(not c for c in header):
            raise LlmkdError(f"{path}: header row has empty or repeated column names: {header}")
        if not atomic:
            _require_columns(header, required, path)
        if not has_rows:
            raise LlmkdError(f"{path}: no data rows after the header")
    import datasets

    datasets.disable_progress_bars()
    kwargs: dict = {}
    if fmt == "csv":
        features = datasets.Features({c: datasets.Value("string") for c in header})
        kwargs = dict(delimiter=sep, features=features, keep_default_na=False, encoding="utf-8-sig")
    datasets_logger = logging.getLogger("datasets")
    level = datasets_logger.level
    datasets_logger.setLevel(logging.CRITICAL)  # its parser errors would print a second line; ours says it
    try:
        ds = datasets.load_dataset(fmt, data_files=str(path), split="train", **kwargs)
    except Exception as e:  # datasets wraps parser errors in several types
        raise LlmkdError(f"{path}: {_parse_failure(e, suffix)}") from None
    finally:
        datasets_logger.setLevel(level)
    df = ds.to_pandas()
    if atomic:
        df.columns = [c.split(":")[0] for c in df.columns]
    _require_columns(list(df.columns), required, path)
    return df


def _parse_failure(e: BaseException, suffix: str) -> str:
    """The root cause of a `datasets` load error, as a short phrase (datasets hides it behind a wrapper)."""
    while e.__cause__ is not None or (e.__context__ is not None and "generating the dataset" in str(e)):
        e = e.__cause__ or e.__context__
    if isinstance(e, UnicodeDecodeError):
        return f"not UTF-8 text (byte {e.object[e.start]:#04x})"
    lines = str(e).strip().splitlines()
    return f"could not be parsed as {suffix} ({lines[0] if lines else type(e).__name__})"


def _require_columns(columns: Sequence[str], required: Sequence[str], path: Path | str) -> None:
    missing = [c for c in required if c not in columns]
    if missing:
        found = [str(c) for c in columns]
        hint = ""
        if len(found) == 1 and any(sep in found[0] for sep in ";|\t,"):
            hint = " (wrong delimiter? .csv files are comma-separated, .tsv tab-separated)"
        elif found and all(c.strip().lstrip("-").replace(".", "", 1).isdigit() for c in found):
            hint = " (no header row? the first line must name the columns)"
        raise LlmkdError(f"{path}: missing column(s) {missing}; found {found}{hint}")


def _require_scalars(col: pd.Series, field: str, path: Path | str) -> None:
    """Refuse a nested object or list in a column of ids or timestamps (JSONL / Parquet): turned into
    text it would be a new id (or no time at all), silently."""
    if col.dtype != object:
        return
    nested = col.map(lambda v: isinstance(v, (dict, list, tuple, np.ndarray))).to_numpy(dtype=bool)
    if nested.any():
        row = int(np.flatnonzero(nested)[0])
        value = col.iloc[row]
        kind = "a nested object" if isinstance(value, dict) else "a list"
        shown = repr(value.tolist() if isinstance(value, np.ndarray) else value)
        raise LlmkdError(f"{path}: row {row + 1}: field '{field}' is {kind} ({shown[:60]}); expected a single value")


def _as_ids(col: pd.Series, field: str, path: Path | str) -> pd.Series:
    _require_scalars(col, field, path)
    ids = col.astype("string").str.strip()
    bad = ids.isna() | (ids == "") | (ids.str.lower() == "nan")
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise LlmkdError(f"{path}: row {row + 1}: field '{field}' is {col.iloc[row]!r}; expected an id, not empty or NaN")
    # integral floats from Parquet/JSON (1.0) become "1" so they match CSV ids
    return ids.str.replace(r"^(-?\d+)\.0+$", r"\1", regex=True).astype(str)


def load_interactions(path: str | Path) -> pd.DataFrame:
    """Interactions as (user_id str, item_id str, timestamp float64), file order kept."""
    df = read_table(path, INTERACTION_COLUMNS)
    if len(df) == 0:
        raise LlmkdError(f"{path}: no interactions")
    out = pd.DataFrame({"user_id": _as_ids(df["user_id"], "user_id", path), "item_id": _as_ids(df["item_id"], "item_id", path)})
    out["timestamp"] = as_seconds(df["timestamp"], path)
    return out


def as_seconds(col: pd.Series, path: Path | str) -> np.ndarray:
    """Timestamps -> (n,) float64 seconds. One rule for every format: a file's timestamps are all numbers
    (any finite value, e.g. Unix seconds) or all ISO-8601 date-times (text, or a Parquet / JSONL datetime
    column); a date-time without an offset is UTC. Row 1 says which; a row of the other kind is an error."""
    _require_scalars(col, "timestamp", path)
    if pd.api.types.is_datetime64_any_dtype(col):
        dates = col.dt.tz_localize("UTC") if col.dt.tz is None else col
        return _seconds_since_epoch(dates, col, path, "a date-time")
    numbers = pd.to_numeric(col, errors="coerce").to_numpy(dtype=float, na_value=np.nan)
    if np.isfinite(numbers[0]):
        bad = ~np.isfinite(numbers)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise LlmkdError(f"{path}: row {row + 1}: field 'timestamp' is {col.iloc[row]!r}; expected a number "
                             f"like row 1 ({TIMESTAMP_RULE})")
        return numbers
    dates = pd.to_datetime(col.astype("string"), format="ISO8601", utc=True, errors="coerce")
    dates[np.isfinite(numbers)] = pd.NaT  # a bare number is not a date-time here (pandas would read '1002' as a year)
    first = "a number or an ISO-8601 date-time" if pd.isna(dates.iloc[0]) else "an ISO-8601 date-time like row 1"
    return _seconds_since_epoch(dates, col, path, first)


TIMESTAMP_RULE = "a file's timestamps are all numbers or all ISO-8601 date-times"


def _seconds_since_epoch(dates: pd.Series, raw: pd.Series, path: Path | str, expected: str) -> np.ndarray:
    """UTC datetimes -> float64 seconds since 1970-01-01; a missing one (NaT) is an error naming its row."""
    bad = dates.isna().to_numpy()
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise LlmkdError(f"{path}: row {row + 1}: field 'timestamp' is {raw.iloc[row]!r}; expected {expected} "
                         f"({TIMESTAMP_RULE})")
    return ((dates - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(seconds=1)).to_numpy(dtype=np.float64)


def render_texts(items: pd.DataFrame, template: str, path: Path | str) -> list[str]:
    """Apply `template` (a format string over item columns) to every item row."""
    fields = [f for _, f, _, _ in string.Formatter().parse(template) if f]
    _require_columns(list(items.columns), fields, f"{path} (data.text_template {template!r})")
    texts = []
    cols = {f: items[f].astype("string").fillna("").to_numpy() for f in set(fields)}
    for i in range(len(items)):
        text = template.format(**{f: cols[f][i] for f in cols}).strip()
        if not any(str(cols[f][i]).strip() for f in cols):
            raise LlmkdError(f"{path}: row {i + 1} (item_id {items['item_id'].iloc[i]}): empty item text")
        texts.append(text)
    return texts


def load_items(path: str | Path, template: str) -> tuple[list[str], list[str]]:
    """Item ids and rendered texts, in file order; duplicate ids and empty texts are errors."""
    df = read_table(path, ["item_id"])
    if Path(path).suffix == ".item":
        df = df.rename(columns=lambda c: ML100K_ITEM_COLUMNS.get(c, c))
    if len(df) == 0:
        raise LlmkdError(f"{path}: no items")
    ids = _as_ids(df["item_id"], "item_id", path)
    dup = ids.duplicated()
    if dup.any():
        row = int(np.flatnonzero(dup.to_numpy())[0])
        raise LlmkdError(f"{path}: row {row + 1}: duplicate item_id {ids.iloc[row]!r}; item ids must be unique")
    return list(ids), render_texts(df, template, path)


@dataclass
class RecData:
    """A split data set. Users and items are internal indices; `train[u]` is (n,) int64 in time order."""

    user_ids: list[str]
    item_ids: list[str]
    item_texts: list[str]
    train: list[np.ndarray]
    valid_item: np.ndarray
    test_item: np.ndarray
    fingerprint: str
    cold_item_ids: list[str] = field(default_factory=list)
    """Items withheld from everything above (data.cold_items), their texts, and who interacted with each."""
    cold_item_texts: list[str] = field(default_factory=list)
    cold_item_users: list[list[int]] = field(default_factory=list)

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
        return np.bincount(np.concatenate(self.train), minlength=self.num_items)


def split_leave_last_out(inter: pd.DataFrame, item_ids: list[str], path: Path | str) -> tuple:
    """Map ids to indices and split per user (stable sort: ties keep file order)."""
    index = {iid: i for i, iid in enumerate(item_ids)}
    items = inter["item_id"].map(index)
    if items.isna().any():
        bad = items.isna().to_numpy()
        row = int(np.flatnonzero(bad)[0])
        raise LlmkdError(
            f"{path}: row {row + 1}: item_id {inter['item_id'].iloc[row]!r} is not in the items file "
            f"({int(bad.sum())} interaction(s) name unknown items)"
        )
    user_ids = sorted(inter["user_id"].unique(), key=lambda s: (0, int(s), s) if s.lstrip("-").isdigit() else (1, 0, s))
    uindex = {u: i for i, u in enumerate(user_ids)}
    users = inter["user_id"].map(uindex).to_numpy(np.int64)
    items = items.to_numpy(np.int64)
    order = np.argsort(inter["timestamp"].to_numpy(), kind="stable")
    order = order[np.argsort(users[order], kind="stable")]
    users, items = users[order], items[order]
    bounds = np.searchsorted(users, np.arange(len(user_ids) + 1))
    train, valid, test = [], np.full(len(user_ids), -1), np.full(len(user_ids), -1)
    for u in range(len(user_ids)):
        seq = items[bounds[u] : bounds[u + 1]]
        if len(seq) >= 3:
            train.append(seq[:-2])
            valid[u], test[u] = seq[-2], seq[-1]
        else:
            train.append(seq)
    return list(user_ids), train, valid, test


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
        uindex = {u: i for i, u in enumerate(user_ids)}
        data.cold_item_ids, data.cold_item_texts = cold[0], cold[1]
        # users known only through cold items have no warm history to recommend from: left out
        data.cold_item_users = [sorted({uindex[u] for u in users if u in uindex}) for users in cold[2]]
    return data


def withhold_items(inter: pd.DataFrame, item_ids: list[str], texts: list[str], fraction: float, seed: int,
                   path: Path | str) -> tuple:
    """Draw `fraction` of the interacted items as cold items and remove them with all their interactions.

    Returns the warm interactions, warm item ids and texts, and (cold ids, cold texts, each cold item's
    user ids)."""
    interacted = set(inter["item_id"])
    used = [i for i in item_ids if i in interacted]
    n_cold = int(round(fraction * len(used)))
    if n_cold < 1 or n_cold >= len(used):
        raise LlmkdError(f"data.cold_items {fraction}: withholds {n_cold} of {len(used)} interacted items in {path}; "
                         "expected at least one cold and one warm item")
    rng = np.random.default_rng(seed)
    cold = set(rng.choice(np.array(used, dtype=object), n_cold, replace=False).tolist())
    is_cold = inter["item_id"].isin(cold).to_numpy()
    users_of = inter[is_cold].groupby("item_id")["user_id"].apply(list).to_dict()
    cold_ids = [i for i in item_ids if i in cold]
    text_of = dict(zip(item_ids, texts))
    warm = [(i, t) for i, t in zip(item_ids, texts) if i not in cold]
    return (inter[~is_cold].reset_index(drop=True), [i for i, _ in warm], [t for _, t in warm],
            (cold_ids, [text_of[i] for i in cold_ids], [users_of.get(i, []) for i in cold_ids]))


def save_data(data: RecData, folder: str | Path, cfg: DataConfig, timer: StageTimer | None = None) -> None:
    """Write the `data/` artifact atomically."""
    offsets = np.zeros(data.num_users + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(t) for t in data.train])
    with atomic_dir(folder) as tmp:
        save_file(
            {
                "train_items": np.concatenate(data.train).astype(np.int64),
                "train_offsets": offsets,
                "valid_item": data.valid_item.astype(np.int64),
                "test_item": data.test_item.astype(np.int64),
            },
            str(tmp / "split.safetensors"),
        )
        with open(tmp / "items.jsonl", "w", encoding="utf-8") as f:
            for iid, text in zip(data.item_ids, data.item_texts):
                f.write(json.dumps({"item_id": iid, "text": text}, ensure_ascii=False) + "\n")
        write_json(tmp / "users.json", data.user_ids)
        if data.cold_item_ids:
            with open(tmp / "cold_items.jsonl", "w", encoding="utf-8") as f:
                for iid, text, users in zip(data.cold_item_ids, data.cold_item_texts, data.cold_item_users):
                    f.write(json.dumps({"item_id": iid, "text": text, "users": users}, ensure_ascii=False) + "\n")
        stats = {
            "num_users": data.num_users,
            "num_items": data.num_items,
            "num_train": int(offsets[-1]),
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
    n = sum(len(t) for t in data.train) + int((data.valid_item >= 0).sum()) + int((data.test_item >= 0).sum())
    return (f"no user has 3 or more interactions ({data.num_users} users, {n} interactions), so no user has a "
            "valid or test item")


def load_data(folder: str | Path, need_eval_users: bool = True) -> RecData:
    """Read a `data/` artifact. Every stage after the data stage trains or scores against valid and test
    users, so data without any is refused (one line, rather than a crash later) unless `need_eval_users`
    is False."""
    folder = Path(folder)
    meta = read_meta(folder, "data")
    with reading(folder / "split.safetensors", "data split"):
        arrays = load_file(str(folder / "split.safetensors"))
        off = arrays["train_offsets"]
        train = [arrays["train_items"][off[u] : off[u + 1]] for u in range(len(off) - 1)]
        valid, test = arrays["valid_item"], arrays["test_item"]
    with reading(folder / "items.jsonl", "item list"):
        rows = [json.loads(line) for line in (folder / "items.jsonl").read_text(encoding="utf-8").splitlines()]
        item_ids, texts = [r["item_id"] for r in rows], [r["text"] for r in rows]
    with reading(folder / "users.json", "user list"):
        users = json.loads((folder / "users.json").read_text(encoding="utf-8"))
    data = RecData(users, item_ids, texts, train, valid, test, meta["data_fingerprint"])
    if (folder / "cold_items.jsonl").is_file():
        with reading(folder / "cold_items.jsonl", "cold item list"):
            rows = [json.loads(line) for line in (folder / "cold_items.jsonl").read_text(encoding="utf-8").splitlines()]
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
    import hashlib

    out = {}
    for split in ("valid", "test"):
        target = data.targets(split)
        users = data.eval_users(split)  # internal order: user ids sorted numerically where numeric
        text = "".join(f"{data.user_ids[u]},{data.item_ids[target[u]]}\n" for u in users)
        out[split] = hashlib.sha256(text.encode()).hexdigest()
    return out
