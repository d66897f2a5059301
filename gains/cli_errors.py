"""How the CLIs print our errors: one line, without the traceback text torch adds to worker errors."""
from __future__ import annotations

import re


def one_line(e: BaseException) -> str:
    """The message of one of our errors, without the traceback text that torch's DataLoader puts in front
    of an exception re-raised from a worker process ("Caught DataError in DataLoader worker process 0.
    Original Traceback ...")."""
    text = str(e)
    if "Original Traceback" in text:
        found = re.findall(rf"^(?:[\w.]+\.)?{type(e).__name__}: (.*)$", text, flags=re.M)
        if found:
            return found[-1]
    return text
