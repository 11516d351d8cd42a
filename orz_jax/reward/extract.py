"""Final-answer extraction, as ORZ does it: the last ``\\boxed{...}`` inside ``<answer>...</answer>``.

ORZ matches ``<answer>.*?(\\boxed{.*}).*?</answer>`` (DOTALL) and then keeps the last ``\\boxed`` of the
match with balanced braces (an unbalanced last box gives no answer). Its vLLM sampler keeps the stop
string ``</answer>`` in the text; our rollout may not, so an ``<answer>`` that is never closed counts up to
the end of the response (only the last one can be open, by construction).

Pure string functions, no imports beyond ``re``: they run in the trainer process, never in a worker.
"""

from __future__ import annotations

import re
from typing import Optional

ANSWER_OPEN = "<answer>"
ANSWER_CLOSE = "</answer>"
_BOX_RE = re.compile(r"\\boxed\s*\{")


def answer_spans(response: str) -> list[str]:
    """The texts inside each ``<answer>...</answer>`` of ``response``, in order.

    An ``<answer>`` without a later ``</answer>`` (generation stopped on the close tag, which was then
    cut off) runs to the end of the response.
    """
    spans = []
    pos = 0
    while True:
        start = response.find(ANSWER_OPEN, pos)
        if start < 0:
            return spans
        start += len(ANSWER_OPEN)
        end = response.find(ANSWER_CLOSE, start)
        if end < 0:
            spans.append(response[start:])
            return spans
        spans.append(response[start:end])
        pos = end + len(ANSWER_CLOSE)


def braced_content(text: str, open_idx: int) -> Optional[str]:
    """Content of the group whose ``{`` is at ``text[open_idx]``; None if it never closes.

    Escaped braces ``\\{`` / ``\\}`` (set notation) do not count, so ``\\boxed{\\{1,2\\}}`` is ``\\{1,2\\}``.
    """
    assert text[open_idx] == "{"
    depth = 0
    i = open_idx
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2  # skip the escaped character (\{, \}, \\)
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[open_idx + 1 : i]
        i += 1
    return None


def last_boxed(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{...}`` in ``text``; None when there is none or its braces never close."""
    last = None
    for last in _BOX_RE.finditer(text):
        pass
    if last is None:
        return None
    return braced_content(text, last.end() - 1)


def extract_answer(response: str) -> Optional[str]:
    """The final answer of a response: content of the last ``\\boxed{}`` inside the answer tags.

    Returns None when no answer span holds a box, or when the last box is unbalanced (cut off);
    the content is stripped of surrounding whitespace (an empty box gives "").
    """
    for span in reversed(answer_spans(response)):
        if _BOX_RE.search(span) is not None:
            content = last_boxed(span)
            return None if content is None else content.strip()
    return None


def strip_reference(answer: str) -> str:
    """A reference answer as compared: ORZ applies its answer extraction to the label too, so a label
    written as a full solution (``... \\boxed{7}``) is reduced to its last box."""
    boxed = last_boxed(answer) if "\\boxed" in answer else None
    return (boxed if boxed is not None else answer).strip()
