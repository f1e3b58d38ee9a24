"""`python -m pipelines.jobs [--work] FOLDER`: a job's supervisor, or its worker (pipelines.jobs.process)."""

import sys

from pipelines.jobs.process import main

sys.exit(main())
