"""The Faust app of this process, wired from the environment: `faust -A topology.app worker` runs it.

`cdp worker` does the same with its own options; tests build apps from explicit Settings with
`topology.graph.build` instead of importing this module.
"""

from topology.config import Settings
from topology.graph import build

app = build(Settings.from_env()).app
