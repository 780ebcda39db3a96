"""Build verl RL parquet files from the POPO train set and benchmarks.

Row format (what ``verl.utils.dataset.rl_dataset.RLHFDataset`` and the reward
manager read)::

    data_source   str                    e.g. "math500" (verl groups val metrics by it)
    prompt        [{"role": "system", "content": "Please reason step by step, ..."}, {"role": "user", "content": "<problem>"}]
                  (the default prompt style; see PROMPT_STYLES)
    ability       "math"
    reward_model  {"style": "rule", "ground_truth": "<normalised answer>"}
    extra_info    {"split", "index", "id", "problem", "answer", "origin"}

Output directory::

    train.parquet                 DeepScaleR-Preview (the train set of the paper's runs)
    gsm8k_train.parquet math_train.parquet   GSM8K and MATH train sets (the paper's Figure 1 uses GSM8K)
    math500.parquet aime24.parquet aime25.parquet amc23.parquet olympiadbench.parquet gsm8k_test.parquet
    test.parquet                  all benchmarks of this run, concatenated
    manifest.json                 train_files / val_files / rows per source
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from popo_verl.data.sources import SOURCES, HubRef, Source
from popo_verl.reward import extract_answer, normalize_answer
from popo_verl.templates import QWEN_MATH_SYSTEM

PROMPT_SUFFIX = "Let's think step by step and output the final answer within \\boxed{}."
PROMPT_TEMPLATE = "{problem} " + PROMPT_SUFFIX
SYSTEM_PROMPT = QWEN_MATH_SYSTEM

# style -> (system message or None, user-turn template)
PROMPT_STYLES: dict[str, tuple[Optional[str], str]] = {
    # the reference's system prompt and the bare problem
    "system": (SYSTEM_PROMPT, "{problem}"),
    # the instruction after the problem in the user turn, no system message (this project's first style)
    "suffix": (None, PROMPT_TEMPLATE),
    # the bare problem: the run's chat template supplies its family's instruction (popo_verl.templates)
    "bare": (None, "{problem}"),
}
DEFAULT_PROMPT_STYLE = "system"

TRAIN_FILE = "train.parquet"
TEST_FILE = "test.parquet"
MANIFEST = "manifest.json"

LOCAL_EXTS = (".parquet", ".jsonl", ".json", ".csv")


# --------------------------------------------------------------------------- helpers
def make_prompt(problem: str, template: str = "{problem}", system: Optional[str] = None) -> list[dict[str, str]]:
    """The chat messages of one problem: an optional system message, then one user turn."""
    user = [{"role": "user", "content": template.replace("{problem}", problem.strip())}]
    return ([{"role": "system", "content": system}] if system else []) + user


def _is_missing(v: Any) -> bool:
    if v is None:
        return True
    if isinstance(v, float) and math.isnan(v):
        return True
    if isinstance(v, str) and not v.strip():
        return True
    return False


def _as_list(v: Any) -> Optional[list]:
    """A list for list-like answers (lists, numpy arrays, stringified lists of strings)."""
    if isinstance(v, (list, tuple)):
        return list(v)
    if hasattr(v, "tolist") and not isinstance(v, (str, bytes)) and getattr(v, "ndim", 0) >= 1:
        return list(v.tolist())
    if isinstance(v, str):
        s = v.strip()
        if s.startswith("[") and s.endswith("]") and ("'" in s or '"' in s):
            try:
                parsed = ast.literal_eval(s)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                return None
            # Only a list of strings is a stringified answer list; "[1, 2]" is an interval.
            if isinstance(parsed, list) and parsed and all(isinstance(x, str) for x in parsed):
                return parsed
    return None


def normalize_gold(value: Any) -> str:
    """Canonical ground-truth string.

    Strips ``$``/``\\boxed{}``/whitespace/trailing periods, turns integral floats and
    ``"3.0"`` into ``"3"``, drops leading zeros of integers (``"033"`` -> ``"33"``),
    joins answer lists (OlympiadBench ``final_answer``) with ``", "``.
    """
    if _is_missing(value):
        return ""
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy scalar
        value = value.item()
    items = _as_list(value)
    if items is not None:
        parts: list[str] = []
        for it in items:
            p = normalize_gold(it)
            if p and p not in parts:
                parts.append(p)
        return ", ".join(parts)
    s = normalize_answer(value)
    if re.fullmatch(r"[+-]?0\d+", s):
        sign = "-" if s.startswith("-") else ""
        s = sign + (s.lstrip("+-").lstrip("0") or "0")
    return s


def _first(row: Mapping[str, Any], keys: Iterable[str]) -> tuple[Optional[str], Any]:
    for k in keys:
        if k in row and not _is_missing(row[k]):
            v = row[k]
            if isinstance(v, (list, tuple)) or (hasattr(v, "ndim") and getattr(v, "ndim", 0) >= 1):
                if len(v) == 0:
                    continue
            return k, v
    return None, None


@dataclass
class Converted:
    rows: list[dict[str, Any]] = field(default_factory=list)
    dropped: int = 0
    answer_column: Optional[str] = None
    problem_column: Optional[str] = None


def convert_records(
    source: Source,
    records: Sequence[Mapping[str, Any]],
    origin: str,
    limit: Optional[int] = None,
    template: str = "{problem}",
    system: Optional[str] = SYSTEM_PROMPT,
) -> Converted:
    """Turn raw records of ``source`` into verl RL rows (rows without problem or answer are dropped)."""
    out = Converted()
    for raw in records:
        if limit is not None and len(out.rows) >= limit:
            break
        pk, problem = _first(raw, source.problem_keys)
        ak, answer = _first(raw, source.answer_keys)
        if source.answer_after and ak:
            # a row without the marker has no final answer: dropped, rather than its whole solution as the gold
            text = str(answer)
            answer = text.rsplit(source.answer_after, 1)[1] if source.answer_after in text else None
        gold = normalize_gold(answer) if ak else ""
        if not gold:
            # math-ai/aime24 keeps the answer only inside the solution's last \boxed{}
            sk, solution = _first(raw, source.solution_keys)
            if sk:
                gold = normalize_gold(extract_answer(str(solution)) or "")
                ak = f"{sk}[boxed]" if gold else ak
        if pk is None or not isinstance(problem, str) or not gold:
            out.dropped += 1
            continue
        out.problem_column = out.problem_column or pk
        out.answer_column = out.answer_column or ak
        problem = problem.strip()
        _, context = _first(raw, source.context_keys)
        if isinstance(context, str) and context.strip():
            problem = context.strip() + "\n\n" + problem
        _, rid = _first(raw, source.id_keys)
        index = len(out.rows)
        out.rows.append(
            {
                "data_source": source.data_source,
                "prompt": make_prompt(problem, template, system),
                "ability": "math",
                "reward_model": {"style": "rule", "ground_truth": gold},
                "extra_info": {
                    "split": source.split,
                    "index": index,
                    "id": "" if rid is None else str(rid),
                    "problem": problem,
                    "answer": gold,
                    "origin": origin,
                },
            }
        )
    return out


# --------------------------------------------------------------------------- loading
def _records_from_json(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return [json.loads(line) for line in text.splitlines() if line.strip()]  # JSON lines named .json
    if isinstance(obj, list):
        return obj
    if isinstance(obj, dict):
        for key in ("data", "rows", "train", "test", "examples", "instances"):
            if isinstance(obj.get(key), list):
                return obj[key]
        if obj and all(isinstance(v, list) for v in obj.values()):  # column-oriented
            n = len(next(iter(obj.values())))
            if all(len(v) == n for v in obj.values()):
                return [{k: obj[k][i] for k in obj} for i in range(n)]
        return [obj]
    raise ValueError(f"{path}: unsupported JSON layout ({type(obj).__name__})")


def load_local(path: str | os.PathLike) -> list[dict]:
    """Records of a local parquet / json / jsonl / csv file, or of every such file in a directory."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in LOCAL_EXTS)
        if not files:
            raise FileNotFoundError(f"{p}: no {'/'.join(LOCAL_EXTS)} files")
        out: list[dict] = []
        for f in files:
            out.extend(load_local(f))
        return out
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file")
    ext = p.suffix.lower()
    if ext == ".parquet":
        import pandas as pd

        return pd.read_parquet(p).to_dict(orient="records")
    if ext == ".jsonl":
        with p.open(encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]
    if ext == ".json":
        return _records_from_json(p)
    if ext == ".csv":
        import pandas as pd

        return pd.read_csv(p).to_dict(orient="records")
    raise ValueError(f"{p}: unsupported extension {ext!r} (use {', '.join(LOCAL_EXTS)})")


def load_hub(ref: HubRef, load_dataset: Optional[Callable[..., Any]] = None) -> list[dict]:
    """Records of one hub copy (configs concatenated)."""
    if load_dataset is None:
        from datasets import load_dataset
    records: list[dict] = []
    for cfg in ref.configs:
        ds = load_dataset(ref.repo, cfg, split=ref.split) if cfg else load_dataset(ref.repo, split=ref.split)
        records.extend(ds.to_list() if hasattr(ds, "to_list") else list(ds))
    return records


def load_source(
    source: Source,
    local: Optional[str] = None,
    load_dataset: Optional[Callable[..., Any]] = None,
) -> tuple[list[dict], str]:
    """(records, origin) of a source: the local path if given, else its hub copies in order."""
    if local:
        return load_local(local), str(local)
    errors = []
    for ref in source.hub:
        try:
            recs = load_hub(ref, load_dataset)
        except Exception as e:  # noqa: BLE001 - try the next mirror, report all at the end
            errors.append(f"  {ref}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        if recs:
            return recs, str(ref)
        errors.append(f"  {ref}: empty")
    raise RuntimeError(
        f"could not load source {source.name!r} from the hub; tried:\n"
        + "\n".join(errors)
        + f"\npass a local copy with --local {source.name}=PATH (parquet/json/jsonl/csv)"
    )


# --------------------------------------------------------------------------- writing
@dataclass
class SourceResult:
    name: str
    split: str
    rows: int
    dropped: int
    origin: str
    file: str
    problem_column: Optional[str]
    answer_column: Optional[str]


def write_parquet(rows: list[dict], path: Path) -> None:
    import pandas as pd

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    pd.DataFrame(rows).to_parquet(tmp, index=False)
    os.replace(tmp, path)


def prepare(
    out_dir: str | os.PathLike,
    sources: Sequence[str] = tuple(SOURCES),
    local: Optional[Mapping[str, str]] = None,
    limit: Optional[int] = None,
    template: Optional[str] = None,
    load_dataset: Optional[Callable[..., Any]] = None,
    verbose: bool = True,
    prompt_style: str = DEFAULT_PROMPT_STYLE,
) -> dict[str, Any]:
    """Write the parquet files of ``sources`` into ``out_dir``; returns the manifest.

    ``prompt_style`` (PROMPT_STYLES) sets the system message and the user-turn template; ``template`` replaces
    the latter.
    """
    out = Path(out_dir)
    local = dict(local or {})
    unknown = [s for s in list(sources) + list(local) if s not in SOURCES]
    if unknown:
        raise ValueError(f"unknown source(s) {unknown}; known: {', '.join(SOURCES)}")
    not_selected = [s for s in local if s not in sources]
    if not_selected:
        raise ValueError(f"local file(s) given for source(s) not selected: {not_selected}")
    if prompt_style not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {prompt_style!r}; known: {', '.join(PROMPT_STYLES)}")
    system, style_template = PROMPT_STYLES[prompt_style]
    template = template or style_template
    if "{problem}" not in template:
        raise ValueError("template must contain '{problem}'")
    names = list(dict.fromkeys(sources))
    results: list[SourceResult] = []
    test_rows: list[dict] = []
    for name in names:
        src = SOURCES[name]
        records, origin = load_source(src, local.get(name), load_dataset)
        conv = convert_records(src, records, origin, limit=limit, template=template, system=system)
        if not conv.rows:
            raise RuntimeError(
                f"source {name!r} ({origin}) gave no usable rows out of {len(records)}: "
                f"no column among {src.problem_keys} / {src.answer_keys}?"
            )
        fname = src.output_file
        write_parquet(conv.rows, out / fname)
        if src.split == "test":
            test_rows.extend(conv.rows)
        results.append(
            SourceResult(name, src.split, len(conv.rows), conv.dropped, origin, fname, conv.problem_column, conv.answer_column)
        )
    if test_rows:
        write_parquet(test_rows, out / TEST_FILE)
    manifest = {
        "train_files": [str((out / r.file).resolve()) for r in results if r.split == "train"],
        "val_files": [str((out / r.file).resolve()) for r in results if r.split == "test"],
        "test_file": str((out / TEST_FILE).resolve()) if test_rows else None,
        "prompt_style": prompt_style,
        "system_prompt": system,
        "prompt_template": template,
        "sources": {
            r.name: {
                "split": r.split,
                "rows": r.rows,
                "dropped": r.dropped,
                "origin": r.origin,
                "file": r.file,
                "problem_column": r.problem_column,
                "answer_column": r.answer_column,
            }
            for r in results
        },
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    if verbose:
        print(summary_table(results))
        print(hydra_overrides(manifest))
    return manifest


def summary_table(results: Sequence[SourceResult]) -> str:
    head = ("source", "split", "rows", "dropped", "file", "origin")
    body = [(r.name, r.split, str(r.rows), str(r.dropped), r.file, r.origin) for r in results]
    total = ("total", "", str(sum(r.rows for r in results)), str(sum(r.dropped for r in results)), "", "")
    table = [head, *body, total]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    fmt = lambda row: "  ".join(c.ljust(w) if i in (0, 1, 4, 5) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))  # noqa: E731
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(head), sep, *map(fmt, body), sep, fmt(total)])


def hydra_overrides(manifest: Mapping[str, Any]) -> str:
    """The verl overrides (shell-quoted) that point a run at these files."""
    import shlex

    parts = []
    if manifest.get("train_files"):
        parts.append("data.train_files=" + _hydra_list(manifest["train_files"]))
    if manifest.get("val_files"):
        parts.append("data.val_files=" + _hydra_list(manifest["val_files"]))
    return " ".join(shlex.quote(p) for p in parts)


def _hydra_list(files: Sequence[str]) -> str:
    return files[0] if len(files) == 1 else "[" + ",".join(files) + "]"
