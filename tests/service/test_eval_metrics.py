"""Evaluation scores on cases worked out by hand."""

from __future__ import annotations

import math

import pytest

from service.evals import metrics


def test_normalisation_is_squads() -> None:
    assert metrics.normalize("The  Cat, sat!\n") == "cat sat"
    assert metrics.normalize("An apple a day") == "apple day"
    # Articles go only as whole words; punctuation goes before they are looked for.
    assert metrics.normalize("Theatre-goers and anthems") == "theatregoers and anthems"
    assert metrics.normalize("the-end") == "theend"
    assert metrics.tokens("  ") == []


def test_exact_match_after_normalisation() -> None:
    assert metrics.exact_match("The cat.", "cat") == 1.0
    assert metrics.exact_match("cats", "cat") == 0.0
    assert metrics.exact_match("", "the") == 1.0  # both normalise to nothing


def test_token_f1_counts_shared_tokens_with_multiplicity() -> None:
    # cat sat on mat / cat on mat: 3 shared, P 3/4, R 1, F1 6/7.
    assert metrics.token_f1("the cat sat on the mat", "a cat on a mat") == pytest.approx(6 / 7)
    # "a a b" is [b] after normalisation; "x x y" / "x y": P 2/3, R 1, F1 0.8.
    assert metrics.token_f1("x x y", "x y") == pytest.approx(0.8)
    assert metrics.token_f1("x", "y") == 0.0
    assert metrics.token_f1("", "") == 1.0
    assert metrics.token_f1("", "cat") == 0.0 and metrics.token_f1("cat", "") == 0.0


def test_lcs_length() -> None:
    assert metrics.lcs_length(list("ABCBDAB"), list("BDCABA")) == 4  # CLRS 15.4
    assert metrics.lcs_length(list("BDCABA"), list("ABCBDAB")) == 4
    assert metrics.lcs_length([], list("abc")) == 0
    assert metrics.lcs_length(list("abc"), list("abc")) == 3


def test_rouge_l_rewards_order_where_f1_does_not() -> None:
    # Lin (2004): police killed gunman / police kill gunman: LCS 2 of 3 and 3.
    assert metrics.rouge_l("police killed the gunman", "police kill the gunman") == pytest.approx(
        2 / 3
    )
    assert metrics.rouge_l("gunman police killed", "police killed gunman") == pytest.approx(2 / 3)
    assert metrics.token_f1("gunman police killed", "police killed gunman") == 1.0
    # LCS 2 (x z) of 2 and 4 tokens: P 1, R 1/2, F 2/3.
    assert metrics.rouge_l("x z", "x y z w") == pytest.approx(2 / 3)
    # "a" is an article: [c] against [b c d], LCS 1: P 1, R 1/3, F 1/2.
    assert metrics.rouge_l("a c", "a b c d") == pytest.approx(0.5)
    assert metrics.rouge_l("", "") == 1.0


def test_cosine() -> None:
    assert metrics.cosine([1.0, 0.0], [0.0, 1.0]) == 0.0
    assert metrics.cosine([1.0, 2.0], [2.0, 4.0]) == pytest.approx(1.0)
    assert metrics.cosine([1.0, 0.0], [-3.0, 0.0]) == pytest.approx(-1.0)
    assert metrics.cosine([1.0, 1.0], [1.0, 0.0]) == pytest.approx(1 / math.sqrt(2))
    assert metrics.cosine([0.0, 0.0], [1.0, 0.0]) == 0.0
    with pytest.raises(ValueError, match="different sizes"):
        metrics.cosine([1.0], [1.0, 2.0])


def test_text_scores_agree_with_each_other() -> None:
    same = metrics.text_scores("The answer is 42.", "answer is 42")
    assert same == {"exact_match": 1.0, "token_f1": 1.0, "rouge_l": 1.0}
    other = metrics.text_scores("answer 41", "answer 42")
    assert other["exact_match"] == 0.0 and other["token_f1"] == other["rouge_l"] == 0.5


def test_aggregate_means_over_scored_items_and_counts_failures() -> None:
    results = [
        {"exact_match": 1.0, "token_f1": 1.0, "rouge_l": 1.0, "cosine": 0.5},
        None,
        {"exact_match": 0.0, "token_f1": 0.5, "rouge_l": 0.25, "cosine": None},
    ]
    summary = metrics.aggregate(results)
    assert (summary["items"], summary["scored"], summary["failed"]) == (3, 2, 1)
    assert summary["means"] == {
        "exact_match": 0.5,
        "token_f1": 0.75,
        "rouge_l": 0.625,
        "cosine": 0.5,  # one item has it
    }
    empty = metrics.aggregate([None])
    assert empty["failed"] == 1 and set(empty["means"].values()) == {None}
    assert metrics.aggregate([])["items"] == 0


def test_deltas_are_second_minus_first() -> None:
    first = {"exact_match": 0.5, "token_f1": 0.75, "rouge_l": None, "cosine": 0.9}
    second = {"exact_match": 1.0, "token_f1": 0.5, "rouge_l": 0.5, "cosine": 0.9}
    assert metrics.deltas(first, second) == {
        "exact_match": 0.5,
        "token_f1": -0.25,
        "rouge_l": None,
        "cosine": 0.0,
    }
    assert set(metrics.deltas(None, second).values()) == {None}
