"""The resumable checkpoint of a dataset trace: a JSONL file, one finished fact per line.

The first line is the header: :data:`CHECKPOINT_FORMAT`, the lenscope
version, the model's name and depth, and the trace's settings exactly as
:meth:`lenscope.TraceSettings.to_dict` writes them. Every later line is one
fact, ``done`` (with its :class:`~lenscope.datasets.summary.FactTrace`) or
``skipped`` (with the reason). A file written under other settings is
refused before any work starts, naming each difference.
"""

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lenscope.validation import InvalidInput

CHECKPOINT_FORMAT = "lenscope.dataset-checkpoint/2"

DATASET_TRACE_FIXED: dict[str, Any] = {
    "answer": None,
    "top_k": 1,
    "layers": None,
    "positions": "from_subject",
}
"""Trace settings every dataset trace uses: the clean top-1 answer (ROME's
choice), top-1 only, every layer, positions from the subject's first token
to the last (earlier positions belong to no bucket)."""


def checkpoint_header(
    model_name: str, n_layers: int, version: str, trace_settings: Mapping[str, Any]
) -> dict[str, Any]:
    """The header line: format, version, model, and the ``TraceSettings.to_dict()`` record."""
    return {
        "format": CHECKPOINT_FORMAT,
        "lenscope_version": version,
        "model_name": model_name,
        "n_layers": n_layers,
        **trace_settings,
    }


# Header keys added after checkpoints without them were written, with the value those
# checkpoints meant (attribution checkpoints before estimators: plain AtP on the metric).
_ADDED_KEYS: dict[str, Any] = {"estimator": "atp", "target": "metric"}


def settings_differences(saved: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """``"key: checkpoint X, this call Y"`` for every setting that differs.

    A key the checkpoint lacks because it was written before the key existed
    (:data:`_ADDED_KEYS`) counts as the value it meant then.
    """
    out = []
    for key, value in wanted.items():
        old = saved.get(key, _ADDED_KEYS.get(key))
        if (
            key == "noise_std"
            and isinstance(old, float)
            and isinstance(value, float)
            and math.isclose(old, value, rel_tol=1e-6)
        ):
            continue
        if old != value:
            out.append(f"{key}: checkpoint {old!r}, this call {value!r}")
    return out


class Checkpoint:
    """An append-only JSONL file: a settings header, then one line per finished fact.

    Each line is written with one ``write`` and flushed and fsynced before
    the next fact starts, so an interruption (Ctrl-C, a killed process)
    leaves at most one torn final line, which the next open drops.
    """

    def __init__(self, path: str | Path, settings: Mapping[str, Any]) -> None:
        """Open (resume) or create the checkpoint at ``path`` for a run with ``settings``."""
        self.path = Path(path)
        self.records: dict[str, dict[str, Any]] = {}
        header = None
        if self.path.exists():
            header, self.records = self._read(settings, repair=True)
        if header is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("w") as f:
                self._write_line(f, dict(settings))
        self._file: Any = None  # opened on the first append

    @classmethod
    def check(cls, path: str | Path, settings: Mapping[str, Any]) -> None:
        """Refuse ``path`` now if it exists and was written under other settings.

        Reads only: nothing is written, so a run can check its checkpoint
        before any slow work (loading facts, the known-fact filter).
        """
        checkpoint = cls.__new__(cls)
        checkpoint.path = Path(path)
        if checkpoint.path.exists():
            checkpoint._read(settings, repair=False)

    @classmethod
    def read(cls, path: str | Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        """The header and the records (by JSON-encoded id) of the checkpoint at ``path``.

        Reads only, whatever the settings (a torn final line is ignored, not
        truncated). Raises ``InvalidInput`` for a missing or empty file, or
        one that is not a lenscope dataset checkpoint.
        """
        checkpoint = cls.__new__(cls)
        checkpoint.path = Path(path)
        if not checkpoint.path.is_file():
            raise InvalidInput(
                f"checkpoint {str(path)!r} does not exist; pass the JSONL file that "
                "trace_dataset(checkpoint=...) wrote"
            )
        header, records = checkpoint._read(None, repair=False)
        if header is None:
            raise InvalidInput(
                f"checkpoint {str(path)!r} is empty; pass the JSONL file that "
                "trace_dataset(checkpoint=...) wrote"
            )
        return header, records

    def _read(
        self, settings: Mapping[str, Any] | None, *, repair: bool
    ) -> tuple[Any, dict[str, dict[str, Any]]]:
        raw = self.path.read_bytes()
        lines = raw.split(b"\n")
        parsed: list[Any] = []
        good_end = 0
        offset = 0
        for number, line in enumerate(lines, start=1):
            complete = number < len(lines)  # the last piece has no newline after it
            try:
                value = json.loads(line) if line.strip() else None
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                rest = b"".join(lines[number:]).strip()
                if rest:  # a bad line followed by good ones: not an interrupted write
                    raise InvalidInput(
                        f"checkpoint {str(self.path)!r} is corrupt: line {number} is not "
                        f"valid JSON ({e}) but more lines follow; delete the file (or that "
                        "line) to start over"
                    ) from e
                break  # torn final line from an interrupted write: dropped
            if not complete and line.strip():
                break  # no newline yet: the write was cut short
            offset += len(line) + 1
            if value is not None:
                parsed.append(value)
                good_end = offset
        if repair and good_end < len(raw):
            with self.path.open("r+b") as f:  # drop the torn tail before appending
                f.truncate(good_end)
        if not parsed:
            return None, {}
        header = parsed[0]
        found = str(header.get("format", "")) if isinstance(header, dict) else ""
        if found.startswith("lenscope.dataset-checkpoint/") and found != CHECKPOINT_FORMAT:
            raise InvalidInput(
                f"checkpoint {str(self.path)!r} was written by another lenscope version "
                f"(format {found!r}; this one reads {CHECKPOINT_FORMAT!r}); pass a new "
                "checkpoint path to start over"
            )
        if not isinstance(header, dict) or header.get("format") != CHECKPOINT_FORMAT:
            raise InvalidInput(
                f"checkpoint {str(self.path)!r} must start with a lenscope dataset header "
                f"(format {CHECKPOINT_FORMAT!r}), got {str(header)[:80]!r}; pass a new "
                "checkpoint path (lenscope never overwrites other files)"
            )
        differences = [] if settings is None else settings_differences(header, settings)
        if differences:
            raise InvalidInput(
                f"checkpoint {str(self.path)!r} was written with different settings, so "
                f"its facts cannot be mixed with this run ({'; '.join(differences)}); "
                "pass the same settings to resume, or a new checkpoint path to start over"
            )
        records = {}
        for record in parsed[1:]:
            records[json.dumps(record["id"])] = record  # a later line for an id wins
        return header, records

    @staticmethod
    def _write_line(f: Any, record: Mapping[str, Any]) -> None:
        f.write(json.dumps(record, allow_nan=False) + "\n")
        f.flush()
        os.fsync(f.fileno())

    def append(self, record: dict[str, Any]) -> None:
        """Write one fact's record, flushed and fsynced."""
        if self._file is None:
            self._file = self.path.open("a")
        self._write_line(self._file, record)
        self.records[json.dumps(record["id"])] = record

    def close(self) -> None:
        """Close the file (appending reopens it)."""
        if self._file is not None:
            self._file.close()
            self._file = None
