"""Model text never reaches an evaluator; adversarial answers cost at most their timeout.

The static checks scan every module of the dapo_megatron package: an AST pass finds
calls and references that would evaluate strings (builtins ``eval``/``exec``/
``compile``/``__import__``; sympy's ``sympify``/``S()``/``parse_expr``/``parse_latex``/
``lambdify``, which run ``eval`` inside), and a text grep catches the same names in forms
the AST pass could miss (``getattr(builtins, "eval")``). A genuine need elsewhere in the
package goes in ``ALLOWED`` with its file and a reason, so each exception is reviewed.
"""

import ast
import os
import re
import time
from pathlib import Path

import pytest

import dapo_megatron
from dapo_megatron.reward import RewardPool, compute_score

PACKAGE = Path(dapo_megatron.__file__).parent
FORBIDDEN_NAMES = {"eval", "exec", "compile", "__import__"}
FORBIDDEN_ANYWHERE = {"sympify", "parse_expr", "parse_latex", "lambdify", "evalf_with_eval"}
FORBIDDEN_TEXT = re.compile(
    r"(?<![\w.])(?:eval|exec|compile|__import__)\s*\("  # builtin calls (not obj.eval())
    r"|\bsympify\b|\bparse_expr\b|\bparse_latex\b|\blambdify\b|sympy\.parsing"
    r"|getattr\s*\(.*[\"'](?:eval|exec|compile|__import__)[\"']"  # getattr(builtins, "eval")
)
# (path relative to the package, forbidden name) -> why it is safe. Keep it empty if you can.
ALLOWED: dict[tuple[str, str], str] = {}


def _modules():
    return sorted(PACKAGE.rglob("*.py"))


def _violations_ast(path: Path) -> list[str]:
    rel = str(path.relative_to(PACKAGE))
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        name = None
        # Loads only: a config field named ``eval`` is a store, not the builtin.
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and (
            node.id in FORBIDDEN_NAMES | FORBIDDEN_ANYWHERE
        ):
            name = node.id
        elif isinstance(node, ast.Attribute) and node.attr in FORBIDDEN_ANYWHERE:
            name = node.attr
        elif isinstance(node, ast.Call):
            func = node.func
            # sympy.S("...") / S("...") parses its string argument like sympify.
            if (isinstance(func, ast.Name) and func.id == "S") or (
                isinstance(func, ast.Attribute) and func.attr == "S"
            ):
                name = "S("
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            module = getattr(node, "module", None) or ""
            names = {a.name for a in node.names}
            if module.startswith("sympy.parsing") or any(n.startswith("sympy.parsing") for n in names):
                name = "sympy.parsing"
            elif names & (FORBIDDEN_ANYWHERE | {"S"}) and module.startswith("sympy"):
                name = "from sympy import " + ",".join(sorted(names))
        if name and (rel, name) not in ALLOWED:
            found.append(f"{rel}:{node.lineno}: {name}")
    return found


def test_package_has_no_string_evaluation():
    violations = []
    for path in _modules():
        violations += _violations_ast(path)
        rel = str(path.relative_to(PACKAGE))
        for k, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for m in FORBIDDEN_TEXT.finditer(line):
                if (rel, m.group(0).strip("(\"' ")) not in ALLOWED:
                    violations.append(f"{rel}:{k}: {line.strip()}")
    assert not violations, "string evaluation in the package:\n" + "\n".join(violations)


def test_the_scan_catches_what_it_claims(tmp_path):
    # The checks are only meaningful if they fire on the patterns they target.
    bad = tmp_path / "bad.py"
    snippets = ["eval('1')", "exec('x=1')", "sympy.sympify(s)", "from sympy import sympify",
                "from sympy.parsing.latex import parse_latex", "sympy.S(s)", "__import__('os')",
                "f = getattr(builtins, 'eval')"]
    for code in snippets:
        bad.write_text(code + "\n")
        hits = FORBIDDEN_TEXT.search(code) is not None or bool(
            _violations_ast_standalone(bad)
        )
        assert hits, code
    for code in ["model.eval()", "re.compile('x')", "torch.compile(m)", "evaluate(tree)",
                 "sub.add_parser('eval')", "if cmd == 'eval':"]:
        assert FORBIDDEN_TEXT.search(code) is None, code


def _violations_ast_standalone(path: Path) -> list[str]:
    global PACKAGE
    saved, PACKAGE = PACKAGE, path.parent
    try:
        return _violations_ast(path)
    finally:
        PACKAGE = saved


def _adversarial(tmp_path: Path) -> list[tuple[str, str]]:
    marker = tmp_path / "pwned"
    nest = "(" * 100_000 + "1" + ")" * 100_000
    return [
        ("Answer: 9^9^9^9", "1"),
        ("\\boxed{9^{9^{9^{9}}}}", "1"),
        ("Answer: " + nest, "1"),
        ("\\boxed{" + "{" * 100_000 + "1" + "}" * 100_000 + "}", "1"),
        ("x" * 1_000_000, "1"),
        ("Answer: " + "9" * 1_000_000, "9"),
        (f"Answer: __import__('os').system('touch {marker}')", "0"),
        (f"Answer: __import__('subprocess').Popen(['sleep', '31.4159'])", "0"),
        (f"\\boxed{{open('{marker}2', 'w').write('x')}}", "0"),
        ("Answer: \udcff\udcfe", "1"),
        ("Answer: \ud800 42", "42"),
        ("Answer: (10^{10})!", "1"),
        ("Answer: \\binom{10^{9}}{500000000}", "1"),
        ("Answer: " + "\\sqrt{" * 400 + "2" + "}" * 400, "1"),
        ("Answer: " + "x^" * 300 + "x", "1"),
        ("Answer: " + "\\sqrt" * 150 + "2", "1"),
        ("Answer: " + "-" * 300 + "1", "1"),
    ]


def test_adversarial_inputs_in_process(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for response, gt in _adversarial(tmp_path):
        t0 = time.perf_counter()
        result = compute_score(response, gt)
        assert result.score == -1.0 and not result.correct, response[:60]
        assert time.perf_counter() - t0 < 3.0, response[:60]
    assert list(tmp_path.iterdir()) == []


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = set(), [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def _cmdlines_with(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if marker in Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry))
            except OSError:
                pass
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_adversarial_inputs_through_the_pool(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cases = _adversarial(tmp_path)
    with RewardPool(num_workers=2, timeout_s=5.0) as pool:
        pool.start()
        workers = set(pool.worker_pids)
        before = _descendants(os.getpid())
        t0 = time.perf_counter()
        results = pool.score([r for r, _ in cases], [g for _, g in cases])
        elapsed = time.perf_counter() - t0
        assert [r.score for r in results] == [-1.0] * len(cases)
        assert elapsed < 5.0 * len(cases)
        # Nothing written, nothing started: no new descendants, no worker children.
        assert list(tmp_path.iterdir()) == []
        assert _descendants(os.getpid()) - before == set()
        assert all(not _descendants(pid) for pid in workers)
        assert _cmdlines_with("31.4159") == []
        # ... and the pool keeps serving, with the same workers.
        again = pool.score(["Answer: 7", "\\boxed{\\frac{1}{2}}"], ["7", "0.5"])
        assert [r.correct for r in again] == [True, True]
        assert set(pool.worker_pids) == workers
        assert pool.timeouts == 0
