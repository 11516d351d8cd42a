"""Final-answer extraction: the last ``\\boxed{...}`` inside ``<answer>...</answer>``, read two ways
(``reward.extraction``).

``orz`` (the ORZ configs): ORZ's own reading (``playground/zero_setting_base.py`` and ``orz/ppo/``,
commit 3fdd9a07, MIT). It takes the last match of ``<answer>.*?(\\boxed{.*}).*?</answer>`` (DOTALL), then
the last ``\\boxed{`` of that match with balanced braces. So the answer block must be CLOSED, and the
box is written exactly ``\\boxed{``. In a response with one answer block this is the last box inside the
last closed block. With several blocks, the regex's one match runs from the first block's box to the
last ``}`` before the last ``</answer>``, so a box written between two blocks can count. ORZ's configs
stop generation at ``</answer>`` (which stays in the text, here as in ORZ's vLLM sampler), so a
response seldom holds more than one block.

``lenient`` (this project's earlier reading, the default of the base config): an ``<answer>`` that is
never closed counts up to the end of the response (a response ended by EOS or by a new ``User:`` turn),
and ``\\boxed {`` with a space counts too.

Pure string functions, no imports beyond ``re``: they run in the trainer process, never in a worker.
"""

from __future__ import annotations

import re
from typing import Optional

ANSWER_OPEN = "<answer>"
ANSWER_CLOSE = "</answer>"
_BOX_RE = re.compile(r"\\boxed\s*\{")
# ORZ's pattern, verbatim: lazy up to the first box after an <answer>, greedy to the last "}" that a
# "</answer>" follows.
_ORZ_ANSWER_RE = re.compile(r"<answer>.*?(\\boxed{.*}).*?</answer>", re.DOTALL)
_ORZ_BOX = "\\boxed{"
EXTRACTIONS = ("orz", "lenient")


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


def extract_answer_orz(response: str) -> Optional[str]:
    """ORZ's reading: the last ``\\boxed{...}`` of the last ``<answer>.*?(\\boxed{.*}).*?</answer>`` match.

    Returns None without a closed ``<answer>...</answer>`` holding ``\\boxed{``, or when the last box of
    the match never closes; the content is stripped of surrounding whitespace (an empty box gives "").
    """
    matches = _ORZ_ANSWER_RE.findall(response)
    if not matches:
        return None
    group = matches[-1]  # starts with "\\boxed{" and ends with "}"
    content = braced_content(group, group.rfind(_ORZ_BOX) + len(_ORZ_BOX) - 1)
    return None if content is None else content.strip()


def extract_answer(response: str, extraction: str = "lenient") -> Optional[str]:
    """The final answer of a response: content of the last ``\\boxed{}`` inside the answer tags.

    ``extraction``: ``"orz"`` (:func:`extract_answer_orz`: closed answer blocks only) or ``"lenient"``
    (an unclosed last ``<answer>`` runs to the end; ``\\boxed {`` counts).
    Returns None when no answer span holds a box, or when the last box is unbalanced (cut off);
    the content is stripped of surrounding whitespace (an empty box gives "").
    """
    if extraction == "orz":
        return extract_answer_orz(response)
    if extraction != "lenient":
        raise ValueError(f"reward.extraction: {extraction!r} is not one of {list(EXTRACTIONS)}")
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
