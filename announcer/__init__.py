"""announcer: keeps a healthy service's record in etcd under a lease."""

__version__ = "0.2.0"
