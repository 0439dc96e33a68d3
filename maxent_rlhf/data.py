"""Dataset loading shared by the scripts: a hub id (`trl-lib/tldr`) or a local json/jsonl/parquet file.

Column checks name the missing column and the columns that were found. Script-specific tokenisation
(SFT, pairwise, listwise, prompts for RLOO) lives next to it below, each in its own function.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

from .artifacts import resolve_path

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(ValueError):
    """A dataset problem the user can fix; the message names the file/column/row."""


def load_any_dataset(name_or_path: str, split: str = "train"):
    """A `datasets.Dataset` from a local file / directory of files, or a hub id (users with internet)."""
    import datasets

    name_or_path = resolve_path(name_or_path)
    path = Path(name_or_path)
    if path.suffix in LOCAL_FORMATS:
        if not path.is_file():
            raise DataError(f"dataset file {name_or_path!r} does not exist")
        return datasets.load_dataset(LOCAL_FORMATS[path.suffix], data_files=str(path), split="train")
    if path.is_dir():
        # a directory with <split>.jsonl / <split>.parquet files, or a saved dataset (save_to_disk)
        for ext, fmt in LOCAL_FORMATS.items():
            f = path / f"{split}{ext}"
            if f.is_file():
                return datasets.load_dataset(fmt, data_files=str(f), split="train")
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            ds = datasets.load_from_disk(str(path))
            return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        raise DataError(f"dataset directory {name_or_path!r} has no {split}.jsonl/.json/.parquet/.csv file")
    return datasets.load_dataset(name_or_path, split=split)


def require_columns(dataset, columns: Iterable[str], source: str) -> None:
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise DataError(
            f"{source}: missing column(s) {missing}; found columns {dataset.column_names}. "
            "Rename them (e.g. with datasets' rename_column) or point to a dataset with these columns."
        )


def as_text(value, source: str, row: int, column: str) -> str:
    """A plain string, or the assistant text of a list of {role, content} messages (TRL-style data)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(m, dict) and "content" in m for m in value):
        assistant = [m["content"] for m in value if m.get("role") == "assistant"]
        return assistant[-1] if assistant else value[-1]["content"]
    raise DataError(
        f"{source}: row {row}, column `{column}` must be a string or a list of {{role, content}} messages, "
        f"got {type(value).__name__}"
    )
