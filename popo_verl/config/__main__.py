"""`python -m popo_verl.config diff [hydra overrides]`: what `algorithm=popo` changes in verl's composed config.
`python -m popo_verl.config check [hydra overrides]`: the overrides checked in a second (popo_verl/config/check.py).

Both configs come from verl's own command line (`python -m verl.trainer.main_ppo ... --cfg job`), with the
same overrides, so the listing is exactly what a run would get: every key whose value differs, and the keys
only POPO has (`algorithm.popo.*`).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor


def flat(cfg, prefix: str = "") -> dict:
    out = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat(value, name + "."))
        else:
            out[name] = value
    return out


def compose(overrides: list[str]) -> dict:
    from omegaconf import OmegaConf

    r = subprocess.run([sys.executable, "-m", "verl.trainer.main_ppo", *overrides, "--cfg", "job"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"verl could not compose {' '.join(overrides) or 'its default config'}:\n{r.stderr[-3000:]}")
    return flat(OmegaConf.to_container(OmegaConf.create(r.stdout), resolve=False))


def diff(overrides: list[str]) -> list[tuple[str, object, object]]:
    """(key, stock value, POPO value) for every key that `algorithm=popo` adds or changes; `None` = absent."""
    with ThreadPoolExecutor(2) as pool:
        stock, popo = pool.map(compose, [list(overrides), ["algorithm=popo", *overrides]])
    missing = object()
    rows = []
    for key in sorted(set(stock) | set(popo)):
        a, b = stock.get(key, missing), popo.get(key, missing)
        if a != b:
            rows.append((key, None if a is missing else a, None if b is missing else b))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m popo_verl.config", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("diff", help="list the config keys algorithm=popo adds or changes")
    d.add_argument("overrides", nargs="*", help="hydra overrides applied to both configs")
    c = sub.add_parser("check", help="compose verl's trainer config with these overrides (before verl is imported): "
                                     "one line and exit status 2 for an unknown key or a bad POPO value")
    c.add_argument("args", nargs=argparse.REMAINDER,
                   help="what verl.trainer.main_ppo is given: hydra overrides, and hydra's own flags (--cfg job, "
                        "--config-name NAME, ...), which are read for the config's name or passed over")
    args = ap.parse_args(argv)
    if args.cmd == "check":
        from popo_verl.config.check import checked, launches, split_hydra_args
        from popo_verl.resume import nothing_left_to_train

        overrides, config_name = split_hydra_args(args.args)
        if config_name is None:  # a config of the user's own (--config-path/--config-dir): hydra will say
            return 0
        job = launches(args.args)
        cfg, found = checked(overrides, config_name, values=job)
        if found:  # said as the driver check says it, at once
            print(f"popo-verl: {found}", file=sys.stderr)
            return 2
        done = nothing_left_to_train(cfg) if job else None
        if done:
            print(done)
            return 3
        return 0
    rows = diff(args.overrides)
    width = max(len(k) for k, _, _ in rows)
    print(f"{'key':<{width}}  {'verl':<14}  algorithm=popo")
    for key, a, b in rows:
        print(f"{key:<{width}}  {'(absent)' if a is None else str(a):<14}  {b}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
