"""Binary math reward (math-verify) for verl's reward managers.

Use it as verl's custom reward function::

    reward.custom_reward_function.path=pkg://popo_verl.reward   # or the file path
    reward.custom_reward_function.name=compute_score

``compute_score`` has the signature of ``verl.utils.reward_score.default_compute_score``
(``data_source, solution_str, ground_truth, extra_info=None, **kwargs``) and returns a
plain ``float`` (1.0 correct, 0.0 otherwise).  ``data_source`` is ignored: every source
of this project is scored by the same math reward.

Pipeline: ``extract_answer`` takes the LAST ``\\boxed{...}`` / ``\\fbox{...}`` (nested
braces allowed) of the completion, or failing that a final-answer line ("The answer
is X", "Answer: X", "#### X"); ``is_equiv`` compares it with the gold answer, first by
cheap string / exact-number checks, then by math-verify (``parse`` + ``verify``).
``verifier="whole"`` scores as the POPO reference does instead (``verify_whole``: math-verify
over the whole completion), for evaluation.

Time is bounded without relying on signals alone: verl's reward loop calls the
reward from executor threads, where math-verify's ``signal.alarm`` timeouts cannot
run (they raise).  So:

* the completion is scanned with ``str.rfind`` and bounded brace matching (linear);
  final-answer regexes only see the last ``_TAIL_CHARS`` characters;
* the extracted answer and the gold are capped at ``_MAX_ANSWER_CHARS`` characters
  before math-verify sees them, and answers with exponent towers / huge literals
  (which make sympy hang) are compared as normalised strings only;
* math-verify's own alarm-based timeouts are used only on the main thread and only
  when no outer ``ITIMER_REAL`` timer (e.g. verl's ``compute_score_timeout``) is
  armed, since math-verify's ``alarm(0)`` would cancel it.

Nothing in here raises on what a model writes: any exception scores 0.0 (an unknown ``verifier`` name, a
configuration error, does raise).
"""

from __future__ import annotations

import functools
import logging
import re
import signal
import threading
from decimal import Decimal, InvalidOperation
from typing import Any, Iterable, Optional

__all__ = ["VERIFIERS", "compute_score", "extract_answer", "is_equiv", "normalize_answer", "verify_whole"]

# last-boxed: the final answer this module extracts (last box, else a final-answer line), compared with the gold;
# whole: the POPO reference's verifier, math-verify over the whole completion (evaluation: see verify_whole).
VERIFIERS = ("last-boxed", "whole")

logger = logging.getLogger(__name__)

# Only the end of a completion can hold its final answer.
_TAIL_CHARS = 4000
# Longest answer we hand to math-verify (sympy); real answers are far shorter.
_MAX_ANSWER_CHARS = 300
# How many trailing \boxed occurrences to try when the last one is unbalanced.
_MAX_BOX_TRIES = 8
# math-verify per-call timeouts (seconds, ints: signal.alarm) when signals are usable.
_MV_TIMEOUT_S = 3

_BOX_CMDS = ("\\boxed", "\\fbox")

# A plain number: optional sign, digits with optional thousands separators, optional decimals.
_NUM_RE = re.compile(r"^[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?$|^[+-]?\.\d+$")
_THOUSANDS_RE = re.compile(r"^[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")

# Final-answer lines, tried on the tail of the text; the last match wins.
_FINAL_PATTERNS = (
    re.compile(r"(?:final\s+answer|the\s+answer)\s*(?:is|=|:)\s*:?\s*([^\n]{1,400})", re.IGNORECASE),
    re.compile(r"(?:^|\n)\s*\**\s*(?:final\s+)?answer\s*\**\s*[:：]\s*\**\s*([^\n]{1,400})", re.IGNORECASE),
    re.compile(r"####\s*([^\n]{1,400})"),
)

# Inputs that make sympy evaluate enormous numbers (exponent towers, factorials of big
# literals, very long literals): compared as strings only.
_DANGEROUS_RE = re.compile(
    "|".join(
        (
            r"(?:\^|\*\*)\s*\{[^{}]*(?:\^|\*\*)",  # 2^{3^{4}}: exponent tower
            r"(?:\^|\*\*)\s*\{[^{}]*\{[^{}]*(?:\^|\*\*)",  # 2^{\frac{3^{9}}{2}}
            r"(?:\^|\*\*)\s*\d+(?:\.\d+)?\s*(?:\^|\*\*)",  # 10^10^10 (right-assoc)
            r"(?:\^|\*\*)\s*[{(]?\s*\d{5,}",  # 10^{100000}
            r"\d{5,}\s*[})]?\s*!",  # 123456!
            r"\^.*(?<!\\)!|(?<!\\)!.*\^",  # (10^{100})!: factorial next to a power (not \!)
        )
    )
)
# A power of a symbolic expression with a 3+ digit exponent: sympy expands it (seconds).
_BIG_EXP_RE = re.compile(r"(?:\^|\*\*)\s*[{(]?\s*\d{3,}")
_LATEX_CMD_RE = re.compile(r"\\[a-zA-Z]+")


def _too_expensive(s: str) -> bool:
    """Whether sympy could run unbounded on ``s`` (then only string checks are used)."""
    if _DANGEROUS_RE.search(s):
        return True
    if _BIG_EXP_RE.search(s) and re.search(r"[a-zA-Z]", _LATEX_CMD_RE.sub("", s)):
        return True
    return False


# --------------------------------------------------------------------------- extraction
def _match_braces(text: str, open_idx: int, max_len: int = 4000) -> Optional[str]:
    """Content of the brace group opening at ``text[open_idx] == '{'`` (None if unbalanced)."""
    depth = 0
    end = min(len(text), open_idx + max_len)
    i = open_idx
    while i < end:
        c = text[i]
        if c == "\\" and i + 1 < end and text[i + 1] in "{}":
            i += 2  # escaped brace \{ \} belongs to the content
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[open_idx + 1 : i]
        i += 1
    return None


def _last_boxed(text: str) -> Optional[str]:
    """Content of the last complete ``\\boxed{..}`` / ``\\fbox{..}`` / ``\\boxed X`` in ``text``."""
    # Positions of every box command, scanned from the end (rfind: linear, no regex).
    candidates: list[tuple[int, str]] = []
    for cmd in _BOX_CMDS:
        pos = len(text)
        for _ in range(_MAX_BOX_TRIES):
            pos = text.rfind(cmd, 0, pos)
            if pos < 0:
                break
            candidates.append((pos, cmd))
    candidates.sort(reverse=True)
    for pos, cmd in candidates[:_MAX_BOX_TRIES]:
        j = pos + len(cmd)
        # \boxed{...}; allow whitespace between the command and the brace
        k = j
        while k < len(text) and k - j < 8 and text[k] in " \t":
            k += 1
        if k < len(text) and text[k] == "{":
            content = _match_braces(text, k)
            if content is not None:
                return content
            continue  # truncated box: try the previous one
        if j < len(text) and text[j] in " \t":
            # "\boxed 5" form: one token up to whitespace or `$`
            m = re.match(r"[ \t]+([^\s$]{1,200})", text[j : j + 220])
            if m:
                return m.group(1)
        # e.g. "\boxeds" (a longer command name) or bare "\boxed" at the end: skip
    return None


def _final_line(text: str) -> Optional[str]:
    tail = text[-_TAIL_CHARS:]
    best: tuple[int, str] | None = None
    for pat in _FINAL_PATTERNS:
        for m in pat.finditer(tail):
            if best is None or m.start(1) >= best[0]:
                best = (m.start(1), m.group(1))
    if best is None:
        return None
    ans = best[1]
    # A final-answer line may still carry a box or inline math: prefer its content.
    boxed = _last_boxed(ans)
    if boxed is not None:
        return boxed
    m = re.search(r"\$([^$]+)\$", ans)
    if m:
        ans = m.group(1)
    elif ans.count("$") == 1 and ans.strip().startswith("$"):
        ans = ans.strip()[1:]
    return ans


def extract_answer(text: Any) -> Optional[str]:
    """The final answer of a completion (last box, else a final-answer line), or None."""
    try:
        if text is None:
            return None
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        if not isinstance(text, str):
            text = str(text)
        if not text:
            return None
        ans = _last_boxed(text)
        if ans is None:
            ans = _final_line(text)
        if ans is None:
            return None
        ans = _strip_answer(ans)
        return ans or None
    except Exception:  # pragma: no cover - defensive: never raise into the trainer
        logger.debug("extract_answer failed", exc_info=True)
        return None


# --------------------------------------------------------------------------- normalisation
def _strip_answer(ans: str) -> str:
    s = ans.strip()
    # surrounding $...$ / \( \) / \[ \]
    for _ in range(3):
        before = s
        if s.startswith("$") and s.endswith("$"):
            s = s.strip("$").strip()
        if s.startswith("\\(") and s.endswith("\\)"):
            s = s[2:-2].strip()
        if s.startswith("\\[") and s.endswith("\\]"):
            s = s[2:-2].strip()
        # a gold or answer that is itself a box
        for cmd in _BOX_CMDS:
            if s.startswith(cmd):
                inner = _last_boxed(s)
                if inner is not None and s.rstrip().endswith("}"):
                    s = inner.strip()
        if s == before:
            break
    s = s.rstrip(" .;,")  # "5." at the end of a sentence
    s = s.rstrip()
    return s


def normalize_answer(ans: Any) -> str:
    """Canonical string form of a gold / predicted answer (used by data prep too).

    Strips ``$``, a surrounding ``\\boxed{}``, whitespace and a trailing period; turns
    integral floats (``3.0``) into ``"3"``; joins lists with ``", "``.
    """
    if ans is None:
        return ""
    if isinstance(ans, bool):
        return str(ans)
    if isinstance(ans, int):
        return str(ans)
    if isinstance(ans, float):
        if ans != ans or ans in (float("inf"), float("-inf")):
            return str(ans)
        if ans.is_integer():
            return str(int(ans))
        return repr(ans)
    if isinstance(ans, bytes):
        ans = ans.decode("utf-8", errors="replace")
    if not isinstance(ans, str):
        try:
            items = list(ans)
        except TypeError:
            return str(ans).strip()
        return ", ".join(normalize_answer(a) for a in items)
    s = _strip_answer(ans)
    # "3.0" / "3.00" -> "3" (AMC golds are stored as floats)
    if re.fullmatch(r"[+-]?\d+\.0+", s):
        s = s.split(".")[0]
    return s


def _squash(s: str) -> str:
    s = s.replace("\\left", "").replace("\\right", "").replace("\\!", "").replace("\\,", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    return re.sub(r"\s+", "", s)


def _as_number(s: str) -> Optional[Decimal]:
    s = s.strip()
    if not _NUM_RE.match(s):
        return None
    if "," in s:
        if not _THOUSANDS_RE.match(s):
            return None
        s = s.replace(",", "")
    try:
        return Decimal(s)
    except InvalidOperation:
        return None


# --------------------------------------------------------------------------- math-verify
def _signals_usable() -> bool:
    if threading.current_thread() is not threading.main_thread():
        return False
    try:
        # An armed outer timer (e.g. verl's compute_score_timeout) would be cancelled by
        # math-verify's alarm(0): leave it alone then.
        return signal.getitimer(signal.ITIMER_REAL)[0] == 0.0
    except Exception:
        return False


@functools.lru_cache(maxsize=1)
def _mv():
    import math_verify  # noqa: F401  (import cost paid once)
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    latex_cfg = LatexExtractionConfig(boxed_match_priority=0)
    return parse, verify, (latex_cfg, ExprExtractionConfig())


def _parse(s: str, timeout: Optional[int]):
    parse, _, cfg = _mv()
    # Boxed first (the LaTeX extractor then takes the whole box), plain expression second.
    out = parse("\\boxed{" + s + "}", extraction_config=cfg, parsing_timeout=timeout)
    if not any(not isinstance(x, str) for x in out):
        # Some forms (e.g. ``50\\%``) only parse as inline math, not inside a box.
        alt = parse("$" + s + "$", extraction_config=cfg, parsing_timeout=timeout)
        if any(not isinstance(x, str) for x in alt):
            return alt
    return out


@functools.lru_cache(maxsize=65536)
def _mv_equiv(pred: str, gold: str, use_signals: bool) -> bool:
    _, verify, _ = _mv()
    timeout = _MV_TIMEOUT_S if use_signals else None
    gold_p = _parse_gold(gold, use_signals)
    if not gold_p:
        return False
    pred_p = _parse(pred, timeout)
    if not pred_p:
        return False
    if _number_vs_free_expr(gold_p, pred_p):
        return False
    return bool(verify(gold_p, pred_p, timeout_seconds=timeout))


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str, use_signals: bool):
    # Golds repeat across the G rollouts of a prompt: parse each once.
    return _parse(gold, _MV_TIMEOUT_S if use_signals else None)


def _number_vs_free_expr(gold_p, pred_p) -> bool:
    """A numeric gold against an expression with free variables (``x+17``): surely unequal.

    Saves sympy's ``simplify`` (tens of ms) on every garbage answer of a numeric problem.
    Equations (``x=17``) and sets are left to math-verify.
    """
    import sympy

    golds = [g for g in gold_p if not isinstance(g, str)]
    preds = [p for p in pred_p if not isinstance(p, str)]
    if not golds or not preds:
        return False
    if not all(isinstance(g, sympy.Number) for g in golds):
        return False
    return all(isinstance(p, sympy.Expr) and bool(p.free_symbols) for p in preds)


def _is_equiv_one(pred: str, gold: str) -> bool:
    if not pred or not gold:
        return False
    if pred == gold or _squash(pred) == _squash(gold):
        return True
    # Fast path: two plain numbers are compared exactly, no sympy.
    pn, gn = _as_number(pred), _as_number(gold)
    if pn is not None and gn is not None:
        return pn == gn
    if len(pred) > _MAX_ANSWER_CHARS or len(gold) > _MAX_ANSWER_CHARS:
        return False
    if _too_expensive(pred) or _too_expensive(gold):
        return False  # sympy could run unbounded; only the string checks above apply
    try:
        return _mv_equiv(pred, gold, _signals_usable())
    except Exception:
        logger.debug("math-verify failed on pred=%r gold=%r", pred, gold, exc_info=True)
        return False


def _gold_list(gold: Any) -> list[str]:
    if gold is None:
        return []
    if isinstance(gold, (str, bytes, int, float)):
        return [normalize_answer(gold)]
    try:
        return [normalize_answer(g) for g in gold]
    except TypeError:
        return [normalize_answer(gold)]


def is_equiv(pred: Any, gold: Any) -> bool:
    """Whether answer ``pred`` equals ``gold`` (string, number or list of acceptable golds).

    Both are answer strings (not whole completions): pass ``extract_answer(text)`` as
    ``pred``.  Never raises.
    """
    try:
        if pred is None:
            return False
        p = normalize_answer(pred)
        golds: Iterable[str] = _gold_list(gold)
        return any(_is_equiv_one(p, g) for g in golds if g)
    except Exception:  # pragma: no cover - defensive
        logger.debug("is_equiv failed", exc_info=True)
        return False


def verify_whole(completion: Any, gold: Any) -> bool:
    """The reference's verifier: math-verify parses the whole completion (the rightmost box first, then any LaTeX,
    then a plain expression) and compares it with the gold. Never raises.

    Meant for evaluation, which runs on the main thread: elsewhere math-verify's signal timeouts cannot run, and
    only the extracted answer is screened for inputs that make sympy run unbounded.
    """
    try:
        parse, verify, cfg = _mv()
        use_signals = _signals_usable()
        timeout = _MV_TIMEOUT_S if use_signals else None
        pred_p = parse(str(completion), extraction_config=cfg, parsing_timeout=timeout)
        extracted = next((x for x in pred_p if isinstance(x, str)), "")
        if not pred_p or len(extracted) > _MAX_ANSWER_CHARS or _too_expensive(extracted):
            return False
        return any(
            verify(_parse_gold(g, use_signals), pred_p, timeout_seconds=timeout) for g in _gold_list(gold) if g
        )
    except Exception:
        logger.debug("verify_whole failed on gold=%r", gold, exc_info=True)
        return False


# --------------------------------------------------------------------------- verl entry
def compute_score(
    data_source=None, solution_str=None, ground_truth=None, extra_info=None, verifier="last-boxed", **kwargs
) -> float:
    """verl custom reward: 1.0 when the completion's final answer equals the gold, else 0.0.

    ``data_source`` and ``extra_info`` are accepted for verl's signature and ignored; ``verifier`` is one of
    VERIFIERS.
    """
    if verifier == "whole":
        return 1.0 if verify_whole(solution_str, ground_truth) else 0.0
    if verifier != "last-boxed":
        raise ValueError(f"verifier must be one of {VERIFIERS}, got {verifier!r}")
    try:
        pred = extract_answer(solution_str)
        if pred is None:
            return 0.0
        return 1.0 if is_equiv(pred, ground_truth) else 0.0
    except Exception:  # pragma: no cover - defensive
        logger.debug("compute_score failed", exc_info=True)
        return 0.0
