"""Worker processes (gateway, exdriver, pydriver, remote) and the INDI codec they share."""
