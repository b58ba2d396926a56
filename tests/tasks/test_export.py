"""`python -m tasks export` writes the contributor's JSONL data file; `list` shows the suite."""

from __future__ import annotations

import json
import subprocess
import sys

from tasks import split
from tasks.__main__ import main


def test_export_writes_input_target_records_of_the_split(tmp_path):
    out = tmp_path / "data" / "siqa.jsonl"
    assert main(["export", "siqa", "--split", "train", "--out", str(out), "--limit", "25"]) == 0
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    expected = split("siqa", 0).train[:25]
    assert len(records) == 25
    for record, example in zip(records, expected, strict=True):
        assert set(record) == {"input", "target"}
        assert record["input"] == example.input
        assert record["target"] == " " + example.choices[example.label]
    assert [p.name for p in out.parent.iterdir()] == ["siqa.jsonl"], "no staging file left"


def test_export_of_an_empty_split_fails_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "imdb.jsonl"
    assert main(["export", "imdb-sentiment", "--split", "train", "--out", str(out)]) == 2
    assert "no train examples" in capsys.readouterr().err
    assert not out.exists()


def test_cli_lists_tasks_and_rejects_unknown_names(tmp_path):
    listing = subprocess.run([sys.executable, "-m", "tasks", "list"], capture_output=True,
                             text=True, check=True)
    assert "tweet-sentiment" in listing.stdout and "held-out" in listing.stdout
    bad = subprocess.run([sys.executable, "-m", "tasks", "export", "nope", "--out",
                          str(tmp_path / "x.jsonl")], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown task 'nope'" in bad.stderr
