"""The README's two set-up commands stay true: CI runs the test one verbatim, the main one exists."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Set-up") :]
    section = section[: section.index("\n## ", 4)]
    blocks = _bash_blocks(section)
    assert len(blocks) == 2, "exactly two set-up commands"
    main, tests = blocks
    assert "scripts/run_tiny_cpu.sh" in main and "pip install torch==2.13.0" in main
    assert tests in (ROOT / ".ci" / "run").read_text().splitlines()


def test_run_script_conventions():
    text = (ROOT / "scripts" / "run_tiny_cpu.sh").read_text()
    assert "set -euo pipefail" in text
    assert '"$@"' in text
    for var in ("NNODES=${NNODES:-", "N_GPUS_PER_NODE=${N_GPUS_PER_NODE:-", "ALGO=${ALGO:-popo}"):
        assert var in text
