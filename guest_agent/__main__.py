"""`python -m guest_agent` is the same as the `guest-agent` console script."""

import sys

from guest_agent.cli import main

sys.exit(main())
