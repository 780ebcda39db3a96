"""popo-verl: POPO (Positive-Only Policy Optimization) for verl.

`popo_verl.core` holds the math (pure torch). Everything else plugs into verl 0.9.1.
"""

__version__ = "0.1.0"

# Import verl before any of our glue modules: verl's __init__ loads our plugin, which imports those
# modules; importing verl first means the plugin never meets one of them half-initialised.
try:  # pragma: no branch
    import verl  # noqa: F401
except ImportError:  # the core math stays usable without verl
    pass
