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
configuration error, does raise).  But a verifier that fails (an exception, a timeout) is not a wrong answer, and
must not pass for one: every failure is noted, warned about once per process (WARNING, with the exception and where it
was raised), and reported with the score.  Called as verl calls it (with ``extra_info``), ``compute_score`` returns
``{"score", "acc", "verifier_error", "verifier_timeout"}``: verl keeps the extra keys as the row's
``reward_extra_info``, the POPO trainer counts them per step (``reward/verifier_errors``,
``reward/verifier_timeouts``, see ``verifier_error_metrics``) and stops the run when more than
``reward.custom_reward_function.reward_kwargs.max_verifier_error_share`` (default 5 %) of a step's rewards failed.
Called without ``extra_info`` it returns the plain float; ``score_response`` gives score and failures to other callers.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import signal
import threading
import traceback
from decimal import Decimal, InvalidOperation
from typing import Any, Iterable, Mapping, NamedTuple, Optional, Sequence

__all__ = [
    "VERIFIERS",
    "Scored",
    "check_verifier_failures",
    "compute_score",
    "extract_answer",
    "is_equiv",
    "max_verifier_error_share",
    "normalize_answer",
    "score_response",
    "verifier_error_metrics",
    "verify_whole",
]

# last-boxed: the final answer this module extracts (last box, else a final-answer line), compared with the gold;
# whole: the POPO reference's verifier, math-verify over the whole completion (evaluation: see verify_whole).
VERIFIERS = ("last-boxed", "whole")

logger = logging.getLogger(__name__)

# A failed verification, in the reward_extra_info of each response: "" when none, else "Type: message (where)".
VERIFIER_ERROR_KEY = "verifier_error"
VERIFIER_TIMEOUT_KEY = "verifier_timeout"
# The step's failed rewards, in the training metrics.
ERRORS_METRIC = "reward/verifier_errors"
TIMEOUTS_METRIC = "reward/verifier_timeouts"
# Beside the reward function's other settings (verl passes reward_kwargs to it; compute_score ignores this one).
MAX_SHARE_KEY = "reward.custom_reward_function.reward_kwargs.max_verifier_error_share"
DEFAULT_MAX_SHARE = 0.05
# Longest exception message kept: math-verify's can quote a whole completion.
_MAX_NOTE_CHARS = 300

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


# --------------------------------------------------------------------------- verifier failures
class _Sinks(threading.local):
    """Per thread (verl scores from executor threads): the lists that collect the failures met, innermost last."""

    def __init__(self):
        self.stack: list[list[tuple[str, str]]] = []


_sinks = _Sinks()
_warned: set[str] = set()
_warn_lock = threading.Lock()


@contextlib.contextmanager
def _collect():
    """The verifier failures, as (kind, text) with kind "error" or "timeout", met on this thread inside the block."""
    sink: list[tuple[str, str]] = []
    _sinks.stack.append(sink)
    try:
        yield sink
    finally:
        _sinks.stack.pop()


def _note(kind: str, text: str) -> None:
    if _sinks.stack:
        _sinks.stack[-1].append((kind, text))


def _short(text: str) -> str:
    return text if len(text) <= _MAX_NOTE_CHARS else text[:_MAX_NOTE_CHARS] + "..."


def _warn_once(kind: str, text: str, exc: Optional[BaseException] = None) -> None:
    with _warn_lock:
        first = kind not in _warned
        _warned.add(kind)
    if not first:
        logger.debug("verifier %s, response scored 0: %s", kind, text, exc_info=exc)
        return
    metric = TIMEOUTS_METRIC if kind == "timeout" else ERRORS_METRIC
    logger.warning(
        "verifier %s, response scored 0 although it may be right: %s. Counted in %s; a POPO training step stops "
        "when more than %s (default %g) of its rewards failed. This warning is shown once per process.",
        kind, text, metric, MAX_SHARE_KEY, DEFAULT_MAX_SHARE, exc_info=exc,
    )  # fmt: skip


def _failed(where: str, exc: BaseException) -> None:
    """An exception caught in place of a score: noted for the response being scored, warned about once."""
    # TimeoutError: verl's legacy NaiveRewardManager(compute_score_timeout=...) raises it inside the call.
    kind = "timeout" if isinstance(exc, TimeoutError) else "error"
    frames = traceback.extract_tb(exc.__traceback__)
    origin = ""
    if frames:
        origin = f", raised at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno} in {frames[-1].name}"
    text = f"{type(exc).__name__}: {_short(str(exc))} (in {where}{origin})"
    _note(kind, text)
    _warn_once(kind, text, exc)


class _MathVerifyTimeouts(logging.Filter):
    """math-verify catches its own signal timeouts and answers "no match" after a WARNING "Timeout during ..."
    (math_verify/parser.py `parse`, math_verify/grader.py `verify`, math-verify 0.9): count those too."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith("Timeout during"):
            text = f"math-verify: {_short(record.getMessage())}"
            _note("timeout", text)
            _warn_once("timeout", text)
        return True


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
    except Exception as e:  # never raise into the trainer, but never pass for a wrong answer either
        _failed("extract_answer", e)
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

    for name in ("math_verify.parser", "math_verify.grader"):
        mv_logger = logging.getLogger(name)
        if not any(isinstance(f, _MathVerifyTimeouts) for f in mv_logger.filters):  # one, were _mv's cache cleared
            mv_logger.addFilter(_MathVerifyTimeouts())
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


def _replay(cached):
    """A cached (value, failures): the failures met computing it count again for every response that reuses it."""
    value, notes = cached
    for kind, text in notes:
        _note(kind, text)
    return value


def _mv_equiv(pred: str, gold: str, use_signals: bool) -> bool:
    return _replay(_mv_equiv_noted(pred, gold, use_signals))


@functools.lru_cache(maxsize=65536)
def _mv_equiv_noted(pred: str, gold: str, use_signals: bool) -> tuple[bool, tuple]:
    with _collect() as notes:
        value = _mv_equiv_uncached(pred, gold, use_signals)
    return value, tuple(notes)


def _mv_equiv_uncached(pred: str, gold: str, use_signals: bool) -> bool:
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


def _parse_gold(gold: str, use_signals: bool):
    return _replay(_parse_gold_noted(gold, use_signals))


@functools.lru_cache(maxsize=4096)
def _parse_gold_noted(gold: str, use_signals: bool):
    # Golds repeat across the G rollouts of a prompt: parse each once.
    with _collect() as notes:
        value = _parse(gold, _MV_TIMEOUT_S if use_signals else None)
    return value, tuple(notes)


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
    except Exception as e:
        _failed(f"math-verify, pred={_short(pred)!r} gold={_short(gold)!r}", e)
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
    except Exception as e:
        _failed("is_equiv", e)
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
    except Exception as e:
        _failed(f"verify_whole, gold={_short(str(gold))!r}", e)
        return False


# --------------------------------------------------------------------------- verl entry
# A NamedTuple, not a dataclass: verl loads this file by path (reward.custom_reward_function.path) without putting it
# in sys.modules, where dataclasses fail under postponed annotations.
class Scored(NamedTuple):
    """A response's score (1.0 right, 0.0 otherwise) and the verifier's failures while scoring it: "" when none,
    else the first one as "Type: message (where it was raised)". A failed response scores 0.0."""

    score: float
    error: str = ""
    timeout: str = ""

    def reward_extra_info(self) -> dict:
        """What compute_score returns to verl: `score` is the reward, the other keys become reward_extra_info (the
        float compute_score returned before was kept by verl as `acc`, which its validation metrics and
        popo_verl.tiny.summary read)."""
        return {
            "score": self.score,
            "acc": self.score,
            VERIFIER_ERROR_KEY: self.error,
            VERIFIER_TIMEOUT_KEY: self.timeout,
        }


def score_response(solution_str: Any, ground_truth: Any, verifier: str = "last-boxed") -> Scored:
    """Score one completion against its gold with the named verifier (one of VERIFIERS), failures reported."""
    if verifier not in VERIFIERS:
        raise ValueError(f"verifier must be one of {VERIFIERS}, got {verifier!r}")
    with _collect() as failures:
        if verifier == "whole":
            right = verify_whole(solution_str, ground_truth)
        else:
            try:
                pred = extract_answer(solution_str)
                right = pred is not None and is_equiv(pred, ground_truth)
            except Exception as e:  # never raise into the trainer
                _failed("compute_score", e)
                right = False
    first = {kind: text for kind, text in reversed(failures)}
    return Scored(1.0 if right else 0.0, first.get("error", ""), first.get("timeout", ""))


def compute_score(
    data_source=None, solution_str=None, ground_truth=None, extra_info=None, verifier="last-boxed", **kwargs
) -> float | dict:
    """verl custom reward: 1.0 when the completion's final answer equals the gold, else 0.0.

    ``data_source`` is ignored; ``verifier`` is one of VERIFIERS; other ``kwargs`` (verl's, and the
    ``max_verifier_error_share`` of reward_kwargs, which the trainer reads) are ignored. verl's reward managers
    always pass ``extra_info``: then the result is ``Scored.reward_extra_info()``, the score with the verifier's
    failures; without ``extra_info`` it is the float score.
    """
    scored = score_response(solution_str, ground_truth, verifier)
    return scored.score if extra_info is None else scored.reward_extra_info()


# --------------------------------------------------------------------------- the trainer's check
def max_verifier_error_share(config) -> float:
    """MAX_SHARE_KEY of a run's config (DEFAULT_MAX_SHARE when unset); ValueError naming the key if outside [0, 1]."""
    reward = config.get("reward", None) if hasattr(config, "get") else None
    fn = (reward.get("custom_reward_function", None) if reward is not None else None) or {}
    value = (fn.get("reward_kwargs", None) or {}).get("max_verifier_error_share", None)
    if value is None:
        return DEFAULT_MAX_SHARE
    try:
        share = float(value)
    except (TypeError, ValueError):
        share = float("nan")
    if not 0.0 <= share <= 1.0:
        raise ValueError(
            f"{MAX_SHARE_KEY}={value!r} must be a share in [0, 1] (0.05 = 5 %; 1 = never stop on verifier failures)"
        )
    return share


class VerifierFailureError(RuntimeError):
    """More of a step's rewards failed in the verifier than MAX_SHARE_KEY allows."""


def check_verifier_failures(infos: Sequence[Optional[Mapping]], max_share: float, step: Any = None) -> dict[str, float]:
    """The step's ERRORS_METRIC and TIMEOUTS_METRIC from its rows' reward_extra_info (one per real row; rows of a
    reward function that does not report failures count as clean); {} when no row reports. Raises
    VerifierFailureError when more than ``max_share`` of the rows failed: each was scored 0, a negative the update
    would learn from."""
    rows = [info if isinstance(info, Mapping) else {} for info in infos]
    if not any(VERIFIER_ERROR_KEY in r or VERIFIER_TIMEOUT_KEY in r for r in rows):
        return {}
    errors = [str(r[VERIFIER_ERROR_KEY]) for r in rows if r.get(VERIFIER_ERROR_KEY)]
    timeouts = [str(r[VERIFIER_TIMEOUT_KEY]) for r in rows if r.get(VERIFIER_TIMEOUT_KEY)]
    failed = sum(bool(r.get(VERIFIER_ERROR_KEY) or r.get(VERIFIER_TIMEOUT_KEY)) for r in rows)
    if failed / len(rows) > max_share:
        kinds = (("error", errors), ("timeout", timeouts))
        first = "; ".join(f"first {kind}: {texts[0]}" for kind, texts in kinds if texts)
        raise VerifierFailureError(
            f"step {step}: the verifier failed on {failed} of {len(rows)} rewards ({failed / len(rows):.1%}; "
            f"{len(errors)} errors, {len(timeouts)} timeouts), more than {MAX_SHARE_KEY}={max_share:g} allows. "
            f"Each was scored 0 and would be trained on as a wrong answer. {first}. Fix the verifier (the reward "
            f"workers' log has the first traceback), or allow a larger share with "
            f"++{MAX_SHARE_KEY}=<share in [0, 1]> (1 = never stop; `++`: verl's config has no such key of its own)"
        )
    return {ERRORS_METRIC: float(len(errors)), TIMEOUTS_METRIC: float(len(timeouts))}


def verifier_error_metrics(batch, config, step: Any = None) -> dict[str, float]:
    """check_verifier_failures on a training step's batch (a TransferQueue KVBatchMeta), for the POPO trainer.

    verl's agent loop keeps each row's reward_extra_info in the row's `extra_fields` (verl/trainer/ppo/v1/
    agent_loop_tq.py; read back as verl/trainer/ppo/v1/replay_buffer.py does). verl's padding rows are left out.
    """
    import transfer_queue as tq

    real = [k for k, tag in zip(batch.keys, batch.tags) if not tag.get("is_padding", False)]
    if not real:
        return {}
    data = tq.kv_batch_get(keys=real, partition_id=batch.partition_id, select_fields=["extra_fields"])
    infos = []
    for value in data["extra_fields"]:
        extra = getattr(value, "data", value)
        infos.append(extra.get("reward_extra_info") if isinstance(extra, Mapping) else None)
    return check_verifier_failures(infos, max_verifier_error_share(config), step)
