"""The datasets POPO trains and evaluates on, with their hub ids and column schemas.

Each source lists the hub copies we know (tried in order) and, per copy, the
columns holding the problem and the answer.  Column lookup is also tolerant of
the variants seen across mirrors (``problem``/``Problem``/``question``,
``answer``/``Answer``/``final_answer``), so a local file exported from any of
them loads too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class HubRef:
    """One hub copy of a source: ``datasets.load_dataset(repo, config, split=split)``.

    ``configs`` with more than one entry are loaded and concatenated in order
    (e.g. AIME 2025 parts I and II).
    """

    repo: str
    split: str
    configs: tuple[Optional[str], ...] = (None,)

    def __str__(self) -> str:
        cfg = ",".join(c for c in self.configs if c)
        return f"{self.repo}" + (f"[{cfg}]" if cfg else "") + f":{self.split}"


@dataclass(frozen=True)
class Source:
    name: str  # CLI name and parquet file stem
    data_source: str  # value of the parquet's data_source column (verl groups val metrics by it)
    split: str  # "train" or "test"
    hub: tuple[HubRef, ...]
    problem_keys: tuple[str, ...] = ("problem", "Problem", "question", "Question", "prompt")
    answer_keys: tuple[str, ...] = ("answer", "Answer", "final_answer", "expected_answer", "gt", "ground_truth")
    # Columns whose last \boxed{} holds the answer when no answer column exists (math-ai/aime24).
    solution_keys: tuple[str, ...] = ("solution", "Solution")
    # Column with text that must precede the problem (OlympiadBench "context").
    context_keys: tuple[str, ...] = ()
    # Columns kept (as strings) in extra_info when present.
    id_keys: tuple[str, ...] = ("unique_id", "id", "ID", "problem_idx", "idx")
    # The gold is what follows the last occurrence of this marker in the answer column (GSM8K: "... #### 72").
    answer_after: Optional[str] = None
    # Output parquet name; default "<name>.parquet". DeepScaleR keeps "train.parquet", what the run scripts read.
    file: Optional[str] = None
    notes: str = ""

    @property
    def output_file(self) -> str:
        return self.file or f"{self.name}.parquet"


SOURCES: dict[str, Source] = {
    s.name: s
    for s in (
        Source(
            name="deepscaler",
            data_source="deepscaler",
            split="train",
            hub=(HubRef("agentica-org/DeepScaleR-Preview-Dataset", "train"),),
            file="train.parquet",
            notes="40,315 problems (AIME 1983-2023, AMC, Omni-MATH, STILL); columns problem/answer/solution",
        ),
        Source(
            name="gsm8k_train",
            data_source="gsm8k",
            split="train",
            hub=(HubRef("openai/gsm8k", "train", ("main",)),),  # question/answer ("<solution> #### <number>")
            answer_after="####",
            notes="7,473 problems; the paper's Figure 1 traces (reward, completion length) train on it",
        ),
        Source(
            name="math_train",
            data_source="math",
            split="train",
            hub=(
                HubRef("hendrycks/competition_math", "train"),  # the reference's copy (since withdrawn from the hub)
                HubRef("DigitalLearningGmbH/MATH-lighteval", "train"),  # problem/level/type/solution
                HubRef(
                    "EleutherAI/hendrycks_math",
                    "train",
                    ("algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
                     "prealgebra", "precalculus"),
                ),  # fmt: skip
            ),
            notes="7,500 problems (MATH train split); the answer is the solution's last \\boxed{}",
        ),
        Source(
            name="math500",
            data_source="math500",
            split="test",
            hub=(HubRef("HuggingFaceH4/MATH-500", "test"),),
            notes="500 problems; columns problem/solution/answer/subject/level/unique_id",
        ),
        Source(
            name="aime24",
            data_source="aime24",
            split="test",
            hub=(
                HubRef("HuggingFaceH4/aime_2024", "train"),  # id/problem/solution/answer/url/year
                HubRef("Maxwell-Jia/AIME_2024", "train"),  # ID/Problem/Solution/Answer(int)
                HubRef("math-ai/aime24", "test"),  # id/problem/solution (answer boxed in solution)
            ),
            notes="30 problems",
        ),
        Source(
            name="aime25",
            data_source="aime25",
            split="test",
            hub=(
                HubRef("yentinglin/aime_2025", "train"),  # id/problem/answer/solution/url/year
                HubRef("opencompass/AIME2025", "test", ("AIME2025-I", "AIME2025-II")),  # question/answer
                HubRef("math-ai/aime25", "test"),  # id/problem/answer
                HubRef("MathArena/aime_2025", "train"),  # problem_idx/problem/answer(int)
            ),
            notes="30 problems",
        ),
        Source(
            name="amc23",
            data_source="amc23",
            split="test",
            hub=(HubRef("math-ai/amc23", "test"),),  # id/question/answer(float)/url
            notes="40 problems; answers stored as floats (3.0 -> '3')",
        ),
        Source(
            name="olympiadbench",
            data_source="olympiadbench",
            split="test",
            hub=(
                HubRef("math-ai/olympiadbench", "test"),
                HubRef("Hothan/OlympiadBench", "train", ("OE_TO_maths_en_COMP",)),
            ),
            # final_answer is a list (sometimes a stringified list) of LaTeX answers
            answer_keys=("final_answer", "answer", "Answer"),
            context_keys=("context",),
            notes="675 problems (OE_TO_maths_en_COMP); final_answer list, joined with ', '",
        ),
        Source(
            name="gsm8k_test",
            data_source="gsm8k",
            split="test",
            hub=(HubRef("openai/gsm8k", "test", ("main",)),),
            answer_after="####",
            notes="1,319 problems; the held-out set of a GSM8K run",
        ),
    )
}

DEFAULT_SOURCES: tuple[str, ...] = tuple(SOURCES)
TRAIN_SOURCES: tuple[str, ...] = tuple(n for n, s in SOURCES.items() if s.split == "train")
TEST_SOURCES: tuple[str, ...] = tuple(n for n, s in SOURCES.items() if s.split == "test")
