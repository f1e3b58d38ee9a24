"""The Hugging Face Space's entry point (README.md's `app_file`): the same studio `mactuner studio` serves, set up for
the Space it runs in (pipelines/space.py) - on 0.0.0.0:7860, with the workspace and the HF cache on persistent
storage (/data) when it is mounted, and a login: Hugging Face sign-in for the owner and MACTUNER_ALLOWED_USERS, or
the MACTUNER_PASSWORD secret; without either it refuses to start unless the secret MACTUNER_OPEN=1 says otherwise.

    python app.py              # what the Space runs
    MACTUNER_STUDIO_ARGS="--no-prepare-hf" python app.py     # extra `mactuner studio` arguments, if any

Off a Space it is plain `mactuner studio` (127.0.0.1:7860).
"""

import os
import shlex
import sys

from pipelines.cli import main

if __name__ == "__main__":
    sys.exit(main(["studio", *shlex.split(os.environ.get("MACTUNER_STUDIO_ARGS", ""))]))
