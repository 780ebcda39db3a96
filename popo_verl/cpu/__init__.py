"""verl on the CPU: platform, gloo process groups, engine lookup and the `hf` rollout.

Active only when asked for (POPO_VERL_CPU=1, or VERL_PLATFORM=cpu); otherwise `register()` still makes
`rollout.name=hf` available but leaves verl's platform, engines and process groups stock.
"""

# verl first: when this package is the first thing in a process to import verl (a Ray worker unpickling the hf
# rollout), verl's plugin loader then finds the CPU backend's modules not yet started rather than half-initialised,
# and imports and registers them before anything asks verl for its platform (popo_verl/plugin.py).
import verl  # noqa: F401, E402

from popo_verl.cpu.backend import FORCE_ENV, HF_ROLLOUT, POLL_INTERVAL_ENV, PlatformCPU, cpu_platform_wanted, register  # noqa: F401, E402
