"""The mistakes a user can fix. Every command prints one of these as one line
(`PROG: error: ...`, exit status 2), before anything compiles or reaches the network; any other
exception is a bug and keeps its traceback."""


class UserError(Exception):
    """A mistake the user can fix; the message is one line naming the key, file, record or
    endpoint at fault."""


class ConfigError(UserError, ValueError):
    """A bad configuration key or value, command-line argument or path."""


class DataError(UserError, ValueError):
    """An input file, record, token store or checkpoint that is not what it must be."""


class EndpointError(UserError):
    """A server that refuses the request, or cannot be reached."""
