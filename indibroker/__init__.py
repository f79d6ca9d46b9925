"""indibroker: a multiprocess INDI server on a ZeroMQ backbone."""

__version__ = "0.1.0"
