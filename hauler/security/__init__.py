"""Security: the project CA, startup kits, mutual TLS and the identity of peers.

Other layers import only what is listed here. The ssl contexts and grpc credentials
made here are for `hauler.transport`; nothing else handles ssl or grpc objects.
"""

from hauler.security.ca import Role
from hauler.security.provision import load_project, provision
from hauler.security.tls import (
    Identity,
    client_ssl_context,
    grpc_channel_credentials,
    grpc_server_credentials,
    grpc_tls_failure,
    identity_from_grpc_auth_context,
    identity_from_ssl_object,
    server_ssl_context,
    tls_failure,
)

__all__ = [
    "Identity",
    "Role",
    "client_ssl_context",
    "grpc_channel_credentials",
    "grpc_server_credentials",
    "grpc_tls_failure",
    "identity_from_grpc_auth_context",
    "identity_from_ssl_object",
    "load_project",
    "provision",
    "server_ssl_context",
    "tls_failure",
]
