"""The import path of the built-in streams since before they became a package: `stream_cl.tools.streams`."""

from stream_cl.tools.streams import *  # noqa: F403
from stream_cl.tools.streams import __all__  # noqa: F401
