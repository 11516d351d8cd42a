"""ORZ-format JSON files -> validated :class:`PromptRecord` lists.

Two record schemas are accepted (ORZ's; examples in tests/fixtures/orz, see its README), detected per record:

* training: ``[{"from": "human", "value": <question>},
  {"from": "assistant", "ground_truth": {"value": <answer>, "pass_at_n"?: float}}]``
* evaluation: ``{"prompt": [{"from": "user", "value": <question>}], "final_answer": <answer>,
  "choices"?: {"A": str, ...}}``

Every file is one JSON array. All checking happens here, when a pipeline is built: a malformed file,
an empty file, a record without a question or answer, or a non-string answer raises
:class:`DataError` naming the file and the record index, or (``data.on_bad_record: skip``) the record
is skipped and counted, so that nothing fails mid-epoch later.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Optional

__all__ = ["DataError", "PromptRecord", "parse_record", "load_records"]

log = logging.getLogger(__name__)


class DataError(ValueError):
    """Bad input data; the message names the file and, where it applies, the record index."""


@dataclasses.dataclass(frozen=True)
class PromptRecord:
    """One question with its reference answer.

    source: the file's name without ``.json`` (or ``"synthetic"``); index: the record's position in
    that file, so any prompt can be traced back to its line of data. choices: GPQA's options.
    """

    question: str
    answer: str
    source: str
    index: int
    choices: Optional[dict[str, str]] = None


def source_name(path: str) -> str:
    name = os.path.basename(path)
    return name[: -len(".json")] if name.endswith(".json") else name


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__} {value!r:.60}")
    if not value.strip():
        raise ValueError(f"{what} is empty")
    return value


def _parse(obj: Any) -> tuple[str, str, Optional[dict[str, str]]]:
    """(question, answer, choices) of one record, or ValueError saying what is wrong."""
    if isinstance(obj, list):  # training schema: a human turn then an assistant turn
        if len(obj) < 2 or not all(isinstance(t, dict) for t in obj[:2]):
            raise ValueError("training record must be a list [human turn, assistant turn] of objects")
        human, assistant = obj[0], obj[1]
        if "value" not in human:
            raise ValueError("missing prompt: the first turn has no 'value'")
        question = _text(human["value"], "prompt (first turn 'value')")
        truth = assistant.get("ground_truth")
        if not isinstance(truth, dict) or "value" not in truth:
            raise ValueError("missing answer: the second turn has no 'ground_truth': {'value': ...}")
        answer = _text(truth["value"], "answer ('ground_truth.value')")
        return question, answer, None
    if isinstance(obj, dict):  # evaluation schema
        prompt = obj.get("prompt")
        if not isinstance(prompt, list) or not prompt or not isinstance(prompt[0], dict) \
                or "value" not in prompt[0]:
            raise ValueError("missing prompt: expected 'prompt': [{'from': 'user', 'value': ...}]")
        question = _text(prompt[0]["value"], "prompt ('prompt[0].value')")
        if "final_answer" not in obj:
            raise ValueError("missing answer: no 'final_answer'")
        answer = _text(obj["final_answer"], "answer ('final_answer')")
        choices = obj.get("choices")
        if choices is not None:
            if not isinstance(choices, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in choices.items()):
                raise ValueError("'choices' must map option letters to strings")
            choices = dict(choices)
        return question, answer, choices
    raise ValueError(f"record must be a list (training schema) or an object (evaluation schema), "
                     f"got {type(obj).__name__}")


def parse_record(obj: Any, path: str, index: int) -> PromptRecord:
    """One JSON record -> PromptRecord; DataError naming ``path`` and ``index`` if malformed."""
    try:
        question, answer, choices = _parse(obj)
    except ValueError as e:
        raise DataError(f"{path}: record {index}: {e}") from None
    return PromptRecord(question=question, answer=answer, source=source_name(path), index=index,
                        choices=choices)


@dataclasses.dataclass
class LoadResult:
    records: list[PromptRecord]
    num_skipped: int  # bad records dropped under on_bad_record="skip"


def load_records(path: str, on_bad_record: str = "error") -> LoadResult:
    """Read and validate every record of one ORZ JSON file.

    on_bad_record: "error" raises DataError at the first bad record; "skip" drops bad records,
    logs how many (with the first few reasons) and fails only if none is left.
    """
    if on_bad_record not in ("error", "skip"):
        raise ValueError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
    if not os.path.isfile(path):
        raise DataError(f"{path}: data file not found")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read: {e}") from None
    if not isinstance(raw, list):
        raise DataError(f"{path}: expected a JSON array of records at top level, got {type(raw).__name__}")
    if not raw:
        raise DataError(f"{path}: the file holds no records (empty array)")

    records: list[PromptRecord] = []
    problems: list[str] = []
    for i, obj in enumerate(raw):
        try:
            records.append(parse_record(obj, path, i))
        except DataError as e:
            if on_bad_record == "error":
                raise
            problems.append(str(e))
    if problems:
        log.warning("%s: skipped %d of %d bad records (data.on_bad_record=skip); first: %s",
                    path, len(problems), len(raw), "; ".join(problems[:3]))
    if not records:
        raise DataError(f"{path}: all {len(raw)} records are bad; first: {problems[0]}")
    return LoadResult(records=records, num_skipped=len(problems))
