"""
TOML configuration for both daemons, validated with errors that name the file and key.

# API CONTRACT (implementation pending) -- see docs/protocol.rst, ../shared/design.md §5
#
# class ConfigError(Exception): str() is one line: "FILE: key 'port': must be an integer 1-65535, got 'abc'"
#
# @dataclass(frozen=True) class PeerEntry: name: str; public_key: PublicKey; network: str = "default"
# @dataclass(frozen=True) class RendezvousConfig:
#     port: int = 3478; interface: str = ""  ("" = all IPv4 interfaces; an IP literal otherwise)
#     private_key: PrivateKey; private_key_path: str
#     peers: dict[str, PeerEntry]; peers_path: str
#     binding_rate: float = 50.0     # Binding replies/s per source IP (token bucket, burst 2x); 0 = unlimited
#     max_pending: int = 256         # pending introductions per agent
#     registration_lifetime: int = 600  # max LIFETIME granted, seconds
#     log_format: str = "text"       # "text" | "json"
# @dataclass(frozen=True) class AgentConfig:
#     name: str; private_key: PrivateKey; private_key_path: str
#     rendezvous: tuple[str, int]     # host (name or literal), port; from "host:port" / "[v6]:port"
#     rendezvous_public_key: PublicKey
#     control_socket: str = "/run/punchd/agent.sock"
#     keepalive: float = 20.0         # seconds, 1..3600
#     allow_users: tuple[str, ...] = ()   # user names or numeric uids, besides the agent's own user
#     allow_groups: tuple[str, ...] = ()  # group names or numeric gids
#     connect_timeout: float = 10.0
#     pinned_peers: dict[str, PublicKey]  # optional [peers.NAME] public_key = "..." in agent.toml
#     log_format: str = "text"
#
# def load_peers(path) -> dict[str, PeerEntry]
# def load_rendezvous_config(path: str | None, overrides: Mapping[str, object]) -> RendezvousConfig
# def load_agent_config(path: str | None, overrides: Mapping[str, object]) -> AgentConfig
#     overrides: command-line values (already strings or None = not given) keyed by
#     config key; they win over the file.  Relative paths in a file resolve against
#     the file's directory.  Unknown keys, wrong types, missing required keys,
#     unreadable/malformed key files, bad addresses, bad names -> ConfigError.
# NAME_RE: names of peers/agents/services: ^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$
"""
