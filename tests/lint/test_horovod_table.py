"""docs/horovod.md's table of Horovod's public names agrees with the installed Horovod and with hvdclip.

Both ways: every public name of Horovod's five modules (read from the installed package) has a row,
and no row names something Horovod does not have; a name the table supports is in hvdclip's module,
Horovod's own object if the row says "as is", hvdclip's own if it says "changed"; a name it does not
support is absent. The checker also runs on bad tables, so that it is known to fail.
"""

from __future__ import annotations

import importlib
import re
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TABLE = REPO / "docs" / "horovod.md"
COUNTERPARTS = {
    "horovod.tensorflow": "hvdclip.tensorflow",
    "horovod.tensorflow.keras": "hvdclip.keras",
    "horovod.tensorflow.keras.callbacks": "hvdclip.keras.callbacks",
    "horovod.tensorflow.elastic": "hvdclip.tensorflow.elastic",
    "horovod.tensorflow.keras.elastic": "hvdclip.keras.elastic",
}
STATUSES = ("as is", "changed", "not supported")
ROW = re.compile(r"^\| `(horovod\.[\w.]+)` \| ([a-z ]+) \|")


def horovod_public_names(module: types.ModuleType) -> set[str]:
    """A module's `__all__`, else its attributes not starting with `_` that are not modules."""
    if hasattr(module, "__all__"):
        return set(module.__all__)
    return {name for name, value in vars(module).items() if not name.startswith("_") and not isinstance(value, types.ModuleType)}


def table_rows(text: str) -> dict[tuple[str, str], str]:
    """{(Horovod module, name): status} from the table's rows."""
    rows = {}
    for line in text.splitlines():
        found = ROW.match(line)
        if found:
            module, _, name = found.group(1).rpartition(".")
            assert (module, name) not in rows, f"two rows for {found.group(1)}"
            rows[(module, name)] = found.group(2)
    return rows


def problems(rows: dict[tuple[str, str], str], horovod: dict[str, set[str]], hvdclip: dict[str, types.ModuleType]) -> list[str]:
    """Everything on which the table, Horovod and hvdclip disagree."""
    found = []
    for module, names in horovod.items():
        found += [f"{module}.{name}: no row" for name in sorted(names) if (module, name) not in rows]
    for (module, name), status in sorted(rows.items()):
        full = f"{module}.{name}"
        if module not in horovod or name not in horovod[module]:
            found.append(f"{full}: a row, but no such public name in Horovod")
            continue
        if status not in STATUSES:
            found.append(f"{full}: status {status!r} is not one of {STATUSES}")
            continue
        ours, theirs = hvdclip[COUNTERPARTS[module]], importlib.import_module(module)
        present = hasattr(ours, name)
        if status == "not supported" and present:
            found.append(f"{full}: 'not supported', but {ours.__name__}.{name} exists")
        elif status != "not supported" and not present:
            found.append(f"{full}: {status!r}, but {ours.__name__} has no {name}")
        elif status == "as is" and getattr(ours, name) is not getattr(theirs, name):
            found.append(f"{full}: 'as is', but {ours.__name__}.{name} is not Horovod's object")
        elif status == "changed" and getattr(ours, name) is getattr(theirs, name):
            found.append(f"{full}: 'changed', but {ours.__name__}.{name} is Horovod's own object")
    return found


@pytest.fixture(scope="module")
def modules():
    horovod = {name: horovod_public_names(importlib.import_module(name)) for name in COUNTERPARTS}
    hvdclip = {name: importlib.import_module(name) for name in COUNTERPARTS.values()}
    return horovod, hvdclip


def test_the_table_covers_horovod_and_matches_hvdclip(modules):
    horovod, hvdclip = modules
    assert problems(table_rows(TABLE.read_text()), horovod, hvdclip) == []


def test_hvdclip_reaches_the_submodules_by_horovods_attribute_names(modules):
    _, hvdclip = modules
    assert hvdclip["hvdclip.tensorflow"].elastic is hvdclip["hvdclip.tensorflow.elastic"]
    assert hvdclip["hvdclip.keras"].elastic is hvdclip["hvdclip.keras.elastic"]
    assert hvdclip["hvdclip.keras"].callbacks is hvdclip["hvdclip.keras.callbacks"]


@pytest.mark.parametrize(
    "row, expected",
    [
        (None, r"horovod\.tensorflow\.allreduce: no row"),
        ("| `horovod.tensorflow.no_such_name` | as is | |", r"no such public name in Horovod"),
        ("| `horovod.tensorflow.allreduce` | partly | |", r"status 'partly' is not one of"),
        ("| `horovod.tensorflow.allreduce` | changed | |", r"'changed', but hvdclip\.tensorflow\.allreduce is Horovod's own"),
        ("| `horovod.tensorflow.allreduce` | not supported | |", r"'not supported', but hvdclip\.tensorflow\.allreduce exists"),
        ("| `horovod.tensorflow.broadcast_variables` | as is | |", r"'as is', but hvdclip\.tensorflow\.broadcast_variables is not Horovod's"),
        ("| `horovod.tensorflow.broadcast_object_fn` | as is | |", r"'as is', but hvdclip\.tensorflow has no broadcast_object_fn"),
    ],
)
def test_the_checker_finds_each_kind_of_disagreement(modules, row, expected):
    horovod, hvdclip = modules
    rows = table_rows(TABLE.read_text())
    if row is None:
        del rows[("horovod.tensorflow", "allreduce")]
    else:
        rows.pop(("horovod.tensorflow", row.split("`")[1].rpartition(".")[2]), None)
        rows.update(table_rows(row))
    assert any(re.search(expected, problem) for problem in problems(rows, horovod, hvdclip)), problems(rows, horovod, hvdclip)
