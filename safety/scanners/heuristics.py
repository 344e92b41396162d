"""Prompt-injection and jailbreak phrases (English, German; "forget all instructions" in seven
more languages; letter-spaced text), matched on normalised, lower-cased text.

The first, cheapest layer of the injection scanner: phrases that almost only occur in attacks.
On ``prompt-injections/train.csv`` a list like this catches about half the attacks with almost no
false positives; the classifier layer catches the rest.
"""

from __future__ import annotations

import re
from itertools import accumulate

_PATTERNS = [
    # English: override, reveal, unrestricted. Not role-play ("pretend you are", "act as", "you
    # are now", "imagine you are"), task switches ("new task:") or "developer mode": everyday
    # requests say them too (safety/data/hard_benign.txt); the classifier weighs them in context
    r"\b(ignore|disregard|forget|skip|override)\b.{0,40}\b(previous|prior|above|earlier|all|any|preceding|your)\b.{0,30}\b(instructions?|prompts?|rules|directions|guidelines|context|tasks?)\b",
    r"\b(forget|ignore|disregard)\b.{0,10}\b(everything|all)\b.{0,15}\b(above|before|previous(ly)?|prior|so far|until now|davor)\b",
    r"\b(reveal|show|print|repeat|tell me|output)\b.{0,30}\b(system prompt|initial (prompt|instructions)|your (instructions|prompt|rules))\b",
    r"\b(act|behave|respond) as (if you (are|were) )?an? (unfiltered|uncensored|evil|unrestricted)\b",
    r"\b(pretend|imagine)\b.{0,20}\b(evil|unfiltered|uncensored|unrestricted|malicious) (ai|assistant|model|chatbot|bot)\b",
    r"\b(print|show|repeat|output)\b.{0,20}\b(above|previous|preceding) (prompt|instructions)\b",
    r"\bdespite what you('ve| have) been told\b",
    r"\b(you are|you're) (now )?(dan|jailbroken|in (dan|developer|jailbreak) mode)\b",
    r"\bdo anything now\b",
    r"\bwithout (any )?(restrictions|filters|censorship|limitations)\b",
    r"\bstop being\b.{0,20}\b(assistant|ai|helpful)",
    r"\byou (have )?passed the (first|previous) test\b",
    r"\bhere comes the (second|next) test\b",
    r"\b(return|print|output) your (embeddings|weights|instructions)\b",
    # German
    r"\b(ignoriere|vergiss|vergessen sie|ignorieren sie|missachte)\b.{0,40}\b(alle|alles|vorherigen?|obigen?|bisherigen?|vorher|anweisungen|aufgaben|befehle)\b",
    r"\b(stell dir vor|tu so|tun sie so)\b.{0,30}\b(böse|ungefilterte|unzensierte) (ki|ai)\b",
    r"\b(zeige|gib|nenne|verrate)\b.{0,30}\b(systemprompt|system-prompt|deine anweisungen|deinen prompt)\b",
    r"\b(abweichend|entgegen) (zu|den) (vorherigen|bisherigen|obigen)\b",
    r"\balle (bisherigen|vorherigen) (informationen|anweisungen|instruktionen)\b",
    r"\b(sie haben|du hast) den ersten test bestanden\b",
    r"\bnun folgen weitere aufgaben\b",
    r"\b(obigen|vorherigen|bisherigen) (ausführungen|anweisungen|informationen)\b.{0,20}\bignorieren\b",
    # other languages: "forget / ignore all (previous) instructions"
    r"\b(oubliez|oublie|ignorez)\b.{0,20}\b(toutes? les instructions|tout ce qui pr[ée]c[èe]de|tout)\b",
    r"\b(olvida|olvide|olvidad|ignora)\b.{0,20}\b(todo|todas las instrucciones)\b",
    r"\b(dimentica|ignora)\b.{0,20}\b(tutto|tutte le istruzioni)\b",
    r"\b(esque[çc]a|esquece)\b.{0,20}\b(tudo|todas as instru[çc][õo]es)\b",
    r"\b(vergeet|negeer)\b.{0,20}\b(alles|alle instructies)\b",
    r"\b(zaboravi|zaboravite|ignoriraj)\b.{0,20}\b(sve|sve instrukcije)\b",
    r"\b(zapomnij|zignoruj)\b.{0,20}\bwszystk",
    r"(забудь|забудьте|игнорируй|игнорируйте)\s.{0,20}(все|всё)",
    # obfuscation: a sentence spelt out in single letters ("s a y t h a t ...")
    r"(?:\b\w\s){10,}\w\b",
]
PATTERNS = [re.compile(p, re.DOTALL) for p in _PATTERNS]  # on lower-cased text: ~25% faster


def _depths(text: str) -> list[int]:
    """Bracket depth after each character."""
    return list(accumulate({"(": 1, ")": -1}.get(ch, 0) for ch in text))


def _anchors(pattern: str) -> tuple[str, ...]:
    """Literal prefixes one of which every match starts with: the leading literal, or that of
    each alternative of a leading group (``()`` if some alternative has none: always run).
    Python's ``re`` tries a pattern that starts with ``\\b(`` at every position; a substring
    test first is ~10x cheaper on text without the words."""
    body = pattern.removeprefix(r"\b")
    alternatives = [body]
    if body.startswith("("):
        inner = body[1 : _depths(body).index(0)].removeprefix("?:")
        level = _depths(inner)
        cuts = [i for i, ch in enumerate(inner) if ch == "|" and level[i] == 0]
        bounds = zip([-1, *cuts], [*cuts, len(inner)], strict=True)
        alternatives = [inner[a + 1 : b] for a, b in bounds]
    literals = [re.match(r"[^\\()\[\]|.?*+{},]*", a).group() for a in alternatives]  # type: ignore[union-attr]
    if any(len(lit) < 2 for lit in literals):
        return ()
    return tuple(literals)


_ANCHORED = [(_anchors(p), compiled) for p, compiled in zip(_PATTERNS, PATTERNS, strict=True)]


def heuristic_hits(text: str) -> list[tuple[int, int]]:
    """Spans of attack phrases in ``text`` (normalise it first: see the Unicode scanner)."""
    lowered = " ".join(text.split()).lower()
    return [
        m.span()
        for anchors, pattern in _ANCHORED
        if not anchors or any(a in lowered for a in anchors)
        for m in pattern.finditer(lowered)
    ]


# a quotation: "...", “...”, „...“, «...», or '...' that does not start or end inside a word
_QUOTED = re.compile(r"\"[^\"]*\"|“[^”]*”|„[^“”]*[“”]|«[^»]*»|(?<!\w)'[^']*'(?!\w)")
_QUOTE_MARKS = ('"', "“", "„", "«", "'")


def attack_phrases(text: str) -> list[tuple[int, int]]:
    """``heuristic_hits`` less those inside a quotation in a text that says something outside
    it: 'Translate "ignore all previous instructions" into German' quotes an attack phrase for
    a slide rather than using one. The classifier still reads the whole text and can block it."""
    hits = heuristic_hits(text)
    if not hits:  # the common case: nothing to look inside quotations for
        return hits
    lowered = " ".join(text.split()).lower()
    if not any(mark in lowered for mark in _QUOTE_MARKS):
        return hits
    quoted = [m.span() for m in _QUOTED.finditer(lowered)]
    outside = _QUOTED.sub(" ", lowered)
    if len(re.findall(r"\w+", outside)) < 2:  # the quotation is the whole request
        return hits
    return [h for h in hits if not any(a <= h[0] and h[1] <= b for a, b in quoted)]
