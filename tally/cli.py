"""The `tally` command: one entry point for every audience, each in a module of its own.

    tally/serve.py    run the product: engine, sink, notify, ingress, migrate
    tally/operate.py  operate a deployment: config, sign, replay, audit, import
    tally/develop.py  develop Tally: demo, roundtrip-check, chaos, bench ...
    tally/common.py   the settings, read once, and errors turned into exit statuses

The commands only parse their options and call the packages that do the work.
"""

from __future__ import annotations

import click

from tally import develop, operate, serve
from tally.common import CONTEXT, Group


@click.group(cls=Group, context_settings=CONTEXT)
def main() -> None:
    """Tally, a balance engine on Kafka.

    Settings come from TALLY_* environment variables; `tally config` shows them.
    """


for command in (*serve.COMMANDS, *operate.COMMANDS, *develop.COMMANDS):
    main.add_command(command)


if __name__ == "__main__":
    main()
