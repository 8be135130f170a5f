"""The Weave SDK's tests: its error reporting is off before the SDK is first imported.

The SDK builds a Sentry client when it is imported (unless WANDB_ERROR_REPORTING is false)
and sends sessions and errors to W&B from it, also at exit; a test run must send nothing.
"""

import os

os.environ["WANDB_ERROR_REPORTING"] = "false"
