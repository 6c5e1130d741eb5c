"""The one exception type for mistakes a user can fix.

`UserError` is raised for bad input — a config value, a command-line argument,
a file or folder — whose message names the key, argument or path and says what
to change. It subclasses `ValueError`, so code that catches `ValueError` (and
tests that expect it) keeps working. The launchers (`launch.config_cli.user_errors`)
print it as one line, `error: <message>`, and exit with status 1; any other
exception escaping a launcher keeps its traceback, since it is a bug.

    from lossland import UserError
    raise UserError(f'train.seq_len={n} exceeds the {limit} learned positions of this '
                    f'model; set --config.train.seq_len to at most {limit}')
"""
from __future__ import annotations


class UserError(ValueError):
  """Bad input the user can change; the message names it and says what to do instead."""
