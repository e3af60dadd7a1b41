"""No shell strings: nothing hvdclip ships hands user input to a shell.

Python (hvdclip/, launch/, benchmarks/, examples/) is read with `ast`: no call passes `shell=` other
than False, none of the functions that always run a shell is called (`os.system`, `os.popen`,
`subprocess.getoutput`/`getstatusoutput`, `asyncio.create_subprocess_shell`), and the subprocess
runners get a list, never one command string. The shell scripts (launch/, docker/*.sh) contain no
`eval` and no `sh -c`, and pass arguments on only as "$@". The Dockerfiles' exec form is checked in
test_docker.py. Each checker is also run on bad snippets, so that it is known to fail.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PYTHON_DIRS = ("hvdclip", "launch", "benchmarks", "examples")

SHELL_FUNCTIONS = {
    "os.system",
    "os.popen",
    "subprocess.getoutput",
    "subprocess.getstatusoutput",
    "asyncio.create_subprocess_shell",
}
RUNNERS = {"subprocess.run", "subprocess.Popen", "subprocess.call", "subprocess.check_call", "subprocess.check_output"}


# ------------------------------------------------------------------------------------ Python


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> what it stands for: `import subprocess as sp` gives {"sp": "subprocess"}."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                aliases[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return aliases


def _qualified(func: ast.expr, aliases: dict[str, str]) -> str | None:
    """`sp.Popen` -> "subprocess.Popen" given the aliases; None for calls on anything but a name."""
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if not isinstance(func, ast.Name):
        return None
    return ".".join([aliases.get(func.id, func.id), *reversed(parts)])


def _is_one_string(node: ast.expr) -> bool:
    """Whether an expression evidently builds one string (a command line) rather than a list."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    if isinstance(node, ast.JoinedStr):
        return True
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mod)):
        return _is_one_string(node.left)
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("format", "join")


def python_findings(source: str, filename: str = "<snippet>") -> list[str]:
    """Every place in `source` that runs a shell or hands a subprocess one command string."""
    tree = ast.parse(source, filename)
    aliases = _aliases(tree)
    findings = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        where = f"{filename}:{node.lineno}"
        name = _qualified(node.func, aliases)
        if name in SHELL_FUNCTIONS:
            findings.append(f"{where}: {name}() runs a shell")
        for keyword in node.keywords:
            if keyword.arg == "shell" and not (isinstance(keyword.value, ast.Constant) and keyword.value.value is False):
                findings.append(f"{where}: shell={ast.unparse(keyword.value)}")
        if name in RUNNERS:
            command = node.args[0] if node.args else next((k.value for k in node.keywords if k.arg == "args"), None)
            if command is not None and _is_one_string(command):
                findings.append(f"{where}: {name}() is given one string, not a list")
    return findings


def python_files() -> list[Path]:
    return sorted(path for folder in PYTHON_DIRS for path in (REPO / folder).rglob("*.py"))


def test_python_runs_no_shell():
    files = python_files()
    assert REPO / "hvdclip/launch/executor.py" in files and REPO / "benchmarks/runner.py" in files
    findings = [f for path in files for f in python_findings(path.read_text(), str(path.relative_to(REPO)))]
    assert findings == []


def test_the_python_checker_sees_the_real_subprocess_calls():
    # Guards against a checker that passes because it resolves nothing.
    tree = ast.parse((REPO / "hvdclip/launch/executor.py").read_text())
    aliases = _aliases(tree)
    names = {_qualified(node.func, aliases) for node in ast.walk(tree) if isinstance(node, ast.Call)}
    assert "subprocess.Popen" in names


# ------------------------------------------------------------------------------------- shell


def _unquoted_lines(text: str) -> list[str]:
    """Each line with comments removed and every quoted part replaced by Q, quote state carried
    across lines (a multi-line '...' string is one quoted part).

    A small scanner: quotes nested inside "$( ... )" are not tracked, which can only over-report.
    """
    lines, current, quote, comment = [], [], None, False
    i = 0
    while i < len(text):
        char = text[i]
        if char == "\n":
            lines.append("".join(current))
            current, comment = [], False
            if quote is not None:
                current.append("Q")
        elif comment:
            pass
        elif quote is None:
            if char == "\\" and i + 1 < len(text):
                i += 1
            elif char in "'\"":
                quote = char
                current.append("Q")
            elif char == "#" and (not current or current[-1].isspace()):
                comment = True
            else:
                current.append(char)
        elif char == quote:
            quote = None
        elif char == "\\" and quote == '"':
            i += 1
        i += 1
    lines.append("".join(current))
    return lines


_COMMAND_START = r"(?:^|[\s;&|(`{])"


def shell_findings(text: str, filename: str = "<snippet>") -> list[str]:
    """`eval`, `sh -c` and unquoted `$@`/`$*` in a shell script."""
    findings = []
    for number, line in enumerate(_unquoted_lines(text), start=1):
        where = f"{filename}:{number}"
        if re.search(rf"{_COMMAND_START}eval(?:\s|$)", line):
            findings.append(f"{where}: eval")
        if re.search(rf"{_COMMAND_START}(?:ba|da|z)?sh\s+-c(?:\s|$)", line):
            findings.append(f"{where}: a shell run on a string (sh -c)")
        if re.search(r"\$(?:[@*]|\{[@*]\})", line):
            findings.append(f'{where}: unquoted $@ or $* (pass arguments on as "$@")')
    return findings


def shell_scripts() -> list[Path]:
    """docker/*.sh and every shell script in launch/ (named *.sh or not: hvdclip-run, slurm.sbatch)."""
    candidates = [*(REPO / "launch").iterdir(), *(REPO / "docker").glob("*.sh")]
    return sorted(p for p in candidates if p.is_file() and re.match(r"#!.*\b(ba)?sh\b", p.read_text().split("\n", 1)[0]))


def test_shell_scripts_never_eval_and_quote_their_arguments():
    scripts = shell_scripts()
    names = {str(p.relative_to(REPO)) for p in scripts}
    assert {"launch/horovodrun.sh", "launch/mpirun.sh", "launch/hvdclip-run", "docker/install_python.sh"} <= names
    findings = [f for path in scripts for f in shell_findings(path.read_text(), str(path.relative_to(REPO)))]
    assert findings == []


def test_the_launch_wrappers_pass_their_arguments_on_as_quoted_words():
    for name in ("horovodrun.sh", "mpirun.sh", "hvdclip-run", "slurm.sbatch"):
        assert '"$@"' in (REPO / "launch" / name).read_text(), name


# ------------------------------------------------------------------------------ the checkers


@pytest.mark.parametrize(
    "checker, snippet, finding",
    [
        (python_findings, "import subprocess\nsubprocess.run(['ls'], shell=True)", r"^<snippet>:2: shell=True$"),
        (python_findings, "import subprocess as sp\nsp.Popen(argv, shell=wanted)", r"^<snippet>:2: shell=wanted$"),
        (python_findings, "import os\nos.system('ls ' + path)", r"os\.system\(\) runs a shell"),
        (python_findings, "from os import popen\npopen('ls')", r"os\.popen\(\) runs a shell"),
        (python_findings, "import subprocess\nsubprocess.getoutput('ls')", r"subprocess\.getoutput\(\) runs a shell"),
        (python_findings, "from subprocess import getstatusoutput as status\nstatus('ls')", r"subprocess\.getstatusoutput\(\) runs a shell"),
        (python_findings, "import asyncio\nasyncio.create_subprocess_shell(line)", r"asyncio\.create_subprocess_shell\(\) runs a shell"),
        (python_findings, "import subprocess\nsubprocess.check_output(f'ls {path}')", r"subprocess\.check_output\(\) is given one string"),
        (python_findings, "import subprocess\nsubprocess.call('ls %s' % path)", r"subprocess\.call\(\) is given one string"),
        (python_findings, "import subprocess\nsubprocess.run(args=' '.join(argv))", r"subprocess\.run\(\) is given one string"),
        (python_findings, "def f():\n    from subprocess import Popen\n    Popen('mpirun -np {}'.format(n))", r"subprocess\.Popen\(\) is given one string"),
        (shell_findings, 'cmd="mpirun -np $N $*"\neval "$cmd"', r"^<snippet>:2: eval$"),
        (shell_findings, "x=1; eval $(build_command)", r":1: eval$"),
        (shell_findings, 'exec python -m hvdclip.launch "--backend" $@', r':1: unquoted \$@ or \$\*'),
        (shell_findings, "exec prog ${*}", r":1: unquoted \$@ or \$\*"),
        (shell_findings, "run() {\n  bash -c \"python $1\"\n}", r":2: a shell run on a string"),
        (shell_findings, "echo 'a multi-line\nstring' && sh -c \"$line\"", r":2: a shell run on a string"),
    ],
)
def test_each_checker_finds_what_it_must(checker, snippet, finding):
    findings = checker(snippet)
    assert any(re.search(finding, f) for f in findings), findings


SAFE_PYTHON = (
    "import shlex, subprocess\n"
    "subprocess.run(['ls', path], shell=False, check=True)\n"
    "subprocess.Popen(list(argv) + ['--verbose'], env=env)\n"
    "print(shlex.join(argv))\n"
)
SAFE_SHELL = (
    '#!/usr/bin/env bash\n'
    '# eval and $@ in a comment are fine\n'
    'exec "$(dirname "$0")/hvdclip-run" --backend mpirun "$@"\n'
    'die() { echo "install: $*" >&2; exit 1; }\n'
    "retval=0; printf '%s\\n' 'eval $@ in single quotes'\n"
    'python -c \'import sys\nprint("$@ stays Python")\'\n'
)


@pytest.mark.parametrize("checker, snippet", [(python_findings, SAFE_PYTHON), (shell_findings, SAFE_SHELL)])
def test_each_checker_accepts_safe_code(checker, snippet):
    assert checker(snippet) == []
