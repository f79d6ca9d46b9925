"""The broker side: routing, the wire contract, supervision, control socket and CLI."""
