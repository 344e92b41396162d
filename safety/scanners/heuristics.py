"""Prompt-injection and jailbreak phrases (English and German), matched on normalised text.

The first, cheapest layer of the injection scanner: phrases that almost only occur in attacks.
On ``prompt-injections/train.csv`` a list like this catches about half the attacks with almost no
false positives; the classifier layer catches the rest.
"""

from __future__ import annotations

import re

_PATTERNS = [
    # English: override, reveal, role-play escapes
    r"\b(ignore|disregard|forget|skip|override)\b.{0,40}\b(previous|prior|above|earlier|all|any|preceding|your)\b.{0,30}\b(instructions?|prompts?|rules|directions|guidelines|context|tasks?)\b",
    r"\b(forget|ignore)\b.{0,20}\b(everything|all)\b",
    r"\bnew (instructions?|task|rules)\b\s*[:!]",
    r"\b(reveal|show|print|repeat|tell me|output)\b.{0,30}\b(system prompt|initial (prompt|instructions)|your (instructions|prompt|rules))\b",
    r"\byou are (now|no longer)\b",
    r"\b(act|behave|respond) as (if you (are|were)|an? (unfiltered|uncensored|evil))",
    r"\bpretend (to be|you are|that you)\b",
    r"\b(jailbreak|jailbroken|developer mode|dan mode|do anything now)\b",
    r"\bwithout (any )?(restrictions|filters|censorship|limitations)\b",
    r"\bstop being\b.{0,20}\b(assistant|ai|helpful)",
    r"\bi want you to (act|behave|respond|pretend|roleplay)\b",
    r"\b(now|from now on),? you are\b",
    r"\bimagine (that )?you are\b",
    r"\byou (have )?passed the (first|previous) test\b",
    r"\bhere comes the (second|next) (test|task)\b",
    r"\b(return|print|output) your (embeddings|weights|instructions)\b",
    # German
    r"\b(ignoriere|vergiss|vergessen sie|ignorieren sie|missachte)\b.{0,40}\b(alle|alles|vorherigen?|obigen?|bisherigen?|vorher|anweisungen|aufgaben|befehle)\b",
    r"\b(neue|folgende) (anweisung|aufgabe)\b\s*[:!]",
    r"\b(du bist|sie sind) (jetzt|nun|ab sofort)\b",
    r"\b(tu|tun sie|stell dir vor|stellen sie sich vor),? (so,? )?als (ob )?(du|sie|w[äa]rst|w[äa]ren)\b",
    r"\b(zeige|gib|nenne|verrate)\b.{0,30}\b(systemprompt|system-prompt|deine anweisungen|deinen prompt)\b",
    r"\bab (jetzt|sofort) (bist|antwortest|sprichst) du\b",
    r"\b(ich möchte|ich will),? dass (du|sie) als\b.{0,80}\b(fungier|agier|auftr|handel|arbeit)",
    r"\b(jetzt|nun) bist du\b",
    r"\bstell(en sie)? (dir|sich) vor,? (du bist|sie sind|du wärst|sie wären)\b",
    r"\b(abweichend|entgegen) (zu|den) (vorherigen|bisherigen|obigen)\b",
    r"\balle (bisherigen|vorherigen) (informationen|anweisungen|instruktionen)\b",
    r"\b(sie haben|du hast) den ersten test bestanden\b",
    r"\bnun folgen weitere aufgaben\b",
]
PATTERNS = [re.compile(p, re.IGNORECASE | re.DOTALL) for p in _PATTERNS]


def heuristic_hits(text: str) -> list[tuple[int, int]]:
    """Spans of attack phrases in ``text`` (normalise it first: see the Unicode scanner)."""
    lowered = " ".join(text.split())
    return [m.span() for p in PATTERNS for m in p.finditer(lowered)]
