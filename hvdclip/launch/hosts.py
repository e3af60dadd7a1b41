"""Host lists: `-H host1:4,host2:4` and hostfiles in Open MPI (`host slots=4`) or Horovod (`host:4`) form.

Both forms parse to the same tuple of `Host`, which each backend renders in its own syntax, so a
hostfile written for one launcher works with the others.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from hvdclip.validation import check_int

__all__ = ["Host", "parse_host_list", "parse_hostfile", "read_hostfile", "total_slots"]

# A host name or address: no whitespace, and none of the characters that separate fields.
_NAME = r"[^\s,:=#]+"
_HOROVOD_FORM = re.compile(rf"({_NAME}):(\d+)")
_OPENMPI_FORM = re.compile(rf"({_NAME})\s+slots\s*=\s*(\d+)")


@dataclass(frozen=True)
class Host:
    """One machine and how many ranks (slots) it may run."""

    name: str
    slots: int

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not re.fullmatch(_NAME, self.name):
            error = ValueError if isinstance(self.name, str) else TypeError
            raise error(f"`name` must be a host name or address (no spaces, ',', ':', '=' or '#'). Received: name={self.name!r}")
        check_int("slots", self.slots, ge=1)

    def __str__(self) -> str:
        return f"{self.name}:{self.slots}"


def total_slots(hosts: tuple[Host, ...]) -> int:
    return sum(host.slots for host in hosts)


def _host(match: re.Match | None) -> Host | None:
    """The `Host` of a matched entry, or None when it did not match or has no slots."""
    if match is None or int(match.group(2)) < 1:
        return None
    return Host(match.group(1), int(match.group(2)))


def refuse_repeats(hosts: list[Host], where: list[str]) -> tuple[Host, ...]:
    # A repeated name is almost always a copy-paste slip; summing its slots silently would hide it.
    first: dict[str, str] = {}
    for host, place in zip(hosts, where):
        if host.name in first:
            raise ValueError(
                f"Each host must be listed once, with all its slots. Received: `{host.name}` at {first[host.name]} "
                f"and at {place}"
            )
        first[host.name] = place
    return tuple(hosts)


def parse_host_list(text: str) -> tuple[Host, ...]:
    """Parses Horovod's `-H` form.

    Example:
        >>> parse_host_list("node1:4,node2:4")
        (Host(name='node1', slots=4), Host(name='node2', slots=4))

    Raises:
        ValueError: an entry is not `host:N` with N >= 1, or a host appears twice.
    """
    hosts = []
    for entry in text.split(","):
        host = _host(_HOROVOD_FORM.fullmatch(entry.strip()))
        if host is None:
            raise ValueError(f"`-H` entries must be `host:N` with N >= 1. Received: -H={text} (entry {entry!r})")
        hosts.append(host)
    return refuse_repeats(hosts, [f"-H entry {i}" for i in range(1, len(hosts) + 1)])


def parse_hostfile(text: str, source: str = "<hostfile>") -> tuple[Host, ...]:
    """Parses hostfile text: one `host slots=N` or `host:N` per line; `#` comments and blank lines are skipped.

    Args:
        text: the file's contents.
        source: the file name, used in error messages as `source:line`.

    Raises:
        ValueError: a line is in neither form (the message gives `source:line`), a host appears
            twice, or the file names no host.
    """
    hosts, where = [], []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        host = _host(_OPENMPI_FORM.fullmatch(line) or _HOROVOD_FORM.fullmatch(line))
        if host is None:
            raise ValueError(
                f"`--hostfile` lines must be `host slots=N` or `host:N` with N >= 1. "
                f"Received: {source}:{number}: {raw.strip()!r}"
            )
        hosts.append(host)
        where.append(f"{source}:{number}")
    if not hosts:
        raise ValueError(f"`--hostfile` must name at least one host. Received: {source} with no host lines")
    return refuse_repeats(hosts, where)


def read_hostfile(path: str | Path) -> tuple[Host, ...]:
    """Reads and parses a hostfile; see `parse_hostfile`."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ValueError(f"`--hostfile` must be a readable file ({err.strerror}). Received: --hostfile={path}") from None
    return parse_hostfile(text, source=str(path))
