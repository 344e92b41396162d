"""The safety data's train and test parts are pinned: settings are chosen by CV on the train
parts and the test parts are scored once (`ragline eval safety`), so no change may quietly move
a text from one to the other. A deliberate change to a data set updates the hashes here."""

from __future__ import annotations

import csv
from pathlib import Path

from safety import splits
from safety.train import EVERYDAY_PROMPTS, HARD_BENIGN, Data, load_benign, load_csv
from tests.conftest import SHARED_DATA

INJECTIONS = SHARED_DATA / "prompt-injections" / "train.csv"
SCIFACT = SHARED_DATA / "scifact" / "corpus.jsonl"
# (train part, test part): digests of each part's ids and sizes
PINNED = {
    "train.csv": ("ebd0dacde2b49d9d", "2b6f3202a7e290f7", 408, 121),
    "everyday_prompts.txt": ("7f7eaf77924fec55", "dc8f3dcfed5d367f", 158, 108),
    "hard_benign.txt": ("4cdeca80f87fe7b9", "29f80a728a4fb54e", 195, 148),
    "corpus.jsonl": ("9c94f1da381ca933", "26d6ddd305b9adea", 289, 213),
}


def _parts(texts: list[str], fraction: float) -> tuple[str, str, int, int]:
    train, test = splits.split(texts, fraction)
    assert not {splits.text_id(texts[i]) for i in train} & {splits.text_id(texts[i]) for i in test}
    return (
        splits.digest([texts[i] for i in train]),
        splits.digest([texts[i] for i in test]),
        len(train),
        len(test),
    )


def test_the_splits_are_pinned() -> None:
    texts, _ = load_csv(INJECTIONS)
    assert _parts(texts, splits.TEST_FRACTION["labelled"]) == PINNED["train.csv"]
    for bset in (
        load_benign(EVERYDAY_PROMPTS),
        load_benign(HARD_BENIGN, hard=True),
        load_benign(SCIFACT),
    ):
        kind = "documents" if bset.kind == "documents" else "prompts"
        assert _parts(bset.texts, splits.TEST_FRACTION[kind]) == PINNED[bset.name], bset.name


def test_holdout_uses_the_same_parts_and_a_text_keeps_its_side(tmp_path: Path) -> None:
    import numpy as np

    texts, labels = load_csv(INJECTIONS)
    hard = load_benign(HARD_BENIGN, hard=True)
    data = Data(texts, labels, np.zeros((len(texts), 2)), [(hard, np.zeros((len(hard.texts), 2)))])
    train, test = data.holdout()
    assert splits.digest(test.texts) == PINNED["train.csv"][1]
    assert splits.digest(test.benign[0][0].texts) == PINNED["hard_benign.txt"][1]
    assert len(train.texts) + len(test.texts) == len(texts) and test.labels.sum() > 0
    # adding texts, or reordering the file, moves no other text
    more = [f"An extra everyday prompt number {i}." for i in range(50)]
    reordered = list(reversed(hard.texts)) + more
    side = {t: splits.in_test(t, 0.4) for t in hard.texts}
    _, test_index = splits.split(reordered, 0.4)
    assert {reordered[i] for i in test_index} - set(more) == {t for t, s in side.items() if s}


def test_the_hard_benign_set() -> None:
    hard = load_benign(HARD_BENIGN, hard=True)
    assert len(hard.texts) >= 300 and len(set(hard.texts)) == len(hard.texts)
    assert hard.categories is not None and len(set(hard.categories)) >= 10
    everyday = set(load_benign(EVERYDAY_PROMPTS).texts)
    with open(INJECTIONS, newline="") as f:
        labelled = {row["text"].strip().lower() for row in csv.DictReader(f)}
    # no prompt is also in the other sets: nothing is trained on twice or on both sides
    assert not everyday & set(hard.texts)
    assert not labelled & {t.lower() for t in hard.texts}
