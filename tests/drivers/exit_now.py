#!/usr/bin/env python3
"""A test driver that dies at once, every time: says so on stderr and exits with code 3."""

import sys

sys.stderr.write("exit_now: exiting at once\n")
sys.exit(3)
