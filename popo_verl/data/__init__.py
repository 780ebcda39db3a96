"""Data preparation: DeepScaleR-Preview (train) and the math benchmarks (test) as verl RL parquet.

CLI: ``python -m popo_verl.data prepare --out DATA_DIR [--sources ...] [--local NAME=PATH ...] [--limit N]``.
"""

from popo_verl.data.prepare import (
    MANIFEST,
    PROMPT_SUFFIX,
    PROMPT_TEMPLATE,
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
    "DEFAULT_SOURCES",
    "MANIFEST",
    "PROMPT_SUFFIX",
    "PROMPT_TEMPLATE",
    "SOURCES",
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
