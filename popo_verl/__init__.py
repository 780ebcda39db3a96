"""popo-verl: POPO (Positive-Only Policy Optimization) for verl.

`popo_verl.core` holds the math (pure torch). Everything else plugs into verl 0.9.1. Importing the
package imports nothing else, so the command-line helpers (`python -m popo_verl.tiny`,
`popo_verl.tiny.summary`) start without verl's import cost; popo_verl/plugin.py handles a glue module
being the first thing in a process to import verl.
"""

__version__ = "0.1.0"
