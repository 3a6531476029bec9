"""How a failed measurement is recorded: short and full error texts, and the warnings seen.

A benchmark never stops for one implementation that cannot run; it records why, in a
form short enough for a table (``short``) and long enough to debug (``detail``).
"""

from __future__ import annotations


class Unsupported(Exception):
    """An implementation that does not apply to this device or configuration."""


def short(exc: BaseException, limit: int = 400) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    # Compiler errors put the source excerpt first and the actual complaint last.
    text = f"{type(exc).__name__}: {lines[0]}" + (f" ... {lines[-1]}" if len(lines) > 1 else "")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def detail(exc: BaseException, limit: int = 4000) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[: limit // 2] + "\n...\n" + text[-limit // 2:]


def warning_texts(caught, limit: int = 4) -> list[str]:
    """The first line of each distinct warning, at most ``limit`` of them."""
    seen = []
    for w in caught:
        text = str(w.message).strip().splitlines()[0][:300] if str(w.message).strip() else ""
        if text and text not in seen:
            seen.append(text)
    return seen[:limit]
