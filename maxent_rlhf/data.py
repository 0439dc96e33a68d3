"""Dataset loading shared by the scripts: a hub id (`trl-lib/tldr`), a local json/jsonl/parquet/csv file,
a directory of `<split>.jsonl` files, or a registered location such as `toylab://prompts`.

Column checks name the missing column and the columns that were found. Below: train_rloo.py's prompt
stream and prompt tokenisation (`PromptStream`, `tokenize_prompts`), then the tokenisation and padding
of train_offline.py's SFT, pairwise and listwise examples (`tokenize_offline_dataset`, `collate_responses`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from .artifacts import is_local_path, resolve_path

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(ValueError):
    """A dataset problem the user can fix; the message names the file/column/row."""


def is_hub_dataset(name_or_path: str) -> bool:
    """Whether `load_any_dataset` reads `name_or_path` from the hub (not a local file or directory)."""
    resolved = resolve_path(name_or_path)
    path = Path(resolved).expanduser()
    return path.suffix not in LOCAL_FORMATS and not path.is_dir() and not is_local_path(resolved)


def load_any_dataset(name_or_path: str, split: str = "train", revision: Optional[str] = None):
    """A `datasets.Dataset` from a local file / directory of files, or a hub id (users with internet).

    Local JSON / JSONL files are checked line by line first (`check_json_file`), so that a broken line
    or an empty file is a DataError naming the file and the line, not an error deep inside `datasets`.
    A dataset without rows is a DataError too. `revision` (branch, tag or commit; None: the default
    branch) pins a hub dataset; it is an error for local data.
    """
    import datasets

    if revision is not None and not is_hub_dataset(name_or_path):
        raise DataError(f"dataset revision {revision!r} given for the local dataset {name_or_path!r}: revisions "
                        "pin hub datasets only; drop the revision")

    name_or_path = resolve_path(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.suffix in LOCAL_FORMATS:
        if not path.is_file():
            raise DataError(f"dataset file {name_or_path!r} does not exist")
        return _load_local_file(path, name_or_path)
    if path.is_dir():
        # a directory with <split>.jsonl / <split>.parquet files, or a saved dataset (save_to_disk)
        for ext in LOCAL_FORMATS:
            f = path / f"{split}{ext}"
            if f.is_file():
                return _load_local_file(f, str(f))
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"dataset {name_or_path!r} has no split {split!r}; its splits: {list(ds)}")
                ds = ds[split]
            return _require_rows(ds, name_or_path)
        raise DataError(f"dataset directory {name_or_path!r} has no {split}.jsonl/.json/.parquet/.csv file")
    if is_local_path(name_or_path):
        raise DataError(f"dataset {name_or_path!r}: directory does not exist (a local path; a hub id looks like owner/name)")
    try:
        ds = datasets.load_dataset(name_or_path, split=split, revision=revision)
    except ValueError as e:  # e.g. 'Unknown split "x". Should be one of [...]'
        raise DataError(f"dataset {name_or_path!r}, split {split!r}: {_first_line(e)}") from e
    except (ConnectionError, OSError, datasets.exceptions.DatasetsError) as e:
        raise DataError(
            f"dataset {name_or_path!r} cannot be loaded from the hub ({type(e).__name__}: {_first_line(e)}); "
            "for local data give a .jsonl/.json/.parquet/.csv file or a directory of <split>.jsonl files"
        ) from e
    return _require_rows(ds, f"{name_or_path} [{split}]")


def _first_line(err: BaseException) -> str:
    lines = [l.strip() for l in str(err).splitlines() if l.strip()]
    return lines[0] if lines else type(err).__name__


def _require_rows(ds, source: str):
    if len(ds) == 0:
        raise DataError(f"{source}: the dataset has no rows")
    return ds


def _load_local_file(path: Path, source: str):
    import datasets

    fmt = LOCAL_FORMATS[path.suffix]
    if fmt == "json":
        check_json_file(path)
    elif path.stat().st_size == 0:
        raise DataError(f"{source}: the file is empty (no rows)")
    try:
        ds = datasets.load_dataset(fmt, data_files=str(path), split="train")
    except (ValueError, OSError, datasets.exceptions.DatasetsError) as e:
        cause = e.__cause__ or e.__context__ or e
        raise DataError(f"{source}: cannot be read as {path.suffix[1:]} ({_first_line(cause)})") from e
    return _require_rows(ds, source)


def check_json_file(path: str | Path) -> int:
    """Check a local .json / .jsonl dataset file as `datasets`' json loader will read it; returns the rows.

    Accepted: JSON Lines (one JSON object per line; blank lines skipped) or, in a .json file, one JSON
    array of objects. Raises a DataError naming the file and the line for an empty file, a line that is
    not JSON or not an object, or a column whose JSON type changes from one row to the next (a string
    in one row, a list in another: Arrow needs one type per column).
    """
    import json

    path = Path(path)
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise DataError(f"{path}: the file is empty (no rows); a dataset file holds one JSON object per line")
    if path.suffix == ".json" and text.lstrip()[:1] in "[{":
        try:
            whole = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # "Extra data": several objects, i.e. JSON Lines in a .json file
                raise DataError(f"{path}, line {e.lineno}, column {e.colno}: not valid JSON ({e.msg})") from None
        else:
            if isinstance(whole, list):
                if not whole:
                    raise DataError(f"{path}: the JSON array is empty (no rows)")
                bad = next((i for i, r in enumerate(whole) if not isinstance(r, dict)), None)
                if bad is not None:
                    raise DataError(f"{path}: element {bad} of the array is a {type(whole[bad]).__name__}, not an object of columns")
                return len(whole)
            return 1 if isinstance(whole, dict) else 0  # a mapping: left to `datasets`
    kinds: dict = {}  # column -> (JSON type name, line where first seen)
    rows = 0
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}, line {number}: not valid JSON ({e.msg} at column {e.colno}); each line must be one JSON object"
            ) from None
        if not isinstance(record, dict):
            raise DataError(f"{path}, line {number}: a JSON {type(record).__name__}, not an object of columns")
        for key, value in record.items():
            if value is None:
                continue
            kind = _json_kind(value)
            seen = kinds.setdefault(key, (kind, number))
            if seen[0] != kind:
                raise DataError(
                    f"{path}, line {number}: column `{key}` is a {kind} here but a {seen[0]} on line {seen[1]}; "
                    "every row must give a column the same type"
                )
        rows += 1
    return rows


def _json_kind(value) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    return "object"


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


# --------------------------------------------------------------------------------------------------
# online prompts (train_rloo.py)
# --------------------------------------------------------------------------------------------------
class PromptStream:
    """Seeded epoch-wise shuffling of prompt indices; the position is part of the checkpoint state.

    Each iteration takes the next `per_iteration` indices of a permutation; the remainder of an epoch is
    dropped and the next epoch draws a new permutation (seeded by seed and epoch, so a resume that loads
    `state()` continues with exactly the prompts the uninterrupted run would have seen).
    """

    def __init__(self, n: int, per_iteration: int, seed: int):
        if n < per_iteration:
            raise DataError(f"the prompt dataset has {n} rows, fewer than the {per_iteration} prompts one iteration needs")
        self.n, self.per_iteration, self.seed = n, per_iteration, seed
        self.epoch, self.pos = 0, 0
        self._perm = self._make_perm()

    def _make_perm(self):
        import torch

        from .distributed import mix_seed

        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        return torch.randperm(self.n, generator=g)

    def next(self) -> list[int]:
        if self.pos + self.per_iteration > self.n:  # drop the remainder, start a new epoch
            self.epoch, self.pos = self.epoch + 1, 0
            self._perm = self._make_perm()
        out = self._perm[self.pos : self.pos + self.per_iteration].tolist()
        self.pos += self.per_iteration
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._perm = self._make_perm()


def tokenize_prompts(tokenizer, texts: list[str], max_len: int) -> tuple[list[list[int]], int]:
    """Token ids of each prompt (no special tokens added), cut from the LEFT to max_len so the prompt's
    end ("TL;DR:") stays next to the response; returns the ids and how many prompts were cut."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    cut = 0
    for i, t in enumerate(ids):
        if not t:
            raise DataError(f"prompt {texts[i]!r} tokenises to nothing; remove empty prompts")
        if len(t) > max_len:
            ids[i], cut = t[-max_len:], cut + 1
    return ids, cut


# --------------------------------------------------------------------------------------------------
# offline tokenisation (train_offline.py): SFT, pairwise and listwise data
# --------------------------------------------------------------------------------------------------
# Every example becomes a prompt and K responses: K = 1 (sft: the completion), K = 2 (pairwise:
# chosen, rejected), K >= 2 (listwise: the responses in ranked order, best first).
#
# Policy (the Pythia TL;DR recipe): prompt and response are tokenised separately with no special
# tokens; the EOS token is appended to every response. A response longer than `max_completion_length`
# (EOS included) keeps its first tokens (and loses its EOS); a prompt longer than `max_prompt_length`
# is an error, dropped, or keeps its LAST tokens (`prompt_overflow`), so "TL;DR:" stays next to the
# response. Counts of truncated / dropped examples are returned in a `TokenizeReport`.
OFFLINE_KINDS = {
    "sft": ("prompt", "completion"),
    "pairwise": ("prompt", "chosen", "rejected"),
    "listwise": ("prompt", "responses", "ranking"),
}
PROMPT_OVERFLOW = ("error", "drop", "truncate_left")


@dataclass
class TokenizeReport:
    source: str
    rows: int = 0
    kept: int = 0
    dropped_bad: int = 0  # empty or identical responses
    dropped_long_prompts: int = 0
    truncated_prompts: int = 0
    truncated_responses: int = 0  # examples with at least one response cut at max_completion_length

    def summary(self) -> str:
        parts = [f"{self.source}: kept {self.kept} of {self.rows} examples"]
        if self.dropped_bad:
            parts.append(f"dropped {self.dropped_bad} with an empty or identical chosen/rejected response")
        if self.dropped_long_prompts:
            parts.append(f"dropped {self.dropped_long_prompts} whose prompt exceeds max_prompt_length")
        if self.truncated_prompts:
            parts.append(f"cut {self.truncated_prompts} prompts to their last max_prompt_length tokens")
        parts.append(f"truncated {self.truncated_responses} examples' responses at max_completion_length")
        return "; ".join(parts)


def _batched_ids(tokenizer, texts: list, chunk: int = 2048) -> list:
    out = []
    for start in range(0, len(texts), chunk):
        out.extend(tokenizer(texts[start : start + chunk], add_special_tokens=False)["input_ids"])
    return out


def tokenize_offline_dataset(
    dataset,
    tokenizer,
    kind: str,
    max_prompt_length: int,
    max_completion_length: int,
    prompt_overflow: str = "error",
    source: str = "dataset",
) -> tuple[list, TokenizeReport]:
    """Tokenise a dataset for train_offline.py. Returns (examples, report).

    Each example is {"prompt": [ids], "responses": [[ids + EOS], ...]} with the responses of a pairwise
    row in the order (chosen, rejected) and those of a listwise row in ranked order (best first).
    Columns: sft `prompt`/`completion`; pairwise `prompt`/`chosen`/`rejected` (strings or lists of
    {role, content} messages); listwise `prompt`/`responses`/`ranking`, where `ranking` lists indices
    into `responses`, best first (a permutation of range(K); every row has the same K).
    Rows with an empty response, or identical responses (after truncation), are dropped and counted;
    when no row is left this is a DataError.
    """
    if kind not in OFFLINE_KINDS:
        raise ValueError(f"`kind` must be one of {list(OFFLINE_KINDS)}, got {kind!r}")
    if prompt_overflow not in PROMPT_OVERFLOW:
        raise ValueError(f"`prompt_overflow` must be one of {list(PROMPT_OVERFLOW)}, got {prompt_overflow!r}")
    require_columns(dataset, OFFLINE_KINDS[kind], source)
    if tokenizer.eos_token_id is None:
        raise DataError(f"{source}: the tokenizer has no EOS token; responses could never end")
    eos = tokenizer.eos_token_id
    report = TokenizeReport(source=source, rows=len(dataset))

    prompts = [as_text(v, source, i, "prompt") for i, v in enumerate(dataset["prompt"])]
    if kind == "sft":
        responses = [[as_text(v, source, i, "completion")] for i, v in enumerate(dataset["completion"])]
    elif kind == "pairwise":
        responses = [
            [as_text(c, source, i, "chosen"), as_text(r, source, i, "rejected")]
            for i, (c, r) in enumerate(zip(dataset["chosen"], dataset["rejected"]))
        ]
    else:
        responses = []
        num_k = None
        for i, (resp, ranking) in enumerate(zip(dataset["responses"], dataset["ranking"])):
            if not isinstance(resp, list) or len(resp) < 2:
                raise DataError(f"{source}: row {i}, column `responses` must be a list of >= 2 responses")
            if num_k is None:
                num_k = len(resp)
            if len(resp) != num_k:
                raise DataError(f"{source}: row {i} has {len(resp)} responses, row 0 has {num_k}; K must be constant")
            if sorted(ranking) != list(range(num_k)):
                raise DataError(
                    f"{source}: row {i}, column `ranking` must be a permutation of 0..{num_k - 1} "
                    f"(indices into `responses`, best first), got {ranking}"
                )
            responses.append([as_text(resp[j], source, i, "responses") for j in ranking])

    num_k = len(responses[0]) if responses else 0
    prompt_ids = _batched_ids(tokenizer, prompts)
    flat = _batched_ids(tokenizer, [r for rs in responses for r in rs])
    examples = []
    for i, p in enumerate(prompt_ids):
        if len(p) > max_prompt_length:
            if prompt_overflow == "error":
                raise DataError(
                    f"{source}: row {i} has a prompt of {len(p)} tokens, longer than max_prompt_length = "
                    f"{max_prompt_length}; raise max_prompt_length or set prompt_overflow to 'drop' or "
                    "'truncate_left'"
                )
            if prompt_overflow == "drop":
                report.dropped_long_prompts += 1
                continue
            p = p[-max_prompt_length:]
            report.truncated_prompts += 1
        texts = responses[i]
        resp_ids = []
        truncated = False
        for j, text in enumerate(texts):
            ids = flat[i * num_k + j] + [eos]
            if len(ids) > max_completion_length:
                ids = ids[:max_completion_length]
                truncated = True
            resp_ids.append(ids)
        empty = any(not t.strip() for t in texts)
        identical = len({tuple(r) for r in resp_ids}) < len(resp_ids)
        if empty or identical:
            report.dropped_bad += 1
            continue
        report.truncated_responses += int(truncated)
        examples.append({"prompt": p, "responses": resp_ids})
    report.kept = len(examples)
    if not examples:
        raise DataError(f"{source}: no usable example left ({report.summary()})")
    return examples, report


@dataclass
class ResponseBatch:
    """K responses per prompt in one batch, response-major: row k * B + b is response k of example b.

    input_ids / attention_mask: [K*B, P + R], the prompt LEFT-padded to P and the response RIGHT-padded
    to R (the layout of `generation`); labels / response_mask: [K*B, R]; context_length = P.
    """

    input_ids: "object"
    attention_mask: "object"
    labels: "object"
    response_mask: "object"
    context_length: int
    num_responses: int

    def to(self, device):
        for name in ("input_ids", "attention_mask", "labels", "response_mask"):
            setattr(self, name, getattr(self, name).to(device))
        return self


def collate_responses(examples: list, pad_token_id: int) -> ResponseBatch:
    """Pad a list of tokenised examples (from `tokenize_offline_dataset`) into one ResponseBatch."""
    import torch

    from .generation import left_pad

    num_k = len(examples[0]["responses"])
    prompts = [ex["prompt"] for k in range(num_k) for ex in examples]
    responses = [ex["responses"][k] for k in range(num_k) for ex in examples]
    prompt_ids, prompt_mask = left_pad(prompts, pad_token_id)
    width = max(len(r) for r in responses)
    labels = torch.full((len(responses), width), pad_token_id, dtype=torch.long)
    response_mask = torch.zeros((len(responses), width), dtype=torch.long)
    for i, r in enumerate(responses):
        labels[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
        response_mask[i, : len(r)] = 1
    return ResponseBatch(
        input_ids=torch.cat([prompt_ids, labels], 1),
        attention_mask=torch.cat([prompt_mask, response_mask], 1),
        labels=labels,
        response_mask=response_mask,
        context_length=prompt_ids.shape[1],
        num_responses=num_k,
    )
