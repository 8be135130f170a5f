"""What the harness's servers share: started on the way into a `with`, closed on the way out."""

import abc
from types import TracebackType
from typing import Self


class Servers(abc.ABC):
    """Servers the harness runs: `with` starts them, and closes them however it ends (a
    start that fails halfway is closed too)."""

    @abc.abstractmethod
    def start(self) -> None:
        """Start the servers; returns once they serve."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop the servers and remove what they left; safe after a failed or no start."""

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
