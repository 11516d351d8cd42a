"""The prompt a base model sees: a User/Assistant framing that asks for reasoning inside
``<think> </think>`` and the final answer, as ``\\boxed{...}``, inside ``<answer> </answer>``.

The prompt ends with ``Assistant: <think>``: a base model has no chat template, so the text itself
opens the reasoning block and the model simply continues it. The reward reads the ``\\boxed{}``
inside ``<answer>``; the rollout stops at ``</answer>`` (or at a new ``User:`` turn), which is
``rollout.stop_strings`` in the config, not here.

Templates (``data.template``):

* ``orz``: ORZ's own prompt, byte for byte (``orz_jax/prompts/orz.txt``, MIT, source and licence in
  ``orz_jax/prompts/NOTICE.md``). The question goes in unchanged (ORZ does not strip it), and the
  tokenizer's BOS token goes first when it has one (:func:`prepends_bos`; Qwen2.5 has none).
* ``orz_paraphrase``: this project's earlier paraphrase of it (kept so that figures measured with it
  can be reproduced).
* ``plain``: the same framing in a few words. The built-in demo model tokenizes one character per
  token, and its prompts must fit a small ``rollout.max_prompt_len``.
* ``compact`` and ``fewshot``: see their comments below.
"""

from __future__ import annotations

import importlib.resources

__all__ = ["ORZ_TEMPLATE", "ORZ_PARAPHRASE_TEMPLATE", "PLAIN_TEMPLATE", "COMPACT_TEMPLATE", "FEWSHOT_TEMPLATE",
           "TEMPLATES", "format_prompt", "prepends_bos"]

# Read as bytes and decoded: text mode would translate newlines on some platforms.
ORZ_TEMPLATE = importlib.resources.files("orz_jax").joinpath("prompts/orz.txt").read_bytes().decode("utf-8")

ORZ_PARAPHRASE_TEMPLATE = (
    "This is a dialogue between a User and an Assistant. The User poses a problem and the Assistant "
    "works it out. The Assistant reasons step by step first and only then states the result: the "
    "reasoning is written between <think> and </think>, and the result between <answer> and "
    "</answer>, in the form <think> step-by-step reasoning </think> <answer> result </answer>. "
    "Inside the answer tags the final result is written as \\boxed{...}, "
    "for example <answer> \\boxed{42} </answer>.\n"
    "User: {question}\n"
    "Assistant: <think>"
)

PLAIN_TEMPLATE = (
    "User: {question} Think in <think></think>, answer in <answer>\\boxed{}</answer>.\n"
    "Assistant: <think>"
)

# The smallest framing that keeps the ORZ contract (User/Assistant turns, an open <think>): for the
# built-in demo, whose char-level model pays for every prompt character on a 2-core CPU.
COMPACT_TEMPLATE = "User: {question}\nAssistant: <think>"

# One worked exchange before the question. Small real models (SmolLM2-135M) reason inside <think>
# with the instruction-only templates but never close with a boxed answer (0 of 200 samples
# measured); after one example 10% of their answers are boxed and right: a weak but non-zero start.
FEWSHOT_TEMPLATE = (
    "User: Compute 2 + 3.\n"
    "Assistant: <think> 2 + 3 = 5 </think> <answer> \\boxed{5} </answer>\n"
    "User: {question}\n"
    "Assistant: <think>"
)

TEMPLATES = {"orz": ORZ_TEMPLATE, "orz_paraphrase": ORZ_PARAPHRASE_TEMPLATE, "plain": PLAIN_TEMPLATE,
             "compact": COMPACT_TEMPLATE, "fewshot": FEWSHOT_TEMPLATE}

# Templates that follow ORZ's prompt code exactly: question unchanged, BOS first when the tokenizer has one.
_AS_ORZ = frozenset({"orz"})


def prepends_bos(template: str) -> bool:
    """Whether prompts of ``template`` start with the tokenizer's BOS token (when it has one), as ORZ's
    do. The tokenizer adds it (``encode(add_bos=True)``); :func:`format_prompt` returns text only."""
    return template in _AS_ORZ


def format_prompt(question: str, template: str = "orz", bos_text: str = "") -> str:
    """The full prompt text for ``question``.

    ``template``: a key of :data:`TEMPLATES` (``data.template``). ``orz`` inserts the question unchanged
    and starts with ``bos_text`` (the tokenizer's BOS text, "" when it has none), as ORZ's code does; the
    other templates strip the question and ignore ``bos_text``. One ``str.replace``, not ``str.format``:
    questions are LaTeX, full of braces.
    """
    if template not in TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r}; expected one of {sorted(TEMPLATES)}")
    if template in _AS_ORZ:
        return bos_text + TEMPLATES[template].replace("{question}", question, 1)
    return TEMPLATES[template].replace("{question}", question.strip())
