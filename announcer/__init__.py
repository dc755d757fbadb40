"""announcer: keeps a healthy service's record in etcd under a lease."""

__version__ = "0.1.0"
