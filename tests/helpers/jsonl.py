"""Writing test data as JSON Lines."""
import json
from pathlib import Path


def write_jsonl(path, rows) -> str:
    """One JSON object per line at `path` (folders created); returns the path as a string."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)
