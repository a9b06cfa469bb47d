"""The layout a reader relies on. Each script holds its whole method: functions copied between scripts, marked
`# Copied from <module>.<function>` (diffusers' convention), stay equal to their original, so a fix to the original
reaches every copy. The imports go one way (common <- infra <- scripts, no cycle), and the toy runs without
diffusers."""

import ast
import importlib
import subprocess
import sys
import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("flow_grpo", "dgpo", "neighbor_grpo", "g2rpo", "pro_grpo")
MARK = re.compile(r"^# Copied from (\w+)\.(\w+)\n(?:@[^\n]*\n)*def (\w+)\(", re.M)


def marked_copies():
    return [(script, *m.groups()) for script in SCRIPTS for m in MARK.finditer((ROOT / f"{script}.py").read_text())]


def drift(copy_source: str, original_source: str, original_name: str, name: str) -> list[str]:
    """The lines where a copy differs from its original (the function's own name aside)."""
    a = copy_source.replace(f"def {name}(", f"def {original_name}(", 1).splitlines()
    b = original_source.splitlines()
    return [f"copy: {x!r} | original: {y!r}" for x, y in zip(a, b) if x != y] + \
        ([f"{len(a)} lines vs {len(b)}"] if len(a) != len(b) else [])


def test_the_shared_updates_are_copies_not_imports():
    """Pro-GRPO runs Flow-GRPO's update and G2RPO Flow-GRPO's PPO loss: as marked copies in their own files."""
    found = {(script, original) for script, _, original, _ in marked_copies()}
    assert {("pro_grpo", "ppo_clip_loss"), ("pro_grpo", "sde_transition_loss"), ("pro_grpo", "ppo_update"),
            ("g2rpo", "ppo_clip_loss")} <= found
    for script in SCRIPTS:  # and no script imports another's
        assert not re.search(rf"^(from|import) ({'|'.join(SCRIPTS)})\b", (ROOT / f"{script}.py").read_text(), re.M)


@pytest.mark.parametrize("script,module,original,name", marked_copies())
def test_a_copy_equals_its_original(script, module, original, name):
    copy_source = inspect.getsource(getattr(importlib.import_module(script), name))
    original_source = inspect.getsource(getattr(importlib.import_module(module), original))
    assert not drift(copy_source, original_source, original, name), \
        f"{script}.{name} has drifted from {module}.{original}: {drift(copy_source, original_source, original, name)}"


def test_the_check_sees_a_one_character_drift():
    import flow_grpo
    source = inspect.getsource(flow_grpo.ppo_clip_loss)
    assert not drift(source, source, "ppo_clip_loss", "ppo_clip_loss")
    assert drift(source.replace("1.0 - clip_range", "1.0 + clip_range"), source, "ppo_clip_loss", "ppo_clip_loss")


def local_imports(path: Path) -> set[str]:
    """The project modules a file imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found |= {f"infra.{a.name}" for a in node.names} if node.module == "infra" else {node.module}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m.split(".")[0] in ("common", "infra", *SCRIPTS)}


def test_the_imports_form_no_cycle_and_common_imports_nothing_of_the_project():
    files = [ROOT / "common.py", *sorted((ROOT / "infra").glob("*.py"))]
    graph = {str(f.relative_to(ROOT)).removesuffix(".py").replace("/", "."): local_imports(f) for f in files}
    assert graph["common"] == set()
    assert not any(graph[m] & set(SCRIPTS) for m in graph)  # the library never imports a script

    def reachable(start):
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen
    assert [m for m in graph if m in reachable(m)] == []


def test_a_toy_run_imports_no_diffusers(tmp_path):
    code = ("import sys, flow_grpo; flow_grpo.main(['--iterations', '1', '--log-every', '0', "
            f"'--eval-samples-per-prompt', '2', '--output-dir', {str(tmp_path)!r}]); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('diffusers', 'peft')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
