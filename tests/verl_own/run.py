"""verl's own CPU tests, run with popo-verl installed, must end as they end without it.

    python tests/verl_own/run.py            # CI: run them with the plugin, compare with expected_outcomes.json
    python tests/verl_own/run.py --record   # in an environment WITHOUT popo-verl: write expected_outcomes.json

The tests come from verl's official source distribution (the wheel ships none): `pip download` fetches the sdist of
the installed verl, its sha256 is checked against PINNED_SDISTS, and its `tests/` folder is unpacked next to a link to
the installed verl package (some of the tests read verl's source files from there). TESTS names the files: verl's
`*_on_cpu.py` tests and its platform test: all of the sdist's, since none needs a download, CUDA or vLLM. A test whose outcome differs from the recorded one fails the
check unless allowed_differences.json names it with a reason.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from importlib.metadata import version
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXPECTED = HERE / "expected_outcomes.json"
ALLOWED = HERE / "allowed_differences.json"
CACHE = Path(os.environ.get("POPO_VERL_CACHE", Path.home() / ".cache" / "popo_verl")) / "verl_own_tests"

#: sha256 of verl's sdist on PyPI, per version whose outcomes are recorded
PINNED_SDISTS = {"0.9.1": "3e03d8816b2546b2c5580705671b8d0bb3f79b8364e7b5c56dbfc1245536ba22"}

TESTS = (
    "tests/checkpoint_engine/test_fsdp_lora_only_checkpoint_on_cpu.py",
    "tests/checkpoint_engine/test_global_steps_on_cpu.py",
    "tests/checkpoint_engine/test_sglang_fusion_bucketing_on_cpu.py",
    "tests/experimental/agent_loop/test_call_tool_on_cpu.py",
    "tests/experimental/agent_loop/test_multimodal_position_ids_on_cpu.py",
    "tests/experimental/agent_loop/test_qwen3_tool_parser_on_cpu.py",
    "tests/experimental/agent_loop/test_tool_call_id_on_cpu.py",
    "tests/experimental/fully_async_policy/test_async_genrm_config_on_cpu.py",
    "tests/plugin/test_platform_abstraction.py",
    "tests/single_controller/test_auto_padding_on_cpu.py",
    "tests/single_controller/test_decorator_on_cpu.py",
    "tests/single_controller/test_fused_workers_on_cpu.py",
    "tests/single_controller/test_ray_local_envs_on_cpu.py",
    "tests/single_controller/test_ray_utils_on_cpu.py",
    "tests/test_base_config_on_cpu.py",
    "tests/test_protocol_on_cpu.py",
    "tests/test_protocol_v2_on_cpu.py",
    "tests/tools/test_function_tool_on_cpu.py",
    "tests/tools/test_mixed_tools_on_cpu.py",
    "tests/trainer/ppo/test_core_algos_on_cpu.py",
    "tests/trainer/ppo/test_dynamic_policy_losses_on_cpu.py",
    "tests/trainer/ppo/test_loss_aggregation_on_cpu.py",
    "tests/trainer/ppo/test_metric_utils_on_cpu.py",
    "tests/trainer/ppo/test_reinforce_pp_multiturn_on_cpu.py",
    "tests/trainer/ppo/test_rollout_moe_lb_metrics_on_cpu.py",
    "tests/trainer/ppo/test_spec_decode_metrics_on_cpu.py",
    "tests/trainer/ppo/test_value_loss_normalization_on_cpu.py",
    "tests/trainer/test_constants_ppo_on_cpu.py",
    "tests/trainer/test_multi_trajectories_advantage_on_cpu.py",
)

# popo_verl.plugin's ENV_SWITCHES and WITHOUT_POPO_VERL, spelled out: --record runs with popo-verl uninstalled
OUR_SWITCHES = ("POPO_VERL_CPU", "VERL_PLATFORM", "VERL_ENGINE_DEVICE", "POPO_STOP_FILE", "POPO_RAY_HEAD_TIMEOUT_S",
                "TQ_NUM_THREADS", "VERL_USE_EXTERNAL_PLUGINS", "POPO_VERL_HYDRA")

#: how "without popo-verl" is approximated where it cannot be uninstalled (verl's and hydra's own switches)
WITHOUT_PLUGIN_ENV = {"VERL_USE_EXTERNAL_PLUGINS": "none", "POPO_VERL_HYDRA": "0"}


def sdist(verl_version: str) -> Path:
    want = PINNED_SDISTS.get(verl_version)
    if want is None:
        sys.exit(f"verl_own: verl {verl_version} is installed, but outcomes are recorded for {sorted(PINNED_SDISTS)}: "
                 "pin its sdist's sha256 in PINNED_SDISTS and record them again (--record, without popo-verl)")
    path = CACHE / f"verl-{verl_version}.tar.gz"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        got = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
                              "--no-binary", ":all:", "-d", str(CACHE), f"verl=={verl_version}"],
                             capture_output=True, text=True)
        if got.returncode != 0 or not path.exists():
            sys.exit(f"verl_own: could not download verl {verl_version}'s sdist:\n{got.stdout}{got.stderr}")
    got = hashlib.sha256(path.read_bytes()).hexdigest()
    if got != want:
        path.unlink()
        sys.exit(f"verl_own: {path.name} has sha256 {got}, expected {want}")
    return path


def unpack(archive: Path, into: Path) -> None:
    """The sdist's tests/ into `into`, beside a link named verl to the installed package."""
    import verl

    shutil.rmtree(into, ignore_errors=True)
    into.mkdir(parents=True)
    with tarfile.open(archive) as tar:
        top = tar.getnames()[0].split("/")[0]
        members = [m for m in tar.getmembers() if m.name.startswith(f"{top}/tests/")]
        for m in members:
            m.name = m.name[len(top) + 1:]
        tar.extractall(into, members=members, filter="data")
    (into / "verl").symlink_to(Path(verl.__file__).resolve().parent, target_is_directory=True)


def run_tests(workdir: Path, env_extra: dict[str, str]) -> dict[str, str]:
    report = workdir / "report.xml"
    # a verl user's environment: none of the switches that turn on our CPU backend or the Ctrl-C stop
    env = {k: v for k, v in os.environ.items() if k not in OUR_SWITCHES}
    env.update(env_extra)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "--timeout", "300",
           "-n", "2", "--dist", "loadfile", f"--junitxml={report}", *TESTS]
    print("verl_own:", " ".join(f"{k}={v}" for k, v in env_extra.items()), "pytest", f"({len(TESTS)} files) ...",
          flush=True)
    log = workdir / "pytest.log"
    with open(log, "w") as out:  # verl's tests print much: the outcomes come from the report, the log is kept
        subprocess.run(cmd, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT)
    if not report.exists():
        sys.exit(f"verl_own: pytest wrote no report; its output: {log}\n" + log.read_text()[-3000:])
    return outcomes(report)


def outcomes(report: Path) -> dict[str, str]:
    result = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        kinds = {child.tag for child in case}
        result[name] = ("failed" if kinds & {"failure", "error"} else "skipped" if "skipped" in kinds else "passed")
    return dict(sorted(result.items()))


def compare(expected: dict[str, str], got: dict[str, str], allowed: dict[str, str]) -> list[str]:
    """One line per test whose outcome changed, and is not allowed to."""
    lines = []
    for name in sorted(set(expected) | set(got)):
        before, after = expected.get(name, "absent"), got.get(name, "absent")
        if before != after and name not in allowed:
            lines.append(f"  {name}: {before} without popo-verl, {after} with it")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--record", action="store_true", help="write expected_outcomes.json (run WITHOUT popo-verl)")
    parser.add_argument("--without-plugin", action="store_true",
                        help=f"run with verl's and hydra's switches off ({WITHOUT_PLUGIN_ENV}) instead of uninstalled")
    parser.add_argument("--workdir", type=Path, default=CACHE / "work")
    args = parser.parse_args(argv)
    verl_version = version("verl")
    unpack(sdist(verl_version), args.workdir)
    got = run_tests(args.workdir, WITHOUT_PLUGIN_ENV if args.without_plugin else {})
    counts = {k: list(got.values()).count(k) for k in ("passed", "failed", "skipped")}
    print(f"verl_own: {len(got)} tests: {counts}")
    if args.record:
        try:
            version("popo-verl")
            installed = True
        except Exception:
            installed = False
        if installed and not args.without_plugin:
            sys.exit("verl_own: --record must run without popo-verl: uninstall it, or add --without-plugin")
        how = "popo-verl not installed" if not installed else f"popo-verl switched off: {WITHOUT_PLUGIN_ENV}"
        EXPECTED.write_text(json.dumps({"verl": verl_version, "recorded": how, "outcomes": got}, indent=1) + "\n")
        print(f"verl_own: wrote {EXPECTED}")
        return 0
    expected = json.loads(EXPECTED.read_text())
    if expected["verl"] != verl_version:
        sys.exit(f"verl_own: outcomes recorded for verl {expected['verl']}, verl {verl_version} installed")
    allowed = json.loads(ALLOWED.read_text()) if ALLOWED.exists() else {}
    changed = compare(expected["outcomes"], got, allowed)
    if changed:
        print(f"verl_own: {len(changed)} of verl's own tests end differently with popo-verl installed "
              f"(pytest's output: {args.workdir / 'pytest.log'}):", *changed, sep="\n")
        print((args.workdir / "pytest.log").read_text()[-6000:])
        return 1
    print(f"verl_own: all {len(got)} outcomes as without popo-verl ({expected['recorded']})"
          + (f"; {len(allowed)} allowed differences" if allowed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
