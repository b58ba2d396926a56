"""Model cards: a version's experts, changes, usage and evaluation; the champion history."""

from __future__ import annotations

from coordinator.tracking.model_card import version_card, with_evaluation, with_promotion

PAYLOAD = {
    "version_id": "0123456789abcdef", "base": "tiny-llama", "parent": "fedcba9876543210",
    "diff": "+bob/x ~alice/y",
    "experts": [{"name": "alice/y", "contributor": "alice", "method": "lora",
                 "expert_id": "a" * 64},
                {"name": "bob/x", "contributor": "bob", "method": "ia3", "expert_id": "b" * 64}],
    "usage": {"tokens": 120, "flagged": ["bob/x"],
              "experts": {"alice/y": {"share": 0.1, "uniform": 0.5, "flagged": False},
                          "bob/x": {"share": 0.9, "uniform": 0.5, "flagged": True}}},
}


def test_version_card_lists_experts_changes_and_usage():
    card = version_card(PAYLOAD)
    assert "| alice/y | alice | lora | `aaaaaaaaaaaa` |" in card
    assert "| bob/x | bob | ia3 | `bbbbbbbbbbbb` |" in card
    assert "parent version: `fedcba9876543210`" in card and "+bob/x ~alice/y" in card
    assert "flagged: bob/x." in card and "| bob/x | 0.900 | 0.500 | yes |" in card
    # Largest share first: the expert to look at stands at the top.
    assert card.index("| bob/x | 0.900") < card.index("| alice/y | 0.100")


def test_evaluation_section_is_replaced_not_repeated():
    record = {"config_key": "k1", "metrics": {"accuracy": 0.5, "boolq": 0.625}}
    once = with_evaluation(version_card(PAYLOAD), record)
    again = with_evaluation(once, record)
    assert once == again and once.count("## Evaluation") == 1
    assert "| boolq | 0.6250 |" in once and "| accuracy | 0.5000 |" in once


def test_champion_history_gets_one_row_per_promotion():
    first = {"version_id": "v1", "by": "ops (Admin API)", "from": None, "at": "t1",
             "mean_accuracy": 0.5}
    card = with_promotion("Routers.", first, 1)
    card = with_promotion(card, first, 1)  # a replayed promotion adds no row
    card = with_promotion(card, {"version_id": "v2", "by": "root (CLI)", "from": "v1",
                                 "at": "t2", "mean_accuracy": None}, 2)
    rows = [line for line in card.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[1:] == ["| 1 | t1 | ops (Admin API) | - | v1 | 0.5000 |",
                        "| 2 | t2 | root (CLI) | v1 | v2 |  |"]
