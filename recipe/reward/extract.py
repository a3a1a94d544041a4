"""Answer extraction and normalisation for math responses (pure functions, no math-verify).

`extract_answer` finds the model's final answer in a response; `normalize_answer` removes LaTeX and
formatting noise; `as_integer` is the exact integer reading used by the reward's fast path (AIME
answers are integers 0-999, so most comparisons end here); `exponent_tower_depth` lets the caller
refuse inputs that would make sympy build astronomically large integers.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

# `\boxed` / `\fbox` not followed by more letters (so `\boxedfoo` is not a box)
_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
# "Answer: 42", "**Final Answer:** $42$", "> answer: 42" (last such line wins)
_ANSWER_LINE_RE = re.compile(
    r"^[ \t>#*_]*(?:final[ \t]+answer|answer)[ \t*_]*[:：][ \t*_]*(?P<ans>[^\n]*?)[ \t]*$",
    re.IGNORECASE | re.MULTILINE,
)
# "**Final Answer**" alone on its line, the answer on the next non-empty line
_ANSWER_HEADING_RE = re.compile(
    r"^[ \t>#*_]*(?:final[ \t]+answer|answer)[ \t*_:：]*\n(?:[ \t]*\n)*[ \t]*(?P<ans>[^\n]*?)[ \t]*$",
    re.IGNORECASE | re.MULTILINE,
)
# **42** (a short bold span with a digit in it; used only when nothing better exists)
_BOLD_RE = re.compile(r"\*\*([^*\n]{1,100})\*\*")
# inside a bold span: "**The final answer is 42.**", "**Answer: 42**" -> what follows the phrase
_PHRASE_RE = re.compile(r"(?:final[ \t]+answer|answer)[ \t]*(?:is|=|:|：)?[ \t]*(?P<ans>.+?)[ \t.]*$", re.IGNORECASE)
_EMPHASIS = " \t*_"
# ASCII control characters except tab and newline: they carry no math and confuse regexes/parsers
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")

_WRAPPER_RE = re.compile(r"\\(?:text|textbf|textrm|textit|mathrm|mathbf|mathit|mbox|operatorname)\s*\{([^{}]*)\}")
_LATEX_SPACE_RE = re.compile(r"\\[!,;:> ]|\\q?quad(?![A-Za-z])|~")
_DEGREE_RE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ(?![A-Za-z])|\\degree(?![A-Za-z])|°")
_SIZING_RE = re.compile(r"\\(?:left|right|displaystyle|big|Big|bigg|Bigg)(?![A-Za-z])")

# Units and words that may trail an integer answer ("5 cm", "30 degrees", "12 ways")
_UNIT_WORDS = (
    "degrees|degree|deg|cm|mm|km|m|meters|meter|metres|metre|inches|inch|in|feet|foot|ft|yards|yd|miles|mi|"
    "units|unit|sq|square|cubic|seconds|second|sec|s|minutes|minute|min|hours|hour|hr|days|day|years|year|"
    "dollars|dollar|cents|cent|ways|points|people|students|numbers|integers|pairs|values|solutions"
)
_TRAILING_UNIT_RE = re.compile(rf"^(?P<num>.*?[0-9])\s*(?:{_UNIT_WORDS})\s*(?:\^?\s*\{{?[23]\}}?)?\s*$", re.IGNORECASE)
_VAR_PREFIX_RE = re.compile(r"^[A-Za-z](?:_\{?[A-Za-z0-9]+\}?)?\s*=\s*(?=\S)")
_INT_RE = re.compile(r"^[+-]?[0-9]+(?:\.0*)?$")
_THOUSANDS_RE = re.compile(r"^[+-]?[0-9]{1,3}(?:[, ][0-9]{3})+$")
# Longer integers are not compared on the fast path (int() of huge strings is slow and limited)
_MAX_INT_DIGITS = 200


@dataclass(frozen=True)
class Extraction:
    """Result of `extract_answer`.

    answer: the raw answer text (before normalisation), or None when no answer was found.
    method: "boxed", "answer_line", "bold", "malformed_box" (the last box is unbalanced, e.g. the
        response was cut off inside it; answer is None) or "none".
    """

    answer: str | None
    method: str


def strip_control_chars(text: str) -> str:
    """`text` without ASCII control characters other than tab and newline."""
    return _CONTROL_RE.sub("", text)


def _box_content(text: str, start: int) -> str | None:
    """Content of the box whose command ends at `start`; None if its braces never close."""
    n = len(text)
    i = start
    while i < n and text[i] in " \t":
        i += 1
    if i < n and text[i] == "{":
        depth = 0
        for j in range(i, n):
            c = text[j]
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    return text[i + 1 : j]
        return None
    # `\boxed 5`: one token, up to whitespace or a closing `$`
    m = re.match(r"[^\s$]+", text[i:])
    return m.group(0) if m else None


def extract_answer(text: str) -> Extraction:
    """Find the final answer in a response.

    Order: the last `\\boxed{...}` / `\\fbox{...}` / `\\boxed X` (nested braces allowed; if the last
    box never closes, no answer is returned rather than an earlier box); else the last
    "Answer:" / "Final answer:" line (or such a heading with the answer on the next line); else the
    last short bold `**...**` span containing a digit -- what follows "answer is" / "answer:" when the
    span holds that phrase ("**The final answer is 42.**"). Emphasis markers around an answer are
    dropped. The caller is expected to have truncated `text` (only its tail matters).
    """
    boxes = list(_BOX_RE.finditer(text))
    if boxes:
        content = _box_content(text, boxes[-1].end())
        if content is None:
            return Extraction(None, "malformed_box")
        return Extraction(content, "boxed")
    lines = [(m.start(), m.group("ans").strip(_EMPHASIS)) for m in _ANSWER_LINE_RE.finditer(text)]
    lines += [(m.start(), m.group("ans").strip(_EMPHASIS)) for m in _ANSWER_HEADING_RE.finditer(text)]
    lines = [answer for _, answer in sorted(lines) if answer.strip("$")]
    if lines:
        return Extraction(lines[-1], "answer_line")
    bolds = [b for b in _BOLD_RE.findall(text) if any(ch.isdigit() for ch in b)]
    if bolds:
        phrase = _PHRASE_RE.search(bolds[-1])
        return Extraction(phrase.group("ans").strip(_EMPHASIS) if phrase else bolds[-1], "bold")
    return Extraction(None, "none")


def _strip_math_delimiters(s: str) -> str:
    """Remove enclosing `$...$`, `$$...$$`, `\\(...\\)`, `\\[...\\]` and bold markers, repeatedly."""
    pairs = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"), ("**", "**"))
    changed = True
    while changed:
        changed = False
        s = s.strip()
        for left, right in pairs:
            if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
                s = s[len(left) : len(s) - len(right)]
                changed = True
    return s


def _unwrap_boxes(s: str) -> str:
    """`\\boxed{\\boxed{5}}` -> `5` when the whole string is one box."""
    while True:
        m = _BOX_RE.match(s)
        if not m:
            return s
        inner = _box_content(s, m.end())
        if inner is None or not s.rstrip().endswith("}"):
            return s
        s = inner.strip()


def normalize_answer(answer: str) -> str:
    """Answer text without formatting noise; used for display ("pred") and exact comparisons.

    Applies NFKC, removes control characters, math delimiters, whole-string boxes, `\\text{}`-like
    wrappers (content kept), LaTeX spacing (`\\!`, `\\,`, `~`, ...), sizing commands, degree marks,
    `\\%`, dollar signs, trailing periods, and collapses whitespace. LaTeX structure (`\\frac`,
    `\\sqrt`, ...) is kept, so the result is still valid input for math-verify.
    """
    s = unicodedata.normalize("NFKC", answer)
    s = strip_control_chars(s).replace("\n", " ").replace("\t", " ")
    s = _unwrap_boxes(_strip_math_delimiters(s))
    for _ in range(4):  # wrappers can be nested (\text{\textbf{5}})
        s2 = _WRAPPER_RE.sub(r"\1", s)
        if s2 == s:
            break
        s = s2
    s = _LATEX_SPACE_RE.sub("", s)
    s = _SIZING_RE.sub("", s)
    s = _DEGREE_RE.sub("", s)
    s = s.replace("\\%", "").replace("%", "").replace("\\$", "").replace("$", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("−", "-")
    s = re.sub(r"\s+", " ", s).strip()
    s = s.rstrip(".").strip()
    return s


def as_integer(answer: str) -> int | None:
    """The integer an answer denotes, or None when it is not a plain integer.

    Accepts after `normalize_answer`: signs, leading zeros ("007"), thousands separators ("1,000",
    "1{,}000", "1 000"), "5.0", a single-variable prefix ("x = 5") and trailing units ("5 cm",
    "30 degrees", "12 ways"). Anything else (fractions, decimals, expressions) returns None, so
    the caller falls back to math-verify.
    """
    return integer_of_normalized(normalize_answer(answer))


def integer_of_normalized(s: str) -> int | None:
    """`as_integer` for an answer that already went through `normalize_answer`."""
    s = s.replace("{,}", ",")
    s = _VAR_PREFIX_RE.sub("", s)
    m = _TRAILING_UNIT_RE.match(s)
    if m:
        s = m.group("num").strip()
    s = s.replace("{", "").replace("}", "") if re.fullmatch(r"[+-]?\{?[0-9]+\}?", s) else s
    if _THOUSANDS_RE.match(s):
        s = s.replace(",", "").replace(" ", "")
    if not _INT_RE.match(s) or len(s) > _MAX_INT_DIGITS:
        return None
    return int(s.split(".")[0])


def _atom_end(s: str, i: int, end: int) -> int:
    """End (exclusive) of the exponent atom starting at `i`: a braced group, a digit run, a
    LaTeX command name, or one character."""
    while i < end and s[i].isspace():
        i += 1
    if i >= end:
        return end
    c = s[i]
    if c == "{":
        depth = 0
        for j in range(i, end):
            if s[j] == "{":
                depth += 1
            elif s[j] == "}":
                depth -= 1
                if depth == 0:
                    return j + 1
        return end
    j = i + 1
    if c.isdigit():
        while j < end and s[j].isdigit():
            j += 1
    elif c == "\\":
        while j < end and s[j].isalpha():
            j += 1
    return j


def _span_depth(s: str, start: int, end: int) -> int:
    best = 0
    i = start
    while i < end:
        if s[i] != "^":
            i += 1
            continue
        # the exponent, extended over a right-associative chain (`9^9^9` as in Python's 9**9**9)
        k = _atom_end(s, i + 1, end)
        while True:
            j = k
            while j < end and s[j].isspace():
                j += 1
            if j < end and s[j] == "^":
                k = _atom_end(s, j + 1, end)
            else:
                break
        best = max(best, 1 + _span_depth(s, i + 1, k))
        i = k
    return best


def exponent_tower_depth(s: str) -> int:
    """Largest number of nested exponentiations in `s`: `x^2+y^2` -> 1, `9^{9^{9}}` -> 2,
    `9**9**9` -> 2, `9^{9^{9^{9}}}` -> 3.

    Used to refuse inputs before math-verify: sympy evaluates integer powers eagerly, so a tower of
    large bases can run for minutes and exhaust memory.
    """
    s = s.replace("**", "^")
    return _span_depth(s, 0, len(s))
