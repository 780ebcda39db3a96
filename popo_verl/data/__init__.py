"""Data preparation: DeepScaleR-Preview, GSM8K, MATH (train) and the math benchmarks (test) as verl RL parquet.

CLI: ``python -m popo_verl.data prepare --out DATA_DIR [--sources ...] [--local NAME=PATH ...] [--limit N] [--prompt-style S]``.
"""

from popo_verl.data.prepare import (
    DEFAULT_PROMPT_STYLE,
    MANIFEST,
    PROMPT_STYLES,
    PROMPT_SUFFIX,
    PROMPT_TEMPLATE,
    SYSTEM_PROMPT,
    TEST_FILE,
    TRAIN_FILE,
    convert_records,
    load_local,
    load_source,
    make_prompt,
    normalize_gold,
    prepare,
)
from popo_verl.data.sources import DEFAULT_SOURCES, SOURCES, TEST_SOURCES, TRAIN_SOURCES, HubRef, Source

__all__ = [
    "DEFAULT_PROMPT_STYLE",
    "DEFAULT_SOURCES",
    "MANIFEST",
    "PROMPT_STYLES",
    "PROMPT_SUFFIX",
    "PROMPT_TEMPLATE",
    "SOURCES",
    "SYSTEM_PROMPT",
    "TEST_FILE",
    "TEST_SOURCES",
    "TRAIN_FILE",
    "TRAIN_SOURCES",
    "HubRef",
    "Source",
    "convert_records",
    "load_local",
    "load_source",
    "make_prompt",
    "normalize_gold",
    "prepare",
]
