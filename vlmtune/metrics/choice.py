"""Multiple-choice accuracy: the option a free answer picks, compared with the reference option.

The options are read from the question when it lists them ("A. red" / "(B) blue" / "C) green" / "D: ...",
one per line or inline as "(A) red (B) blue"). An answer picks a letter, by the first rule that applies:
1. the whole answer is a letter, maybe bracketed or followed by . : ) -- "B", "(B)", "b.", "[C]";
2. it says so: "the answer is B", "answer: (c)", "option B", "choice b" (one of the options listed, if any;
   "a" and "I" only when no word follows, so "the answer is a dog" picks nothing);
3. it starts with a labelled letter: "B. blue", "b) blue", "(B) blue ...";
4. a bracketed letter anywhere: "... so (B)";
5. an option's text: the normalised answer equals one option, or contains exactly one option (as whole
   words; of options that are inside one another, the longest);
6. exactly one standalone capital letter among the option letters (A..E when the question lists none),
   the article "A" before a lowercase word not counted.
The reference is resolved the same way ("B", "B. blue" or "blue"); when it names no option the answer is
compared with it as normalised text (exact match). An answer that picks nothing scores 0.
"""

from __future__ import annotations

import re
from string import ascii_uppercase

from .base import Sample, per_row
from .text import normalize_answer

_LINE_OPTION = re.compile(r"^\s*\(?([A-Z])[.):]\s*(\S.*?)\s*$", re.MULTILINE)
_INLINE_OPTION = re.compile(r"\(([A-Z])\)\s*(.+?)(?=\s*\([A-Z]\)|\n|$)")
_WHOLE = re.compile(r"[(\[]?([A-Za-z])[)\]]?[.:)]?")
_SAYS = re.compile(r"\b(?:answer|option|choice)\s*(?:is\s*:?|:)?\s*[(\[]?([A-Za-z])[)\]]?(?=[\s.,;:!?)]|$)(\s*\w)?",
                   re.IGNORECASE)
_LEADING = re.compile(r"[(\[]?([A-Za-z])(?:[)\]]|[.:)])\s")
_BRACKETED = re.compile(r"\(([A-Za-z])\)")
_BARE = re.compile(r"\b([A-Z])\b(?!['\-])")
DEFAULT_LETTERS = "ABCDE"


def parse_options(question: str) -> dict[str, str]:
    """Letter -> option text, when the question lists options A, B, C... in order; else {}."""
    for pattern in (_LINE_OPTION, _INLINE_OPTION):
        found: dict[str, str] = {}
        for letter, text in pattern.findall(question):
            if letter == ascii_uppercase[len(found)]:
                found[letter] = text.strip()
            elif letter == "A":  # a second list starts: keep the last one
                found = {"A": text.strip()}
        if len(found) >= 2:
            return found
    return {}


def _by_text(answer: str, options: dict[str, str]) -> str | None:
    said = normalize_answer(answer)
    texts = {letter: normalize_answer(text) for letter, text in options.items()}
    equal = [letter for letter, text in texts.items() if text and text == said]
    if len(equal) == 1:
        return equal[0]
    inside = [letter for letter, text in texts.items() if text and f" {text} " in f" {said} "]
    longest = [a for a in inside if all(f" {texts[b]} " in f" {texts[a]} " for b in inside)]
    return longest[0] if len(longest) == 1 else None


def extract_choice(answer: str, options: dict[str, str] | None = None) -> str | None:
    """The option letter (uppercase) an answer picks, or None."""
    text = answer.strip()
    if m := _WHOLE.fullmatch(text):
        return m.group(1).upper()
    for m in _SAYS.finditer(text):
        letter, word_after = m.group(1), m.group(2)
        pronoun_or_article = letter in ("a", "I") and word_after  # "the answer is a dog", "the answer is I think B"
        if not pronoun_or_article and (not options or letter.upper() in options):
            return letter.upper()
    if m := _LEADING.match(text):
        return m.group(1).upper()
    if m := _BRACKETED.search(text):
        return m.group(1).upper()
    if options and (letter := _by_text(text, options)):
        return letter
    letters = "".join(options) if options else DEFAULT_LETTERS
    bare = {m.group(1) for m in _BARE.finditer(text) if m.group(1) in letters
            and not (m.group(1) == "A" and re.match(r" [a-z]", text[m.end():m.end() + 2]))}
    return bare.pop() if len(bare) == 1 else None


def choice_correct(prediction: str, reference: str, options: dict[str, str] | None = None) -> float:
    gold = extract_choice(reference, options)
    if gold is None:
        return float(normalize_answer(prediction) == normalize_answer(reference))
    return float(extract_choice(prediction, options) == gold)


def mc_accuracy(sample: Sample) -> float:
    options = parse_options(sample.question)
    return max((choice_correct(sample.prediction, ref, options) for ref in sample.references), default=0.0)


MC_ACCURACY = per_row("mc_accuracy", "multiple-choice accuracy: the option letter or text an answer picks",
                      mc_accuracy)
