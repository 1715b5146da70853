"""The types that tie the command line's parsers to its handlers: the subparsers each verb
group registers its command on, and the coroutine function a parsed command runs.

They are not in output.py, which is about what commands print: app.py and every verb
module's ``add_parser`` use these whether or not they print anything.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Coroutine
from typing import Any, TypeAlias

from consumer.settings import Settings

# A string: argparse._SubParsersAction is generic only in typeshed, and subscripting it
# at run time raises TypeError.
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

# A coroutine function rather than any awaitable: app.py hands its result to asyncio.run.
Handler: TypeAlias = Callable[[argparse.Namespace, Settings], Coroutine[Any, Any, int]]
