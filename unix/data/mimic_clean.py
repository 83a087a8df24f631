"""Rule-based cleaning of MIMIC-CXR report sections into one-line "FINDINGS: ... IMPRESSION: ..." text.

The model sees one image, so what it is trained to write must be visible in that image: references
to earlier examinations, dates and times, de-identification blanks ("___") and notes about who was
told what are not. Each rule is a function of one sentence that returns the sentence unchanged,
rewritten, or "" (dropped); `clean_section` applies them in `RULES` order and counts which fired.
docs/data.md lists every rule with an example. Change a rule -> bump CLEANING_VERSION (an ingest
made with another version is not resumed).
"""

from __future__ import annotations

import re
from collections import Counter

CLEANING_VERSION = 1
BLANK = "___"  # MIMIC's de-identification placeholder
IC = re.IGNORECASE

# ---------------------------------------------------------------------------- sentences

NO_SPLIT_AFTER = re.compile(r"(?:\b(?:Dr|Drs|St|vs|approx|e\.g|i\.e)\.|^\(?\d{1,2}[.)])$", IC)  # "Dr. ___", "1. ..."


def one_line(text: str) -> str:
    """Newlines, tabs and runs of spaces -> one space."""
    return re.sub(r"\s+", " ", text).strip()


def split_sentences(text: str) -> list[str]:
    """Sentences of one-line text: a break after . ! ? before an upper-case letter, digit or bracket,
    except after an abbreviation ("Dr.") or a list number ("1.")."""
    pieces = re.split(r"(?<=[.!?])\s+(?=[A-Z0-9(\[_])", text)
    out: list[str] = []
    for piece in pieces:
        if out and NO_SPLIT_AFTER.search(out[-1]):
            out[-1] += " " + piece
        else:
            out.append(piece)
    return [p for p in out if p.strip()]


def tidy(s: str) -> str:
    """Repair what a deletion leaves: spaces before punctuation, orphan commas, a lower-case start,
    a missing full stop. A sentence with no letter or digit left is dropped ("")."""
    s = one_line(s)
    s = re.sub(r"\(\s*\)", "", s)
    s = re.sub(r"\s+([,.;:!?)])", r"\1", s)
    s = re.sub(r"([,;:])(?:\s*[,;:])+", r"\1", s)
    s = re.sub(r"[,;:]\s*(?=[.!?]|$)", "", s)
    s = re.sub(r"^[\s,;:.]+", "", s).strip()
    if not re.search(r"[A-Za-z0-9]", s):
        return ""
    if re.match(r"\d+[.)]\s*$", s):  # only a list number is left
        return ""
    s = re.sub(r"^((?:\d+[.)]\s+)?)([a-z])", lambda m: m[1] + m[2].upper(), s)
    return s if s[-1] in ".!?" else s + "."


# ---------------------------------------------------------------------------- rules

NOTIFICATION = re.compile(
    r"\b(?:notified|paged|telephoned|discussed\s+with|communicated\s+(?:to|with|via|by)|relayed\s+to|conveyed\s+to|"
    r"informed|contacted|called\s+(?:to|by)|telephone|(?:by|via|over\s+the)\s+phone|notification|"
    r"critical\s+(?:result|finding)s?|after\s+(?:the\s+)?discovery)\b", IC)


def drop_notification(s: str) -> str:
    """Clinician notifications ("Dr. ___ was paged at 10:15 on ___", "findings were discussed with
    ...") are about the workflow, not the image: the sentence is dropped."""
    return "" if NOTIFICATION.search(s) else s


# "the prior study of ___", "the previous radiograph", "prior chest CT dated ___", "___"
_EXAM = (r"(?:study|studies|exam|examination|exams|radiographs?|films?|x-?rays?|images?|imaging|ct|"
         r"cxr|chest\s+radiographs?|chest\s+x-?rays?|one|day)")
_WHEN = rf"(?:\s+(?:of|from|dated|on|obtained\s+on|performed\s+on|taken\s+on)\s+{BLANK})?(?:\s*\({BLANK}\))?"
_PRIOR = r"(?:prior|previous|preceding|earlier|recent|most\s+recent|last|old|outside|comparison)"
_MODIFIER = r"(?:(?:portable|chest|frontal|lateral|pa|ap|upright|supine|semi-?upright|single-view|two-view|bedside)\s+)*"
PRIOR_EXAM = rf"(?:the\s+|a\s+)?{_PRIOR}\s+{_MODIFIER}{_EXAM}{_WHEN}"
# After "compared to" the exam may be named by its time ("the film from earlier the same day",
# "the study of ___"), be a bare "prior" before punctuation ("compared to prior, ...") or a blank.
_EARLIER = (rf"(?:{BLANK}|yesterday|earlier(?:\s+(?:the\s+same\s+day|today|this\s+(?:morning|afternoon|evening)))?"
            r"|the\s+(?:prior|previous|preceding)\s+(?:day|evening|morning|afternoon|night))")
PRIOR_LOOSE = (rf"(?:{PRIOR_EXAM}|(?:the\s+)?(?:prior|previous)(?:\s+one)?{_WHEN}(?=\s*[,.;:]|\s*$)"
               rf"|(?:the\s+)?{_EXAM}\s+(?:of|from|dated|on|obtained)\s+{_EARLIER}|{BLANK}(?:\s*(?:,|and)\s*{BLANK})*)")
_COMPARE = (r"(?:(?:as|when)\s+)?compared\s+(?:to|with)|in\s+comparison\s+(?:to|with)"
            r"|comparison\s+(?:is\s+made\s+)?(?:to|with)|relative\s+to")
_PREP = r"(?:since|from|than\s+(?:on|in)|(?:seen|noted|visible|demonstrated|present)\s+on|on|in)"
PRIOR_PHRASES = [
    re.compile(rf"\s*,?\s*\b(?:{_COMPARE})\s+{PRIOR_LOOSE}\s*,?", IC),  # "compared to prior," anywhere
    re.compile(rf"\s*,?\s*\b{_PREP}\s+{PRIOR_EXAM}\s*,?", IC),  # "since the previous radiograph": the exam noun is required
    re.compile(r"\s*,?\s*\bas\s+(?:before|previously(?:\s+(?:seen|noted|described|demonstrated|reported))?|seen\s+previously)\b", IC),
    re.compile(r"\bagain\s+(?=(?:seen|noted|demonstrated|visualized|identified|present|evident|appreciated|shown)\b)", IC),
]


def remove_prior_reference(s: str) -> str:
    """References to an earlier examination are removed as phrases, and the rest of the sentence is
    kept: "Compared to the prior study of ___, the heart is enlarged" -> "The heart is enlarged";
    "unchanged from the prior study" -> "unchanged"; "as before", "again seen" -> "seen". Change
    words (unchanged, improved, new) stay: they still describe what the image shows."""
    out = s
    for pattern in PRIOR_PHRASES:
        out = pattern.sub(" ", out)
    return s if out == s else tidy(out)


INTERVAL_PHRASE = re.compile(r"\s*,?\s*\b(?:in|over|during|since)\s+the\s+(?:(?:short|brief)\s+)?interval\b", IC)
INTERVAL_WORD = re.compile(
    r"\binterval\s+(?=(?:\w+\s+)?(?:increas|decreas|improv|worsen|develop|resol|plac|remov|chang|progress|appear|enlarg|"
    r"reduc|clear|re-?expan|advanc|withdraw|reposition|insert|extubat|intubat|new|growth|diminish|evolution|accumul|"
    r"reaccumul|decline|stabl|minimal|slight|mild|marked|substantial|significant|no\b)\w*)", IC)


def remove_interval(s: str) -> str:
    """"Interval" (= since the last examination) is removed where it qualifies a change: "Interval
    placement of a right PICC" -> "Placement of a right PICC"; "has improved in the interval" ->
    "has improved". An anatomical interval ("acromioclavicular interval is widened") is kept."""
    out = INTERVAL_WORD.sub("", INTERVAL_PHRASE.sub(" ", s))
    return s if out == s else tidy(out)


# A sentence made only of these words, with at least one CHANGE_WORDS among them, says only "no
# change": "There is no significant change", "The exam is otherwise unchanged", "Stable appearance
# of the chest". Any other word (a finding, an organ) keeps the sentence.
STABILITY_VOCABULARY = frozenset("""
there is are has have been was were no not other otherwise overall significant significantly substantial
substantially relevant appreciable appreciably major notable definite definitely further new essentially
grossly largely little minimal material the a an of and in chest exam examination study radiograph
radiographic appearance appearances findings finding remainder rest elsewhere seen noted identified
demonstrated appears appear remains remain change changes changed unchanged stable similar stability
""".split())
CHANGE_WORDS = frozenset({"change", "changes", "changed", "unchanged", "stable", "similar", "stability"})


def drop_no_change(s: str) -> str:
    """A sentence that says only that nothing changed ("No significant interval change since the prior
    study." once the phrases are gone) carries no finding: dropped."""
    words = re.findall(r"[a-z]+", s.lower())
    return "" if set(words) <= STABILITY_VOCABULARY and CHANGE_WORDS & set(words) else s


# Month names in full or abbreviated; "May" is left out: "may 2" is more often a verb than a date.
_MONTH = (r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|june?|july?|aug(?:ust)?|sep(?:t(?:ember)?)?|"
          r"oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)\b\.?")
_TIME = r"\d{1,2}(?::\d{2}){1,2}(?:\s*(?:a\.?m\.?|p\.?m\.?|hrs|hours|h)(?![a-z]))?|\d{1,2}\s*(?:a\.?m\.?|p\.?m\.?)(?![a-z])"
_DATE = rf"\d{{1,2}}/\d{{1,2}}(?:/\d{{2,4}})?|\d{{4}}-\d{{2}}-\d{{2}}|{_MONTH}\s+\d{{1,2}}(?:st|nd|rd|th)?(?:,?\s+\d{{4}})?"
DATE_TIME = [
    re.compile(rf"\s*,?\s*\b(?:at|@|by|around|approximately|on|dated|of|since|from)\s+(?:{_TIME}|{_DATE})", IC),
    re.compile(rf"\b(?:{_TIME}|{_DATE})", IC),
]


def remove_dates_times(s: str) -> str:
    """Dates and clock times (with their "at"/"on"): "obtained at 07:45 on 3/14" -> "obtained"."""
    out = s
    for pattern in DATE_TIME:
        out = pattern.sub(" ", out)
    return s if out == s else tidy(out)


BLANK_PHRASES = [
    re.compile(rf"\s*\([^()]*{BLANK}[^()]*\)"),  # "(___)", "(on ___)"
    re.compile(rf"\s*,?\s*\b(?:on|dated|at|since|from)\s+{BLANK}(?:\s*(?:,|and|at)\s*{BLANK})*", IC),  # dates, times
]


def remove_blanks(s: str) -> str:
    """"___" never survives: a blank that only dates something goes with its preposition ("on ___",
    "(___)"); any other sentence holding one (a name, an age, a place) is dropped."""
    if BLANK not in s:
        return s
    out = s
    for pattern in BLANK_PHRASES:
        out = pattern.sub(" ", out)
    return "" if BLANK in out else tidy(out)


RULES = (drop_notification, remove_prior_reference, remove_interval, drop_no_change, remove_dates_times, remove_blanks)


def renumber(sentences: list[str]) -> list[str]:
    """A numbered list stays 1, 2, 3 ... after items were dropped."""
    k = 0

    def number(m: re.Match) -> str:
        nonlocal k
        k += 1
        return f"{k}{m[2]} "

    return [re.sub(r"^(\d{1,2})([.)])\s+", number, s) for s in sentences]


def clean_section(text: str) -> tuple[str, Counter]:
    """One section body -> cleaned one-line text ("" when nothing is left) and, per rule, the number
    of sentences it changed or dropped."""
    notes: Counter = Counter()
    sentences = split_sentences(one_line(text))
    for rule in RULES:
        kept = []
        for s in sentences:
            new = rule(s)
            if new != s:
                notes[rule.__name__] += 1
            if new:
                kept.append(new)
        sentences = kept
    sentences = renumber([t for t in (tidy(s) for s in sentences) if t])
    return " ".join(sentences), notes


def format_report(findings: str, impression: str) -> str:
    """The authors' reference format (reference/unix-compat.md 5.2)."""
    return f"FINDINGS: {findings}" + (f" IMPRESSION: {impression}" if impression else "")


def clean_report(findings: str, impression: str) -> tuple[str | None, Counter]:
    """Cleaned "FINDINGS: ... [IMPRESSION: ...]" (None when no findings text is left) and the notes."""
    f, notes = clean_section(findings)
    i, more = clean_section(impression)
    notes.update(more)
    if impression.strip() and not i:
        notes["impression_emptied"] += 1
    return (format_report(f, i) if f else None), notes
