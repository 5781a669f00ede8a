"""The user's interaction and item files: reading every format, validation with row-numbered errors,
ids, timestamps and rendered item text, vectorised (the data stage reads 10 M interactions).

Ids are normalised once per distinct value (`id_codes`), not once per row: a file of 10 M interactions
among 1 M users costs one hash pass over the rows plus string work on 1 M values. Interactions are held
as a DataFrame whose id columns are `pandas.Categorical` (int32 codes + the distinct ids as strings).
"""

from __future__ import annotations

import csv
import importlib.util
import logging
import string
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from llmkd.infra.artifacts import LlmkdError
from llmkd.infra.paths import readable_file

INTERACTION_COLUMNS = ("user_id", "item_id", "timestamp")
ML100K_ITEM_COLUMNS = {"movie_title": "title", "release_year": "year", "class": "genres"}
FORMATS = {".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".jsonl": "json", ".json": "json"}
SCALAR_KINDS = {"string", "integer", "floating", "mixed-integer-float", "boolean", "empty", "bytes"}
"""`pandas.api.types.infer_dtype` results of an object column that cannot hold a nested value."""


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
            require_columns(header, required, path)
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
    require_columns(list(df.columns), required, path)
    return df


def _parse_failure(e: BaseException, suffix: str) -> str:
    """The root cause of a `datasets` load error, as a short phrase (datasets hides it behind a wrapper)."""
    while e.__cause__ is not None or (e.__context__ is not None and "generating the dataset" in str(e)):
        e = e.__cause__ or e.__context__
    if isinstance(e, UnicodeDecodeError):
        return f"not UTF-8 text (byte {e.object[e.start]:#04x})"
    lines = str(e).strip().splitlines()
    return f"could not be parsed as {suffix} ({lines[0] if lines else type(e).__name__})"


def require_columns(columns: Sequence[str], required: Sequence[str], path: Path | str) -> None:
    """Refuse a table without the `required` columns, with a hint for a wrong delimiter or no header."""
    missing = [c for c in required if c not in columns]
    if missing:
        found = [str(c) for c in columns]
        hint = ""
        if len(found) == 1 and any(sep in found[0] for sep in ";|\t,"):
            hint = " (wrong delimiter? .csv files are comma-separated, .tsv tab-separated)"
        elif found and all(c.strip().lstrip("-").replace(".", "", 1).isdigit() for c in found):
            hint = " (no header row? the first line must name the columns)"
        raise LlmkdError(f"{path}: missing column(s) {missing}; found {found}{hint}")


def require_scalars(col: pd.Series, field: str, path: Path | str) -> None:
    """Refuse a nested object or list in a column of ids or timestamps (JSONL / Parquet): turned into
    text it would be a new id (or no time at all), silently."""
    if col.dtype != object or pd.api.types.infer_dtype(col, skipna=True) in SCALAR_KINDS:
        return
    nested = col.map(lambda v: isinstance(v, (dict, list, tuple, np.ndarray))).to_numpy(dtype=bool)
    if nested.any():
        row = int(np.flatnonzero(nested)[0])
        value = col.iloc[row]
        kind = "a nested object" if isinstance(value, dict) else "a list"
        shown = repr(value.tolist() if isinstance(value, np.ndarray) else value)
        raise LlmkdError(f"{path}: row {row + 1}: field '{field}' is {kind} ({shown[:60]}); expected a single value")


def id_codes(col: pd.Series, field: str, path: Path | str) -> tuple[np.ndarray, np.ndarray]:
    """Ids as text: (codes (n,) int64 into distinct ids, distinct ids (k,) object str in order of first
    appearance). Whitespace is stripped, integral floats from Parquet / JSON (1.0) become "1" so they
    match CSV ids; an empty or NaN id is an error naming its row. String work is done on distinct values."""
    require_scalars(col, field, path)
    codes, raw = pd.factorize(col, use_na_sentinel=True)
    ids = pd.Series(raw).astype("string").str.strip()
    bad = (ids.isna() | (ids == "") | (ids.str.lower() == "nan")).to_numpy(dtype=bool)
    bad_rows = codes < 0
    if bad.any():
        bad_rows |= bad[codes]
    if bad_rows.any():
        row = int(np.flatnonzero(bad_rows)[0])
        raise LlmkdError(f"{path}: row {row + 1}: field '{field}' is {col.iloc[row]!r}; expected an id, not empty or NaN")
    ids = ids.str.replace(r"^(-?\d+)\.0+$", r"\1", regex=True).astype(str)
    merged, distinct = pd.factorize(ids)  # '1' and 1.0 were two raw values, one id
    return merged.astype(np.int64)[codes], np.asarray(distinct, dtype=object)


def as_categorical(col: pd.Series, field: str, path: Path | str) -> pd.Categorical:
    """A column of ids -> Categorical over its distinct normalised ids (`id_codes`), rows in file order."""
    codes, distinct = id_codes(col, field, path)
    return pd.Categorical.from_codes(codes, categories=pd.Index(distinct, dtype=object))


def load_interactions(path: str | Path) -> pd.DataFrame:
    """Interactions as (user_id, item_id Categorical of str ids, timestamp float64), file order kept."""
    df = read_table(path, INTERACTION_COLUMNS)
    if len(df) == 0:
        raise LlmkdError(f"{path}: no interactions")
    out = pd.DataFrame({"user_id": as_categorical(df["user_id"], "user_id", path),
                        "item_id": as_categorical(df["item_id"], "item_id", path)})
    out["timestamp"] = as_seconds(df["timestamp"], path)
    return out


TIMESTAMP_RULE = "a file's timestamps are all numbers or all ISO-8601 date-times"


def as_seconds(col: pd.Series, path: Path | str) -> np.ndarray:
    """Timestamps -> (n,) float64 seconds. One rule for every format: a file's timestamps are all numbers
    (any finite value, e.g. Unix seconds) or all ISO-8601 date-times (text, or a Parquet / JSONL datetime
    column); a date-time without an offset is UTC. Row 1 says which; a row of the other kind is an error."""
    require_scalars(col, "timestamp", path)
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


def _seconds_since_epoch(dates: pd.Series, raw: pd.Series, path: Path | str, expected: str) -> np.ndarray:
    """UTC datetimes -> float64 seconds since 1970-01-01; a missing one (NaT) is an error naming its row."""
    bad = dates.isna().to_numpy()
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise LlmkdError(f"{path}: row {row + 1}: field 'timestamp' is {raw.iloc[row]!r}; expected {expected} "
                         f"({TIMESTAMP_RULE})")
    return ((dates - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(seconds=1)).to_numpy(dtype=np.float64)


def render_texts(items: pd.DataFrame, template: str, path: Path | str) -> list[str]:
    """Apply `template` (a format string over item columns) to every item row; an item whose every
    template field is blank is an error naming its row. Plain '{column}' fields are joined column-wise
    in Arrow (`str.strip` and Arrow's trim agree on every code point); format specs, conversions and
    attribute / index access go through `str.format` row by row."""
    parsed = list(string.Formatter().parse(template))
    fields = [f for _, f, _, _ in parsed if f]
    require_columns(list(items.columns), fields, f"{path} (data.text_template {template!r})")
    cols = {f: items[f].astype("string").fillna("") for f in set(fields)}
    blank = np.ones(len(items), dtype=bool)
    for col in cols.values():
        blank &= (col.str.strip() == "").to_numpy(dtype=bool)
    if blank.any():
        i = int(np.flatnonzero(blank)[0])
        raise LlmkdError(f"{path}: row {i + 1} (item_id {items['item_id'].iloc[i]}): empty item text")
    if all(f in cols and not spec and conv is None for _, f, spec, conv in parsed if f is not None):
        text = pd.Series([""] * len(items), dtype="string", index=items.index)
        for literal, f, _, _ in parsed:
            text = text + literal + cols[f] if f is not None else text + literal
        return text.str.strip().tolist()
    values = {f: c.to_numpy() for f, c in cols.items()}
    return [template.format(**{f: values[f][i] for f in values}).strip() for i in range(len(items))]


def load_items(path: str | Path, template: str) -> tuple[list[str], list[str]]:
    """Item ids and rendered texts, in file order; duplicate ids and empty texts are errors."""
    df = read_table(path, ["item_id"])
    if Path(path).suffix == ".item":
        df = df.rename(columns=lambda c: ML100K_ITEM_COLUMNS.get(c, c))
    if len(df) == 0:
        raise LlmkdError(f"{path}: no items")
    codes, distinct = id_codes(df["item_id"], "item_id", path)
    if len(distinct) < len(codes):
        row = int(np.flatnonzero(pd.Series(codes).duplicated().to_numpy())[0])
        raise LlmkdError(f"{path}: row {row + 1}: duplicate item_id {distinct[codes[row]]!r}; item ids must be unique")
    return distinct.tolist(), render_texts(df, template, path)
