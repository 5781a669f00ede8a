"""A bundle's manifest: every file's size and SHA-256, and the bundle's version id over them.

    manifest.json  {"format": "llmkd-bundle-manifest", "format_version": 1, "version": "3f9c0a1b2d4e5f60",
                    "files": {"README.md": {"size": 2107, "sha256": "<64 hex>"}, "config.json": {...}, ...}}

`files` lists every file of the bundle but the manifest itself, by path relative to the bundle (POSIX
separators, sorted); names starting with a dot (a temporary file, `.DS_Store`) are not part of a bundle.
`version` is the first 16 hex digits of the SHA-256 of `files` as sorted JSON: it changes with any file
(`llmkd add-items` and `llmkd export-onnx` give a new one) and two copies of one bundle share it.

`check_files(folder)` is the check at every load: each listed file present with its size, and no file
that is not listed (the loader reads none it cannot vouch for). `check_files(folder, full=True)` also
hashes every file: `llmkd verify BUNDLE` and the start of `llmkd serve`. Any difference is one
LlmkdError naming the file and what differs (missing, size, sha256, not listed). A bundle without a
manifest (exported before bundles carried one) is refused: re-export it.

Imports nothing beyond the standard library and `llmkd.infra.artifacts`, so `llmkd serve`'s supervisor and
`llmkd verify` check a bundle without loading torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from llmkd.infra.artifacts import LlmkdError, write_json

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "llmkd-bundle-manifest"
MANIFEST_VERSION = 1
REEXPORT = "re-export the bundle (llmkd export ... --output BUNDLE)"


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def bundle_files(folder: Path) -> list[str]:
    """Every file under `folder` but the manifest and dot-names, as sorted relative POSIX paths."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [(Path(root) / f).relative_to(folder).as_posix() for f in files if not f.startswith(".")]
    return sorted(f for f in found if f != MANIFEST)


def version_of(files: dict[str, dict[str, Any]]) -> str:
    """The version id of a file list: first 16 hex digits of the SHA-256 of its sorted JSON."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]


def save_manifest(folder: Path, files: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Write `folder/manifest.json` for `files` (through a temporary file and a rename); returns it."""
    files = dict(sorted(files.items()))
    manifest = {"format": MANIFEST_FORMAT, "format_version": MANIFEST_VERSION, "version": version_of(files),
                "files": files}
    tmp = folder / f".{MANIFEST}.tmp"
    write_json(tmp, manifest)
    os.replace(tmp, folder / MANIFEST)
    return manifest


def write_manifest(folder: str | Path) -> dict[str, Any]:
    """Record every file of `folder` (size, SHA-256) in its manifest; the last write of an export."""
    folder = Path(folder)
    return save_manifest(folder, {rel: {"size": (folder / rel).stat().st_size, "sha256": sha256_of(folder / rel)}
                                  for rel in bundle_files(folder)})


def add_to_manifest(folder: str | Path, name: str) -> dict[str, Any]:
    """Record one new (or rewritten) file of a bundle, the others' entries kept as they are."""
    folder = Path(folder)
    files = read_manifest(folder)["files"]
    files[name] = {"size": (folder / name).stat().st_size, "sha256": sha256_of(folder / name)}
    return save_manifest(folder, files)


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """`folder/manifest.json`, checked to be one; a folder without one is refused, saying to re-export."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise LlmkdError(f"{folder}: {'is a file' if folder.exists() else 'not found'}; expected a bundle folder "
                         "(llmkd export)")
    if not path.is_file():
        raise LlmkdError(f"{folder}: no {MANIFEST}: not a bundle, or one exported before bundles listed their "
                         f"files; {REEXPORT}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LlmkdError(f"{path}: unreadable ({e}); {REEXPORT}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise LlmkdError(f"{path}: not a bundle manifest (format {MANIFEST_FORMAT!r} expected); {REEXPORT}")
    if manifest.get("format_version") != MANIFEST_VERSION:
        raise LlmkdError(f"{path}: manifest version {manifest.get('format_version')}, this llmkd reads "
                         f"{MANIFEST_VERSION}; {REEXPORT}")
    files = manifest.get("files")
    if not well_formed(files) or manifest.get("version") != version_of(files):
        raise LlmkdError(f"{path}: a malformed file list, or one that does not match its version id (edited by "
                         f"hand?); {REEXPORT}")
    return manifest


def well_formed(files: Any) -> bool:
    """{relative path inside the bundle: {"size": int, "sha256": str}}."""
    return isinstance(files, dict) and all(
        isinstance(rel, str) and not Path(rel).is_absolute() and ".." not in Path(rel).parts
        and isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str)
        for rel, e in files.items())


def problems(folder: Path, files: dict[str, dict[str, Any]], full: bool) -> list[str]:
    """What differs from the manifest, one message per file: missing, size, sha256 (`full`), not listed."""
    found = []
    for rel, want in files.items():
        path = folder / rel
        if not path.is_file():
            found.append(f"{path}: missing (listed in {MANIFEST}, {want['size']} bytes)")
        elif (size := path.stat().st_size) != want["size"]:
            found.append(f"{path}: size differs from {MANIFEST}: {size} bytes, expected {want['size']}")
        elif full and (digest := sha256_of(path)) != want["sha256"]:
            found.append(f"{path}: sha256 differs from {MANIFEST}: {digest[:16]}..., expected {want['sha256'][:16]}...")
    found += [f"{folder / rel}: not listed in {MANIFEST} (a bundle holds only the files its export wrote)"
              for rel in bundle_files(folder) if rel not in files]
    return found


def check_files(folder: str | Path, full: bool = False) -> str:
    """The bundle's version id, once every file matches its manifest: present with its size and nothing
    unlisted; with `full`, every SHA-256 too. Else one LlmkdError naming the first file that differs."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    found = problems(folder, manifest["files"], full)
    if found:
        more = f" (and {len(found) - 1} more file{'s' if len(found) > 2 else ''})" if len(found) > 1 else ""
        raise LlmkdError(f"{found[0]}{more}; the bundle changed since it was written: {REEXPORT}")
    return manifest["version"]
