"""relayd's settings: one frozen dataclass per TOML table, loaded once, checked once.

A floor below everything: this package imports nothing else of relayd.

* :mod:`~relayd.config.settings`: the sections and :class:`Settings`;
* :mod:`~relayd.config.fields`: how a field declares its TOML key and env name;
* :mod:`~relayd.config.casts`: values cast by type, :class:`ConfigError`;
* :mod:`~relayd.config.load`: the one generic loader;
* :mod:`~relayd.config.secrets`: keys and secrets that come from several places;
* :mod:`~relayd.config.certs`: relayd's own TLS pair, read and checked;
* :mod:`~relayd.config.keys`: relay key formats and the one key hash;
* :mod:`~relayd.config.checks`: what cannot work or would be unsafe;
* :mod:`~relayd.config.report`: what ``check-config`` prints;
* :mod:`~relayd.config.spend_limits`: the per-key limits of ``[spend]``.
"""

from __future__ import annotations

# Re-exported by name (``X as X``): the package's public surface.
from relayd.config.casts import ConfigError as ConfigError
from relayd.config.casts import Listen as Listen
from relayd.config.casts import parse_listen as parse_listen
from relayd.config.casts import parse_workers as parse_workers
from relayd.config.checks import keyless_warning as keyless_warning
from relayd.config.checks import validate as validate
from relayd.config.fields import declared as declared
from relayd.config.keys import RelayKey as RelayKey
from relayd.config.keys import hash_key as hash_key
from relayd.config.keys import parse_keys_env as parse_keys_env
from relayd.config.keys import parse_keys_file as parse_keys_file
from relayd.config.load import load_settings as load_settings
from relayd.config.load import updated as updated
from relayd.config.report import masked_url as masked_url
from relayd.config.report import redacted as redacted
from relayd.config.settings import DEFAULT_DENY as DEFAULT_DENY
from relayd.config.settings import DEFAULT_FETCH_HOSTS as DEFAULT_FETCH_HOSTS
from relayd.config.settings import SECTIONS as SECTIONS
from relayd.config.settings import Actions as Actions
from relayd.config.settings import Auth as Auth
from relayd.config.settings import Limits as Limits
from relayd.config.settings import Logging as Logging
from relayd.config.settings import Mcp as Mcp
from relayd.config.settings import Meta as Meta
from relayd.config.settings import OAuth as OAuth
from relayd.config.settings import Policy as Policy
from relayd.config.settings import Realtime as Realtime
from relayd.config.settings import Server as Server
from relayd.config.settings import Settings as Settings
from relayd.config.settings import Spend as Spend
from relayd.config.settings import Store as Store
from relayd.config.settings import Upstream as Upstream
from relayd.config.spend_limits import KeyLimits as KeyLimits
