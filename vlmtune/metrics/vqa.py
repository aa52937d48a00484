"""VQA accuracy as the official VQAv2 evaluation (vqaEval.py) computes it.

Normalisation, as vqaEval.py applies it to a prediction: newlines/tabs to spaces and strip; punctuation
(`; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`) is deleted when it touches a space or the text has a
digit,digit comma (so "1,000" -> "1000"), else replaced by a space; a period not followed by a digit is
deleted ("3.5" keeps its point; the official pattern's look-behind is a typo that never applies, kept as such);
then lowercase, number words zero..ten and "none" to digits ("two" -> "2"), articles a/an/the dropped, and
apostrophe-less contractions restored ("dont" -> "don't"; "don't" itself is left alone).

The official script only strips punctuation from VQAv2's references, which were normalised when collected;
references in a user's data are not, so here they get the same full normalisation as the prediction.

Score, for n references after normalisation:
- n >= 10 (VQAv2 rows have 10): the official one, min(#matching others / 3, 1) for each reference left out,
  averaged over the n leave-one-out subsets (the paper's "averaged over all 10 choose 9 sets");
- 2 <= n < 10: the paper's formula min(#references equal to the answer / 3, 1);
- n == 1: exact match of the normalised strings (the formula would cap a lone reference at 1/3).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from .base import per_row

_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: as in vqaEval.py; in effect "a period not before a digit"
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})


def _contractions() -> dict[str, str]:
    """vqaEval.py's table: an apostrophe-less spelling -> the contraction (keys that are already correct, or
    capitalised and so never met after lowercasing, are in the official table too and kept)."""
    pairs = """aint ain't|arent aren't|cant can't|couldve could've|couldnt couldn't|couldn'tve couldn't've
    couldnt've couldn't've|didnt didn't|doesnt doesn't|dont don't|hadnt hadn't|hadnt've hadn't've
    hadn'tve hadn't've|hasnt hasn't|havent haven't|hed he'd|hed've he'd've|he'dve he'd've|hes he's|howd how'd
    howll how'll|hows how's|Id've I'd've|I'dve I'd've|Im I'm|Ive I've|isnt isn't|itd it'd|itd've it'd've
    it'dve it'd've|itll it'll|let's let's|maam ma'am|mightnt mightn't|mightnt've mightn't've
    mightn'tve mightn't've|mightve might've|mustnt mustn't|mustve must've|neednt needn't|notve not've
    oclock o'clock|oughtnt oughtn't|ow's'at 'ow's'at|'ows'at 'ow's'at|'ow'sat 'ow's'at|shant shan't
    shed've she'd've|she'dve she'd've|she's she's|shouldve should've|shouldnt shouldn't
    shouldnt've shouldn't've|shouldn'tve shouldn't've|somebody'd somebodyd|somebodyd've somebody'd've
    somebody'dve somebody'd've|somebodyll somebody'll|somebodys somebody's|someoned someone'd
    someoned've someone'd've|someone'dve someone'd've|someonell someone'll|someones someone's
    somethingd something'd|somethingd've something'd've|something'dve something'd've|somethingll something'll
    thats that's|thered there'd|thered've there'd've|there'dve there'd've|therere there're|theres there's
    theyd they'd|theyd've they'd've|they'dve they'd've|theyll they'll|theyre they're|theyve they've
    twas 'twas|wasnt wasn't|wed've we'd've|we'dve we'd've|weve we've|werent weren't|whatll what'll
    whatre what're|whats what's|whatve what've|whens when's|whered where'd|wheres where's|whereve where've
    whod who'd|whod've who'd've|who'dve who'd've|wholl who'll|whos who's|whove who've|whyll why'll
    whyre why're|whys why's|wont won't|wouldve would've|wouldnt wouldn't|wouldnt've wouldn't've
    wouldn'tve wouldn't've|yall y'all|yall'll y'all'll|y'allll y'all'll|yall'd've y'all'd've
    y'alld've y'all'd've|y'all'dve y'all'd've|youd you'd|youd've you'd've|you'dve you'd've|youll you'll
    youre you're|youve you've"""
    return dict(pair.split() for pair in pairs.replace("\n", "|").split("|"))


CONTRACTIONS = _contractions()


def _punctuation(text: str) -> str:
    out = text
    strip_all = _DIGIT_COMMA.search(text) is not None
    for p in _PUNCT:
        if strip_all or p + " " in text or " " + p in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out)


def _digits_articles(text: str) -> str:
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_vqa(text: str) -> str:
    return _digits_articles(_punctuation(text.replace("\n", " ").replace("\t", " ").strip()))


def vqa_accuracy(prediction: str, references: Sequence[str]) -> float:
    answer = normalize_vqa(prediction)
    refs = [normalize_vqa(r) for r in references]
    if not refs:
        return 0.0
    if len(refs) == 1:
        return float(answer == refs[0])
    if len(refs) < 10:
        return min(1.0, sum(r == answer for r in refs) / 3)
    matches = [r == answer for r in refs]
    total = sum(matches)
    return sum(min(1.0, (total - m) / 3) for m in matches) / len(refs)


VQA_ACCURACY = per_row(
    "vqa_accuracy", "VQAv2 accuracy: official answer normalisation, min(#humans agreeing / 3, 1), "
    "averaged over the 10-choose-9 annotator subsets when a row has 10 answers",
    lambda s: vqa_accuracy(s.prediction, s.references))
