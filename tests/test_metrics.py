"""Each metric on worked examples from its published definition / official code, the registry, the bootstrap."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from vlmtune.data.formats import FORMATS
from vlmtune.metrics import (
    AUTO,
    Sample,
    UnknownMetricError,
    auto_metrics,
    compare,
    get_metric,
    known_metrics,
    movers,
    paired_bootstrap,
    reference_problems,
    resolve_metrics,
    score,
)
from vlmtune.metrics.anls import anls
from vlmtune.metrics.captions import tokenize
from vlmtune.metrics.choice import extract_choice, parse_options
from vlmtune.metrics.pope import read_yes_no
from vlmtune.metrics.relaxed import relaxed_correct
from vlmtune.metrics.text import exact_match, normalize_answer, token_f1
from vlmtune.metrics.vqa import normalize_vqa, vqa_accuracy


def rows(pairs, question=""):
    return [Sample(p, (r,) if isinstance(r, str) else tuple(r), question) for p, r in pairs]


# --- exact match, token F1 (SQuAD) ---

@pytest.mark.parametrize("pred, ref, expected", [
    ("The Cat!", "cat", 1.0), ("  a   dog ", "Dog.", 1.0), ("an apple", "the apple", 1.0),
    ("\u201ccat\u201d", "cat", 1.0),  # curly quotes are punctuation too
    ("dogs", "dog", 0.0), ("the cat sat", "cat", 0.0), ("theatre", "atre", 0.0),  # articles only as words
])
def test_exact_match_normalises_case_punctuation_articles_whitespace(pred, ref, expected):
    assert exact_match(pred, ref) == expected


def test_exact_match_takes_the_best_reference_and_averages_rows():
    assert Sample("x", "x").references == ("x",) and Sample("x", ["x", "y"]).references == ("x", "y")
    got = score("exact_match", rows([("red", ["blue", "Red."]), ("green", ["blue"])]))
    assert got.rows == [1.0, 0.0] and got.summary == {"exact_match": 0.5}


def test_token_f1_is_squads():
    # "the cat sat on the mat" -> cat sat on mat; "a cat on a mat" -> cat on mat: P 3/4, R 1
    assert token_f1("the cat sat on the mat", "a cat on a mat") == pytest.approx(2 * 0.75 / 1.75)
    assert token_f1("cat cat", "cat") == pytest.approx(2 * 0.5 * 1 / 1.5)  # bag of words: one "cat" in common
    assert token_f1("the", "a") == 1.0  # both empty after normalisation
    assert token_f1("", "cat") == 0.0 and token_f1("dog", "cat") == 0.0
    assert normalize_answer("The  Big, red; DOG!") == "big red dog"
    assert score("token_f1", rows([("cat sat", ["dog", "cat sat down"])])).rows == [pytest.approx(0.8)]


# --- VQA accuracy (VQAv2 vqaEval.py) ---

@pytest.mark.parametrize("text, normalised", [
    ("two", "2"), ("Two", "2"), ("none", "0"), ("ten", "10"), ("eleven", "eleven"),  # number words up to ten
    ("a dog", "dog"), ("The dog", "dog"), ("an apple", "apple"),  # articles dropped
    ("dont", "don't"), ("don't", "don't"), ("Dont", "don't"), ("isnt", "isn't"),  # contractions restored
    ("1,000", "1000"),  # a digit,digit comma: all punctuation deleted, not spaced
    ("red, white", "red white"), ("red,white", "red white"),  # punctuation touching a space: deleted, else a space
    ("black-and-white", "black and white"), ("yes!", "yes"), ("(yes)", "yes"),
    ("yes.", "yes"), ("3.5", "3.5"), ("e.g. cat", "eg cat"),  # a period survives only before a digit
    ("  Yes\n", "yes"), ("the TWO dogs!", "2 dogs"),
])
def test_vqa_normalisation_corner_cases(text, normalised):
    assert normalize_vqa(text) == normalised


def test_vqa_accuracy_averages_the_ten_leave_one_out_subsets():
    def ten(matching):
        return ["2"] * matching + ["3"] * (10 - matching)
    # each reference left out: min(#others matching / 3, 1), averaged over the 10 subsets (vqaEval.py)
    assert vqa_accuracy("two", ten(0)) == 0.0
    assert vqa_accuracy("two", ten(1)) == pytest.approx(9 * (1 / 3) / 10)  # 0.3, not min(1/3, 1)
    assert vqa_accuracy("two", ten(2)) == pytest.approx((8 * 2 / 3 + 2 * 1 / 3) / 10)
    assert vqa_accuracy("two", ten(3)) == pytest.approx((7 * 1 + 3 * 2 / 3) / 10)  # 0.9
    assert vqa_accuracy("Two.", ten(4)) == 1.0


def test_vqa_accuracy_with_fewer_references():
    assert vqa_accuracy("a dog", ["dog"]) == 1.0  # one reference: normalised exact match
    assert vqa_accuracy("cat", ["dog"]) == 0.0
    assert vqa_accuracy("dog", ["dog", "Dog", "puppy"]) == pytest.approx(2 / 3)  # min(#agreeing / 3, 1)
    assert vqa_accuracy("dont", ["don't", "don't", "do not"]) == pytest.approx(2 / 3)  # no expansion to "do not"
    assert vqa_accuracy("1,000", ["1000", "1000", "1000", "one thousand"]) == 1.0
    assert vqa_accuracy("dog", []) == 0.0


# --- ANLS (DocVQA) ---

def test_anls_threshold_edge_and_best_reference():
    assert anls("abc", ["abc"]) == 1.0
    assert anls("abd", ["abc"]) == pytest.approx(2 / 3)  # NL 1/3 < 0.5: 1 - NL
    assert anls("ab", ["ac"]) == 0.0  # NL exactly 0.5: at the threshold scores 0 (paper: s = 0 if NL >= 0.5)
    assert anls("abcde", ["abxye"]) == pytest.approx(0.6)
    assert anls("abcd", ["abxy"]) == 0.0
    assert anls(" ABC  ", ["abc"]) == 1.0  # case and surrounding / repeated whitespace ignored
    assert anls("abd", ["xyz", "abc", "abd "]) == 1.0
    assert anls("", [""]) == 1.0 and anls("x", []) == 0.0
    assert score("anls", rows([("abd", "abc"), ("ab", "ac")])).summary == {"anls": pytest.approx(1 / 3)}


# --- relaxed accuracy (ChartQA) ---

@pytest.mark.parametrize("pred, ref, ok", [
    ("105", "100", True), ("95", "100", True),  # exactly 5%: inclusive
    ("105.01", "100", False), ("94.99", "100", False),
    ("1.05", "1", True), ("0.95", "1.0", True),  # exact decimal arithmetic at the boundary
    ("1.0500001", "1", False),
    ("50%", "0.5", True), ("0.5", "50%", True), ("52%", "50%", True), ("53%", "50%", False),  # "%" divides by 100
    ("1,000", "1000", True), ("1,050", "1000", True), ("1,050", "1,000", True), ("1,051", "1,000", False),  # grouping commas dropped
    ("1,06", "1000", False),  # not a grouping comma: compared as text
    ("-10.4", "-10", True), ("Yes", "yes", True), ("Blue ", "blue", True), ("red", "blue", False),
    ("0", "0", True), ("0.0", "0", False),  # a reference of 0 is compared as text (as pix2struct does)
    ("nan", "nan", True), ("inf", "100", False),
])
def test_relaxed_accuracy(pred, ref, ok):
    assert relaxed_correct(pred, ref) is ok


# --- multiple choice ---

QUESTION = "What colour is the car?\nA. red\nB. blue\nC. dark red\nD. green"


@pytest.mark.parametrize("answer, letter", [
    ("(B)", "B"), ("B.", "B"), ("B", "B"), ("b", "B"), ("[C]", "C"), ("B)", "B"),
    ("The answer is b", "B"), ("The answer is B because it is blue", "B"), ("Answer: (c)", "C"),
    ("I choose option D.", "D"), ("The correct answer is: (a)", "A"), ("The answer is I think B", "B"), ("B. blue", "B"), ("b) blue", "B"), ("The car looks (D) to me", "D"),
    ("It is blue.", "B"), ("dark red", "C"), ("The car is dark red", "C"),  # option text; the longest match
    ("I would say C", "C"), ("the answer is a dog", None), ("A dog is near it", None), ("no idea", None),
])
def test_mc_extracts_the_letter_or_the_option_text(answer, letter):
    assert extract_choice(answer, parse_options(QUESTION)) == letter


def test_mc_parses_options_and_scores_against_a_letter_or_text_reference():
    assert parse_options(QUESTION) == {"A": "red", "B": "blue", "C": "dark red", "D": "green"}
    assert parse_options("Pick: (A) cat (B) dog (C) bird") == {"A": "cat", "B": "dog", "C": "bird"}
    assert parse_options("How many dogs?") == {}
    got = score("mc_accuracy", rows([("(B)", "B"), ("It is blue.", "blue"), ("The answer is b", "B. blue"),
                                     ("C", "B"), ("unsure", "B")], QUESTION))
    assert got.rows == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert extract_choice("I think it is blue.") is None  # no options listed: text cannot pick, "I" is no option
    assert score("mc_accuracy", rows([("yes", "Yes.")])).rows == [1.0]  # a reference naming no option: as text


# --- POPE ---

def test_pope_reads_answers_as_its_script_and_scores_the_confusion_counts():
    assert [read_yes_no(a) for a in ["Yes, there is a dog.", "No.", "There is no dog", "a cat", "",
                                     "Yes. No dog.", "not sure", "Not sure", "No\nthere is none", "NO"]] == \
        ["yes", "no", "no", "yes", "yes", "yes", "no", "yes", "no", "yes"]
    samples = rows([("Yes, there is", "yes"), ("No.", "yes"), ("There is no dog", "no"), ("a cat", "no"),
                    ("yes", "Yes")])  # TP, FN, TN, FP, TP
    got = score("pope", samples)
    assert got.rows == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert got.summary == pytest.approx({"pope_f1": 2 / 3, "pope_accuracy": 3 / 5, "pope_precision": 2 / 3,
                                         "pope_recall": 2 / 3, "pope_yes_ratio": 3 / 5})
    assert list(got.summary)[0] == get_metric("pope").headline == "pope_f1"
    all_no = score("pope", rows([("no", "yes"), ("no", "no")])).summary
    assert all_no["pope_precision"] == 0.0 and all_no["pope_f1"] == 0.0 and all_no["pope_yes_ratio"] == 0.0


def test_pope_refuses_a_reference_that_is_not_yes_or_no():
    assert reference_problems(get_metric("pope"), [["yes"], ["No."], ["maybe"]]) == \
        ["row 3: POPE needs a yes/no reference, got 'maybe'"]
    with pytest.raises(ValueError, match="row 2: POPE needs a yes/no reference"):
        score("pope", rows([("yes", "yes"), ("yes", "a cat")]))


# --- captions: BLEU-4, ROUGE-L, CIDEr (COCO caption eval) ---

CORPUS = rows([("A dog runs on the grass.", ["A dog is running on grass.", "The dog runs across a field."]),
               ("a cat on the sofa", ["A cat sleeping on a couch", "A grey cat on the sofa."]),
               ("Two people riding bikes!", ["Two men ride bicycles down a street.", "People riding bikes."]),
               ("a red bus", ["A red double-decker bus parked.", "A bus on the road."])])


def test_tokenizer_stands_in_for_cocos_ptb_tokenizer():
    assert tokenize("A dog's toy, can't stop!") == "a dog 's toy ca n't stop"
    assert tokenize('A man in a T-shirt (red) holds 3.5 "apples"...') == "a man in a t-shirt red holds 3.5 apples"


def test_bleu4_worked_example():
    # hyp/ref of 6 tokens: clipped matches 5/6, 3/5, 2/4, 1/3 n-grams; no brevity penalty
    got = score("bleu4", rows([("the cat sat on the mat", "the cat sat on a mat")]))
    assert got.summary["bleu4"] == pytest.approx((5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25, rel=1e-6)
    # shorter than its reference (6 tokens against 7): brevity penalty exp(1 - 7/6)
    short = score("bleu4", rows([("the cat sat on the mat", "the cat sat on the red mat")])).summary["bleu4"]
    assert short == pytest.approx(math.exp(1 - 7 / 6) * (6 / 6 * 4 / 5 * 3 / 4 * 2 / 3) ** 0.25, rel=1e-6)


def test_cider_worked_example():
    # two images; "a" is in both images' references (idf 0), every other n-gram in one (idf log 2)
    got = score("cider", rows([("a dog runs", "a dog runs fast"), ("a cat sleeps now", "a cat sleeps now")]))
    # row 1: cosine 2/sqrt(6) for 1- and 2-grams, 1/sqrt(2) for 3-grams, 0 for 4-grams; the length penalty uses
    # the library's length (bigram count, 2 against 3): exp(-1 / 72); x10
    first = 10 * math.exp(-1 / 72) * (2 / math.sqrt(6) * 2 + 1 / math.sqrt(2)) / 4
    assert got.rows == pytest.approx([first, 10.0])
    assert got.summary["cider"] == pytest.approx((first + 10) / 2)


def test_rouge_l_worked_example():
    # LCS 3 of 3 candidate / 4 reference tokens: P 1, R 3/4, F_beta with beta 1.2
    expected = (1 + 1.2 ** 2) * 0.75 / (0.75 + 1.2 ** 2)
    assert score("rouge_l", rows([("a dog runs", ["a dog runs fast", "cats"])])).rows == [pytest.approx(expected)]


def test_caption_metrics_equal_pycocoevalcap_on_a_small_corpus():
    gts = {i: [tokenize(r) for r in s.references] for i, s in enumerate(CORPUS)}
    res = {i: [tokenize(s.prediction)] for i, s in enumerate(CORPUS)}
    bleu, bleu_rows = Bleu(4).compute_score(gts, res, verbose=0)
    cider, cider_rows = Cider().compute_score(gts, res)
    rouge, rouge_rows = Rouge().compute_score(gts, res)
    for name, total, per_row in [("bleu4", bleu[3], bleu_rows[3]), ("cider", cider, cider_rows),
                                 ("rouge_l", rouge, rouge_rows)]:
        got = score(name, CORPUS)
        assert got.summary[name] == pytest.approx(total, rel=1e-9)
        assert got.rows == pytest.approx(list(per_row), rel=1e-9)
    # corpus BLEU-4 by hand: clipped n-gram matches summed over the rows (18/18, 9/14, 3/10, 1/6), test length 18
    # against the closest reference lengths 6 + 6 + 3 + 5 = 20; the library's CIDEr and ROUGE-L on this corpus
    assert bleu[3] == pytest.approx(math.exp(1 - 20 / 18) * (1 * 9 / 14 * 3 / 10 * 1 / 6) ** 0.25, rel=1e-6)
    assert bleu[3] != pytest.approx(np.mean(bleu_rows[3]))  # corpus-level, not the mean of the sentences
    assert (cider, rouge) == pytest.approx((2.695849, 0.789637), abs=1e-6)


def test_corpus_metrics_on_a_resample_equal_the_library_on_the_resampled_rows():
    rng = np.random.default_rng(3)
    for _ in range(5):
        idx = rng.integers(0, len(CORPUS), size=len(CORPUS))
        picked = [CORPUS[i] for i in idx]
        gts = {k: [tokenize(r) for r in s.references] for k, s in enumerate(picked)}
        res = {k: [tokenize(s.prediction)] for k, s in enumerate(picked)}
        for name, expected in [("cider", Cider().compute_score(gts, res)[0]),
                               ("bleu4", Bleu(4).compute_score(gts, res, verbose=0)[0][3])]:
            metric = get_metric(name)
            assert metric.aggregate(metric.prepare(CORPUS), idx)[name] == pytest.approx(expected, rel=1e-9)


def test_caption_metrics_survive_empty_text():
    empty = rows([("", ["a dog"]), ("a cat", ["a cat"])])
    assert score("bleu4", empty).summary["bleu4"] >= 0.0
    assert score("cider", rows([("x", [""])])).summary == {"cider": 0.0}
    assert score("rouge_l", empty).rows[0] == 0.0
    with pytest.raises(ValueError, match="row 1: a caption metric needs at least one reference"):
        score("cider", [Sample("a dog", ())])


# --- registry ---

def test_registry_names_every_metric_and_refuses_an_unknown_one():
    assert set(known_metrics()) == {"exact_match", "vqa_accuracy", "anls", "relaxed_accuracy", "mc_accuracy",
                                    "token_f1", "pope", "bleu4", "rouge_l", "cider"}
    with pytest.raises(UnknownMetricError, match="unknown metric 'bleu'; known metrics: exact_match, vqa_accuracy"):
        get_metric("bleu")
    with pytest.raises(UnknownMetricError, match=r"unknown metrics 'bleu', 'meteor'; known metrics: auto, exact"):
        resolve_metrics(["bleu", "cider", "meteor"], "caption")
    for name in known_metrics():
        metric = get_metric(name)
        got = metric.score(CORPUS if name != "pope" else rows([("yes", "yes")]))
        assert list(got.summary) == list(metric.summary_keys) and metric.headline in got.summary


def test_auto_metrics_follow_the_data_format():
    assert auto_metrics("vqa") == ("vqa_accuracy", "exact_match")
    assert auto_metrics("caption") == ("cider", "bleu4")
    assert auto_metrics("messages") == ("exact_match", "token_f1")
    assert set(AUTO) == set(FORMATS)  # every data format has defaults
    assert [m.name for m in resolve_metrics(["auto", "exact_match", "anls"], "vqa")] == \
        ["vqa_accuracy", "exact_match", "anls"]
    with pytest.raises(UnknownMetricError, match="no default metrics for data format 'tsv'"):
        auto_metrics("tsv")


# --- paired bootstrap ---

def coin_rows(rng, n, p_a, p_b):
    """Two systems answering n yes/no rows, right with probability p_a and p_b, independently."""
    samples_a, samples_b = [], []
    for _ in range(n):
        ref = "yes"
        samples_a.append(Sample("yes" if rng.random() < p_a else "no", (ref,)))
        samples_b.append(Sample("yes" if rng.random() < p_b else "no", (ref,)))
    return samples_a, samples_b


def test_bootstrap_is_deterministic_per_seed():
    a, b = coin_rows(np.random.default_rng(0), 60, 0.5, 0.7)
    metric = get_metric("exact_match")
    first = paired_bootstrap(metric, a, b, resamples=300, seed=7)
    assert paired_bootstrap(metric, a, b, resamples=300, seed=7) == first
    assert paired_bootstrap(metric, a, b, resamples=300, seed=8) != first
    (d,) = first
    assert d.key == "exact_match" and d.delta == pytest.approx(d.b - d.a) and d.low <= d.delta <= d.high


def test_bootstrap_ci_covers_the_true_difference():
    """40 synthetic datasets with a true difference of 0.2: the 95% interval covers it in most of them."""
    rng = np.random.default_rng(1)
    metric = get_metric("exact_match")
    covered = 0
    for _ in range(40):
        a, b = coin_rows(rng, 200, 0.5, 0.7)
        (d,) = paired_bootstrap(metric, a, b, resamples=400, seed=0)
        covered += d.low <= 0.2 <= d.high
        assert d.low > 0 or d.high - d.low > 0.1  # 0.2 apart with 200 rows: rarely indistinguishable
    assert covered >= 34  # binomial(40, 0.95): P(covered < 34) < 1%


def test_bootstrap_of_corpus_metrics_and_identical_systems():
    noisy = [Sample(s.prediction.split()[0] + " thing", s.references) for s in CORPUS]
    diffs = paired_bootstrap(get_metric("cider"), noisy, CORPUS, resamples=200, seed=0)
    assert [d.key for d in diffs] == ["cider"] and diffs[0].delta > 0
    pope = get_metric("pope")
    a = rows([("yes", "yes"), ("no", "yes"), ("no", "no"), ("yes", "no")] * 5)
    diffs = paired_bootstrap(pope, a, a, resamples=100, seed=0)
    assert [d.key for d in diffs] == list(pope.summary_keys)
    assert all(d.delta == d.low == d.high == 0.0 for d in diffs)


def test_bootstrap_refuses_unpaired_rows():
    metric = get_metric("exact_match")
    with pytest.raises(ValueError, match="same rows: 2 rows against 1"):
        paired_bootstrap(metric, rows([("a", "a"), ("b", "b")]), rows([("a", "a")]))
    with pytest.raises(ValueError, match="row 1: the two systems were scored against different references"):
        paired_bootstrap(metric, rows([("a", "a")]), rows([("a", "b")]))


def test_movers_are_the_rows_that_changed_most():
    base = rows([("cat", "cat"), ("dog", "cat"), ("cat sat", "cat sat on"), ("x", "y"), ("dog", "dog")])
    tuned = rows([("dog", "cat"), ("cat", "cat"), ("cat sat on", "cat sat on"), ("x", "y"), ("dog", "dog")])
    better, worse = movers(get_metric("token_f1"), base, tuned, k=3)
    assert [(m.row, m.a, m.b) for m in better] == [(1, 0.0, 1.0), (2, pytest.approx(0.8), 1.0)]
    assert [(m.row, m.delta) for m in worse] == [(0, -1.0)]


def test_compare_prepares_once_and_gives_intervals_movers_and_rows():
    base = rows([("cat", "cat"), ("dog", "cat"), ("x", "y"), ("dog", "dog")])
    tuned = rows([("dog", "cat"), ("cat", "cat"), ("y", "y"), ("dog", "dog")])
    got = compare(get_metric("exact_match"), base, tuned, resamples=200, seed=3, k=1)
    assert got.metric == "exact_match" and got.rows_a == [1, 0, 0, 1] and got.rows_b == [0, 1, 1, 1]
    assert got.differences == paired_bootstrap(get_metric("exact_match"), base, tuned, resamples=200, seed=3)
    assert [m.row for m in got.better] == [1] and [m.row for m in got.worse] == [0]
