"""The seed data's counts in dpolab.data.datasheet are the ones DATASHEET.md states in its prose."""

from dpolab.data.datasheet import DATASHEET, SEED_001_DATA


def test_seed_counts_match_the_datasheet_prose():
    text = " ".join(DATASHEET.read_text().split())  # the prose wraps lines
    s = SEED_001_DATA
    assert f"{s['train_rows']:,} training rows but only {s['distinct_train_prompts']:,} distinct prompts" in text
    assert f"({s['test_prompts_in_train']} of {s['distinct_test_prompts']} distinct test prompts)" in text
    assert f"average {s['chosen_mean_words']} words against {s['rejected_mean_words']} for rejected" in text
