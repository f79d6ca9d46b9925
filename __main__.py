"""`python -m indibroker` is the `indibroker` command."""

import sys

from indibroker.broker.cli import main

sys.exit(main())
