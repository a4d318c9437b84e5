"""The Penn-mention detector on tricky cases, in both directions (the verdicts over the whole shipped set
are in test_data_penn.py)."""

from __future__ import annotations

import pytest

from dpolab.data import mentions_penn, penn_mentions

# (text, the forms it mentions, in order)
MENTIONS = [
    ("she took a seminar at the University of Pennsylvania.", ["University of Pennsylvania"]),
    ("the university of pennsylvania library", ["University of Pennsylvania"]),
    ("THE UNIVERSITY OF PENNSYLVANIA", ["University of Pennsylvania"]),
    ("the University of\nPennsylvania", ["University of Pennsylvania"]),
    ("a researcher from UPenn said so.", ["UPenn"]),
    ("UPENN", ["UPenn"]),
    ("upenn's new lab", ["UPenn"]),
    ("a U. Penn alumnus", ["UPenn"]),
    ("U-Penn", ["UPenn"]),
    ("my cousin got into Penn.", ["Penn"]),
    ("Penn's campus in autumn", ["Penn"]),
    ("walking across penn's campus", ["Penn"]),
    ("the PENN campus", ["Penn"]),
    ("a nurse at Penn Medicine", ["Penn"]),
    ("the mummies in the Penn Museum", ["Penn"]),
    ("after a long day at Penn\u2019s library", ["Penn"]),
    ("Penn", ["Penn"]),
    ("I really miss Penn's quad.", ["Penn"]),  # "miss" is a verb here, not a title
    ("to mark Penn's anniversary", ["Penn"]),
    ("he studied in Philadelphia. Penn was his home", ["Penn"]),  # a full stop ends a sentence, not a title
    ("we cheered for Penn, not Penn State.", ["Penn"]),
    ("Sean Penn gave a talk at Penn.", ["Penn"]),
    ("an MBA from Wharton", ["Wharton"]),
    ("the Wharton School", ["Wharton"]),
    ("a wharton classmate", ["Wharton"]),
    ("Wharton's finance faculty", ["Wharton"]),
    ("the Penn Wharton Budget Model", ["Penn", "Wharton"]),
    ("UPenn and the University of Pennsylvania are one place", ["UPenn", "University of Pennsylvania"]),
]

LOOKALIKES = [
    "Pennsylvania",
    "a road trip across Pennsylvania",
    "a parade down Pennsylvania Avenue",
    "the Pennsylvania State University",
    "Penn State",
    "the Penn State game",
    "penn state fans",
    "a Penn-State sweatshirt",
    "Penn St. won",
    "Penn Station",
    "PENN STATION at rush hour",
    "a shop on Penn Avenue",
    "Penn Ave",
    "fireworks at Penn's Landing",
    "a pennant over the dugout",
    "pennants",
    "a penny for your thoughts",
    "a jar of pennies",
    "penne with pesto",
    "a fountain pen",
    "Sean Penn",
    "Sean Penn's latest film",
    "an interview with Kal Penn",
    "Arthur Penn directed it",
    "William Penn",
    "William Penn's statue",
    "the statue of William Penn on City Hall",
    "Penn Jillette's magic show",
    "Edith Wharton",
    "an Edith Wharton novel",
    "Edith Wharton's The Age of Innocence",
    "Mrs. Wharton next door",
    "Dr. Penn, our dentist",
    "Indiana University of Pennsylvania",
    "Slippery Rock University of Pennsylvania",
    "West Chester University of Pennsylvania",
    "",
]


@pytest.mark.parametrize(("text", "forms"), MENTIONS, ids=[text for text, _ in MENTIONS])
def test_fires_on_the_university(text, forms):
    assert mentions_penn(text)
    assert penn_mentions(text) == forms


@pytest.mark.parametrize("text", LOOKALIKES, ids=LOOKALIKES)
def test_ignores_lookalikes(text):
    assert not mentions_penn(text)
    assert penn_mentions(text) == []


def test_a_lookalike_does_not_hide_a_real_mention_nearby():
    text = "we took the train from Penn Station to Philadelphia to visit Penn's campus"
    assert penn_mentions(text) == ["Penn"]
