"""Log set-up shared by every process."""

import logging


def configure_logging(level: str) -> None:
    """One line per record on stderr, at the given level."""
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
