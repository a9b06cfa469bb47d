"""Functions copied between scripts, marked `# Copied from <module>.<function>` (diffusers' convention), must stay
equal to their original: each script holds its whole method for a reader who copies it out, and a fix to the original
must reach every copy."""

import importlib
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
